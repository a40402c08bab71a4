"""Shared fixtures: one tiny synthetic cohort per test session, written through the real CLI."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """configs/data_prep/synth_tiny.yaml: 4 subjects in NIfTI + DICOM layouts, 8 k-space files (v7.3 and v5)."""
    out = tmp_path_factory.mktemp("cohort")
    cmd = [sys.executable, "-m", "data_prep", "synth", "--config", str(ROOT / "configs/data_prep/synth_tiny.yaml"),
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "UK Biobank subjects : 4" in res.stdout  # the one-screen summary
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 worker CPUs, shared by the tests that need one."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def kspace24(tmp_path_factory, ray_cluster) -> Path:
    """24 synthetic k-space sequences (every modality) converted at 32^2, all in the training split."""
    from data_prep.engine import JobConfig
    from data_prep.kspace.job import KSpaceJobConfig, run

    src = tmp_path_factory.mktemp("k24")
    res = subprocess.run([sys.executable, "-m", "data_prep", "synth", "--out", str(src), "--subjects", "1",
                          "--kspace-scans", "24", "--quiet", "kspace_size_scale=0.5", "kspace_format=mixed"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path_factory.mktemp("ks24")
    cfg = KSpaceJobConfig(src=src / "kspace", size=32, job=JobConfig(out=out, block_size=2, workers=2,
                                                                      val_fraction=0.0, test_fraction=0.0))
    report, _ = run(cfg, progress=False)
    assert report.counts["written"] == 24
    return out


def convert_ukb_tiny(cohort: Path, out: Path, block_size: int, val: float, test: float) -> int:
    """A synthetic cohort through the real UK Biobank job at the demo's geometry (configs/data_prep/ukb_demo.yaml:
    3 SA slices spread base to apex + 3 LA planes, a 115.2 mm field of view on 32^2 pixels); returns the number
    of subjects written."""
    from data_prep.engine import JobConfig
    from data_prep.ukb.job import UKBJobConfig, run
    from data_prep.ukb.preprocess import UKBPreprocessConfig

    cfg = UKBJobConfig(src=cohort / "ukb", tabular=cohort / "ukb_tabular.csv",
                       features=ROOT / "configs/data_prep/ukb_features.yaml",
                       job=JobConfig(out=out, block_size=block_size, workers=2, val_fraction=val, test_fraction=test),
                       preprocess=UKBPreprocessConfig(sa_planes=3, crop=32, fov_mm=115.2, sa_selection="spread"))
    report, _ = run(cfg, progress=False)
    return report.counts["written"]


@pytest.fixture(scope="session")
def cohort60(tmp_path_factory, ray_cluster) -> Path:
    """60 synthetic UK Biobank subjects converted at the tiny model's size, with train / val / test splits (37 /
    12 / 11): the fine-tuning tests' dataset."""
    src = tmp_path_factory.mktemp("cohort60")
    res = subprocess.run([sys.executable, "-m", "data_prep", "synth", "--out", str(src), "--subjects", "60",
                          "--kspace-scans", "0", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path_factory.mktemp("ukb60")
    assert convert_ukb_tiny(src, out, block_size=4, val=0.2, test=0.2) == 60
    shutil.rmtree(src / "ukb")  # 1.2 GB of NIfTI, no longer needed
    return out


def write_shards(out: Path, groups: list[tuple[str, list[str]]], make_sample) -> list[dict]:
    """A converted dataset's shards written directly (no Ray): one shard per (split, keys) group under
    out/shards, each sample from `make_sample(key)` (a `format.UKBSample`); returns the manifest's shard list."""
    import webdataset as wds

    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for block, (split, keys) in enumerate(groups):
        rel = f"shards/ukb-{split}-{block:06d}.tar"
        with open(out / rel, "wb") as f:
            tar = wds.TarWriter(f, encoder=False)
            for k in keys:
                tar.write(make_sample(k).to_wds())
            tar.close()
        shards.append({"path": rel, "split": split, "samples": len(keys), "block": block})
    return shards


def need_slurm() -> None:
    """Skip a SLURM test when no cluster answers -- or fail it, where SLURM is required (CI sets
    CMRFM_REQUIRE_SLURM=1: a cluster that did not start must not turn into green skips)."""
    problem = slurm_problem()
    if problem and os.environ.get("CMRFM_REQUIRE_SLURM"):
        pytest.fail(f"SLURM is required here (CMRFM_REQUIRE_SLURM) but {problem}")
    if problem:
        pytest.skip(problem)


@functools.lru_cache(maxsize=1)
def slurm_problem() -> str | None:
    """None when a SLURM controller answers (the SLURM tests run), else why not (they skip with it)."""
    for tool in ("sinfo", "scontrol", "sbatch", "srun", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: no SLURM here (start one with `bash cluster/local_slurm.sh start`)"
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol ping` failed: {e}"
    if res.returncode != 0 or "is UP" not in res.stdout:
        said = ((res.stdout + res.stderr).strip().splitlines() or ["no output"])[0][:200]
        return (f"no SLURM controller answers `scontrol ping` ({said}); "
                "start one with `bash cluster/local_slurm.sh start`")
    res = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a %T"], capture_output=True, text=True, timeout=20)
    states = res.stdout.split()
    if res.returncode != 0 or not states or states[0] != "up":
        return f"partition `debug` is not up: {res.stdout.strip()!r} {res.stderr.strip()!r}"
    if not any(s.startswith(("idle", "mixed", "allocated", "completing")) for s in states[1:]):
        return f"no usable node in partition `debug` (states: {states[1:]})"
    return None


def _rank_main(rank: int, worker, world: int, tmp: str, args: tuple) -> None:
    """One spawned rank: a gloo process group over the loopback (file rendezvous in `tmp`), RANK / WORLD_SIZE in
    the environment (DeepSpeed reads them), `worker(rank, *args)`'s result saved as tmp/rank<r>.pt, or the
    traceback as tmp/rank<r>.err."""
    from datetime import timedelta

    import torch

    out = Path(tmp)
    try:
        torch.set_num_threads(1)
        if Path("/sys/class/net/lo").exists():
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                           "DS_ACCELERATOR": "cpu"})
        torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=120))
        torch.save(worker(rank, *args), out / f"rank{rank}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def spawn_ranks(worker, world: int, tmp: Path, *args, timeout: float = 300) -> list:
    """Run `worker(rank, *args)` on `world` spawned gloo ranks (`_rank_main`); never leave a rank behind (one whose
    peer died waits in a collective); assert every rank exited 0; return each rank's result."""
    import torch

    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, worker, world, str(tmp), args), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    errors = "\n".join(f.read_text() for f in sorted(Path(tmp).glob("rank*.err")))
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
