"""Validation of the contrastive stages during training: retrieval top-1 / top-5 both ways and the loss.

Every rank embeds its share of the validation split (shards `rank::world`, at most `limit` samples per rank,
no augmentation: evaluation transforms are deterministic), in the same number of batches on every rank (ZeRO-3
gathers parameters in each forward, so all ranks must run alike: a rank with fewer samples repeats a filler
that is dropped). The embeddings are gathered to every rank and scored there:

  tabular_clip  image->table and table->image: is the subject's own row among the top k of N?
  metaclip      image->text over the DISTINCT metadata sentences (template 0): is the sequence's own sentence
                among the top k? text->image: for each distinct sentence, is one of its sequences among the top k
                images?
  loss          the stage's contrastive loss over consecutive chunks of `global_batch` validation samples (the
                training batch size, so the value compares with the training loss), averaged.

Stage I (MAE) is scored by its reconstruction PSNR on the masked patches of validation samples (fixed masks),
beside two references on exactly the same patches, so that a number means something: a constant image (the
training mean intensity) and the per-position mean image of the training samples. A model that does not beat the
mean image has learned nothing about the individual subject.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pretrain.data import Shard, _read_shard, collate
from pretrain.losses import LOCAL, clip_loss, soft_clip_loss
from pretrain.models.vit import patchify


def retrieval_topk(query, gallery, match, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval by cosine similarity: the fraction of queries with a correct gallery item in their top k.

    `query` (Nq, D), `gallery` (Ng, D) (tensors or arrays), `match` (Nq, Ng) bool marks the correct items. A query
    with no correct item counts as a miss. k is capped at Ng; equal similarities rank in gallery order.
    Returns ``{"top1": ..., "top5": ..., "n": Nq}``."""
    q = F.normalize(torch.as_tensor(np.asarray(query, np.float64)), dim=1)
    g = F.normalize(torch.as_tensor(np.asarray(gallery, np.float64)), dim=1)
    m = np.asarray(match, bool)
    if m.shape != (len(q), len(g)):
        raise ValueError(f"match {m.shape}, expected ({len(q)}, {len(g)})")
    order = np.argsort(-(q @ g.T).numpy(), axis=1, kind="stable")  # gallery indices, most similar first
    hits = np.take_along_axis(m, order, axis=1)  # hits[i, r]: the r-th ranked item is correct for query i
    out: dict[str, float] = {f"top{k}": float(hits[:, :min(k, len(g))].any(1).mean()) if len(q) else float("nan")
                             for k in ks}
    out["n"] = len(q)
    return out


def _epoch0(transform: Callable):
    """The members the transform uses in epoch 0 (evaluation reads every sample as in epoch 0)."""
    members = getattr(transform, "members", None)
    return None if members is None else (lambda key, suffixes: members(key, 0, suffixes))


def _read(shards: Sequence[Shard], transform: Callable, limit: int) -> list[dict]:
    out = []
    for shard in shards:
        for raw in _read_shard(shard.url, select=_epoch0(transform)):
            if len(out) == limit:
                return out
            out.append(transform(raw, 0))
    return out


def _batches(samples: list[dict], filler: dict, size: int, n_batches: int) -> Iterable[tuple[dict, int]]:
    for b in range(n_batches):
        real = samples[b * size:(b + 1) * size]
        yield collate(real + [filler] * (size - len(real))), len(real)


