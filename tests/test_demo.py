"""`make demo` itself, end to end at smoke scale: the real Makefile and every stage of the main job (synthetic
cohort → Ray conversion → Stage I → Stage II → MetaCLIP-CMR on 2 DeepSpeed CPU ranks → fine-tuning → report),
interrupted with Ctrl-C during Stage I and run again. The second `make demo` must resume Stage I from its
checkpoint (not start over, not skip it), finish the pipeline and write the report; a third finds nothing to do.

The smoke scale only shrinks the cohort and the epochs, through the Makefile's SYNTH_ARGS / PRETRAIN_ARGS /
FINETUNE_ARGS; the commands, configs and file targets are the demo's own. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["SYNTH_ARGS=subjects=24 kspace_scans=60",  # k-space split by patient: enough patients for val and test
         # Stage I: ~40 steps with a checkpoint every 5, so that Ctrl-C lands between two checkpoints
         "PRETRAIN_ARGS=train.epochs=20 checkpoint.every_steps=5",
         "FINETUNE_ARGS=optim.epochs=2 protocol.probe_epochs=1 data.eval_all_frames=false"]


def _make(demo: Path, *args: str) -> list[str]:
    # the interpreter running the tests (make test: the project's .venv)
    return ["make", "--no-print-directory", *args, f"DEMO_DIR={demo}", f"BIN={Path(sys.executable).parent}", *SMOKE]


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Every process the interrupted make started (torchrun, ranks, loader workers) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail(f"processes of the interrupted make still running after {timeout} s")


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "split" not in r]


@pytest.mark.skipif(not (ROOT / ".venv/.installed-stamp").exists(), reason="run through `make test`")
def test_make_demo_interrupted_with_ctrl_c_then_resumed(tmp_path):
    from pretrain.checkpoint import latest_tag

    demo = tmp_path / "demo"
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(_make(demo, "demo"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    ckpts = demo / "stage1" / "checkpoints"
    deadline = time.time() + 900
    while latest_tag(ckpts) is None:
        assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no Stage I checkpoint within 15 min"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    p.wait(timeout=300)
    _wait_group_gone(p.pid, timeout=120)
    first = (tmp_path / "first.log").read_text()
    assert p.returncode != 0, first[-3000:]
    assert not (demo / "stage1" / "encoder.safetensors").exists(), "an interrupted stage must not be exported"
    tag = latest_tag(ckpts)
    interrupted_at = int(tag.removeprefix("step"))

    second = subprocess.run(_make(demo, "demo"), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    # Stage I continued from the checkpoint the interrupt left; the conversion before it was not redone
    assert f"resumed from {tag} at step {interrupted_at}" in out, out[-5000:]
    assert "-m data_prep synth" not in out and "-m data_prep ukb" not in out
    # every logged step once, in order: every 10th and the last (the demo's log_every is 10)
    total = int(re.search(r"; (\d+) steps;", out).group(1))
    assert _steps(demo / "stage1") == sorted({*range(10, total + 1, 10), total}), out[-3000:]
    report = (demo / "report.md").read_text()
    for section in ("Phenotype", "Disease", "Segmentation", "Modality"):
        assert section.lower() in report.lower(), f"{section} missing from the report"
    assert list(demo.glob("**/*.png")), "no figures"
    assert "Stage II (image-tabular CLIP): validation image to table top-1 over" in report
    # the headline figures under stable keys, and the report's targets computed from exactly those
    summary = json.loads((demo / "summary.json").read_text())
    assert {"stage1", "stage2", "phenotypes", "linear_probe", "label_efficiency", "diseases", "segmentation",
            "modality_view", "targets"} <= set(summary)
    assert {"psnr", "psnr_mean_image", "psnr_constant"} <= set(summary["stage1"])
    assert {"mean_guess", "vit_scratch", "mae", "vita"} <= set(summary["phenotypes"]["mae_ratio"])
    assert set(summary["linear_probe"]["mae_ratio"]) == {"random", "mae", "vita"}
    assert set(summary["linear_probe"]["loo_mae_ratio"]) == {"random", "mae", "vita"}
    assert set(summary["linear_probe"]["test_minus_random_ci95"]) == {"mae", "vita"}
    lo, hi = summary["linear_probe"]["test_minus_random_ci95"]["vita"]
    assert f"test minus `random`, 95 % paired bootstrap: [{lo:+.3f}, {hi:+.3f}]" in report
    assert "phenotypes_logistic" in report and 0.0 <= summary["diseases"]["phenotype_reference_mean_auroc"] <= 1.0
    assert set(summary["label_efficiency"]["mae_ratio"]["vita"]) == {"0.1", "0.25", "0.5", "1"}
    assert set(summary["segmentation"]["volume_dice"]) == {"LV", "MYO", "RV", "LA", "RA"}
    assert set(summary["segmentation"]["fixed_mask_volume_dice"]) == {"LV", "MYO", "RV", "LA", "RA"}
    assert "| fixed mask |" in report
    targets = report[report.index("## Targets"):]
    assert f"{sum(t['met'] for t in summary['targets'])} of {len(summary['targets'])} met" in targets
    for t in summary["targets"]:
        assert f"| {t['target']} |" in targets and ("| met |" if t["met"] else "| NOT met |") in targets
    # per-subject predictions: a CSV per task, and the segmentation as NIfTI with the stored geometry
    rows = (demo / "finetune/phenotypes/vita/predictions.csv").read_text().splitlines()
    assert rows[0].startswith("key,LVEDV_pred,LVEDV_true") and len(rows) > 1
    assert "cad_threshold" in (demo / "finetune/diseases/predictions.csv").read_text().splitlines()[0]
    niftis = list((demo / "finetune/segmentation/predictions").glob("*/sa_0.nii.gz"))
    assert niftis
    import nibabel as nib

    img = nib.load(niftis[0])
    spacing = json.loads((demo / "data/ukb/manifest.json").read_text())["config"]["preprocess"]
    assert img.shape[:3] == (32, 32, 1)
    assert abs(np.linalg.norm(img.affine[:3, :2], axis=0) - spacing["fov_mm"] / spacing["crop"]).max() < 1e-3

    # the README's Python API example, run as written on this demo (its paths pointed here)
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("### From Python"):]
    code = block[block.index("```python\n") + 10:block.index("\n```", block.index("```python"))]
    ns: dict = {}
    exec(compile(code.replace('"runs/demo', f'"{demo}'), "README.md (From Python)", "exec"), ns)
    from core.format import StoreReader
    from pretrain.transforms import select_frames

    subject = sorted((demo / "cohort/ukb").iterdir())[0].name
    reader = StoreReader(demo / "data/ukb")
    stored = np.asarray(reader.group["image"][reader.rows[subject]])
    assert np.array_equal(ns["image"], stored)  # the conversion's sample, bit for bit
    enc = ns["enc"]
    assert ns["z"].shape == (enc.vit.dim,) and enc.meta["stage"] == "tabular_clip"
    import torch

    frames = select_frames(stored.shape[1], enc.vit.frames)
    with torch.no_grad():
        direct = enc.module.forward_features(torch.from_numpy(stored[None, :, frames]).float()).mean(1)[0]
    np.testing.assert_allclose(ns["z"], direct.numpy(), rtol=1e-5, atol=1e-6)
    # shared as a model repository (HuggingFace layout with a model card) and loaded back: the same encoder
    from finetune import Encoder

    hub = enc.save_pretrained(tmp_path / "hub")
    card = (hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: cmrfm") and "Stage II: image-tabular CLIP" in card
    assert "Stage I: multi-view 3D+T masked autoencoder" in card and "image_to_table_top1" in card
    again = Encoder.from_pretrained(hub)
    assert again.data == enc.data and again.meta["provenance"] == enc.meta["provenance"]
    np.testing.assert_array_equal(again.embed(ns["image"]), ns["z"])

    # finetune predict: on the converted test split the rows are the run's own; on a raw NIfTI subject the same
    # phenotypes as from its stored sample; segmentation back in the input's geometry
    def predict(model: str, source: Path, out: Path, *extra: str) -> list[dict]:
        res = subprocess.run([sys.executable, "-m", "finetune", "predict", "--model", str(demo / model), "--input",
                              str(source), "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return csv_rows(out / "predictions.csv")

    own = {r["key"]: r for r in csv_rows(demo / "finetune/diseases/predictions.csv")}
    rows = predict("finetune/diseases", demo / "data/ukb", tmp_path / "pred_dis", "--split", "test")
    assert {r["key"] for r in rows} == set(own) and all(r["split"] == "test" for r in rows)
    for r in rows:
        mine = own[r["key"]]
        assert set(r) - {"split"} == set(mine)
        for k, v in mine.items():  # the same model on the same samples: probabilities to float precision
            assert (abs(float(r[k]) - float(v)) < 1e-6) if k.endswith("_probability") else r[k] == v, (k, r[k], v)
    pheno = {r["key"]: r for r in csv_rows(demo / "finetune/phenotypes/vita/predictions.csv")}
    key = sorted(pheno)[0]
    (raw,) = predict("finetune/phenotypes/vita", demo / "cohort/ukb" / key, tmp_path / "pred_raw")
    assert raw["key"] == key and raw["error"] == ""
    for t in ("LVEDV", "RVEF"):
        got, want = float(raw[f"{t}_pred"]), float(pheno[key][f"{t}_pred"])
        assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (t, got, want)
    from finetune import Finetuned  # the same run from Python

    run = Finetuned.from_pretrained(demo / "finetune/phenotypes/vita")
    mine = run.predict(run.preprocess(demo / "cohort/ukb" / key))
    assert abs(mine["LVEDV"] - float(pheno[key]["LVEDV_pred"])) < 1e-3 * max(1.0, abs(mine["LVEDV"]))
    predict("finetune/segmentation", demo / "cohort/ukb" / key, tmp_path / "pred_seg")
    for view in ("sa", "la_2ch", "la_3ch", "la_4ch"):
        got, given = nib.load(tmp_path / "pred_seg/predictions" / key / f"seg_{view}.nii.gz"), nib.load(
            demo / "cohort/ukb" / key / f"{view}.nii.gz")
        assert got.shape == given.shape and np.allclose(got.affine, given.affine)
    kept = reader.meta(key)["sa_slices"]
    sa = np.asarray(nib.load(tmp_path / "pred_seg/predictions" / key / "seg_sa.nii.gz").dataobj)
    assert {k for k in range(sa.shape[2]) if sa[:, :, k].any()} <= set(kept)

    # a third run has nothing left to do
    third = subprocess.run(_make(demo, "-q", str(demo / "report.md")), cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0, third.stdout + third.stderr


def test_report_states_retrieval_against_chance():
    from finetune.demo_report import _retrieval_statement

    val = [{"step": 50, "n": 15, "image_to_table_top1": 0.2, "table_to_image_top1": 0.2},
           {"step": 90, "n": 15, "image_to_table_top1": 1 / 15, "table_to_image_top1": 0.1}]
    (line,) = _retrieval_statement("Stage II", val)
    assert "over 15 candidates (chance 0.067)" in line
    assert "best 0.20 at step 50 (3.0x chance)" in line and "last 0.07 at step 90 (at chance level)" in line
    text = [{"step": 40, "n": 12, "sentences": 8, "image_to_text_top1": 0.5}]  # chance: 1 / distinct sentences
    assert "over 8 candidates (chance 0.125): best 0.50 at step 40 (4.0x chance)" in _retrieval_statement("M", text)[0]
    assert _retrieval_statement("Stage I", []) == []
