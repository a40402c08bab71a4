"""All-plane segmentation (ViTa Stage III): a UNETR decoder on the ViT's tokens per plane, the frames as channels,
one label space over the short-axis stack and the long-axis views (`core.vocab.LABELS`); Dice + cross-entropy;
scored by volume Dice per subject (the short-axis stack 3D+T, each long-axis view 2D+T) and, secondary, per 2D
frame with HD95 in mm. Test predictions over every stored frame (T / frames passes)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from core.fsutil import atomic_path
from core.vocab import LA_VIEWS, LABELS, SOURCE_LABEL_MAPS
from finetune import figures, metrics, report
from finetune.models import UNETRDecoder
from finetune.tasks.base import Task, finite, register_task
from pretrain.models.vit import ViTEncoder
from pretrain.transforms import select_frames

STRUCTURES = {i: name for i, name in enumerate(LABELS) if i > 0}


def _plane_views(P: int) -> list[str]:
    return ["sa"] * (P - len(LA_VIEWS)) + list(LA_VIEWS)


def plane_label_sets(P: int) -> list[tuple[int, ...]]:
    """Per plane of the stack, the unified labels its ground truth can hold (`core.vocab.SOURCE_LABEL_MAPS`): LV,
    MYO, RV on the short axis, LA on the 2-chamber view, LA and RA on the 4-chamber view, none on the 3-chamber
    view."""
    return [tuple(sorted(set(SOURCE_LABEL_MAPS.get(v, {}).values()))) for v in _plane_views(P)]


def plane_groups(P: int) -> list[int]:
    """Volumes for volume Dice: the short-axis stack is one (3D+T), each long-axis view its own (2D+T)."""
    return [0 if v == "sa" else 1 + i for i, v in enumerate(_plane_views(P))]


def plane_spacing(ds, keys: list[str]) -> np.ndarray:
    """(N, P, 2) pixel spacing in mm per plane, from the conversion's metadata (HD95 in mm)."""
    P = ds.reader.group["image"].shape[1]
    out = np.ones((len(keys), P, 2))
    for i, k in enumerate(keys):
        px = ds.reader.meta(k).get("pixel_spacing_mm", {})
        out[i] = [[px.get(n, 1.0)] * 2 for n in _plane_views(P)]
    return out


def seg_class_weights(ds, max_subjects: int = 200) -> np.ndarray:
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


