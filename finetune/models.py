"""Downstream models: a pretrained (or fresh) image encoder + a task decoder (ViTa Sec. 3.3 / 4.2, MetaCLIP-CMR).

The heads' building blocks live here; each task (`finetune.tasks`) puts its own together:
  phenotypes     mean-pooled tokens -> one two-layer MLP (256) regressing every z-scored target at once
  diseases       mean-pooled tokens -> one light two-layer MLP per disease (a logit each)
  segmentation   UNETR-style decoder (MONAI's UNETR blocks) with skips from intermediate encoder blocks, per plane,
                 the frames as channels in and out: logits (B, P, T, classes, H, W) in one label space
  modality_view  per-image features mean-pooled over a sequence -> modality and view heads
A linear probe swaps the MLPs for one Linear layer. Encoders: this project's ViT (from an export, a pretraining
run directory, or from scratch) or, as the ViTa baseline, MONAI's 2D ResNet-50 with planes x frames as input
channels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pretrain.config import ViTConfig
from pretrain.models.vit import ViTEncoder, token_grid


def mlp(in_dim: int, hidden: int, out: int) -> nn.Module:
    """ViTa's decoder for tabular targets and diseases: a two-layer MLP; hidden 0 -> one Linear (linear probe)."""
    if hidden <= 0:
        return nn.Linear(in_dim, out)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class ResNetEncoder(nn.Module):
    """ViTa's ResNet-50 baseline: MONAI's 2D ResNet-50, all planes x frames of a subject as input channels."""

    def __init__(self, vit: ViTConfig):
        super().__init__()
        from monai.networks.nets import resnet50

        self.net = resnet50(spatial_dims=2, n_input_channels=(vit.sa_planes + vit.la_planes) * vit.frames,
                            feed_forward=False)
        self.dim = 2048

    def pooled(self, images: Tensor) -> Tensor:
        return self.net(images.flatten(1, 2))


def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """(B, P, T, H, W) -> (B, dim): the mean of a ViT's output tokens, or the ResNet's pooled features."""
    if isinstance(encoder, ResNetEncoder):
        return encoder.pooled(images)
    return encoder.forward_features(images).mean(dim=1)


def unetr_skip_blocks(depth: int, levels: int) -> list[int]:
    """The encoder blocks whose outputs feed UNETR's skips at H/2^1 .. H/2^(levels-1): evenly spaced (the last
    block is the bottleneck)."""
    return [round(depth * lv / levels) - 1 for lv in range(1, levels)]


def unetr_blocks(in_channels: int, dim: int, width: int, levels: int):
    """UNETR's 2D blocks (MONAI) from tokens at H/2^levels back to H: the full-resolution block on the input
    (`in_channels`), a deconvolution path per skip, the up blocks. Channels: `width` at the deepest level, halved
    per level up (at least 8). Returns (enc0, skips, ups, channels at full resolution)."""
    from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

    ch = [max(8, width >> (levels - 1 - lv)) for lv in range(levels)]  # full res ... H/2^(L-1); width deepest
    kw = dict(spatial_dims=2, kernel_size=3, norm_name="instance", res_block=True)
    enc0 = UnetrBasicBlock(in_channels=in_channels, out_channels=ch[0], stride=1, **kw)
    skips = nn.ModuleList(
        UnetrPrUpBlock(in_channels=dim, out_channels=ch[lv], num_layer=levels - lv - 1, stride=1,
                       upsample_kernel_size=2, conv_block=True, **kw) for lv in range(1, levels))
    ups = nn.ModuleList(
        UnetrUpBlock(in_channels=dim if lv == levels - 1 else ch[lv + 1], out_channels=ch[lv],
                     upsample_kernel_size=2, **kw) for lv in range(levels - 1, -1, -1))
    return enc0, skips, ups, ch[0]


