"""`python -m finetune predict`: a fine-tuned model (a `finetune train` run directory) on new subjects.

    python -m finetune predict --model runs/demo/finetune/segmentation --input SUBJECTS --out DIR

`--input` is a converted dataset (its `--split`, default every split: the run's own prediction code and CSV
writer, so the rows equal the run's test predictions) or raw UK Biobank subjects: one ukbb_cardiac NIfTI folder,
a folder of them, or a folder of `<eid>_20209_2_0.zip` / `<eid>_20208_2_0.zip` pairs, preprocessed exactly as the
run's training dataset was converted (`finetune.api.preprocess_study`). Writes `predictions.csv` (phenotypes in
original units; each disease's probability, the run's validation-chosen threshold and the decision) and, for
segmentation, the label maps as NIfTI: for a dataset on the stored planes' grid, for raw subjects in the input's
own geometry (`predictions/<eid>/seg_<view>.nii.gz`, the input's shape and affine, nearest neighbour through the
stored plane's affine; short-axis slices that were not kept stay 0).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from core.config import load_config
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import read_training_data
from finetune.api import is_nifti_subject, preprocess_study, read_study
from finetune.config import FinetuneConfig
from finetune.data import SubjectDataset
from finetune.models import FinetuneModel
from finetune.tasks import get_task
from finetune.train import bf16_autocast, build_model, predict, write_predictions

SPLITS = ("train", "val", "test")


def load_finetuned(run: str | Path, device: str | torch.device = "cpu") -> tuple[FinetuneConfig, FinetuneModel, dict]:
    """A `finetune train` run: (its config, the model with its best weights in eval mode, its metrics.json)."""
    from safetensors.torch import load_file

    run = Path(run)
    missing = [n for n in ("config.yaml", "best.safetensors", "metrics.json") if not (run / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished fine-tuning run (no {', '.join(missing)})")
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    result = json.loads((run / "metrics.json").read_text())
    task = get_task(cfg.task.name)
    if task.dataset != "ukb":
        raise ValueError(f"{run}: predict serves the UK Biobank tasks; {task.name} runs are scored by "
                         "`finetune train` on a converted dataset")
    model, _ = build_model(cfg, task.n_outputs(cfg))
    model.load_state_dict(load_file(str(run / "best.safetensors")))
    result.update(task.restore(cfg, result))  # what an older run lacks, computed once
    return cfg, model.to(torch.device(device)).eval(), result


def conversion_settings(cfg: FinetuneConfig, result: dict) -> dict:
    """The conversion settings of the run's training dataset (saved in its metrics.json, else read from the
    dataset's manifest): raw subjects are preprocessed with exactly these."""
    data = result.get("data") or read_training_data(cfg.data.dataset)
    if not data or not data.get("preprocess"):
        raise ValueError(f"{cfg.data.dataset}: the run's training dataset (its conversion settings) is not "
                         "readable, so raw subjects cannot be preprocessed as it was")
    return data["preprocess"]


