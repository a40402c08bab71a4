"""Export the trained encoder: one `encoder.safetensors` consolidated from the ZeRO shards + its model config.

    python -m pretrain export --run runs/vita_stage1 [--out DIR]

This is what finetune loads and what a user shares; it needs neither DeepSpeed nor the optimizer state. The folder
(`encoder.safetensors`, `encoder_config.yaml`, and a generated model card `README.md`: stages, data, architecture,
each stage's last validation figures) is laid out as a HuggingFace model repository: `huggingface-cli upload
ORG/NAME DIR` shares it, and `finetune.Encoder.from_pretrained` loads a downloaded copy
(`huggingface_hub.snapshot_download`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from core.config import config_to_dict, load_config
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import read_training_data
from pretrain import checkpoint
from pretrain.config import PretrainConfig, ViTConfig
from pretrain.models.clip import encoder_weights_path
from pretrain.models.metaclip import build_image_encoder
from pretrain.stages import get_stage


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a (sharded) DeepSpeed checkpoint, on CPU."""
    tag_dir = Path(ckpt_dir) / tag
    if list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: partitions to merge
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # ZeRO stage 0: the full module is in the model-states file
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_encoder(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out or run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to export")
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    state = consolidated_state_dict(ckpt_dir, tag)
    encoder = {k.removeprefix("encoder."): v.contiguous() for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"{ckpt_dir / tag}: no encoder.* weights in the checkpoint")
    arch = get_stage(cfg.stage).encoder_architecture(cfg)
    meta = {"format": "cmrfm-encoder-v1", "stage": cfg.stage, "architecture": arch, "checkpoint": tag,
            "run": str(run_dir.resolve())}
    return write_export(out, encoder, {"model": config_to_dict(cfg.model), **meta,
                                       "provenance": provenance(cfg, meta), "data": read_training_data(cfg.data.dataset)})


def write_export(out: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """The export folder: weights (with the identity fields as safetensors metadata), `encoder_config.yaml` and
    the model card, each written atomically. Returns the weights' path."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = {k: str(config[k]) for k in ("format", "stage", "architecture", "checkpoint", "run") if k in config}
    with atomic_path(out / "encoder.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=ident)
    atomic_write_text(out / "encoder_config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out / "README.md", model_card(config))
    return out / "encoder.safetensors"


STAGE_TITLES = {"mae": "Stage I: multi-view 3D+T masked autoencoder (ViTa)",
                "tabular_clip": "Stage II: image-tabular CLIP (ViTa)",
                "metaclip": "MetaCLIP-CMR: image-metadata-text CLIP"}


def last_validation(run: str | Path) -> dict | None:
    """The last validation row a pretraining run logged (its metrics.jsonl), or None when it is not readable."""
    try:
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    val = [r for r in rows if r.get("split") == "val"]
    return val[-1] if val else None


def model_card(config: dict) -> str:
    """A HuggingFace-style model card for an export: what it is, what it was trained on, how to load it, and each
    stage's last validation figures (from its run's metrics.jsonl, when the run is still there)."""
    model = config.get("model", {})
    data = config.get("data") or {}
    front = {"library_name": "cmrfm", "license": "apache-2.0",
             "tags": ["cardiac-mri", "medical-imaging", "foundation-model", config.get("stage", "encoder")]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# cmrfm encoder ({config.get('architecture', 'vit')}, {config.get('stage', '?')})", "",
             "A cardiac-MRI image encoder pretrained with cmrfm. Load it (`pip install cmrfm`, or from a checkout) with",
             "", "```python", "from finetune import Encoder", "enc = Encoder.from_pretrained(\"PATH/TO/THIS/FOLDER\")",
             "z = enc.embed(enc.preprocess(SUBJECT))  # a ukbb_cardiac NIfTI folder, DICOM zips, or a k-space .mat",
             "```", "", "## Training stages (newest first)", ""]
    for p in config.get("provenance", []):
        lines.append(f"- **{STAGE_TITLES.get(p.get('stage'), p.get('stage'))}** — run `{p.get('run')}`, "
                     f"checkpoint `{p.get('checkpoint', '?')}`")
    lines += ["", "## Data", "", f"- dataset kind: `{data.get('dataset', 'unknown')}`"]
    for k, v in (data.get("preprocess") or {}).items():
        lines.append(f"- `{k}`: `{json.dumps(v)}`")
    lines += ["", "## Architecture", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in model.items()]
    lines += ["", "## Validation at the end of each stage", ""]
    for p in config.get("provenance", []):
        val = last_validation(p.get("run", ""))
        if val is None:
            lines.append(f"- {p.get('stage')}: no validation figures (its run's metrics.jsonl has none or is not here)")
            continue
        figures = ", ".join(f"{k} {v:.4g}" for k, v in val.items()
                            if k not in ("step", "samples", "split", "n") and isinstance(v, (int, float)))
        lines.append(f"- {p.get('stage')} (step {val.get('step')}, {val.get('n', '?')} validation samples): {figures}")
    lines += ["", "## Intended use", "",
              "Research on cardiac MRI representations. Not a medical device; not validated for clinical decisions.",
              ""]
    return "\n".join(lines)


def provenance(cfg: PretrainConfig, meta: dict) -> list[dict]:
    """The chain of runs behind an export, newest first: this run, then (through `checkpoint.init_from`) the run
    whose export it started from, and so on back to a run that started from scratch."""
    chain = [{"stage": meta["stage"], "run": meta["run"], "checkpoint": meta["checkpoint"]}]
    parent = cfg.checkpoint.init_from
    if parent is not None:
        parent = Path(parent)
        parent_cfg = (parent if parent.is_dir() else parent.parent) / "encoder_config.yaml"
        chain += yaml.safe_load(parent_cfg.read_text()).get("provenance", []) if parent_cfg.is_file() else [
            {"stage": "unknown", "run": str(parent.resolve())}]
    return chain


def load_encoder(path: str | Path):
    """An encoder -> (encoder in eval mode, its ViTConfig, metadata incl. stage, architecture and provenance).

    `path`: an export (`encoder.safetensors` or the directory holding it with `encoder_config.yaml`), or a
    pretraining run directory without an export, whose latest complete DeepSpeed checkpoint is consolidated in
    memory (the same weights `export_encoder` would write). The ViT is a `ViTEncoder`; a MetaCLIP-CMR ResNet-50
    gives MONAI's 2D ResNet-50 (pooled features, no classifier)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and not (path / "encoder.safetensors").is_file() and (path / "checkpoints").is_dir():
        tag = checkpoint.latest_tag(path / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{path / 'checkpoints'}: no complete checkpoint to load an encoder from")
        cfg = load_config(PretrainConfig, path / "config.yaml")
        state = {k.removeprefix("encoder."): v for k, v in consolidated_state_dict(path / "checkpoints", tag).items()
                 if k.startswith("encoder.")}
        arch = get_stage(cfg.stage).encoder_architecture(cfg)
        meta = {"stage": cfg.stage, "architecture": arch, "checkpoint": tag, "run": str(path.resolve()),
                "provenance": provenance(cfg, {"stage": cfg.stage, "run": str(path.resolve()), "checkpoint": tag}),
                "data": read_training_data(cfg.data.dataset)}
        vit = cfg.model
    else:
        path = encoder_weights_path(path)
        meta = yaml.safe_load((path.parent / "encoder_config.yaml").read_text())
        vit = load_config(ViTConfig, None, [f"{k}={json.dumps(v)}" for k, v in meta["model"].items()])
        state = load_file(str(path))
    enc, _ = build_image_encoder(meta.get("architecture", "vit"), vit)
    enc.load_state_dict(state)
    return enc.eval(), vit, meta