class Segmentation(Task):
    name, dataset, dense, needs_vit, primary = "segmentation", "ukb", True, True, ("volume_dice_mean", 1.0)

    def build_heads(self, model, dim, n_out, hidden, seg_width):
        if not isinstance(model.encoder, ViTEncoder):
            raise ValueError("segmentation needs the ViT encoder")
        model.decoder = UNETRDecoder(model.vit, len(LABELS), seg_width)

    def forward(self, model, batch):
        idx = model.decoder.skip_blocks + [len(model.encoder.blocks) - 1]
        hidden = model.encoder.intermediate_layers(batch["image"], idx)
        hidden[-1] = model.encoder.norm(hidden[-1])
        return {"seg": model.decoder(batch["image"], hidden)}

    def train_stats(self, cfg, train_ds, device):
        if not cfg.task.seg_class_weighting:
            return {}
        return {"seg_weight": torch.tensor(seg_class_weights(train_ds), dtype=torch.float32, device=device)}

    def loss(self, cfg, out, batch, stats):
        from monai.losses import DiceCELoss

        logits, seg, valid = out["seg"].float(), batch["seg"], batch["seg_valid"]
        x = logits[valid].flatten(0, 1)  # (items, C, H, W): every frame of every labelled plane
        y = seg[valid].flatten(0, 1)[:, None]
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=stats.get("seg_weight"))(x, y)

    def passes(self, ds, model, all_frames):
        if not all_frames:
            return [0]
        return list(range(max(1, ds.reader.group["image"].shape[2] // model.vit.frames)))

    def collect(self, acc, res, batch, offset, stats):
        acc.setdefault("seg", []).append((offset, batch["frames"].cpu().numpy(), res["seg"].argmax(3).byte()
                                          .cpu().numpy(), batch["seg"].byte().cpu().numpy(),
                                          batch["seg_valid"].cpu().numpy(), batch["image"].cpu().numpy()))

    def finish(self, acc, ds, seg_dir=None):
        """Put every pass's frames in place: pred / true (N, P, T, H, W) uint8 (memory-mapped under `seg_dir` when
        given, so a large test split does not have to fit in memory), valid (N, P), the first pass's images."""
        N = len(acc["key"])
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
        for offset, frames, p, t, v, img in acc["seg"]:
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
        return {"key": acc["key"], "pred": pred[:, :, frames_scored], "true": true[:, :, frames_scored],
                "valid": valid, "images": np.concatenate(images), "frames_scored": int(frames_scored.sum()),
                "frames_stored": T}

    def score(self, cfg, pred, thresholds=None, spacing=None, stats=None):
        P = pred["pred"].shape[1]
        labels, groups = plane_label_sets(P), plane_groups(P)
        volume = metrics.volume_dice(pred["pred"], pred["true"], pred["valid"], STRUCTURES, labels, groups)
        res = metrics.segmentation_metrics(pred["pred"], pred["true"], pred["valid"], STRUCTURES, spacing, labels)
        dice = [r["dice"] for r in volume.values() if not math.isnan(r["dice"])]
        fixed = fixed_mask(pred["true"])
        return {"volume_dice": volume, "fixed_mask_volume_dice": metrics.volume_dice(
                    np.broadcast_to(fixed, pred["true"].shape), pred["true"], pred["valid"], STRUCTURES, labels,
                    groups),
                "per_structure": res, "frames_scored": pred["frames_scored"],
                "frames_stored": pred["frames_stored"], "primary": float(np.mean(dice)) if dice else float("nan")}

    def val_scalars(self, val):
        return finite({f"dice_{k}": v["dice"] for k, v in val["volume_dice"].items()})

    def test_spacing(self, test_ds, keys):
        return plane_spacing(test_ds, keys)

    def csv_row(self, cfg, out_dir, ds, pred, i, thresholds):
        return {"files": ";".join(str(p.relative_to(out_dir)) for p in write_seg_nifti(out_dir, ds, pred, i))}

    def report(self, cfg, result, pred, fig_dir):
        test = result["test"]
        sections = [("Test volume Dice (per subject: the short-axis stack 3D+T, each long-axis view 2D+T; a "
                     "structure only on planes labelled with it)",
                     report.volume_dice_table({result["method"]: test["volume_dice"],
                                               FIXED_MASK: test["fixed_mask_volume_dice"]})
                     + f"\n\n`{FIXED_MASK}`: {FIXED_MASK_NOTE}")]
        P = pred["images"].shape[1]
        sa = P - len(LA_VIEWS)
        views = [(0, "SA base"), (sa // 2, "SA mid"), (sa - 1, "SA apex"), (sa, "2ch"), (sa + 2, "4ch")]
        i = 0
        figs = [figures.segmentation_overlay(
            np.stack([pred["images"][i, p, 0] for p, _ in views]), np.stack([pred["true"][i, p, 0] for p, _ in views]),
            np.stack([pred["pred"][i, p, 0] for p, _ in views]), [t for _, t in views], fig_dir / "segmentation.png")]
        sections.append(("Test segmentation per 2D frame (secondary)",
                         report.segmentation_table({result["method"]: test["per_structure"]})))
        return sections, figs

    def comparison_table(self, cfg, results):
        return report.segmentation_table({m: r["per_structure"] for m, r in results.items()})

    def run_subject(self, model, x):
        """Label maps (P, T, S, S) over every stored frame: T / frames shifted passes; a frame no pass covers
        takes its nearest covered frame."""
        T, F = x.shape[1], model.vit.frames
        labels, covered = torch.zeros((x.shape[0], T) + x.shape[2:], dtype=torch.uint8), np.zeros(T, bool)
        for offset in range(max(1, T // F)):
            frames = select_frames(T, F, offset)
            labels[:, frames] = model({"image": x[None, :, frames]})["seg"][0].argmax(2).byte()
            covered[frames] = True
        idx = np.flatnonzero(covered)
        nearest = idx[np.abs(np.arange(T)[:, None] - idx[None]).argmin(1)]
        return {"seg": labels[:, nearest]}

    def outputs(self, cfg, result, res, stats):
        return {"labels": res["seg"].numpy()}

    def raw_row(self, out_dir, key, study, meta, out):
        from finetune.predict import write_input_segmentation  # cycle: finetune.predict imports finetune.tasks

        paths = write_input_segmentation(out_dir, key, study, meta, out["labels"])
        return {"files": ";".join(str(p.relative_to(out_dir)) for p in paths)}


FIXED_MASK = "fixed mask"
FIXED_MASK_NOTE = ("the per-pixel majority label of the scored subjects' own truths, per plane and frame, "
                   "whatever the image: what the heart's position in the crop gives alone (the crops are centred on "
                   "the heart). It knows the truths, so no mask that ignores the image scores more.")


def fixed_mask(true: np.ndarray) -> np.ndarray:
    """(P, T, H, W): the most frequent label at each pixel over the subjects of `true` (N, P, T, H, W)."""
    return np.stack([(true == c).sum(0) for c in range(len(STRUCTURES) + 1)]).argmax(0).astype(np.uint8)


def write_seg_nifti(out_dir: Path, ds, pred: dict, i: int) -> list[Path]:
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


register_task(Segmentation())
