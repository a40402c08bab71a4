"""Shared fixtures: one tiny synthetic cohort per test session, written through the real CLI."""

from __future__ import annotations

import subprocess
import sys
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
