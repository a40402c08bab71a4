"""ViTa Stage II: CLIP alignment of the image encoder's embedding with the tabular encoder's
(`pretrain.models.clip`, `pretrain.models.tabular`)."""

from __future__ import annotations

from pretrain import evaluate as ev
from pretrain.models.clip import ImageTabularCLIP
from pretrain.stages.base import Stage, init_encoder, register_stage, ukb_eval_transform
from pretrain.transforms import augment_batch


class TabularCLIPStage(Stage):
    name, dataset, quality = "tabular_clip", "ukb", "acc"  # in-batch image->table retrieval accuracy
    contrastive = True

    def build_model(self, cfg, manifest, run_dir=None, rank=0):
        if "stats" not in manifest.tabular:
            raise ValueError(f"{manifest.root}: no tabular features/statistics (convert with --tabular)")
        return init_encoder(cfg, ImageTabularCLIP(cfg.model, cfg.tabular, manifest.tabular_features))

    def transform(self, cfg, manifest, train):
        return None if train else ukb_eval_transform(cfg, manifest)

    def inputs(self, cfg, batch, device, dtype):
        return {"images": augment_batch(batch, device).to(dtype),
                "tab_values": batch["tabular_values"].to(device, non_blocking=True),
                "tab_missing": batch["tabular_missing"].to(device, non_blocking=True)}

    def flops(self, cfg, model):
        return model.flops_per_sample(train=True)

    def evaluate(self, cfg, model, manifest, shards, transform, limit, device, dtype, cache):
        """Image<->table retrieval and the contrastive loss over `global_batch` chunks."""
        emb = ev.embed_split(lambda b: model.embed(**self.inputs(cfg, b, device, dtype)), shards, transform,
                             batch_size=cfg.train.micro_batch, limit=limit)
        return ev.tabular_clip_metrics(emb, cfg.tabular.temperature, cfg.tabular.loss_weight, cfg.train.global_batch)


register_stage(TabularCLIPStage())
