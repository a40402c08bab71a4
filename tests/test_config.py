from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from core.cli import add_config_arguments, config_from_args
from core.config import ConfigError, config_from_dict, config_to_dict, dump_config, load_config, save_resolved_config


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class ModelConfig:
    name: Literal["vit", "resnet"] = "vit"
    dim: int = 768
    depths: list[int] = field(default_factory=lambda: [2, 2, 6])
    patch: tuple[int, int] = (16, 16)
    dropout: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 0

    def __post_init__(self):
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")


@dataclass
class RunConfig:
    out_dir: Path  # required
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=100))
    precision: Precision = Precision.BF16
    compile: bool = False
    tag: str | None = None
    extra: dict[str, int] = field(default_factory=dict)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "out_dir: /tmp/run\n"


def test_yaml_load_and_defaults(tmp_path):
    p = write(tmp_path, BASE + "model:\n  name: resnet\n  depths: [1, 2]\n  patch: [8, 8]\n"
                        "precision: fp32\ncompile: true\nextra: {a: 1}\n")
    cfg = load_config(RunConfig, p)
    assert cfg.out_dir == Path("/tmp/run")
    assert cfg.model == ModelConfig(name="resnet", dim=768, depths=[1, 2], patch=(8, 8))
    assert cfg.optim == OptimConfig(warmup_steps=100)  # absent section -> default_factory
    assert cfg.precision is Precision.FP32 and cfg.compile is True and cfg.extra == {"a": 1}


def test_partial_section_keeps_field_default(tmp_path):
    # optim's default_factory sets warmup_steps=100; setting only lr must not reset it to 0
    cfg = load_config(RunConfig, write(tmp_path, BASE + "optim: {lr: 0.01}\n"))
    assert cfg.optim == OptimConfig(lr=0.01, warmup_steps=100)
    cfg = load_config(RunConfig, None, ["out_dir=x", "optim={lr: 0.02}"])
    assert cfg.optim == OptimConfig(lr=0.02, warmup_steps=100)


def test_enum_by_name_and_float_from_int_and_yaml11_exponent(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, BASE + "precision: BF16\noptim: {lr: 1e-3, betas: [1, 0.5]}\n"))
    assert cfg.precision is Precision.BF16
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (1.0, 0.5)
    assert isinstance(cfg.optim.betas[0], float)


def test_overrides(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, BASE + "model: {dim: 64}\n"), [
        "optim.lr=3e-3", "model.depths=[1,1]", "model.dropout=0.1", "compile=true",
        "tag=1.10", "out_dir=/data/x", "extra.b=2", "optim.betas=[0.8,0.9,0.99]", "model.patch=[4,4]",
    ])
    assert cfg.optim.lr == pytest.approx(3e-3)
    assert cfg.model.dim == 64 and cfg.model.depths == [1, 1] and cfg.model.dropout == 0.1
    assert cfg.compile is True and cfg.out_dir == Path("/data/x") and cfg.extra == {"b": 2}
    assert cfg.tag == "1.10"  # str field keeps the raw text, not float 1.1
    assert cfg.optim.betas == (0.8, 0.9, 0.99) and cfg.model.patch == (4, 4)
    assert load_config(RunConfig, None, ["out_dir=x", "model.dropout=null"]).model.dropout is None
    assert load_config(RunConfig, None, ["out_dir=x", "optim.lr=1e-4", "optim.lr=2e-4"]).optim.lr == 2e-4


def err(cls, path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, path, overrides)
    return str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = write(tmp_path, BASE + "model:\n  dimm: 3\n")
    msg = err(RunConfig, p)
    assert "model.dimm" in msg and "run.yaml" in msg and "Did you mean 'model.dim'" in msg
    assert "depths" in msg and "patch" in msg  # valid keys listed


def test_unknown_key_in_override():
    msg = err(RunConfig, None, ["out_dir=x", "optim.lrr=0.1"])
    assert "optim.lrr" in msg and "Did you mean 'optim.lr'" in msg and "optim.lrr=0.1" in msg
    msg = err(RunConfig, None, ["out_dir=x", "modle.dim=3"])
    assert "'modle'" in msg and "Did you mean 'model'" in msg
    msg = err(RunConfig, None, ["out_dir=x", "zzz=1"])  # nothing close: still lists the valid keys
    assert "'zzz'" in msg and "Did you mean" not in msg and "out_dir, model, optim" in msg


@pytest.mark.parametrize("override, expected", [
    ("model.dim=abc", ["model.dim", "int", "'abc'"]),
    ("model.dim=true", ["model.dim", "int", "True"]),
    ("model.dim=1.5", ["model.dim", "int", "1.5"]),
    ("compile=1", ["compile", "bool", "1"]),
    ("compile=maybe", ["compile", "bool", "'maybe'"]),
    ("optim.lr=true", ["optim.lr", "float", "True"]),
    ("optim.lr=fast", ["optim.lr", "float", "'fast'"]),
    ("model.name=vitt", ["model.name", "'vit'", "'resnet'", "'vitt'"]),
    ("precision=fp8", ["precision", "'fp32'", "'bf16'"]),
    ("model.depths=3", ["model.depths", "list[int]", "3"]),
    ("model.depths=[1,x]", ["model.depths[1]", "int", "'x'"]),
    ("model.patch=[1,2,3]", ["model.patch", "2 items"]),
    ("extra={a: x}", ["extra.a", "int", "'x'"]),
    ("model=5", ["model", "mapping"]),
])
def test_type_errors(override, expected):
    msg = err(RunConfig, None, ["out_dir=x", override])
    for s in expected:
        assert s in msg, (s, msg)
    assert override in msg  # points at the offending override


