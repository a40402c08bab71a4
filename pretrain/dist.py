"""Who am I in the job: rank, local rank, world size and rendezvous, whatever launched us.

- `deepspeed` launcher and `torchrun` set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
- `srun` (SLURM, one task per GPU) sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_JOB_NODELIST:
  the master is the first node of the allocation and the port derives from the job id (same on every task);
- no launcher: one process, rank 0 of 1, rendezvous on 127.0.0.1.
Backend: NCCL on GPUs, gloo on CPU (DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from core.net import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str


def _first_host(nodelist: str) -> str:
    try:  # the canonical expansion of SLURM host lists like "gpu[001-004,010]"
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # "gpu[001-004]" -> "gpu001" without scontrol
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split("-")[0].split(",")[0]
    return head


def detect() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed" if "DEEPSPEED_ROOT" in env or "DS_LAUNCH" in env else "torchrun/deepspeed"
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        addr = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       addr, port, "srun")
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port("127.0.0.1"), "none")


def die_with_launcher() -> bool:
    """Under torchrun (or the deepspeed launcher), make this rank die with its launcher: each rank runs in a Unix
    session of its own, so a SIGKILL of the launcher's process group (the OOM killer, `kill -9`, a lost shell)
    would otherwise leave the ranks training and writing checkpoints beside the next run. Linux only
    (prctl PR_SET_PDEATHSIG); returns whether it is set. Not under srun (slurmstepd kills its tasks) or without a
    launcher (a `nohup`-ed trainer must outlive its shell)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "CROSS_RANK" not in os.environ:  # torchrun / deepspeed
        return False
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
        return False
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)
    return True


def init_distributed(backend: str | None = None) -> DistEnv:
    """Export the standard variables and initialise torch.distributed through DeepSpeed."""
    import deepspeed
    import torch

    die_with_launcher()
    d = detect()
    os.environ.update({"RANK": str(d.rank), "LOCAL_RANK": str(d.local_rank), "WORLD_SIZE": str(d.world_size),
                       "MASTER_ADDR": d.master_addr, "MASTER_PORT": str(d.master_port)})
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                               auto_mpi_discovery=False)
    return d
