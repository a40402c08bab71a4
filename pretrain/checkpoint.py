"""Sharded checkpoints that are safe to resume from, and the encoder export.

A checkpoint is DeepSpeed's sharded save under `<run>/checkpoints/<tag>/` (each rank writes its own ZeRO
partitions) plus client state: step, samples seen, every rank's loader position and RNG states, the resolved
config. The resume pointer `<run>/checkpoints/latest` is ours, not DeepSpeed's: it is written (atomically, by
rank 0) only after a barrier that every rank reaches once its files are complete, and the tag gets a
`COMPLETE` marker at the same time — an interrupted save never becomes the resume point. The last `keep`
complete checkpoints are kept; an old tag is renamed before it is deleted, and `sweep` removes whatever an
interrupted save or deletion left (at start-up and after every save). `RunLock`: one trainer per run directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from core.fsutil import atomic_write_text

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


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    return json.loads((Path(ckpt_dir) / tag / COMPLETE).read_text())["world_size"]


def needs_universal(ckpt_dir: Path, tag: Optional[str], world_size: int) -> bool:
    """Whether resuming `tag` on `world_size` ranks needs its universal conversion: it was saved on another number
    of ranks with its optimizer state partitioned (ZeRO-1/2/3, or bf16's optimizer). A ZeRO-0 fp32 checkpoint holds
    the whole state in one file every rank loads as it is (the conversion tool refuses it)."""
    if tag is None or saved_world_size(ckpt_dir, tag) == world_size:
        return False
    return any((Path(ckpt_dir) / tag).glob("*optim_states.pt"))


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Collective. Convert a checkpoint to DeepSpeed's universal format (once, by rank 0, into a temp dir that is
    renamed when complete) so that it loads on another number of ranks; returns the universal tag."""
    import subprocess
    import sys

    import tempfile

    ckpt_dir = Path(ckpt_dir)
    utag = f"{tag}_universal"
    if dist.get_rank() == 0 and not (ckpt_dir / utag).exists():
        tmp = ckpt_dir / f".{utag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # the tool matches its own paths as regular expressions (unescaped): a run directory named e.g. "vit+tab"
        # fails it. It is given a plain-named link to the checkpoint directory instead.
        plain = Path(tempfile.mkdtemp(prefix="cmrfm_universal_"))
        link = plain / "ckpt"
        link.symlink_to(ckpt_dir.resolve(), target_is_directory=True)
        try:
            res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                  str(link / tag), "--output_folder", str(link / tmp.name)],
                                 capture_output=True, text=True)
        finally:
            link.unlink()
            plain.rmdir()
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed's universal conversion (needed to resume on another "
                               f"number of ranks) failed with exit status {res.returncode}:\n{res.stderr[-3000:]}")
        tmp.rename(ckpt_dir / utag)
    dist.barrier()
    return utag


