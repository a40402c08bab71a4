"""Typed configuration of a SLURM job submitted through submitit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional


@dataclass
class SlurmConfig:
    cluster: Literal["slurm", "local", "debug"] = "slurm"  # submitit executor; local/debug run on this machine
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: SLURM default
    time: str = "24:00:00"  # H:MM[:SS] or D-HH:MM:SS
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    max_requeues: int = 10  # timeout / preemption requeues before giving up
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: save a checkpoint, then requeue
    folder: Path = Path("runs/slurm/%j")

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1:
            raise ValueError("nodes >= 1, gpus_per_node >= 0 and cpus_per_task >= 1 are required")
