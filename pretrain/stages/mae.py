"""ViTa Stage I: the multi-view 3D+T masked autoencoder on UK Biobank cine (`pretrain.models.vit`)."""

from __future__ import annotations

import torch

from pretrain import evaluate as ev
from pretrain.data import list_shards
from pretrain.models.vit import MaskedAutoencoder, flops_per_sample
from pretrain.stages.base import Stage, register_stage, ukb_eval_transform
from pretrain.transforms import augment_batch


class MAEStage(Stage):
    name, dataset, quality = "mae", "ukb", "psnr"  # reconstruction PSNR (dB) on the masked patches

    def build_model(self, cfg, manifest, run_dir=None, rank=0):
        return MaskedAutoencoder(cfg.model, cfg.mae)  # no BatchNorm, no earlier encoder to start from

    def transform(self, cfg, manifest, train):
        return None if train else ukb_eval_transform(cfg, manifest)

    def inputs(self, cfg, batch, device, dtype):
        return {"images": augment_batch(batch, device).to(dtype)}

    def flops(self, cfg, model):
        return flops_per_sample(cfg.model, cfg.mae, train=True)

    def evaluate(self, cfg, model, manifest, shards, transform, limit, device, dtype, cache):
        """Reconstruction PSNR against its two references; the training mean image is computed once (`cache`)."""
        if "mean_image" not in cache:
            cache["mean_image"] = ev.mean_image(list_shards(cfg.data.dataset, "train", manifest), transform, limit,
                                                device)
        return ev.mae_metrics(model, shards, transform, cache["mean_image"], batch_size=cfg.train.micro_batch,
                              limit=limit, seed=cfg.train.seed, device=device, dtype=dtype)

    def log_images(self, writer, step, model, inputs, out):
        writer.add_image("reconstruction (input | masked | MAE)", reconstruction_grid(model, inputs["images"], out),
                         step)


def reconstruction_grid(model: MaskedAutoencoder, images: torch.Tensor, out: dict) -> torch.Tensor:
    """(3, rows, cols) image for TensorBoard: per plane (rows) the input, the masked input and the
    reconstruction (columns) of the first sample's middle frame."""
    with torch.no_grad():
        x = images[:1].float()
        recon = model.reconstruct(x, out["pred"][:1], out["mask"][:1])
        mask_img = model.encoder.unpatchify(out["mask"][:1, :, None].float().expand(-1, -1, out["pred"].shape[-1]))
        visible = x * (1 - mask_img)
        t = x.shape[2] // 2
        rows = [torch.cat([x[0, p, t], visible[0, p, t], recon[0, p, t]], dim=1) for p in range(x.shape[1])]
        grid = torch.cat(rows, dim=0).clamp(0, 1).cpu()
    return grid[None].expand(3, -1, -1)


register_stage(MAEStage())
