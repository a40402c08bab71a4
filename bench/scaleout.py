"""Scale-out on paper and in simulation: per ZeRO stage (0-3) and GPU count (1-64), the model-state memory per GPU
and the bytes each rank communicates per optimizer step, for the paper-size ViTa Stage I (configs/pretrain/
vita_stage1.yaml) and Stage II (vita_stage2.yaml); checked against the trainer's real DeepSpeed engine on CPU ranks.

    python bench/scaleout.py [--nproc 2 4] [--steps 2] [--no-paper-check] [--gbps 200]
        [--out bench/results/scaleout_cpu.json]   (writes its section of BENCHMARKS.md)
    python bench/scaleout.py --from-json      (only the markdown, from the saved JSON: seconds)

Analytic model (importable: `model_sizes`, `state_bytes`, `comm_bytes`, `ring_bytes`, `recommend`). Ψ = parameter
count (built on the meta device by the stage's own builder), A = micro-steps per optimizer step (gradient
accumulation), N = ranks, b = bytes per element of the communication dtype (the project's configs set none:
DeepSpeed then communicates in the training dtype, bf16, b = 2; engine.py:1719-1730 `communication_data_type`).

Memory per GPU (the ZeRO paper's 2Ψ + 2Ψ + 12Ψ, divided as DeepSpeed 0.19.8 divides it; exact to the byte against
bench/results/zero_memory_cpu.json, padding included):
  ZeRO-0  bf16 params 2Ψ, bf16 grads 2Ψ, fp32 master 4Ψ, Adam moments 8Ψ   (bf16 without ZeRO: FP16_UnfusedOptimizer)
  ZeRO-1  params 2Ψ', grads 2Ψ (whole until the boundary), master 4Ψ'/N, moments 8Ψ'/N
  ZeRO-2  params 2Ψ', grads 2Ψ'/N, master 4Ψ'/N, moments 8Ψ'/N
  ZeRO-3  params, grads, master, moments 2, 2, 4, 8 x Ψ3/N
  Ψ' = Σ_groups ceil(g / 2N)·2N (each AdamW group's flat buffer padded to 2N elements, stage_1_and_2.py:441),
  Ψ3/N = Σ_params ceil(p / N) (each parameter partitioned on its own); AdamW adds a 4-byte `step` per tensor it
  updates. Not in it: reduction buckets (reduce_bucket_size 5e7 elements = 95 MiB bf16), activations, and under
  ZeRO-3 the gathered parameters (see below: all of them at the forward / backward turn).

Bytes per rank per optimizer step: what each rank sends (= receives) with the bandwidth-optimal ring algorithms
(NCCL's; nccl-tests' "bus bandwidth"): all-reduce 2(N-1)/N·B, all-gather and reduce-scatter (N-1)/N·B, B the whole
(gathered / unreduced) tensor. Bucketing splits B into calls, it does not change the sum. What DeepSpeed 0.19.8
(.venv/.../deepspeed) does, read in the source and counted by `_worker`:
  ZeRO-0  one all-reduce of the bf16 gradients at the accumulation boundary (engine.py:3088-3095
          `buffered_allreduce_fallback`):                                  2(N-1)/N · bΨ
  ZeRO-1  the gradients reduced once, at the boundary (stage_1_and_2.py:2293-2295: without partition_gradients
          only `is_gradient_accumulation_boundary()`); `reduce_scatter: true` still ALL-REDUCES each bucket, since
          `use_multi_rank_bucket_allreduce` defaults to true (zero/config.py:119, stage_1_and_2.py:1695-1696 ->
          `allreduce_bucket` :2384 `dist.all_reduce`); after the step the updated bf16 partitions are all-gathered
          (stage_1_and_2.py:3155 -> utils.py:1016 `all_gather_into_tensor`):
                                                                           2(N-1)/N · bΨ + (N-1)/N · 2Ψ'
  ZeRO-2  the same, but the gradients are reduced in every micro-step's backward (engine.py:3084-3086, "ZeRO stage
          >= 2 communicates during non gradient accumulation boundaries as well"):
                                                                           A · 2(N-1)/N · bΨ + (N-1)/N · 2Ψ'
          (with A = 1 ZeRO-1 and ZeRO-2 move the same bytes; `allgather_partitions` is read by nothing in 0.19.8's
          runtime, engine.py:1745 only; `allgather_bucket_size` only when all_gather_into_tensor is missing.)
  ZeRO-3  per micro-step one reduce-scatter of the gradients (stage3.py:1931 `reduce_scatter_coalesced`) and g
          all-gathers of the non-persistent parameters (numel > stage3_param_persistence_threshold = 1e5,
          parameter_offload.py:325); per step one all-gather of the persistent ones after the update (stage3.py:2841):
                                                       A · [g · (N-1)/N · 2Ψ3_np + (N-1)/N · bΨ3] + (N-1)/N · 2Ψ3_p
          g = 1 here, not the ZeRO paper's 2 (forward + backward): once the module trace is recorded (the first
          step), a parameter is released only if it is not used again within stage3_max_reuse_distance = 1e9
          elements (partitioned_param_coordinator.py:653-662), and 2Ψ ≈ 2e8 < 1e9, so the forward's gather is held
          through the backward. The first step (trace recording) gathers in the backward too. Under Stage II's
          GradCache (contrastive loss, A > 1: a no-grad forward, then forward + backward per micro-step) the trace
          never settles and every use gathers: g = 3 (measured).
Small collectives (gradient-norm and overflow scalars; Stage II's contrastive loss gathering its embeddings over the
ranks, `torch.distributed.nn.functional.all_gather`) are counted by the measurement, not by the formula: bytes.

Measured check (`_worker`, under torchrun on CPU ranks, gloo, DS_ACCELERATOR=cpu): the trainer's engine
(bench/common.py `stage_engine`, bf16) with DeepSpeed's comms logger on (`"comms_logger": {"enabled": true,
"prof_all": true}` added to `deepspeed_config`'s dict), and every torch.distributed collective wrapped to count
its bytes (the logger sees only what goes through deepspeed.comm; the wrapper also sees the model's own, e.g. the
contrastive loss's all-gather). One optimizer step through the stage's `train_step` (as pretrain/train.py runs it;
GradCache for Stage II with A > 1) as warm-up, then `--steps` measured steps. Small models (width 256, so that some
parameters exceed ZeRO-3's persistence threshold) on 2 and 4 ranks, and the paper-size Stage I on 2 ranks
(images 32²: the parameter count does not depend on the image size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from common import ROOT, update_benchmarks

SECTION = "## Scale-out: ZeRO stage, memory and communication per GPU count (python bench/scaleout.py)"
CONFIGS = {"vita_stage1": "Stage I", "vita_stage2": "Stage II"}
GPUS = (1, 2, 4, 8, 16, 32, 64)
ZEROS = (0, 1, 2, 3)
GIB, GB = 2**30, 1e9
FP32, BF16 = 4, 2
ALIGN = 2  # stage_1_and_2.py:387 nccl_start_alignment_factor: 4-byte alignment / sizeof(bf16)
STEP_BYTES = 4  # AdamW's 0-dim fp32 `step` per tensor it updates
# the measured check's small models: width 256 so that the attention / MLP weights (196 k / 262 k elements) exceed
# ZeRO-3's persistence threshold (1e5) and are gathered, as the paper-size model's are
SMALL = {"vita_stage1": ["model.img_size=32", "model.dim=256", "model.heads=4", "model.depth=2",
                         "mae.decoder_dim=128", "mae.decoder_heads=4", "mae.decoder_depth=1"],
         "vita_stage2": ["model.img_size=32", "model.dim=256", "model.heads=4", "model.depth=2",
                         "tabular.dim=128", "tabular.heads=4", "tabular.projection_dim=32"]}
PAPER_CHECK = ["model.img_size=32"]  # the paper-size parameters on small images: less compute, the same Ψ
H100_MICRO = 32  # the micro-batch of the measured H100 step (bench/results/pretrain_step_h100.json)


# --- the model's sizes ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """What the formulas need of a model: every trainable parameter's numel (module order) and the numel of each
    AdamW parameter group (`pretrain.train.param_groups`: ZeRO-1/2 flatten and pad each group)."""
    name: str
    params: tuple[int, ...]
    groups: tuple[int, ...]
    contrastive: bool = False  # Stage II: GradCache under accumulation (pretrain/gradcache.py)

    @property
    def total(self) -> int:
        return sum(self.params)


def load_cfg(config: str, overrides: Sequence[str] = ()):
    from core.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, ROOT / "configs/pretrain" / f"{config}.yaml", list(overrides))


def build_model(cfg):
    """The stage's model through its own builder; Stage I needs no dataset (a manifest naming the kind suffices),
    Stage II the UK Biobank feature schema (bench/common.py `stage_model`)."""
    from common import stage_model
    from core.manifest import Manifest
    from pretrain.stages import get_stage

    if cfg.stage == "tabular_clip":
        return stage_model(cfg)
    return get_stage(cfg.stage).build_model(cfg, Manifest.from_dict(ROOT, {"dataset": "ukb", "shards": []}))


@functools.lru_cache(maxsize=None)
def model_sizes(config: str, overrides: tuple[str, ...] = ()) -> ModelSizes:
    """The sizes of `configs/pretrain/<config>.yaml` (+ overrides), built on the meta device (no memory, ~1 s)."""
    import torch

    from pretrain.stages import get_stage
    from pretrain.train import param_groups

    cfg = load_cfg(config, overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    params = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    groups = tuple(sum(p.numel() for p in g["params"]) for g in param_groups(model, cfg.optim.weight_decay))
    return ModelSizes(config, params, groups, contrastive=get_stage(cfg.stage).contrastive)


def ds_settings(zero: int) -> dict:
    """The project's ZeRO settings (configs/deepspeed/zero<N>.json) over DeepSpeed 0.19.8's defaults
    (zero/config.py:108-251) - the ones the formulas depend on."""
    ds = json.loads((ROOT / "configs/deepspeed" / f"zero{zero}.json").read_text())
    z = ds["zero_optimization"]
    return {"reduce_scatter": z.get("reduce_scatter", True),
            "use_multi_rank_bucket_allreduce": z.get("use_multi_rank_bucket_allreduce", True),
            "persistence": int(z.get("stage3_param_persistence_threshold", 1e5)),
            "max_reuse": int(z.get("stage3_max_reuse_distance", 1e9)),
            "communication_data_type": ds.get("communication_data_type")}


def comm_dtype_bytes(zero: int, precision: str = "bf16") -> int:
    """b: DeepSpeed's `communication_data_type` (engine.py:1719-1730): the config's if set, else the training
    dtype (fp16 / bf16), else fp32. `deepspeed_config` (pretrain/train.py) sets none."""
    explicit = ds_settings(zero)["communication_data_type"]
    name = explicit or precision
    return {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}[name]


# --- memory ---------------------------------------------------------------------------------------------------------
def zero12_padded(sizes: ModelSizes, n: int) -> int:
    """Ψ': ZeRO-1/2's flat bf16 buffers, each group padded to a multiple of 2N elements (stage_1_and_2.py:441)."""
    return sum(math.ceil(g / (ALIGN * n)) * ALIGN * n for g in sizes.groups)


def zero3_partition(sizes: ModelSizes, n: int, which: str = "all", persistence: int | None = None) -> int:
    """Ψ3/N: elements of one rank's ZeRO-3 partition, Σ ceil(p / N) (each parameter padded to N); `which`:
    "all", "persistent" (numel <= stage3_param_persistence_threshold: never gathered in forward / backward) or
    "gathered" (the others)."""
    t = ds_settings(3)["persistence"] if persistence is None else persistence
    keep = {"all": lambda p: True, "persistent": lambda p: p <= t, "gathered": lambda p: p > t}[which]
    return sum(math.ceil(p / n) for p in sizes.params if keep(p))


def state_bytes(sizes: ModelSizes, zero: int, n: int) -> dict[str, int]:
    """Model-state bytes per GPU: bf16 params and grads, fp32 master, Adam moments (+ the `step` scalars), and their
    total. ZeRO-1's gradients are whole (2Ψ) while micro-steps accumulate; reduced at the boundary, only the
    partition is kept (what bench/zero_memory.py saw after the backward)."""
    psi, tensors = sizes.total, len(sizes.groups)
    if zero == 0:  # FP16_UnfusedOptimizer: an fp32 copy per parameter tensor
        p = g = psi
        part, tensors = psi, len(sizes.params)
    elif zero in (1, 2):
        p, part = zero12_padded(sizes, n), zero12_padded(sizes, n) // n
        g = psi if zero == 1 else part
    elif zero == 3:
        p = g = part = zero3_partition(sizes, n)
    else:
        raise ValueError(f"ZeRO stage {zero}")
    out = {"params": BF16 * p, "grads": BF16 * g, "master": FP32 * part,
           "moments": 2 * FP32 * part + STEP_BYTES * tensors}
    return {**out, "total": sum(out.values())}


# --- communication --------------------------------------------------------------------------------------------------
def ring_bytes(op: str, nbytes: float, n: int) -> float:
    """Bytes each of `n` ranks sends (= receives) for one collective over a `nbytes` tensor (the whole one: the
    all-reduced, the gathered output, the reduce-scatter input), bandwidth-optimal ring (nccl-tests' bus bandwidth):
    all_reduce 2(n-1)/n·B; all_gather / reduce_scatter (n-1)/n·B; broadcast / reduce / scatter / gather / p2p B."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if op in ("all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
              "_reduce_scatter_base", "reduce_scatter"):
        return (n - 1) / n * nbytes
    return float(nbytes)  # broadcast, reduce, scatter, gather, send / recv (object collectives carry 0 here)