class UNETRDecoder(nn.Module):
    """UNETR (Hatamizadeh et al.) on each plane of the ViT: tokens at H/p -> H, with skips from intermediate
    blocks (deconvolved to H/2^l) and from the input frames (with the plane's identity) at full resolution. One
    temporal token per plane (frames == patch_t): the T frames are the input channels and T x classes the output
    channels."""

    def __init__(self, vit: ViTConfig, num_classes: int, width: int):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock

        gt, gh, gw = token_grid(vit)
        p = vit.patch[1]
        if gt != 1 or vit.patch[1] != vit.patch[2] or p & (p - 1):
            raise ValueError(f"the UNETR decoder needs one temporal token and a square power-of-two patch, got "
                             f"patch {vit.patch} over {vit.frames} frames")
        levels = int(math.log2(p))
        self.vit, self.classes, self.levels = vit, num_classes, levels
        self.skip_blocks = unetr_skip_blocks(vit.depth, levels)
        # the full-resolution skip sees the frames and which plane they are (one constant channel per plane): a
        # blood pool looks alike in every view, and its label (LV, LA, RA) depends on the plane
        self.planes = vit.sa_planes + vit.la_planes
        self.enc0, self.skips, self.ups, top = unetr_blocks(vit.frames + self.planes, vit.dim, width, levels)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=top, out_channels=vit.frames * num_classes)

    def forward(self, images: Tensor, hidden: list[Tensor]) -> Tensor:
        """images (B, P, T, H, W); hidden: outputs of `skip_blocks` then the final (normed) tokens."""
        B, P, T, H, W = images.shape
        p = self.vit.patch[1]

        def grid(tokens: Tensor) -> Tensor:  # (B, P*gh*gw, D) -> (B*P, D, gh, gw)
            return tokens.reshape(B * P, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous()

        plane = torch.eye(P, dtype=images.dtype, device=images.device)[None, :, :, None, None].expand(B, P, P, H, W)
        x0 = torch.cat([images, plane], dim=2).flatten(0, 1)  # (B*P, T + P, H, W)
        skips = [self.enc0(x0)] + [blk(grid(h)) for blk, h in zip(self.skips, hidden[:-1])]
        x = grid(hidden[-1])
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.out(x).reshape(B, P, T, self.classes, H, W)


def load_imagenet_resnet50(encoder: nn.Module, path) -> dict:
    """Initialise MONAI's 2D ResNet-50 `encoder` from ImageNet weights the user supplies as a local file: a
    torchvision-layout ResNet-50 state dict (`resnet50-*.pth`, torch.save'd, or `.safetensors`). Nothing is
    downloaded. MONAI names the layers as torchvision does; the differences are bridged:
      - the first convolution's RGB kernels are summed for a 1-channel input (a grey image x as RGB (x, x, x)
        gives the same response), or repeated / averaged for other channel counts;
      - MONAI's shortcut convolutions have a bias torchvision's lack: set to zero (the same function);
      - the 1000-class `fc` is not used.
    Any other missing or misshapen tensor is an error naming the file. Returns what was loaded, for the run's
    metadata."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imagenet_weights: {path}: no such file (a local torchvision ResNet-50 state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        src = load_file(str(path))
    else:
        src = torch.load(path, map_location="cpu", weights_only=True)
        src = src.get("state_dict", src) if isinstance(src, dict) else src
    if not isinstance(src, dict):
        raise ValueError(f"imagenet_weights: {path}: not a state dict")
    src = {k.removeprefix("module."): v for k, v in src.items()}
    out, problems = {}, []
    for name, ref in encoder.state_dict().items():
        if name not in src:
            if name.endswith("downsample.0.bias"):
                out[name] = torch.zeros_like(ref)
                continue
            problems.append(f"missing {name}")
            continue
        w = src[name].to(ref.dtype)
        if name == "conv1.weight" and w.shape[1] != ref.shape[1]:
            c = ref.shape[1]
            w = w.sum(dim=1, keepdim=True) if c == 1 else w.mean(dim=1, keepdim=True).repeat(1, c, 1, 1) * 3 / c
        if w.shape != ref.shape:
            problems.append(f"{name}: {tuple(w.shape)} in the file, {tuple(ref.shape)} in the model")
            continue
        out[name] = w
    if problems:
        raise ValueError(f"imagenet_weights: {path}: not a ResNet-50 state dict in torchvision's layout: "
                         + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    encoder.load_state_dict(out)
    return {"init": "imagenet", "imagenet_weights": str(path), "tensors": len(out)}


class ViTUNETR2D(nn.Module):
    """UNETR on single 2D images through the ViT's 2D path (`ViTEncoder.intermediate_2d`; MetaCLIP-CMR's ViT
    variant, or a Stage I export): the last block's tokens at H/p are brought back to H by MONAI's UNETR up blocks,
    with skips from evenly spaced intermediate blocks (deconvolved to H/2^l) and from the image at full
    resolution. Square power-of-two patches."""

    def __init__(self, vit: ViTConfig, num_classes: int, width: int):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock

        p = vit.patch[1]
        if vit.patch[1] != vit.patch[2] or p & (p - 1):
            raise ValueError(f"the 2D UNETR decoder needs a square power-of-two patch, got {vit.patch}")
        levels = int(math.log2(p))
        self.patch = p
        self.blocks = unetr_skip_blocks(vit.depth, levels) + [-1]  # the skips' blocks, then the last
        self.enc0, self.skips, self.ups, top = unetr_blocks(1, vit.dim, width, levels)
        self.out = UnetOutBlock(spatial_dims=2, in_channels=top, out_channels=num_classes)

    def forward(self, encoder: ViTEncoder, x: Tensor) -> Tensor:
        """x (N, 1, H, W) -> logits (N, classes, H, W)."""
        N, _, H, W = x.shape
        hidden = encoder.intermediate_2d(x[:, 0], self.blocks)

        def grid(tokens: Tensor) -> Tensor:  # (N, gh*gw, D) -> (N, D, gh, gw)
            return tokens.reshape(N, H // self.patch, W // self.patch, -1).permute(0, 3, 1, 2).contiguous()

        skips = [self.enc0(x)] + [blk(grid(h)) for blk, h in zip(self.skips, hidden[:-1])]
        y = grid(hidden[-1])
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return self.out(y)


class ResNetUNetDecoder(nn.Module):
    """A U-Net decoder on MONAI's 2D ResNet-50 as MetaCLIP-CMR pretrains it (stride-1 stem, max-pool, four stages):
    its stem and stage outputs (H, H/2, H/4, H/8, H/16) are the skips of four MONAI `UpCat` blocks back to H, then
    a 1x1 convolution to the classes. The encoder's own modules run unchanged (`features`), so pretrained weights
    load as they are."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (256, 128, 64, 32)):
        super().__init__()
        from monai.networks.nets.basic_unet import UpCat

        skips, ins = (1024, 512, 256, 64), [2048, *widths[:-1]]
        self.ups = nn.ModuleList(UpCat(2, i, s, w, act=("relu", {"inplace": True}), norm="batch", bias=True,
                                       dropout=0.0, upsample="deconv") for i, s, w in zip(ins, skips, widths))
        self.out = nn.Conv2d(widths[-1], num_classes, 1)

    @staticmethod
    def features(resnet: nn.Module, x: Tensor) -> list[Tensor]:
        """MONAI ResNet (N, 1, H, W) -> [stem (H), layer1 (H/2), layer2 (H/4), layer3 (H/8), layer4 (H/16)]."""
        x = resnet.act(resnet.bn1(resnet.conv1(x)))
        out = [x]
        x = resnet.maxpool(x) if not resnet.no_max_pool else x
        for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
        return self.out(x)