class RunLock:
    """One trainer per run directory: rank 0 holds an exclusive `flock` on `<run>/.lock` for its lifetime (the
    kernel drops it when the process dies, SIGKILL included) and writes who holds it there. A second trainer on
    the same directory -- the same command started twice, a job and its requeued copy overlapping -- stops at
    once with one line naming the holder, instead of both writing the same checkpoint tags."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """None when held, else a description of the holder."""
        import fcntl
        import os
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        job = os.environ.get("SLURM_JOB_ID")
        holder = (f"pid {os.getpid()} on {socket.gethostname()}" + (f", SLURM job {job}" if job else "")
                  + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        self._fd = fd
        return None


def acquire_run_lock(run_dir: Path, device: torch.device) -> RunLock:
    """Collective: rank 0 takes the run directory's lock; every rank exits (code 2) with one line if another
    trainer holds it."""
    lock = RunLock(run_dir)
    holder = lock.acquire() if dist.get_rank() == 0 else None
    flag = torch.tensor([1.0 if holder else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        if holder:
            print(f"[pretrain] {run_dir}: another trainer is using this run directory ({holder}); stop it or "
                  "choose another checkpoint.dir", flush=True)
        raise SystemExit(2)
    return lock


def sweep(ckpt_dir: Path) -> list[str]:
    """Rank 0: remove what an interrupted save or deletion leaves behind, never the tag `latest` names (nor its
    universal conversion): tag folders without their COMPLETE marker (a save cut short), folders renamed for
    deletion (`.<tag>.deleting`), half-converted universal copies (`.<tag>_universal.tmp`), universal copies of
    removed tags, and temporary files (`.latest.*.tmp`). Returns the names removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    pointer = ckpt_dir / LATEST
    keep = pointer.read_text().strip() if pointer.is_file() else None  # complete or not: never touched
    protected = {LATEST, keep, f"{keep}_universal"} if keep else {LATEST}
    removed = []
    for p in sorted(ckpt_dir.iterdir()):
        name = p.name
        if name in protected:
            continue
        if p.is_dir() and not p.is_symlink():
            if name.startswith("."):
                debris = True
            elif name.endswith("_universal"):
                debris = not (ckpt_dir / name[: -len("_universal")] / COMPLETE).exists()
            else:
                debris = not (p / COMPLETE).exists()
            if debris:
                _delete_tree(p)
                removed.append(name)
        elif name.startswith(".") and name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _delete_tree(p: Path) -> None:
    """Rename first, then delete: a deletion cut short leaves a `.<name>.deleting` folder that `sweep` finishes,
    never a half-deleted tag that still looks like one."""
    if not p.name.startswith("."):
        target = p.with_name(f".{p.name}.deleting")
        shutil.rmtree(target, ignore_errors=True)
        p.rename(target)
        p = target
    shutil.rmtree(p, ignore_errors=True)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The tags with their COMPLETE marker, oldest first (by step)."""
    tags = [p.parent.name for p in Path(ckpt_dir).glob(f"step*/{COMPLETE}")]
    return sorted((t for t in tags if re.fullmatch(r"step[0-9]+", t)), key=lambda t: int(t[4:]))


def latest_tag(ckpt_dir: Path, report: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The checkpoint to resume from: the complete tag `latest` names (a user may point it at an older one to go
    back), else -- `latest` missing, unreadable, or naming a tag without its COMPLETE marker -- the newest complete
    tag, with `report` told why; None when no checkpoint is complete."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    try:
        named = pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = "<unreadable>"
    if named and re.fullmatch(r"step[0-9]+", named) and (ckpt_dir / named / COMPLETE).exists():
        return named
    complete = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    if complete and report is not None:
        why = "is missing" if named is None else f"names {named!r}, which is not a complete checkpoint"
        report(f"{pointer} {why}: resuming from the newest complete checkpoint, {complete[-1]}")
    return complete[-1] if complete else None


def save(engine, ckpt_dir: Path, step: int, client: dict, per_rank: dict, keep: int) -> str:
    """Collective: every rank calls it. `per_rank` (loader position, ...) is gathered into the client state."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    client = {**client, "step": step, "per_rank": _gather({**per_rank, "rng": rng_state()}),
              # lets ds_to_universal convert this checkpoint for a resume on another number of ranks
              UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    if os.environ.get("CMRFM_KILL_IN_SAVE") == tag:  # fault injection (tests): every rank dies mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"step": step, "world_size": dist.get_world_size()}))
        atomic_write_text(ckpt_dir / LATEST, tag)
        complete = sorted(p.parent.name for p in ckpt_dir.glob(f"*/{COMPLETE}"))
        for old in complete[:-keep] if keep > 0 else []:
            _delete_tree(ckpt_dir / old)
        sweep(ckpt_dir)  # and the universal copies of those, and anything an earlier save left behind
    dist.barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: Optional[str], universal: bool = False) -> Optional[dict]:
    """Resume from checkpoint `tag` (`latest_tag`); returns the client state (with this rank's entry as `mine`, or
    None if the world size changed), or None when there is nothing to resume from. `universal`: the engine was
    built with `checkpoint.load_universal` (world size changed): load the converted copy."""
    if tag is None:
        return None
    load_tag = to_universal(ckpt_dir, tag) if universal else tag
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    per_rank = client["per_rank"]
    client["mine"] = per_rank[dist.get_rank()] if len(per_rank) == dist.get_world_size() else None
    if client["mine"] is not None:
        set_rng_state(client["mine"]["rng"])
    client["tag"] = tag
    return client
