"""Typed configuration of a SLURM job submitted through submitit (`python -m cluster submit ...`).

One flat dataclass: the executor, the allocation (nodes, tasks, GPUs, CPUs, memory, time, partition, account,
QoS, constraint), requeue on timeout / preemption, where job folders go, and what the job's shell exports and
runs before the tasks start. YAML files in configs/cluster/, `key=value` overrides (`slurm.key=value` on the
`submit` command line), like every other config of the project.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def time_minutes(text: str) -> int:
    """The time limit in whole minutes (rounded up), read exactly as sbatch reads `--time`:

    "90" = 90 min; "30:00" = 30 min (MINUTES:SECONDS); "1:30:00" = 1 h 30 min (H:MM:SS); "2-12" = 2 days 12 h;
    "2-12:30" / "2-12:30:00" = D-HH:MM[:SS]."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ValueError(f"time {text!r}: expected sbatch's MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS or "
                         "DAYS-HOURS[:MINUTES[:SECONDS]]")
    d, a, b, c = (int(m[k]) if m[k] is not None else None for k in "dabc")
    if d is None:
        if b is None:  # "90": minutes
            seconds = a * 60
        elif c is None:  # "30:00": minutes and seconds
            seconds = a * 60 + b
        else:  # "1:30:00"
            seconds = a * 3600 + b * 60 + c
    else:  # "D-HH", "D-HH:MM", "D-HH:MM:SS"
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ValueError(f"time {text!r}: must be positive")
    return math.ceil(seconds / 60)


def format_minutes(minutes: int) -> str:
    """90 -> "1 h 30 min", 2880 -> "2 d 0 h 0 min": what a limit means, echoed at submission."""
    d, rest = divmod(int(minutes), 1440)
    h, m = divmod(rest, 60)
    return (f"{d} d " if d else "") + (f"{h} h " if d or h else "") + f"{m} min"


def time_warning(text) -> str | None:
    """A note when `--time` is written MM:SS (sbatch's reading: 30:00 is 30 minutes), the form people type
    meaning hours; None otherwise."""
    t = str(text or "").strip()
    if re.fullmatch(r"\d+:\d{2}", t):
        return (f"note: --time {t} is {format_minutes(time_minutes(t))} (sbatch reads MM:SS); "
                f"{t.split(':')[0]} hours is {t}:00")
    return None


@dataclass
class SlurmConfig:
    # submitit executor: slurm (sbatch), local (this machine, one process per task, same requeue logic),
    # debug (in this process, for debugging), auto (slurm when `srun` is on PATH, else local)
    cluster: Literal["auto", "slurm", "local", "debug"] = "auto"
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # 0: one task per GPU (gpus_per_node), or 1 without GPUs; CPU/gloo: set it (e.g. 2)
    cpus_per_task: int = 8
    mem_gb: int = 0  # per node; 0: SLURM's default
    time: str = "24:00:00"  # as sbatch reads it: "MINUTES", "MINUTES:SECONDS", "H:MM:SS", "D-HH[:MM[:SS]]"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False  # whole nodes (multi-node GPU jobs)
    max_requeues: int = 10  # timeout / preemption requeues before giving up (SLURM_RESTART_COUNT counts them)
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: save a checkpoint, then requeue
    # root of the job folders: <folder>/<kind>/<name>/ (a legacy "%j" component is ignored)
    folder: Path = Path("runs/slurm")
    name: Optional[str] = None  # job name and job folder name; None: <kind>-<YYYYmmdd-HHMMSS>
    master_port: int = 0  # torch.distributed rendezvous port; 0: 20000 + job id % 20000 (same on every task)
    ray_port: int = 0  # data prep: the Ray head's GCS port; 0: a free port on the first node
    env: dict[str, Union[str, int, float, bool]] = field(default_factory=dict)  # exported in the job script
    setup: list[str] = field(default_factory=list)  # shell lines before the tasks start (module load, ...)
    sbatch: dict[str, Union[str, int, bool]] = field(default_factory=dict)  # extra #SBATCH flags: {mail-type: END}

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.tasks_per_node < 0:
            raise ValueError("nodes >= 1, gpus_per_node >= 0, tasks_per_node >= 0 and cpus_per_task >= 1 are required")
        if self.mem_gb < 0 or self.max_requeues < 0 or self.signal_delay_s < 0 or not 0 <= self.master_port < 65536:
            raise ValueError("mem_gb, max_requeues and signal_delay_s must be >= 0; master_port in [0, 65535]")
        minutes = time_minutes(self.time)
        if self.signal_delay_s >= minutes * 60:
            raise ValueError(f"signal_delay_s {self.signal_delay_s} must be below the time limit ({minutes} min)")
        for k in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"env: {k!r} is not a valid environment variable name")

    @property
    def time_min(self) -> int:
        return time_minutes(self.time)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def root(self) -> Path:
        """The job folder root (without a legacy `%j` component)."""
        parts = [p for p in Path(self.folder).parts if "%j" not in p]
        return Path(*parts) if parts else Path(".")
