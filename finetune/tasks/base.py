"""What a fine-tuning task brings to the one loop in `finetune/train.py`, and the registry of tasks by name.

A task (the config's `task.name`) owns everything that differs between downstream problems: its heads on the
encoder (`build_heads`, `forward`), the training-split statistics its loss needs (`train_stats`), the loss, how a
split's predictions are gathered and scored (`collect`, `finish`, `score`, the validation metric that picks the
best epoch), what is decided on validation before the test (`decide`: the diseases' thresholds), what the
result records beside the test scores (`record`), the per-subject CSV row, and its report section. The trainer
names none of them; adding a task is one module that calls `register_task`, plus its config.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from core.registry import Registry
from finetune.models import pooled_features
from pretrain.transforms import select_frames


class Task:
    name: str = ""
    dataset: str = "ukb"  # the converted dataset kind it reads ("ukb": cine subjects, "kspace": sequences)
    dense: bool = False  # a per-pixel decoder on the tokens (no pooled features, no feature norm, seg labels loaded)
    primary: tuple[str, float] = ("", 1.0)  # the validation metric (name, sign): `score`'s primary x sign
    # `finetune compare`: the test scores per output (a key of `score`) when the task has several independent
    # outputs (targets, diseases): the ResNet-50 baseline then trains once per output, as in ViTa; None: one model
    per_output: Optional[str] = None
    label_efficiency: bool = False  # `finetune compare --fractions`: test at nested fractions of the labels
    has_mean_guess: bool = False  # the mean-guess baseline means something (`mean_guess`)
    needs_vit: bool = False  # the heads read the ViT's tokens (no ResNet-50 baseline)
    precise_bn: bool = False  # recompute BatchNorm statistics over the training split before each evaluation

    # --- the model ---
    def n_outputs(self, cfg) -> int:
        """Outputs of the head(s) (targets, diseases); 0 where the task fixes them."""
        return 0

    def targets(self, cfg) -> list[str]:
        """The regression targets the dataset must provide (only phenotype regression has any)."""
        return []

    def build_heads(self, model: nn.Module, dim: int, n_out: int, hidden: int, seg_width: int) -> None:
        """Attach the task's head modules to `model` (a `FinetuneModel`; `dim`: its pooled feature width)."""
        raise NotImplementedError

    def features(self, model: nn.Module, batch: dict) -> Tensor:
        """The pooled embedding of each sample (B, dim): what the heads, t-SNE and `finetune embed` see."""
        return pooled_features(model.encoder, batch["image"])

    def forward(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    # --- training ---
    def train_stats(self, cfg, train_ds, device: torch.device) -> dict:
        """Statistics of the training split the loss and the predictions need ({} by default)."""
        return {}

    def loss(self, cfg, out: dict, batch: dict, stats: dict) -> Tensor:
        raise NotImplementedError

    # --- prediction and scoring ---
    def passes(self, ds, model: nn.Module, all_frames: bool) -> list[int]:
        """Frame offsets to run a split at (segmentation: every stored frame in T / frames passes)."""
        return [0]

    def collect(self, acc: dict, res: dict, batch: dict, offset: int, stats: dict) -> None:
        """Add one batch's predictions and truth (numpy, original units) to `acc` (lists per name)."""
        raise NotImplementedError

    def finish(self, acc: dict, ds, seg_dir=None) -> dict:
        """The gathered lists -> arrays (`key` stays a list)."""
        return {k: (np.concatenate(v) if k != "key" else v) for k, v in acc.items() if v != [] or k == "key"}

    def score(self, cfg, pred: dict, thresholds: Optional[dict] = None, spacing: Any = None,
              stats: Optional[dict] = None) -> dict:
        """Metrics of a prediction; `primary` is the figure to maximise on validation."""
        raise NotImplementedError

    def val_scalars(self, val: dict) -> dict[str, float]:
        """Named validation figures for TensorBoard (`val/<name>`), finite ones only."""
        return finite({k: v for k, v in val.items() if k != "primary"})

    def mean_guess(self, cfg, data: dict) -> Optional[dict]:
        """The test scores without a model (training mean / prevalence); None where that has no meaning."""
        return None

    def single_output(self, cfg, name: str):
        """The task config restricted to one of its outputs (`per_output` tasks)."""
        raise NotImplementedError

    def output_names(self, cfg) -> list[str]:
        return []

    def decide(self, cfg, val_pred: dict) -> Optional[dict]:
        """Decisions made on the validation predictions of the best model and applied to the test (None)."""
        return None

    def test_spacing(self, test_ds, keys: list[str]) -> Any:
        """Pixel spacing for distance metrics on the test split (None: not needed)."""
        return None

    def record(self, cfg, data: dict, stats: dict) -> dict:
        """What the run's metrics.json keeps beside the test scores ({})."""
        return {}

    # --- outputs ---
    def csv_row(self, cfg, out_dir, ds, pred: dict, i: int, thresholds: Optional[dict]) -> dict:
        """Subject i's columns of predictions.csv (after its key)."""
        raise NotImplementedError

    def report(self, cfg, result: dict, pred: dict, fig_dir) -> tuple[list, list]:
        """(sections, figures) of the run's report for the test split."""
        return [], []

    def tsne(self, cfg, pred: dict) -> Optional[tuple[np.ndarray, str]]:
        """(values to colour the test embedding by, their name), or None for no t-SNE figure."""
        return None

    def comparison_table(self, cfg, results: dict[str, dict]) -> str:
        """`finetune compare`: one Markdown table of every method's test scores."""
        raise NotImplementedError

    # --- a finished run as a predictor (`finetune predict`, `finetune.api.Finetuned`) ---
    def restore(self, cfg, result: dict) -> dict:
        """What an older run's metrics.json lacks and prediction needs, computed once at load ({})."""
        return {}

    def predict_stats(self, cfg, result: dict) -> dict:
        """The training statistics `collect` / `outputs` need, from a finished run's metrics.json ({})."""
        return {}

    def run_subject(self, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """The model on one stored-format image (P, T, S, S) at the encoder's evenly spaced frames."""
        return model({"image": x[None, :, select_frames(x.shape[1], model.vit.frames)]})

    def outputs(self, cfg, result: dict, res: dict[str, Tensor], stats: dict) -> dict:
        """`run_subject`'s raw outputs as a user reads them."""
        raise NotImplementedError

    def raw_row(self, out_dir, key: str, study, meta: dict, out: dict) -> dict:
        """A raw subject's columns of predictions.csv (after its key and error)."""
        raise NotImplementedError


def finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


TASKS: Registry[Task] = Registry("task", "task.name")


def register_task(task: Task) -> Task:
    """Make `task` available as `task.name: <name>` in fine-tuning configs."""
    return TASKS.register(task)


def get_task(name: str) -> Task:
    return TASKS.lookup(name)
