"""The contrastive batch under gradient accumulation (`pretrain.gradcache`), through the real DeepSpeed engine on CPU.

Both contrastive stages (ViTa Stage II, MetaCLIP-CMR), on 1 and 2 ranks with 1, 2 and 4 micro-steps of
accumulation: one optimizer step's loss and gradients (read back from an SGD step, lr 1: the parameters move by
exactly the gradient) must equal those of one process holding the whole global batch. Without accumulation the
loss is computed per micro-step as before; with it, GradCache.

- `test_every_split_of_the_global_batch_is_one_process`: no randomness in the features (no masking, corruption or
  dropout), so every (ranks, accumulation) split equals the plain one-process step on the
  whole batch at once.
- `test_gradcache_repeats_the_masks_and_dropout`: masking, SCARF corruption (over each micro-batch) and text
  dropout on; the reference is plain autograd in one process over the same micro-batches
  with the same generators and RNG seeds, all concatenated into one loss.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from conftest import spawn_ranks

pytestmark = pytest.mark.slow  # not in `make test-fast`

G = 8  # the global batch
LR = 1.0
SPLITS = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)]  # (ranks, accumulation steps)
# with randomness: accumulation, and micro-batches of >= 2 (SCARF swaps entries between the samples of one)
RANDOM_SPLITS = [(w, a) for w, a in SPLITS if a > 1 and G // (w * a) >= 2]
CORPUS = ["cine short-axis 1.5 T siemens", "cine long-axis 4ch 3 T philips", "lge short-axis 1.5 T ge",
          "t1 mapping short-axis 3 T siemens", "t2 mapping long-axis 1.5 T siemens"]
ROOT = Path(__file__).resolve().parents[1]


def _cfg(stage: str, random: bool, accumulation: int, world: int):
    from core.config import load_config
    from pretrain.config import PretrainConfig

    micro = G // (world * accumulation)
    name = {"tabular_clip": "vita_stage2_tiny.yaml", "metaclip": "metaclip_cmr_tiny.yaml"}[stage]
    ov = [f"train.global_batch={G}", f"train.micro_batch={micro}", "train.activation_checkpointing=false",
          "checkpoint.init_from=null", "optim.grad_clip=0.0"]
    if stage == "tabular_clip":
        # (BatchNorm over the pooled features stays off: over 2-4 nearly equal features it amplifies float32
        # rounding past any useful tolerance)
        ov += [f"tabular.image_mask_ratio={0.5 if random else 0.0}", f"tabular.corruption={0.3 if random else 0.0}"]
    return load_config(PretrainConfig, ROOT / "configs/pretrain" / name, ov)


def _model(cfg, random: bool):
    from pretrain.models.clip import ImageTabularCLIP
    from pretrain.models.metaclip import MetaCLIP

    torch.manual_seed(0)
    if cfg.stage == "tabular_clip":
        model = ImageTabularCLIP(cfg.model, cfg.tabular, _schema())
    else:
        model = MetaCLIP(cfg.model, cfg.metaclip, CORPUS, seed=0)
    if not random:  # the text encoder's dropout off: features depend on the samples only
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model


@functools.lru_cache(maxsize=1)
def _schema():
    from data_prep.ukb.feature_spec import load_feature_spec
    from data_prep.ukb.features import feature_schema

    return feature_schema(load_feature_spec())[:12]


def _batch(stage: str) -> dict:
    """The whole global batch, rows in (rank, micro-step) order."""
    g = torch.Generator().manual_seed(5)
    if stage == "tabular_clip":
        from pretrain.models.tabular import random_table

        torch.manual_seed(5)
        values, missing = random_table(_schema(), G)
        return {"images": torch.rand(G, 6, 5, 32, 32, generator=g), "tab_values": values, "tab_missing": missing}
    valid = torch.rand(G, 12, generator=g) > 0.3
    valid[:, 0] = True
    texts = [CORPUS[i % 3] for i in range(G)]  # repeated sentences: soft targets and the retrieval check see them
    return {"images": torch.rand(G, 12, 32, 32, generator=g), "valid": valid, "texts": texts,
            "modality": torch.tensor([i % 3 for i in range(G)]), "view": torch.tensor([i % 2 for i in range(G)]),
            "view_valid": torch.tensor([i % 4 != 3 for i in range(G)])}


def _rows(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def _micro_batches(batch: dict, world: int, accumulation: int, rank: int) -> list[dict]:
    micro = G // (world * accumulation)
    first = rank * accumulation
    return [_rows(batch, (first + m) * micro, (first + m + 1) * micro) for m in range(accumulation)]


def _generators(world: int, accumulation: int, rank: int) -> list:
    from pretrain.train import _generator

    return [functools.partial(_generator, 0, 0, m, rank) for m in range(accumulation)]


def _engine_step(stage: str, random: bool, world: int, accumulation: int, rank: int) -> dict:
    """This rank's part of one real training step through the DeepSpeed engine."""
    import deepspeed

    from pretrain.stages import get_stage
    from pretrain.train import deepspeed_config

    cfg = _cfg(stage, random, accumulation, world)
    model = _model(cfg, random)
    ds = deepspeed_config(cfg, world)
    assert ds["gradient_accumulation_steps"] == accumulation
    ds["zero_allow_untested_optimizer"] = True  # plain SGD: the step moves each parameter by its gradient
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=ds)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)  # dropout's stream at the step's start, the same on every rank
    outs = get_stage(stage).train_step(engine, _micro_batches(_batch(stage), world, accumulation, rank),
                                       _generators(world, accumulation, rank), world, torch.device("cpu"))
    grads = {n: (before[n] - p.detach()) / LR for n, p in model.named_parameters()}
    return {"loss": outs[0]["loss"].detach().clone(), "grads": grads}


