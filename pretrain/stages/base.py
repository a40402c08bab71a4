"""What a pretraining stage brings to the one loop in `pretrain/train.py`, and the registry of stages by name.

A stage is an object with a name (the config's `stage:`), the kind of converted dataset it trains on, and five
methods the trainer calls in order: `build_model` once, `transform` for the loader (and, with `train=False`, for
validation), `inputs` per micro-batch (the model's keyword arguments; the model returns `loss` and the stage's
`quality` figure), `evaluate` at validation, and optionally `log_images`. Adding a stage is one new module that
calls `register_stage` plus its config; the trainer names none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from core.registry import Registry
from core.manifest import Manifest
from pretrain.gradcache import contrastive_step
from pretrain.models.precision import fp32_batchnorm
from pretrain.transforms import SampleTransform


class Stage:
    name: str = ""
    dataset: str = "ukb"  # the converted dataset kind it trains on ("ukb" | "kspace")
    quality: str = "acc"  # the per-step figure logged next to the loss (the model's output of that name)
    # a contrastive loss (each sample's negatives are the rest of the batch): under gradient accumulation its step
    # runs through `pretrain.gradcache`, so the loss sees the whole global batch, not one micro-batch
    contrastive: bool = False

    def build_model(self, cfg, manifest: Manifest, run_dir: Optional[Path] = None, rank: int = 0) -> nn.Module:
        """The stage's model with fresh weights (the trainer seeds torch first). `run_dir` / `rank`: where a stage
        keeps what must survive a resume (rank 0 writes it); None outside a run (benchmarks, tests)."""
        raise NotImplementedError

    def transform(self, cfg, manifest: Manifest, train: bool) -> Any:
        """The loader's per-sample transform; None: the default UK Biobank `SampleTransform` (training only)."""
        return None

    def inputs(self, cfg, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """A loader batch -> the model's keyword arguments."""
        raise NotImplementedError

    def train_step(self, engine, micro_inputs: list[dict], generators: list[Callable[[], torch.Generator]],
                   world_size: int, device: torch.device) -> list[dict]:
        """One optimizer step over this rank's micro-batches (`generators`: a fresh generator per micro-step);
        returns the model's outputs (at least "loss" and `quality`). A sample-wise loss accumulates micro-batch by
        micro-batch; a contrastive one with several micro-steps caches its embeddings first (GradCache)."""
        if self.contrastive and len(micro_inputs) > 1:
            return [contrastive_step(engine, engine.module, micro_inputs, generators, world_size, device)]
        outs = []
        for inputs, gen in zip(micro_inputs, generators):
            out = engine(**inputs, generator=gen())
            engine.backward(out["loss"])
            engine.step()
            outs.append(out)
        return outs

    def flops(self, cfg, model: nn.Module) -> Optional[float]:
        """Model FLOPs per training sample, for MFU (None: not counted)."""
        return None

    def evaluate(self, cfg, model: nn.Module, manifest: Manifest, shards: list, transform: Any, limit: int,
                 device: torch.device, dtype: torch.dtype, cache: dict) -> dict:
        """Collective: validation figures over `shards` (at most `limit` samples per rank); {} when none."""
        return {}

    def log_images(self, writer, step: int, model: nn.Module, inputs: dict, out: dict) -> None:
        """Rank 0, every `train.image_every` steps: pictures for TensorBoard (default: none)."""

    def encoder_architecture(self, cfg) -> str:
        """What the model's `encoder` is, as exports record it (`pretrain.models.metaclip.build_image_encoder`)."""
        return "vit"


STAGES: Registry[Stage] = Registry("stage", "stage")


def register_stage(stage: Stage) -> Stage:
    """Make `stage` available as `stage: <name>` in pretraining configs."""
    return STAGES.register(stage)


def get_stage(name: str) -> Stage:
    return STAGES.lookup(name)


def init_encoder(cfg, model: nn.Module) -> nn.Module:
    """A contrastive stage's image encoder from an earlier export (`checkpoint.init_from`), and its BatchNorms
    kept in fp32 under the bf16 engine (`fp32_batchnorm`)."""
    if cfg.checkpoint.init_from is not None:
        model.load_encoder(cfg.checkpoint.init_from)
    return fp32_batchnorm(model)


def ukb_eval_transform(cfg, manifest: Manifest):
    """Validation samples of a UK Biobank stage: the training transform without augmentation, random temporal
    offset or segmentations (deterministic)."""
    from dataclasses import replace

    plain = replace(cfg.data, rotation_deg=0.0, flip=False, contrast=0.0, temporal_offset=False, seg=False,
                    augment_on="loader")
    return SampleTransform(plain, cfg.train.seed, manifest.tabular_stats(), frames=cfg.model.frames)
