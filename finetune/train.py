"""One fine-tuning run on one device (GPU with bf16 autocast, or CPU), one file that reads top to bottom.

    python -m finetune train --config configs/finetune/vita_phenotypes.yaml encoder=runs/vita_stage2

Data: the converted dataset's train / val / test splits (`finetune/data.py`). Model: the encoder (export, run
directory, fresh ViT or ResNet-50 baseline) + the task's decoder. What differs between tasks (heads, loss,
scoring, decisions on validation, CSV columns, report) is the task object's (`finetune/tasks/`); this loop names
none of them. Protocols: linear probe
(encoder frozen, linear head), full fine-tuning, Probe+FT (frozen for `probe_epochs`, then everything with the
encoder at `encoder_lr_scale` x lr), optional layer-wise lr decay. Every epoch is scored on the validation split;
the best epoch's weights are kept (`best.safetensors`) and training stops after `patience` epochs without
improvement. The best model is then scored on the test split: `metrics.json`, `report.md`, `figures/*.png`,
TensorBoard curves and `metrics.jsonl` in `out`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.cli import eta
from core.config import flat_config, save_resolved_config
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import read_training_data
from finetune import figures, report
from finetune.config import FinetuneConfig
from finetune.data import SubjectDataset, loader
from finetune.models import FinetuneModel, ResNetEncoder, load_imagenet_resnet50, param_groups, precise_batchnorm
from finetune.tasks import get_task
from pretrain.config import KSpaceSampling
from pretrain.export import load_encoder
from pretrain.models.metaclip import build_image_encoder
from pretrain.models.vit import ViTEncoder
from pretrain.schedule import warmup_cosine


# --- building blocks ----------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, n_out: int) -> tuple[FinetuneModel, dict]:
    """The encoder the config asks for + the task's decoder; returns (model, the encoder's metadata)."""
    hidden = 0 if cfg.protocol.kind == "linear_probe" else cfg.task.head_hidden
    meta: dict = {"encoder": "scratch"}
    two_d = get_task(cfg.task.name).dataset == "sax"  # 2D slices: MetaCLIP-CMR's ResNet-50, one image a slice
    if cfg.baseline == "resnet50" or (two_d and cfg.encoder is None and cfg.baseline != "vit_scratch"):
        vit = cfg.model
        encoder = build_image_encoder("resnet50", vit)[0] if two_d else ResNetEncoder(cfg.model)
        meta = {"encoder": "resnet50"}
        if cfg.imagenet_weights is not None:
            if not two_d:
                raise ValueError("imagenet_weights: only for the 2D ResNet-50 of sax_segmentation (ViTa's ResNet "
                                 "baseline takes planes x frames as its input channels, not an image)")
            meta.update(load_imagenet_resnet50(encoder, cfg.imagenet_weights))
    elif cfg.imagenet_weights is not None:
        raise ValueError("imagenet_weights initialises the ResNet-50 of sax_segmentation (no `encoder`, or "
                         "baseline: resnet50); it cannot go with another encoder")
    elif cfg.baseline == "vit_scratch" or cfg.encoder is None:
        vit, encoder = cfg.model, ViTEncoder(cfg.model)
    else:
        encoder, vit, meta = load_encoder(cfg.encoder)
        meta = {"encoder": str(cfg.encoder), **meta}
    model = FinetuneModel(cfg.task.name, encoder, vit, n_out=n_out, hidden=hidden, seg_width=cfg.task.seg_decoder_dim,
                          feature_norm=cfg.task.feature_norm)
    return model, meta


def datasets(cfg: FinetuneConfig, vit) -> dict[str, SubjectDataset]:
    t = cfg.task
    kspace = KSpaceSampling(slices=t.slices, max_frames=t.max_frames, image_size=t.image_size)
    targets = get_task(t.name).targets(cfg)
    return {split: SubjectDataset(cfg.data.dataset, split, t.name, vit, train=split == "train", seed=cfg.seed,
                                  targets=targets, diseases=t.diseases, kspace=kspace, cache=cfg.data.cache,
                                  fraction=cfg.data.train_fraction if split == "train" else 1.0)
            for split in ("train", "val", "test")}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(cfg: FinetuneConfig, model: FinetuneModel, ds: SubjectDataset, stats: dict, device, autocast,
            seg_dir: Optional[Path] = None, all_frames: bool = False, progress: bool = False) -> dict:
    """Run the model over a split: the task's predictions and truth as arrays (original units), and the features.
    With `all_frames` a dense task predicts every stored frame (in T / frames passes of shifted frames)."""
    from tqdm import tqdm

    model.eval()
    task, acc = model.task, {"key": [], "features": []}
    offsets = task.passes(ds, model, all_frames)
    bar = tqdm(total=len(offsets) * len(ds), desc=f"predict {ds.split}", unit="subject", disable=not progress)
    for offset in offsets:
        ds.frame_offset = offset
        for batch in loader(ds, cfg.data.batch_size, cfg.data.workers, shuffle=False, seed=cfg.seed):
            bar.update(len(batch["key"]))
            batch = to_device(batch, device)
            with autocast():
                res = model(batch)
            if offset == 0:
                acc["key"] += batch["key"]
            task.collect(acc, res, batch, offset, stats)
    bar.close()
    ds.frame_offset = 0
    model.train()
    return task.finish(acc, ds, seg_dir)


# --- the run ------------------------------------------------------------------------------------------------------
def bf16_autocast(cfg: FinetuneConfig, device: torch.device) -> bool:
    """bf16 autocast on GPUs (`precision: bf16`); CPUs stay fp32 (bf16 is slow there without AMX)."""
    return cfg.precision == "bf16" and device.type == "cuda"


def fit(cfg: FinetuneConfig, progress: bool = True) -> dict:
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir, "config.yaml")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = bf16_autocast(cfg, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    data = datasets(cfg, cfg.model)
    empty = [split for split, ds in data.items() if len(ds) == 0]
    if empty:
        raise ValueError(f"{cfg.data.dataset}: no subjects in the {empty} split(s); fine-tuning needs train, val and "
                         f"test (convert with job.val_fraction and job.test_fraction > 0)")
    task = get_task(cfg.task.name)
    if cfg.baseline == "mean_guess":
        guess = task.mean_guess(cfg, data)
        if guess is None:
            raise ValueError(f"baseline mean_guess has no meaning for task {task.name!r}")
        result = {"task": task.name, "method": "mean_guess", "test": guess}
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1, default=float))
        return result
    model, enc_meta = build_model(cfg, task.n_outputs(cfg))
    for ds in data.values():  # samples at the loaded encoder's frames (the label tables are read once)
        ds.vit = model.vit
    model.to(device)
    stats = task.train_stats(cfg, data["train"], device)

    p = cfg.protocol
    phases = {"linear_probe": [(cfg.optim.epochs, False, 0.0)], "full_finetune": [(cfg.optim.epochs, True, 1.0)],
              "probe_finetune": [(p.probe_epochs, False, 0.0),
                                 (max(1, cfg.optim.epochs - p.probe_epochs), True, p.encoder_lr_scale)]}[p.kind]
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"))
    log = open(out_dir / "metrics.jsonl", "w")
    best, best_epoch, epoch, step, since_best = -math.inf, -1, 0, 0, 0
    steps_per_epoch = max(1, len(loader(data["train"], cfg.data.batch_size, 0, True, cfg.seed)))
    t0 = time.perf_counter()
    epochs_total = sum(e for e, _, _ in phases)  # at most: early stopping may end sooner
    for phase, (epochs, encoder_trainable, enc_scale) in enumerate(phases):
        for prm in model.encoder.parameters():
            prm.requires_grad_(encoder_trainable)
        opt = torch.optim.AdamW(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, enc_scale,
                                             p.layer_decay), lr=cfg.optim.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim.warmup_epochs * steps_per_epoch,
                                                                     epochs * steps_per_epoch))
        for _ in range(epochs):
            model.train()
            if not encoder_trainable:
                model.encoder.eval()  # frozen: no dropout / BatchNorm updates in the encoder
            losses = []
            for batch in loader(data["train"], cfg.data.batch_size, cfg.data.workers, True, cfg.seed, epoch):
                batch = to_device(batch, device)
                with autocast():
                    out = model(batch)
                loss = task.loss(cfg, out, batch, stats)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
            if task.precise_bn if cfg.task.precise_bn is None else cfg.task.precise_bn:
                # a pooled head's BatchNorm sees one row per subject: a last batch of one subject has no variance
                with autocast():
                    precise_batchnorm(model, (to_device(b, device) for b in loader(
                        data["train"], cfg.data.batch_size, cfg.data.workers, False, cfg.seed, epoch)
                        if task.dense or len(b["image"]) > 1))
            val = task.score(cfg, predict(cfg, model, data["val"], stats, device, autocast), stats=stats)
            row = {"epoch": epoch, "step": step, "phase": phase, "train_loss": float(np.mean(losses)),
                   "val_primary": val["primary"], "seconds": time.perf_counter() - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            name, sign = task.primary
            writer.add_scalar("train/loss", row["train_loss"], epoch)
            writer.add_scalar("train/lr", sched.get_last_lr()[-1], epoch)
            writer.add_scalar(f"val/{name}", sign * val["primary"], epoch)
            for tag, value in task.val_scalars(val).items():
                writer.add_scalar(f"val/{tag}", value, epoch)
            improved = not math.isnan(val["primary"]) and val["primary"] > best
            if improved or best_epoch < 0:
                best, best_epoch, since_best = (val["primary"] if improved else best), epoch, 0
                from safetensors.torch import save_file

                with atomic_path(out_dir / "best.safetensors") as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
            else:
                since_best += 1
            if progress:
                print(f"[finetune] {task.name} epoch {epoch + 1}/{epochs_total} (phase {phase}) loss "
                      f"{row['train_loss']:.4f} val {name} {sign * val['primary']:.4f}"
                      + (" (best)" if best_epoch == epoch else "")
                      + f" {eta(row['seconds'], epoch + 1, epochs_total)}".rstrip(), flush=True)
            epoch += 1
            if since_best >= cfg.optim.patience:
                break
        else:
            continue
        break  # early stopped
    writer.add_hparams(flat_config(cfg), {"hparam/val_best": best if math.isfinite(best) else float("nan"),
                                          "hparam/best_epoch": best_epoch}, run_name="hparams")
    writer.close()
    log.close()

    # --- test with the best weights ---
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(out_dir / "best.safetensors")))
    thresholds = task.decide(cfg, predict(cfg, model, data["val"], stats, device, autocast))
    test_pred = predict(cfg, model, data["test"], stats, device, autocast, seg_dir=out_dir / "predictions",
                        all_frames=cfg.data.eval_all_frames)
    test = task.score(cfg, test_pred, thresholds, task.test_spacing(data["test"], test_pred["key"]), stats=stats)
    result = {"task": task.name, "method": cfg.baseline if cfg.baseline != "none" else "encoder",
              "protocol": p.kind, "encoder": enc_meta, "best_epoch": best_epoch, "epochs_run": epoch,
              "val_primary": best, "test": test, "thresholds": thresholds, "n": {k: len(v) for k, v in data.items()},
              "seconds": time.perf_counter() - t0, **task.record(cfg, data, stats)}
    result["data"] = read_training_data(cfg.data.dataset)  # conversion settings: predict preprocesses raw input alike
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1, default=float))
    write_predictions(cfg, out_dir, data["test"], test_pred, thresholds)
    write_outputs(cfg, out_dir, result, test_pred)
    return result


def write_predictions(cfg: FinetuneConfig, out_dir: Path, ds: SubjectDataset, pred: dict,
                      thresholds: Optional[dict], extra: Optional[dict[str, list]] = None) -> Path:
    """Per-subject test predictions a user can open: `predictions.csv` (the key — the eid for UK Biobank — and
    per phenotype the prediction and truth in original units; per disease the probability, the validation-chosen
    threshold, the decision and the label; per k-space sequence modality and view), and for segmentation one
    NIfTI per subject and plane under `predictions/` (H, W, 1, T, labels of `core.vocab.LABELS`) with the stored
    plane's geometry."""
    import csv
    import io

    task, rows = get_task(cfg.task.name), []
    for i, key in enumerate(pred["key"]):
        row = {"key": key, **task.csv_row(cfg, out_dir, ds, pred, i, thresholds)}
        rows.append(row | {k: v[i] for k, v in (extra or {}).items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["key"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
    return out_dir / "predictions.csv"


def write_outputs(cfg: FinetuneConfig, out_dir: Path, result: dict, pred: dict) -> None:
    """Figures and the Markdown report of a run."""
    fig_dir, task = out_dir / "figures", get_task(cfg.task.name)
    sections, figs = task.report(cfg, result, pred, fig_dir)
    colour = task.tsne(cfg, pred)
    if colour is not None and len(pred["features"]) >= 5:
        figs.append(figures.tsne_embedding(pred["features"], colour[0], colour[1], fig_dir / "tsne.png", seed=cfg.seed))
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    if rows:
        figs.append(figures.training_curves(rows, ["train_loss", "val_primary"], fig_dir / "curves.png"))
    sections.insert(0, ("Run", report.markdown_table([{
        "task": task.name, "method": result["method"], "protocol": result.get("protocol"),
        "encoder": result["encoder"].get("encoder"), "stage": result["encoder"].get("stage", ""),
        "best epoch": result.get("best_epoch"), "train/val/test": "/".join(str(result["n"][s])
                                                                           for s in ("train", "val", "test"))}],
        ["task", "method", "protocol", "encoder", "stage", "best epoch", "train/val/test"])))
    report.write_report(out_dir / "report.md", f"Fine-tuning: {task.name}", sections, figs)