def zero3_gathers(sizes: ModelSizes, accumulation: int) -> int:
    """g: all-gathers of each non-persistent parameter per micro-step under ZeRO-3, once the module trace is
    recorded (see the module docstring): 1 while 2Ψ fits stage3_max_reuse_distance (the forward's gather is held
    through the backward), else 2 (forward + backward, the ZeRO paper's accounting; an approximation: only the
    parameters whose reuse lies beyond the distance are gathered again); 3 under GradCache."""
    if sizes.contrastive and accumulation > 1:
        return 3  # no-grad forward, forward, backward: measured (the module trace is invalidated every micro-step)
    return 2 if 2 * sizes.total > ds_settings(3)["max_reuse"] else 1


def comm_bytes(sizes: ModelSizes, zero: int, n: int, accumulation: int = 1) -> dict[str, float]:
    """Bytes each rank sends per optimizer step, by collective (the torch.distributed names DeepSpeed calls), per
    the formulas of the module docstring. {} pieces are 0 on one rank."""
    b = comm_dtype_bytes(zero)
    s = ds_settings(zero)
    grads = b * sizes.total
    if zero == 0:
        return {"all_reduce": ring_bytes("all_reduce", grads, n)}
    if zero in (1, 2):
        if not (s["use_multi_rank_bucket_allreduce"] or not s["reduce_scatter"]):
            raise NotImplementedError("ZeRO-1/2 with use_multi_rank_bucket_allreduce: false (dist.reduce per "
                                      "partition) is not modelled: the project's configs keep the default")
        reductions = accumulation if zero == 2 else 1  # ZeRO-2 reduces in every micro-step's backward
        return {"all_reduce": reductions * ring_bytes("all_reduce", grads, n),
                "all_gather_into_tensor": ring_bytes("all_gather_into_tensor", BF16 * zero12_padded(sizes, n), n)}
    if zero == 3:
        g = zero3_gathers(sizes, accumulation)
        gathered = BF16 * n * zero3_partition(sizes, n, "gathered")
        persistent = BF16 * n * zero3_partition(sizes, n, "persistent")
        return {"all_gather_into_tensor": accumulation * g * ring_bytes("all_gather_into_tensor", gathered, n)
                + ring_bytes("all_gather_into_tensor", persistent, n),
                "reduce_scatter_tensor": accumulation * ring_bytes("reduce_scatter_tensor",
                                                                   b * n * zero3_partition(sizes, n), n)}
    raise ValueError(f"ZeRO stage {zero}")


