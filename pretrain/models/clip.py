"""ViTa Stage II: align the image encoder with the tabular encoder (CLIP, eqs. 3-4).

Both modalities are average-pooled, projected by one linear layer into a shared space (paper: 128-d) and
contrasted over the global batch (`pretrain.losses.clip_loss` gathers across ranks). The image encoder starts
from a Stage I export and runs with 50 % of its tokens masked, which (with activation checkpointing) is what
lets the paper reach a batch of 256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pretrain.config import TabularConfig, ViTConfig
from pretrain.losses import clip_loss
from pretrain.models.tabular import MLP_RATIO, ProjectionHead, TabularEncoder
from pretrain.models.vit import ViTEncoder, blocks_flops, num_tokens, visible_tokens


def encoder_weights_path(path: str | Path) -> Path:
    """An export's `encoder.safetensors`, given it or the folder holding it; FileNotFoundError when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no encoder export (python -m pretrain export --run ...)")
    return path


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Initialise `encoder` from an earlier stage's `encoder.safetensors` (or a run directory holding it)."""
    from safetensors.torch import load_file

    path = encoder_weights_path(path)
    missing, unexpected = encoder.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not match the configured model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def clip_flops_per_sample(vit: ViTConfig, tab: TabularConfig, num_features: int, train: bool = True) -> float:
    """Analytic matmul FLOPs (2 per multiply-add) of one Stage II sample, for MFU; the convention of
    `pretrain.models.vit.flops_per_sample` (training = 3 x forward, activation-checkpoint recompute not counted).

    With L = num_tokens, Lv = visible_tokens(L, image_mask_ratio), K = pt*ph*pw, D = image width, F = num_features
    (one token per feature, no class token: the tokens are average-pooled), Dt = tabular width, P = projection_dim:
        patch embed   2 * L * K * D                       (the conv runs on all L tokens, before masking)
        image blocks  blocks(Lv, D, depth)                (`blocks_flops`)
        tabular       blocks(F, Dt, tab.depth)            (MLP ratio 4, as `TabularEncoder` builds them)
        projections   2 * D * P + 2 * Dt * P
    Training subtracts the patch embedding's input gradient (2 * L * K * D), as for Stage I. Not counted: the
    tabular value embedding (an elementwise scale and a table lookup), LayerNorm, GELU, softmax, pooling and the
    CLIP loss (2 * B_global * P per sample and direction: 0.4 MFLOP per training sample at the paper's global
    batch 256, against 642 GFLOP for the rest).
    """
    pt, ph, pw = vit.patch
    K, D, L = pt * ph * pw, vit.dim, num_tokens(vit)
    flops = (2 * L * K * D + blocks_flops(visible_tokens(L, tab.image_mask_ratio), D, vit.depth, vit.mlp_ratio)
             + blocks_flops(num_features, tab.dim, tab.depth, MLP_RATIO) + 2 * (D + tab.dim) * tab.projection_dim)
    return float(3 * flops - 2 * L * K * D if train else flops)


class ImageTabularCLIP(nn.Module):
    def __init__(self, vit: ViTConfig, tab: TabularConfig, schema: Sequence[dict]):
        super().__init__()
        self.cfg = tab
        self.encoder = ViTEncoder(vit)  # named like the MAE's, so exports and loaders treat both alike
        self.tabular = TabularEncoder(schema, tab)
        self.image_norm = (nn.BatchNorm1d(vit.dim, affine=False) if tab.image_feature_norm == "batchnorm"
                           else nn.Identity())
        self.image_proj = ProjectionHead(vit.dim, tab.projection_dim)
        self.tabular_proj = ProjectionHead(tab.dim, tab.projection_dim)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = enabled
        self.tabular.grad_checkpointing = enabled

    def load_encoder(self, path: str | Path) -> None:
        load_encoder_weights(self.encoder, path)

    def flops_per_sample(self, train: bool = True) -> float:
        """`clip_flops_per_sample` of this model (its feature count comes from the dataset's schema)."""
        return clip_flops_per_sample(self.encoder.cfg, self.cfg, self.tabular.num_features, train)

    def embed(self, images: Tensor, tab_values: Tensor, tab_missing: Tensor) -> dict[str, Tensor]:
        """Both embeddings (B, projection_dim), not normalised, the whole image (no masking): for evaluation."""
        z_img = self.image_proj(self.image_norm(self.encoder(images)[0].mean(dim=1)))
        return {"image": z_img, "tabular": self.tabular_proj(self.tabular.pooled(tab_values, tab_missing))}

    def forward(self, images: Tensor, tab_values: Tensor, tab_missing: Tensor,
                generator: Optional[torch.Generator] = None, features_only: bool = False) -> dict:
        """The training loss ({"loss", "acc"}); `features_only`: the loss's inputs instead (`pretrain.gradcache`)."""
        latent, _, _ = self.encoder(images, mask_ratio=self.cfg.image_mask_ratio, generator=generator)
        feats = {"image": self.image_proj(self.image_norm(latent.mean(dim=1))),
                 "tabular": self.tabular_proj(self.tabular.pooled(tab_values, tab_missing, generator=generator))}
        return feats if features_only else self.contrastive_loss(feats)

    def contrastive_loss(self, feats: dict, grad_reduction: str = "mean") -> dict:
        """The CLIP loss over the global batch (gathered over the ranks) and the retrieval accuracy within this
        rank's rows."""
        z_img, z_tab = feats["image"], feats["tabular"]
        loss = clip_loss(z_img, z_tab, temperature=self.cfg.temperature, weight=self.cfg.loss_weight,
                         grad_reduction=grad_reduction)
        with torch.no_grad():  # local retrieval accuracy: does each image pick its own table row in the batch?
            sim = nn.functional.normalize(z_img.float(), dim=-1) @ nn.functional.normalize(z_tab.float(), dim=-1).T
            acc = (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean()
        return {"loss": loss, "acc": acc}
