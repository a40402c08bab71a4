"""Mistakes found before anything expensive starts (no DeepSpeed, Ray or SLURM): every one is a single line that
names the setting, the path and the reason, with exit code 2 (`pretrain train`, `finetune train|compare|probe|embed`;
`cluster submit`: tests/test_cluster.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/vita_stage1_tiny.yaml"
FT = ROOT / "configs/finetune/tiny.yaml"


def _manifest(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"shards": [], **fields}))
    return folder


@pytest.fixture
def datasets(tmp_path) -> dict[str, Path]:
    return {"ukb": _manifest(tmp_path / "ukb", dataset="ukb", geometry={"crop": 32, "sa_planes": 3}),
            "ukb64": _manifest(tmp_path / "ukb64", dataset="ukb", geometry={"crop": 64, "sa_planes": 3}),
            "ukb6": _manifest(tmp_path / "ukb6", dataset="ukb", geometry={"crop": 32, "sa_planes": 6}),
            "kspace": _manifest(tmp_path / "kspace", dataset="kspace", config={"size": 32}),
            "missing": tmp_path / "missing", "empty": _empty(tmp_path / "empty"), "junk": _junk(tmp_path / "junk")}


def _empty(folder: Path) -> Path:
    folder.mkdir()
    return folder


def _junk(folder: Path) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    return folder


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def test_pretrain_train_checks_before_it_starts(datasets, tmp_path, capsys):
    from pretrain.__main__ import main

    def run(*overrides: str, allow_cpu: bool = False) -> str:
        argv = ["train", "--config", str(TINY), f"checkpoint.dir={tmp_path / 'run'}", *overrides]
        return _one_line(capsys, main(argv + (["--allow-cpu"] if allow_cpu else [])))

    d = datasets
    # the library names no dataset of its own (no demo paths in defaults): a config without one says so
    assert run("data.dataset=null") == ("config error: data.dataset is not set: name a converted dataset (convert one "
                                        "first: python -m data_prep ukb|kspace|sax --out DIR)")
    assert run(f"data.dataset={d['missing']}") == (f"config error: data.dataset: {d['missing']} does not exist "
                                                  "(convert one first: python -m data_prep ukb|kspace|sax --out DIR)")
    assert f"{d['empty']}/manifest.json: no manifest" in run(f"data.dataset={d['empty']}")
    assert "unreadable manifest (JSONDecodeError" in run(f"data.dataset={d['junk']}")
    assert f"{d['kspace']} is a 'kspace' dataset; this needs 'ukb'" in run(f"data.dataset={d['kspace']}")
    assert f"{d['ukb']} is a 'ukb' dataset; this needs 'kspace'" in run(
        f"data.dataset={d['ukb']}", "stage=metaclip")
    assert f"model.img_size is 32 but {d['ukb64']} holds 64-pixel images" in run(f"data.dataset={d['ukb64']}")
    assert f"model.sa_planes is 3 but {d['ukb6']} holds 6 short-axis planes" in run(f"data.dataset={d['ukb6']}")
    assert f"checkpoint.init_from: {tmp_path / 'nope'} does not exist" in run(
        f"data.dataset={d['ukb']}", f"checkpoint.init_from={tmp_path / 'nope'}")
    import torch

    if not torch.cuda.is_available():  # a GPU config on this CPU machine: refused, unless --allow-cpu
        assert "train.device is cuda (a GPU config) but this machine has no CUDA GPU; add --allow-cpu" in run(
            f"data.dataset={d['ukb']}", "train.device=cuda")
        # --allow-cpu lifts only that check: the next one (here the dataset) speaks
        assert "does not exist" in run(f"data.dataset={d['missing']}", "train.device=cuda", allow_cpu=True)
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_finetune_commands_check_before_they_start(datasets, tmp_path, capsys):
    from finetune.__main__ import main

    d = datasets
    out = f"out={tmp_path / 'ft'}"
    assert "data.dataset is not set" in _one_line(capsys, main(["train", "--config", str(FT), "data.dataset=null", out]))
    err = _one_line(capsys, main(["train", "--config", str(FT), f"data.dataset={d['kspace']}", out]))
    assert err == f"config error: data.dataset: {d['kspace']} is a 'kspace' dataset; this needs 'ukb'"
    err = _one_line(capsys, main(["train", "--config", str(FT), f"data.dataset={d['ukb']}", "task.name=modality_view",
                                  out]))
    assert "is a 'ukb' dataset; this needs 'kspace'" in err
    err = _one_line(capsys, main(["train", "--config", str(FT), f"data.dataset={d['ukb']}",
                                  f"encoder={tmp_path / 'enc'}", out]))
    assert err == f"config error: encoder: {tmp_path / 'enc'} does not exist (an encoder export or a pretraining " \
                  "run directory)"
    err = _one_line(capsys, main(["compare", "--config", str(FT), f"data.dataset={d['ukb']}", out,
                                  "--method", f"vita={tmp_path / 'enc2'}"]))
    assert f"encoder: {tmp_path / 'enc2'} does not exist" in err
    err = _one_line(capsys, main(["probe", "--config", str(FT), f"data.dataset={d['missing']}", out,
                                  "--method", "random=random"]))
    assert f"data.dataset: {d['missing']} does not exist" in err
    err = _one_line(capsys, main(["embed", "--encoder", str(tmp_path / "enc"), "--dataset", str(d["junk"]),
                                  "--out", str(tmp_path / "e.npz")]))
    assert f"--dataset: {d['junk']}/manifest.json: unreadable manifest" in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("job", ["ukb", "kspace"])
def test_conversion_without_a_source_says_so(tmp_path, capsys, job):
    from data_prep.__main__ import main

    err = _one_line(capsys, main([job, "--out", str(tmp_path / "out"), "--quiet"]))
    assert err == "config error: src is not set: the raw source directory (--src or src=...)"
    assert not (tmp_path / "out").exists()