def comm_total(sizes: ModelSizes, zero: int, n: int, accumulation: int = 1) -> float:
    return sum(comm_bytes(sizes, zero, n, accumulation).values())


# --- what to run where: the recommendation ---------------------------------------------------------------------------
def h100_step() -> dict:
    """The measured H100 Stage I step at the paper's shape (bench/results/pretrain_step_h100.json, ZeRO-2, one GPU),
    with the ZeRO-0 / 2 / 3 rows of the 1024-wide variant (by_zero: {stage: (ms per step, peak GiB)}) and the date git
    committed the file."""
    path = ROOT / "bench/results/pretrain_step_h100.json"
    res = json.loads(path.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    zero = {z: (rows[label]["step_ms"], rows[label]["peak_mem_gib"]) for z, label in
            ((0, "1024x8 bf16 ZeRO-0"), (2, "1024x8 bf16"), (3, "1024x8 bf16 ZeRO-3"))}
    try:
        date = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        date = None
    return {**rows["paper 1025x5 bf16"], "device": res["device"], "torch": res["torch"], "by_zero": zero,
            "committed": date}


def sample_flops(config: str) -> dict[str, float]:
    """Model FLOPs per training sample and per forward (the project's analytic counts, pretrain.models)."""
    import torch

    from pretrain.models.vit import flops_per_sample

    cfg = load_cfg(config)
    if cfg.stage == "mae":
        return {"train": flops_per_sample(cfg.model, cfg.mae, train=True),
                "forward": flops_per_sample(cfg.model, cfg.mae, train=False)}
    with torch.device("meta"):
        model = build_model(cfg)
    return {"train": model.flops_per_sample(train=True), "forward": model.flops_per_sample(train=False)}


def compute_seconds(config: str, samples: int, accumulation: int) -> float:
    """ESTIMATE of one GPU's compute per optimizer step: the measured H100 Stage I time per sample (paper shape,
    micro-batch 32), scaled by model FLOPs for Stage II, with its activation-checkpoint recompute (+1 forward) and,
    under accumulation, GradCache's no-grad pass (+1 forward). Linear in the samples: smaller micro-batches than
    32 run less efficiently, so it is a lower bound there."""
    step = h100_step()
    per_sample = step["step_ms"] / 1e3 / step["micro_batch"]
    if load_cfg(config).stage == "mae":
        return per_sample * samples
    f1, f2 = sample_flops("vita_stage1")["train"], sample_flops(config)
    extra = f2["forward"] * (1 + (accumulation > 1))
    return per_sample * (f2["train"] + extra) / f1 * samples


def recommend(config: str, n: int, gbps: float = 200.0) -> dict:
    """ZeRO stage and micro-batch for `n` GPUs at the config's global batch (256: the paper's Stage II batch; the
    project's Stage I config): micro-batch = global / n up to the measured 32 (11.9 GiB on an H100 at the paper
    shape with ZeRO-2; larger is unmeasured), the rest accumulated. ZeRO-3 never (model states <= 1.5 GiB per GPU
    even without ZeRO; measured ~30 % slower on one H100); one GPU: ZeRO-2 (nothing to communicate; measured
    faster and 4 GiB lighter than ZeRO-0 on one H100); several GPUs without accumulation: ZeRO-2 (the same bytes as
    ZeRO-1, its reduction overlapped with the backward, `overlap_comm: true`); with accumulation: ZeRO-1 (ZeRO-2
    reduces every micro-step)."""
    cfg = load_cfg(config)
    glob = cfg.train.global_batch
    micro = max(1, min(glob // n, H100_MICRO))
    acc = max(1, glob // (n * micro))
    zero = 2 if n == 1 or acc == 1 else 1
    sizes = model_sizes(config)
    comm = comm_total(sizes, zero, n, acc)
    comm0 = comm_total(sizes, 0, n, acc)
    comm_s = comm * 8 / (gbps * 1e9)
    compute_s = compute_seconds(config, micro * acc, acc)
    return {"config": config, "gpus": n, "global_batch": glob, "micro_batch": micro, "accumulation": acc,
            "zero": zero, "state_gib": state_bytes(sizes, zero, n)["total"] / GIB, "comm_gb": comm / GB,
            "comm_gb_zero0": comm0 / GB, "comm_s": comm_s, "comm_s_zero0": comm0 * 8 / (gbps * 1e9),
            "compute_s": compute_s, "gbps": gbps}


# --- counting collectives (in each rank) ----------------------------------------------------------------------------
_WRAPPED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter", "reduce",
            "broadcast", "_all_gather_base", "_reduce_scatter_base", "all_gather_object", "broadcast_object_list",
            "barrier", "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")


class CollectiveCounter:
    """Wraps torch.distributed's collectives (before DeepSpeed's backend takes references to them) and records each
    outermost call: op, tensor bytes (the whole tensor, as `ring_bytes` takes it), group size, dtype, and who called
    it (deepspeed: DeepSpeed's runtime; model: anything else, e.g. the contrastive loss via torch.distributed.nn)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._local = threading.local()

    def install(self) -> None:
        import torch.distributed as dist

        for name in _WRAPPED:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_scaleout_wrapped", False):
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:  # a deprecated alias calling the new name is one collective
                caller = sys._getframe(1).f_code.co_filename
                self.records.append(self._describe(name, sig.bind(*args, **kwargs).arguments, caller))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        wrapper._scaleout_wrapped = True
        return wrapper

    @staticmethod
    def _describe(name: str, a: dict, caller: str) -> dict:
        import torch
        import torch.distributed as dist

        def nbytes(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            return sum(nbytes(t) for t in x) if isinstance(x, (list, tuple)) else 0

        key = {"all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor",
               "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "all_gather": "tensor_list",
               "reduce_scatter": "input_list", "all_to_all_single": "input"}.get(name, "tensor")
        tensor = next((a[k] for k in ("tensor", "input", "input_tensor") if isinstance(a.get(k), torch.Tensor)), None)
        p2p = name in ("send", "recv", "isend", "irecv")
        return {"op": name, "bytes": nbytes(a.get(key)), "n": 2 if p2p else dist.get_world_size(a.get("group")),
                "dtype": str(tensor.dtype).replace("torch.", "") if tensor is not None else None,
                "origin": "deepspeed" if "/deepspeed/" in caller else "model"}


def summarize(records: Iterable[dict]) -> dict[str, dict]:
    """{"<op> <origin> <dtype>": {"calls", "bytes", "wire"}} with wire = Σ ring_bytes."""
    out: dict[str, dict] = {}
    for r in records:
        k = f"{r['op']} {r['origin']} {r['dtype']}"
        s = out.setdefault(k, {"calls": 0, "bytes": 0, "wire": 0.0})
        s["calls"] += 1
        s["bytes"] += r["bytes"]
        s["wire"] += ring_bytes(r["op"], r["bytes"], r["n"])
    return out


def logger_counts() -> dict[tuple[str, int], int]:
    """DeepSpeed's comms logger: {(op, message bytes): calls} so far."""
    import deepspeed.comm as dc

    return {(op, size): v[0] for op, sizes in dc.comms_logger.comms_dict.items() for size, v in sizes.items()}


def logger_summary(before: dict, after: dict, n: int) -> dict[str, dict]:
    """The logger's calls between two `logger_counts`, as {op: {"calls", "bytes", "wire"}}. Its message size is the
    `tensor` argument (deepspeed/comm/utils.py:107-133): the input, i.e. for an all-gather the 1/N partition."""
    out: dict[str, dict] = {}
    for (op, size), calls in after.items():
        calls -= before.get((op, size), 0)
        if calls:
            whole = size * n if op in ("all_gather_into_tensor", "all_gather") else size
            s = out.setdefault(op, {"calls": 0, "bytes": 0, "wire": 0.0})
            s["calls"] += calls
            s["bytes"] += calls * whole
            s["wire"] += calls * ring_bytes(op, whole, n)
    return out


def _with_comms_logger(deepspeed_config):
    """`pretrain.train.deepspeed_config` plus the comms logger. bench/common.py `stage_engine` builds the config
    inside the project (pretrain.train looks the function up by name when it builds the engine), so the worker
    installs this in `pretrain.train` rather than editing the project's config."""
    def config(cfg, world_size):
        ds = deepspeed_config(cfg, world_size)
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
        return ds
    return config


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: per case (ZeRO stage, accumulation) a fresh model and engine, warm-up and measured steps
    through the stage's `train_step`, the collectives of each step; rank 0 writes every rank's result."""
    Path(args.pids, f"rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))  # for the driver's kill
    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed's backend stores torch.distributed's functions
    import torch
    import torch.distributed as dist

    import pretrain.train as train
    from common import stage_engine, stage_inputs
    from pretrain.dist import init_distributed
    from pretrain.stages import get_stage

    env = init_distributed()
    world, device = env.world_size, torch.device("cpu")
    dataset = Path(tempfile.mkdtemp())  # Stage I's builder reads only the manifest's kind
    (dataset / "manifest.json").write_text(json.dumps({"dataset": "ukb", "shards": []}))
    train.deepspeed_config = _with_comms_logger(train.deepspeed_config)
    overrides = SMALL[args.config] if args.variant == "small" else PAPER_CHECK
    results = []
    for zero, acc in args.cases:
        cfg = load_cfg(args.config, [*overrides, f"train.zero_stage={zero}", f"train.micro_batch={args.micro}",
                                     f"train.global_batch={args.micro * world * acc}", "train.precision=bf16"])
        torch.manual_seed(cfg.train.seed)
        t0 = time.perf_counter()
        model, engine = stage_engine(cfg, world, None if cfg.stage == "tabular_clip" else dataset)
        init_s = time.perf_counter() - t0
        stage = get_stage(cfg.stage)
        dtype = torch.bfloat16
        inputs = [stage_inputs(cfg, model, args.micro, device, dtype) for _ in range(acc)]
        steps = []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            counter.records.clear()
            before = logger_counts()
            t0 = time.perf_counter()
            gens = [functools.partial(train._generator, cfg.train.seed, step, m, env.rank) for m in range(acc)]
            stage.train_step(engine, inputs, gens, world, device)
            seconds = time.perf_counter() - t0
            steps.append({"step": step, "warmup": step < args.warmup, "seconds": seconds,
                          "wrapper": summarize(counter.records),
                          "logger": logger_summary(before, logger_counts(), world)})
        z = engine.zero_optimization_stage()
        results.append({"zero": zero, "accumulation": engine.gradient_accumulation_steps(), "init_s": init_s,
                        "optimizer": type(engine.optimizer).__name__, "zero_stage_engine": z,
                        "communication_data_type": str(engine.communication_data_type).replace("torch.", ""),
                        "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                        "steps": steps})
        del model, engine
    shutil.rmtree(dataset, ignore_errors=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if env.rank == 0:
        Path(args.result).write_text(json.dumps({"config": args.config, "variant": args.variant, "world_size": world,
                                                 "micro_batch": args.micro, "overrides": overrides,
                                                 "ranks": everyone}) + "\n")


# --- launching ranks ------------------------------------------------------------------------------------------------
def launch(nproc: int, worker_args: Sequence[str], timeout: float, env: dict | None = None,
           pids: Path | None = None) -> tuple[int, str]:
    """`torchrun --standalone --nproc_per_node nproc bench/scaleout.py _worker ...`; (return code, output). On a
    timeout every rank is killed: torchrun starts each rank in its own session, so killing the launcher's process
    group does not reach them; they record their pids (`--pids`) and die with the launcher (pretrain.dist
    `die_with_launcher`), and are SIGKILLed by pid here as well."""
    own = pids is None
    pids = Path(pids or tempfile.mkdtemp())
    pids.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "_worker", *worker_args, "--pids", str(pids)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    base.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**base, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        if own:
            shutil.rmtree(pids, ignore_errors=True)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for f in pids.glob("rank*"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out + f"\n[scaleout] killed after {timeout:.0f} s"


def measure(nproc: int, config: str, variant: str, cases: Sequence[tuple[int, int]], steps: int = 2,
            warmup: int = 1, micro: int = 1, timeout: float = 1800, pids: Path | None = None) -> dict:
    """Run the worker on `nproc` CPU ranks for `cases` [(ZeRO stage, accumulation)] and return its result with the
    analytic figures beside each case (`compare`). `pids`: where the ranks record their process ids."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        args = ["--config", config, "--variant", variant, "--steps", str(steps), "--warmup", str(warmup),
                "--micro", str(micro), "--result", f.name, "--cases", *[f"{z}:{a}" for z, a in cases]]
        t0 = time.perf_counter()
        rc, out = launch(nproc, args, timeout, pids=pids)
        text = Path(f.name).read_text()
    if rc != 0 or not text:
        raise RuntimeError(f"scaleout worker ({nproc} ranks, {config} {variant}) failed ({rc}):\n{out[-4000:]}")
    res = json.loads(text)
    res["wall_s"] = time.perf_counter() - t0
    res["cases"] = [compare(res, i) for i in range(len(cases))]
    return res


def compare(res: dict, i: int) -> dict:
    """Case i of a worker result: measured wire bytes per rank per step (mean over the measured steps; rank 0 and
    the largest difference between ranks) against `comm_bytes`, per collective and in total."""
    n = res["world_size"]
    sizes = model_sizes(res["config"], tuple(res["overrides"]))
    rank_cases = [r[i] for r in res["ranks"]]
    c0 = rank_cases[0]
    zero, acc = c0["zero"], c0["accumulation"]

    def per_step(case: dict, source: str, ops: Sequence[str] | None = None, origin: str | None = None) -> float:
        measured = [s for s in case["steps"] if not s["warmup"]]
        total = 0.0
        for s in measured:
            for k, v in s[source].items():
                op, *rest = k.split()
                if (ops is None or op in ops) and (origin is None or (rest and rest[0] == origin)):
                    total += v["wire"]
        return total / len(measured)

    analytic = comm_bytes(sizes, zero, n, acc)
    totals = [per_step(c, "wrapper") for c in rank_cases]
    by_op = {op: per_step(c0, "wrapper", [op], "deepspeed") for op in analytic}
    total_a = sum(analytic.values())
    warm = [s for s in c0["steps"] if s["warmup"]]
    return {"zero": zero, "accumulation": acc, "params": c0["params"], "optimizer": c0["optimizer"],
            "communication_data_type": c0["communication_data_type"],
            "measured": totals[0], "measured_deepspeed": per_step(c0, "wrapper", origin="deepspeed"),
            "measured_model": per_step(c0, "wrapper", origin="model"), "measured_logger": per_step(c0, "logger"),
            "rank_spread": (max(totals) - min(totals)) / max(max(totals), 1.0),
            "measured_by_op": by_op, "analytic_by_op": analytic, "analytic": total_a,
            "rel_diff": totals[0] / total_a - 1 if total_a else (0.0 if totals[0] == 0 else math.inf),
            "calls_per_step": sum(v["calls"] for v in c0["steps"][-1]["wrapper"].values()),
            "first_step": sum(v["wire"] for v in warm[0]["wrapper"].values()) if warm else None,
            "seconds_per_step": sum(s["seconds"] for s in c0["steps"] if not s["warmup"])
            / max(1, sum(not s["warmup"] for s in c0["steps"])), "init_s": c0["init_s"]}


# --- the report -----------------------------------------------------------------------------------------------------
def provenance() -> dict:
    import deepspeed
    import torch

    return {"machine": f"{os.cpu_count()}-core CPU machine ({platform.machine()}, {platform.node()})",
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def fmt_rel(x: float) -> str:
    return "-" if x is None else f"{100 * x:+.3f} %"


def markdown(res: dict) -> str:
    """The section (header SECTION) from a saved result (`main`)."""
    prov, cmd = res["provenance"], res["command"]
    where = (f"{prov['machine']}, torch {prov['torch']}, DeepSpeed {prov['deepspeed']}, {prov['date']}, "
             f"`{cmd}`")
    sizes = {c: model_sizes(c) for c in CONFIGS}
    lines = [SECTION, "",
             f"Analytic (computed by `bench/scaleout.py` from the real models' parameter counts, built on the meta "
             f"device: {', '.join(f'{CONFIGS[c]} {s.total / 1e6:.1f} M' for c, s in sizes.items())}; {where}). "
             f"bf16 training, bf16 communication (`communication_data_type` unset: DeepSpeed uses the training "
             f"dtype), the project's `configs/deepspeed/zero<N>.json`.", "",
             "Model states per GPU, GiB: bf16 params + bf16 grads + fp32 master + Adam moments (2Ψ + 2Ψ + 12Ψ, divided "
             "as DeepSpeed 0.19.8 divides it, padding included; equal to the byte to the params / master / moments "
             "measured by `bench/zero_memory.py` on 2 and 4 ranks). Buckets (95 MiB), activations and ZeRO-3's "
             "gathered parameters come on top:", "",
             "| model | ZeRO | " + " | ".join(f"{n} GPU" + ("s" if n > 1 else "") for n in GPUS) + " |",
             "| --- | --- |" + " --- |" * len(GPUS)]
    for c, s in sizes.items():
        for z in ZEROS:
            lines.append(f"| {CONFIGS[c]} | {z} | "
                         + " | ".join(f"{state_bytes(s, z, n)['total'] / GIB:.2f}" for n in GPUS) + " |")
    lines += ["", "GB (1e9 bytes) each rank sends per optimizer step (ring all-reduce 2(N-1)/N·B, all-gather / "
              "reduce-scatter (N-1)/N·B), without accumulation (A = 1) and with A = 8 micro-steps:", "",
              "| model | ZeRO | A | " + " | ".join(f"{n}" for n in GPUS) + " |",
              "| --- | --- | --- |" + " --- |" * len(GPUS)]
    for c, s in sizes.items():
        for z in ZEROS:
            for a in (1, 8):
                lines.append(f"| {CONFIGS[c]} | {z} | {a} | "
                             + " | ".join(f"{comm_total(s, z, n, a) / GB:.3f}" for n in GPUS) + " |")
    s1 = sizes["vita_stage1"]
    lines += ["", "What DeepSpeed 0.19.8 does (read in `.venv/lib/python3.11/site-packages/deepspeed`, confirmed by "
              "the measured check below): Ψ parameters, A micro-steps, b = 2 bytes:", "",
              "- ZeRO-0: one all-reduce of the bf16 gradients at the accumulation boundary "
              "(engine.py:3088-3095): 2(N-1)/N·2Ψ, whatever A.",
              "- ZeRO-1: the gradients reduced once, at the boundary (stage_1_and_2.py:2293-2295); `reduce_scatter: true` "
              "still all-reduces each bucket, because `use_multi_rank_bucket_allreduce` defaults to true "
              "(zero/config.py:119; stage_1_and_2.py:1695-1696, :2384 `dist.all_reduce`); then the updated bf16 "
              "partitions are all-gathered (stage_1_and_2.py:3155, utils.py:1016): 2(N-1)/N·2Ψ + (N-1)/N·2Ψ = 1.5x "
              "ZeRO-0, not the ZeRO paper's 1x (reduce-scatter + all-gather).",
              "- ZeRO-2: the same collectives, but the gradient all-reduce runs in every micro-step's backward "
              "(engine.py:3084-3086): A·2(N-1)/N·2Ψ + (N-1)/N·2Ψ; equal to ZeRO-1 at A = 1. `allgather_partitions` is "
              "read by nothing in 0.19.8's runtime; bucket sizes split the calls, not the bytes.",
              f"- ZeRO-3: per micro-step a reduce-scatter of the bf16 gradients (stage3.py:1931) and one all-gather "
              f"of the parameters above `stage3_param_persistence_threshold` (1e5: {100 * (1 - zero3_partition(s1, 1, 'persistent') / s1.total):.1f} % "
              f"of Stage I's); per step an all-gather of the persistent ones (stage3.py:2841): "
              f"A·(N-1)/N·(2Ψ_gathered + 2Ψ) + (N-1)/N·2Ψ_persistent. One gather per micro-step, not the paper's "
              f"two (forward and backward): once the module trace is recorded, a parameter is released only if not "
              f"reused within `stage3_max_reuse_distance` (1e9 elements, partitioned_param_coordinator.py:653-662), "
              f"and 2Ψ ≈ 2e8 < 1e9, so every parameter gathered in the forward stays gathered through the backward "
              f"(ZeRO-3's peak holds all bf16 parameters: {BF16 * s1.total / GIB:.2f} GiB for Stage I). The first "
              f"step (trace recording) gathers in the backward too; Stage II's GradCache (A > 1: a no-grad forward, "
              f"then forward + backward per micro-step) invalidates the trace and gathers at each of the three uses.",
              "- Small collectives not in the formulas: gradient-norm and overflow scalars (ZeRO-1/2/3), the trace "
              "checks of ZeRO-3's first steps, Stage II's contrastive loss gathering its embeddings over the ranks "
              "(`torch.distributed.nn.functional.all_gather`, 1 KiB here).", ""]
    lines += measured_table(res, where)
    lines += recommendation_table(res)
    return "\n".join(lines) + "\n"


def measured_table(res: dict, where: str) -> list[str]:
    rows = []
    for r in res["measured"]:
        if "error" in r:
            rows.append(f"| {r['config']} {r['variant']} | {r['world_size']} | error: {r['error'][:200]} |" + " |" * 8)
            continue
        for c in r["cases"]:
            rows.append(f"| {CONFIGS[r['config']]} {r['variant']} ({c['params'] / 1e6:.2f} M) | {r['world_size']} | "
                        f"{c['zero']} | {c['accumulation']} | {c['measured'] / 1e6:.4f} | "
                        f"{c['measured_logger'] / 1e6:.4f} | {c['measured_model'] / 1e3:.1f} | "
                        f"{c['analytic'] / 1e6:.4f} | {fmt_rel(c['rel_diff'])} | "
                        f"{c['first_step'] / 1e6:.4f} | {c['calls_per_step']} |")
    worst = max((abs(c["rel_diff"]) for r in res["measured"] if "error" not in r for c in r["cases"]), default=0.0)
    steps = res["steps"]
    return ["Measured against analytic (" + where + "): the trainer's DeepSpeed engine (bench/common.py "
            f"`stage_engine`, bf16, the project's ZeRO configs) under torchrun on CPU ranks (gloo, DS_ACCELERATOR=cpu, "
            f"OMP_NUM_THREADS=1); 'small': width 256, depth 2, images 32², micro-batch 2; 'paper': the paper-size "
            f"model (the same parameters) on 32² images, micro-batch 1; the stage's `train_step` as the trainer runs "
            f"it, "
            f"1 warm-up step then {steps} measured; MB (1e6 bytes) per rank per optimizer step, rank 0 (all ranks "
            f"agree), from every torch.distributed call (wrapped), DeepSpeed's comms logger beside it "
            f"(`comms_logger.comms_dict`: only deepspeed.comm's calls), each collective weighted as in the formula "
            f"(`bench/results/scaleout_cpu.json`). Largest difference: {100 * worst:.3f} %:", "",
            "| model | ranks | ZeRO | A | measured MB | comms logger MB | model's own KB | analytic MB | difference | "
            "first step MB | collectives per step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            "The difference is the small collectives (scalars, the contrastive loss's gathers); the comms logger sees "
            "every DeepSpeed collective, but not the model's own. First step: ZeRO-3 records its module trace and "
            "gathers in the backward too (and checks the trace across ranks with broadcasts).", ""]


def recommendation_table(res: dict) -> list[str]:
    h, gbps = res["h100"], res["gbps"]
    zero = {int(k): v for k, v in h["by_zero"].items()}  # (JSON keys are strings)
    (ms0, gib0), (ms2, gib2), (ms3, _) = zero[0], zero[2], zero[3]
    rows = []
    for r in res["recommendation"]:
        rows.append(f"| {CONFIGS[r['config']]} | {r['gpus']} | {r['zero']} | {r['micro_batch']} | {r['accumulation']} "
                    f"| {r['state_gib']:.2f} | {r['comm_gb']:.3f} ({r['comm_gb_zero0']:.3f}) | "
                    f"{1e3 * r['comm_s']:.0f} ({1e3 * r['comm_s_zero0']:.0f}) | {1e3 * r['compute_s']:.0f} | "
                    f"{100 * r['comm_s'] / r['compute_s']:.0f} % |")
    upto16 = max(r["comm_s"] / r["compute_s"] for r in res["recommendation"] if 1 < r["gpus"] <= 16)
    at64 = [r for r in res["recommendation"] if r["gpus"] == 64]
    lo, hi = min(r["comm_s"] / r["compute_s"] for r in at64), max(r["comm_s"] / r["compute_s"] for r in at64)
    big = at64[0]
    when = f", committed {h['committed']}" if h.get("committed") else ""
    return [f"Recommendation per GPU count (analytic, {res['provenance']['date']}, `{res['command']}`), global batch "
            f"256 (the paper's Stage II batch; the paper trains Stage I at batch 2 on one A100, which cannot spread "
            f"over more than 2 GPUs: the project's `vita_stage1.yaml` uses 256). Micro-batch: global / N up to 32, "
            f"the measured point ({h['device']}, torch {h['torch']}, `python bench/pretrain_step.py --micro 32 "
            f"--steps 15`, bench/results/pretrain_step_h100.json{when}: paper shape {h['step_ms']:.0f} ms per step, "
            f"peak {h['peak_mem_gib']:.1f} GiB with ZeRO-2; larger micro-batches are unmeasured), the rest "
            f"accumulated. ZeRO: never 3 (the model states fit any GPU without it, and the same run measured "
            f"{100 * (1 - ms2 / ms3):.0f} % less throughput than ZeRO-2 at width 1024: {ms3:.0f} against {ms2:.0f} ms "
            f"per step); one GPU: ZeRO-2 (nothing to communicate; ZeRO-0's step took {100 * (ms0 / ms2 - 1):.0f} % "
            f"longer and {gib0 - gib2:.1f} GiB more in that run); several GPUs without accumulation: ZeRO-2 (ZeRO-1's bytes, its all-reduce "
            f"overlapped with the backward, `overlap_comm: true`); with accumulation on several GPUs: ZeRO-1 "
            f"(ZeRO-2 all-reduces every micro-step). Communication: the analytic bytes at {gbps:.0f} Gb/s per GPU "
            f"(inter-node; within one 8-GPU NVLink node several times faster), in brackets ZeRO-0's (one all-reduce: "
            f"2/3 of the bytes, but after the backward, not overlapped). Compute per step: ESTIMATE, the measured "
            f"H100 Stage I time per sample ({h['step_ms'] / h['micro_batch']:.2f} ms at micro-batch 32) times the "
            f"samples per GPU per step; Stage II (not measured on a GPU) scaled by its model FLOPs plus its "
            f"activation-checkpoint recompute and, with accumulation, GradCache's no-grad pass. Below micro-batch 32 "
            f"a GPU runs less efficiently: there the compute is a lower bound and the ratio an upper bound:", "",
            "| model | GPUs | ZeRO | micro-batch | accumulation | model states GiB / GPU | GB per step (ZeRO-0) | "
            f"communication ms at {gbps:.0f} Gb/s (ZeRO-0) | compute ms per step (estimate) | communication / compute |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            f"Reading: up to 16 GPUs the communication is at most {100 * upto16:.0f} % of the compute even if none of "
            f"it is hidden. On 64 GPUs a global batch of 256 leaves {big['micro_batch']} samples per GPU, and the "
            f"gradient all-reduce plus the parameter all-gather ({big['comm_gb']:.2f} GB per step: (N-1)/N -> 1, the "
            f"bytes per rank hardly grow with N) take {100 * lo:.0f}-{100 * hi:.0f} % of the compute estimate: keep "
            f"ZeRO-2 for the overlap, or raise the global batch (micro-batch 32 on 64 GPUs is 2048) if the recipe "
            f"allows. Memory is never the constraint: {max(r['state_gib'] for r in res['recommendation']):.2f} GiB of "
            f"model states per GPU at most, beside the measured {h['peak_mem_gib']:.1f} GiB peak of micro-batch 32.", ""]


def run_all(args: argparse.Namespace) -> dict:
    """Every measured case: the small Stage I / II on each --nproc (ZeRO 0-3 x A 1, 2), the paper-size Stage I on 2
    ranks (ZeRO 0-3, A 1; ZeRO-2 / 3 with A 2), each (ranks, model) in one torchrun with ZeRO-3 last."""
    cases = [(z, a) for z in ZEROS for a in (1, 2)]
    plan = [(n, c, "small", cases, 2) for n in args.nproc for c in CONFIGS]
    if not args.no_paper_check:
        plan.append((2, "vita_stage1", "paper", [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (3, 2)], 1))
    out = []
    for n, config, variant, cs, micro in plan:
        t0 = time.perf_counter()
        try:
            r = measure(n, config, variant, cs, steps=args.steps, micro=micro, timeout=args.timeout)
            out.append(r)
            worst = max(abs(c["rel_diff"]) for c in r["cases"])
            print(f"{config} {variant}, {n} ranks: {len(cs)} cases, worst difference {100 * worst:.3f} %, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        except RuntimeError as e:
            print(str(e)[-3000:], file=sys.stderr, flush=True)
            out.append({"config": config, "variant": variant, "world_size": n, "error": str(e).splitlines()[0]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gbps", type=float, default=200.0, help="per-GPU network bandwidth for the time estimate")
    ap.add_argument("--no-paper-check", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--from-json", action="store_true", help="only rewrite the markdown from --out's JSON")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scaleout_cpu.json"))
    if sys.argv[1:2] == ["_worker"]:
        wp = argparse.ArgumentParser()
        wp.add_argument("_worker")
        for a in ("--config", "--variant", "--result", "--pids"):
            wp.add_argument(a, required=True)
        wp.add_argument("--steps", type=int, default=2)
        wp.add_argument("--warmup", type=int, default=1)
        wp.add_argument("--micro", type=int, default=1)
        wp.add_argument("--cases", nargs="+", type=lambda s: tuple(int(x) for x in s.split(":")), required=True)
        return worker(wp.parse_args())
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:  # the comparison is recomputed from the raw per-rank counts (the formulas may have moved)
        res = json.loads(out.read_text())
        for r in res["measured"]:
            if "ranks" in r:
                r["cases"] = [compare(r, i) for i in range(len(r["ranks"][0]))]
    else:
        t0 = time.perf_counter()
        res = {"provenance": provenance(), "command": " ".join(["python bench/scaleout.py", *sys.argv[1:]]),
               "gbps": args.gbps, "steps": args.steps, "nproc": args.nproc, "measured": run_all(args)}
        res["wall_s"] = time.perf_counter() - t0
    # the analytic tables and the recommendation are recomputed each time (cheap, deterministic)
    res["gbps"] = args.gbps if not args.from_json else res["gbps"]
    res["h100"] = h100_step()
    res["analytic"] = {c: {"params": model_sizes(c).total, "groups": list(model_sizes(c).groups),
                           "persistent": zero3_partition(model_sizes(c), 1, "persistent"),
                           "state_bytes": {f"{z}/{n}": state_bytes(model_sizes(c), z, n) for z in ZEROS for n in GPUS},
                           "comm_bytes": {f"{z}/{n}/{a}": comm_bytes(model_sizes(c), z, n, a)
                                          for z in ZEROS for n in GPUS for a in (1, 2, 8)}}
                       for c in CONFIGS}
    res["recommendation"] = [recommend(c, n, res["gbps"]) for c in CONFIGS for n in (1, 8, 16, 64)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    update_benchmarks(markdown(res), SECTION)


if __name__ == "__main__":
    main()
