"""Rank discovery from each launcher's environment (the real srun path runs in the SLURM tests)."""

from __future__ import annotations

from pretrain import dist


def test_torchrun_and_deepspeed_variables(monkeypatch):
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(k, v)
    d = dist.detect()
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port) == (3, 1, 4, "node7", 29555)


def test_srun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "gpu[003-006]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the host list is expanded here
    d = dist.detect()
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "srun")
    assert d.master_addr == "gpu003" and d.master_port == 20000 + 12345 % 20000
    monkeypatch.setenv("SLURM_JOB_NODELIST", "a1,b2")
    assert dist.detect().master_addr == "a1"


def test_no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    d = dist.detect()
    assert (d.rank, d.world_size, d.master_addr, d.launcher) == (0, 1, "127.0.0.1", "none") and d.master_port > 0
