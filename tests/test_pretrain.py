"""Stage I pretraining for real: DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo) with 2 ranks under torchrun,
on shards converted from the synthetic cohort. Loss falls; ZeRO-2 and ZeRO-3; exact resume after SIGKILL; an
interrupted save is never the resume point; the exported encoder loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.net import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/vita_stage1_tiny.yaml"


@pytest.fixture(scope="session")
def shards(tiny_cohort, tmp_path_factory, ray_cluster) -> Path:
    """The tiny cohort converted with the real UK Biobank job at the tiny model's crop size."""
    from conftest import convert_ukb_tiny

    out = tmp_path_factory.mktemp("shards")
    assert convert_ukb_tiny(tiny_cohort, out, block_size=1, val=0.0, test=0.0) == 4
    return out


@pytest.fixture(scope="session")
def stage1_export(shards, tmp_path_factory) -> Path:
    """A Stage I run (2 ranks, 2 epochs) exported by the command line, shared by the tests that start from one."""
    stage1 = tmp_path_factory.mktemp("stage1_export")
    _run(stage1, shards, "train.epochs=2", "train.samples_per_epoch=16")
    res = subprocess.run([sys.executable, "-m", "pretrain", "export", "--run", str(stage1)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return stage1


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    return env


def _launch(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2,
            launcher: str = "torchrun", env: dict | None = None) -> subprocess.Popen:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    else:  # the deepspeed launcher (it passes --local_rank=N)
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}",
               "--module"]
    cmd += ["pretrain", "train", "--config", str(TINY), f"checkpoint.dir={run_dir}", f"data.dataset={shards}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, timeout: int = 600,
         launcher: str = "torchrun") -> str:
    p = _launch(run_dir, shards, *overrides, nproc=nproc, launcher=launcher)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split", "train") != "train":
            continue  # validation rows
        rows[r["step"]] = r  # a resumed run re-logs steps after the checkpoint: keep the last
    return rows


STEPS = ["train.epochs=12", "train.samples_per_epoch=16", "checkpoint.every_steps=6"]


def test_loss_falls_with_zero2_on_two_cpu_ranks(shards, tmp_path):
    out = _run(tmp_path / "run", shards, *STEPS, "train.zero_stage=2", "train.image_every=4", "train.eval_every=12",
               "train.eval_split=train")
    m = _metrics(tmp_path / "run")
    # Stage I validation (in-sample here: 4 subjects): PSNR on fixed masked patches beside its two references
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["step"] for v in val] == [12, 24] and all(v["n"] == 4 for v in val)
    for v in val:
        assert v["psnr_mean_image"] > v["psnr_constant"] > 0  # the mean image beats its own mean intensity
    assert val[0]["psnr_mean_image"] == val[1]["psnr_mean_image"]  # the same patches and reference each time
    assert val[1]["psnr"] > val[0]["psnr"]
    steps = sorted(m)
    assert steps[-1] == 12 * 16 // 8
    first, last = m[steps[0]]["loss"], min(m[s]["loss"] for s in steps[-4:])
    assert last < 0.7 * first, (first, last)
    assert "world 2" in out and "ZeRO-2" in out and "attention:" in out
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*"))
    assert kept == ["step00000018", "step00000024"]  # checkpoints every 6 steps, the last checkpoint.keep=2 kept
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/psnr", "train/samples_per_s",
            "train/data_wait"} <= set(ev.Tags()["scalars"])
    assert len(ev.Images(ev.Tags()["images"][0])) == 24 // 4  # reconstruction grids every 4 steps


