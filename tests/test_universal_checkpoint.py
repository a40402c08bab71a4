"""A checkpoint saved on one number of ranks, resumed on another through DeepSpeed's universal conversion
(`pretrain.checkpoint.load(..., universal=True)`): every parameter's fp32 master copy, both AdamW moments, AdamW's
step count and the learning-rate schedule come back exactly, for ZeRO-0/1/2/3 and every stage (Stage I and both
contrastive stages), from 2 ranks to 1 and from 1 to 2.

Each rank builds the engine the trainer builds (`pretrain.train.build_engine`), takes two optimizer steps with two
micro-steps of accumulation, saves with `pretrain.checkpoint.save`, and records the consolidated training state
(`deepspeed.utils.safe_get_full_*`: every partition gathered). A fresh engine on the other number of ranks, from
other initial weights, loads the checkpoint and must hold the same state, bit for bit. The fused-AdamW cases'
checkpoint directories are named "mae+fused-z<N>": DeepSpeed's conversion tool reads its paths as regular
expressions, and a "+" in a run directory broke it (`checkpoint.to_universal` now hands it a plain-named link).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from conftest import spawn_ranks
from test_gradcache import G, _batch, _micro_batches, _model

pytestmark = pytest.mark.slow  # not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("mae", "tabular_clip", "metaclip", "mae+fused")  # +fused: torch's fused AdamW (`optim.fused`)
ZERO = (0, 1, 2, 3)
ACCUMULATION, STEPS = 2, 2
CONFIGS = {"mae": "vita_stage1_tiny.yaml", "tabular_clip": "vita_stage2_tiny.yaml", "metaclip": "metaclip_cmr_tiny.yaml"}


def _cfg(stage: str, zero: int, world: int):
    from core.config import load_config
    from pretrain.config import PretrainConfig

    base, _, variant = stage.partition("+")
    return load_config(PretrainConfig, ROOT / "configs/pretrain" / CONFIGS[base],
                       [f"optim.fused={variant == 'fused'}", f"train.global_batch={G}",
                        f"train.micro_batch={G // (world * ACCUMULATION)}",
                        f"train.zero_stage={zero}", "train.activation_checkpointing=false",
                        "checkpoint.init_from=null", "optim.warmup_epochs=1"])


def _build(stage: str, zero: int, world: int, universal: bool, perturb: bool):
    from pretrain.models.vit import MaskedAutoencoder
    from pretrain.train import build_engine

    cfg = _cfg(stage, zero, world)
    if stage.startswith("mae"):
        torch.manual_seed(0)
        model = MaskedAutoencoder(cfg.model, cfg.mae)
    else:
        model = _model(cfg, random=True)
    if perturb:  # the resumed engine starts from other weights: only the load can make them equal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    # 4 steps per epoch, 1 warm-up epoch: the schedule's factor changes at every step
    return build_engine(cfg, model, world, steps_per_epoch=4, universal=universal)


def _inputs(stage: str) -> dict:
    if stage.startswith("mae"):
        g = torch.Generator().manual_seed(5)
        return {"images": torch.rand(G, 6, 5, 32, 32, generator=g)}
    return _batch(stage)


def _optimizer_steps(engine) -> list[int]:
    """AdamW's step count of every state it holds (ZeRO-0: the torch optimizer itself; 1-3: DeepSpeed's wrapper)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({int(s["step"]) for s in opt.state.values() if "step" in s})


