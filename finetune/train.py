"""One fine-tuning run on one device (GPU with bf16 autocast, or CPU), one file that reads top to bottom.

    python -m finetune train --config configs/finetune/vita_phenotypes.yaml encoder=runs/vita_stage2

Data: the converted dataset's train / val / test splits (`finetune/data.py`). Model: the encoder (export, run
directory, fresh ViT or ResNet-50 baseline) + the task's decoder (`finetune/models.py`). Protocols: linear probe
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
import torch.nn.functional as F

from core.cli import eta
from core.config import flat_config, save_resolved_config
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import read_training_data
from core.vocab import LA_VIEWS, LABELS, MODALITIES, PHENOTYPES, SOURCE_LABEL_MAPS, VIEWS
from finetune import figures, metrics, report
from finetune.config import FinetuneConfig
from finetune.data import SubjectDataset, loader
from finetune.models import FinetuneModel, ResNetEncoder, param_groups
from pretrain.config import MetaCLIPConfig
from pretrain.models.vit import ViTEncoder
from pretrain.schedule import warmup_cosine

STRUCTURES = {i: name for i, name in enumerate(LABELS) if i > 0}


# --- building blocks ----------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, n_out: int) -> tuple[FinetuneModel, dict]:
    """The encoder the config asks for + the task's decoder; returns (model, the encoder's metadata)."""
    hidden = 0 if cfg.protocol.kind == "linear_probe" else cfg.task.head_hidden
    meta: dict = {"encoder": "scratch"}
    if cfg.baseline == "resnet50":
        vit, encoder = cfg.model, ResNetEncoder(cfg.model)
        meta = {"encoder": "resnet50"}
    elif cfg.baseline == "vit_scratch" or cfg.encoder is None:
        vit, encoder = cfg.model, ViTEncoder(cfg.model)
    else:
        from pretrain.export import load_encoder

        encoder, vit, meta = load_encoder(cfg.encoder)
        meta = {"encoder": str(cfg.encoder), **meta}
    model = FinetuneModel(cfg.task.name, encoder, vit, n_out=n_out, hidden=hidden, seg_width=cfg.task.seg_decoder_dim,
                          feature_norm=cfg.task.feature_norm)
    return model, meta


def datasets(cfg: FinetuneConfig, vit) -> dict[str, SubjectDataset]:
    t = cfg.task
    kspace = MetaCLIPConfig(slices=t.slices, max_frames=t.max_frames, image_size=t.image_size)
    targets = t.targets if t.name == "phenotypes" else []
    return {split: SubjectDataset(cfg.data.dataset, split, t.name, vit, train=split == "train", seed=cfg.seed,
                                  targets=targets, diseases=t.diseases, kspace=kspace, cache=cfg.data.cache,
                                  fraction=cfg.data.train_fraction if split == "train" else 1.0)
            for split in ("train", "val", "test")}


def target_stats(ds: SubjectDataset) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the regression targets over the training split (NaN-aware): z-scoring and mean-guess."""
    values = ds.targets_table().astype(np.float64)
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return mean, np.where(std > 0, std, 1.0)


def seg_class_weights(ds: SubjectDataset, max_subjects: int = 200) -> np.ndarray:
    """Per class sqrt(median frequency / frequency) over the labelled planes of up to `max_subjects` training
    subjects (every 5th stored frame): the weights of `task.seg_class_weighting` (the square root: the full ratio
    over-grew the atria and the myocardium on the demo); a class never seen gets the largest."""
    counts = np.zeros(len(LABELS))
    for i, key in enumerate(ds.keys[:max_subjects]):
        planes = np.flatnonzero(ds.seg_valid_table()[i])
        if len(planes):
            seg = np.asarray(ds.reader.group["seg"].get_orthogonal_selection((ds.reader.rows[key], planes.tolist(),
                                                                               slice(None, None, 5))))
            counts += np.bincount(seg.ravel(), minlength=len(LABELS))[:len(LABELS)]
    freq = counts / max(counts.sum(), 1)
    seen = freq > 0
    w = np.where(seen, np.median(freq[seen]) / np.where(seen, freq, 1), 0.0) if seen.any() else np.ones(len(LABELS))
    return np.sqrt(np.where(seen, w, w.max() if seen.any() else 1.0))


