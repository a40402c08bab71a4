"""MetaCLIP-CMR's segmentation transfer (Sec. 3.3, Table 3): cine short-axis LV / MYO / RV on ACDC or M&Ms (a `sax`
dataset, `python -m data_prep sax`), 2D slices through MONAI's ResNet-50 (the MetaCLIP-CMR image encoder, ImageNet
weights from a local file, or a fresh one) and a U-Net decoder (`finetune.models.ResNetUNetDecoder`), or through
the ViT's 2D path (MetaCLIP-CMR's ViT variant, the Stage I masked-reconstruction export, a fresh ViT) and a 2D
UNETR (`finetune.models.ViTUNETR2D`), scored by case-level 3D Dice: per case, per
structure over the whole short-axis stack, at ED and at ES, then the mean over cases (`metrics.volume_dice` with one
stack per case and phase)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.vocab import LABELS, SAX_STRUCTURES
from finetune import metrics, report
from finetune.models import ResNetUNetDecoder, ViTUNETR2D
from finetune.tasks.base import Task, finite, register_task
from finetune.tasks.segmentation import FIXED_MASK, FIXED_MASK_NOTE, fixed_mask
from pretrain.models.vit import ViTEncoder

CLASSES = 1 + len(SAX_STRUCTURES)  # background, LV, MYO, RV: LABELS' first four
PHASES = ("ED", "ES")
STRUCTURES = {LABELS.index(s): s for s in SAX_STRUCTURES}


class SaxSegmentation(Task):
    name, dataset, dense, primary = "sax_segmentation", "sax", True, ("case_dice_mean", 1.0)
    precise_bn = True  # a ResNet-50 full of BatchNorm, a few steps an epoch (`models.precise_batchnorm`)

    def build_heads(self, model, dim, n_out, hidden, seg_width):
        if isinstance(model.encoder, ViTEncoder):  # the MetaCLIP-CMR ViT variant, a Stage I export, a fresh ViT
            model.decoder = ViTUNETR2D(model.vit, CLASSES, seg_width)
        elif hasattr(model.encoder, "layer4"):
            model.decoder = ResNetUNetDecoder(CLASSES)
        else:
            raise ValueError("sax_segmentation needs MONAI's 2D ResNet-50 (a MetaCLIP-CMR export with "
                             "metaclip.image_encoder resnet50, baseline: resnet50) or the ViT")

    def forward(self, model, batch):
        """image (B, 2, Z, S, S): the ED and ES stacks; only the cases' real slices go through the network."""
        x, valid = batch["image"], batch["slice_valid"]  # valid (B, Z)
        B, P, Z, S, _ = x.shape
        keep = valid[:, None, :].expand(B, P, Z).reshape(-1)
        slices = x.reshape(B * P * Z, 1, S, S)[keep].to(next(model.encoder.parameters()).dtype)
        if isinstance(model.decoder, ViTUNETR2D):
            logits = model.decoder(model.encoder, slices)
        else:
            logits = model.decoder(ResNetUNetDecoder.features(model.encoder, slices))
        out = logits.new_zeros(B * P * Z, CLASSES, S, S)
        out[:, 0] = 1.0  # padded slices: background
        out[keep] = logits.to(out.dtype)
        return {"seg": out.reshape(B, P, Z, CLASSES, S, S)}

    def loss(self, cfg, out, batch, stats):
        from monai.losses import DiceCELoss

        keep = batch["slice_valid"][:, None, :].expand(-1, out["seg"].shape[1], -1)
        x = out["seg"].float()[keep]  # (slices, C, S, S)
        y = batch["seg"][keep][:, None]
        return DiceCELoss(to_onehot_y=True, softmax=True)(x, y)

    def collect(self, acc, res, batch, offset, stats):
        valid = batch["slice_valid"].cpu().numpy()
        mid = valid.sum(axis=1) // 2  # each case's middle slice, for the report's figure
        image = batch["image"].float().cpu().numpy()
        acc.setdefault("mid_image", []).append(np.stack([image[i, :, z] for i, z in enumerate(mid)]).astype(np.float16))
        acc.setdefault("mid_z", []).append(mid)
        pred = res["seg"].argmax(3).byte().cpu().numpy()
        pred[~np.broadcast_to(valid[:, None, :], pred.shape[:3])] = 0
        acc.setdefault("pred", []).append(pred)
        acc.setdefault("true", []).append(batch["seg"].byte().cpu().numpy())
        acc.setdefault("slice_valid", []).append(valid)

    def score(self, cfg, pred, thresholds=None, spacing=None, stats=None):
        return case_dice_scores(pred["pred"], pred["true"])

    def val_scalars(self, val):
        return finite({f"dice_{p}_{s}": v["dice"] for p in PHASES for s, v in val["case_dice"][p].items()})

    def report(self, cfg, result, pred, fig_dir):
        test = result["test"]
        rows = {f"{result['method']} {p}": test["case_dice"][p] for p in PHASES}
        rows.update({f"{FIXED_MASK} {p}": test["fixed_mask_case_dice"][p] for p in PHASES})
        return [("Test case-level 3D Dice (per case over the short-axis stack, at ED and ES; mean over cases)",
                 report.volume_dice_table(rows) + f"\n\nMean over structures and phases: "
                 f"{test['case_dice_mean']:.3f}.\n\n`{FIXED_MASK}`: {FIXED_MASK_NOTE}")], self.figures(pred, fig_dir)

    @staticmethod
    def figures(pred, fig_dir) -> list:
        """Representative test slices: the mid-ventricular slice at ED and ES of the best, the median and the worst
        case by mean case Dice (image, truth, prediction)."""
        if "mid_image" not in pred or not len(pred["pred"]):
            return []
        from finetune import figures

        means = [np.nanmean([case_dice(pred["pred"][i, j], pred["true"][i, j], c) for j in range(2)
                             for c in STRUCTURES]) for i in range(len(pred["pred"]))]
        order = np.argsort(means, kind="stable")
        picks = {"best": order[-1], "median": order[len(order) // 2], "worst": order[0]}
        rows = [(i, j, f"{name}: {pred['key'][i]} {PHASES[j]} ({means[i]:.2f})") for name, i in picks.items()
                for j in range(2)]
        z = pred["mid_z"]
        return [figures.segmentation_overlay(np.stack([pred["mid_image"][i, j] for i, j, _ in rows]),
                                             np.stack([pred["true"][i, j, z[i]] for i, j, _ in rows]),
                                             np.stack([pred["pred"][i, j, z[i]] for i, j, _ in rows]),
                                             [t for _, _, t in rows], Path(fig_dir) / "sax_segmentation.png")]

    def csv_row(self, cfg, out_dir, ds, pred, i, thresholds):
        """The case's 3D Dice per structure and phase."""
        row = {}
        for j, ph in enumerate(PHASES):
            for c, name in STRUCTURES.items():
                d = case_dice(pred["pred"][i, j], pred["true"][i, j], c)
                row[f"{name}_{ph}_dice"] = "" if np.isnan(d) else round(d, 4)
        return row

    def comparison_table(self, cfg, results):
        return report.volume_dice_table({f"{m} {p}": r["case_dice"][p] for m, r in results.items() for p in PHASES})


def case_dice(pred: np.ndarray, true: np.ndarray, label: int) -> float:
    """3D Dice of one structure over one case's stack (NaN when it is in neither)."""
    p, t = pred == label, true == label
    den = int(p.sum()) + int(t.sum())
    return 2 * int((p & t).sum()) / den if den else float("nan")


def case_dice_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """pred / true (N, 2, Z, S, S) labels (padded slices 0 in both): case-level 3D Dice per phase and structure,
    the mean over both, and the same for the best fixed mask."""
    def per_phase(p: np.ndarray) -> dict:
        return {ph: metrics.volume_dice(p[:, i:i + 1], true[:, i:i + 1], np.ones((len(true), 1), bool), STRUCTURES,
                                        [tuple(STRUCTURES)], [0]) for i, ph in enumerate(PHASES)}

    def mean(d: dict) -> float:
        v = [r["dice"] for ph in d.values() for r in ph.values() if not np.isnan(r["dice"])]
        return float(np.mean(v)) if v else float("nan")

    ours = per_phase(pred)
    fixed = per_phase(np.broadcast_to(fixed_mask(true), true.shape))
    return {"case_dice": ours, "case_dice_mean": mean(ours), "fixed_mask_case_dice": fixed,
            "fixed_mask_case_dice_mean": mean(fixed), "n_cases": int(len(true)), "primary": mean(ours)}


register_task(SaxSegmentation())
