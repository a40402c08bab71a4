"""bench/reference.py's `ReferenceMAE` (ViTa Stage I as the authors' code builds it) is the project's Stage I model:
the same parameter count (paper scale on the meta device, and tiny), the same matmul FLOPs per training sample
(torch.utils.flop_counter, math SDPA backend), trainable end to end, and, with the project's weights, positional
embeddings and LayerNorm eps mapped onto it, the same predictions, loss and gradients as `MaskedAutoencoder`.
CPU, a few seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config
from pretrain.config import MAEConfig, PretrainConfig, ViTConfig
from pretrain.models.vit import LN_EPS, MaskedAutoencoder, flops_per_sample, num_tokens, visible_tokens

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_reference", ROOT / "bench/reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

# 9 planes of 32² x 5 frames: L = 144, int(144 * 0.3) = round(144 * 0.3) = 43 kept (the authors truncate, the
# project rounds: the shapes must agree for the FLOPs to)
VIT = ViTConfig(img_size=32, sa_planes=6, la_planes=3, frames=5, patch=(5, 8, 8), dim=64, depth=2, heads=4)
MAE = MAEConfig(mask_ratio=0.7, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def images(b: int = 2, vit: ViTConfig = VIT) -> torch.Tensor:
    return torch.rand(b, vit.sa_planes + vit.la_planes, vit.frames, vit.img_size, vit.img_size)


def paper(overrides=()) -> PretrainConfig:
    return load_config(PretrainConfig, ROOT / "configs/pretrain/vita_stage1.yaml", list(overrides))


def reference_name(name: str) -> str:
    """The project's parameter name -> the reference's (the authors' module names)."""
    for old, new in (("encoder.blocks.", "encoder_imaging.encoder."),
                     ("encoder.norm.", "encoder_imaging.encoder_norm."),
                     ("encoder.", "encoder_imaging."),
                     ("decoder.blocks.", "decoder_imaging.decoder.network."),
                     ("decoder.norm.", "decoder_imaging.decoder.norm."),
                     ("decoder.embed.", "decoder_imaging.decoder_embed."),
                     ("decoder.head.", "decoder_imaging.recon_head."),
                     ("decoder.", "decoder_imaging.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(name)


@pytest.mark.parametrize("overrides", [[], ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024",
                                              "mae.decoder_heads=8"]], ids=["paper-1025x5", "1024x8"])
def test_paper_scale_parameter_count(overrides):
    cfg = paper(overrides)
    with torch.device("meta"):
        project, reference = MaskedAutoencoder(cfg.model, cfg.mae), ref.ReferenceMAE(cfg.model, cfg.mae)
    assert n_params(reference) == n_params(project)
    assert n_params(reference) == sum(p.numel() for p in reference.parameters())  # nothing frozen among them
    if not overrides:
        assert round(n_params(reference) / 1e5) == 1027  # 102.7 M
    # the authors' class token: one more vector of width dim
    with torch.device("meta"):
        assert n_params(ref.ReferenceMAE(cfg.model, cfg.mae, cls_token=True)) == n_params(project) + cfg.model.dim


def test_tiny_parameter_count_and_names_map_one_to_one():
    project, reference = MaskedAutoencoder(VIT, MAE), ref.ReferenceMAE(VIT, MAE)
    assert n_params(reference) == n_params(project)
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    assert {reference_name(n): p.shape for n, p in project.named_parameters()} == shapes


@pytest.mark.parametrize("cfg_fn", [lambda: (VIT, MAE), lambda: (paper().model, paper().mae)], ids=["tiny", "paper"])
def test_masking_keeps_the_projects_token_count(cfg_fn):
    """The authors keep int(L * (1 - ratio)) tokens, the project round(...): equal at the benchmarked shapes."""
    vit, mae = cfg_fn()
    L = num_tokens(vit)
    assert int(L * (1 - mae.mask_ratio)) == visible_tokens(L, mae.mask_ratio)
    x = torch.zeros(3, L, 4)
    kept, mask, ids_restore = ref.random_masking(x, mae.mask_ratio)
    assert kept.shape == (3, visible_tokens(L, mae.mask_ratio), 4)
    assert (mask.sum(1) == L - kept.shape[1]).all()
    assert (ids_restore.sort(dim=1).values == torch.arange(L)).all()  # a permutation per sample


def counted_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_matmul_flops_equal_the_projects():
    torch.manual_seed(0)
    project, reference = MaskedAutoencoder(VIT, MAE), ref.ReferenceMAE(VIT, MAE)
    x = images(2)
    theirs = counted_flops(lambda: reference(x)[0].backward())
    ours = counted_flops(lambda: project(x)["loss"].backward())
    assert theirs == ours == 2 * flops_per_sample(VIT, MAE, train=True)
    # timm >= 0.9's fused attention is the same computation
    fused = ref.ReferenceMAE(VIT, MAE, fused_attn=True)
    assert counted_flops(lambda: fused(x)[0].backward()) == ours


@pytest.mark.parametrize("kw", [{}, {"fused_attn": True}, {"cls_token": True, "mask_loss": True}])
def test_trains_finite_loss_and_gradient_for_every_parameter(kw):
    torch.manual_seed(0)
    reference = ref.ReferenceMAE(VIT, MAE, **kw)
    x = images(2)
    loss, pred, mask = reference(x)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, num_tokens(VIT), 5 * 8 * 8)
    assert ((pred >= 0) & (pred <= 1)).all()  # the authors' sigmoid
    for name, p in reference.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the authors' Stage I loss (mask_loss: False) is the MSE over every patch, visible ones included
    if not kw.get("mask_loss"):
        assert torch.allclose(loss, F.mse_loss(pred, ref.patchify(x, VIT.patch)))


def test_positional_embedding_layout():
    """The authors' layout: view channel first (1 short axis, 0 long axis), then sin|cos of each grid axis (plane,
    t, y, x); a zero row for the class token; at width 1025 no leftover channels (their assert holds)."""
    pe = ref.sincos_pos_embed(1025, paper().model, cls_token=True)
    assert pe.shape == (1, 1 + 2304, 1025)
    assert (pe[0, 0] == 0).all()
    view = pe[0, 1:, 0]
    assert (view[: 6 * 256] == 1).all() and (view[6 * 256:] == 0).all()
    used = pe[0, 1:].abs().sum(0) > 0
    # with one temporal patch (5 frames / 5) the t coordinate is always 0: its 128 sines are zero, nothing else
    assert (~used[1 + 256: 1 + 256 + 128]).all() and used[1 + 256 + 128:].all() and used[1: 1 + 256].all()
    x_sin = pe[0, 1 + 2 * 16 + 3, 1 + 3 * 256: 1 + 3 * 256 + 128]  # x = 3 of token (plane 0, t 0, y 2, x 3)
    torch.testing.assert_close(x_sin, (3 * 10000 ** (-torch.arange(128) / 128)).sin())
    small = ref.sincos_pos_embed(64, VIT, cls_token=False)
    assert small.shape == (1, 144, 64) and (small[0, :, 57:] == 0).all()  # 4 x 14 channels, then zeros


def test_same_outputs_loss_and_gradients_as_the_project_on_mapped_weights():
    """The strongest check: the project's weights copied one to one into the reference, the project's fixed
    positional embeddings and LayerNorm eps, the sigmoid off and the loss on masked patches (as the project):
    the same masks (same RNG draw), predictions, loss and every gradient. float64, so that the two attention paths
    (explicit softmax against SDPA) agree to rounding."""
    torch.manual_seed(0)
    project = MaskedAutoencoder(VIT, MAE).double()
    reference = ref.ReferenceMAE(VIT, MAE, sigmoid=False, mask_loss=True).double()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in project.named_parameters():
            params[reference_name(name)].copy_(p)
        reference.encoder_imaging.enc_pos_embed.copy_(project.encoder.pos_embed[None])
        reference.decoder_imaging.dec_pos_embed.copy_(project.decoder.pos_embed[None])
    for m in reference.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = LN_EPS
    x = images(2).double()
    torch.manual_seed(1)
    out = project(x)
    torch.manual_seed(1)
    loss, pred, mask = reference(x)
    assert torch.equal(mask.bool(), out["mask"])
    torch.testing.assert_close(pred, out["pred"])
    # the project reduces its loss in float32
    torch.testing.assert_close(loss.float(), out["loss"], rtol=1e-6, atol=1e-7)
    out["loss"].backward()
    loss.backward()
    for name, p in project.named_parameters():
        torch.testing.assert_close(params[reference_name(name)].grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)
