"""pretrain: the encoder pretrained with DeepSpeed ZeRO across GPUs and nodes (never imports data_prep or ray).

- `train`       the one training loop, every stage (`python -m pretrain train`); `preflight` before it starts
- `stages/`     one object per stage, registered by name: `mae` (ViTa Stage I), `tabular_clip` (Stage II),
                `metaclip` (MetaCLIP-CMR); a new stage is one module there
- `models/`     `vit` (the multi-view 3D+T ViT and the MAE), `tabular`, `clip`, `metaclip`, `text`, `precision`
- `losses`      the contrastive losses, gathered across ranks; `gradcache`: the global contrastive batch under
                gradient accumulation
- `data`        the streaming WebDataset loader with an exact resume position; `transforms`: the cine and k-space
                sample transforms and augmentations (shared with finetune)
- `checkpoint`  sharded checkpoints, safe resume, the run lock; `export`: the encoder as safetensors + its config
- `config`, `schedule`, `dist`, `evaluate` (validation figures)
"""
