"""The conversion engine shared by the UK Biobank and k-space jobs: inputs in, shards + Zarr + manifest out.

Unit of work: a *block* of up to `block_size` inputs of one split. A Ray task converts a block and writes
  - one WebDataset tar shard  `shards/<dataset>-<split>-<block>.tar`   (temp name, renamed when complete),
  - one Zarr shard per array  `store.zarr/<array>` rows [block * B, (block + 1) * B)  (a block owns its shard
    files, so tasks never write the same file), and `meta/block-<block>.jsonl`,
and returns what it wrote and what it rejected. The driver commits a run by writing `manifest.json`
atomically at the end: readers trust only blocks the manifest lists, so a crashed run leaves nothing that is
ever read, and the next run overwrites its leftovers.

Growth: inputs already in the manifest are skipped, new inputs fill new blocks appended after the old ones —
existing shards stay byte-identical, and a re-run on the same source does nothing. Inputs quarantined before are
skipped unless their files changed.

Splits (`manifest["split_scheme"]`, fixed when a dataset is created; a manifest without one is "hash"):
  - "hash" (UK Biobank): a hash of the key (`format.split_of`), a function of the key alone;
  - "published" (ACDC, M&Ms): the source's own train / test sets (`WorkItem.published`, the benchmark's test set
    as published), validation drawn from its training set by the key's hash (`val_fraction`);
  - "stratified" (k-space): inputs carry a `group` (the patient) and a `stratum` ((modality, view)); a group's
    inputs share one split (no patient in two splits) and every stratum's split counts follow the fractions
    (`format.stratified_group_splits`). The manifest records every group's split and the per-stratum counts, so
    a later run puts new inputs of a known group into its split and new groups where the strata need them;
    nothing already assigned ever moves. A stratum missing from a split is listed (`split_scheme.missing`) and
    printed as a warning.

Failure: an input that raises is quarantined with its file and reason. A block whose task keeps failing (a
worker crash, an out-of-memory kill) is retried by Ray; if it still fails, each of its inputs is probed in a
task of its own, the ones that crash are quarantined, and the block is converted without them.
Counts reconcile per run: inputs = written + quarantined + skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np

from core.config import ConfigError, config_to_dict
from core.format import KEY_BYTES, SCHEMA_VERSION, encode_key
from core.fsutil import atomic_path, atomic_write_text, dir_bytes
from data_prep.splits import STRATIFIED_SALT, split_of, stratified_group_splits

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
STORE = "store.zarr"


@dataclass
class JobConfig:
    """What every conversion job shares (sections of the job configs)."""

    out: Path = Path("runs/data")
    block_size: int = 32  # inputs per tar shard and per Zarr shard (a few hundred MB of shard)
    workers: int = 0  # local Ray cluster CPUs; 0: all cores
    ray_address: Optional[str] = None  # join an existing Ray cluster instead ("auto" inside a Ray allocation)
    max_retries: int = 2  # Ray retries of a crashed block before its inputs are probed one by one
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    retry_quarantined: bool = False  # re-try inputs quarantined by an earlier run even if their files are unchanged

    def __post_init__(self):
        if self.block_size < 1 or self.workers < 0 or self.max_retries < 0:
            raise ValueError("block_size >= 1, workers >= 0 and max_retries >= 0 are required")


@dataclass
class WorkItem:
    key: str
    paths: list[str]  # the input files (named in quarantine records; fingerprinted)
    payload: Any = None  # whatever the dataset's `process` needs besides the paths
    group: Optional[str] = None  # split scheme "stratified": inputs of one group share a split (None: the key)
    stratum: Optional[str] = None  # split scheme "stratified": balanced over the splits (None: "unknown")
    published: Optional[str] = None  # split scheme "published": the source's own split, "train" or "test"


@dataclass
class ArraySpec:
    shape: tuple[int, ...]  # per sample (per item of a ragged array)
    dtype: str
    chunks: tuple[int, ...]  # per sample; the shard is (block_size, *shape)
    fill: Any = 0
    ragged: int = 0  # > 0: a sample holds up to this many items of `shape`, stored contiguously in a flat array
    #                  with `<name>_offset` / `<name>_count` per sample (memory and disk follow the real sizes)


class Dataset(Protocol):
    """What a job plugs into the engine (must be picklable: it travels to the Ray workers)."""

    name: str

    def arrays(self) -> dict[str, ArraySpec]: ...  # the Sample's ndarray fields, as stored in Zarr

    def process(self, item: WorkItem) -> Any: ...  # -> a format.*Sample; raises on bad input

    # optional: `rows(sample) -> {array name: value}` when the Zarr rows are not the sample's fields as they are


@dataclass
class Block:
    id: int
    split: str
    items: list[Optional[WorkItem]]  # slot i -> Zarr row id * block_size + i


@dataclass
class BlockResult:
    id: int
    split: str
    keys: list[str]  # written, in block order
    rows: list[int]  # their Zarr rows
    quarantined: list[dict]
    shard: Optional[dict]  # path, split, samples, sha256, bytes — None when nothing was written
    node: str = ""  # the address of the Ray node that converted it (the summary counts blocks per node)


def fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{p}|missing".encode())
    return h.hexdigest()[:16]


def mean_input_bytes(items: list[WorkItem]) -> float:
    """Average bytes of the inputs per work item (the summary's source size), counting regular files only: a
    dangling link or a symlink loop was quarantined with its reason and has no size."""
    total = 0
    for it in items:
        for p in it.paths:
            try:
                total += os.stat(p).st_size if os.path.isfile(p) else 0
            except OSError:
                pass
    return total / max(len(items), 1)


def failure_reason(item: WorkItem, e: BaseException) -> str:
    """Why an input failed, always naming its file: a reader's own errors already do; anything else (numpy's
    "Singular matrix", "cannot convert float NaN to integer") gets the input's files put in front."""
    text = f"{type(e).__name__}: {e}"
    if any(os.fspath(p) in str(e) for p in item.paths) or not item.paths:
        return text
    return f"{', '.join(os.fspath(p) for p in item.paths)}: {text}"