def _full_state(engine) -> dict:
    """Collective. The consolidated training state: per parameter its fp32 master copy and both AdamW moments."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() in (1, 2):
        # DeepSpeed links each parameter to its slice of the optimizer state after the first parameter group's
        # first step, before the other groups have any state (`_lazy_init_hp_params_optimizer_state`): link again
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:  # not partitioned: the parameter and torch's AdamW state
            st = engine.optimizer.state[p]
            params[name] = [p.detach().float(), st["exp_avg"], st["exp_avg_sq"]]
        else:
            params[name] = [safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                            safe_get_full_optimizer_state(p, "exp_avg_sq")]
        params[name] = [t.detach().clone().cpu() for t in params[name]]
    torch_adamw = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"params": params, "adam_steps": _optimizer_steps(engine), "lr": engine.lr_scheduler.get_last_lr(),
            "fused": bool(torch_adamw.defaults.get("fused")),
            "scheduler_epoch": engine.lr_scheduler.last_epoch}


def _save_worker(rank: int, world: int, ckpt_root: str, cases: list) -> dict:
    from pretrain import checkpoint
    from pretrain.stages import get_stage
    from pretrain.train import _generator

    out = {}
    for stage, zero in cases:
        engine = _build(stage, zero, world, universal=False, perturb=False)
        for step in range(STEPS):
            micro = _micro_batches(_inputs(stage), world, ACCUMULATION, rank)
            gens = [functools.partial(_generator, 0, step, m, rank) for m in range(ACCUMULATION)]
            get_stage(stage.partition("+")[0]).train_step(engine, micro, gens, world, torch.device("cpu"))
        checkpoint.save(engine, Path(ckpt_root) / f"{stage}-z{zero}", STEPS, {"samples": STEPS * G},
                        {"loader": {}}, keep=2)
        out[(stage, zero)] = _full_state(engine)
    return out


def _load_worker(rank: int, world: int, ckpt_root: str, cases: list) -> dict:
    from pretrain import checkpoint

    out = {}
    for stage, zero in cases:
        ckpt = Path(ckpt_root) / f"{stage}-z{zero}"
        tag = checkpoint.latest_tag(ckpt)
        universal = checkpoint.needs_universal(ckpt, tag, world)
        assert universal == (zero > 0), (stage, zero)  # a ZeRO-0 checkpoint loads as it is
        engine = _build(stage, zero, world, universal=universal, perturb=True)
        client = checkpoint.load(engine, ckpt, tag, universal)
        assert client["step"] == STEPS and client["mine"] is None  # another world size: no per-rank state
        out[(stage, zero)] = _full_state(engine)
    return out


CASES = [(s, z) for s in STAGES for z in ZERO]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """{(direction, stage, zero): (saved state, resumed state)}, direction "2->1" and "1->2"."""
    out = {}
    for before, after in ((2, 1), (1, 2)):
        root = tmp_path_factory.mktemp(f"ckpt{before}{after}")
        saved = spawn_ranks(_save_worker, before, tmp_path_factory.mktemp("save"), before, str(root), CASES,
                            timeout=900)
        loaded = spawn_ranks(_load_worker, after, tmp_path_factory.mktemp("load"), after, str(root), CASES,
                             timeout=900)
        for case in CASES:
            for r in range(after):  # every rank holds (a partition of) the same state
                out[(f"{before}->{after}", *case, r)] = (saved[0][case], loaded[r][case])
    return out


@pytest.mark.parametrize("direction", ["2->1", "1->2"])
@pytest.mark.parametrize("stage", STAGES)
def test_universal_resume_restores_weights_and_optimizer_state(resumed, direction, stage):
    for zero in ZERO:
        for rank in range(int(direction[-1])):
            saved, loaded = resumed[(direction, stage, zero, rank)]
            what = f"{stage}, ZeRO-{zero}, {direction} ranks, rank {rank}"
            assert saved["adam_steps"] == [STEPS] and loaded["adam_steps"] == [STEPS], (what, saved, loaded)
            assert loaded["scheduler_epoch"] == saved["scheduler_epoch"] == STEPS, what
            assert saved["fused"] == loaded["fused"] == stage.endswith("+fused"), what
            assert loaded["lr"] == saved["lr"], what
            assert loaded["params"].keys() == saved["params"].keys(), what
            moved = 0
            for name, (w, m, v) in saved["params"].items():
                lw, lm, lv = loaded["params"][name]
                assert torch.equal(lw, w), (what, name, "weights", (lw - w).abs().max().item())
                assert torch.equal(lm, m), (what, name, "exp_avg", (lm - m).abs().max().item())
                assert torch.equal(lv, v), (what, name, "exp_avg_sq", (lv - v).abs().max().item())
                moved += int(m.abs().max() > 0)
            assert moved > 10, (what, "too few parameters with optimizer state to compare")
