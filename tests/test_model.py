"""ViTa Stage I model (pretrain/models/vit.py) on a tiny configuration, CPU only, a few seconds in all."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import MAEConfig, ViTConfig
from pretrain.models.vit import (Attention, Block, MaskedAutoencoder, PatchEmbed3D, ViTEncoder, axis_channels,
                                 flops_per_sample, num_tokens, padded_head_dim, patchify, pos_embed, random_masking,
                                 sdpa_backend_report, unpatchify, visible_tokens)

VIT = ViTConfig(img_size=32, sa_planes=3, la_planes=3, frames=5, patch=(5, 8, 8), dim=64, depth=2, heads=4)
MAE = MAEConfig(mask_ratio=0.7, decoder_dim=32, decoder_depth=1, decoder_heads=4)
P, L, K = 6, 6 * 1 * 4 * 4, 5 * 8 * 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(b: int = 2, cfg: ViTConfig = VIT, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(b, cfg.sa_planes + cfg.la_planes, cfg.frames, cfg.img_size, cfg.img_size).to(dtype)


def smooth_images(b: int, cfg: ViTConfig = VIT) -> torch.Tensor:
    """Low-frequency sinusoids in x, y, t with random phases per plane, in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    n = cfg.sa_planes + cfg.la_planes
    t = torch.linspace(0, 1, cfg.frames)[:, None, None]
    y = torch.linspace(0, 1, cfg.img_size)[None, :, None]
    x = torch.linspace(0, 1, cfg.img_size)[None, None, :]
    ph = torch.rand(b, n, 3, generator=g) * 2 * math.pi
    out = (torch.sin(2 * math.pi * x + ph[..., 0, None, None, None])
           * torch.cos(math.pi * y + ph[..., 1, None, None, None])
           + 0.5 * torch.sin(math.pi * t + ph[..., 2, None, None, None]))
    return ((out + 1.5) / 3.0).clamp(0, 1)


# --- shapes and dtypes -------------------------------------------------------------------------------------------
def test_shapes():
    assert num_tokens(VIT) == L
    x = images(2, dtype=torch.float16)  # the stored sample dtype
    enc = ViTEncoder(VIT)
    assert enc.pos_embed.shape == (L, 64) and "pos_embed" not in enc.state_dict()
    assert enc.patch_embed(x).shape == (2, L, 64)
    latent, mask, ids = enc(x, mask_ratio=0.7)
    lv = visible_tokens(L, 0.7)
    assert lv == 29 and latent.shape == (2, lv, 64) and mask.shape == (2, L) and mask.dtype == torch.bool
    assert ids.shape == (2, L)
    assert enc.forward_features(x).shape == (2, L, 64)
    feats = enc.intermediate_layers(x, [0, -1])
    assert len(feats) == 2 and all(f.shape == (2, L, 64) for f in feats)
    torch.testing.assert_close(enc.norm(feats[1]), enc.forward_features(x))
    assert enc.patchify(x).shape == (2, L, K) and enc.unpatchify(enc.patchify(x)).shape == x.shape

    model = MaskedAutoencoder(VIT, MAE)
    out = model(x)
    assert set(out) == {"loss", "pred", "mask", "psnr"}
    assert out["pred"].shape == (2, L, K) and out["mask"].shape == (2, L)
    assert out["loss"].shape == () and out["psnr"].shape == () and torch.isfinite(out["psnr"])
    assert model.reconstruct(x, out["pred"], out["mask"]).shape == x.shape
    assert model.encoder is not None and isinstance(model.encoder, ViTEncoder)


def test_low_precision_dtypes():
    x = images(2, dtype=torch.float16)
    model = MaskedAutoencoder(VIT, MAE).to(torch.bfloat16)  # computes in the module's dtype
    out = model(x)
    assert out["pred"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])
    out["loss"].backward()
    model = MaskedAutoencoder(VIT, MAE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["pred"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])


