"""The learning-rate schedule of every trainer (pretraining and fine-tuning): linear warm-up, then cosine to 0."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, constant: bool = False) -> Callable[[int], float]:
    """step -> lr factor: (step + 1) / warmup during the warm-up, then a cosine from 1 to 0 at `total_steps`
    (or 1 throughout with `constant`). For `torch.optim.lr_scheduler.LambdaLR`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if constant:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return f
