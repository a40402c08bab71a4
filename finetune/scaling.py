"""`python -m finetune scaling`: downstream probe quality against the number of pretraining subjects.

For every N of `subjects` (and every pretraining seed), ViTa Stage I is pretrained on the nested subset of N
training-split subjects (`data.subjects=N`, `pretrain/data.py`: the 50-subject set lies inside the 100-subject
one) for the SAME number of optimisation steps (`train.samples_per_epoch` x `train.epochs` fixed by this config,
so runs differ only by their data), launched exactly as a pretraining job is (torchrun on this machine, or
`python -m cluster submit pretrain ... --wait` on a cluster), then exported. A random-init encoder (the weights
every run starts from) is the N = 0 point.

Each encoder is then scored by one fixed protocol on a fixed labelled set that no run pretrained on: the
converted dataset's `probe.fit_split` (default val) and `probe.test_split` (default test) subjects are embedded
(`finetune.embed`: mean-pooled tokens, no augmentation), a closed-form ridge regression (a linear probe on frozen
features; features standardised on the fit split, the ridge penalty per target chosen by exact leave-one-out on
the fit split) maps them to each phenotype, and the test split is scored: MAE in original units, R^2, and the
MAE relative to the mean guess (the fit split's mean; 1 = no information), averaged over the targets
(LVEDV, LVESV, LVSV, LVM, RVEDV, RVESV, RVSV by default). Beside it, the Stage I validation reconstruction PSNR the
pretraining run logged at its end (`train.eval_every`; absent when the trainer does not log one).

Outputs in `out`:
    scaling.json    config, per point (N, seed): steps, passes over the subset, wall time, PSNR, per-target metrics;
                    per N the mean (and std over seeds) of the headline numbers
    table.md        the table, the protocol, and what the numbers say
    scaling.png     probe MAE / mean guess and PSNR against N (log axis), random init as a dashed line
    runs/n<N>-s<seed>/  each pretraining run (checkpoints, metrics.jsonl, pretrain.log), its export and embeddings

Re-running continues: a finished point (its export and embeddings exist) is reused, an interrupted pretraining run
resumes from its checkpoint, and a point made under another configuration is refused (use another `out`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from core.config import ConfigError, config_to_dict, load_config, save_resolved_config
from core.fsutil import atomic_path, atomic_write_text
from core.manifest import Manifest
from finetune.data import SubjectDataset
from finetune.embed import embed
from finetune.figures import _figure, _save
from finetune.metrics import mean_guess_metrics, regression_metrics
from finetune.probe import ridge_probe
from pretrain.config import PretrainConfig, ViTConfig
from pretrain.data import samples_per_epoch
from pretrain.export import export_encoder
from pretrain.models.vit import MaskedAutoencoder

PROBE_TARGETS = ["LVEDV", "LVESV", "LVSV", "LVM", "RVEDV", "RVESV", "RVSV"]


@dataclass
class LaunchConfig:
    """How each pretraining run is started (what the Makefile's TRAIN does on this machine)."""
    # torchrun: `python -m torch.distributed.run --standalone --nproc_per_node N -m pretrain train ...` here;
    # cluster: `python -m cluster submit pretrain ... --wait` with `cluster_args` (SLURM config, time, partition)
    kind: Literal["torchrun", "cluster"] = "torchrun"
    nproc_per_node: int = 2
    env: dict[str, str] = field(default_factory=lambda: {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                                         "MKL_NUM_THREADS": "1"})
    cluster_args: list[str] = field(default_factory=list)  # e.g. [--slurm-config, configs/cluster/..., --time, "8:00:00"]

    def __post_init__(self):
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")


@dataclass
class ProbeConfig:
    """The fixed downstream protocol: ridge regression on frozen mean-pooled features."""
    targets: list[str] = field(default_factory=lambda: list(PROBE_TARGETS))
    fit_split: str = "val"  # the probe is fitted here (never pretrained on: pretraining reads the train split)
    test_split: str = "test"  # and scored here
    alphas: list[float] = field(default_factory=lambda: [float(10.0 ** e) for e in np.arange(-2.0, 4.01, 0.5)])
    batch_size: int = 16  # embedding batch

    def __post_init__(self):
        if not self.targets or not self.alphas or min(self.alphas) <= 0:
            raise ValueError("probe: at least one target and positive alphas are required")
        if self.fit_split == self.test_split:
            raise ValueError(f"probe: fit_split and test_split must differ, both are {self.fit_split!r}")


@dataclass
class ScalingConfig:
    dataset: Optional[Path] = None  # a converted UK Biobank dataset (manifest.json + store.zarr); required
    out: Path = Path("runs/scaling")
    pretrain_config: Path = Path("configs/pretrain/vita_stage1_demo.yaml")  # a Stage I (stage: mae) config
    pretrain_overrides: list[str] = field(default_factory=list)  # section.key=value for every run
    subjects: list[int] = field(default_factory=lambda: [50, 100, 200, 400])  # pretraining subsets (nested)
    random_init: bool = True  # the N = 0 point: the encoder every run starts from, untrained
    seeds: list[int] = field(default_factory=lambda: [0])  # pretraining seeds (train.seed) per N
    # the same optimisation budget for every N: train.samples_per_epoch x train.epochs samples (steps = epochs x
    # samples_per_epoch // global_batch); an epoch here is a unit of the lr schedule, not a pass over the subset
    samples_per_epoch: int = 80
    epochs: int = 30
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        if not self.subjects or min(self.subjects) < 1 or len(set(self.subjects)) != len(self.subjects):
            raise ValueError(f"subjects must be distinct and >= 1, got {self.subjects}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.samples_per_epoch < 1 or self.epochs < 1:
            raise ValueError("samples_per_epoch >= 1 and epochs >= 1 are required")


# --- the pretraining runs -------------------------------------------------------------------------------------
def run_name(n: int, seed: int) -> str:
    return f"n{n}-s{seed}"


def run_overrides(cfg: ScalingConfig, n: int, seed: int, run_dir: Path) -> list[str]:
    """The pretraining overrides of point (n, seed): the study's, then what makes the points comparable."""
    return [*cfg.pretrain_overrides, f"checkpoint.dir={run_dir}", f"data.dataset={cfg.dataset}",
            f"data.subjects={n}", f"train.seed={seed}", f"train.samples_per_epoch={cfg.samples_per_epoch}",
            f"train.epochs={cfg.epochs}", "checkpoint.resume=auto"]


def pretrain_config(cfg: ScalingConfig, overrides: list[str]):
    pc = load_config(PretrainConfig, cfg.pretrain_config, overrides)
    if pc.stage != "mae":
        raise ConfigError(f"pretrain_config {cfg.pretrain_config}: a Stage I config (stage: mae) is required, "
                          f"got stage {pc.stage!r}")
    return pc


def total_steps(pc) -> int:
    """As `pretrain.train.train` counts them."""
    return pc.train.epochs * max(1, pc.train.samples_per_epoch // pc.train.global_batch)


def launch_command(cfg: ScalingConfig, overrides: list[str], steps: int) -> list[str]:
    # validation (Stage I reconstruction PSNR) once, at the end of the run
    args = ["--config", str(cfg.pretrain_config), *overrides, f"train.eval_every={steps}"]
    if cfg.launch.kind == "cluster":
        return [sys.executable, "-m", "cluster", "submit", "pretrain", *cfg.launch.cluster_args, "--wait", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cfg.launch.nproc_per_node}", "-m", "pretrain", "train", *args]


def _fingerprint(cfg: ScalingConfig, overrides: list[str]) -> str:
    """What makes a point's result: the pretraining config file's text and the overrides."""
    text = Path(cfg.pretrain_config).read_text() + "\n" + "\n".join(overrides)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_point(run_dir: Path, fingerprint: str) -> dict:
    marker = run_dir / "scaling_point.json"
    if not marker.exists():
        return {}
    prev = json.loads(marker.read_text())
    if prev.get("fingerprint") != fingerprint:
        raise ConfigError(f"{run_dir} was made with another pretraining config or budget (fingerprint "
                          f"{prev.get('fingerprint')}, now {fingerprint}); use another `out` or delete it")
    return prev


def pretrain_point(cfg: ScalingConfig, n: int, seed: int, run_dir: Path) -> dict:
    """Pretrain (or resume) and export point (n, seed); returns its record (steps, wall time, ...)."""
    overrides = run_overrides(cfg, n, seed, run_dir)
    pc = pretrain_config(cfg, overrides)
    steps = total_steps(pc)
    fingerprint = _fingerprint(cfg, overrides)
    prev = _check_point(run_dir, fingerprint)
    if prev.get("done") and (run_dir / "encoder.safetensors").exists():
        return prev
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"subjects": n, "seed": seed, "steps": steps, "global_batch": pc.train.global_batch,
              "fingerprint": fingerprint, "overrides": overrides, "done": False}
    atomic_write_text(run_dir / "scaling_point.json", json.dumps(record, indent=1))
    cmd = launch_command(cfg, overrides, steps)
    env = {**os.environ, **(cfg.launch.env if cfg.launch.kind == "torchrun" else {})}
    print(f"[scaling] pretraining N={n} seed={seed}: {steps} steps -> {run_dir} (log: {run_dir}/pretrain.log)",
          flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "pretrain.log", "a") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (run_dir / "pretrain.log").read_text().splitlines()[-25:]
        raise RuntimeError(f"pretraining N={n} seed={seed} exited with {rc}"
                           + (" (stopped by a signal; re-run to resume it)" if rc == 75 else "")
                           + f"; the end of {run_dir}/pretrain.log:\n" + "\n".join(tail))
    export_encoder(run_dir)
    record.update(done=True, wall_s=round(wall + prev.get("wall_s", 0.0), 1))
    atomic_write_text(run_dir / "scaling_point.json", json.dumps(record, indent=1))
    return record


def random_init_point(cfg: ScalingConfig, seed: int, run_dir: Path) -> dict:
    """The N = 0 point: the encoder of Stage I's model as `pretrain.train` initialises it (torch seed = train.seed),
    written as an export (stage "random_init")."""
    import torch
    import yaml
    from safetensors.torch import save_file

    overrides = [*cfg.pretrain_overrides, f"train.seed={seed}"]
    pc = pretrain_config(cfg, overrides)
    fingerprint = _fingerprint(cfg, overrides)
    prev = _check_point(run_dir, fingerprint)
    if prev.get("done") and (run_dir / "encoder.safetensors").exists():
        return prev
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(pc.train.seed)
    model = MaskedAutoencoder(pc.model, pc.mae)
    encoder = {k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    meta = {"format": "cmrfm-encoder-v1", "stage": "random_init", "architecture": "vit", "checkpoint": "none",
            "run": str(run_dir.resolve())}
    with atomic_path(run_dir / "encoder.safetensors") as tmp:
        save_file(encoder, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    atomic_write_text(run_dir / "encoder_config.yaml", yaml.safe_dump(
        {"model": config_to_dict(pc.model), **meta, "provenance": [{"stage": "random_init", "run": meta["run"]}]},
        sort_keys=False))
    record = {"subjects": 0, "seed": seed, "steps": 0, "global_batch": pc.train.global_batch,
              "fingerprint": fingerprint, "overrides": overrides, "done": True, "wall_s": 0.0}
    atomic_write_text(run_dir / "scaling_point.json", json.dumps(record, indent=1))
    return record


def validation_psnr(run_dir: Path) -> dict:
    """The last validation row of a Stage I run's metrics.jsonl (PSNR and its references), or {}."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    val = [r for r in rows if r.get("split") == "val" and "psnr" in r]
    if not val:
        return {}
    return {k: val[-1][k] for k in ("psnr", "psnr_mean_image", "psnr_constant", "step") if k in val[-1]}


# --- the probe ------------------------------------------------------------------------------------------------
def embeddings(cfg: ScalingConfig, run_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(keys, features) of a split under the run's encoder, cached in the run directory."""
    path = run_dir / f"embeddings-{split}.npz"
    if not path.exists():
        embed(run_dir, cfg.dataset, path, split=split, batch_size=cfg.probe.batch_size, progress=False)
    with np.load(path) as z:
        return [str(k) for k in z["keys"]], z["embeddings"].astype(np.float64)


def labels(cfg: ScalingConfig, split: str) -> tuple[list[str], np.ndarray]:
    """(keys, targets (N, K) in original units, NaN missing) of a split."""
    ds = SubjectDataset(cfg.dataset, split, "phenotypes", ViTConfig(), train=False, seed=0,
                        targets=cfg.probe.targets)
    return list(ds.keys), ds.targets_table().astype(np.float64)


def probe_scores(cfg: ScalingConfig, run_dir: Path, table: dict) -> dict:
    """The fixed protocol on one encoder: per-target test MAE, R^2, MAE / mean guess, and their means."""
    names = cfg.probe.targets
    xs = {}
    for split in (cfg.probe.fit_split, cfg.probe.test_split):
        keys, x = embeddings(cfg, run_dir, split)
        lkeys, y = table[split]
        index = {k: i for i, k in enumerate(keys)}
        if sorted(index) != sorted(lkeys):
            raise RuntimeError(f"{run_dir}: the {split} embeddings do not cover the split's keys")
        xs[split] = (x[[index[k] for k in lkeys]], y)
    (xf, yf), (xt, yt) = xs[cfg.probe.fit_split], xs[cfg.probe.test_split]
    pred, alphas = ridge_probe(xf, yf, xt, cfg.probe.alphas)
    model = regression_metrics(pred, yt, names, valid=np.isfinite(pred))
    guess = mean_guess_metrics(yf, yt, names)
    per = {t: {"mae": model[t]["mae"], "r2": model[t]["r2"], "mae_mean_guess": guess[t]["mae"],
               "mae_ratio": model[t]["mae"] / guess[t]["mae"] if guess[t]["mae"] > 0 else float("nan"),
               "alpha": a, "n": model[t]["n"]} for t, a in zip(names, alphas)}
    return {"targets": per, "mae_ratio": float(np.nanmean([p["mae_ratio"] for p in per.values()])),
            "r2": float(np.nanmean([p["r2"] for p in per.values()])), "n_fit": len(xf), "n_test": len(xt)}


# --- the study ------------------------------------------------------------------------------------------------
def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def summarise(cfg: ScalingConfig, points: list[dict]) -> list[dict]:
    """Per N (0 = random init), the mean and std over seeds of the headline numbers."""
    rows = []
    for n in sorted({p["subjects"] for p in points}):
        mine = [p for p in points if p["subjects"] == n]
        row = {"subjects": n, "seeds": len(mine), "steps": mine[0]["steps"],
               "passes": mine[0]["passes"]}
        for key in ("mae_ratio", "r2"):
            row[key], row[key + "_std"] = _mean_std([p["probe"][key] for p in mine])
        row["psnr"], row["psnr_std"] = _mean_std([p["val"].get("psnr") for p in mine])
        for t in cfg.probe.targets:
            row[f"mae_{t}"], _ = _mean_std([p["probe"]["targets"][t]["mae"] for p in mine])
        rows.append(row)
    return rows


def _fmt(mean: Optional[float], std: Optional[float], f: str) -> str:
    if mean is None:
        return "n.a."
    return format(mean, f) + ("" if std is None else " ± " + format(std, f))


def write_table(cfg: ScalingConfig, result: dict, path: Path) -> Path:
    rows = result["summary"]
    t = cfg.probe.targets
    head = ["pretraining subjects N", "steps", "passes over the N", "Stage I val PSNR (dB)",
            f"probe MAE / mean guess ({len(t)} targets)", "probe R² (mean)", *[f"{x} MAE" for x in t]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = ["0 (random init)" if r["subjects"] == 0 else str(r["subjects"]), str(r["steps"]),
                 "—" if r["subjects"] == 0 else f"{r['passes']:.1f}", _fmt(r["psnr"], r["psnr_std"], ".2f"),
                 _fmt(r["mae_ratio"], r["mae_ratio_std"], ".3f"), _fmt(r["r2"], r["r2_std"], ".3f"),
                 *[_fmt(r[f"mae_{x}"], None, ".1f") for x in t]]
        lines.append("| " + " | ".join(cells) + " |")
    pts = result["points"]
    ref = next((p["val"] for p in pts if p["val"].get("psnr_mean_image") is not None), {})
    first = next(p for p in pts)
    text = ["# Scaling study: probe quality against pretraining subjects", "",
            f"Dataset `{cfg.dataset}` ({result['train_subjects']} training-split subjects available); Stage I "
            f"`{cfg.pretrain_config}`, every run {rows[-1]['steps']} steps of {first['global_batch']} samples "
            f"(train.samples_per_epoch={cfg.samples_per_epoch} x train.epochs={cfg.epochs}), on the nested subset "
            f"of N training subjects; seeds {cfg.seeds}. Probe: ridge regression on the frozen mean-pooled "
            f"features, fitted on the `{cfg.probe.fit_split}` split ({first['probe']['n_fit']} subjects), scored on "
            f"`{cfg.probe.test_split}` ({first['probe']['n_test']}); MAE in ml (LVM in g); MAE / mean guess < 1 "
            f"means the features carry the phenotype. Mean ± std over seeds where there are several.", "",
            *lines, ""]
    if ref:
        text.append(f"PSNR references on the same masked patches: the training mean image "
                    f"{ref['psnr_mean_image']:.2f} dB, a constant image {ref.get('psnr_constant', float('nan')):.2f} dB.")
        text.append("")
    text += [_statement(rows), ""]
    atomic_write_text(path, "\n".join(text))
    return path


def _statement(rows: list[dict]) -> str:
    trained = [r for r in rows if r["subjects"] > 0 and r["mae_ratio"] is not None]
    rand = next((r for r in rows if r["subjects"] == 0), None)
    if not trained:
        return ""
    a, b = trained[0], trained[-1]
    out = (f"From N = {a['subjects']} to N = {b['subjects']} pretraining subjects (same steps) the probe's MAE / mean "
           f"guess goes from {a['mae_ratio']:.3f} to {b['mae_ratio']:.3f} "
           f"({'better' if b['mae_ratio'] < a['mae_ratio'] else 'not better'} with more subjects)")
    if rand is not None and rand["mae_ratio"] is not None:
        out += f"; the random-init encoder gives {rand['mae_ratio']:.3f}"
    if a["psnr"] is not None and b["psnr"] is not None:
        out += f"; the Stage I validation PSNR goes from {a['psnr']:.2f} to {b['psnr']:.2f} dB"
    return out + "."


def plot(cfg: ScalingConfig, result: dict, path: Path) -> Path:
    rows = result["summary"]
    trained = [r for r in rows if r["subjects"] > 0]
    rand = next((r for r in rows if r["subjects"] == 0), None)
    panels = [("mae_ratio", f"probe MAE / mean guess\n(mean of {len(cfg.probe.targets)} phenotypes)")]
    if any(r["psnr"] is not None for r in trained):
        panels.append(("psnr", "Stage I validation PSNR (dB)"))
    fig, axes = _figure(1, len(panels), size=(4.2, 3.4))
    n = [r["subjects"] for r in trained]
    for ax, (key, label) in zip(axes[0], panels):
        y = np.array([np.nan if r[key] is None else r[key] for r in trained], float)
        err = np.array([0.0 if r[key + "_std"] is None else r[key + "_std"] for r in trained], float)
        ax.errorbar(n, y, yerr=err if err.any() else None, marker="o", capsize=3, label="Stage I on N subjects")
        if rand is not None and rand[key] is not None:
            ax.axhline(rand[key], color="grey", ls="--", label="random init (N = 0)")
        if key == "mae_ratio":
            ax.axhline(1.0, color="k", lw=0.8, ls=":", label="mean guess")
        ref = next((p["val"].get("psnr_mean_image") for p in result["points"] if p["val"].get("psnr_mean_image")),
                   None)
        if key == "psnr" and ref is not None:
            ax.axhline(ref, color="tab:red", lw=0.8, ls=":", label="training mean image")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("pretraining subjects N (same steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Scaling: {Path(cfg.pretrain_config).stem}, {rows[-1]['steps']} steps per run", fontsize=9)
    return _save(fig, path)


def run_study(cfg: ScalingConfig) -> dict:
    out = Path(cfg.out)
    Manifest.load(cfg.dataset, ("ukb",), "dataset")  # one line when it is not set, missing or not UK Biobank
    available = samples_per_epoch(cfg.dataset, "train")
    too_many = [n for n in cfg.subjects if n > available]
    if too_many:
        raise ConfigError(f"subjects {too_many}: {cfg.dataset} has only {available} training-split subjects")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out, "scaling_config.yaml")
    t0 = time.perf_counter()
    table = {s: labels(cfg, s) for s in (cfg.probe.fit_split, cfg.probe.test_split)}
    plan = ([(0, s) for s in cfg.seeds] if cfg.random_init else []) + \
        [(n, s) for n in sorted(cfg.subjects) for s in cfg.seeds]
    points = []
    for n, seed in plan:
        run_dir = out / "runs" / run_name(n, seed)
        record = random_init_point(cfg, seed, run_dir) if n == 0 else pretrain_point(cfg, n, seed, run_dir)
        probe = probe_scores(cfg, run_dir, table)
        point = {**{k: record[k] for k in ("subjects", "seed", "steps", "global_batch")},
                 "passes": record["steps"] * record["global_batch"] / n if n else 0.0,
                 "wall_s": record.get("wall_s"), "run": str(run_dir), "val": validation_psnr(run_dir),
                 "probe": probe}
        points.append(point)
        print(f"[scaling] N={n} seed={seed}: probe MAE / mean guess {probe['mae_ratio']:.3f}, R² {probe['r2']:.3f}"
              + (f", val PSNR {point['val']['psnr']:.2f} dB" if point["val"].get("psnr") is not None else ""),
              flush=True)
    result = {"config": config_to_dict(cfg), "train_subjects": available, "points": points,
              "wall_s_this_call": round(time.perf_counter() - t0, 1)}
    result["summary"] = summarise(cfg, points)
    write_table(cfg, result, out / "table.md")
    plot(cfg, result, out / "scaling.png")
    atomic_write_text(out / "scaling.json", json.dumps(result, indent=1, default=str))
    return result
