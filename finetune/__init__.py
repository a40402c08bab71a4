"""finetune: downstream heads on a pretrained encoder, metrics, reports — and the Python API (`Encoder`, `Finetuned`)."""

from finetune.api import Encoder, Finetuned

__all__ = ["Encoder", "Finetuned"]
