"""MetaCLIP-CMR (Fu et al.): align CMR images with sentences generated from their acquisition metadata.

Per sequence the loader gives up to `slices x max_frames` single 2D images (N per sequence, padded, with a
validity mask) and one metadata sentence. One shared image encoder embeds every valid image; the embeddings of a
sequence are mean-pooled (paper Sec. 2.3), projected into the shared 256-d space, and contrasted with the
projected sentence embeddings by the soft-label loss of eqs. 6-9 (`soft_clip_loss`: same modality / same view
pairs get alpha / beta of the target mass), gathered over all ranks, with a learnable temperature.

Image encoders (`metaclip.image_encoder`):
  "vit"      this project's ViT (`ViTEncoder.forward_2d`, tokens mean-pooled): the same weights serve Stage I/II
             and every downstream task, and may start from a Stage I export (`checkpoint.init_from`);
  "resnet50" MONAI's 2D ResNet-50 with one input channel, no classifier (2048-d pooled features): the paper's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pretrain.config import MetaCLIPConfig, ViTConfig
from pretrain.losses import LogitScale, soft_clip_loss
from pretrain.models.clip import load_encoder_weights
from pretrain.models.tabular import ProjectionHead
from pretrain.models.text import build_text_encoder
from pretrain.models.vit import ViTEncoder


def build_image_encoder(kind: str, vit: ViTConfig) -> tuple[nn.Module, int]:
    """(encoder, embedding width). The encoder is stored as `encoder` in every model, so exports find it."""
    if kind == "vit":
        return ViTEncoder(vit), vit.dim
    if kind == "resnet50":
        from monai.networks.nets import resnet50

        return resnet50(spatial_dims=2, n_input_channels=1, feed_forward=False), 2048
    raise ValueError(f"metaclip.image_encoder must be 'vit' or 'resnet50', got {kind!r}")


def encode_2d(encoder: nn.Module, x: Tensor) -> Tensor:
    """(N, H, W) single images -> (N, width) pooled features, whichever encoder."""
    if isinstance(encoder, ViTEncoder):
        return encoder.forward_2d(x).mean(dim=1)
    return encoder(x[:, None].to(next(encoder.parameters()).dtype))


def pool_sequences(encoder: nn.Module, images: Tensor, valid: Tensor) -> Tensor:
    """images (B, N, H, W), valid (B, N) bool -> (B, width): the mean of each sequence's valid images' features.
    Only valid images go through the encoder."""
    B, N = valid.shape
    feats = encode_2d(encoder, images.flatten(0, 1)[valid.flatten()]).float()
    owner = torch.arange(B, device=valid.device).repeat_interleave(N)[valid.flatten()]
    pooled = torch.zeros(B, feats.shape[1], device=feats.device).index_add_(0, owner, feats)
    return pooled / valid.sum(dim=1, keepdim=True).clamp_min(1).to(pooled)


class MetaCLIP(nn.Module):
    def __init__(self, vit: ViTConfig, cfg: MetaCLIPConfig, corpus: Sequence[str], seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder, width = build_image_encoder(cfg.image_encoder, vit)
        self.text = build_text_encoder(cfg, corpus, seed=seed)
        self.image_proj = ProjectionHead(width, cfg.projection_dim)
        self.text_proj = ProjectionHead(self.text.dim, cfg.projection_dim)
        self.logit_scale = LogitScale(cfg.init_temperature)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if isinstance(self.encoder, ViTEncoder):
            self.encoder.grad_checkpointing = enabled
        if enabled and hasattr(self.text.model, "gradient_checkpointing_enable"):
            self.text.model.gradient_checkpointing_enable()

    def load_encoder(self, path: str | Path) -> None:
        if not isinstance(self.encoder, ViTEncoder):
            raise ValueError("checkpoint.init_from: only the ViT image encoder starts from an earlier stage's export")
        load_encoder_weights(self.encoder, path)

    def image_features(self, images: Tensor, valid: Tensor) -> Tensor:
        """images (B, N, H, W), valid (B, N) bool -> (B, width), see `pool_sequences`."""
        return pool_sequences(self.encoder, images, valid)

    def embed_images(self, images: Tensor, valid: Tensor) -> Tensor:
        """(B, projection_dim) image embeddings (not normalised)."""
        return self.image_proj(self.image_features(images, valid).to(self.image_proj.proj.weight.dtype))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """(len(texts), projection_dim) sentence embeddings (not normalised)."""
        return self.text_proj(self.text(list(texts)).to(self.text_proj.proj.weight.dtype))

    def forward(self, images: Tensor, valid: Tensor, texts: Sequence[str], modality: Tensor, view: Tensor,
                view_valid: Tensor, generator: Optional[torch.Generator] = None, features_only: bool = False) -> dict:
        """The training loss ({"loss", "acc"}); `features_only`: the loss's inputs instead (`pretrain.gradcache`):
        both embeddings, the labels and the learnable log-temperature (shared by the batch: a 0-dim tensor)."""
        feats = {"image": self.embed_images(images, valid), "text": self.embed_texts(texts), "texts": list(texts),
                 "modality": modality, "view": view, "view_valid": view_valid, "logit_scale": self.logit_scale()}
        return feats if features_only else self.contrastive_loss(feats)

    def contrastive_loss(self, feats: dict, grad_reduction: str = "mean") -> dict:
        """The soft-label loss over the global batch (gathered over the ranks) and the retrieval accuracy within
        this rank's rows."""
        z_img, z_txt, texts = feats["image"], feats["text"], feats["texts"]
        loss = soft_clip_loss(z_img, z_txt, feats["modality"], feats["view"], feats["view_valid"],
                              feats["logit_scale"], self.cfg.alpha_modality, self.cfg.beta_view,
                              grad_reduction=grad_reduction)
        with torch.no_grad():  # local retrieval accuracy: does each image pick its own sentence in the batch?
            sim = nn.functional.normalize(z_img.float(), dim=-1) @ nn.functional.normalize(z_txt.float(), dim=-1).T
            same = torch.tensor([[a == b for b in texts] for a in texts], device=sim.device)
            acc = same[torch.arange(len(sim)), sim.argmax(dim=1)].float().mean()
        return {"loss": loss, "acc": acc}
