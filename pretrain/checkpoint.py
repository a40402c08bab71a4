"""Sharded checkpoints that are safe to resume from, and the encoder export.

A checkpoint is DeepSpeed's sharded save under `<run>/checkpoints/<tag>/` (each rank writes its own ZeRO
partitions) plus client state: step, samples seen, every rank's loader position and RNG states, the resolved
config. The resume pointer `<run>/checkpoints/latest` is ours, not DeepSpeed's: it is written (atomically, by
rank 0) only after a barrier that every rank reaches once its files are complete, and the tag gets a
`COMPLETE` marker at the same time — an interrupted save never becomes the resume point. The last `keep`
complete checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_prep.fsutil import atomic_write_text

LATEST, COMPLETE = "latest", "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    p = Path(ckpt_dir) / LATEST
    if not p.exists():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / COMPLETE).exists() else None


def save(engine, ckpt_dir: Path, step: int, client: dict, per_rank: dict, keep: int) -> str:
    """Collective: every rank calls it. `per_rank` (loader position, ...) is gathered into the client state."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    client = {**client, "step": step, "per_rank": _gather({**per_rank, "rng": rng_state()})}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"step": step, "world_size": dist.get_world_size()}))
        atomic_write_text(ckpt_dir / LATEST, tag)
        complete = sorted(p.parent.name for p in ckpt_dir.glob(f"*/{COMPLETE}"))
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: Path) -> Optional[dict]:
    """Resume from the latest complete checkpoint; returns the client state (with this rank's entry as
    `mine`, or None if the world size changed), or None when there is nothing to resume from."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    per_rank = client["per_rank"]
    client["mine"] = per_rank[dist.get_rank()] if len(per_rank) == dist.get_world_size() else None
    if client["mine"] is not None:
        set_rng_state(client["mine"]["rng"])
    client["tag"] = tag
    return client
