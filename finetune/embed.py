"""`python -m finetune embed`: per-subject (or per-sequence) embeddings of a converted dataset from any encoder,
for downstream use outside this project (clustering, association studies, other models).

The embedding is what the fine-tuning heads see: the mean of the encoder's output tokens over the whole unmasked
input (UK Biobank: all planes, the encoder's frames; k-space: the mean over a sequence's images, evenly chosen
slices and frames). Written atomically as .npz: keys, split, embeddings (N, D) float32, and the encoder's stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.format import StoreReader
from core.fsutil import atomic_path
from finetune.data import SubjectDataset, loader
from finetune.models import FinetuneModel
from pretrain.config import KSpaceSampling
from pretrain.export import load_encoder


@torch.no_grad()
def embed(encoder_path: str | Path, dataset: str | Path, out: str | Path, split: str = "all",
          batch_size: int = 8, progress: bool = True) -> Path:
    encoder, vit, meta = load_encoder(encoder_path)
    reader = StoreReader(dataset)
    task = "modality_view" if reader.manifest.dataset == "kspace" else "phenotypes"
    size = reader.group["image"].shape[-1]  # k-space images as stored (any multiple of the patch)
    model = FinetuneModel(task, encoder, vit, n_out=1).eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    from tqdm import tqdm

    keys, splits, feats = [], [], []
    for s in (("train", "val", "test") if split == "all" else (split,)):
        ds = SubjectDataset(dataset, s, task, vit, train=False, seed=0,
                            kspace=KSpaceSampling(image_size=size) if reader.manifest.dataset == "kspace" else None)
        for batch in tqdm(loader(ds, batch_size, 0, shuffle=False, seed=0), desc=f"embed {s}", unit="batch",
                          disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            feats.append(model.features(batch).float().cpu().numpy())
            keys += batch["key"]
            splits += [s] * len(batch["key"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys), split=np.array(splits), stage=np.array(meta.get("stage", "")),
                     embeddings=np.concatenate(feats) if feats else np.zeros((0, vit.dim), np.float32))
    return out