@pytest.mark.slow
def test_exact_resume_after_sigkill(shards, tmp_path):
    straight = tmp_path / "straight"
    _run(straight, shards, *STEPS)
    killed = tmp_path / "killed"
    p = _launch(killed, shards, *STEPS)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == "step00000006"):
        assert p.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    import psutil

    assert len(psutil.Process(p.pid).children()) == 2  # the ranks
    ranks = psutil.Process(p.pid).children(recursive=True)  # and their loader workers
    os.kill(p.pid, signal.SIGKILL)  # the launcher alone (the OOM killer, kill -9): each rank has its own session
    p.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, f"ranks outlived their launcher: {alive}"  # they die with it (PR_SET_PDEATHSIG)
    _run(killed, shards, *STEPS)
    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == sorted(b)
    for s in sorted(a):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["psnr"] == b[s]["psnr"], s
    from pretrain.export import consolidated_state_dict

    wa = consolidated_state_dict(straight / "checkpoints", "step00000024")
    wb = consolidated_state_dict(killed / "checkpoints", "step00000024")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # every rank killed inside a save (its shards written, no COMPLETE, the pointer unmoved): the next start
    # sweeps the partial tag and resumes from the one before, to the same result
    in_save = tmp_path / "in_save"
    p = _launch(in_save, shards, *STEPS, env={"CMRFM_KILL_IN_SAVE": "step00000012"})
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and (in_save / "checkpoints" / "latest").read_text() == "step00000006", out[-3000:]
    assert (in_save / "checkpoints" / "step00000012").exists()  # the partial tag the kill left
    out = _run(in_save, shards, *STEPS)
    assert "removed what an interrupted save left" in out and "step00000012" in out
    assert "resumed from step00000006 at step 6" in out
    c = _metrics(in_save)
    assert sorted(c) == sorted(a) and all(a[s]["loss"] == c[s]["loss"] for s in a)
    wc = consolidated_state_dict(in_save / "checkpoints", "step00000024")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_directory_stops_with_the_holder(shards, tmp_path):
    run = tmp_path / "run"
    first = _launch(run, shards, "train.epochs=500", "train.samples_per_epoch=16")  # still running when
    try:
        deadline = time.time() + 600
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended early"
            time.sleep(0.2)
        second = _launch(run, shards, *STEPS)
        out, _ = second.communicate(timeout=300)
        assert second.returncode != 0
        lines = [x for x in out.splitlines() if "another trainer is using this run directory" in x]
        assert len(lines) == 1 and f"{run}: another trainer" in lines[0] and "(pid " in lines[0], out[-3000:]
        assert first.poll() is None  # the holder is undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_checkpoint_housekeeping_removes_debris_and_never_latest(tmp_path):
    """What interrupted saves and deletions leave: swept at start-up and after every save."""
    from pretrain.checkpoint import COMPLETE, sweep

    ckpt = tmp_path / "checkpoints"
    for tag in ("step00000004", "step00000006", "step00000008", "step00000004_universal", "step00000002_universal",
                ".step00000002.deleting", ".step00000006_universal.tmp"):
        (ckpt / tag).mkdir(parents=True)
        (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for tag in ("step00000004", "step00000006"):
        (ckpt / tag / COMPLETE).write_text("{}")
    (ckpt / "latest").write_text("step00000006")
    (ckpt / ".latest.123.abc.tmp").write_text("step00000008")
    removed = sweep(ckpt)
    assert sorted(removed) == [".latest.123.abc.tmp", ".step00000002.deleting", ".step00000006_universal.tmp",
                               "step00000002_universal", "step00000008"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000004", "step00000004_universal",
                                                      "step00000006"]
    # the tag `latest` names is never touched, even without its marker (latest_tag refuses it, sweep keeps it)
    (ckpt / "step00000006" / COMPLETE).unlink()
    assert sweep(ckpt) == [] and (ckpt / "step00000006").exists()


@pytest.mark.slow
def test_interrupted_save_is_not_the_resume_point(shards, tmp_path):
    from pretrain.checkpoint import latest_tag

    run = tmp_path / "run"
    _run(run, shards, "train.epochs=2", "train.samples_per_epoch=16", "checkpoint.every_steps=2")
    ckpt = run / "checkpoints"
    assert latest_tag(ckpt) == "step00000004"
    # a save that died between ranks: a newer tag directory with partial files, no COMPLETE, pointer unmoved
    partial = ckpt / "step00000099"
    shutil.copytree(ckpt / "step00000004", partial)
    (partial / "COMPLETE").unlink()
    next(partial.glob("*optim_states.pt")).unlink()
    assert latest_tag(ckpt) == "step00000004"
    # a pointer to it is refused without the marker: the newest complete checkpoint instead, and said so
    (ckpt / "latest").write_text("step00000099")
    said = []
    assert latest_tag(ckpt, said.append) == "step00000004" and "not a complete checkpoint" in said[0]
    (ckpt / "latest").unlink()  # no pointer at all: likewise
    assert latest_tag(ckpt, said.append) == "step00000004" and "is missing" in said[1]
    (ckpt / "latest").write_text("step00000099")

    # the run resumes from step 4, and rows a crash logged after it (here steps 5-7, and a line cut short) are not
    # kept twice: the resumed run's metrics are one row per step
    with open(run / "metrics.jsonl", "a") as f:
        for step in (5, 6, 7):
            f.write(json.dumps({"step": step, "samples": 8 * step, "loss": 99.0}) + "\n")
        f.write('{"step": 8, "sam')
    out = _run(run, shards, "train.epochs=3", "train.samples_per_epoch=16", "checkpoint.every_steps=2")
    assert "resuming from the newest complete checkpoint, step00000004" in out and "at step 4" in out, out[-3000:]
    assert "4 rows after step 4 dropped" in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)) and all(r["loss"] < 99 for r in _metrics(run).values())
    assert latest_tag(ckpt) == "step00000006" and not partial.exists()  # the broken tag is swept once unprotected