def disease_counts(ds: SubjectDataset) -> tuple[np.ndarray, np.ndarray]:
    labels = ds.diseases_table()
    return (labels == 1).sum(0), (labels == 0).sum(0)


def loss_fn(cfg: FinetuneConfig, out: dict, batch: dict, stats: dict) -> torch.Tensor:
    task = cfg.task.name
    if task == "phenotypes":
        y = (batch["targets"].double() - stats["mean"]) / stats["std"]
        ok = torch.isfinite(y)
        return F.mse_loss(out["targets"].float()[ok], y.float()[ok]) if ok.any() else out["targets"].sum() * 0
    if task == "diseases":
        y, ok = batch["diseases"].float(), batch["diseases"] >= 0
        per = F.binary_cross_entropy_with_logits(out["logits"].float(), y.clamp(min=0), reduction="none",
                                                 pos_weight=stats["pos_weight"])
        return (per * ok).sum() / ok.sum().clamp_min(1)
    if task == "segmentation":
        from monai.losses import DiceCELoss

        logits, seg, valid = out["seg"].float(), batch["seg"], batch["seg_valid"]
        x = logits[valid].flatten(0, 1)  # (items, C, H, W): every frame of every labelled plane
        y = seg[valid].flatten(0, 1)[:, None]
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=stats.get("seg_weight"))(x, y)
    view_ok = batch["view"] >= 0
    loss = F.cross_entropy(out["modality"].float(), batch["modality"])
    if view_ok.any():
        loss = loss + F.cross_entropy(out["view"].float()[view_ok], batch["view"][view_ok])
    return loss


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(cfg: FinetuneConfig, model: FinetuneModel, ds: SubjectDataset, stats: dict, device, autocast,
            seg_dir: Optional[Path] = None, all_frames: bool = False, progress: bool = False) -> dict:
    """Run the model over a split: predictions and truth as arrays (original units), and the features.
    Segmentation with `all_frames`: every stored frame, in T / frames passes of shifted frames."""
    from tqdm import tqdm

    model.eval()
    task, out = cfg.task.name, {"key": [], "features": []}
    offsets = [0]
    if task == "segmentation" and all_frames:
        T = ds.reader.group["image"].shape[2]
        offsets = list(range(max(1, T // model.vit.frames)))
    bar = tqdm(total=len(offsets) * len(ds), desc=f"predict {ds.split}", unit="subject", disable=not progress)
    for offset in offsets:
        ds.frame_offset = offset
        for batch in loader(ds, cfg.data.batch_size, cfg.data.workers, shuffle=False, seed=cfg.seed):
            bar.update(len(batch["key"]))
            batch = to_device(batch, device)
            with autocast():
                res = model(batch)
            if offset == 0:
                out["key"] += batch["key"]
            if task == "phenotypes":
                out.setdefault("pred", []).append(res["targets"].double().cpu().numpy() * stats["std"] + stats["mean"])
                out.setdefault("true", []).append(batch["targets"].cpu().numpy())
            elif task == "diseases":
                out.setdefault("score", []).append(torch.sigmoid(res["logits"].float()).cpu().numpy())
                out.setdefault("label", []).append(batch["diseases"].cpu().numpy())
            elif task == "segmentation":
                out.setdefault("seg", []).append((offset, batch["frames"].cpu().numpy(), res["seg"].argmax(3).byte()
                                                  .cpu().numpy(), batch["seg"].byte().cpu().numpy(),
                                                  batch["seg_valid"].cpu().numpy(), batch["image"].cpu().numpy()))
            else:
                out.setdefault("modality_pred", []).append(res["modality"].argmax(1).cpu().numpy())
                out.setdefault("view_pred", []).append(res["view"].argmax(1).cpu().numpy())
                out.setdefault("modality", []).append(batch["modality"].cpu().numpy())
                out.setdefault("view", []).append(batch["view"].cpu().numpy())
            if task != "segmentation":
                out["features"].append(res["features"].float().cpu().numpy())
    bar.close()
    ds.frame_offset = 0
    model.train()
    if task == "segmentation":
        return _assemble_segmentation(out, ds, seg_dir)
    return {k: (np.concatenate(v) if k != "key" else v) for k, v in out.items() if v != [] or k == "key"}


def _assemble_segmentation(out: dict, ds: SubjectDataset, seg_dir: Optional[Path]) -> dict:
    """Put every pass's frames in place: pred / true (N, P, T, H, W) uint8 (memory-mapped under `seg_dir` when
    given, so a large test split does not have to fit in memory), valid (N, P), the first pass's images."""
    N = len(out["key"])
    P, T, H, W = ds.reader.group["image"].shape[1:]
    if seg_dir is not None:
        seg_dir.mkdir(parents=True, exist_ok=True)
        pred = np.lib.format.open_memmap(seg_dir / "pred.npy", mode="w+", dtype=np.uint8, shape=(N, P, T, H, W))
        true = np.lib.format.open_memmap(seg_dir / "true.npy", mode="w+", dtype=np.uint8, shape=(N, P, T, H, W))
    else:
        pred, true = np.zeros((N, P, T, H, W), np.uint8), np.zeros((N, P, T, H, W), np.uint8)
    valid = np.zeros((N, P), bool)
    images, done = [], np.zeros((N, T), bool)
    counters: dict[int, int] = {}
    for offset, frames, p, t, v, img in out["seg"]:
        start = counters.get(offset, 0)
        rows = slice(start, start + len(frames))
        counters[offset] = start + len(frames)
        for i, fr in zip(range(rows.start, rows.stop), frames):
            pred[i][:, fr], true[i][:, fr] = p[i - rows.start], t[i - rows.start]
            done[i, fr] = True
        valid[rows] = v
        if offset == 0:
            images.append(img)
    frames_scored = done.all(axis=0)  # frames every subject has (all T, or the 5 of one pass)
    return {"key": out["key"], "pred": pred[:, :, frames_scored], "true": true[:, :, frames_scored], "valid": valid,
            "images": np.concatenate(images), "frames_scored": int(frames_scored.sum()), "frames_stored": T}


# the validation metric that picks the best epoch, by name (console, TensorBoard `val/<name>`): `score`'s
# "primary" times the sign (phenotypes: primary is minus the mean over targets of MAE / training std)
PRIMARY_METRIC = {"phenotypes": ("mae_over_sd_mean", -1.0), "diseases": ("ap_mean", 1.0),
                  "segmentation": ("volume_dice_mean", 1.0), "modality_view": ("accuracy_mean", 1.0)}


def val_scalars(task: str, val: dict) -> dict[str, float]:
    """Per structure / disease / target validation figures for TensorBoard (`val/dice_LV`, `val/auroc_cad`,
    `val/auroc_mean`, `val/mae_LVEDV`, ...), finite ones only."""
    out: dict[str, float] = {}
    if task == "segmentation":
        out = {f"dice_{k}": v["dice"] for k, v in val["volume_dice"].items()}
    elif task == "diseases":
        out = {f"auroc_{k}": v["auroc"] for k, v in val["per_disease"].items()}
        finite = [v for v in out.values() if math.isfinite(v)]
        out["auroc_mean"] = float(np.mean(finite)) if finite else math.nan
    elif task == "phenotypes":
        out = {f"mae_{k}": v["mae"] for k, v in val["per_target"].items()}
    else:
        out = {k: v for k, v in val.items() if k != "primary"}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def score(cfg: FinetuneConfig, pred: dict, thresholds: Optional[dict] = None, spacing=None,
          std: Optional[np.ndarray] = None) -> dict:
    """Metrics of a prediction (`predict`); the validation metric to maximise is `primary` (phenotypes: minus the
    mean over targets of MAE / training std, so that every target weighs alike)."""
    task = cfg.task.name
    if task == "phenotypes":
        res = metrics.regression_metrics(pred["pred"], pred["true"], cfg.task.targets)
        maes = np.array([res[t]["mae"] for t in cfg.task.targets]) / (np.ones(len(res)) if std is None else std)
        return {"per_target": res, "primary": -float(np.nanmean(maes)) if np.isfinite(maes).any() else float("nan")}
    if task == "diseases":
        per = {}
        for j, d in enumerate(cfg.task.diseases):
            s, y = pred["score"][:, j], pred["label"][:, j]
            thr = thresholds[d] if thresholds else metrics.choose_threshold(s, y)
            per[d] = metrics.classification_metrics(s, y, thr)
        aps = [m["ap"] for m in per.values() if not math.isnan(m["ap"])]
        return {"per_disease": per, "primary": float(np.mean(aps)) if aps else float("nan")}
    if task == "segmentation":
        P = pred["pred"].shape[1]
        labels, groups = plane_label_sets(P), plane_groups(P)
        volume = metrics.volume_dice(pred["pred"], pred["true"], pred["valid"], STRUCTURES, labels, groups)
        res = metrics.segmentation_metrics(pred["pred"], pred["true"], pred["valid"], STRUCTURES, spacing, labels)
        dice = [r["dice"] for r in volume.values() if not math.isnan(r["dice"])]
        return {"volume_dice": volume, "per_structure": res, "frames_scored": pred["frames_scored"],
                "frames_stored": pred["frames_stored"], "primary": float(np.mean(dice)) if dice else float("nan")}
    ok = pred["view"] >= 0
    res = {"modality_accuracy": metrics.accuracy(pred["modality_pred"], pred["modality"]),
           "modality_balanced_accuracy": metrics.balanced_accuracy(pred["modality_pred"], pred["modality"]),
           "view_accuracy": metrics.accuracy(pred["view_pred"][ok], pred["view"][ok]) if ok.any() else float("nan"),
           "view_balanced_accuracy": (metrics.balanced_accuracy(pred["view_pred"][ok], pred["view"][ok])
                                      if ok.any() else float("nan"))}
    return {**res, "primary": float(np.nanmean([res["modality_accuracy"], res["view_accuracy"]]))}


def _plane_views(P: int) -> list[str]:
    return ["sa"] * (P - len(LA_VIEWS)) + list(LA_VIEWS)


def plane_label_sets(P: int) -> list[tuple[int, ...]]:
    """Per plane of the stack, the unified labels its ground truth can hold (`core.vocab.SOURCE_LABEL_MAPS`): LV, MYO,
    RV on the short axis, LA on the 2-chamber view, LA and RA on the 4-chamber view, none on the 3-chamber view."""
    return [tuple(sorted(set(SOURCE_LABEL_MAPS.get(v, {}).values()))) for v in _plane_views(P)]


def plane_groups(P: int) -> list[int]:
    """Volumes for volume Dice: the short-axis stack is one (3D+T), each long-axis view its own (2D+T)."""
    return [0 if v == "sa" else 1 + i for i, v in enumerate(_plane_views(P))]


def plane_spacing(ds: SubjectDataset, keys: list[str]) -> np.ndarray:
    """(N, P, 2) pixel spacing in mm per plane, from the conversion's metadata (HD95 in mm)."""
    P = ds.reader.group["image"].shape[1]
    out = np.ones((len(keys), P, 2))
    for i, k in enumerate(keys):
        px = ds.reader.meta(k).get("pixel_spacing_mm", {})
        out[i] = [[px.get(n, 1.0)] * 2 for n in _plane_views(P)]
    return out


# --- the run ------------------------------------------------------------------------------------------------------
def mean_guess(cfg: FinetuneConfig, data: dict[str, SubjectDataset]) -> dict:
    """The baseline without a model: the training mean (regression) / the training prevalence (diseases)."""
    test = data["test"]
    if cfg.task.name == "phenotypes":
        mean, _ = target_stats(data["train"])
        true = test.targets_table()
        return {"per_target": metrics.regression_metrics(np.broadcast_to(mean, true.shape), true, cfg.task.targets)}
    if cfg.task.name == "diseases":
        pos, neg = disease_counts(data["train"])
        labels = test.diseases_table()
        per = {d: metrics.classification_metrics(np.full(len(labels), pos[j] / max(pos[j] + neg[j], 1)),
                                                 labels[:, j], 0.5) for j, d in enumerate(cfg.task.diseases)}
        return {"per_disease": per}
    raise ValueError(f"mean_guess has no meaning for task {cfg.task.name!r}")


def phenotype_reference(cfg: FinetuneConfig, data: dict[str, SubjectDataset], c: float = 1.0) -> dict:
    """What the cardiac phenotypes alone predict: per disease, an L2 logistic regression (scikit-learn, C = `c`,
    classes balanced as the heads' loss is) on the stored phenotypes of the training split (z-scored, a missing
    value set to the training mean), scored on the test split. Not a model to deploy: the reference that says how
    far a disease is written in the heart's measurable shape at all, beside the image model's AUROC."""
    from sklearn.linear_model import LogisticRegression

    x_fit, x_test = (data[s].phenotypes_table().astype(np.float64) for s in ("train", "test"))
    mu = np.nanmean(x_fit, 0) if len(x_fit) else np.zeros(x_fit.shape[1])
    sd = np.nanstd(x_fit, 0) if len(x_fit) else np.ones(x_fit.shape[1])
    mu, sd = np.nan_to_num(mu), np.where(np.nan_to_num(sd) > 0, np.nan_to_num(sd), 1.0)
    z_fit = np.where(np.isnan(x_fit), 0.0, (x_fit - mu) / sd)
    z_test = np.where(np.isnan(x_test), 0.0, (x_test - mu) / sd)
    y_fit, y_test = data["train"].diseases_table(), data["test"].diseases_table()
    per = {}
    for j, d in enumerate(cfg.task.diseases):
        known = y_fit[:, j] >= 0
        if len(np.unique(y_fit[known, j])) < 2:  # one class in training: nothing to learn, the prevalence
            score = np.full(len(z_test), float(y_fit[known, j].mean()) if known.any() else 0.0)
        else:
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(z_fit[known], y_fit[known, j])
            score = clf.predict_proba(z_test)[:, 1]
        per[d] = metrics.classification_metrics(score, y_test[:, j], 0.5)
    return {"per_disease": per, "features": list(PHENOTYPES), "c": c}


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
    if cfg.baseline == "mean_guess":
        result = {"task": cfg.task.name, "method": "mean_guess", "test": mean_guess(cfg, data)}
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1, default=float))
        return result
    n_out = len(cfg.task.targets) if cfg.task.name == "phenotypes" else len(cfg.task.diseases)
    model, enc_meta = build_model(cfg, n_out)
    for ds in data.values():  # samples at the loaded encoder's frames (the label tables are read once)
        ds.vit = model.vit
    model.to(device)
    stats: dict = {}
    if cfg.task.name == "phenotypes":
        mean, std = target_stats(data["train"])
        stats = {"mean": torch.from_numpy(mean).to(device), "std": torch.from_numpy(std).to(device),
                 "mean_np": mean, "std_np": std}
    if cfg.task.name == "diseases":
        pos, neg = disease_counts(data["train"])
        w = neg / np.maximum(pos, 1) if cfg.task.class_weighting else np.ones(len(pos))
        stats = {"pos_weight": torch.tensor(w, dtype=torch.float32, device=device)}
    if cfg.task.name == "segmentation" and cfg.task.seg_class_weighting:
        stats = {"seg_weight": torch.tensor(seg_class_weights(data["train"]), dtype=torch.float32, device=device)}
    np_stats = {"mean": stats.get("mean_np"), "std": stats.get("std_np")}

    p = cfg.protocol
    phases = {"linear_probe": [(cfg.optim.epochs, False, 0.0)], "full_finetune": [(cfg.optim.epochs, True, 1.0)],
              "probe_finetune": [(p.probe_epochs, False, 0.0),
                                 (max(1, cfg.optim.epochs - p.probe_epochs), True, p.encoder_lr_scale)]}[p.kind]
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"))
    log = open(out_dir / "metrics.jsonl", "w")
    best, best_epoch, epoch, step, since_best = -math.inf, -1, 0, 0, 0
    n_train = len(data["train"])
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
                loss = loss_fn(cfg, out, batch, stats)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
            val = score(cfg, predict(cfg, model, data["val"], np_stats, device, autocast), std=np_stats["std"])
            row = {"epoch": epoch, "step": step, "phase": phase, "train_loss": float(np.mean(losses)),
                   "val_primary": val["primary"], "seconds": time.perf_counter() - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            name, sign = PRIMARY_METRIC[cfg.task.name]
            writer.add_scalar("train/loss", row["train_loss"], epoch)
            writer.add_scalar("train/lr", sched.get_last_lr()[-1], epoch)
            writer.add_scalar(f"val/{name}", sign * val["primary"], epoch)
            for tag, value in val_scalars(cfg.task.name, val).items():
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
                print(f"[finetune] {cfg.task.name} epoch {epoch + 1}/{epochs_total} (phase {phase}) loss "
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
    val_pred = predict(cfg, model, data["val"], np_stats, device, autocast)
    thresholds = None
    if cfg.task.name == "diseases":  # decision thresholds chosen on validation, applied to test
        thresholds = {d: metrics.choose_threshold(val_pred["score"][:, j], val_pred["label"][:, j])
                      for j, d in enumerate(cfg.task.diseases)}
    test_pred = predict(cfg, model, data["test"], np_stats, device, autocast, seg_dir=out_dir / "predictions",
                        all_frames=cfg.data.eval_all_frames)
    spacing = plane_spacing(data["test"], test_pred["key"]) if cfg.task.name == "segmentation" else None
    test = score(cfg, test_pred, thresholds, spacing, std=np_stats["std"])
    result = {"task": cfg.task.name, "method": cfg.baseline if cfg.baseline != "none" else "encoder",
              "protocol": p.kind, "encoder": enc_meta, "best_epoch": best_epoch, "epochs_run": epoch,
              "val_primary": best, "test": test, "thresholds": thresholds, "n": {k: len(v) for k, v in data.items()},
              "seconds": time.perf_counter() - t0}
    if cfg.task.name == "diseases":
        result["phenotype_reference"] = phenotype_reference(cfg, data)
    if cfg.task.name == "phenotypes":  # what `finetune predict` de-normalises the head's output with
        result["target_stats"] = {"mean": np_stats["mean"].tolist(), "std": np_stats["std"].tolist()}
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

    task, rows = cfg.task.name, []
    for i, key in enumerate(pred["key"]):
        row: dict = {"key": key}
        if task == "phenotypes":
            for j, t in enumerate(cfg.task.targets):
                row[f"{t}_pred"], row[f"{t}_true"] = float(pred["pred"][i, j]), float(pred["true"][i, j])
        elif task == "diseases":
            for j, d in enumerate(cfg.task.diseases):
                prob, thr = float(pred["score"][i, j]), thresholds[d]
                row.update({f"{d}_probability": prob, f"{d}_threshold": thr, f"{d}_predicted": int(prob >= thr),
                            f"{d}_label": int(pred["label"][i, j])})
        elif task == "modality_view":
            ok = pred["view"][i] >= 0
            row.update({"modality_pred": MODALITIES[pred["modality_pred"][i]],
                        "modality_true": MODALITIES[pred["modality"][i]],
                        "view_pred": VIEWS[pred["view_pred"][i]] if ok else "",
                        "view_true": VIEWS[pred["view"][i]] if ok else ""})
        else:
            row["files"] = ";".join(str(p.relative_to(out_dir)) for p in _write_seg_nifti(out_dir, ds, pred, i))
        rows.append(row | {k: v[i] for k, v in (extra or {}).items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["key"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
    return out_dir / "predictions.csv"


def _write_seg_nifti(out_dir: Path, ds: SubjectDataset, pred: dict, i: int) -> list[Path]:
    """Subject i's predicted label maps, one NIfTI per plane (H, W, 1, frames scored) with the stored geometry:
    the plane's affine from the conversion's metadata (`plane_affines`), else its pixel spacing."""
    import nibabel as nib

    key = pred["key"][i]
    meta = ds.reader.meta(key)
    planes = meta.get("planes") or [f"plane{p}" for p in range(pred["pred"].shape[1])]
    spacing = meta.get("pixel_spacing_mm", {})
    paths = []
    for p, name in enumerate(planes):
        affine = np.asarray(meta.get("plane_affines", {}).get(name, np.diag(
            [spacing.get("sa" if name.startswith("sa") else name, 1.0)] * 2 + [1.0, 1.0])), np.float64)
        img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(pred["pred"][i, p]).transpose(1, 2, 0)[:, :, None]),
                              affine)
        img.header.set_xyzt_units("mm", "msec")
        path = out_dir / "predictions" / str(key) / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # the temp name ends in .nii.gz: nibabel compresses
            nib.save(img, str(tmp))
        paths.append(path)
    return paths


def write_outputs(cfg: FinetuneConfig, out_dir: Path, result: dict, pred: dict) -> None:
    """Figures and the Markdown report of a run."""
    fig_dir, figs, sections = out_dir / "figures", [], []
    task, test = cfg.task.name, result["test"]
    if task == "phenotypes":
        figs.append(figures.regression_scatter(pred["pred"], pred["true"], cfg.task.targets,
                                               [""] * len(cfg.task.targets), fig_dir / "regression.png"))
        sections.append(("Test MAE", report.phenotype_table({result["method"]: test["per_target"]},
                                                             cfg.task.targets)))
    elif task == "diseases":
        figs.append(figures.roc_pr_curves({d: pred["score"][:, j] for j, d in enumerate(cfg.task.diseases)},
                                          {d: pred["label"][:, j] for j, d in enumerate(cfg.task.diseases)},
                                          fig_dir / "roc_pr.png"))
        sections.append(("Test classification", report.disease_table({result["method"]: test["per_disease"]})))
    elif task == "segmentation":
        sections.append(("Test volume Dice (per subject: the short-axis stack 3D+T, each long-axis view 2D+T; a "
                         "structure only on planes labelled with it)",
                         report.volume_dice_table({result["method"]: test["volume_dice"]})))
        P = pred["images"].shape[1]
        sa = P - len(LA_VIEWS)
        views = [(0, "SA base"), (sa // 2, "SA mid"), (sa - 1, "SA apex"), (sa, "2ch"), (sa + 2, "4ch")]
        i = 0
        figs.append(figures.segmentation_overlay(
            np.stack([pred["images"][i, p, 0] for p, _ in views]), np.stack([pred["true"][i, p, 0] for p, _ in views]),
            np.stack([pred["pred"][i, p, 0] for p, _ in views]), [t for _, t in views], fig_dir / "segmentation.png"))
        sections.append(("Test segmentation per 2D frame (secondary)",
                         report.segmentation_table({result["method"]: test["per_structure"]})))
    else:
        sections.append(("Test classification", report.markdown_table(
            [{"method": result["method"], **{k: v for k, v in test.items() if k != "primary"}}],
            ["method", "modality_accuracy", "modality_balanced_accuracy", "view_accuracy", "view_balanced_accuracy"])))
    if task in ("phenotypes", "diseases") and len(pred["features"]) >= 5:
        values = pred["true"][:, 0] if task == "phenotypes" else pred["label"][:, 0].astype(float)
        name = cfg.task.targets[0] if task == "phenotypes" else cfg.task.diseases[0]
        figs.append(figures.tsne_embedding(pred["features"], values, name, fig_dir / "tsne.png", seed=cfg.seed))
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    if rows:
        figs.append(figures.training_curves(rows, ["train_loss", "val_primary"], fig_dir / "curves.png"))
    sections.insert(0, ("Run", report.markdown_table([{
        "task": task, "method": result["method"], "protocol": result.get("protocol"),
        "encoder": result["encoder"].get("encoder"), "stage": result["encoder"].get("stage", ""),
        "best epoch": result.get("best_epoch"), "train/val/test": "/".join(str(result["n"][s])
                                                                           for s in ("train", "val", "test"))}],
        ["task", "method", "protocol", "encoder", "stage", "best epoch", "train/val/test"])))
    report.write_report(out_dir / "report.md", f"Fine-tuning: {task}", sections, figs)