def test_type_error_in_file_names_file(tmp_path):
    msg = err(RunConfig, write(tmp_path, BASE + "model: {dim: '12'}\n"))
    assert "model.dim" in msg and "int" in msg and "run.yaml" in msg


def test_missing_required(tmp_path):
    msg = err(RunConfig, write(tmp_path, "compile: false\n"))
    assert "out_dir" in msg and "missing" in msg


def test_post_init_wrapped():
    msg = err(RunConfig, None, ["out_dir=x", "optim.lr=5"])
    assert "'optim'" in msg and "lr must be in (0, 1)" in msg and "optim.lr=5" in msg


@pytest.mark.parametrize("bad", ["noequals", "=3", ".a=1", "a..b=1"])
def test_malformed_override(bad):
    msg = err(RunConfig, None, [bad])
    assert repr(bad) in msg and "malformed" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "a: [1,\n", "a: 1\na: 2\n"])
def test_bad_yaml_file(tmp_path, text):
    assert "bad.yaml" in err(RunConfig, write(tmp_path, text, "bad.yaml"))


def test_missing_file(tmp_path):
    assert "nope.yaml" in err(RunConfig, tmp_path / "nope.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, ["out_dir=/r", "optim.lr=3e-3", "model.dropout=0.25",
                                        "precision=fp32", "tag=abc", "extra={k: 3}"])
    d = config_to_dict(cfg)
    assert d["out_dir"] == "/r" and d["precision"] == "fp32" and d["model"]["patch"] == [16, 16]
    text = dump_config(cfg)
    assert text.index("out_dir") < text.index("model") < text.index("optim") < text.index("precision")
    assert load_config(RunConfig, write(tmp_path, text)) == cfg
    out = save_resolved_config(cfg, tmp_path / "runs" / "a")
    assert out == tmp_path / "runs" / "a" / "config.yaml"
    assert load_config(RunConfig, out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]


def test_argparse_helpers(tmp_path):
    p = write(tmp_path, BASE, "f.yaml")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(p), "model.dim=1", "optim.lr=3e-3"])
    cfg = config_from_args(RunConfig, args)
    assert cfg.model.dim == 1 and cfg.optim.lr == pytest.approx(3e-3) and cfg.out_dir == Path("/tmp/run")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, default_config=p)
    assert "section.key=value" in parser.format_help()
    assert config_from_args(RunConfig, parser.parse_args([])).out_dir == Path("/tmp/run")


def test_eta_from_the_pace_so_far():
    from core.cli import eta

    assert eta(10.0, 1, 10) == "eta 1m30s"  # 9 units left at 10 s each
    assert eta(3600.0, 1, 3) == "eta 2h00m" and eta(1.0, 2, 4) == "eta 1s"
    assert eta(5.0, 0, 10) == "" and eta(5.0, 10, 10) == ""  # nothing to extrapolate from / nothing left


def test_a_project_config_is_found_from_any_directory(tmp_path, monkeypatch):
    """`--config configs/...` from outside the checkout reads the project's file; a relative path that exists in
    the working directory wins; a missing one names both places it looked."""
    from core.config import ConfigError, load_config
    from pretrain.config import PretrainConfig

    monkeypatch.chdir(tmp_path)
    assert load_config(PretrainConfig, "configs/pretrain/vita_stage1_tiny.yaml").stage == "mae"
    (tmp_path / "configs/pretrain").mkdir(parents=True)
    (tmp_path / "configs/pretrain/vita_stage1_tiny.yaml").write_text("stage: tabular_clip\n")
    assert load_config(PretrainConfig, "configs/pretrain/vita_stage1_tiny.yaml").stage == "tabular_clip"
    with pytest.raises(ConfigError, match="current directory.*then from the project"):
        load_config(PretrainConfig, "configs/pretrain/nope.yaml")
    from core.config import project_path
    from pretrain.train import deepspeed_config

    assert project_path("configs/deepspeed/zero2.json").is_file()  # the DeepSpeed tuning files alike
    assert deepspeed_config(PretrainConfig(), 1)["zero_optimization"]["stage"] == PretrainConfig().train.zero_stage


def test_flat_config_for_tensorboard_hparams(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from core.config import flat_config
    from pretrain.config import PretrainConfig

    flat = flat_config(PretrainConfig())
    assert flat["optim.lr"] == PretrainConfig().optim.lr and flat["checkpoint.init_from"] == "null"
    assert flat["model.patch"] == str(list(PretrainConfig().model.patch))
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    w = SummaryWriter(str(tmp_path))
    w.add_hparams(flat, {"hparam/loss_last": 0.5}, run_name="hparams")  # TensorBoard takes every value
    w.close()
    assert list((tmp_path / "hparams").glob("events.out.tfevents.*"))


@dataclass
class Entry:
    name: str
    size: int = 1


@dataclass
class Catalogue:
    entries: tuple[Entry, ...]


def test_in_memory_mapping_and_named_list_entries():
    assert config_from_dict(Catalogue, {"entries": [{"name": "a"}, {"name": "b", "size": 3}]}).entries[1].size == 3
    with pytest.raises(ConfigError) as e:  # a long list: the error says which entry, by its name
        config_from_dict(Catalogue, {"entries": [{"name": "a"}, {"name": "b", "size": "x"}]}, "cat.yaml")
    assert "entries[1].size: expected int" in str(e.value) and "cat.yaml" in str(e.value)
    assert "[entries[1] is 'b']" in str(e.value)
    with pytest.raises(ConfigError, match=r"entries\[0\]\.name") as e:  # no name: the index alone
        config_from_dict(Catalogue, {"entries": [{"size": 2}]})
    assert "is '" not in str(e.value)