def _quarantine_record(item: WorkItem, reason: str) -> dict:
    return {"key": item.key, "files": item.paths, "reason": reason, "fingerprint": fingerprint(item.paths)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store_path(out: Path) -> Path:
    return out / STORE


def _node_address() -> str:
    """This Ray node's address ("" outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else ""
    except Exception:  # the record is informative; it never fails a block
        return ""


def run_block(dataset: Dataset, block: Block, out: str, block_size: int) -> BlockResult:
    """Convert one block (runs in a Ray worker). Never raises for a bad input: it quarantines it."""
    import webdataset as wds
    import zarr

    out = Path(out)
    specs = dataset.arrays()
    B = block_size
    data = {name: np.full((B, *s.shape), s.fill, s.dtype) for name, s in specs.items() if not s.ragged}
    ragged = {name: [] for name, s in specs.items() if s.ragged}
    offsets = {name: (np.full(B, -1, np.int64), np.zeros(B, np.int32)) for name in ragged}
    next_row = {name: block.id * B * specs[name].ragged for name in ragged}
    valid = np.zeros(B, bool)
    keys = np.zeros((B, KEY_BYTES), np.uint8)
    written, rows, quarantined, metas = [], [], [], []
    shard_rel = Path("shards") / f"{dataset.name}-{block.split}-{block.id:06d}.tar"
    shard_path = out / shard_rel
    shard_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(shard_path) as tmp:
        with open(tmp, "wb") as f:
            tar = wds.TarWriter(f, encoder=False, mtime=0.0, user="cmrfm", group="cmrfm")
            for i, item in enumerate(block.items):
                if item is None:  # a slot emptied by crash isolation
                    continue
                try:
                    sample = dataset.process(item)
                except Exception as e:  # a bad input must never take the job down
                    quarantined.append(_quarantine_record(item, failure_reason(item, e)))
                    continue
                tar.write(sample.to_wds())
                values = dataset.rows(sample) if hasattr(dataset, "rows") else {n: getattr(sample, n) for n in specs}
                for name in data:
                    data[name][i] = values[name]
                for name, parts in ragged.items():
                    v = np.asarray(values[name], specs[name].dtype)
                    if len(v) > specs[name].ragged:
                        raise ValueError(f"{item.key}: {len(v)} {name} items exceed the capacity {specs[name].ragged}")
                    offsets[name][0][i], offsets[name][1][i] = next_row[name], len(v)
                    next_row[name] += len(v)
                    parts.append(v)
                valid[i], keys[i] = True, encode_key(item.key)
                written.append(item.key)
                rows.append(block.id * B + i)
                metas.append({"row": block.id * B + i, "key": item.key, **sample.meta})
            tar.close()
    if not written:
        shard_path.unlink()  # a complete but empty tar: not a shard, never listed
    shard = None
    if written:
        shard = {"path": shard_rel.as_posix(), "split": block.split, "samples": len(written),
                 "sha256": _sha256(shard_path), "bytes": shard_path.stat().st_size, "block": block.id}
    # Zarr: this block owns rows [id * B, (id + 1) * B), i.e. exactly one shard file per array
    group = zarr.open_group(_store_path(out), mode="r+")
    sl = slice(block.id * B, (block.id + 1) * B)
    for name in data:
        group[name][sl] = data[name]
    for name, parts in ragged.items():
        start = block.id * B * specs[name].ragged
        if parts:  # one write of the block's real items: its shard file is written once
            group[name][start:start + sum(len(p) for p in parts)] = np.concatenate(parts)
        group[f"{name}_offset"][sl], group[f"{name}_count"][sl] = offsets[name]
    group["valid"][sl] = valid
    group["key"][sl] = keys
    meta_path = out / "meta" / f"block-{block.id:06d}.jsonl"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metas))
    return BlockResult(block.id, block.split, written, rows, quarantined, shard, _node_address())


def probe_item(dataset: Dataset, item: WorkItem) -> Optional[str]:
    """Process one input without writing anything: None if it converts, else the reason it does not."""
    try:
        dataset.process(item)
        return None
    except Exception as e:
        return failure_reason(item, e)



def _open_or_create_store(out: Path, dataset: Dataset, block_size: int, capacity: int):
    import zarr
    from zarr.codecs import BloscCodec

    path = _store_path(out)
    blosc = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    group = zarr.open_group(path, mode="a")
    specs = {**dataset.arrays(),
             "valid": ArraySpec((), "bool", (), False),
             "key": ArraySpec((KEY_BYTES,), "uint8", (KEY_BYTES,), 0)}
    for name, s in list(specs.items()):
        if s.ragged:
            specs[f"{name}_offset"] = ArraySpec((), "int64", (), -1)
            specs[f"{name}_count"] = ArraySpec((), "int32", (), 0)
    for name, s in specs.items():
        per_block = block_size * (s.ragged or 1)  # rows a block owns = one shard
        rows = capacity * (s.ragged or 1)
        if name in group:
            arr = group[name]
            if arr.shape[1:] != s.shape or str(arr.dtype) != np.dtype(s.dtype).name:
                raise ValueError(f"{path}/{name}: existing array {arr.shape[1:]} {arr.dtype} does not match "
                                 f"this job's {s.shape} {s.dtype}; convert into a new --out")
            if arr.shape[0] < rows:
                arr.resize((rows, *s.shape))
            continue
        group.create_array(name, shape=(rows, *s.shape), chunks=(1, *s.chunks), shards=(per_block, *s.shape),
                           dtype=s.dtype, compressors=blosc, fill_value=s.fill)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "dataset": dataset.name, "block_size": block_size})
    return group


def load_manifest(out: Path) -> Optional[dict]:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


SPLIT_SCHEMES = ("hash", "stratified", "published")


def _group(it: WorkItem) -> str:
    return it.group if it.group is not None else it.key


def _stratum(it: WorkItem) -> str:
    return it.stratum if it.stratum is not None else "unknown"


def _split_state(old: Optional[dict], scheme: Union[str, dict]) -> dict:
    """The dataset's split scheme: the old manifest's (a dataset keeps the scheme it was created with; one
    without `split_scheme` was split by hash) or, for a new dataset, `scheme` (a name, or a dict with "name" and
    descriptive "group_by" / "stratify_by")."""
    if old is not None:
        return old.get("split_scheme") or {"name": "hash"}
    state = {"name": scheme} if isinstance(scheme, str) else dict(scheme)
    if state.get("name") not in SPLIT_SCHEMES:
        raise ValueError(f"unknown split scheme {state.get('name')!r}; known: {SPLIT_SCHEMES}")
    return state


def _assign_splits(items: list[WorkItem], cfg: JobConfig, state: dict) -> dict[str, str]:
    """key -> split for the inputs of this run."""
    if state["name"] == "hash":
        return {it.key: split_of(it.key, cfg.val_fraction, cfg.test_fraction) for it in items}
    if state["name"] == "published":  # the source's test set as published; validation from its training set
        bad = [it.key for it in items if it.published not in ("train", "test")]
        if bad:
            raise ValueError(f"split scheme 'published' needs each input's published split (train / test); "
                             f"{len(bad)} without one, e.g. {bad[0]}")
        return {it.key: "test" if it.published == "test" else split_of(it.key, cfg.val_fraction, 0.0)
                for it in items}
    units: dict[str, dict[str, int]] = {}
    for it in items:
        u = units.setdefault(_group(it), {})
        u[_stratum(it)] = u.get(_stratum(it), 0) + 1
    groups = stratified_group_splits(units, state.get("strata"), state.get("groups"), cfg.val_fraction,
                                     cfg.test_fraction, state.get("salt", STRATIFIED_SALT))
    return {it.key: groups[_group(it)] for it in items}


def _plan_blocks(items: list[WorkItem], first_block: int, cfg: JobConfig, state: Optional[dict] = None
                 ) -> list[Block]:
    splits = _assign_splits(items, cfg, state or {"name": "hash"})
    by_split: dict[str, list[WorkItem]] = {}
    for it in sorted(items, key=lambda it: it.key):
        by_split.setdefault(splits[it.key], []).append(it)
    blocks, bid = [], first_block
    for split in ("train", "val", "test"):
        its = by_split.get(split, [])
        for i in range(0, len(its), cfg.block_size):
            blocks.append(Block(bid, split, its[i:i + cfg.block_size]))
            bid += 1
    return blocks


@dataclass
class RunReport:
    dataset: str
    counts: dict
    seconds: float
    manifest: Optional[dict]
    results: list[BlockResult]
    nothing_to_do: bool = False


def _ray_init(cfg: JobConfig):
    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:
        # a private cluster on this machine: keep its traffic on the loopback interface
        ray.init(address="local", num_cpus=cfg.workers or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1")
    return ray


def run_job(dataset: Dataset, items: list[WorkItem], cfg: JobConfig, job_config: Any, *,
            skipped: Optional[list[dict]] = None, manifest_extra: Optional[Callable[[dict, list[BlockResult]], dict]] = None,
            progress: bool = True, split_scheme: Union[str, dict] = "hash") -> RunReport:
    """Convert `items` (already de-duplicated by the job; `skipped` lists what it dropped, with reasons).
    `split_scheme` ("hash" / "stratified", see the module doc) applies to a new dataset; an existing one keeps its own."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    old = load_manifest(out)
    if old is not None and old["dataset"] != dataset.name:
        raise ValueError(f"{out / MANIFEST}: holds a {old['dataset']!r} dataset, not {dataset.name!r}")
    splits = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    if old is not None and (old["block_size"], old.get("splits", splits)) != (cfg.block_size, splits):
        raise ConfigError(f"{out / MANIFEST}: block_size {old['block_size']} and splits {old.get('splits')} are "
                          f"fixed for a dataset (this run: {cfg.block_size}, {splits}); they keep subjects in place")
    done = {k for b in (old or {}).get("blocks", []) for k in b["keys"]}
    prev_q = {q["key"]: q for q in (old or {}).get("quarantined", [])}
    skipped = list(skipped or [])  # dropped by the job's discovery (duplicates, ...): inputs too
    n_inputs = len(items) + len(skipped)
    todo = []
    for it in items:
        if it.key in done:
            skipped.append({"key": it.key, "reason": "already converted"})
        elif it.key in prev_q and not cfg.retry_quarantined and prev_q[it.key]["fingerprint"] == fingerprint(it.paths):
            skipped.append({"key": it.key, "reason": "quarantined by an earlier run, files unchanged"})
        else:
            todo.append(it)
    counts = {"inputs": n_inputs, "written": 0, "quarantined": 0, "skipped": len(skipped)}
    if not todo:
        return RunReport(dataset.name, counts, time.perf_counter() - t0, old, [], nothing_to_do=True)

    split_state = _split_state(old, split_scheme)
    blocks = _plan_blocks(todo, (old or {}).get("next_block", 0), cfg, split_state)
    _open_or_create_store(out, dataset, cfg.block_size, (blocks[-1].id + 1) * cfg.block_size)
    ray = _ray_init(cfg)
    t_convert = time.perf_counter()
    remote_block = ray.remote(max_retries=cfg.max_retries)(run_block)
    remote_probe = ray.remote(max_retries=0)(probe_item)
    pending = {remote_block.remote(dataset, b, str(out), cfg.block_size): b for b in blocks}
    results: list[BlockResult] = []
    bar = tqdm(total=len(todo), desc=dataset.name, unit="input", disable=not progress, mininterval=1.0)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        block = pending.pop(ref)
        try:
            res = ray.get(ref)
        except Exception:  # the block's worker died on every try
            res = _isolate_and_rerun(ray, remote_block, remote_probe, dataset, block, out, cfg)
        results.append(res)
        bar.update(sum(it is not None for it in block.items))
        bar.set_postfix(written=sum(len(r.keys) for r in results),
                        quarantined=sum(len(r.quarantined) for r in results), refresh=False)
    bar.close()
    results.sort(key=lambda r: r.id)
    _sweep_temp(out)  # temp files of workers that died mid-write (never read: hidden names, never renamed)
    counts_seconds = {"seconds_total": round(time.perf_counter() - t0, 3),
                      "seconds_convert": round(time.perf_counter() - t_convert, 3)}
    counts["written"] = sum(len(r.keys) for r in results)
    counts["quarantined"] = sum(len(r.quarantined) for r in results)
    assert counts["inputs"] == counts["written"] + counts["quarantined"] + counts["skipped"], counts
    manifest = _write_manifest(out, dataset, cfg, job_config, old, blocks, results, counts, skipped, manifest_extra,
                               counts_seconds, split_state)
    return RunReport(dataset.name, counts, time.perf_counter() - t0, manifest, results)


def _isolate_and_rerun(ray, remote_block, remote_probe, dataset, block: Block, out: Path,
                       cfg: JobConfig) -> BlockResult:
    """Probe each input of a failed block in its own task; quarantine the ones that kill their worker and
    convert the rest (their Zarr rows unchanged). If even that fails, quarantine the block's inputs."""
    probes = [(it, remote_probe.remote(dataset, it)) for it in block.items if it is not None]
    crashed = []
    for it, ref in probes:
        try:
            ray.get(ref)
        except Exception as e:  # the probe's worker died too: this input is the culprit
            crashed.append(_quarantine_record(it, f"worker crashed while converting it ({type(e).__name__})"))
    gone = {c["key"] for c in crashed}
    rest = Block(block.id, block.split, [None if it is None or it.key in gone else it for it in block.items])
    try:
        res = ray.get(remote_block.remote(dataset, rest, str(out), cfg.block_size))
    except Exception as e2:
        why = f"block failed: {type(e2).__name__}: {(str(e2).strip().splitlines() or [''])[-1][:300]}"
        res = BlockResult(block.id, block.split, [], [], [_quarantine_record(it, why)
                                                          for it in rest.items if it is not None], None)
    res.quarantined = crashed + res.quarantined
    return res


def _write_manifest(out: Path, dataset: Dataset, cfg: JobConfig, job_config: Any, old: Optional[dict],
                    blocks: list[Block], results: list[BlockResult], counts: dict, skipped: list[dict],
                    extra: Optional[Callable[[dict, list[BlockResult]], dict]], timing: dict,
                    split_state: Optional[dict] = None) -> dict:
    m = old or {"schema_version": SCHEMA_VERSION, "dataset": dataset.name, "block_size": cfg.block_size,
                "splits": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction},
                "store": STORE, "quarantine": QUARANTINE, "blocks": [], "shards": [], "quarantined": [], "runs": []}
    m["config"] = config_to_dict(job_config)
    for r in results:
        m["blocks"].append({"id": r.id, "split": r.split, "keys": r.keys, "rows": r.rows})
        if r.shard is not None:
            m["shards"].append(r.shard)
    retried = {it.key for b in blocks for it in b.items if it is not None}
    new_q = [q for r in results for q in r.quarantined]
    m["quarantined"] = [q for q in m["quarantined"] if q["key"] not in retried] + new_q
    m["next_block"] = blocks[-1].id + 1
    m["capacity"] = m["next_block"] * cfg.block_size
    m["counts"] = counts  # the latest run: inputs = written + quarantined + skipped
    per_split = {s: sum(len(b["keys"]) for b in m["blocks"] if b["split"] == s) for s in ("train", "val", "test")}
    m["totals"] = {"samples": sum(per_split.values()), "per_split": per_split, "shards": len(m["shards"]),
                   "quarantined": len(m["quarantined"])}
    m["split_scheme"] = _record_split_scheme(split_state or {"name": "hash"}, blocks, results, cfg)
    run = len(m["runs"])
    m["runs"].append({"run": run, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "counts": counts, "skipped": _reason_counts(skipped), **timing})
    if extra is not None:
        m.update(extra(m, results))
    # the quarantine log: one JSON line per rejected input and run, appended
    log = out / QUARANTINE
    lines = log.read_text() if log.exists() else ""
    lines += "".join(json.dumps({"run": run, **q}, sort_keys=True) + "\n" for q in new_q)
    atomic_write_text(log, lines)
    atomic_write_text(out / MANIFEST, json.dumps(m, indent=1, sort_keys=False) + "\n")
    return m


