"""Fine-tuning tasks, registered by name (`task.name` in a fine-tuning config):

- `phenotypes`     regression of cardiac phenotypes / tabular targets      (`tasks/phenotypes.py`)
- `diseases`       one binary head per disease, class-weighted, thresholds on validation  (`tasks/diseases.py`)
- `segmentation`   all-plane segmentation with a UNETR decoder, volume Dice      (`tasks/segmentation.py`)
- `modality_view`  MetaCLIP-CMR's modality and view classification of k-space sequences  (`tasks/modality_view.py`)
- `sax_segmentation`  MetaCLIP-CMR's ACDC / M&Ms short-axis segmentation, ResNet-50 U-Net, case-level 3D Dice
                      (`tasks/sax_segmentation.py`)

`Task` (`tasks/base.py`) is what each one brings to the loop in `finetune/train.py`; `register_task` adds one.
"""

from finetune.tasks.base import TASKS, Task, get_task, register_task
# importing each task module registers it
from finetune.tasks import diseases, modality_view, phenotypes, sax_segmentation, segmentation  # noqa: E402,F401

__all__ = ["TASKS", "Task", "get_task", "register_task"]