@pytest.mark.slow
def test_zero3_and_encoder_export(shards, tmp_path):
    run = tmp_path / "run"
    _run(run, shards, "train.epochs=2", "train.samples_per_epoch=16", "train.zero_stage=3")
    res = subprocess.run([sys.executable, "-m", "pretrain", "export", "--run", str(run)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    from pretrain.export import load_encoder

    enc, vit, meta = load_encoder(run)
    assert meta["stage"] == "mae" and meta["provenance"][0]["run"] == str(run.resolve())
    x = torch.rand(1, vit.sa_planes + vit.la_planes, vit.frames, vit.img_size, vit.img_size)
    assert enc.forward_features(x).shape[-1] == vit.dim
    # fine-tuning may also point at a run directory without an export: the same weights, from the ZeRO-3 shards
    (run / "encoder.safetensors").rename(tmp_path / "encoder.safetensors")
    from_run, vit2, meta2 = load_encoder(run)
    assert vit2 == vit and meta2["checkpoint"] == meta["checkpoint"]
    a, b = enc.state_dict(), from_run.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_blocks_fused_adamw_and_batch_augmentation_train_as_the_default_step(shards, tmp_path):
    """The fast step of issue 17 (`train.compile`, `optim.fused`, `data.augment_on=batch`) on two CPU ranks: the same
    samples, augmentations and masks as the default run, so the same losses up to float rounding (inductor's and the
    fused kernel's summation order)."""
    few = ["train.epochs=2", "train.samples_per_epoch=16", "train.log_every=1"]
    _run(tmp_path / "eager", shards, *few)
    out = _run(tmp_path / "fast", shards, *few, "train.compile=true", "optim.fused=true", "data.augment_on=batch")
    assert "transformer blocks compiled" in out and "fused AdamW" in out
    eager, fast = _metrics(tmp_path / "eager"), _metrics(tmp_path / "fast")
    assert sorted(eager) == sorted(fast) == [1, 2, 3, 4]
    for step in eager:
        assert fast[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-3), step
    assert eager[4]["loss"] != eager[1]["loss"]


@pytest.mark.slow
def test_bf16_under_the_deepspeed_launcher(shards, tmp_path):
    out = _run(tmp_path / "run", shards, "train.epochs=1", "train.samples_per_epoch=16", "train.precision=bf16",
               launcher="deepspeed")
    assert "bf16" in out and "world 2" in out
    m = _metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_one_process_without_a_launcher_saves_on_a_signal_and_resumes(shards, tmp_path, sig):
    """What SLURM does before a time limit (a signal), or Ctrl-C: the run checkpoints at the next check and stops."""
    from pretrain.__main__ import EXIT_STOPPED
    from pretrain.checkpoint import latest_tag

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", "train", "--config", str(TINY), f"checkpoint.dir={run}",
           f"data.dataset={shards}", "train.epochs=40", "train.samples_per_epoch=16", "checkpoint.every_steps=1000"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == EXIT_STOPPED, out[-3000:]  # not 0: `train && export` must not export an unfinished run
    assert f"{sig.name}: checkpoint saved at step" in out and "world 1" in out
    tag = latest_tag(run / "checkpoints")
    stopped = int(tag.removeprefix("step"))
    assert 3 <= stopped < 80
    out = _run(run, shards, "train.epochs=40", "train.samples_per_epoch=16", "checkpoint.every_steps=1000",
               "train.log_every=1000", nproc=1)
    assert f"resumed from {tag} at step {stopped}" in out


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(shards, tmp_path, before, after):
    """The trainer's path through DeepSpeed's universal checkpoint conversion; the data stream continues by global
    sample count. (That weights and optimizer state come back exactly, for every ZeRO stage and stage:
    tests/test_universal_checkpoint.py.)"""
    run = tmp_path / "run"
    _run(run, shards, "train.epochs=2", "train.samples_per_epoch=16", nproc=before)
    first = _metrics(run)
    out = _run(run, shards, "train.epochs=4", "train.samples_per_epoch=16", nproc=after)
    assert f"world {after}" in out and "resumed from step00000004 at step 4" in out
    assert (run / "checkpoints" / "step00000004_universal").is_dir()
    resumed = _metrics(run)
    # the weights came back: training continues from the trained loss, not from a fresh model's
    assert resumed[5]["loss"] < 0.9 * first[1]["loss"] and resumed[5]["loss"] < 1.1 * first[4]["loss"]
    assert resumed[8]["samples"] == 8 * 8


STAGE2 = ROOT / "configs/pretrain/vita_stage2_tiny.yaml"


@pytest.mark.slow
def test_stage2_image_tabular_alignment_from_the_stage1_export(shards, stage1_export, tmp_path):
    stage1 = stage1_export
    stage2 = tmp_path / "stage2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
           "train", "--config", str(STAGE2), f"checkpoint.dir={stage2}", f"data.dataset={shards}",
           f"checkpoint.init_from={stage1}", "train.global_batch=4", "train.micro_batch=2", "train.epochs=10",
           "train.samples_per_epoch=16", "train.log_every=4", "train.eval_every=8", "train.eval_split=train",
           "checkpoint.keep=20",
           # as the demo: an 8-step Stage I export's features share one large common component (see the config)
           "tabular.image_feature_norm=batchnorm"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
    # said at start-up: BatchNorm's statistics come from each rank's micro-batch, not the global batch
    assert "the image features are batch-normalised per micro-batch of 2, not over the global batch" in res.stdout
    m = _metrics(stage2)
    assert all(np.isfinite(r["loss"]) for r in m.values())
    # whether it learns is read from the validation pass (here in-sample: the tiny cohort has 4 subjects): one
    # training batch of 4 with masked images and corrupted tables is too noisy to judge by (it swings 0.5-1.7)
    val = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in x]
    assert [v["step"] for v in val] == [8, 16, 24, 32, 40] and all(v["n"] == 4 for v in val)
    assert val[-1]["image_to_table_top1"] >= 0.75 and val[-1]["table_to_image_top1"] >= 0.75, val[-1]
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["loss"] < 0.6 * np.log(4), val
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(stage2 / "tensorboard")).Reload().Tags()["scalars"]
    assert {"val/image_to_table_top1", "val/image_to_table_top5", "val/table_to_image_top1", "val/loss"} <= set(tags)

    # exact resume: back to the step-32 checkpoint, the run repeats steps 33-40 bit for bit
    ckpt = stage2 / "checkpoints"
    for s in (36, 40):
        shutil.rmtree(ckpt / f"step{s:08d}")
    (ckpt / "latest").write_text("step00000032")
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
    again = _metrics(stage2)
    assert "resumed from step00000032" in res.stdout
    assert all(again[s]["loss"] == m[s]["loss"] and again[s]["acc"] == m[s]["acc"] for s in (36, 40))

    # the export names its stage and the chain of runs behind it: Stage II <- Stage I
    from pretrain.export import export_encoder, load_encoder

    export_encoder(stage2)
    _, _, meta = load_encoder(stage2)
    assert meta["stage"] == "tabular_clip"
    assert [p["stage"] for p in meta["provenance"]] == ["tabular_clip", "mae"]
    assert meta["provenance"][1]["run"] == str(stage1.resolve())


