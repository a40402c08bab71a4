"""What runs inside a submitted job: one submitit callable per job kind (`submitit.helpers.Checkpointable`).

Pretraining (`PretrainJob`): submitit starts one process per task (one per GPU, or N CPU tasks); each exports
the rendezvous (MASTER_ADDR = the first node, MASTER_PORT from the job id; RANK / WORLD_SIZE too under the local
executor, SLURM_PROCID / SLURM_NTASKS otherwise) and calls `pretrain.train.train(cfg)` in-process: DeepSpeed
with NCCL on GPUs, gloo on CPU (DS_ACCELERATOR=cpu). The trainer resumes from the run's latest complete
checkpoint (`checkpoint.resume: auto`) and installs its own SIGTERM / SIGUSR1 / SIGUSR2 handler: on SLURM's
pre-timeout signal (or preemption) every rank saves a sharded checkpoint at the next step multiple of 10 and
returns with `stopped` set. Then rank 0 requeues the job (`scontrol requeue`; the local executor: exit code 144)
unless it already ran `max_requeues` times, and every rank exits without a result, so what the job returns is
the result of its last run. The next run continues from that checkpoint: no step is lost and none runs twice.

Data prep (`DataPrepJob`): one task per node; the first starts a Ray head (`ray start --head --block`), the
others join it as workers, the first runs `python -m data_prep ukb|kspace --ray-address HEAD:PORT` on the
resolved config in the job folder, and every task tears down the Ray processes it started (and only those:
they carry CMRFM_RAY_JOB=<job id> in their environment), also on failure. A requeued run repeats the
conversion, which skips what is done.

Fine-tuning (`FinetuneJob`): one task, one GPU (or CPU), `python -m finetune train --config <resolved config>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import submitit

from core.net import free_port

REQUEUES = "requeues.jsonl"
RAY_MARK = "CMRFM_RAY_JOB"
LOCAL_REQUEUE_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE: its controller restarts the tasks


def _log(msg: str) -> None:
    print(f"[cluster] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _job_env() -> submitit.JobEnvironment:
    return submitit.JobEnvironment()


def restart_count(job_folder: Path, job_id: str) -> int:
    """How many times this job ran before: SLURM_RESTART_COUNT on SLURM, our requeue log locally."""
    if "SLURM_RESTART_COUNT" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return logged_requeues(job_folder, job_id)


def logged_requeues(job_folder: Path, job_id: str) -> int:
    """Lines of this job in requeues.jsonl."""
    log = Path(job_folder) / REQUEUES
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.strip() and json.loads(line).get("job_id") == job_id)


def master_port(job_id: str, configured: int = 0) -> int:
    """The same on every task of a job: 20000 + job id % 20000 (pretrain/dist.py's srun convention)."""
    if configured:
        return configured
    digits = re.sub(r"\D", "", os.environ.get("SLURM_JOB_ID") or job_id) or "0"
    return 20000 + int(digits) % 20000


def export_distributed_env(port: int = 0) -> dict[str, str]:
    """Rank, world size and rendezvous for `pretrain.dist` from submitit's job environment (SLURM or local)."""
    env = _job_env()
    addr = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    out = {"MASTER_ADDR": addr, "MASTER_PORT": str(master_port(env.job_id, port))}
    if env.cluster == "slurm":
        # pretrain.dist reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS itself (launcher "srun"); stale
        # torchrun variables inherited from the submitting shell must not win over them
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
    else:
        out.update({"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank),
                    "WORLD_SIZE": str(env.num_tasks), "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes))})
    os.environ.update(out)
    return out


def record_external_requeues(job_folder: Path, job_id: str, restarts: int, run_dir: Optional[Path]) -> int:
    """Rank 0 at the start of a run: SLURM counts every restart (SLURM_RESTART_COUNT) and the job logs the
    requeues it asked for; the difference was requeued from outside (`scontrol requeue`, preemption, a node
    failure). Each is recorded in requeues.jsonl with the checkpoint the run resumes from. Returns how many."""
    known = logged_requeues(job_folder, job_id)
    missing = max(0, restarts - known)
    pointer = Path(run_dir) / "checkpoints" / "latest" if run_dir else None
    tag = pointer.read_text().strip() if pointer is not None and pointer.is_file() else None
    step = int(tag[4:]) if tag and tag[4:].isdigit() else None
    if not missing:  # (the file's existence means "a requeue happened" to its readers)
        return 0
    with open(Path(job_folder) / REQUEUES, "a") as f:
        for k in range(missing):
            f.write(json.dumps({"job_id": job_id, "time": time.time(), "kind": "pretrain",
                                "restart": known + k, "step": step, "external": True,
                                "signal": "external (scontrol requeue, preemption or node failure)"}) + "\n")
    if missing:
        _log(f"job {job_id} was requeued from outside {missing}x; resuming from {tag or 'the start'}")
    return missing


def _requeue_self(job_folder: Path, record: dict) -> None:
    """Rank 0: put the job back in the queue (it restarts from the top, same job id)."""
    env = _job_env()
    with open(Path(job_folder) / REQUEUES, "a") as f:
        f.write(json.dumps({"job_id": env.job_id, "time": time.time(), **record}) + "\n")
    if env.cluster == "slurm":
        for attempt in range(3):
            res = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
            if res.returncode == 0:
                _log(f"requeued job {env.job_id}: run {record.get('restart', 0) + 2} of at most "
                     f"{record.get('max_requeues', 0) + 1} comes next")
                return
            _log(f"scontrol requeue {env.job_id} failed: {res.stderr.strip()}")
            time.sleep(2)
        raise RuntimeError(f"could not requeue job {env.job_id}: {res.stderr.strip()}")
    _log(f"requeued local job {env.job_id}")


def should_requeue(stopped: str) -> tuple[bool, str]:
    """After the trainer stopped on a signal: requeue, or not (and why not).

    SLURM: only while the job is still RUNNING -- the pre-timeout `--signal` or a preemption notice. `scancel`
    also sends SIGTERM, and a cancelled (COMPLETING) job would come back if requeued: `scontrol requeue` accepts
    finished jobs. Local executor: only on submitit's timeout signal (USR2)."""
    env = _job_env()
    if env.cluster == "slurm":
        try:
            res = subprocess.run(["scontrol", "show", "job", "-o", os.environ.get("SLURM_JOB_ID", env.job_id)],
                                 capture_output=True, text=True, timeout=60)
            state = (re.findall(r"JobState=(\S+)", res.stdout) or [""])[0]
        except (OSError, subprocess.TimeoutExpired):
            state = ""
        if state.startswith("REQUEUE"):
            return False, f"SLURM is requeueing it already ({state}: an external requeue or a preemption)"
        if state and state != "RUNNING":
            return False, (f"the job is {state}: cancelled or at its time limit, or requeued from outside (then "
                           "the next run records it in requeues.jsonl)")
        return True, ""
    if stopped == f"SIG{submitit.JobEnvironment.USR_SIG}":
        return True, ""
    return False, f"{stopped} is not the timeout signal SIG{submitit.JobEnvironment.USR_SIG}"


def _exit_for_requeue(requeue: bool = True) -> None:
    """Leave without a result (no result pickle: the job is not done); the local controller restarts on 144."""
    env = _job_env()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(LOCAL_REQUEUE_CODE if env.cluster == "local" and requeue else 0)


class PretrainJob(submitit.helpers.Checkpointable):
    """One task of a pretraining job; returns the trainer's {"step", "samples", "stopped"} plus who ran it."""

    def __init__(self, cfg: Any, job_folder: str, max_requeues: int, cpu: bool, env: Optional[dict] = None,
                 port: int = 0):
        self.cfg = cfg
        self.job_folder = str(job_folder)
        self.max_requeues = max_requeues
        self.cpu = cpu
        self.env = dict(env or {})
        self.port = port

    def __call__(self) -> dict:
        os.environ.update(self.env)
        if self.cpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        job = _job_env()
        dist_env = export_distributed_env(self.port)
        restarts = restart_count(Path(self.job_folder), job.job_id)
        if job.global_rank == 0 and _job_env().cluster == "slurm":
            record_external_requeues(Path(self.job_folder), job.job_id, restarts, Path(self.cfg.checkpoint.dir))
        _log(f"pretrain task {job.global_rank}/{job.num_tasks} of job {job.job_id} on {job.hostname} "
             f"(run {restarts + 1}, rendezvous {dist_env['MASTER_ADDR']}:{dist_env['MASTER_PORT']})")
        from pretrain.train import train

        result = dict(train(self.cfg))
        result.update(rank=job.global_rank, job_id=job.job_id, restarts=restarts, host=job.hostname)
        if not result.get("stopped"):
            return result
        # stopped by a signal, with a checkpoint of this step on disk; rank 0 decides for all (one scontrol call)
        import torch.distributed as dist

        decision = [should_requeue(result["stopped"]) if job.global_rank == 0 else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        requeue, why = decision[0]
        if requeue and restarts >= self.max_requeues:
            raise RuntimeError(f"stopped by {result['stopped']} at step {result['step']} after {restarts} requeues "
                               f"(max_requeues {self.max_requeues}): not requeued; the checkpoint is in "
                               f"{self.cfg.checkpoint.dir}, submit again to continue")
        failure = None
        if job.global_rank == 0:
            if requeue:
                try:
                    _requeue_self(Path(self.job_folder), {"kind": "pretrain", "restart": restarts,
                                                          "step": result["step"], "signal": result["stopped"],
                                                          "max_requeues": self.max_requeues})
                except Exception as e:  # still meet the others at the barrier, then fail
                    failure = e
            else:
                _log(f"stopped by {result['stopped']} at step {result['step']} (checkpoint saved); not requeued: {why}")
        if dist.is_initialized():
            dist.barrier()  # nobody leaves before rank 0 has requeued
        if failure is not None:
            raise failure
        _exit_for_requeue(requeue)
        return result  # not reached


class FinetuneJob(submitit.helpers.Checkpointable):
    """`python -m finetune train --config CONFIG` on one GPU (or CPU); a requeued run starts it again."""

    def __init__(self, config_path: str, env: Optional[dict] = None):
        self.config_path = str(config_path)
        self.env = dict(env or {})

    def __call__(self) -> dict:
        env = {**os.environ, **self.env}
        cmd = [sys.executable, "-m", "finetune", "train", "--config", self.config_path]
        _log("running " + " ".join(cmd))
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {rc}")
        return {"returncode": rc, "config": self.config_path}


# ------------------------------------------------------------------------------------------------ Ray on a job
def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def _head_ip(n_nodes: int) -> str:
    if os.environ.get("CMRFM_RAY_HEAD_IP"):
        return os.environ["CMRFM_RAY_HEAD_IP"]
    if n_nodes == 1:
        return "127.0.0.1"  # a one-node cluster keeps its traffic on the loopback interface
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = ""
    if not ip or ip.startswith("127."):
        from ray.util import get_node_ip_address  # the public API (ray._private is not)

        ip = get_node_ip_address()
    return ip


def ray_processes(mark: str) -> list[int]:
    """PIDs of the processes started for this job's Ray cluster on this node (found by their environment)."""
    needle = f"{RAY_MARK}={mark}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RayNode:
    """`ray start [--head] --block` as a child process; stop() ends it and every process it started."""

    def __init__(self, mark: str, temp_dir: Path, args: list[str], env: dict, log: Path):
        self.mark, self.temp_dir = mark, temp_dir
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir.mkdir(parents=True)
        self.log = open(log, "ab")
        cmd = [_ray_bin(), "start", *args, f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"]
        _log("starting " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env={**env, RAY_MARK: mark}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        ready = self.temp_dir / "ray_current_cluster"  # written by `ray start` once its node is up
        deadline = time.time() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}; see {self.log.name}")
            if time.time() > deadline:
                raise TimeoutError(f"Ray node not up after {timeout:.0f}s; see {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> int:
        """SIGTERM to `ray start --block` (its children share its fate), then whatever is left of ours."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = 0
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = ray_processes(self.mark)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + wait_s
            while any(_alive(p) for p in pids) and time.time() < deadline:
                time.sleep(0.2)
            left = sum(_alive(p) for p in pids)
            if not left:
                break
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        _log(f"Ray node stopped ({left} processes left)")
        return left


def _wait_for(path: Path, timeout: float, what: str, give_up: Optional[Path] = None) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if give_up is not None and give_up.exists():
            raise RuntimeError(f"gave up waiting for {what}: {give_up.read_text().strip()}")
        if time.time() > deadline:
            raise TimeoutError(f"{what} not there after {timeout:.0f}s ({path})")
        time.sleep(0.5)


_COUNT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
deadline = time.time() + float(sys.argv[3])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= int(sys.argv[2]) or time.time() > deadline:
        break
    time.sleep(0.5)
print(len(nodes), sum(n["Resources"].get("CPU", 0) for n in nodes))
"""


def _ray_nodes(address: str, expected: int, env: dict, timeout: float) -> tuple[int, float]:
    """(alive nodes, CPUs) of the Ray cluster, once `expected` nodes are up (fails after `timeout`)."""
    res = subprocess.run([sys.executable, "-c", _COUNT_NODES, address, str(expected), str(timeout)], env=env,
                         capture_output=True, text=True, timeout=timeout + 120)
    if res.returncode != 0:
        raise RuntimeError(f"could not query the Ray cluster at {address}:\n{res.stderr[-2000:]}")
    alive, cpus = res.stdout.split()[-2:]
    if int(alive) < expected:
        raise RuntimeError(f"only {alive} of {expected} Ray nodes joined the cluster at {address}")
    return int(alive), float(cpus)


class DataPrepJob(submitit.helpers.Checkpointable):
    """One task per node: a Ray cluster over the allocation, the conversion on the first node, then teardown."""

    def __init__(self, dataset: str, config_path: str, job_folder: str, cpus: int, gpus: int = 0,
                 ray_port: int = 0, env: Optional[dict] = None, join_timeout_s: float = 300):
        self.dataset = dataset
        self.config_path = str(config_path)
        self.job_folder = str(job_folder)
        self.cpus, self.gpus, self.ray_port = cpus, gpus, ray_port
        self.env = dict(env or {})
        self.join_timeout_s = join_timeout_s

    def __call__(self) -> dict:
        job = _job_env()
        rank, n = job.global_rank, job.num_tasks
        os.environ.update(self.env)
        restarts = restart_count(Path(self.job_folder), job.job_id)
        rdv = Path(self.job_folder) / "ray" / f"{job.job_id}.{restarts}"  # rendezvous files of this run
        rdv.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("RAY_AUTH_MODE", "disabled" if "RAY_AUTH_TOKEN" not in env else "token")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        temp = Path(os.environ.get("CMRFM_RAY_TMP", "/tmp")) / f"cmrfm-ray-{job.job_id}-{rank}"
        resources = [f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}"]
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port")]
        node: Optional[RayNode] = None
        try:
            if rank == 0:
                ip = _head_ip(job.num_nodes)
                port = self.ray_port or free_port(ip)
                address = f"{ip}:{port}"
                node = RayNode(job.job_id, temp, ["--head", f"--node-ip-address={ip}", f"--port={port}",
                                                  f"--ray-client-server-port={free_port()}",
                                                  "--include-dashboard=false", *resources, *ports],
                               env, Path(self.job_folder) / f"ray_{job.job_id}_{rank}.log")
                node.wait_ready()
                (rdv / "head").write_text(address)
                _log(f"Ray head up at {address} ({self.cpus} CPUs); waiting for {n - 1} worker node(s)")
                for r in range(1, n):
                    _wait_for(rdv / f"joined.{r}", self.join_timeout_s, f"Ray worker of task {r}", rdv / "failed")
                alive, cpus = _ray_nodes(address, n, env, self.join_timeout_s)
                _log(f"Ray cluster: {alive} node(s), {cpus:g} CPUs")
                cmd = [sys.executable, "-m", "data_prep", self.dataset, "--config", self.config_path,
                       "--ray-address", address, "--quiet"]
                _log("running " + " ".join(cmd))
                t0 = time.time()
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                print(proc.stdout, flush=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
                return {"rank": 0, "address": address, "ray_nodes": alive, "ray_cpus": cpus,
                        "seconds": round(time.time() - t0, 1),
                        "summary": proc.stdout.strip().splitlines()[-12:], "restarts": restarts}
            _wait_for(rdv / "head", self.join_timeout_s, "the Ray head", rdv / "failed")
            address = (rdv / "head").read_text().strip()
            node = RayNode(job.job_id, temp, [f"--address={address}", *resources, *ports], env,
                           Path(self.job_folder) / f"ray_{job.job_id}_{rank}.log")
            node.wait_ready()
            (rdv / f"joined.{rank}").write_text(job.hostname)
            _log(f"joined the Ray cluster at {address}; waiting for the conversion to end")
            _wait_for(rdv / "done", float("inf"), "the end of the conversion", rdv / "failed")
            return {"rank": rank, "address": address, "host": job.hostname}
        except BaseException as e:
            if rank == 0 and not isinstance(e, SystemExit):
                (rdv / "failed").write_text(f"task 0: {type(e).__name__}: {e}"[:2000])
            raise
        finally:
            if rank == 0:
                (rdv / "done").write_text("done")
            if node is not None:
                node.stop()
