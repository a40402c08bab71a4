"""`python -m cluster`: submitit launchers, for real.

Unit: flags -> SlurmConfig, job-kind defaults, the time notation, sweep expansion, the sbatch text, `--dry-run`.
On this machine, through the CLI (the jobs run the real code: DeepSpeed on 2 CPU ranks with gloo, Ray):
  - data prep on an allocation: a Ray head + a Ray worker started inside the job, `python -m data_prep ukb
    --ray-address` pointed at it, every file written, no Ray process of the job left afterwards (its output is
    the dataset of the pretraining tests; without SLURM it runs through the local executor instead);
  - a 2-task pretraining job (gloo) that completes and leaves checkpoints/latest, and `status` / `logs`;
  - requeue + resume: the same run interrupted by SLURM's pre-timeout signal (SIGUSR2, what `--signal` sends
    before the time limit and what preemption sends) saves, requeues itself with `scontrol requeue`, resumes and
    ends with the same final step, the same loss at every step (none logged twice) and the same weights;
  - `cancel`, and `--cluster local` (submitit's local executor, 2 tasks).
SLURM tests need the one-node cluster of cluster/local_slurm.sh (`bash cluster/local_slurm.sh start`) and skip
with the reason when no controller answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/vita_stage1_tiny.yaml"
LOCAL_CPU = ROOT / "configs/cluster/local_cpu.yaml"
# N steps of 8 samples, a checkpoint only at the end (or on a signal). ~15 steps/s here: 60 leaves the requeue test
# ~3 s between the test's signal and the end of the run (30 left ~1 s, too close on a loaded machine).
N = 60
STEPS = [f"train.epochs={N // 2}", "train.samples_per_epoch=16", "checkpoint.every_steps=1000"]
CPU_JOB = ["--slurm-config", str(LOCAL_CPU), "--partition", "debug", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--time", "15"]


# ------------------------------------------------------------------------------------------------ helpers
from conftest import need_slurm as _need_slurm  # noqa: E402
from conftest import slurm_problem as _cluster_problem  # noqa: E402

pytestmark = pytest.mark.slow  # not in `make test-fast`


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "SUBMITIT_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    return env


def _cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n" \
                                f"{res.stderr[-4000:]}"
    return res.stdout


def _job_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split(" job ")[1].split()[0]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _rows_logged(run_dir: Path) -> int:
    """Complete lines of a metrics.jsonl that is being written (0 before it exists)."""
    p = run_dir / "metrics.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


def _submit_training(tmp_path: Path, name: str, dataset: Path, *overrides: str, rows: int = 2):
    """Submit a 2-task CPU pretraining job on SLURM and wait until it has logged `rows` steps; returns (job id,
    JobRecord, run directory). The caller interrupts it and `scancel`s it in a `finally`."""
    from cluster.launch import JobRecord, scontrol_job

    run = tmp_path / "run"
    out = _ok(_cli("submit", "pretrain", "--config", TINY, *CPU_JOB, "--folder", tmp_path / "jobs", "--name", name,
                   f"checkpoint.dir={run}", f"data.dataset={dataset}", *overrides))
    jid = _job_id(out)
    rec = JobRecord.load(tmp_path / "jobs" / "pretrain" / name)
    try:
        deadline = time.time() + 240
        while _rows_logged(run) < rows:
            assert time.time() < deadline, f"job {jid} did not start training: {scontrol_job(jid)}"
            time.sleep(0.3)
    except BaseException:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30)
        raise
    return jid, rec, run


def _ray_leftovers(job_id: str) -> list[int]:
    from cluster.jobs import ray_processes

    return ray_processes(job_id)


# ---------------------------------------------------------------------------------------------------- unit
def test_time_notation():
    from cluster.config import time_minutes

    from cluster.config import format_minutes

    # exactly as sbatch reads --time: MINUTES:SECONDS, not hours:minutes
    assert time_minutes("90") == 90 and time_minutes("30:00") == 30 and time_minutes("1:30:00") == 90
    assert time_minutes("1:30") == 2 and time_minutes("0:00:30") == 1 and time_minutes("2-12") == 2 * 1440 + 720
    assert time_minutes("1-00:30:00") == 1440 + 30 and time_minutes("2-00") == 2880
    assert format_minutes(90) == "1 h 30 min" and format_minutes(2880) == "2 d 0 h 0 min" and format_minutes(7) == \
        "7 min"
    for bad in ("", "1h", "1:2:3:4", "0"):
        with pytest.raises(ValueError):
            time_minutes(bad)


def test_flags_and_overrides_map_to_the_cluster_config():
    from cluster.__main__ import build_parser, slurm_config, split_overrides
    from core.config import ConfigError

    args = build_parser().parse_args(
        ["submit", "pretrain", "--config", str(TINY),
         "--slurm-config", str(ROOT / "configs/cluster/slurm_multinode.yaml"),
         "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1:30:00", "--account", "acc",
         "--qos", "high", "--constraint", "h100", "--max-requeues", "5", "--signal-delay", "300", "--name", "x",
         "optim.lr=1e-3", "slurm.env={NCCL_DEBUG: INFO}", "slurm.setup=['module load cuda']", "slurm.exclusive=true"])
    job, slurm = split_overrides(args.overrides)
    assert job == ["optim.lr=1e-3"] and len(slurm) == 3
    cfg = slurm_config(args, "pretrain", slurm)
    assert (cfg.nodes, cfg.gpus_per_node, cfg.ntasks_per_node, cfg.cpus_per_task) == (4, 8, 8, 8)
    assert (cfg.partition, cfg.account, cfg.qos, cfg.constraint, cfg.time_min) == ("gpu", "acc", "high", "h100", 90)
    assert (cfg.max_requeues, cfg.signal_delay_s, cfg.name, cfg.exclusive) == (5, 300, "x", True)
    assert cfg.env == {"NCCL_DEBUG": "INFO"} and cfg.setup == ["module load cuda"]
    assert cfg.root == Path("runs/slurm")  # the YAML's legacy runs/slurm/%j

    # job kinds: fine-tuning is one task on one GPU, data prep one CPU Ray node per SLURM node; flags still win
    args = build_parser().parse_args(["submit", "finetune"])
    ft = slurm_config(args, "finetune", [])
    assert (ft.nodes, ft.ntasks_per_node, ft.gpus_per_node) == (1, 1, 1)
    args = build_parser().parse_args(["submit", "data_prep", "ukb", "--nodes", "3", "--cpus-per-task", "32"])
    dp = slurm_config(args, "data_prep", [])
    assert (dp.nodes, dp.ntasks_per_node, dp.gpus_per_node, dp.cpus_per_task) == (3, 1, 0, 32)
    with pytest.raises(ConfigError, match="one task on one GPU"):
        slurm_config(build_parser().parse_args(["submit", "finetune", "--nodes", "2"]), "finetune", [])
    with pytest.raises(ConfigError, match="Did you mean 'max_requeues'"):
        slurm_config(build_parser().parse_args(["submit", "pretrain"]), "pretrain", ["max_requeue=3"])
    with pytest.raises(ConfigError, match="signal_delay_s"):
        slurm_config(build_parser().parse_args(["submit", "pretrain", "--time", "2"]), "pretrain", [])


def test_sweep_expansion():
    from cluster.submit import expand_sweep, sweep_tag
    from core.config import ConfigError

    points = expand_sweep(["task.name=phenotypes,diseases", "seed=0,1"])
    assert points == [["task.name=phenotypes", "seed=0"], ["task.name=phenotypes", "seed=1"],
                      ["task.name=diseases", "seed=0"], ["task.name=diseases", "seed=1"]]
    assert sweep_tag(points[1]) == "task.name-phenotypes_seed-1"
    assert expand_sweep(["model.patch=[5,8,8],[5,16,16]", "optim.lr=1e-3"]) == [
        ["model.patch=[5,8,8]", "optim.lr=1e-3"], ["model.patch=[5,16,16]", "optim.lr=1e-3"]]
    assert sweep_tag(["model.patch=[5,8,8]"]) == "model.patch-5-8-8"
    assert expand_sweep([]) == [[]]
    for bad in (["seed"], ["seed=0,,1"], ["seed=0", "seed=1"], ["=1"]):
        with pytest.raises(ConfigError):
            expand_sweep(bad)


def test_sbatch_script(tmp_path):
    from cluster.config import SlurmConfig
    from cluster.launch import env_for, sbatch_script, setup_lines

    cfg = SlurmConfig(cluster="slurm", nodes=2, gpus_per_node=4, cpus_per_task=12, mem_gb=200, time="1:30:00",
                      partition="gpu", account="acc", qos="high", constraint="h100", signal_delay_s=150,
                      env={"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0"}, setup=["module load cuda/12.4"])
    text = sbatch_script(cfg, tmp_path / "job", "cmrfm-pretrain", setup_lines(cfg, env_for(cfg, "pretrain")))
    lines = set(text.splitlines())
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
            "#SBATCH --cpus-per-task=12", "#SBATCH --mem=200GB", "#SBATCH --time=90", "#SBATCH --signal=USR2@150",
            "#SBATCH --partition=gpu", "#SBATCH --account=acc", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
            "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --job-name=cmrfm-pretrain",
            "export NCCL_DEBUG=INFO", "export NCCL_SOCKET_IFNAME=ib0", "export OMP_NUM_THREADS=12",
            "module load cuda/12.4"} <= lines, text
    assert f"#SBATCH --output={tmp_path / 'job'}/%j_0_log.out" in lines
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "%j_%t_log.out" in srun and "-m submitit.core._submit" in srun
    assert "DS_ACCELERATOR" not in text  # GPUs: NCCL

    cpu = SlurmConfig(cluster="slurm", gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, time="20")
    text = sbatch_script(cpu, tmp_path / "job", "x", setup_lines(cpu, env_for(cpu, "pretrain")), array=3)
    assert "#SBATCH --ntasks-per-node=2" in text and "--gpus-per-node" not in text
    assert "export DS_ACCELERATOR=cpu" in text and "#SBATCH --array=0-2%3" in text and "%A_%a_%t_log.out" in text


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    jobs = tmp_path / "jobs"
    args = ("submit", "pretrain", "--config", TINY, "--dry-run", "--cluster", "slurm", "--nodes", "2",
            "--gpus-per-node", "4", "--partition", "gpu", "--time", "2:00:00", "--account", "acc", "--qos", "q",
            "--constraint", "a100", "--folder", jobs, f"checkpoint.dir={tmp_path / 'run'}",
            "train.global_batch=16", "slurm.env={NCCL_DEBUG: WARN}", f"data.dataset={tmp_path / 'nodata'}")
    res = _cli(*args)  # checked before anything is queued: the dataset does not exist
    assert res.returncode == 2 and res.stderr.strip() == (f"config error: data.dataset: {tmp_path / 'nodata'} does "
                                                          "not exist (convert one first: python -m data_prep "
                                                          "ukb|kspace|sax --out DIR)"), res.stderr
    out = _ok(_cli(*args, "--skip-checks"))  # a job chained after the conversion that writes it
    assert out.startswith("#!/bin/bash")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@120", "--partition=gpu",
                 "--account=acc", "--qos=q", "--constraint=a100", "--time=120", "#SBATCH --requeue",
                 "export NCCL_DEBUG=WARN"):
        assert flag in out, flag
    assert not jobs.exists() and not (tmp_path / "run").exists()  # nothing written, nothing submitted

    res = _cli("submit", "finetune", "--config", ROOT / "configs/finetune/tiny.yaml", "--dry-run", "--cluster",
               "slurm", "--folder", jobs, "--sweep", "task.name=phenotypes,diseases", "--sweep", "seed=0,1",
               f"out={tmp_path / 'ft'}")
    assert "#SBATCH --array=0-3%4" in _ok(res) and "#SBATCH --gpus-per-node=1" in res.stdout
    assert f"-> out={tmp_path / 'ft'}/task.name-diseases_seed-1" in res.stderr
    assert "note: --time" not in res.stderr
    res = _cli("submit", "finetune", "--config", ROOT / "configs/finetune/tiny.yaml", "--dry-run", "--cluster",
               "slurm", "--folder", jobs, "--time", "30:00", f"out={tmp_path / 'ft'}")
    assert "#SBATCH --time=30" in _ok(res)  # sbatch's reading, kept, and said in words with the hours form
    assert "note: --time 30:00 is 30 min (sbatch reads MM:SS); 30 hours is 30:00:00" in res.stderr
    res = _cli("submit", "data_prep", "kspace", "--src", tmp_path, "--out", tmp_path / "k", "--dry-run", "--cluster",
               "slurm", "--nodes", "4", "--cpus-per-task", "16", "--folder", jobs)
    assert "#SBATCH --nodes=4" in _ok(res) and "#SBATCH --ntasks-per-node=1" in res.stdout
    assert "--gpus-per-node" not in res.stdout and not jobs.exists()
    res = _cli("submit", "data_prep", "ukb", "--src", tmp_path / "missing", "--dry-run", "--cluster", "slurm")
    assert res.returncode == 2 and "missing: no such file or directory" in res.stderr

    # the world size must divide the global batch; unknown keys fail before anything is submitted
    res = _cli("submit", "pretrain", "--config", TINY, "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "3")
    assert res.returncode == 2 and "global_batch 8 is not a multiple" in res.stderr
    res = _cli("submit", "pretrain", "--config", TINY, "--dry-run", "optim.lrr=1")
    assert res.returncode == 2 and "Did you mean 'optim.lr'" in res.stderr


@pytest.mark.slurm
def test_an_sbatch_refusal_is_one_line_with_slurms_reason(tmp_path):
    _need_slurm()
    res = _cli("submit", "pretrain", "--config", TINY, *CPU_JOB, "--partition", "nosuch", "--folder",
               tmp_path / "jobs", "--skip-checks", f"checkpoint.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and res.stderr.strip() == ("config error: sbatch refused the job: Batch job "
                                                          "submission failed: Invalid partition name specified"), \
        res.stderr


# ------------------------------------------------------------------------------------- data prep (Ray on a job)
@pytest.fixture(scope="module")
def ukb_job(tiny_cohort, tmp_path_factory):
    """The tiny cohort converted by `python -m cluster submit data_prep ukb` at the tiny model's crop size: a job of
    2 tasks (Ray head + Ray worker) on SLURM, or through the local executor when there is no SLURM here."""
    if os.environ.get("CMRFM_REQUIRE_SLURM"):
        _need_slurm()
    executor = "slurm" if _cluster_problem() is None else "local"
    tmp = tmp_path_factory.mktemp("cluster_ukb")
    t0 = time.time()
    res = _cli("submit", "data_prep", "ukb", "--src", tiny_cohort / "ukb", "--tabular", tiny_cohort / "ukb_tabular.csv",
               "--out", tmp / "ukb", "--slurm-config", LOCAL_CPU, "--cluster", executor, "--partition", "debug",
               "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "15", "--folder", tmp / "jobs",
               "--name", "ukb", "--wait", "--wait-timeout", "300", "preprocess.sa_planes=3", "preprocess.crop=32",
               "job.block_size=1", "job.val_fraction=0.0", "job.test_fraction=0.0", timeout=400)
    out = _ok(res)
    return SimpleNamespace(executor=executor, out=tmp / "ukb", folder=tmp / "jobs" / "data_prep" / "ukb",
                           stdout=out, job_id=_job_id(out), seconds=time.time() - t0)


@pytest.mark.slurm
def test_data_prep_runs_on_a_ray_cluster_inside_the_job(ukb_job):
    _need_slurm()
    assert ukb_job.executor == "slurm"
    manifest = json.loads((ukb_job.out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 4 and manifest["counts"]["quarantined"] == 0
    assert len(list((ukb_job.out / "shards").glob("*.tar"))) == 4 and (ukb_job.out / "store.zarr").is_dir()
    folder = ukb_job.folder
    assert (folder / "run_dir.txt").read_text().strip() == str(ukb_job.out)
    names = {p.name for p in folder.iterdir()}
    assert {"config.yaml", "cluster.yaml", "job.json", f"{ukb_job.job_id}_submission.sh"} <= names
    log0 = (folder / f"{ukb_job.job_id}_0_log.out").read_text()
    log1 = (folder / f"{ukb_job.job_id}_1_log.out").read_text()
    assert "Ray head up at 127.0.0.1:" in log0 and "--ray-address 127.0.0.1:" in log0
    assert "Ray cluster: 2 node(s), 2 CPUs" in log0  # the worker started by task 1 joined the head
    assert "joined the Ray cluster" in log1
    assert "ukb: inputs 4 = written 4" in log0  # the conversion's own summary
    assert "Ray node stopped (0 processes left)" in log0 and "Ray node stopped (0 processes left)" in log1
    assert _ray_leftovers(ukb_job.job_id) == []  # nothing of this job's Ray cluster is left on the node
    assert not list(Path("/tmp").glob(f"cmrfm-ray-{ukb_job.job_id}-*"))
    print(f"data prep job {ukb_job.job_id}: {ukb_job.seconds:.1f}s from submission to result")


# ------------------------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def run_a(ukb_job, tmp_path_factory):
    """An uninterrupted 2-task CPU pretraining job on SLURM, submitted and waited for by the CLI."""
    _need_slurm()
    tmp = tmp_path_factory.mktemp("cluster_run_a")
    t0 = time.time()
    res = _cli("submit", "pretrain", "--config", TINY, *CPU_JOB, "--folder", tmp / "jobs", "--name", "a", "--wait",
               "--wait-timeout", "300", f"checkpoint.dir={tmp / 'run'}", f"data.dataset={ukb_job.out}", *STEPS,
               timeout=400)
    out = _ok(res)
    return SimpleNamespace(run=tmp / "run", folder=tmp / "jobs" / "pretrain" / "a", jobs=tmp / "jobs",
                           stdout=out, job_id=_job_id(out), seconds=time.time() - t0)


@pytest.mark.slurm
def test_two_task_pretraining_job_completes_with_a_checkpoint(run_a):
    from pretrain.checkpoint import latest_tag

    assert latest_tag(run_a.run / "checkpoints") == f"step{N:08d}"
    jid = run_a.job_id
    for rank in (0, 1):
        assert f'{jid} task {rank}: {{"step": {N}, "samples": {N * 8}, "stopped": null, "rank": {rank}' in run_a.stdout
    folder = run_a.folder
    assert {f"{jid}_submission.sh", f"{jid}_0_log.out", f"{jid}_1_log.out", f"{jid}_0_log.err", f"{jid}_1_log.err",
            "config.yaml", "cluster.yaml", "run_dir.txt", "job.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "run_dir.txt").read_text().strip() == str(run_a.run)
    assert f"dir: {run_a.run}" in (folder / "config.yaml").read_text()
    assert "#SBATCH --ntasks-per-node=2" in (folder / f"{jid}_submission.sh").read_text()
    assert "time limit 15 min)" in run_a.stdout  # what --time 15 means, echoed at submission
    log = (folder / f"{jid}_0_log.out").read_text()
    assert "[pretrain] srun: world 2, device cpu" in log and f"step {N}/{N}" in log  # rank/world from SLURM, gloo

    st = _ok(_cli("status", jid, "--folder", run_a.jobs))  # by job id, looked up under the job folder root
    assert f"job {jid} (pretrain, slurm)" in st and "finished (2/2 task results)" in st
    assert f"latest checkpoint step{N:08d}; last logged step {N}" in st
    res = _cli("logs", folder, "--task", "1", "-n", "5")
    assert "Exiting after successful completion" in _ok(res)
    print(f"pretraining job {jid}: {run_a.seconds:.1f}s from submission to result")


@pytest.mark.slurm
def test_requeued_job_resumes_to_the_same_final_state(run_a, ukb_job, tmp_path):
    """SIGUSR2 mid-run (what SLURM sends `signal_delay_s` before the time limit, and on preemption): the trainer
    saves at the next step multiple of 10, the job requeues itself, the next run resumes from that checkpoint.
    The ranks hold after step 10 until the signal (CMRFM_HOLD_AT_STEP), so it lands there on any machine."""
    from cluster.launch import scontrol_job, wait
    from pretrain.export import consolidated_state_dict

    t0 = time.time()
    release = tmp_path / "release"
    jid, rec, run = _submit_training(tmp_path, "b", ukb_job.out, *STEPS,
                                     f"slurm.env={{CMRFM_HOLD_AT_STEP: '10:{release}'}}", rows=10)
    try:
        t_sig = time.time()
        subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
        time.sleep(3)
        release.touch()  # a rank the signal missed goes on to the check, where the others' signal reaches it
        results = wait(rec, timeout_s=300)[jid]
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30)
    t_end = time.time()
    requeues = [json.loads(line) for line in (rec.folder / "requeues.jsonl").read_text().splitlines()]
    assert len(requeues) == 1 and requeues[0]["signal"] == "SIGUSR2" and requeues[0]["step"] == 10, requeues
    assert [r["step"] for r in results] == [N, N] and [r["restarts"] for r in results] == [1, 1], results
    assert all(r["stopped"] is None for r in results)  # the result of the last run
    info = scontrol_job(jid)
    if info:  # still in slurmctld's memory (MinJobAge=60)
        assert info["Restarts"] == "1" and info["JobState"] in ("COMPLETED", "COMPLETING"), info
    log = (rec.folder / f"{jid}_0_log.out").read_text()
    assert f"SIGUSR2: checkpoint saved at step {requeues[0]['step']}" in log
    assert f"resumed from step{requeues[0]['step']:08d} at step {requeues[0]['step']}" in log

    rows_b = [r for r in _metrics(run) if r.get("split", "train") == "train"]
    assert [r["step"] for r in rows_b] == list(range(1, N + 1))  # no step lost, none ran twice
    rows_a = {r["step"]: r for r in _metrics(run_a.run)}
    keys = ("loss", "psnr", "lr", "grad_norm", "samples")
    for r in rows_b:
        assert [r[k] for k in keys] == [rows_a[r["step"]][k] for k in keys], r["step"]
    wa = consolidated_state_dict(run_a.run / "checkpoints", f"step{N:08d}")
    wb = consolidated_state_dict(run / "checkpoints", f"step{N:08d}")
    import torch

    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"job {jid}: USR2 {t_sig - t0:.1f}s after submission, stopped at step {requeues[0]['step']}, "
          f"requeued, finished {t_end - t_sig:.1f}s after the signal")


@pytest.mark.slurm
def test_external_requeue_is_recorded_and_resumes_exactly(run_a, ukb_job, tmp_path):
    """`scontrol requeue` from outside (an operator, a preemption): SLURM stops the job and brings it back; the
    next run records the requeue in requeues.jsonl (and `cluster status` shows it) and resumes bit for bit.
    The ranks hold after step 2 (CMRFM_HOLD_AT_STEP) until the requeue has been issued, so it lands mid-run on any
    machine; the release file lets the requeued run through."""
    from cluster.launch import wait

    release = tmp_path / "release"
    jid, rec, run = _submit_training(tmp_path, "e", ukb_job.out, *STEPS,
                                     f"slurm.env={{CMRFM_HOLD_AT_STEP: '2:{release}'}}", rows=2)
    try:
        subprocess.run(["scontrol", "requeue", jid], check=True, timeout=30)
        release.touch()
        results = wait(rec, timeout_s=400)[jid]
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30)
    requeues = [json.loads(line) for line in (rec.folder / "requeues.jsonl").read_text().splitlines()]
    assert len(requeues) == 1 and requeues[0]["external"] and requeues[0]["job_id"] == jid, requeues
    assert [r["step"] for r in results] == [N, N] and [r["restarts"] for r in results] == [1, 1], results
    st = _ok(_cli("status", jid, "--folder", tmp_path / "jobs"))
    assert "requeued 1x" in st and "external" in st, st
    rows_b = [r for r in _metrics(run) if r.get("split", "train") == "train"]
    assert sorted({r["step"] for r in rows_b}) == list(range(1, N + 1))
    rows_a = {r["step"]: r for r in _metrics(run_a.run)}
    last = {r["step"]: r for r in rows_b}  # a step re-run after the resume point was logged twice: the last counts
    assert all(last[s]["loss"] == rows_a[s]["loss"] for s in last)


@pytest.mark.slurm
def test_cancel_mid_training_does_not_requeue(ukb_job, tmp_path):
    """`scancel` sends SIGTERM: the trainer saves at its next 10-step check, but a cancelled job must not requeue
    itself (`scontrol requeue` would happily bring a cancelled job back)."""
    from cluster.launch import JobFailed, scontrol_job, wait

    _need_slurm()
    # no DataLoader workers for SIGTERM to kill: the trainer itself stops
    jid, rec, run = _submit_training(tmp_path, "c", ukb_job.out, "train.epochs=1000", "data.workers=0", rows=1)
    try:
        assert f"cancelled SLURM job {jid}" in _ok(_cli("cancel", jid, "--folder", tmp_path / "jobs"))
        with pytest.raises(JobFailed, match=f"job {jid} ended \\(CANCELLED"):
            wait(rec, timeout_s=60, grace_s=10)  # requeued, it would be PENDING again after KillWait (5 s)
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30)
    info = scontrol_job(jid)
    assert not info or (info["JobState"] == "CANCELLED" and info["Restarts"] == "0"), info
    assert not (rec.folder / "requeues.jsonl").exists()
    st = json.loads(_ok(_cli("status", rec.folder, "--json")))
    assert st["elements"][jid]["state"] in ("CANCELLED", None)
    log = (rec.folder / f"{jid}_0_log.out").read_text()
    said = [line for line in log.splitlines() if "SIGTERM" in line or "requeue" in line]
    if any("checkpoint saved" in line for line in said):  # the trainer reached its check within KillWait
        assert any("not requeued: the job is" in line for line in said), said
    print("cancelled mid-training:", said)


def test_local_executor_runs_two_ranks(ukb_job, tmp_path):
    """`--cluster local`: submitit's local executor on this machine, the same job code (2 ranks, gloo)."""
    from pretrain.checkpoint import latest_tag

    t0 = time.time()
    out = _ok(_cli("submit", "pretrain", "--config", TINY, "--cluster", "local", "--gpus-per-node", "0",
                   "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--folder", tmp_path / "jobs",
                   "--name", "l", "--wait", "--wait-timeout", "300", f"checkpoint.dir={tmp_path / 'run'}",
                   f"data.dataset={ukb_job.out}", "train.epochs=2", "train.samples_per_epoch=16", timeout=400))
    jid = _job_id(out)
    assert f"submitted pretrain job {jid} (local, 2 task(s), time limit 10 min)" in out
    for rank in (0, 1):
        assert f'{jid} task {rank}: {{"step": 4, "samples": 32, "stopped": null, "rank": {rank}' in out
    assert latest_tag(tmp_path / "run" / "checkpoints") == "step00000004"
    log = (tmp_path / "jobs" / "pretrain" / "l" / f"{jid}_0_log.out").read_text()
    assert "world 2, device cpu" in log
    print(f"local job {jid}: {time.time() - t0:.1f}s")


