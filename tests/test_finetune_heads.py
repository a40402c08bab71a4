"""Heads that read the features: the optional BatchNorm before every pooled head, and the segmentation decoder's
plane identity (a blood pool is LV on the short axis, LA or RA on a long-axis view)."""

from __future__ import annotations

import torch
from torch import nn

from finetune.models import FinetuneModel
from pretrain.config import ViTConfig
from pretrain.models.vit import ViTEncoder

VIT = ViTConfig(img_size=32, sa_planes=3, la_planes=3, frames=5, patch=(5, 8, 8), dim=32, depth=2, heads=4)


def _batch(b: int = 4) -> dict:
    torch.manual_seed(0)
    return {"image": torch.rand(b, 6, 5, 32, 32)}


def test_feature_norm_standardises_what_the_head_reads():
    torch.manual_seed(0)
    plain = FinetuneModel("phenotypes", ViTEncoder(VIT), VIT, n_out=3, hidden=16)
    normed = FinetuneModel("phenotypes", ViTEncoder(VIT), VIT, n_out=3, hidden=16, feature_norm="batchnorm")
    assert isinstance(plain.feature_norm, nn.Identity) and isinstance(normed.feature_norm, nn.BatchNorm1d)
    out = normed(_batch())
    f = out["features"]  # the raw pooled features are returned (t-SNE, embed), the head reads them standardised
    z = normed.feature_norm(f)
    assert torch.allclose(z.mean(0), torch.zeros(VIT.dim), atol=1e-4)
    assert (z.var(0, unbiased=False) > 0.5).all()  # ~unit variance per feature (BatchNorm's eps aside) ...
    assert float(f.var(0).mean()) < 0.05 * float(z.var(0).mean())  # ... where the pooled features barely vary
    assert out["targets"].shape == (4, 3)
    for task, key in (("diseases", "logits"), ("modality_view", "modality")):
        m = FinetuneModel(task, ViTEncoder(VIT), VIT, n_out=2, hidden=8, feature_norm="batchnorm")
        assert isinstance(m.feature_norm, nn.BatchNorm1d)
    seg = FinetuneModel("segmentation", ViTEncoder(VIT), VIT, seg_width=16, feature_norm="batchnorm")
    assert isinstance(seg.feature_norm, nn.Identity)  # not a pooled head


def test_segmentation_decoder_knows_the_plane():
    """The same image on two planes gets different logits only through the plane channels of the first skip."""
    torch.manual_seed(0)
    model = FinetuneModel("segmentation", ViTEncoder(VIT), VIT, seg_width=16).eval()
    assert model.decoder.enc0.layer.conv1.conv.in_channels == VIT.frames + 6
    one = torch.rand(1, 1, 5, 32, 32)
    images = one.expand(1, 6, 5, 32, 32).contiguous()
    hidden = [torch.zeros(1, 6 * 16, VIT.dim)] * (len(model.decoder.skip_blocks) + 1)  # identical tokens per plane
    with torch.no_grad():
        logits = model.decoder(images, hidden)
    assert logits.shape == (1, 6, 5, 6, 32, 32)
    assert not torch.allclose(logits[0, 0], logits[0, 4])
