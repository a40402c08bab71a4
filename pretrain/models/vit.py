"""ViTa Stage I: a multi-view 3D+T ViT encoder and its masked autoencoder (Zhang et al. 2025, Sec. 3.1, 4.2,
App. A-B), written in the style of facebookresearch/mae: plain modules, no framework magic.

Shapes used throughout
    images   (B, P, T, H, W)   P = sa_planes + la_planes, planes ordered sa_0..sa_{M-1}, la_0..la_{N-1}
    tokens   (B, L, dim)       L = P * (T/pt) * (H/ph) * (W/pw); token order is (plane, t, y, x) row-major,
                               i.e. the order `patchify` and the Conv3d patch embedding both produce
    patches  (B, L, pt*ph*pw)  the pixels of each token, in (t, y, x) order inside the patch

Positional embedding (App. B): fixed, never trained. Of the `dim` channels, `dim - 1` hold 1D sin-cos
embeddings of the four grid coordinates (x, y, t, plane), the plane coordinate being the SA slice index for SA
tokens and the LA view index for LA tokens (so SA grid and LA grid are embedded separately but analogously,
as PE_SA and PE_LA in the paper). The last channel is the view indicator: +1 on SA tokens, -1 on LA tokens.
See `axis_channels` for how the `dim - 1` channels are split.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, so on GPU the fused flash / cuDNN /
memory-efficient kernels run; `sdpa_backend_report` says which one PyTorch picks for given shapes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import MAEConfig, ViTConfig

LN_EPS = 1e-6  # as in MAE / timm ViTs


# --- geometry ---------------------------------------------------------------------------------------------------
def token_grid(cfg: ViTConfig) -> tuple[int, int, int]:
    """(T/pt, H/ph, W/pw): the token grid of one plane."""
    pt, ph, pw = cfg.patch
    return cfg.frames // pt, cfg.img_size // ph, cfg.img_size // pw


def num_tokens(cfg: ViTConfig) -> int:
    """L = P * (T/pt) * (H/ph) * (W/pw)."""
    gt, gh, gw = token_grid(cfg)
    return (cfg.sa_planes + cfg.la_planes) * gt * gh * gw


def visible_tokens(num: int, mask_ratio: float) -> int:
    """Tokens kept by the random masking: round(L * (1 - ratio)) (Python's round, half to even), at least 1."""
    return max(1, int(round(num * (1.0 - mask_ratio))))


def patchify(x: Tensor, patch: Sequence[int]) -> Tensor:
    """(B, P, T, H, W) -> (B, L, pt*ph*pw), tokens in (plane, t, y, x) order, pixels in (t, y, x) order."""
    B, P, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.reshape(B, P, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 1, 2, 4, 6, 3, 5, 7)  # B, P, T', H', W', pt, ph, pw
    return x.reshape(B, P * (T // pt) * (H // ph) * (W // pw), pt * ph * pw)


def unpatchify(x: Tensor, patch: Sequence[int], shape: Sequence[int]) -> Tensor:
    """(B, L, pt*ph*pw) -> (B, P, T, H, W) with shape = (P, T, H, W); the exact inverse of `patchify`."""
    P, T, H, W = shape
    pt, ph, pw = patch
    B = x.shape[0]
    x = x.reshape(B, P, T // pt, H // ph, W // pw, pt, ph, pw)
    x = x.permute(0, 1, 2, 5, 3, 6, 4, 7)  # B, P, T', pt, H', ph, W', pw
    return x.reshape(B, P, T, H, W)


# --- positional embedding (ViTa App. B) ---------------------------------------------------------------------------
def axis_channels(dim: int) -> tuple[int, int, int, int]:
    """How the `dim - 1` sin-cos channels are split among (x, y, t, plane).

    Each axis needs sin/cos pairs, so the (dim - 1) // 2 available pairs are dealt out as evenly as possible,
    any remainder going to x, then y, then t (the plane axis has the fewest positions, 3-6, and needs the
    fewest frequencies). If dim - 1 is odd, one channel is left as a constant zero.
      dim 1025 (paper): 1024 = 256 + 256 + 256 + 256
      dim   64 (tiny) :   63 =  16 +  16 +  16 +  14 (+ 1 zero)
      dim   32        :   31 =   8 +   8 +   8 +   6 (+ 1 zero)
    """
    pairs = (dim - 1) // 2
    if pairs < 4:
        raise ValueError(f"dim {dim} is too small for a 4-axis sin-cos embedding plus a view channel (>= 9)")
    base, extra = divmod(pairs, 4)
    return tuple(2 * (base + (i < extra)) for i in range(4))  # type: ignore[return-value]


def sincos_1d(pos: Tensor, channels: int) -> Tensor:
    """MAE's 1D embedding: [sin(pos * w_i), cos(pos * w_i)] for w_i = 10000^(-2i / channels), i < channels/2.
    This is App. B's PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...) with d the axis' channel
    count, sines and cosines stored as two halves rather than interleaved (an irrelevant fixed permutation)."""
    half = channels // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) * 2.0 / channels)
    angle = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def pos_embed_grid(dim: int, groups: Sequence[tuple[int, float]], grid: Sequence[int]) -> Tensor:
    """Fixed sin-cos embedding (L, dim) of token grids: `groups` = [(planes, view indicator), ...] in token order,
    each of `planes` planes with the token grid `grid` = (T', H', W'). Columns: [x | y | t | plane | (zero if
    dim-1 odd) | view], see `axis_channels`; the plane coordinate restarts at 0 in every group."""
    cx, cy, ct, cz = axis_channels(dim)
    gt, gh, gw = grid

    def one(planes: int, view: float) -> Tensor:
        z, t, y, x = torch.meshgrid(torch.arange(planes), torch.arange(gt), torch.arange(gh), torch.arange(gw),
                                    indexing="ij")
        pe = torch.cat([sincos_1d(x.flatten(), cx), sincos_1d(y.flatten(), cy), sincos_1d(t.flatten(), ct),
                        sincos_1d(z.flatten(), cz)], dim=1)
        pad = torch.zeros(pe.shape[0], dim - 1 - pe.shape[1], dtype=pe.dtype)
        indicator = torch.full((pe.shape[0], 1), view, dtype=pe.dtype)
        return torch.cat([pe, pad, indicator], dim=1)

    return torch.cat([one(planes, view) for planes, view in groups], dim=0).float()


def pos_embed(cfg: ViTConfig, dim: Optional[int] = None) -> Tensor:
    """The fixed 5D positional embedding (L, dim) of ViTa App. B, at width `dim` (default cfg.dim; the MAE
    decoder uses its own width). Rows follow the token order of `patchify` / `PatchEmbed3D`.

    The plane coordinate restarts at 0 for the LA views, so the SA grid (PE_SA) and the LA grid (PE_LA) are built
    the same way; the view indicator channel is +1 for SA and -1 for LA tokens. +-1 rather than 1/0: it has the
    same amplitude as the sin/cos channels (no channel dominates the token at initialisation), is zero-mean over
    the views, and gives the largest separation between the two views a single bounded channel can.
    """
    return pos_embed_grid(cfg.dim if dim is None else dim, [(cfg.sa_planes, 1.0), (cfg.la_planes, -1.0)],
                          token_grid(cfg))


# --- building blocks ---------------------------------------------------------------------------------------------
class PatchEmbed3D(nn.Module):
    """Each plane (T, H, W) -> non-overlapping 3D patches (pt, ph, pw) -> tokens, via a strided Conv3d;
    the tokens of all P planes are concatenated into one sequence (B, P*T'*H'*W', dim)."""

    def __init__(self, patch: Sequence[int], dim: int):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(1, dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        x = x.flatten(0, 1).unsqueeze(1).to(self.proj.weight.dtype)  # (B*P, 1, T, H, W) in the module's dtype
        x = self.proj(x)  # (B*P, dim, T', H', W')
        return x.flatten(2).transpose(1, 2).reshape(B, -1, x.shape[1])


HEAD_DIM_MULTIPLE = 8  # cuDNN and memory-efficient attention need head dims that are multiples of 8


def padded_head_dim(head_dim: int, multiple: int = HEAD_DIM_MULTIPLE) -> int:
    """The head dim the attention kernel sees: `head_dim` rounded up to a multiple (205 -> 208)."""
    return -(-head_dim // multiple) * multiple


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention on (B, heads, L, head_dim).

    A head dim that is not a multiple of 8 (the paper's 5 heads of 205) is padded with zero channels inside the
    call (205 -> 208), so cuDNN / memory-efficient attention accept it: zero channels of q and k add nothing to
    the scores q.k, zero channels of v give zero output channels, which are cut off; the softmax scale stays
    1/sqrt(205). The weights and their shapes do not change (checkpoints are the same either way)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, pad_head_dim: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.pad = padded_head_dim(self.head_dim) - self.head_dim if pad_head_dim else 0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim)
        if self.pad:
            qkv = F.pad(qkv, (0, self.pad))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.head_dim ** -0.5)
        if self.pad:
            x = x[..., : self.head_dim]
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, D)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def compile_blocks(model: nn.Module, **kw) -> int:
    """torch.compile every transformer `Block` of `model` in place (the blocks are where the time goes; the
    masking, gathers and losses around them stay eager). A block that fails to compile runs eagerly: dynamo's
    errors are suppressed and it falls back. Returns the number of blocks compiled."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # fall back to eager rather than stop a run
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for m in blocks:
        m.compile(**kw)
    return len(blocks)


def _init_weights(m: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and the patch embedding as a linear), zero biases."""
    if isinstance(m, (nn.Linear, nn.Conv3d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _run_block(module: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    if getattr(module, "grad_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def host_to(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor (e.g. noise from a CPU generator, the same on every machine) on `device` without a host sync:
    a copy from pageable memory to a GPU waits for the stream; from pinned memory it is asynchronous."""
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_masking(x: Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """MAE per-sample random masking: noise -> argsort -> keep the first len_keep tokens of the shuffle.

    Returns (x_visible (B, len_keep, D) in shuffled order, mask (B, L) bool True = masked, ids_restore (B, L)).
    mask_ratio 0 keeps every token in its original order. `generator` (any device) makes it deterministic.
    """
    B, L, D = x.shape
    if mask_ratio == 0:
        ids = torch.arange(L, device=x.device).expand(B, L)
        return x, torch.zeros(B, L, dtype=torch.bool, device=x.device), ids
    len_keep = visible_tokens(L, mask_ratio)
    gen_device = generator.device if generator is not None else x.device
    noise = host_to(torch.rand(B, L, generator=generator, device=gen_device), x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)  # rank of each token in the shuffle
    x = x.gather(1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    return x, ids_restore >= len_keep, ids_restore


# --- encoder -----------------------------------------------------------------------------------------------------
class ViTEncoder(nn.Module):
    """Patch embedding + fixed 5D positional embedding + pre-norm blocks + final LayerNorm (no class token).

    Set `grad_checkpointing = True` to recompute each block in the backward pass (non-reentrant checkpoint).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg.patch, cfg.dim)
        self.register_buffer("pos_embed", pos_embed(cfg), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.grad_checkpointing = False
        self._pos_2d: dict[tuple[int, int, int], Tensor] = {}  # forward_2d's fixed embeddings per token grid
        self.apply(_init_weights)

    @property
    def num_tokens(self) -> int:
        return num_tokens(self.cfg)

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        c = self.cfg
        return c.sa_planes + c.la_planes, c.frames, c.img_size, c.img_size

    def patchify(self, x: Tensor) -> Tensor:
        return patchify(x, self.cfg.patch)

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.cfg.patch, self.image_shape)

    def embed(self, x: Tensor) -> Tensor:
        """(B, P, T, H, W) -> (B, L, dim) tokens with positions added."""
        x = self.patch_embed(x)
        return x + self.pos_embed.to(x.dtype)  # the buffer stays fp32 when an engine casts only parameters

    def forward(self, x: Tensor, mask_ratio: float = 0.0, generator: Optional[torch.Generator] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """-> latent (B, L_visible, dim), mask (B, L) bool True = masked, ids_restore (B, L)."""
        x, mask, ids_restore = random_masking(self.embed(x), mask_ratio, generator)
        for blk in self.blocks:
            x = _run_block(self, blk, x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, x: Tensor) -> Tensor:
        """All L tokens, unmasked, in order: (B, L, dim)."""
        return self.forward(x)[0]

    def embed_2d(self, x: Tensor) -> Tensor:
        """Single 2D images (N, H, W) -> their tokens (N, H/ph * W/pw, dim) with positions, before the blocks.

        The same weights as the 3D+T path: each image is a static clip of pt identical frames (so the Conv3d acts
        as a 2D convolution with the kernel summed over time), one plane with the view indicator 0 (the view is
        unknown: for view classification it must come from the pixels). H and W need only be multiples of the
        patch; the fixed sin-cos embedding of that grid is made on first use and cached."""
        pt, ph, pw = self.cfg.patch
        N, H, W = x.shape
        if H % ph or W % pw:
            raise ValueError(f"image {H}x{W} is not a multiple of the patch {ph}x{pw}")
        grid = (1, H // ph, W // pw)
        if grid not in self._pos_2d:
            self._pos_2d[grid] = pos_embed_grid(self.cfg.dim, [(1, 0.0)], grid)
        tokens = self.patch_embed(x[:, None, None].expand(N, 1, pt, H, W))
        return tokens + self._pos_2d[grid].to(tokens.device, tokens.dtype)

    def forward_2d(self, x: Tensor) -> Tensor:
        """Single 2D images (N, H, W), e.g. MetaCLIP-CMR's k-space frames -> their tokens (N, H/ph * W/pw, dim)
        after the blocks and the final LayerNorm (see `embed_2d`)."""
        tokens = self.embed_2d(x)
        for blk in self.blocks:
            tokens = _run_block(self, blk, tokens)
        return self.norm(tokens)

    def intermediate_2d(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Single 2D images (N, H, W) -> the tokens (N, L, dim) after the blocks at `indices` (negative counts from
        the end; the last block's output gets the final LayerNorm, as in `forward_2d`): a 2D UNETR's skips."""
        wanted = [i % len(self.blocks) for i in indices]
        out: dict[int, Tensor] = {}
        tokens = self.embed_2d(x)
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = _run_block(self, blk, tokens)
            if i in wanted:
                out[i] = self.norm(tokens) if i == len(self.blocks) - 1 else tokens
        return [out[i] for i in wanted]

    def intermediate_layers(self, x: Tensor, indices: Sequence[int], norm: bool = False) -> list[Tensor]:
        """Outputs (B, L, dim) of the blocks at `indices` (negative counts from the end), unmasked, e.g. the skip
        connections of a UNETR decoder. `norm` applies the final LayerNorm to each."""
        wanted = [i % len(self.blocks) for i in indices]
        out: dict[int, Tensor] = {}
        x = self.embed(x)
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = _run_block(self, blk, x)
            if i in wanted:
                out[i] = self.norm(x) if norm else x
        return [out[i] for i in wanted]


# --- MAE ---------------------------------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """Lightweight decoder: embed visible latents, fill in mask tokens, unshuffle, add the fixed positional
    embedding at decoder width, blocks, LayerNorm, linear head to the pt*ph*pw pixels of every token."""

    def __init__(self, vit: ViTConfig, mae: MAEConfig):
        super().__init__()
        if mae.decoder_dim % mae.decoder_heads:
            raise ValueError(f"decoder_dim {mae.decoder_dim} is not divisible by decoder_heads {mae.decoder_heads}")
        self.embed = nn.Linear(vit.dim, mae.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mae.decoder_dim))
        self.register_buffer("pos_embed", pos_embed(vit, mae.decoder_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(mae.decoder_dim, mae.decoder_heads, vit.mlp_ratio, vit.dropout)
                                    for _ in range(mae.decoder_depth))
        self.norm = nn.LayerNorm(mae.decoder_dim, eps=LN_EPS)
        self.head = nn.Linear(mae.decoder_dim, math.prod(vit.patch))
        self.grad_checkpointing = False
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        B, Lv, C = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, L - Lv, C)], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, C)) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = _run_block(self, blk, x)
        return self.head(self.norm(x))  # (B, L, pt*ph*pw)


class MaskedAutoencoder(nn.Module):
    """ViTa Stage I. `encoder` is the part exported for Stage II / fine-tuning."""

    def __init__(self, vit: ViTConfig, mae: MAEConfig):
        super().__init__()
        self.vit_cfg, self.mae_cfg = vit, mae
        self.encoder = ViTEncoder(vit)
        self.decoder = MAEDecoder(vit, mae)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enabled

    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None,
                mask_ratio: Optional[float] = None) -> dict[str, Tensor]:
        """images (B, P, T, H, W) in [0, 1] -> dict(loss, pred (B, L, pt*ph*pw), mask (B, L), psnr (dB))."""
        ratio = self.mae_cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encoder(images, ratio, generator)
        pred = self.decoder(latent, ids_restore)
        loss, psnr = self.forward_loss(images, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "psnr": psnr}

    def _target(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Patches in float32, and the per-patch (mean, std) used when norm_pix_loss (else 0, 1)."""
        target = patchify(images, self.vit_cfg.patch).float()
        if not self.mae_cfg.norm_pix_loss:
            return target, torch.zeros((), device=target.device), torch.ones((), device=target.device)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return target, mean, std

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """MSE over the masked patches only (per-patch normalised targets if norm_pix_loss), and the mean over
        samples of each sample's PSNR (dB, data range 1) of the de-normalised, [0, 1]-clipped prediction on its
        masked patches. Reductions run in float32 whatever the model's dtype."""
        target, mean, std = self._target(images)
        pred = pred.float()
        m = mask.float()
        per_patch = ((pred - (target - mean) / std) ** 2).mean(dim=-1)
        loss = (per_patch * m).sum() / m.sum().clamp(min=1.0)
        with torch.no_grad():
            recon = (pred * std + mean).clamp(0.0, 1.0)
            err = ((recon - target) ** 2).mean(dim=-1)
            mse = (err * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            psnr = (10.0 * torch.log10(1.0 / mse.clamp(min=1e-10))).mean()
        return loss, psnr

    @torch.no_grad()
    def reconstruct(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """(B, P, T, H, W): visible patches from the input, masked ones from the (de-normalised) prediction."""
        target, mean, std = self._target(images)
        recon = (pred.float() * std + mean).clamp(0.0, 1.0)
        out = torch.where(mask[..., None], recon, target)
        return self.encoder.unpatchify(out)


# --- cost model --------------------------------------------------------------------------------------------------
def blocks_flops(n: int, d: int, depth: int, mlp_ratio: float) -> int:
    """Per block, n tokens, width d, MLP hidden h: qkv 2n*d*3d + proj 2n*d*d + MLP 2*(2n*d*h)
    + attention QK^T 2n*n*d + AV 2n*n*d = 2n*d*(4d + 2h) + 4n^2*d."""
    h = int(d * mlp_ratio)
    return depth * (2 * n * d * (4 * d + 2 * h) + 4 * n * n * d)


def flops_per_sample(vit: ViTConfig, mae: Optional[MAEConfig] = None, train: bool = True) -> float:
    """Analytic matmul FLOPs (2 per multiply-add) of one sample, for MFU.

    With L = num_tokens, Lv = visible_tokens(L, mask_ratio), K = pt*ph*pw, D = dim, Dd = decoder_dim:
        patch embed   2 * L * K * D                      (the conv runs on all L tokens, before masking)
        encoder       blocks(Lv, D, depth)               (see `blocks_flops`)
        decoder       2 * Lv * D * Dd + blocks(L, Dd, decoder_depth) + head 2 * L * Dd * K
    `mae=None` is the encoder alone on all L tokens (fine-tuning). Training = 3 x forward (backward = 2 x
    forward: gradients w.r.t. inputs and weights of every matmul) minus 2 * L * K * D, since the patch
    embedding needs no gradient w.r.t. the images (its backward is the weight gradient alone). Not counted:
    LayerNorm, GELU, softmax, residuals, the loss (elementwise, O(L*D)). This equals what
    torch.utils.flop_counter counts with the math SDPA backend; fused attention kernels execute a little more
    than counted here (flash / efficient backward recompute QK^T: 2.5 x forward instead of 2 x; `Attention` pads
    head_dim to a multiple of 8, 205 -> 208), which MFU conventionally ignores.
    """
    pt, ph, pw = vit.patch
    K, D, L = pt * ph * pw, vit.dim, num_tokens(vit)
    Lv = visible_tokens(L, mae.mask_ratio) if mae is not None else L
    flops = 2 * L * K * D + blocks_flops(Lv, D, vit.depth, vit.mlp_ratio)
    if mae is not None:
        Dd = mae.decoder_dim
        flops += 2 * Lv * D * Dd + blocks_flops(L, Dd, mae.decoder_depth, vit.mlp_ratio) + 2 * L * Dd * K
    return float(3 * flops - 2 * L * K * D if train else flops)


# --- attention backend ------------------------------------------------------------------------------------------
_BACKEND_NAMES = {0: "math", 1: "flash_attention", 2: "efficient_attention", 3: "cudnn_attention",
                  4: "overrideable"}


def sdpa_backend_report(device, dtype: torch.dtype, heads: int, head_dim: int, seq_len: int = 256,
                        dropout_p: float = 0.0) -> str:
    """Which kernel F.scaled_dot_product_attention would run for q = k = v of shape (1, heads, seq_len,
    head_dim) on `device` in `dtype`, and (on CUDA) which fused kernels could run at all. One line, for logs.

    Uses PyTorch's own dispatcher choice (`torch._fused_sdp_choice`); if that private op is missing, probes the
    backends in order under `torch.nn.attention.sdpa_kernel`. On CPU the fused kernel is "cpu-flash".
    """
    device = torch.device(device)
    q = torch.zeros(1, heads, seq_len, head_dim, device=device, dtype=dtype)
    try:
        chosen = _BACKEND_NAMES.get(int(torch._fused_sdp_choice(q, q, q, None, dropout_p, False)), "unknown")
    except Exception:  # pragma: no cover - fallback for PyTorch builds without the private op
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = "none"
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p)
                chosen = backend.name.lower()
                break
            except RuntimeError:
                continue
    if device.type == "cpu":
        chosen = "cpu-flash" if chosen == "flash_attention" else chosen
        return f"sdpa cpu {str(dtype).replace('torch.', '')} heads={heads} head_dim={head_dim}: {chosen}"
    usable = []
    if device.type == "cuda":
        import torch.backends.cuda as bc

        try:
            params = bc.SDPAParams(q, q, q, None, dropout_p, False, False)
        except TypeError:  # older signature without enable_gqa
            params = bc.SDPAParams(q, q, q, None, dropout_p, False)
        for name, fn in (("flash", bc.can_use_flash_attention), ("efficient", bc.can_use_efficient_attention),
                         ("cudnn", getattr(bc, "can_use_cudnn_attention", None))):
            try:
                if fn is not None and fn(params, False):
                    usable.append(name)
            except Exception:
                pass
    return (f"sdpa {device.type} {str(dtype).replace('torch.', '')} heads={heads} head_dim={head_dim}: {chosen}"
            f" (fused usable: {', '.join(usable) or 'none'})")
