"""Real SLURM jobs through submitit, on the one-node cluster of cluster/local_slurm.sh.

Start the cluster first (root, Debian):  bash cluster/local_slurm.sh install && bash cluster/local_slurm.sh start
Without a cluster that answers (no `sinfo`, or `scontrol ping` fails) every test here is skipped.

The cluster has no accounting database, so `sacct` fails: submitit logs "Bypassing sacct error" and job.state
reads UNKNOWN; results and requeues are followed through submitit's files and `scontrol show job` instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The jobs unpickle the functions/classes below in a fresh interpreter where this test module is not importable
# (pytest put tests/ on its own sys.path only): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


from conftest import need_slurm  # noqa: E402


@pytest.fixture(autouse=True)
def _need_slurm():
    need_slurm()


def _scontrol_job(job_id: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}


def _wait_done(job, timeout_s: float):
    """job.result() but bounded: without sacct, submitit cannot tell a dead job from a running one."""
    deadline = time.time() + timeout_s
    while not job.done():
        if time.time() > deadline:
            info = _scontrol_job(job.job_id)
            logs = "\n".join(f"--- {p} ---\n{p.read_text()[-3000:]}" for p in sorted(job.paths.folder.glob("*"))
                             if p.suffix in (".out", ".err"))
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f}s; scontrol: {info}\n{logs}")
        time.sleep(1)
    return job


def _executor(folder: Path, **params):
    ex = submitit.AutoExecutor(folder=folder)
    assert ex.cluster == "slurm", f"submitit did not pick SLURM (got {ex.cluster})"
    ex.update_parameters(slurm_partition="debug", **params)
    return ex


# ----------------------------------------------------------------------------------------------------- (a)
def _whoami(x: int) -> dict:
    env = submitit.JobEnvironment()
    return {"x": x, "procid": int(os.environ["SLURM_PROCID"]), "global_rank": env.global_rank,
            "num_tasks": env.num_tasks, "job_id": env.job_id, "host": env.hostname}


def test_autoexecutor_two_tasks(tmp_path):
    ex = _executor(tmp_path, timeout_min=2, tasks_per_node=2, nodes=1, cpus_per_task=1, name="cmrfm-2tasks")
    t0 = time.time()
    job = ex.submit(_whoami, 7)
    results = _wait_done(job, 110).results()
    elapsed = time.time() - t0
    assert len(results) == 2, results
    assert sorted(r["procid"] for r in results) == [0, 1]
    assert all(r["global_rank"] == r["procid"] and r["num_tasks"] == 2 and r["x"] == 7 for r in results)
    assert {r["job_id"] for r in results} == {job.job_id}
    print(f"2-task job {job.job_id} done in {elapsed:.1f}s: {results}")


# ----------------------------------------------------------------------------------------------------- (b)
class _ResumeFromMarker(submitit.helpers.Checkpointable):
    """First run: writes a marker and sleeps (never finishes). After a requeue: sees the marker and returns."""

    def __init__(self, marker: str):
        self.marker = marker
        self.runs: list[str] = []  # carried over by Checkpointable.checkpoint (it pickles self)

    def __call__(self) -> dict:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        self.runs.append(restart)
        marker = Path(self.marker)
        if marker.exists():
            return {"first_run": marker.read_text(), "restart_count": int(restart), "runs": list(self.runs)}
        marker.write_text(f"written by job {os.environ['SLURM_JOB_ID']} (restart {restart})")
        time.sleep(600)  # interrupted by the test
        return {"error": "not interrupted"}


def test_checkpoint_requeue_on_interrupt(tmp_path):
    """job._interrupt() = what SLURM does on preemption (SIGTERM, then USR2 = submitit's checkpoint signal):
    submitit's handler calls checkpoint(), `scontrol requeue`s the job, and the second run resumes."""
    marker = tmp_path / "marker.txt"
    # a long time limit: only the test's signal may interrupt the first run (none from SLURM's own --signal)
    ex = _executor(tmp_path / "jobs", timeout_min=10, tasks_per_node=1, name="cmrfm-requeue")
    t0 = time.time()
    job = ex.submit(_ResumeFromMarker(str(marker)))
    deadline = time.time() + 90
    while not marker.exists():  # the first run is inside __call__: submitit's signal handlers are installed
        assert time.time() < deadline, f"job {job.job_id} never started: {_scontrol_job(job.job_id)}"
        time.sleep(0.5)
    time.sleep(1)
    t_int = time.time()
    job._interrupt()  # preemption (timeout=False): scancel --signal SIGTERM, then --signal USR2
    result = _wait_done(job, 150).result()
    t_end = time.time()
    info = _scontrol_job(job.job_id)
    assert result["first_run"].startswith(f"written by job {job.job_id} (restart 0)")
    assert result["restart_count"] >= 1, result
    assert result["runs"] == ["0", str(result["restart_count"])], result  # state of the first run was checkpointed
    if info:  # still in slurmctld's memory (MinJobAge=60)
        assert int(info["Restarts"]) >= 1, info
    print(f"job {job.job_id}: interrupted {t_int - t0:.1f}s after submission, resumed result {t_end - t_int:.1f}s "
          f"after the interrupt; {result}; scontrol Restarts={info.get('Restarts')}")


# ----------------------------------------------------------------------------------------------------- (c)
class _WaitForTimeoutSignal(submitit.helpers.Checkpointable):
    """Sleeps until SLURM itself sends submitit's USR2 (timeout_min=3 -> --signal=USR2@90); returns when requeued."""

    def __init__(self, marker: str):
        self.marker = marker
        self.started = 0.0

    def __call__(self) -> dict:
        if self.started:
            return {"signal_after_s": float(Path(self.marker).read_text()),
                    "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
        self.started = time.time()
        while True:
            time.sleep(0.5)

    def checkpoint(self, *args, **kwargs):
        Path(self.marker).write_text(f"{time.time() - self.started:.1f}")
        return super().checkpoint(*args, **kwargs)


def test_slurm_timeout_signal_checkpoints_and_requeues(tmp_path):
    """The real thing: no test-side signal. SLURM sends USR2 ahead of the time limit, submitit checkpoints and
    requeues, and the job finishes in its second run.

    timeout_min=3, not 2: slurmctld checks limits every 30 s and signals once less than signal_delay_s (90) + 30 s
    are left, so with 2 minutes the signal may come in the first second, before submitit installed its handler.
    With 3 it comes 60-90 s into the job."""
    marker = tmp_path / "signal_after_s.txt"
    ex = _executor(tmp_path / "jobs", timeout_min=3, tasks_per_node=1, name="cmrfm-timeout")
    t0 = time.time()
    job = ex.submit(_WaitForTimeoutSignal(str(marker)))
    result = _wait_done(job, 200).result()
    elapsed = time.time() - t0
    assert 0 < result["signal_after_s"] < 180 - 30, result  # well before the 3-minute limit
    assert result["restart_count"] >= 1, result
    print(f"job {job.job_id}: USR2 {result['signal_after_s']}s into the first run; result after {elapsed:.1f}s")
