"""Submission and bookkeeping: submitit executors from a `SlurmConfig`, the sbatch script, job folders, waiting
for results without `sacct`, status, logs and cancel.

A job folder `<root>/<kind>/<name>/` holds
    job.json                 kind, job id(s), executor, tasks, run directory, command line, submission time
    cluster.yaml             the resolved SlurmConfig
    config.yaml              the resolved config of the job (pretrain / finetune / data prep); a sweep adds
                             sweep/<i>_<tag>.yaml, one per array task
    <id>_submission.sh       the sbatch script (submitit's; `--dry-run` prints the same text)
    <id>_<task>_log.out|err  per-task (= per-rank) stdout / stderr, appended across requeues
    <id>_<task>_result.pkl   what each task returned (("success", value) or ("error", traceback)), from its last run
    run_dir.txt              the run directory (pretrain: checkpoint.dir, finetune: out, data prep: job.out)
    requeues.jsonl           one line per requeue: asked for by the job (time, run, step, signal) or from outside
                             (scontrol requeue, preemption: recorded by the next run, "external": true)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cluster.config import SlurmConfig
from core.config import ConfigError

KINDS = ("pretrain", "finetune", "data_prep")
JOB_JSON = "job.json"
RUN_DIR = "run_dir.txt"
# job states after which no task of the job will run again
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "SPECIAL_EXIT", "REVOKED"}


class JobFailed(RuntimeError):
    """A job ended without every task's result, or a task raised."""


# ----------------------------------------------------------------------------------------------- executors
def executor_name(cfg: SlurmConfig) -> str:
    if cfg.cluster != "auto":
        return cfg.cluster
    return "slurm" if shutil.which("srun") and shutil.which("sbatch") else "local"


def env_for(cfg: SlurmConfig, kind: str) -> dict[str, str]:
    """What the job's shell exports: cfg.env, plus OMP_NUM_THREADS = CPUs per task and, for CPU-only
    pretraining / fine-tuning, DS_ACCELERATOR=cpu (gloo) -- unless cfg.env sets them."""
    env: dict[str, str] = {}
    if kind in ("pretrain", "finetune") and cfg.gpus_per_node == 0:
        env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = str(cfg.cpus_per_task)
    env.update({k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in cfg.env.items()})
    return env


def setup_lines(cfg: SlurmConfig, env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()] + list(cfg.setup)