@pytest.mark.slow
def test_stage2_encoder_init_loads_the_export_exactly(shards, stage1_export, tmp_path):
    from safetensors.torch import load_file

    from core.config import load_config
    from pretrain.config import PretrainConfig
    from core.manifest import Manifest
    from pretrain.stages import get_stage

    stage1 = stage1_export
    cfg = load_config(PretrainConfig, STAGE2, [f"data.dataset={shards}", f"checkpoint.init_from={stage1}"])
    stage2 = get_stage("tabular_clip")
    model = stage2.build_model(cfg, Manifest.load(shards))
    saved = load_file(str(stage1 / "encoder.safetensors"))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in saved.items())
    bad = load_config(PretrainConfig, STAGE2, [f"data.dataset={shards}", "checkpoint.init_from=" + str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        stage2.build_model(bad, Manifest.load(shards))


@pytest.mark.slow
def test_pretraining_continues_when_the_cohort_grows(tiny_cohort, ray_cluster, tmp_path):
    """Scaling to more subjects: a run on 2 converted subjects, the conversion re-run on a source with 4 (it appends
    2, the old shards untouched), the same command again: it resumes from the last checkpoint, says the data
    changed, and trains on the grown cohort for the epochs' new length, every step logged once."""
    from conftest import convert_ukb_tiny

    src = tmp_path / "src"
    (src / "ukb").mkdir(parents=True)
    shutil.copy(tiny_cohort / "ukb_tabular.csv", src / "ukb_tabular.csv")
    subjects = sorted(p.name for p in (tiny_cohort / "ukb").iterdir())
    for name in subjects[:2]:
        shutil.copytree(tiny_cohort / "ukb" / name, src / "ukb" / name)
    data = tmp_path / "data"
    assert convert_ukb_tiny(src, data, block_size=1, val=0.0, test=0.0) == 2
    run = tmp_path / "run"
    steps = ["train.epochs=4", "train.global_batch=2", "train.micro_batch=1", "train.log_every=1"]
    out = _run(run, data, *steps)
    assert "4 steps" in out and sorted(_metrics(run)) == [1, 2, 3, 4]

    for name in subjects[2:]:
        shutil.copytree(tiny_cohort / "ukb" / name, src / "ukb" / name)
    assert convert_ukb_tiny(src, data, block_size=1, val=0.0, test=0.0) == 2  # the 2 new subjects only
    out = _run(run, data, *steps)
    assert "8 steps" in out and "resumed from step00000004 at step 4" in out, out[-3000:]
    assert "the dataset changed (2 -> 4 samples per epoch)" in out, out[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["samples"] == 16


@pytest.mark.slow
def test_stage2_in_bf16(shards, tmp_path):
    """The paper's Stage II precision: DeepSpeed's bf16 engine with activation checkpointing, the tabular
    transformer's fp32 inputs, the CLIP loss gathered across ranks and the validation pass; finite, and it learns."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
           "train", "--config", str(STAGE2), f"checkpoint.dir={run}", f"data.dataset={shards}",
           "checkpoint.init_from=null", "train.precision=bf16", "train.global_batch=4", "train.micro_batch=2",
           "train.epochs=10", "train.samples_per_epoch=16", "train.log_every=4", "train.eval_every=20",
           "train.eval_split=train"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    assert "bf16" in res.stdout
    m = _metrics(run)
    assert all(np.isfinite(r["loss"]) for r in m.values())
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in x]
    assert [v["step"] for v in val] == [20, 40] and np.isfinite(val[-1]["loss"])
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["loss"] < 0.75 * np.log(4), val  # in-sample, 4 subjects


def test_encoder_lr_scale_puts_the_image_encoder_in_its_own_groups():
    """optim.encoder_lr_scale: the image encoder (`encoder.*`) learns at a fraction of the others' rate; at 1 the
    groups are the papers' two (decay / no decay), in the same order, so older checkpoints still load."""
    from pretrain.config import MAEConfig, ViTConfig
    from pretrain.models.vit import MaskedAutoencoder
    from pretrain.train import param_groups

    vit = ViTConfig(img_size=32, sa_planes=3, la_planes=3, frames=5, patch=(5, 8, 8), dim=64, depth=2, heads=4)
    model = MaskedAutoencoder(vit, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4))
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.05)
    assert [(g["weight_decay"], "lr_scale" in g) for g in plain] == [(0.05, False), (0.0, False)]
    scaled = param_groups(model, 0.05, 0.1)
    assert sum(len(g["params"]) for g in scaled) == sum(len(g["params"]) for g in plain)
    for g in scaled:
        in_encoder = {names[id(p)].startswith("encoder.") for p in g["params"]}
        assert in_encoder == {g.get("lr_scale") == 0.1}, g.get("lr_scale")
    assert "lr_scale" not in scaled[0]  # the logged lr (group 0) stays optim.lr


TOY_STAGE = '''
import sys

import torch
from torch import nn

from core.config import load_config
from pretrain.config import PretrainConfig
from pretrain.models.vit import ViTEncoder
from pretrain.stages import Stage, register_stage
from pretrain.train import train


class MeanIntensity(nn.Module):
    """Regress each subject's mean intensity from the ViT's pooled features."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.head = ViTEncoder(cfg.model), nn.Linear(cfg.model.dim, 1)

    def set_grad_checkpointing(self, enabled=True):
        pass

    def forward(self, images, generator=None):
        err = self.head(self.encoder.forward_features(images).mean(1))[:, 0] - images.float().mean(dim=(1, 2, 3, 4))
        return {"loss": (err ** 2).mean(), "abs_err": err.abs().mean()}


class ToyStage(Stage):
    name, dataset, quality = "toy_mean", "ukb", "abs_err"

    def build_model(self, cfg, manifest, run_dir=None, rank=0):
        return MeanIntensity(cfg)

    def inputs(self, cfg, batch, device, dtype):
        return {"images": batch["image"].to(device, dtype)}


register_stage(ToyStage())
print(train(load_config(PretrainConfig, sys.argv[1], sys.argv[2:])))
'''


@pytest.mark.slow
def test_a_new_stage_registers_from_outside_the_trainer(shards, tmp_path):
    """A stage defined in a user's own script (not in pretrain/) trains through the one loop: registered by name,
    built, fed, logged with its own figure, checkpointed; an unregistered name is one config error."""
    from core.config import ConfigError, load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import preflight

    script = tmp_path / "toy_stage.py"
    script.write_text(TOY_STAGE)
    run = tmp_path / "toy"
    res = subprocess.run([sys.executable, str(script), str(TINY), f"checkpoint.dir={run}", f"data.dataset={shards}",
                          "stage=toy_mean", "train.epochs=8", "train.samples_per_epoch=16", "train.log_every=2",
                          "train.eval_every=0", "optim.warmup_epochs=1"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = _metrics(run)
    assert sorted(rows) == list(range(2, 17, 2)) and all("abs_err" in r for r in rows.values())
    assert rows[16]["loss"] < rows[2]["loss"], rows
    assert (run / "checkpoints" / "step00000016").is_dir()
    with pytest.raises(ConfigError, match="unknown stage 'nope'; registered: mae, metaclip, tabular_clip"):
        preflight(load_config(PretrainConfig, TINY, [f"data.dataset={shards}", "stage=nope"]), check_device=False)