class FinetuneModel(nn.Module):
    """The encoder + the task's heads (`finetune.tasks`: the task builds them and runs the forward pass)."""

    def __init__(self, task, encoder: nn.Module, vit: ViTConfig, *, n_out: int = 0, hidden: int = 256,
                 seg_width: int = 576, feature_norm: str = "none"):
        super().__init__()
        from finetune.tasks import get_task  # cycle: finetune.tasks imports finetune.models

        self.task = get_task(task) if isinstance(task, str) else task
        self.encoder, self.vit = encoder, vit
        dim = encoder.dim if isinstance(encoder, ResNetEncoder) else (
            2048 if not isinstance(encoder, ViTEncoder) else vit.dim)
        # standardised features for the pooled heads (task.feature_norm); part of the head, trained in every protocol
        self.feature_norm = nn.BatchNorm1d(dim) if feature_norm == "batchnorm" and not self.task.dense else (
            nn.Identity())
        self.task.build_heads(self, dim, n_out, hidden, seg_width)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def features(self, batch: dict) -> Tensor:
        """The pooled embedding of each sample (B, dim): what the heads, t-SNE and `finetune embed` see."""
        return self.task.features(self, batch)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        return self.task.forward(self, batch)


@torch.no_grad()
def precise_batchnorm(model: nn.Module, batches) -> int:
    """Recompute the running statistics of every BatchNorm in training mode as the plain average over `batches`
    with the current weights ("precise BN", Wu & Johnson 2021): with few steps an epoch and a fast-moving ResNet,
    the exponential averages lag the weights and the eval-mode network falls apart (measured: case Dice 0.03 in
    eval mode against 0.61 in train mode on the same validation cases). Returns the number of layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    if bns:
        for batch in batches:
            model(batch)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return len(bns)


def layer_id(name: str, depth: int) -> int:
    """ViT layer of a parameter for layer-wise lr decay: patch embedding 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith("encoder.patch_embed"):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model: FinetuneModel, lr: float, weight_decay: float, encoder_scale: float = 1.0,
                 layer_decay: Optional[float] = None) -> list[dict]:
    """AdamW groups: encoder parameters at lr * encoder_scale (x layer_decay^(depth + 1 - layer) when set), heads
    at lr; no weight decay on biases and norms. Frozen parameters are left out."""
    depth = model.vit.depth
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("encoder."):
            scale = encoder_scale
            if layer_decay is not None and isinstance(model.encoder, ViTEncoder):
                scale *= layer_decay ** (depth + 1 - layer_id(name, depth))
        wd = 0.0 if p.ndim < 2 else weight_decay
        g = groups.setdefault((scale, wd), {"params": [], "lr": lr * scale, "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())