def slurm_parameters(cfg: SlurmConfig, job_name: str, setup: list[str], workdir: Optional[Path] = None) -> dict:
    """Keyword arguments of submitit's SlurmExecutor.update_parameters (= of `_make_sbatch_string`)."""
    p: dict[str, Any] = {"job_name": job_name, "nodes": cfg.nodes, "ntasks_per_node": cfg.ntasks_per_node,
                         "cpus_per_task": cfg.cpus_per_task, "time": cfg.time_min,
                         "signal_delay_s": cfg.signal_delay_s, "setup": setup}
    if cfg.gpus_per_node:
        p["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        p["mem"] = f"{cfg.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            p[key] = getattr(cfg, key)
    if cfg.exclusive:
        p["exclusive"] = True
    # --requeue: a cluster with JobRequeue=0 would otherwise refuse `scontrol requeue` (timeout / preemption)
    extra: dict[str, Any] = {"requeue": True, "chdir": str(workdir or Path.cwd())}
    extra.update(cfg.sbatch)
    p["additional_parameters"] = extra
    return p


def submitit_command(folder: Path) -> str:
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: SlurmConfig, folder: Path, job_name: str, setup: list[str], array: int = 0) -> str:
    """The sbatch script submitit writes for this job (no SLURM needed: `--dry-run` on a laptop)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(cfg, job_name, setup)
    if array:
        params["map_count"] = array
    return _make_sbatch_string(command=submitit_command(Path(folder).absolute()), folder=Path(folder).absolute(),
                               **params)


def make_executor(cfg: SlurmConfig, folder: Path, job_name: str, setup: list[str]):
    import submitit

    name = executor_name(cfg)
    if name == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        ex.update_parameters(**slurm_parameters(cfg, job_name, setup))
    elif name == "local":
        if cfg.nodes != 1:
            raise ValueError(f"the local executor runs one node, not {cfg.nodes}")
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        ex.update_parameters(timeout_min=cfg.time_min, tasks_per_node=cfg.ntasks_per_node, nodes=1,
                             gpus_per_node=cfg.gpus_per_node, signal_delay_s=cfg.signal_delay_s, setup=setup)
    else:  # debug: in this process
        ex = submitit.DebugExecutor(folder=folder)
    return ex


# --------------------------------------------------------------------------------------------- job folders
def new_job_folder(cfg: SlurmConfig, kind: str) -> Path:
    """<root>/<kind>/<name or timestamp>, a fresh one (-2, -3, ... when the name is taken)."""
    base = cfg.root / kind / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    folder, i = base, 1
    while (folder / JOB_JSON).exists() or (folder.exists() and not cfg.name and any(folder.iterdir())):
        i += 1
        folder = base.with_name(f"{base.name}-{i}")
    return folder.absolute()


@dataclass
class JobRecord:
    kind: str
    folder: Path
    job_id: str
    executor: str
    tasks: int  # per array element
    run_dir: str
    array: list[str] = field(default_factory=list)  # array element ids (a sweep), else empty
    run_dirs: list[str] = field(default_factory=list)
    submitted: float = 0.0
    argv: list[str] = field(default_factory=list)

    @property
    def element_ids(self) -> list[str]:
        return self.array or [self.job_id]

    def save(self) -> None:
        d = {**self.__dict__, "folder": str(self.folder)}
        tmp = self.folder / f".{JOB_JSON}.tmp"
        tmp.write_text(json.dumps(d, indent=1) + "\n")
        tmp.replace(self.folder / JOB_JSON)

    @classmethod
    def load(cls, folder: Path) -> "JobRecord":
        d = json.loads((Path(folder) / JOB_JSON).read_text())
        d["folder"] = Path(folder).absolute()
        return cls(**d)


def find_job(ref: str, root: Path) -> JobRecord:
    """A job folder, or a job id (also an array element `123_4`) looked up under `root`, else through the job's
    stdout path that `scontrol show job` knows (a running job or one that ended less than MinJobAge ago)."""
    p = Path(ref)
    if (p / JOB_JSON).exists():
        return JobRecord.load(p)
    main = ref.split("_")[0]
    for path in sorted(Path(root).glob(f"*/*/{JOB_JSON}"), key=lambda q: q.stat().st_mtime, reverse=True):
        try:
            rec = JobRecord.load(path.parent)
        except (OSError, ValueError, TypeError):
            continue
        if rec.job_id == main or ref in rec.array or rec.job_id == ref:
            return rec
    info = scontrol_job(ref)
    out = info.get("StdOut", "")
    if out and (Path(out).parent / JOB_JSON).exists():
        return JobRecord.load(Path(out).parent)
    raise FileNotFoundError(f"no job folder for {ref!r} (looked under {root}, and asked scontrol): pass the job folder")


# ------------------------------------------------------------------------------------------------ SLURM state
def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict ({} when SLURM does not know the job, or no SLURM here)."""
    if not shutil.which("scontrol"):
        return {}
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout.splitlines()[0]))


def _local_alive(pid: str) -> bool:
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return False
    return state != "Z"


def _local_controllers(pid: int) -> list[int]:
    """submitit's local controller: the job's pid itself, or its child when setup lines ran in a shell first."""
    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""

    if b"submitit.local._local" in cmdline(pid):
        return [pid]
    children = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and b"submitit.local._local" in cmdline(int(d.name)):
                children.append(int(d.name))
    return children or [pid]


def job_state(rec: JobRecord, element: Optional[str] = None) -> Optional[str]:
    """SLURM's JobState (RUNNING, PENDING, REQUEUED, COMPLETED, ...); local: RUNNING or None; None = unknown."""
    if rec.executor == "local":  # the job id is the pid of submitit's local controller
        return "RUNNING" if _local_alive(element or rec.job_id) else None
    if rec.executor == "debug":
        return None
    return scontrol_job(element or rec.job_id).get("JobState") or None


def task_results(rec: JobRecord, element: str) -> Optional[list[tuple[str, Any]]]:
    """[(outcome, value)] of every task of one job (array element), or None while any is missing."""
    from submitit.core.utils import pickle_load

    out = []
    for t in range(rec.tasks):
        path = rec.folder / f"{element}_{t}_result.pkl"
        if not path.exists():
            return None
        for attempt in range(3):
            try:
                out.append(pickle_load(path))
                break
            except (EOFError, OSError):
                if attempt == 2:
                    raise
                time.sleep(1)
    return out


