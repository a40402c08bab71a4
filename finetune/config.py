"""Typed configuration of a fine-tuning run (ViTa Stage III, MetaCLIP-CMR downstream), one GPU.

Tasks take images only (ViTa Sec. 3.3); the encoder comes from a pretraining export or run directory.
Paper values are the defaults; `configs/finetune/*.yaml` hold paper-scale and tiny configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pretrain.config import ViTConfig


@dataclass
class TaskConfig:
    name: Literal["phenotypes", "diseases", "segmentation", "modality_view"] = "phenotypes"
    # phenotypes: targets regressed all at once (z-scored, errors reported in original units)
    targets: list[str] = field(default_factory=lambda: [
        "LVEDV", "LVESV", "LVSV", "LVEF", "LVCO", "LVM", "RVEDV", "RVESV", "RVSV", "RVEF"])
    diseases: list[str] = field(default_factory=lambda: [
        "cad", "infarct", "high_blood_pressure", "diabetes", "hypertension", "stroke"])
    head_hidden: int = 256  # two-layer MLP decoder (ViTa Sec. 4.2)
    seg_decoder_dim: int = 576  # UNETR-style decoder (ViTa Sec. 4.2)
    class_weighting: bool = True


@dataclass
class ProtocolConfig:
    kind: Literal["linear_probe", "full_finetune", "probe_finetune"] = "full_finetune"
    probe_epochs: int = 10
    encoder_lr_scale: float = 0.1  # Probe+FT: smaller encoder learning rate in the second phase
    layer_decay: Optional[float] = None  # layer-wise learning-rate decay, e.g. 0.75


@dataclass
class FinetuneDataConfig:
    store: Path = Path("runs/demo/store.zarr")
    batch_size: int = 8
    workers: int = 2
    val_fraction: float = 0.1
    test_subjects: int = 1000


@dataclass
class FinetuneOptimConfig:
    lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    epochs: int = 50


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    encoder: Optional[Path] = None  # encoder.safetensors or a pretraining run dir; None: from scratch
    baseline: Literal["none", "mean_guess", "vit_scratch", "resnet50"] = "none"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    out: Path = Path("runs/finetune")
