"""finetune: downstream heads on a pretrained encoder, metrics, reports — and the Python API (`Encoder`, `Finetuned`).

- `train`       the one fine-tuning loop (`python -m finetune train`); `tasks/`: one object per task, registered by
                name (`phenotypes`, `diseases`, `segmentation`, `modality_view`); a new task is one module there
- `models`, `data` (subjects from a converted dataset), `metrics`, `report`, `figures`
- `api`         `Encoder` / `Finetuned`: load, preprocess raw files, embed, predict, save_pretrained
- `predict`, `embed`, `probe`, `compare`, `scaling`, `demo_report`: the other commands
"""

from finetune.api import Encoder, Finetuned

__all__ = ["Encoder", "Finetuned"]