def find_subjects(path: str | Path) -> list[tuple[str, object]]:
    """(key, source) of every raw subject under `path`: the folder itself when it is a NIfTI subject folder,
    else its NIfTI subject folders and its (20209, 20208) zip pairs of instance 2, by eid."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if is_nifti_subject(path):
        return [(path.name, path)]
    found = {d.name: d for d in sorted(path.iterdir()) if d.is_dir() and is_nifti_subject(d)}
    for sa in sorted(path.glob("*_20209_2_0.zip")):
        eid = sa.name.split("_")[0]
        la = path / f"{eid}_20208_2_0.zip"
        if la.is_file() and eid not in found:
            found[eid] = (sa, la)
    if not found:
        raise FileNotFoundError(f"{path}: no subjects (neither NIfTI folders with sa.nii.gz nor "
                                "<eid>_20209_2_0.zip / <eid>_20208_2_0.zip pairs)")
    return sorted(found.items())


@torch.no_grad()
def run_subject(cfg: FinetuneConfig, model: FinetuneModel, image: np.ndarray) -> dict[str, torch.Tensor]:
    """The model on one stored-format image (P, T, S, S) (`Task.run_subject`: the heads' outputs at the encoder's
    frames, or for segmentation label maps over every stored frame)."""
    return get_task(cfg.task.name).run_subject(model, torch.from_numpy(np.asarray(image, np.float32)))


def outputs(cfg: FinetuneConfig, result: dict, res: dict[str, torch.Tensor]) -> dict:
    """`run_subject`'s raw outputs as a user reads them (`Task.outputs`): phenotypes {name: value in original
    units}, diseases {name: {"probability", "threshold" (the run's, chosen on validation), "predicted"}},
    segmentation {"labels": (P, T, S, S) uint8}."""
    task = get_task(cfg.task.name)
    return task.outputs(cfg, result, res, task.predict_stats(cfg, result))


def seg_to_input(labels: np.ndarray, stored_affine: np.ndarray, input_affine: np.ndarray,
                 input_shape: tuple[int, int], k: int) -> np.ndarray:
    """One stored plane's label maps (T, S, S) on slice `k` of the input grid (X, Y) -> (X, Y, T): every input
    pixel takes the label of the nearest stored pixel through the two affines (0 outside the stored crop)."""
    X, Y = input_shape
    T, S = labels.shape[0], labels.shape[1]
    ii, jj = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)]).astype(np.float64)
    st = np.linalg.solve(stored_affine, input_affine @ ijk)  # input voxel -> RAS -> stored voxel
    si, sj = np.rint(st[0]).astype(np.int64), np.rint(st[1]).astype(np.int64)
    inside = (si >= 0) & (si < S) & (sj >= 0) & (sj < S) & (np.abs(st[2]) < 0.5)
    out = np.zeros((X * Y, T), np.uint8)
    out[inside] = labels[:, si[inside], sj[inside]].T
    return out.reshape(X, Y, T)


def write_input_segmentation(out_dir: Path, key: str, study, meta: dict, labels: np.ndarray) -> list[Path]:
    """The label maps of every plane back on the input's views: one NIfTI per view (the input's shape and
    affine; the short-axis stack holds the kept slices, the others stay 0)."""
    import nibabel as nib

    sa_slices = dict(zip([n for n in meta["planes"] if n.startswith("sa_")], meta["sa_slices"]))
    volumes: dict[str, np.ndarray] = {}
    for p, name in enumerate(meta["planes"]):
        view, k = ("sa", sa_slices[name]) if name in sa_slices else (name, 0)
        shape = study.pixels[view].shape
        vol = volumes.setdefault(view, np.zeros(shape, np.uint8))
        vol[:, :, k, :] = seg_to_input(labels[p], np.asarray(meta["plane_affines"][name], np.float64),
                                       study.affines[view], shape[:2], k)
    paths = []
    for view, vol in volumes.items():
        img = nib.Nifti1Image(vol, study.affines[view])
        img.set_qform(study.affines[view], code=1)
        img.set_sform(study.affines[view], code=1)
        img.header.set_xyzt_units("mm", "msec")
        img.header["pixdim"][4] = study.frame_interval_ms
        path = out_dir / "predictions" / key / f"seg_{view}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
        paths.append(path)
    return paths


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["key"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def predict_raw(cfg: FinetuneConfig, model: FinetuneModel, result: dict, subjects: list[tuple[str, object]],
                out_dir: Path, progress: bool = True) -> Path:
    """Raw subjects -> predictions.csv (+ NIfTI); a subject that cannot be read or preprocessed gets a row with
    its error and the others go on (the counts in the last line reconcile)."""
    from tqdm import tqdm

    settings = conversion_settings(cfg, result)
    task = get_task(cfg.task.name)
    stats = task.predict_stats(cfg, result)
    rows, failed = [], 0
    for key, source in tqdm(subjects, desc="predict", unit="subject", disable=not progress):
        row: dict = {"key": key, "error": ""}
        try:
            study = read_study(source)
            image, meta = preprocess_study(study, settings)
        except Exception as e:  # noqa: BLE001 — the subject is reported and skipped, the batch goes on
            failed += 1
            rows.append({**row, "error": f"{type(e).__name__}: {e}"})
            continue
        out = task.outputs(cfg, result, run_subject(cfg, model, image), stats)
        rows.append({**row, **task.raw_row(out_dir, key, study, meta, out)})
    path = out_dir / "predictions.csv"
    _write_csv(path, rows)
    print(f"[finetune] predict: {len(subjects)} subjects, {len(subjects) - failed} predicted, {failed} failed "
          f"(their rows name the reason); {path}")
    return path


def predict_dataset(cfg: FinetuneConfig, model: FinetuneModel, result: dict, dataset: Path, splits: tuple[str, ...],
                    out_dir: Path) -> Path:
    """A converted dataset's subjects of `splits` through the run's own prediction code and CSV writer."""
    task = get_task(cfg.task.name)
    stats = task.predict_stats(cfg, result)
    device = next(model.parameters()).device
    use_bf16 = bf16_autocast(cfg, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    preds, keys_split, first = [], [], None
    for split in splits:
        ds = SubjectDataset(dataset, split, cfg.task.name, model.vit, train=False, seed=cfg.seed,
                            targets=task.targets(cfg),
                            diseases=cfg.task.diseases)
        if not len(ds):
            continue
        first = ds if first is None else first
        preds.append(predict(cfg, model, ds, stats, device, autocast, all_frames=cfg.data.eval_all_frames,
                             progress=True))
        keys_split += [split] * len(ds)
    if first is None:
        raise ValueError(f"{dataset}: no subjects in the split(s) {list(splits)}")
    n = [len(p["key"]) for p in preds]  # the per-subject arrays of every split, joined
    pred = {"key": [k for p in preds for k in p["key"]],
            **{f: np.concatenate([p[f] for p in preds]) for f, v in preds[0].items()
               if f != "key" and isinstance(v, np.ndarray) and all(len(p[f]) == m for p, m in zip(preds, n))}}
    path = write_predictions(cfg, out_dir, first, pred, result.get("thresholds"), extra={"split": keys_split})
    print(f"[finetune] predict: {len(pred['key'])} subjects of {dataset} ({', '.join(splits)}); {path}")
    return path


def predict_input(run: str | Path, source: str | Path, out: str | Path, split: str = "all",
                  device: str = "cpu", progress: bool = True) -> Path:
    """`finetune predict`: a converted dataset (a folder with manifest.json) or raw subjects."""
    cfg, model, result = load_finetuned(run, device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (Path(source) / "manifest.json").is_file():
        return predict_dataset(cfg, model, result, Path(source), SPLITS if split == "all" else (split,), out_dir)
    return predict_raw(cfg, model, result, find_subjects(source), out_dir, progress)