def _log_tail(rec: JobRecord, element: str, lines: int = 30) -> str:
    parts = []
    for t in range(rec.tasks):
        for suffix in ("err", "out"):
            p = rec.folder / f"{element}_{t}_log.{suffix}"
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {p.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def wait(rec: JobRecord, timeout_s: float = float("inf"), poll_s: float = 2.0, grace_s: float = 20.0,
         on_poll: Optional[Callable[[], None]] = None) -> dict[str, list[Any]]:
    """Every element's per-task results, once all are written. Bounded: without `sacct` submitit cannot tell a
    dead job from a running one, so this asks `scontrol` (or the local controller's pid) and fails when the job
    is gone (or in a final state) for `grace_s` without all results. Raises JobFailed (a task raised, or the job
    died) or TimeoutError."""
    deadline = time.time() + timeout_s
    gone_since: dict[str, float] = {}
    results: dict[str, list[Any]] = {}
    while True:
        for el in rec.element_ids:
            if el in results:
                continue
            res = task_results(rec, el)
            if res is not None:
                errors = [(t, v) for t, (outcome, v) in enumerate(res) if outcome != "success"]
                if errors:
                    t, trace = errors[0]
                    raise JobFailed(f"job {el} task {t} failed:\n{trace}")
                results[el] = [v for _, v in res]
                continue
            state = job_state(rec, el)
            if state is None or state.split()[0] in TERMINAL:
                first = gone_since.setdefault(el, time.time())
                if time.time() - first > grace_s:
                    raise JobFailed(f"job {el} ended ({state or 'no longer known to the scheduler'}) without the "
                                    f"results of all {rec.tasks} task(s); logs in {rec.folder}\n{_log_tail(rec, el)}")
            else:
                gone_since.pop(el, None)
        if len(results) == len(rec.element_ids):
            return results
        if time.time() > deadline:
            raise TimeoutError(f"job {rec.job_id} not done after {timeout_s:.0f}s; logs in {rec.folder}\n"
                               f"{_log_tail(rec, rec.element_ids[0], 10)}")
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------ status, logs, cancel
def status(rec: JobRecord) -> dict[str, Any]:
    """What is known about a job: scheduler state, tasks done, requeues, the run's progress."""
    out: dict[str, Any] = {"job_id": rec.job_id, "kind": rec.kind, "executor": rec.executor, "folder": str(rec.folder),
                           "run_dir": rec.run_dir, "elements": {}}
    for el in rec.element_ids:
        info = scontrol_job(el) if rec.executor == "slurm" else {}
        res = [(rec.folder / f"{el}_{t}_result.pkl").exists() for t in range(rec.tasks)]
        outcome = None
        if all(res):
            try:
                outcome = [o for o, _ in task_results(rec, el) or []]
            except Exception as e:  # a corrupt pickle: report, do not crash the status command
                outcome = [f"unreadable ({e})"]
        state = job_state(rec, el)
        if outcome and all(o == "success" for o in outcome):
            summary = "finished"
        elif outcome:
            summary = "failed"
        elif state is None:
            summary = "ended without results" if rec.executor != "slurm" else "not running, no results"
        else:
            summary = state.lower()
        out["elements"][el] = {"state": state, "summary": summary, "tasks_done": sum(res), "tasks": rec.tasks,
                               "outcomes": outcome,
                               **{k: info[k] for k in ("Restarts", "RunTime", "TimeLimit", "NodeList", "Reason",
                                                      "Partition") if k in info}}
    req = rec.folder / "requeues.jsonl"
    lines = req.read_text().splitlines() if req.exists() else []
    out["requeues"] = [json.loads(line) for line in lines if line.strip()]
    if rec.kind == "pretrain" and rec.run_dir:
        ckpt = Path(rec.run_dir) / "checkpoints" / "latest"
        out["latest_checkpoint"] = ckpt.read_text().strip() if ckpt.exists() else None
        metrics = Path(rec.run_dir) / "metrics.jsonl"
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            if lines:
                try:
                    out["last_logged_step"] = json.loads(lines[-1]).get("step")
                except ValueError:
                    pass
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = [f"job {st['job_id']} ({st['kind']}, {st['executor']})", f"  folder  {st['folder']}",
             f"  run dir {st['run_dir']}"]
    for el, e in st["elements"].items():
        extra = " ".join(f"{k}={e[k]}" for k in ("Restarts", "RunTime", "TimeLimit", "NodeList", "Reason") if k in e)
        lines.append(f"  {el}: {e['summary']} ({e['tasks_done']}/{e['tasks']} task results) {extra}".rstrip())
    if st["requeues"]:
        last = st["requeues"][-1]
        lines.append(f"  requeued {len(st['requeues'])}x; last at step {last.get('step')} ({last.get('signal')})")
    if "latest_checkpoint" in st:
        lines.append(f"  latest checkpoint {st['latest_checkpoint']}; last logged step {st.get('last_logged_step')}")
    return "\n".join(lines)


def log_paths(rec: JobRecord, task: int = 0, stderr: bool = False, element: Optional[str] = None) -> list[Path]:
    el = element or rec.element_ids[0]
    p = rec.folder / f"{el}_{task}_log.{'err' if stderr else 'out'}"
    return [p]


def cancel(rec: JobRecord) -> str:
    if rec.executor == "slurm":
        res = subprocess.run(["scancel", rec.job_id], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"scancel {rec.job_id}: {res.stderr.strip()}")
        return f"cancelled SLURM job {rec.job_id}"
    if rec.executor == "local":
        alive = [el for el in rec.element_ids if _local_alive(el)]
        for el in alive:  # SIGINT to submitit's local controller: it kills its tasks (LocalJob.cancel); the job
            for pid in _local_controllers(int(el)):  # id may be the shell running the setup lines before it
                os.kill(pid, signal.SIGINT)
        return f"cancelled local job {' '.join(alive)}" if alive else f"local job {rec.job_id} is not running"
    return f"nothing to cancel for a {rec.executor} job"


def submit(cfg: SlurmConfig, kind: str, folder: Path, fns: Sequence[Callable], job_name: str, env: dict[str, str],
           run_dir: str, run_dirs: Sequence[str] = ()) -> JobRecord:
    """Submit one job (one callable) or a job array (several); writes job.json."""
    import submitit

    name = executor_name(cfg)
    setup = setup_lines(cfg, env)
    ex = make_executor(cfg, folder, job_name, setup)
    import contextlib
    import io

    from submitit.core.utils import FailedJobError, FailedSubmissionError

    said = io.StringIO()  # submitit prints sbatch's stderr itself on a refusal: the one line below says it
    conf = os.environ.get("SLURM_CONF")  # which cluster: a site setting, not the allocation's (clean_env drops it)
    try:
        with submitit.helpers.clean_env(), contextlib.redirect_stderr(said):  # (a job submitted from inside an
            if conf:  # allocation must not inherit its SLURM_*)
                os.environ["SLURM_CONF"] = conf
            if name == "local":
                jobs = _submit_local(ex, folder, fns)
            elif len(fns) == 1:
                jobs = [ex.submit(fns[0])]
            else:
                jobs = ex.submit_array(list(fns))
    except (FailedJobError, FailedSubmissionError) as e:  # sbatch said no: its reason, on one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise ConfigError(f"sbatch refused the job: {reason.removeprefix('sbatch: error: ')}") from None
    sys.stderr.write(said.getvalue())
    if name == "debug":
        job_id = str(jobs[0].job_id)
    else:
        job_id = str(jobs[0].job_id).split("_")[0]
    rec = JobRecord(kind=kind, folder=folder, job_id=job_id, executor=name,
                    tasks=1 if name == "debug" else cfg.ntasks_per_node * cfg.nodes, run_dir=run_dir,
                    array=[str(j.job_id) for j in jobs] if len(fns) > 1 else [], run_dirs=list(run_dirs),
                    submitted=time.time(), argv=list(sys.argv))
    rec.save()
    if name == "debug":  # DebugExecutor runs at result(): run it now, like a job would
        for j in jobs:
            j.results()
    return rec


def _submit_local(ex, folder: Path, fns: Sequence[Callable]):
    """submitit's local controller inherits this process's stdout/stderr; point them at a file in the job folder
    while it starts, so that a caller capturing our output does not wait for the job to end."""
    log = open(folder / "local_controller.log", "ab")
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        return [ex.submit(fn) for fn in fns]
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
