"""MetaCLIP-CMR: CLIP between single k-space-reconstructed images and sentences generated from their acquisition
metadata, with the soft-label loss (`pretrain.models.metaclip`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.fsutil import atomic_write_text
from pretrain import evaluate as ev
from pretrain.models.metaclip import MetaCLIP
from pretrain.stages.base import Stage, init_encoder, register_stage
from pretrain.transforms import KSpaceTransform


class MetaCLIPStage(Stage):
    name, dataset, quality = "metaclip", "kspace", "acc"  # in-batch image->text retrieval accuracy
    contrastive = True

    def build_model(self, cfg, manifest, run_dir=None, rank=0):
        corpus = text_corpus(manifest.root, run_dir)
        if run_dir is not None and rank == 0:  # frozen for a resume (the tokenizer of a from-scratch text encoder)
            atomic_write_text(Path(run_dir) / "text_corpus.json", json.dumps(corpus, indent=0))
        return init_encoder(cfg, MetaCLIP(cfg.model, cfg.metaclip, corpus, seed=cfg.train.seed))

    def encoder_architecture(self, cfg):
        return cfg.metaclip.image_encoder  # "vit" or "resnet50"

    def transform(self, cfg, manifest, train):
        return KSpaceTransform(cfg.data, cfg.metaclip.sampling(), cfg.train.seed, train=train)

    def inputs(self, cfg, batch, device, dtype):
        return {"images": batch["image"].to(device, dtype, non_blocking=True), "valid": batch["valid"].to(device),
                "texts": batch["text"], "modality": batch["modality"].to(device), "view": batch["view"].to(device),
                "view_valid": batch["view_valid"].to(device)}

    def evaluate(self, cfg, model, manifest, shards, transform, limit, device, dtype, cache):
        """Image<->sentence retrieval over the distinct metadata sentences and the soft-label loss."""
        emb = ev.embed_split(lambda b: {"image": model.embed_images(b["image"].to(device, dtype),
                                                                    b["valid"].to(device))},
                             shards, transform, batch_size=cfg.train.micro_batch, limit=limit,
                             labels=("text", "modality", "view", "view_valid"))
        sentences = sorted(set(emb["text"]))
        with torch.no_grad():  # every rank embeds all sentences alike (ZeRO-3 forwards are collective)
            text_emb = torch.cat([model.embed_texts(sentences[i:i + 256]).float().cpu()
                                  for i in range(0, len(sentences), 256)])
        mc = cfg.metaclip
        return ev.metaclip_metrics(emb, text_emb, sentences, model.logit_scale(), mc.alpha_modality, mc.beta_view,
                                   cfg.train.global_batch)


def text_corpus(dataset_dir: Path, run_dir: Path | None) -> list[str]:
    """Every metadata sentence of the dataset (all templates), the vocabulary of a from-scratch text encoder.
    Frozen in the run directory on the first start, so that a resume (even on a grown dataset) rebuilds the same
    tokenizer."""
    frozen = Path(run_dir) / "text_corpus.json" if run_dir is not None else None
    if frozen is not None and frozen.exists():
        return json.loads(frozen.read_text())
    texts = set()
    for path in sorted((Path(dataset_dir) / "meta").glob("block-*.jsonl")):
        for line in path.read_text().splitlines():
            texts.update(json.loads(line).get("texts", ()))
    if not texts:
        raise ValueError(f"{dataset_dir}: no metadata sentences in meta/*.jsonl (is it a converted k-space dataset?)")
    return sorted(texts)


register_stage(MetaCLIPStage())