# --- masking -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.75, 0.9])
def test_masking_fraction_and_determinism(ratio):
    x = torch.randn(4, L, 8)
    xv, mask, ids = random_masking(x, ratio, torch.Generator().manual_seed(3))
    keep = L if ratio == 0 else round(L * (1 - ratio))
    assert xv.shape == (4, keep, 8)
    assert (mask.sum(1) == L - keep).all()
    assert (ids.sort(1).values == torch.arange(L)).all()  # a permutation
    for b in range(4):  # the visible tokens are exactly the unmasked ones
        got = xv[b][ids[b][~mask[b]]]  # ids_restore = rank in the shuffle -> visible tokens in original order
        torch.testing.assert_close(got, x[b][~mask[b]], rtol=0, atol=0)
    xv2, mask2, ids2 = random_masking(x, ratio, torch.Generator().manual_seed(3))
    assert torch.equal(mask, mask2) and torch.equal(ids, ids2) and torch.equal(xv, xv2)
    if ratio == 0:
        assert torch.equal(xv, x) and not mask.any()
    else:
        assert len({tuple(m.tolist()) for m in mask}) == 4  # different across samples
        _, mask3, _ = random_masking(x, ratio, torch.Generator().manual_seed(4))
        assert not torch.equal(mask, mask3)


def test_encoder_masking_is_seeded():
    enc = ViTEncoder(VIT)
    x = images(3)
    a = enc(x, 0.7, torch.Generator().manual_seed(5))
    b = enc(x, 0.7, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert (a[1].sum(1) == L - 29).all()


# --- positional embedding ----------------------------------------------------------------------------------------
def test_axis_split():
    assert axis_channels(1025) == (256, 256, 256, 256)
    assert axis_channels(64) == (16, 16, 16, 14)
    assert axis_channels(32) == (8, 8, 8, 6)
    with pytest.raises(ValueError):
        axis_channels(8)


@pytest.mark.parametrize("dim", [64, 32, 1025])
def test_pos_embed_distinguishes_views(dim):
    pe = pos_embed(VIT, dim)  # 3 SA planes, 3 LA views: the two grids have the same positions
    assert pe.shape == (L, dim)
    sa, la = pe[: L // 2], pe[L // 2:]
    assert (sa[:, -1] == 1).all() and (la[:, -1] == -1).all()  # the view channel
    torch.testing.assert_close(sa[:, :-1], la[:, :-1], rtol=0, atol=0)  # identical (x, y, t, plane) otherwise
    assert torch.unique(pe, dim=0).shape[0] == L  # all positions distinct
    assert torch.unique(pe[:, :-1], dim=0).shape[0] == L // 2  # ... and only thanks to the view channel
    assert pe.abs().max() <= 1.0


def test_pos_embed_paper_and_uneven_views():
    paper = ViTConfig()
    pe = pos_embed(paper)
    assert pe.shape == (num_tokens(paper), 1025) == (9 * 16 * 16, 1025)
    assert torch.unique(pe, dim=0).shape[0] == pe.shape[0]
    cfg = replace(VIT, la_planes=2)  # the tiny YAML: 3 SA, 2 LA
    pe = pos_embed(cfg)
    n = L // 6
    torch.testing.assert_close(pe[3 * n:, :-1], pe[: 2 * n, :-1], rtol=0, atol=0)  # LA view j ~ SA slice j
    assert (pe[3 * n:, -1] == -1).all()


# --- attention ---------------------------------------------------------------------------------------------------
def explicit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    h, hd = attn.heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, h, hd).transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_explicit_softmax():
    attn = Attention(32, 4).double()
    for p in attn.parameters():  # non-trivial biases
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), rtol=0, atol=1e-10)
    again = Attention(32, 4).double()
    again.load_state_dict(attn.state_dict())
    torch.testing.assert_close(again(x), explicit_attention(attn, x), rtol=0, atol=1e-10)

    block = Block(32, 4).double()
    y = block.norm1(x)
    ref = x + explicit_attention(block.attn, y)
    ref = ref + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(ref))))
    torch.testing.assert_close(block(x), ref, rtol=0, atol=1e-10)