def _reference(stage: str, random: bool, world: int, accumulation: int) -> dict:
    """One process, plain autograd: every rank's micro-batches embedded as the run embeds them (same generators,
    same dropout seed per rank), concatenated, one loss over the whole global batch."""
    from pretrain.gradcache import _concat

    cfg = _cfg(stage, random, accumulation, world)
    model = _model(cfg, random)
    feats = []
    for rank in range(world):
        torch.manual_seed(123)
        for inputs, gen in zip(_micro_batches(_batch(stage), world, accumulation, rank),
                               _generators(world, accumulation, rank)):
            feats.append(model(**inputs, generator=gen(), features_only=True))
    loss = model.contrastive_loss(_concat(feats))["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                             for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, cases: list) -> dict:
    return {case: _engine_step(*case[:2], world, case[2], rank) for case in cases}


@pytest.fixture(scope="module")
def engine_steps(tmp_path_factory):
    """{(stage, random, world, accumulation): per-rank results}: one spawn per world size, every case in it."""
    results = {}
    for world in (1, 2):
        cases = [(s, r, a) for s in ("tabular_clip", "metaclip") for r in (False, True) for w, a in SPLITS
                 if w == world and (not r or (w, a) in RANDOM_SPLITS)]
        tmp = tmp_path_factory.mktemp(f"w{world}")
        per_rank = spawn_ranks(_worker, world, tmp, world, cases, timeout=600)
        for stage, random, accumulation in cases:
            results[(stage, random, world, accumulation)] = [r[(stage, random, accumulation)] for r in per_rank]
    return results


def _assert_equal(got: dict, ref: dict, what: str, tol: float = 1e-4) -> None:
    """The loss, and every parameter's gradient (`tol` of the tensor's largest entry: float32 rounding)."""
    assert torch.allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6), (what, got["loss"], ref["loss"])
    moved = 0
    for n, g in ref["grads"].items():
        # float32 noise: `tol` of the tensor's largest entry; a wrong mask, a missing micro-batch or a scale of W
        # or A is off by far more
        assert torch.allclose(got["grads"][n], g, rtol=1e-3, atol=tol * g.abs().max().item() + 1e-7), \
            (what, n, (got["grads"][n] - g).abs().max().item(), g.abs().max().item())
        moved += int(g.abs().max() > 1e-4)
    assert moved > 10, (what, "too few parameters with a gradient to compare")


@pytest.mark.parametrize("stage", ["tabular_clip", "metaclip"])
def test_every_split_of_the_global_batch_is_one_process(engine_steps, stage):
    ref = _reference(stage, False, 1, 1)  # the whole global batch in one forward
    for world, accumulation in SPLITS:
        for rank, got in enumerate(engine_steps[(stage, False, world, accumulation)]):
            _assert_equal(got, ref, f"{stage}: {world} ranks x {accumulation} micro-steps, rank {rank}")


@pytest.mark.parametrize("stage", ["tabular_clip", "metaclip"])
def test_gradcache_repeats_the_masks_and_dropout(engine_steps, stage):
    for world, accumulation in RANDOM_SPLITS:
        ref = _reference(stage, True, world, accumulation)
        for rank, got in enumerate(engine_steps[(stage, True, world, accumulation)]):
            _assert_equal(got, ref, f"{stage} (random): {world} ranks x {accumulation} micro-steps, rank {rank}")
    # and the randomness is real: without the cached masks the micro-batches would embed differently
    a, b = _reference(stage, True, 1, 2), _reference(stage, True, 1, 4)
    assert not torch.allclose(a["loss"], b["loss"], rtol=1e-4)