@pytest.mark.slurm
@pytest.mark.skipif(os.environ.get("CMRFM_SLURM_TIMELIMIT") != "1",
                    reason="~3 min: a real time limit (set CMRFM_SLURM_TIMELIMIT=1 to run it)")
def test_time_limit_signal_checkpoints_requeues_and_resumes(ukb_job, tmp_path):
    """No test-side signal: SLURM itself sends SIGUSR2 `signal_delay_s` before `--time`. With --time 3 and a 120 s
    lead the signal comes 30-60 s into the job (slurmctld checks limits every 30 s); the trainer saves, the job
    requeues itself; the test then lifts the pending job's limit so that the second run can finish."""
    from cluster.launch import JobRecord, scontrol_job, wait

    _need_slurm()
    run = tmp_path / "run"
    # 1800 steps: ~120 s of training on the 2-core machine, so the run is still going when the signal comes (30-60 s
    # in) however quick the start-up; 600 steps (~40 s) could finish before it, and once did on CI.
    total = 1800
    steps = [f"train.epochs={total // 2}", "train.samples_per_epoch=16", "checkpoint.every_steps=100000",
             "train.log_every=10"]
    out = _ok(_cli("submit", "pretrain", "--config", TINY, *CPU_JOB[:-2], "--time", "3", "--signal-delay", "120",
                   "--folder", tmp_path / "jobs", "--name", "t", f"checkpoint.dir={run}",
                   f"data.dataset={ukb_job.out}", *steps))
    jid = _job_id(out)
    rec = JobRecord.load(tmp_path / "jobs" / "pretrain" / "t")
    requeues = rec.folder / "requeues.jsonl"
    t0 = time.time()
    try:
        while not requeues.exists():
            done = sorted(p.name for p in rec.folder.glob(f"{jid}_*_result.pkl"))
            assert not done and time.time() - t0 < 200, (
                f"no requeue after {time.time() - t0:.0f}s (results: {done}): {scontrol_job(jid)}\n"
                + "".join(p.read_text()[-2000:] for p in sorted(rec.folder.glob(f"{jid}_0_log.*"))))
            time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=15"], check=True, timeout=30)
        results = wait(rec, timeout_s=400)[jid]
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30)
    first = json.loads(requeues.read_text().splitlines()[0])
    assert first["signal"] == "SIGUSR2" and first["step"] % 10 == 0 and 0 < first["step"] < total, first
    assert [r["step"] for r in results] == [total, total] and results[0]["restarts"] >= 1, results
    logged = [r["step"] for r in _metrics(run)]
    assert logged == list(range(10, total + 1, 10)), logged  # none lost, none twice
    print(f"job {jid}: SIGUSR2 from SLURM, checkpoint at step {first['step']}, requeued, done after "
          f"{time.time() - t0:.0f}s")