def test_head_dim_padding_is_exact():
    """The paper's 5 heads of 205 run padded to 208 inside the attention call (the fused GPU kernels need a
    multiple of 8); outputs and every gradient equal the unpadded attention's to fp32 tolerance, and against the
    explicit softmax in float64."""
    assert padded_head_dim(205) == 208 and padded_head_dim(16) == 16 and padded_head_dim(1) == 8
    torch.manual_seed(0)
    padded, plain = Attention(1025, 5), Attention(1025, 5, pad_head_dim=False)
    assert (padded.pad, plain.pad) == (3, 0)
    plain.load_state_dict(padded.state_dict())  # same parameters, same shapes
    for p in padded.parameters():
        torch.nn.init.normal_(p, std=0.05)
    plain.load_state_dict(padded.state_dict())
    x = torch.randn(2, 37, 1025)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = padded(xa), plain(xb)
    # fp32 over a width of 1025: the two differ by float summation order only (outputs of order 1)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    for (name, pa), pb in zip(padded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4, msg=name)
    x64 = x[:1, :9].double()
    torch.testing.assert_close(padded.double()(x64), explicit_attention(padded, x64), rtol=0, atol=1e-10)


def test_padded_head_dim_mae_equals_unpadded():
    """A whole MAE whose heads are not a multiple of 8 (60 / 4 = 15 -> 16): the same loss and gradients with and
    without the padding."""
    vit, mae = replace(VIT, dim=60, heads=4), MAEConfig(decoder_dim=36, decoder_depth=1, decoder_heads=4)
    torch.manual_seed(0)
    a = MaskedAutoencoder(vit, mae)
    b = MaskedAutoencoder(vit, mae)
    b.load_state_dict(a.state_dict())
    for m in b.modules():
        if isinstance(m, Attention):
            m.pad = 0
    assert all(m.pad == 1 for m in a.modules() if isinstance(m, Attention) and m.head_dim == 15)
    x = images(2)
    la = a(x, generator=torch.Generator().manual_seed(1))["loss"]
    lb = b(x, generator=torch.Generator().manual_seed(1))["loss"]
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_encoder_state_dict_round_trip():
    a = ViTEncoder(VIT).double()
    b = ViTEncoder(VIT).double()
    x = images(2).double()
    assert not torch.allclose(a.forward_features(x), b.forward_features(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.forward_features(x), b.forward_features(x), rtol=0, atol=1e-10)


def test_sdpa_backend_report_cpu():
    rep = sdpa_backend_report("cpu", torch.float32, heads=4, head_dim=16)
    assert "cpu" in rep and ("cpu-flash" in rep or "math" in rep)


# --- patches -----------------------------------------------------------------------------------------------------
def test_patchify_round_trip_and_token_order():
    x = images(2)
    p = patchify(x, VIT.patch)
    assert torch.equal(unpatchify(p, VIT.patch, x.shape[1:]), x)
    assert torch.equal(p[0, 0], x[0, 0, :5, :8, :8].flatten())  # first token: plane 0, top-left patch
    assert torch.equal(p[1, L // P + 1], x[1, 1, :5, :8, 8:16].flatten())  # plane 1, second patch in x
    embed = PatchEmbed3D(VIT.patch, 64).double()  # the conv tokens follow the same order
    w = embed.proj.weight.reshape(64, -1)
    torch.testing.assert_close(embed(x.double()), p.double() @ w.T + embed.proj.bias, rtol=0, atol=1e-10)


# --- loss --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_counts_masked_patches_only(norm_pix):
    model = MaskedAutoencoder(VIT, replace(MAE, norm_pix_loss=norm_pix))
    x = images(2)
    out = model(x, generator=torch.Generator().manual_seed(0))
    pred, mask = out["pred"].detach(), out["mask"]
    loss, psnr = model.forward_loss(x, pred, mask)
    torch.testing.assert_close(loss, out["loss"])
    changed = pred.clone()
    changed[~mask] += 10 * torch.randn_like(changed[~mask])
    loss2, psnr2 = model.forward_loss(x, changed, mask)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(psnr2, psnr, rtol=0, atol=0)
    changed = pred.clone()
    changed[mask] += 0.1
    assert not torch.equal(model.forward_loss(x, changed, mask)[0], loss)

    target = patchify(x, VIT.patch)  # explicit reference
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, ref)


def test_psnr_of_perfect_and_constant_predictions():
    model = MaskedAutoencoder(VIT, MAE)
    x = images(2)
    mask = torch.rand(2, L) < 0.7
    perfect = patchify(x, VIT.patch)
    assert model.forward_loss(x, perfect, mask)[1] > 90  # mse clamp 1e-10 -> 100 dB
    half = torch.full_like(perfect, 0.5)
    mse = ((perfect - 0.5) ** 2).mean(-1)
    expected = torch.stack([10 * torch.log10(1 / mse[b][mask[b]].mean()) for b in range(2)]).mean()
    torch.testing.assert_close(model.forward_loss(x, half, mask)[1], expected)


# --- optimisation ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_learns():
    torch.manual_seed(0)
    model = MaskedAutoencoder(VIT, MAE)
    x = smooth_images(4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    losses, psnrs = [], []
    for _ in range(60):
        out = model(x, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        psnrs.append(out["psnr"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sum(psnrs[-5:]) / 5 > sum(psnrs[:5]) / 5 + 2.0, (psnrs[:5], psnrs[-5:])


def test_grad_checkpointing_is_exact():
    torch.manual_seed(0)
    model = MaskedAutoencoder(VIT, MAE)
    x = images(2)

    def run():
        model.zero_grad()
        out = model(x, generator=torch.Generator().manual_seed(7))
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = run()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    loss_b, grads_b = run()
    torch.testing.assert_close(loss_b, loss_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], msg=n)
    feats = model.encoder.intermediate_layers(x, [-1])[0]  # checkpointed path outside the MAE too
    feats.sum().backward()


# --- cost model --------------------------------------------------------------------------------------------------
def counted_flops(fn) -> int:
    # the math backend decomposes SDPA into matmuls the counter sees (it has no formula for the CPU flash op)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flops_per_sample_matches_flop_counter():
    model = MaskedAutoencoder(VIT, MAE)
    x = images(2)
    fwd = counted_flops(lambda: model(x)) / 2
    train = counted_flops(lambda: model(x)["loss"].backward()) / 2
    assert fwd == pytest.approx(flops_per_sample(VIT, MAE, train=False), rel=0.01)
    assert train == pytest.approx(flops_per_sample(VIT, MAE, train=True), rel=0.01)
    enc = ViTEncoder(VIT)
    assert counted_flops(lambda: enc(x)) / 2 == pytest.approx(flops_per_sample(VIT, None, train=False), rel=0.01)
    # paper scale, by hand: 2304 tokens, 691 visible, width 1025 / MLP 4100, 6 + 2 blocks
    paper = flops_per_sample(ViTConfig(), MAEConfig(), train=True)
    assert 7e11 < paper < 1e12


# --- GPU (skipped without CUDA) ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_attention_and_bf16_step():
    dev = torch.device("cuda")
    rep = sdpa_backend_report(dev, torch.bfloat16, heads=4, head_dim=16, seq_len=96)
    assert "math (" not in rep, rep  # a fused kernel for the tiny shapes
    attn = Attention(64, 4).to(dev)
    x = torch.randn(2, 96, 64, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = attn(x).float()
    torch.testing.assert_close(fused, explicit_attention(attn, x), rtol=0.05, atol=0.05)
    model = MaskedAutoencoder(VIT, MAE).to(dev)
    imgs = images(2, dtype=torch.float16).to(dev)
    g = torch.Generator().manual_seed(0)  # a CPU generator drives masks on the GPU
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(imgs, generator=g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and (out["mask"].sum(1) == L - 29).all()
    cpu = MaskedAutoencoder(VIT, MAE)
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    ref = cpu(imgs.cpu(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref["mask"], out["mask"].cpu())
    torch.testing.assert_close(out["loss"].float().cpu(), ref["loss"], rtol=0.05, atol=1e-3)
