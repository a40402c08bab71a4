"""Pretraining stages, registered by name (`stage:` in a pretraining config):

- `mae`           ViTa Stage I: multi-view 3D+T masked autoencoder            (`stages/mae.py`)
- `tabular_clip`  ViTa Stage II: image-tabular CLIP                           (`stages/tabular_clip.py`)
- `metaclip`      MetaCLIP-CMR: image-metadata-text CLIP with soft labels     (`stages/metaclip.py`)

`Stage` (`stages/base.py`) is what each one brings to the loop in `pretrain/train.py`; `register_stage` adds one.
"""

from pretrain.stages.base import STAGES, Stage, get_stage, init_encoder, register_stage
from pretrain.stages import mae, metaclip, tabular_clip  # noqa: E402,F401  (registers the built-in stages)

__all__ = ["STAGES", "Stage", "get_stage", "init_encoder", "register_stage"]
