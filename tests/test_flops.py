"""The analytic FLOPs behind the trainer's MFU (`flops_per_sample` for Stage I, `clip_flops_per_sample` for
Stage II) against an independent count: torch.utils.flop_counter.FlopCounterMode over a real forward / forward +
backward. The counter sees matmuls, convolutions and SDPA (decomposed into matmuls by the math backend); like the
analytic count it leaves out softmax, LayerNorm, GELU, embedding lookups and elementwise work. The only counted
ops outside the formula are the CLIP loss' logits (B x B x projection_dim), negligible at these sizes. Paper-scale
models are counted on the meta device (shapes only, no memory, no compute). CPU, a few seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config
from data_prep.ukb.feature_spec import load_feature_spec
from data_prep.ukb.features import feature_schema
from pretrain.config import MAEConfig, PretrainConfig, TabularConfig, ViTConfig
from pretrain.models.clip import ImageTabularCLIP, clip_flops_per_sample
from pretrain.models.tabular import random_table
from pretrain.models.vit import Attention, MaskedAutoencoder, blocks_flops, flops_per_sample, num_tokens, visible_tokens

ROOT = Path(__file__).resolve().parents[1]
VIT = ViTConfig(img_size=32, sa_planes=3, la_planes=3, frames=5, patch=(5, 8, 8), dim=64, depth=2, heads=4)
TAB = TabularConfig(dim=48, depth=2, heads=4, projection_dim=16, image_mask_ratio=0.5)
# the schema the UK Biobank conversion writes to manifest["tabular"]["features"]: 117 features, one token each
SCHEMA = feature_schema(load_feature_spec(ROOT / "configs/data_prep/ukb_features.yaml"))


def counted_flops(fn) -> int:
    # the math backend decomposes SDPA into matmuls the counter sees (it has no formula for the CPU flash op)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unpadded(model: torch.nn.Module) -> torch.nn.Module:
    """Model FLOPs count each head at its own dim (205, not the 208 the attention call pads it to for the fused
    kernels: zero channels are kernel work, not model work, as flash's own padding was), so the counter runs the
    unpadded attention."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.pad = 0
    return model


def stage2_inputs(vit: ViTConfig, b: int, device: str = "cpu") -> dict:
    """What `pretrain.train.model_inputs` hands the model: images, tabular values, missing flags."""
    values, missing = random_table(SCHEMA, b)
    images = torch.rand(b, vit.sa_planes + vit.la_planes, vit.frames, vit.img_size, vit.img_size)
    return {"images": images.to(device), "tab_values": values.to(device), "tab_missing": missing.to(device)}


def test_stage2_flops_match_flop_counter():
    torch.manual_seed(0)
    model = unpadded(ImageTabularCLIP(VIT, TAB, SCHEMA))
    x = stage2_inputs(VIT, 2)
    fwd = counted_flops(lambda: model(**x)) / 2
    train = counted_flops(lambda: model(**x)["loss"].backward()) / 2
    assert model.flops_per_sample() == clip_flops_per_sample(VIT, TAB, len(SCHEMA))
    assert fwd == pytest.approx(clip_flops_per_sample(VIT, TAB, len(SCHEMA), train=False), rel=0.01)
    assert train == pytest.approx(clip_flops_per_sample(VIT, TAB, len(SCHEMA), train=True), rel=0.01)
    # activation checkpointing runs each block's forward again in the backward pass, up to the last tensor the
    # backward needs (non-reentrant checkpoint stops early: the MLP's second linear is not recomputed); model
    # FLOPs (hence MFU) do not count that work
    model.set_grad_checkpointing(True)
    n_img, n_tab = visible_tokens(num_tokens(VIT), TAB.image_mask_ratio), len(SCHEMA)
    recompute = (blocks_flops(n_img, VIT.dim, VIT.depth, 4.0) - VIT.depth * 2 * n_img * VIT.dim * 4 * VIT.dim
                 + blocks_flops(n_tab, TAB.dim, TAB.depth, 4.0) - TAB.depth * 2 * n_tab * TAB.dim * 4 * TAB.dim)
    ckpt = counted_flops(lambda: model(**x)["loss"].backward()) / 2
    assert ckpt == pytest.approx(train + recompute, rel=0.01)


@pytest.mark.parametrize("config", ["vita_stage1.yaml", "vita_stage2.yaml"])
def test_paper_scale_flops_match_flop_counter(config):
    """The paper's shapes (width 1025, 2304 image tokens, 117 tabular tokens), counted on the meta device."""
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain" / config, [])
    with torch.device("meta"):
        if cfg.stage == "mae":
            model, x = MaskedAutoencoder(cfg.model, cfg.mae), {"images": stage2_inputs(cfg.model, 1, "meta")["images"]}
            expected = flops_per_sample(cfg.model, cfg.mae, train=True)
        else:
            model, x = ImageTabularCLIP(cfg.model, cfg.tabular, SCHEMA), stage2_inputs(cfg.model, 1, "meta")
            model.tabular.validate = False  # its input check reads a value back: meta tensors have none
            expected = model.flops_per_sample()
    assert counted_flops(lambda: unpadded(model)(**x)["loss"].backward()) == pytest.approx(expected, rel=0.01)
    assert expected == pytest.approx({"mae": 840e9, "tabular_clip": 642e9}[cfg.stage], rel=0.001)


def test_stage1_paper_config_still_counts_as_before():
    # regression guard on the Stage I formula the H100 MFU figures in BENCHMARKS.md were computed with
    assert flops_per_sample(ViTConfig(), MAEConfig(), train=True) == pytest.approx(839.93e9, rel=1e-4)