@torch.no_grad()
def embed_split(embed: Callable[[dict], dict[str, Tensor]], shards: Sequence[Shard], transform: Callable, *,
                batch_size: int, limit: int, labels: Sequence[str] = ()) -> dict:
    """Collective. Every rank's share embedded by `embed(batch) -> {name: (B, D)}` and gathered to all ranks:
    {name: (N, D) float32 CPU tensors, "key": [...], label: [...] for each of `labels`}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = _read(shards[rank::world], transform, limit)
    filler = mine[0] if mine else _read(shards[:1], transform, 1)[0]
    n = torch.tensor([math.ceil(len(mine) / batch_size)])
    if world > 1:
        n = n.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    parts: dict[str, list] = {}
    for batch, real in _batches(mine, filler, batch_size, int(n.item())):
        for name, z in embed(batch).items():
            parts.setdefault(name, []).append(z[:real].float().cpu())
    local = {name: torch.cat(v) for name, v in parts.items()}
    local["key"] = [s["key"] for s in mine]
    for name in labels:
        local[name] = [s[name].item() if isinstance(s[name], Tensor) else s[name] for s in mine]
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    out: dict = {}
    for part in gathered:
        for name, v in part.items():
            if isinstance(v, Tensor) and v.numel() == 0:
                continue
            out.setdefault(name, []).append(v)
    return {name: torch.cat(v) if isinstance(v[0], Tensor) else sum(v, []) for name, v in out.items()}


@torch.no_grad()
def mean_image(shards: Sequence[Shard], transform: Callable, limit: int, device: torch.device) -> Tensor:
    """Collective. The per-position mean image (P, T, H, W) of up to `limit` samples per rank of `shards`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total, count = None, 0
    for shard in shards[rank::world]:
        for raw in _read_shard(shard.url, select=_epoch0(transform)):
            if count == limit:
                break
            img = transform(raw, 0)["image"].double()
            total = img if total is None else total + img
            count += 1
    shape = torch.tensor(list(total.shape) if total is not None else [0] * 4, dtype=torch.float64)
    if world > 1:  # a rank with no samples still takes part, with the shape of the others
        shape = shape.to(device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    shape = [int(x) for x in shape.cpu().tolist()]
    buf = torch.zeros(int(np.prod(shape)) + 1, dtype=torch.float64, device=device)
    if total is not None:
        buf[:-1] = total.flatten().to(device)
    buf[-1] = count
    if world > 1:
        dist.all_reduce(buf)
    return (buf[:-1] / buf[-1].clamp(min=1)).reshape(shape).float().cpu()


@torch.no_grad()
def mae_metrics(model, shards: Sequence[Shard], transform: Callable, reference: Tensor, *, batch_size: int,
                limit: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Collective. Mean over validation samples of the PSNR (dB, data range 1) on each sample's masked patches:
    the model's reconstruction (`psnr`), the training mean image `reference` (`psnr_mean_image`) and its mean
    intensity as a constant image (`psnr_constant`). Masks come from a generator seeded by (seed, rank, batch),
    so a checkpoint is scored on the same patches every time."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    patch = model.vit_cfg.patch
    ref = patchify(reference[None].float(), patch)  # (1, L, D)
    counter = [0]

    def score(batch: dict) -> dict[str, Tensor]:
        images = batch["image"].to(device, dtype)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + rank) * 65_537 + counter[0])
        counter[0] += 1
        out = model(images, generator=gen)
        target, mean, std = model._target(images)
        m = out["mask"].float()

        def psnr(x: Tensor) -> Tensor:
            err = ((x.float() - target) ** 2).mean(dim=-1)
            mse = (err * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            return (10.0 * torch.log10(1.0 / mse.clamp(min=1e-10)))[:, None].cpu()

        r = ref.to(target.device).expand_as(target)
        return {"psnr": psnr((out["pred"].float() * std + mean).clamp(0.0, 1.0)), "psnr_mean_image": psnr(r),
                "psnr_constant": psnr(torch.full_like(target, float(reference.mean())))}

    emb = embed_split(score, shards, transform, batch_size=batch_size, limit=limit)
    return {k: float(emb[k].mean()) for k in ("psnr", "psnr_mean_image", "psnr_constant")} | {"n": len(emb["key"])}


def _chunked_mean(n: int, size: int, fn: Callable[[slice], Tensor]) -> float:
    """Mean of fn over consecutive chunks of `size` (a last chunk of one sample is skipped: no negatives)."""
    values = [fn(slice(i, i + size)).item() for i in range(0, n, size) if min(size, n - i) > 1]
    return float(np.mean(values)) if values else float("nan")


def tabular_clip_metrics(emb: dict, temperature: float, weight: float, global_batch: int) -> dict[str, float]:
    z_img, z_tab = emb["image"], emb["tabular"]
    eye = torch.eye(len(z_img), dtype=torch.bool)
    i2t, t2i = retrieval_topk(z_img, z_tab, eye), retrieval_topk(z_tab, z_img, eye)
    i2t.pop("n"), t2i.pop("n")
    loss = _chunked_mean(len(z_img), global_batch, lambda s: clip_loss(z_img[s], z_tab[s], temperature, weight,
                                                                      group=LOCAL))
    return {"loss": loss, "n": len(z_img), **{f"image_to_table_{k}": v for k, v in i2t.items()},
            **{f"table_to_image_{k}": v for k, v in t2i.items()}}


def metaclip_metrics(emb: dict, text_emb: Tensor, sentences: Sequence[str], logit_scale: Tensor, alpha: float,
                     beta: float, global_batch: int) -> dict[str, float]:
    """emb: image embeddings + labels per sequence; text_emb (S, D) of the distinct `sentences`."""
    z_img = emb["image"]
    idx = torch.tensor([sentences.index(t) for t in emb["text"]])
    match = idx[:, None] == torch.arange(len(sentences))[None, :]  # (N, S)
    i2t, t2i = retrieval_topk(z_img, text_emb, match), retrieval_topk(text_emb, z_img, match.T)
    i2t.pop("n"), t2i.pop("n")
    z_txt = text_emb[idx]
    m, v, ok = (torch.tensor(emb[k]) for k in ("modality", "view", "view_valid"))
    loss = _chunked_mean(len(z_img), global_batch, lambda s: soft_clip_loss(
        z_img[s], z_txt[s], m[s], v[s], ok[s], logit_scale.detach().cpu(), alpha, beta, group=LOCAL))
    return {"loss": loss, "n": len(z_img), "sentences": len(sentences),
            **{f"image_to_text_{k}": v for k, v in i2t.items()}, **{f"text_to_image_{k}": v for k, v in t2i.items()}}