def _record_split_scheme(state: dict, blocks: list[Block], results: list[BlockResult], cfg: JobConfig) -> dict:
    """The manifest's `split_scheme` after this run (see the module doc)."""
    if state["name"] == "hash":
        return {"name": "hash", "unit": "key", "salt": "cmrfm-split-v1",
                "rule": "format.split_of(key, val_fraction, test_fraction)"}
    if state["name"] == "published":
        return {"name": "published", "unit": "key", "salt": "cmrfm-split-v1",
                "rule": "the source's test set is test; its training set is train, or val where "
                        "format.split_of(key, val_fraction, 0) says so (test_fraction is not used)"}
    rec = {"name": "stratified", "unit": "group", "salt": state.get("salt", STRATIFIED_SALT),
           "rule": "format.stratified_group_splits: a group's inputs share a split; new groups balance the strata",
           "group_by": state.get("group_by"), "stratify_by": state.get("stratify_by"),
           "groups": dict(state.get("groups") or {}),
           "strata": {s: dict(c) for s, c in (state.get("strata") or {}).items()}}
    planned = {it.key: it for b in blocks for it in b.items if it is not None}
    for b in blocks:  # every planned group keeps its split, written or quarantined (a retry stays there)
        for it in b.items:
            if it is not None:
                rec["groups"][_group(it)] = b.split
    for r in results:  # counts of what is in the dataset
        for k in r.keys:
            c = rec["strata"].setdefault(_stratum(planned[k]), {p: 0 for p in ("train", "val", "test")})
            c[r.split] = c.get(r.split, 0) + 1
    rec["groups"] = dict(sorted(rec["groups"].items()))
    rec["strata"] = dict(sorted(rec["strata"].items()))
    want = [p for p, f in (("train", 1.0 - cfg.val_fraction - cfg.test_fraction), ("val", cfg.val_fraction),
                           ("test", cfg.test_fraction)) if f > 0]
    rec["missing"] = [{"stratum": s, "split": p} for s, c in rec["strata"].items() if sum(c.values())
                      for p in want if not c.get(p)]
    return rec


