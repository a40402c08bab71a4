"""ViTa Stage I as the ViTa authors' code builds and trains it (github.com/Yundi-Zhang/ViTa, HEAD 18c87bc), timed
against the project's training step in the same run, on the same device, batch and input.

    python bench/reference.py [--micro 32] [--steps 20] [--warmup 3] [--dataset DIR]   (one process, on the GPU)
    DS_ACCELERATOR=cpu python bench/reference.py --cpu-small --micro 4 --steps 5

Writes bench/results/reference_<device>.json and prints a markdown table.

What `ReferenceMAE` re-implements (written afresh: the authors' README says MIT but the repository has no LICENSE
file, so no code is copied from it), file by file of the authors' repository:
  networks/imaging_encoders.py  ImagingMaskedEncoder: Conv3d patch embedding, frozen sin-cos positional embedding
                                (repeated over the batch every forward), random masking, timm `Block`s with
                                qkv_bias=True, final nn.LayerNorm; xavier-uniform linears, patch embedding
                                initialised as a linear.
  networks/imaging_decoders.py  ImagingMaskedDecoder + ViTDecoder: linear embed, mask tokens, unshuffle, frozen
                                positional embedding, timm `Block`s, LayerNorm, linear head, sigmoid.
  networks/tokenizers.py        PatchEmbed: each plane (T, H, W) -> Conv3d -> tokens in (plane, t, y, x) order.
  utils/imaging_model_related.py  sincos_pos_embed (view channel first: 0 long axis, 1 short axis; then the
                                (dim-1)/4 sin|cos channels of each grid axis (plane, t, y, x)), Masker.random_masking
                                (keeps int(L * (1 - ratio)) tokens), patchify.
  utils/losses.py               ReconstructionCriterion: MSE, over all patches since the Stage I config sets
                                mask_loss: False (`mask_loss=True`: masked patches only, as the project does).
  models/reconstruction_models.py  ReconMAE.configure_optimizers: torch.optim.Adam(lr=1e-4), no weight decay, no
                                clipping; the default (foreach on CUDA) implementation, which Lightning leaves alone.
  main.py, configs/imaging_model/pretraining_reconstruction_mae.yaml, requirements.txt: Lightning 2.3 Trainer with
                                no `precision` (= "32-true": fp32 weights and activations) after
                                torch.set_float32_matmul_precision("medium") (TF32 matmuls on CUDA) and with
                                benchmark=True (cudnn.benchmark); timm 0.6.12, torch 2.0.1; width 1025, 5 heads,
                                depth 6 + 2, patch (5, 8, 8), mask ratio 0.7.
timm 0.6.12's Block / Attention / Mlp (Apache-2.0, (c) Ross Wightman, github.com/huggingface/pytorch-image-models,
timm/models/vision_transformer.py and timm/models/layers/mlp.py at v0.6.12) are reproduced closely below: pre-norm
nn.LayerNorm (eps 1e-5), attention written out as softmax(q @ k^T * scale) @ v (0.6.12 has no fused path; timm >= 0.9
calls F.scaled_dot_product_attention, here `fused_attn=True`), exact GELU. Dropout (p=0), DropPath and LayerScale are
identities in the authors' configuration and are left out.

Where the reference differs from the authors' code, and why:
  - the input is the project's: (B, 9, 5, 128, 128), short-axis planes first. The released Stage I config keeps 25
    frames (5 temporal patches, 11,520 tokens); the project follows the paper's 5 frames (2,304 tokens). Both systems
    get the same tensor, so both run the same shapes.
  - no class token by default (theirs prepends one to the encoder and decoder sequences: +dim parameters, +1 token),
    so that parameters and matmul FLOPs equal the project's `MaskedAutoencoder` (no class token); `cls_token=True`
    restores it.
  - the positional embeddings are buffers, not frozen nn.Parameters (same state-dict keys, same compute), and any
    width works: their code asserts (dim - 1) % 8 == 0, which 1024 and 128 fail; the leftover channels are zeros.
  - left out of the timed step: Lightning's loop, the per-step logging (loss .item(), PSNR of pred and target
    copied to the host as numpy every step) and main.py's CUDA_LAUNCH_BLOCKING=1 (serialises every kernel launch).
    All three would slow the authors' step: leaving them out favours the reference.
Mask ratio 0.7 keeps int(2304 * 0.3) = 691 = round(2304 * 0.3) tokens, as the project does; for shapes where the
authors' truncation and the project's rounding differ, so do the FLOPs.

Rows per shape (the paper's 1025 x 5 heads and the Hopper-friendly 1024 x 8, `FAST` of bench/pretrain_step.py):
  project        the trainer's DeepSpeed engine (bench/common.py: stage_engine, stage_inputs), its precision (bf16
                 weights, ZeRO-2, grad clipping) and attention (fused SDPA)
  ref bf16-mixed the reference under Lightning's "bf16-mixed": fp32 weights, autocast bf16 (the same precision as
                 the project; project/ref of this row is the like-for-like ratio)
  ref bf16-mixed fused-attn   the same with timm >= 0.9's fused attention
  ref 32-true    the authors' setting as released: fp32, TF32 matmuls
(--cpu-small: fp32 for both systems, so project, ref 32-true and ref 32-true fused-attn; main.py's TF32 and
cudnn.benchmark settings apply on CUDA only.)
project/ref = project samples/s / reference samples/s (> 1: the project is faster). MFU is against the bf16 dense
peak (`pretrain.train.PEAK_FLOPS`) for every row, fp32 ones included; both systems run the same matmul FLOPs
(`flops_per_sample`, checked in tests/test_reference_model.py)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import MAEConfig, ViTConfig

ROOT = Path(__file__).resolve().parents[1]

AUTHORS_LR = 1e-4  # configs/imaging_params.py TrainingParams.lr; the Stage I yaml does not override it


# --- timm 0.6.12 (Apache-2.0, Ross Wightman), as the authors import it ------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:  # timm >= 0.9
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # timm 0.6.12: the (B, heads, N, N) scores are materialised, softmax runs in fp32 under autocast
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 fused_attn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # timm's default norm_layer: eps 1e-5 (the project uses 1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --- the authors' pieces ----------------------------------------------------------------------------------------
def sincos_1d(channels: int, pos: Tensor) -> Tensor:
    """[sin(pos * w) | cos(pos * w)], w_i = 10000^(-i / (channels/2)), as get_1d_sincos_pos_embed_from_grid."""
    omega = 1.0 / 10000 ** (torch.arange(channels // 2, dtype=torch.float32) / (channels / 2))
    out = pos.reshape(-1, 1).float() * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(dim: int, vit: ViTConfig, cls_token: bool) -> Tensor:
    """(1, [1 +] L, dim): column 0 the view (0 long axis, 1 short axis), then sin|cos of each grid axis (plane, t,
    y, x) with the plane index restarting in each view, as sincos_pos_embed(use_both_axes=True); rows in the
    project's plane order (short axis first). 2 * ((dim - 1) // 8) channels per axis (= (dim - 1) / 4 where the
    authors' assert holds), zeros after them; a zero row first for the class token."""
    pt, ph, pw = vit.patch
    grid = (vit.frames // pt, vit.img_size // ph, vit.img_size // pw)
    per_axis = 2 * ((dim - 1) // 8)
    rows = []
    for planes, view in ((vit.sa_planes, 1.0), (vit.la_planes, 0.0)):
        coords = torch.meshgrid(*(torch.arange(n) for n in (planes, *grid)), indexing="ij")
        pe = torch.cat([sincos_1d(per_axis, c) for c in coords], dim=1)
        rows.append(torch.cat([torch.full((pe.shape[0], 1), view), pe,
                               torch.zeros(pe.shape[0], dim - 1 - pe.shape[1])], dim=1))
    if cls_token:
        rows.insert(0, torch.zeros(1, dim))
    return torch.cat(rows)[None]


def patchify(imgs: Tensor, patch) -> Tensor:
    """(B, S, T, H, W) -> (B, L, pt*ph*pw): tokens (plane, t, y, x), pixels (t, y, x)."""
    B, S, T, H, W = imgs.shape
    pt, ph, pw = patch
    x = imgs.reshape(B, S, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return x.reshape(B, -1, pt * ph * pw)


def random_masking(x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Masker.random_masking: argsort of uniform noise; the first int(L * (1 - ratio)) of the shuffle are kept.
    Returns (kept tokens, mask (B, L) float 1 = masked, ids_restore)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.rand(N, L, device=x.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = mask.gather(1, ids_restore)
    x = x.gather(1, ids_shuffle[:, :len_keep, None].repeat(1, 1, D))
    return x, mask, ids_restore


def _init_linear_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(1, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = self.proj(x.reshape(-1, 1, *x.shape[2:]))  # (B*S, dim, t, h, w)
        return x.flatten(2).moveaxis(1, -1).reshape(B, -1, x.shape[1])


class ImagingMaskedEncoder(nn.Module):
    def __init__(self, vit: ViTConfig, mae: MAEConfig, fused_attn: bool = False, cls_token: bool = False):
        super().__init__()
        self.mask_ratio = mae.mask_ratio
        self.patch_embed = PatchEmbed(vit.patch, vit.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vit.dim)) if cls_token else None
        self.register_buffer("enc_pos_embed", sincos_pos_embed(vit.dim, vit, cls_token))
        self.encoder = nn.ModuleList(Block(vit.dim, vit.heads, vit.mlp_ratio, True, fused_attn)
                                     for _ in range(vit.depth))
        self.encoder_norm = nn.LayerNorm(vit.dim)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv bias keeps PyTorch's default init, as theirs
        if cls_token:
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch_embed(x)
        pos = self.enc_pos_embed.repeat(x.shape[0], 1, 1)  # a (B, L, dim) copy every step, as theirs
        n_cls = 1 if self.cls_token is not None else 0
        x, mask, ids_restore = random_masking(x + pos[:, n_cls:], self.mask_ratio)
        if n_cls:
            x = torch.cat([(self.cls_token + pos[:1, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.encoder:
            x = blk(x)
        return self.encoder_norm(x), mask, ids_restore


class ImagingMaskedDecoder(nn.Module):
    def __init__(self, vit: ViTConfig, mae: MAEConfig, fused_attn: bool = False, cls_token: bool = False,
                 sigmoid: bool = True):
        super().__init__()
        self.n_cls, self.sigmoid = (1 if cls_token else 0), sigmoid
        self.decoder_embed = nn.Linear(vit.dim, mae.decoder_dim)
        self.register_buffer("dec_pos_embed", sincos_pos_embed(mae.decoder_dim, vit, cls_token))
        self.decoder = nn.Module()  # ViTDecoder: .network blocks, .norm
        self.decoder.network = nn.ModuleList(Block(mae.decoder_dim, mae.decoder_heads, vit.mlp_ratio, True, fused_attn)
                                             for _ in range(mae.decoder_depth))
        self.decoder.norm = nn.LayerNorm(mae.decoder_dim)
        self.recon_head = nn.Linear(mae.decoder_dim, vit.patch[0] * vit.patch[1] * vit.patch[2])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mae.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_norm)

    def forward(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        pos = self.dec_pos_embed.repeat(x.shape[0], 1, 1)
        c = self.n_cls
        B, L = ids_restore.shape
        x_ = torch.cat([x[:, c:], self.mask_token.repeat(B, L + c - x.shape[1], 1)], dim=1)
        x_ = x_.gather(1, ids_restore[..., None].repeat(1, 1, x_.shape[-1])) + pos[:, c:]
        if c:
            x_ = torch.cat([x[:, :1] + pos[:, :1], x_], dim=1)
        for blk in self.decoder.network:
            x_ = blk(x_)
        x = self.recon_head(self.decoder.norm(x_))[:, c:]
        return torch.sigmoid(x) if self.sigmoid else x  # theirs: pixels in [0, 1]


class ReferenceMAE(nn.Module):
    """ReconMAE's network and loss. forward(imgs (B, S, T, H, W)) -> (loss, pred (B, L, K), mask (B, L) 1 = masked).

    fused_attn: timm >= 0.9's F.scaled_dot_product_attention (default: timm 0.6.12's explicit softmax, what the
    authors' requirements install); cls_token: the authors' class token (off: the project's parameters and FLOPs);
    sigmoid: the authors' sigmoid on the head; mask_loss: MSE on masked patches only (their Stage I config: False).
    """

    def __init__(self, vit: ViTConfig, mae: MAEConfig, fused_attn: bool = False, cls_token: bool = False,
                 sigmoid: bool = True, mask_loss: bool = False):
        super().__init__()
        self.patch, self.mask_loss = vit.patch, mask_loss
        self.encoder_imaging = ImagingMaskedEncoder(vit, mae, fused_attn, cls_token)
        self.decoder_imaging = ImagingMaskedDecoder(vit, mae, fused_attn, cls_token, sigmoid)

    def forward(self, imgs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        latent, mask, ids_restore = self.encoder_imaging(imgs)
        pred = self.decoder_imaging(latent, ids_restore)
        target = patchify(imgs, self.patch)
        if self.mask_loss:
            pred_, target = pred[mask == 1], target[mask == 1]
        else:
            pred_ = pred
        return F.mse_loss(pred_, target, reduction="none").mean(), pred, mask


# --- timing -----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> dict:
    """Mean seconds of `step` over `steps` calls after `warmup` untimed ones, and the peak memory (CUDA) since the
    call (what is allocated when it starts counts: weights, optimizer state, inputs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"step_s": (time.perf_counter() - t0) / steps,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


@contextlib.contextmanager
def authors_backend_flags(device: torch.device):
    """main.py's process-wide settings, on CUDA (the authors train on GPUs only): TF32 matmuls and cudnn.benchmark
    (Trainer(benchmark=True)). Restored afterwards, so the project's rows run with the project's settings."""
    if device.type != "cuda":
        yield
        return
    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.benchmark = old[1]


def measure_reference(cfg, precision: str, fused_attn: bool, steps: int, warmup: int, device: torch.device) -> dict:
    """The authors' training step: forward (under autocast for "bf16-mixed"), loss, backward, Adam, zero_grad."""
    torch.manual_seed(0)
    model = ReferenceMAE(cfg.model, cfg.mae, fused_attn=fused_attn).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=AUTHORS_LR)
    m = cfg.model
    imgs = torch.rand(cfg.train.micro_batch, m.sa_planes + m.la_planes, m.frames, m.img_size, m.img_size,
                      device=device)  # fp32 from the loader, as theirs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step():
        with autocast:
            loss = model(imgs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with authors_backend_flags(device):
        out = time_step(step, steps, warmup, device)
    out["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def project_engine(cfg, dataset: Optional[Path]):
    """bench/common.py's `stage_engine`: the trainer's model, engine, optimizer and schedule."""
    import common

    return common.stage_engine(cfg, 1, dataset)


def measure_project(cfg, steps: int, warmup: int, device: torch.device, dataset: Optional[Path] = None) -> dict:
    """The project's step: the trainer's DeepSpeed engine, in-memory batch, as bench/pretrain_step.py."""
    from common import stage_inputs

    torch.manual_seed(0)
    model, engine = project_engine(cfg, dataset)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    inputs = stage_inputs(cfg, model, cfg.train.micro_batch, device, dtype)

    def step():
        out = engine(**inputs)
        engine.backward(out["loss"])
        engine.step()

    out = time_step(step, steps, warmup, device)
    out["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine.destroy()
    return out


def rows_for_shape(cfg, shape: str, steps: int, warmup: int, device: torch.device, peak: Optional[float],
                   dataset: Optional[Path] = None) -> list:
    from pretrain.models.vit import flops_per_sample

    flops = flops_per_sample(cfg.model, cfg.mae, train=True)
    project_prec = cfg.train.precision
    ref_prec = "bf16-mixed" if project_prec == "bf16" else "32-true"
    variants = [("project", project_prec, "sdpa", None),
                (f"ref {ref_prec}", ref_prec, "manual (timm 0.6.12)", False),
                (f"ref {ref_prec} fused-attn", ref_prec, "sdpa (timm >= 0.9)", True)]
    if ref_prec != "32-true":
        variants.append(("ref 32-true (authors' setting)", "32-true", "manual (timm 0.6.12)", False))
    rows = []
    for label, precision, attention, fused in variants:
        row = {"shape": shape, "label": label, "dim": cfg.model.dim, "heads": cfg.model.heads,
               "precision": precision + (" (DeepSpeed, ZeRO-%d)" % cfg.train.zero_stage if fused is None else ""),
               "attention": attention, "optimizer": "AdamW (DeepSpeed)" if fused is None else "Adam (torch default)",
               "micro_batch": cfg.train.micro_batch, "flops_per_sample": flops}
        try:
            r = (measure_project(cfg, steps, warmup, device, dataset) if fused is None
                 else measure_reference(cfg, precision, fused, steps, warmup, device))
            sps = cfg.train.micro_batch / r["step_s"]
            row.update(step_ms=1e3 * r["step_s"], samples_per_s=sps, mfu=flops * sps / peak if peak else None,
                       peak_mem_gib=r["peak_mem_gib"], params=r["params"])
        except Exception as e:  # a variant the device cannot run (e.g. out of memory) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{shape:14s} {label:32s} " + (f"ERROR {row['error']}" if "error" in row else
              f"{row['step_ms']:9.1f} ms {row['samples_per_s']:8.1f} samples/s"), flush=True)
    project = rows[0].get("samples_per_s")
    for row in rows[1:]:
        if project and row.get("samples_per_s"):
            row["project_over_reference"] = project / row["samples_per_s"]  # throughput ratio, > 1: project faster
    return rows


def markdown(rows: list) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = ["| shape | system | precision | attention | step ms | samples/s | MFU | peak GiB | project/ref |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['label']} | {r['precision']} | {r['attention']} | {r['error']} |||||")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        out.append(f"| {r['shape']} | {r['label']} | {r['precision']} | {r['attention']} | {r['step_ms']:.1f} | "
                   f"{r['samples_per_s']:.1f} | {f(mfu, '.1f')}{'' if mfu is None else '%'} | "
                   f"{f(r['peak_mem_gib'], '.1f')} | {f(r.get('project_over_reference'), '.2f')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain/vita_stage1.yaml"))
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu-small", action="store_true", help="images 32², width 128, 4 heads, fp32: CPU in seconds")
    ap.add_argument("--dataset", type=Path, default=None,
                    help="a converted dataset for the project's model builder (default: none needed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    from core.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.dist import init_distributed
    from pretrain.train import PEAK_FLOPS
    from pretrain_step import FAST, SMALL

    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    base = [f"train.micro_batch={args.micro}", f"train.global_batch={args.micro}"]
    if args.cpu_small:
        shapes = {"small 128x4": ["model.img_size=32", "model.dim=128", "model.heads=4", "train.precision=fp32"]
                  + SMALL["mae"]}
    else:
        shapes = {"paper 1025x5": [], "1024x8": FAST["mae"]}
    rows = []
    for shape, over in shapes.items():
        rows += rows_for_shape(load_config(PretrainConfig, args.config, base + over), shape, args.steps,
                               args.warmup, device, peak, args.dataset)
    tag = next((k.lower() for k in PEAK_FLOPS if k in name), name.split()[-1].lower())  # h100, h200, cpu
    out = Path(args.out or ROOT / "bench/results" / f"reference_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "command": " ".join(["python", "bench/reference.py"] + sys.argv[1:]),
        "config": args.config, "micro_batch": args.micro, "steps": args.steps, "warmup": args.warmup,
        "cpu_small": args.cpu_small, "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in os.environ}}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"\n{name}, micro-batch {args.micro}, {args.steps} steps after {args.warmup} warm-up, {meta['date']}\n")
    print(markdown(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
