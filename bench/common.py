"""Shared by the benchmark scripts (run as `python bench/<name>.py`, so this directory is on sys.path)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pretrain.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def update_benchmarks(text: str, header: str) -> None:
    """Replace the section starting with `header` (up to the next '## ') or append it at the end."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    m = re.search(rf"^{re.escape(header)}.*?(?=^## |\Z)", doc, flags=re.S | re.M)
    if m:
        doc = doc[:m.start()] + text + ("\n" if m.end() < len(doc) else "") + doc[m.end():]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)
    print(f"updated {path} ({header})")


# metadata sentences of the shape MetaCLIP-CMR's text encoder sees (benchmarks without a k-space dataset)
SENTENCES = [f"{m} cardiac MR, {v} view, {vendor} {t} T {model} scanner, centre {c}"
             for m in ("cine", "LGE", "T1 map", "T2 map") for v in ("short-axis", "4-chamber", "2-chamber")
             for vendor, t, model in (("Siemens", "3.0", "Vida"), ("Philips", "1.5", "Ingenia"), ("GE", "3.0", "MR750"))
             for c in ("001", "002")]


def stage_model(cfg: PretrainConfig, dataset: Path | None = None) -> torch.nn.Module:
    """The stage's model through the stage's own builder (`pretrain.stages`), with random weights
    (`checkpoint.init_from` is ignored: speed and memory do not depend on the values). Stage II needs the dataset's
    tabular schema: from `dataset` when given, else the one the UK Biobank conversion writes
    (configs/data_prep/ukb_features.yaml, 117 features); the builder reads only the schema. No dataset is needed
    otherwise."""
    import dataclasses

    from core.manifest import Manifest
    from pretrain.stages import get_stage

    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None))
    stage = get_stage(cfg.stage)
    if dataset is not None:
        return stage.build_model(cfg, Manifest.load(dataset))
    if cfg.stage == "metaclip":  # the text vocabulary comes from the dataset's sentences: stand-ins will do
        from pretrain.models.metaclip import MetaCLIP

        return MetaCLIP(cfg.model, cfg.metaclip, SENTENCES, seed=cfg.train.seed)
    if cfg.stage != "tabular_clip":  # Stage I reads nothing of the dataset: a manifest of no data will do
        return stage.build_model(cfg, Manifest.from_dict(ROOT, {"dataset": "ukb"}))
    from data_prep.ukb.feature_spec import load_feature_spec
    from data_prep.ukb.features import feature_schema

    schema = feature_schema(load_feature_spec(ROOT / "configs/data_prep/ukb_features.yaml"))
    return stage.build_model(cfg, Manifest.from_dict(ROOT, {"dataset": "ukb",
                                                            "tabular": {"features": schema, "stats": {}}}))


def stage_engine(cfg: PretrainConfig, world: int, dataset: Path | None = None):
    """(model, DeepSpeed engine) as the trainer builds them: `stage_model`, its activation checkpointing and
    `train.compile`, then `pretrain.train.build_engine` (AdamW over `param_groups`, `optim.fused`, the schedule,
    `deepspeed_config`)."""
    from pretrain.models.vit import compile_blocks
    from pretrain.train import build_engine

    model = stage_model(cfg, dataset)
    model.set_grad_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model)
    return model, build_engine(cfg, model, world, 1000)


def stage_inputs(cfg: PretrainConfig, model: torch.nn.Module, batch: int, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """An in-memory batch as the stage's loader yields it (images in [0, 1]; Stage II: normalised tabular values,
    valid category indices, 20 % missing; MetaCLIP-CMR: slices x frames z-scored images per sequence and its
    sentence), through the stage's `inputs`."""
    import torch

    from pretrain.stages import get_stage

    m = cfg.model
    out = {"image": torch.rand(batch, m.sa_planes + m.la_planes, m.frames, m.img_size, m.img_size)}
    if cfg.stage == "tabular_clip":
        from pretrain.models.tabular import random_table

        values, missing = random_table(model.tabular.schema, batch)
        out.update(tabular_values=values, tabular_missing=missing)
    elif cfg.stage == "metaclip":  # KSpaceTransform's output: slices x frames single images per sequence
        mc = cfg.metaclip
        n = mc.slices * mc.max_frames
        g = torch.Generator().manual_seed(0)
        out = {"image": torch.randn(batch, n, mc.image_size, mc.image_size, generator=g),
               "valid": torch.ones(batch, n, dtype=torch.bool),
               "text": [SENTENCES[i % len(SENTENCES)] for i in range(batch)],
               "modality": torch.randint(0, 4, (batch,), generator=g),
               "view": torch.randint(0, 3, (batch,), generator=g), "view_valid": torch.ones(batch, dtype=torch.bool)}
    elif cfg.stage != "mae":
        raise ValueError(f"stage {cfg.stage!r}: no in-memory batches")
    return get_stage(cfg.stage).inputs(cfg, out, device, dtype)
