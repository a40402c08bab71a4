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
    # a registered task (`finetune.tasks`): phenotypes, diseases, segmentation, modality_view
    name: str = "phenotypes"
    # phenotypes: targets regressed all at once (z-scored, errors reported in original units)
    targets: list[str] = field(default_factory=lambda: [
        "LVEDV", "LVESV", "LVSV", "LVEF", "LVCO", "LVM", "RVEDV", "RVESV", "RVSV", "RVEF"])
    diseases: list[str] = field(default_factory=lambda: [
        "cad", "infarct", "high_blood_pressure", "diabetes", "hypertension", "stroke"])
    head_hidden: int = 256  # two-layer MLP decoder (ViTa Sec. 4.2); a linear probe uses one Linear layer
    seg_decoder_dim: int = 576  # UNETR-style decoder: channels of its deepest stage, halved per upsampling
    class_weighting: bool = True  # diseases: BCE positive weight n_neg / n_pos per disease (training split)
    # the pooled features before every pooled head (phenotypes, diseases, modality_view): "none" as in the papers,
    # or "batchnorm" (BatchNorm1d): a pretrained encoder's mean-pooled LayerNormed tokens can differ by 1-2 %
    # between subjects, a scale at which a plain head stays at the mean
    feature_norm: Literal["none", "batchnorm"] = "none"
    # recompute every BatchNorm's statistics over the training split before each evaluation (`models.
    # precise_batchnorm`); None: the task's default (on for sax_segmentation's ResNet-50, off elsewhere). With
    # feature_norm batchnorm, few steps an epoch and a fast-moving encoder, the running averages lag the features
    # and the validation metric swings from epoch to epoch
    precise_bn: Optional[bool] = None
    # segmentation: the loss weighted per class by sqrt(median class frequency / class frequency) over the
    # training split's labelled planes, so that small structures (atria, myocardium) are not drowned by background
    seg_class_weighting: bool = False
    slices: int = 3  # modality_view: images per k-space sequence (MetaCLIP-CMR: 3 slices x up to 4 frames)
    max_frames: int = 4
    image_size: int = 224


@dataclass
class ProtocolConfig:
    kind: Literal["linear_probe", "full_finetune", "probe_finetune"] = "full_finetune"
    probe_epochs: int = 10
    encoder_lr_scale: float = 0.1  # Probe+FT: smaller encoder learning rate in the second phase
    layer_decay: Optional[float] = None  # layer-wise learning-rate decay, e.g. 0.75


@dataclass
class FinetuneDataConfig:
    dataset: Optional[Path] = None  # a converted dataset (manifest.json + store.zarr); its splits
    batch_size: int = 8
    workers: int = 2
    eval_all_frames: bool = True  # segmentation test: score every stored frame (T / frames passes), not only 5
    cache: bool = False  # keep decoded images in memory (per process): for datasets that fit, e.g. the demo
    # label efficiency: train on this fraction of the training split's subjects (a nested subset: the first
    # ceil(f x N) keys by a hash of the key, so 10 % is inside 25 % is inside 50 %); validation and test unchanged
    train_fraction: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"data.train_fraction must be in (0, 1], got {self.train_fraction}")


@dataclass
class FinetuneOptimConfig:
    lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    epochs: int = 50
    patience: int = 10  # early stopping: epochs without a better validation metric


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ViTConfig = field(default_factory=ViTConfig)  # the architecture when no encoder is loaded
    # encoder.safetensors, its directory, or a pretraining run directory (latest checkpoint); None: from scratch
    encoder: Optional[Path] = None
    # none: the encoder above; vit_scratch: the same ViT, fresh; resnet50: MONAI's 2D ResNet-50 (planes x frames
    # as channels); mean_guess: no model, the training mean / prevalence
    baseline: Literal["none", "mean_guess", "vit_scratch", "resnet50"] = "none"
    # the 2D ResNet-50 (sax_segmentation without `encoder`) initialised from ImageNet: a local torchvision-layout
    # ResNet-50 state dict (e.g. resnet50-11ad3fa6.pth, or .safetensors) the user supplies; nothing is downloaded
    imagenet_weights: Optional[Path] = None
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    out: Path = Path("runs/finetune")