def split_warning(manifest: Optional[dict]) -> Optional[str]:
    """One line naming the strata a split lacks (stratified datasets), or None."""
    missing = ((manifest or {}).get("split_scheme") or {}).get("missing") or []
    if not missing:
        return None
    by: dict[str, list[str]] = {}
    for x in missing:
        by.setdefault(x["split"], []).append(x["stratum"])
    return "  warning: strata absent from a split: " + "; ".join(
        f"{p}: {', '.join(by[p])}" for p in ("train", "val", "test") if p in by)


def _sweep_temp(out: Path) -> None:
    for sub in ("shards", "meta"):
        for p in (out / sub).glob(".*"):
            if p.name.startswith(".tmp-") or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)


def _reason_counts(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return out


def format_counts(report: RunReport) -> str:
    c = report.counts
    rate = (c["written"] + c["quarantined"]) / max(report.seconds, 1e-9)
    line = (f"{report.dataset}: inputs {c['inputs']} = written {c['written']} + quarantined {c['quarantined']} "
            f"+ skipped {c['skipped']}   ({report.seconds:.1f} s, {rate:.2f} inputs/s)")
    if report.nothing_to_do:
        line += "\n  nothing to do: every input is already converted (or quarantined with unchanged files)"
    return line


def format_summary(report: RunReport, out: Path, source_bytes_per_input: Optional[float] = None) -> str:
    """The one-screen summary a conversion prints."""
    lines = [format_counts(report)]
    m = report.manifest
    if m:
        t = m["totals"]
        n = max(t["samples"], 1)
        shard_bytes = sum(s["bytes"] for s in m["shards"])
        lines.append(f"  dataset now: {t['samples']} samples (train {t['per_split']['train']}, val "
                     f"{t['per_split']['val']}, test {t['per_split']['test']}) in {t['shards']} shards; "
                     f"{t['quarantined']} quarantined (see {Path(out) / QUARANTINE})")
        sizes = f"  bytes per sample: shards {shard_bytes / n / 2**20:.2f} MiB, zarr {dir_bytes(Path(out) / STORE) / n / 2**20:.2f} MiB"
        if source_bytes_per_input:
            sizes += f", source {source_bytes_per_input / 2**20:.2f} MiB"
        lines.append(sizes)
        lines.append(f"  manifest: {Path(out) / MANIFEST}")
        nodes = Counter(r.node for r in report.results if r.node)
        if len(nodes) > 1:  # a Ray cluster over several machines: who converted what
            lines.append("  blocks per node: " + ", ".join(f"{n} {k}" for n, k in sorted(nodes.items())))
        if split_warning(m):
            lines.append(split_warning(m))
    return "\n".join(lines)
