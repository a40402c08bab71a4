"""finetune: downstream heads on a pretrained encoder, metrics, reports — and the Python API (`Encoder`)."""

from finetune.api import Encoder

__all__ = ["Encoder"]
