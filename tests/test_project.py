"""Project-wide rules: dependency direction, CLIs, and that every shipped config validates."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "data_prep", "pretrain", "finetune", "cluster")  # (+ cmrfm: the console command over all)
# pretrain and finetune never import data_prep (the conversion; the GPU machines cannot install ray), with one
# exception by design: the finetune API's raw-input preprocessing calls the conversion's own readers and
# preprocessing (ray-free modules), so that a raw subject becomes exactly the stored sample, never a second copy
RAW_INPUT_MODULES = {"finetune/api.py"}
RAW_INPUT_MAY_IMPORT = {"data_prep.ukb.study", "data_prep.ukb.nifti", "data_prep.ukb.preprocess",
                        "data_prep.kspace.preprocess"}
ALLOWED = {
    "core": {"core"},
    "data_prep": {"core", "data_prep"},
    "pretrain": {"core", "pretrain"},
    "finetune": {"core", "finetune", "pretrain"},
    "cluster": set(PACKAGES),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_direction(package):
    for path in (ROOT / package).rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES:
                if rel in RAW_INPUT_MODULES and top == "data_prep":
                    assert name in RAW_INPUT_MAY_IMPORT, f"{rel} imports {name}"
                    continue
                assert top in ALLOWED[package], f"{rel} imports {name}"
            if package in ("core", "pretrain", "finetune"):
                assert top != "ray", f"{rel} imports ray"


@pytest.mark.parametrize("package", PACKAGES[1:])  # core has no command line
def test_cli_help(package):
    res = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "usage: python -m " + package in res.stdout and "examples:" in res.stdout


def _schema(path: Path):
    component = path.parent.name
    if component == "data_prep" and path.name.startswith("ukb_"):
        from data_prep.ukb.job import UKBJobConfig
        return UKBJobConfig
    if component == "data_prep" and path.name.startswith("kspace_"):
        from data_prep.kspace.job import KSpaceJobConfig
        return KSpaceJobConfig
    if component == "data_prep":
        from data_prep.synth.cohort import SynthConfig
        return SynthConfig
    if component == "pretrain":
        from pretrain.config import PretrainConfig
        return PretrainConfig
    if component == "finetune":
        from finetune.config import FinetuneConfig
        return FinetuneConfig
    if component == "scaling":
        from finetune.scaling import ScalingConfig
        return ScalingConfig
    from cluster.config import SlurmConfig
    return SlurmConfig


CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_every_component_ships_paper_and_tiny_configs():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"pretrain/vita_stage1.yaml", "pretrain/vita_stage1_tiny.yaml", "pretrain/vita_stage2.yaml",
            "pretrain/metaclip_cmr.yaml", "finetune/vita_phenotypes.yaml", "finetune/tiny.yaml",
            "data_prep/synth_tiny.yaml", "cluster/slurm_multinode.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_shipped_configs_validate(path):
    if path.name == "ukb_features.yaml":  # the tabular feature spec has its own schema
        from data_prep.ukb.feature_spec import load_feature_spec
        assert len(load_feature_spec(path).features) == 117
        return
    load_config(_schema(path), path)


def test_paper_values_in_paper_configs():
    from pretrain.config import PretrainConfig
    s1 = load_config(PretrainConfig, ROOT / "configs/pretrain/vita_stage1.yaml")
    assert (s1.model.sa_planes, s1.model.la_planes, s1.model.frames, s1.model.patch) == (6, 3, 5, (5, 8, 8))
    assert (s1.model.depth, s1.model.heads, s1.mae.decoder_depth, s1.mae.mask_ratio) == (6, 5, 2, 0.7)
    assert (s1.optim.lr, s1.optim.weight_decay, s1.optim.warmup_epochs) == (3e-3, 1e-4, 10.0)
    s2 = load_config(PretrainConfig, ROOT / "configs/pretrain/vita_stage2.yaml")
    assert (s2.tabular.temperature, s2.tabular.loss_weight, s2.tabular.projection_dim) == (0.1, 0.5, 128)
    assert (s2.tabular.image_mask_ratio, s2.train.global_batch) == (0.5, 256)
    mc = load_config(PretrainConfig, ROOT / "configs/pretrain/metaclip_cmr.yaml")
    assert (mc.metaclip.alpha_modality, mc.metaclip.beta_view, mc.metaclip.projection_dim) == (0.05, 0.05, 256)
    assert (mc.metaclip.slices, mc.metaclip.max_frames, mc.train.epochs) == (3, 4, 30)


def test_config_cli_reports_bad_keys_and_types():
    cmd = [sys.executable, "-m", "pretrain", "config", "--config", "configs/pretrain/vita_stage1_tiny.yaml"]
    ok = subprocess.run(cmd + ["train.zero_stage=3"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "zero_stage: 3" in ok.stdout
    bad = subprocess.run(cmd + ["optim.lrr=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr and "optim.lr" in bad.stderr
    bad = subprocess.run(cmd + ["train.zero_stage=4"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "train.zero_stage" in bad.stderr


def _examples(package: str) -> list[list[str]]:
    """The command lines of a package's `--help` examples (continuations joined, trailing comments dropped), as
    arguments after `-m PACKAGE` / `--module PACKAGE`; lines with a `...` placeholder are left out."""
    import importlib
    import shlex

    epilog = importlib.import_module(f"{package}.__main__").EPILOG
    text = epilog.split("examples:", 1)[1].replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = re.split(r"\s#|\s{3,}\(|\s{3,}#", line)[0].strip()
        if f"-m {package} " not in line + " " and f"--module {package} " not in line + " ":
            continue  # prose between the examples
        words = shlex.split(line)
        for i, w in enumerate(words[:-1]):
            if w in ("-m", "--module") and words[i + 1] == package and "..." not in words:
                out.append(words[i + 2:])
    return out


@pytest.mark.parametrize("package", PACKAGES[1:])
def test_help_examples_parse_and_their_configs_validate(package):
    """Every example in `python -m PACKAGE --help` parses, and where it names a config and overrides, they load
    against the command's schema (an example with a wrong key, such as run.out_dir, fails here)."""
    import importlib

    from data_prep.kspace.job import KSpaceJobConfig
    from data_prep.ukb.job import UKBJobConfig
    from data_prep.synth.cohort import SynthConfig
    from finetune.config import FinetuneConfig
    from finetune.scaling import ScalingConfig
    from pretrain.config import PretrainConfig

    schemas = {("finetune", c): FinetuneConfig for c in ("train", "compare", "probe", "config")} | {
        ("finetune", "scaling"): ScalingConfig, ("pretrain", "train"): PretrainConfig,
        ("pretrain", "config"): PretrainConfig, ("data_prep", "synth"): SynthConfig,
        ("data_prep", "ukb"): UKBJobConfig, ("data_prep", "kspace"): KSpaceJobConfig}
    examples = _examples(package)
    assert len(examples) >= 3, examples
    parser = importlib.import_module(f"{package}.__main__").build_parser()
    for argv in examples:
        args = parser.parse_args(argv)  # an unknown option or subcommand exits here
        schema = schemas.get((package, argv[0]))
        if schema is not None and getattr(args, "overrides", None) is not None:
            overrides = [o for o in args.overrides if "=" in o]
            load_config(schema, getattr(args, "config", None), overrides)
