"""Multi-node for real: the two-node SLURM cluster of cluster/local_slurm_two_nodes.sh (each node a slurmd in its own
network namespace with its own address; the tasks of a job reach each other only over that network, by node name).

- a conversion with the Ray head on one node and a worker on the other, both converting blocks;
- a 2-node pretraining job (one rank per node, DeepSpeed on gloo across the nodes) equal to the one-node run bit
  for bit (every step's loss, the final weights);
- the same job signalled from outside (SIGUSR2: SLURM's pre-timeout signal, preemption), requeued and resumed, to
  the same final state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/vita_stage1_tiny.yaml"
LOCAL_CPU = ROOT / "configs/cluster/local_cpu.yaml"
CONF = Path("/etc/slurm-two-nodes/slurm.conf")
N = 30
STEPS = [f"train.epochs={N // 2}", "train.samples_per_epoch=16", "checkpoint.every_steps=1000"]
TWO_NODES = ["--slurm-config", str(LOCAL_CPU), "--partition", "two", "--nodes", "2", "--tasks-per-node", "1",
             "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "SUBMITIT_"))}
    return {**env, "SLURM_CONF": str(CONF), "PYTHONPATH": str(ROOT)}


def _problem() -> str | None:
    if not CONF.is_file():
        return f"{CONF}: no two-node cluster (start one with `bash cluster/local_slurm_two_nodes.sh start`)"
    res = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mixed,allocated,completing", "-o", "%N"],
                         capture_output=True, text=True, timeout=20, env=_env())
    nodes = set(res.stdout.split())
    return None if len(nodes) == 2 else f"the two-node cluster does not answer with 2 usable nodes: {res.stdout!r}"


@pytest.fixture(autouse=True)
def _need_two_nodes():
    need_slurm()
    problem = _problem()
    if problem and os.environ.get("CMRFM_REQUIRE_SLURM"):
        pytest.fail(f"SLURM is required here (CMRFM_REQUIRE_SLURM) but {problem}")
    if problem:
        pytest.skip(problem)
    yield
    # nothing of a failed test keeps the two nodes busy (this cluster runs only these tests' jobs)
    subprocess.run(["scancel", "--partition", "two"], capture_output=True, timeout=30, env=_env())


def _cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _job_id(out: str) -> str:
    return out.split("submitted ")[1].split(" job ")[1].split(" ")[0]


def _metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("split", "train") == "train"}


@pytest.fixture(scope="module")
def dataset_two_nodes(tiny_cohort, tmp_path_factory):
    """The tiny cohort converted by a Ray cluster over both nodes (head on the first, a worker on the second)."""
    tmp = tmp_path_factory.mktemp("two_ukb")
    out = _ok(_cli("submit", "data_prep", "ukb", "--src", tiny_cohort / "ukb", "--tabular",
                   tiny_cohort / "ukb_tabular.csv", "--out", tmp / "ukb", *TWO_NODES, "--folder", tmp / "jobs",
                   "--name", "ukb", "--wait", "--wait-timeout", "400", "preprocess.sa_planes=3", "preprocess.crop=32",
                   "job.block_size=1", "job.val_fraction=0.0", "job.test_fraction=0.0", timeout=500))
    return tmp, _job_id(out)


def test_conversion_runs_on_a_ray_cluster_over_two_nodes(dataset_two_nodes):
    tmp, jid = dataset_two_nodes
    folder = tmp / "jobs" / "data_prep" / "ukb"
    log0, log1 = ((folder / f"{jid}_{t}_log.out").read_text() for t in (0, 1))
    assert "Ray head up at 10.77.0.1:" in log0 and "Ray cluster: 2 node(s), 2 CPUs" in log0, log0[-3000:]
    assert "joined the Ray cluster at 10.77.0.1:" in log1, log1[-3000:]
    assert "ukb: inputs 4 = written 4" in log0
    # both machines converted blocks (4 blocks of one subject, one CPU per node)
    line = next(x for x in log0.splitlines() if "blocks per node:" in x)
    assert "10.77.0.1" in line and "10.77.0.2" in line, line
    assert len(list((tmp / "ukb" / "shards").glob("*.tar"))) == 4


def _reference(dataset: Path, run: Path) -> None:
    """The same run on one machine: 2 ranks under torchrun."""
    env = {**_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "pretrain", "train", "--config", str(TINY), f"checkpoint.dir={run}",
                          f"data.dataset={dataset}", *STEPS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, start_new_session=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _same_run(a: Path, b: Path) -> None:
    import torch

    from pretrain.export import consolidated_state_dict

    ma, mb = _metrics(a), _metrics(b)
    assert sorted(mb) == list(range(1, N + 1))
    for step in ma:
        assert [ma[step][k] for k in ("loss", "psnr", "grad_norm", "samples")] == \
               [mb[step][k] for k in ("loss", "psnr", "grad_norm", "samples")], step
    wa = consolidated_state_dict(a / "checkpoints", f"step{N:08d}")
    wb = consolidated_state_dict(b / "checkpoints", f"step{N:08d}")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_node_pretraining_equals_one_node_and_resumes_after_a_requeue(dataset_two_nodes, tmp_path, monkeypatch):
    from cluster.launch import JobRecord, wait

    monkeypatch.setenv("SLURM_CONF", str(CONF))  # `wait` asks this cluster's scontrol
    data = dataset_two_nodes[0] / "ukb"
    _reference(data, tmp_path / "ref")

    # one rank per node, gloo across the nodes
    out = _ok(_cli("submit", "pretrain", "--config", TINY, *TWO_NODES, "--folder", tmp_path / "jobs", "--name", "a",
                   "--wait", "--wait-timeout", "400", f"checkpoint.dir={tmp_path / 'a'}", f"data.dataset={data}",
                   *STEPS, timeout=500))
    jid = _job_id(out)
    log0 = (tmp_path / "jobs" / "pretrain" / "a" / f"{jid}_0_log.out").read_text()
    log1 = (tmp_path / "jobs" / "pretrain" / "a" / f"{jid}_1_log.out").read_text()
    assert "[pretrain] srun: world 2, device cpu" in log0 and "rendezvous cmrfm-n1:" in log0 + log1
    _same_run(tmp_path / "ref", tmp_path / "a")

    # the same job: SIGUSR2 from outside at a known step (the ranks hold after step 10 until it comes), a
    # checkpoint, the job requeues itself, both nodes resume from the checkpoint
    release = tmp_path / "release"
    out = _ok(_cli("submit", "pretrain", "--config", TINY, *TWO_NODES, "--folder", tmp_path / "jobs", "--name", "b",
                   f"checkpoint.dir={tmp_path / 'b'}", f"data.dataset={data}", *STEPS,
                   f"slurm.env={{CMRFM_HOLD_AT_STEP: '10:{release}'}}"))
    jid = _job_id(out)
    rec = JobRecord.load(tmp_path / "jobs" / "pretrain" / "b")
    try:
        deadline = time.time() + 300
        while not (tmp_path / "b" / "metrics.jsonl").exists() or \
                len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) < 10:
            assert time.time() < deadline, "the two-node job did not reach step 10"
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30, env=_env())
        time.sleep(3)
        release.touch()
        results = wait(rec, timeout_s=400)[jid]
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=30, env=_env())
    requeues = [json.loads(x) for x in (rec.folder / "requeues.jsonl").read_text().splitlines()]
    assert len(requeues) == 1 and requeues[0]["step"] == 10 and requeues[0]["signal"] == "SIGUSR2", requeues
    assert [r["step"] for r in results] == [N, N] and [r["restarts"] for r in results] == [1, 1], results
    log0 = (rec.folder / f"{jid}_0_log.out").read_text()
    assert "resumed from step00000010 at step 10" in log0
    _same_run(tmp_path / "ref", tmp_path / "b")
