"""Memory per rank and checkpoint size per ZeRO stage, for the paper-scale ViTa Stage I and Stage II models, with
the DeepSpeed engine the trainer builds (`build_model`, `param_groups`, `lr_lambda`, `deepspeed_config`,
`model_inputs`, `pretrain.checkpoint.save`).

    python bench/zero_memory.py [--nproc 2 [4 ...]] [--configs vita_stage1 vita_stage2] [--zero 0 1 2 3]
        [--precision bf16|fp32] [--steps 2] [--img-size N] [--out bench/results/zero_memory_<device>.json]
        [--no-markdown]

launches, per (ranks, config, ZeRO stage), `torchrun --standalone --nproc_per_node N bench/zero_memory.py _worker ...`
(a fresh process group per case, so every peak is that case's alone; gloo and DS_ACCELERATOR=cpu without a GPU,
NCCL on GPUs). Each rank runs `--steps` real training steps at micro-batch 1 (global batch = ranks, no
accumulation), so that the optimizer state exists, and measures during the last step:
  - live tensor bytes after the backward pass (gradients held) and after the optimizer step, by category: the
    module's parameters as this rank holds them (under ZeRO-3 its partition), the fp32 master copy (what the
    inner optimizer updates, when it is not the module's parameters), the optimizer state (AdamW's two moments),
    and the rest (gradient partitions, reduction buckets, DeepSpeed's flat buffers). Counted over every
    torch.Tensor the garbage collector can reach, each storage once (views share it); activations freed by then
    are not in it;
  - peak resident set size of the rank's process (getrusage; includes Python, libraries and activations), and on
    GPU torch.cuda.max_memory_allocated;
then saves a checkpoint through `pretrain.checkpoint.save` into a temporary directory and records its files'
sizes by rank and kind (model states / optimizer states). Writes the JSON, prints a table and (unless
--no-markdown) the "## ZeRO memory and checkpoint size" section of BENCHMARKS.md. bf16 runs on DeepSpeed's CPU
accelerator too. Measured on the 2-core CPU machine: `--nproc 2 4`, both configs, all stages in 11 min.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, stage_engine, stage_inputs, update_benchmarks

SECTION = "## ZeRO memory and checkpoint size"
GIB = 2**30


# --- one (config, ZeRO stage) case, on every rank ------------------------------------------------------------------
def storages(tensors) -> dict[tuple, int]:
    """{(device, data_ptr): nbytes} of the storages behind `tensors` (each counted once, empty ones skipped)."""
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            out[(str(s.device), s.data_ptr())] = s.nbytes()
    return out


def live_bytes(engine) -> dict[str, int]:
    """Bytes of every live tensor storage, split into the categories of the module docstring."""
    import torch

    params = storages(getattr(p, "ds_tensor", p.data) for p in engine.module.parameters())  # ZeRO-3: partition
    inner = engine.basic_optimizer  # the torch AdamW that DeepSpeed wraps
    # the tensors it updates (ZeRO-3 swaps them into its param groups only during the step; the state is keyed by them)
    master = storages([*inner.state, *(p for g in inner.param_groups for p in g["params"])])
    state = storages(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    every = storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    master = {k: v for k, v in master.items() if k not in params}
    total = sum(every.values())
    out = {"params": sum(params.values()), "master": sum(master.values()), "optim_state": sum(state.values())}
    return {**out, "other": total - sum(out.values()), "total": total}


def checkpoint_sizes(tag_dir: Path, world: int) -> dict:
    """On-disk bytes of a DeepSpeed checkpoint by rank and kind, from its file names (`zero_pp_rank_<r>_...` is
    rank r's partition, `mp_rank_00_model_states.pt` rank 0's)."""
    per_rank = [{"model_states": 0, "optim_states": 0} for _ in range(world)]
    files = {}
    for f in sorted(tag_dir.rglob("*.pt")):
        m = re.search(r"zero_pp_rank_(\d+)_", f.name)
        kind = "optim_states" if "optim_states" in f.name else "model_states"
        per_rank[int(m.group(1)) if m else 0][kind] += f.stat().st_size
        files[f.name] = f.stat().st_size
    return {"per_rank": per_rank, "total": sum(files.values()), "files": files}


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from core.config import dump_config, load_config
    from pretrain import checkpoint
    from pretrain.config import PretrainConfig
    from pretrain.dist import init_distributed

    env = init_distributed()
    world = env.world_size
    rss_start = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # Python + libraries
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    over = [f"train.zero_stage={args.zero}", "train.micro_batch=1", f"train.global_batch={world}",
            f"train.precision={args.precision}"] + ([f"model.img_size={args.img_size}"] if args.img_size else [])
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain" / f"{args.config}.yaml", over)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.train.seed)
    model, engine = stage_engine(cfg, world)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: the full size
    inputs = stage_inputs(cfg, model, 1, device, dtype)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = engine(**inputs)["loss"]
        engine.backward(loss)
        after_backward = live_bytes(engine)  # of the last step: gradients held, optimizer state from the one before
        engine.step()
    step_s = (time.perf_counter() - t0) / args.steps
    after_step = live_bytes(engine)
    row = {"rank": env.rank, "after_backward": after_backward, "after_step": after_step, "step_s": step_s,
           "loss": loss.item(), "rss_start": rss_start,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    shared = [tempfile.mkdtemp(dir=args.tmp) if env.rank == 0 else None]  # rank 0's directory, for every rank
    dist.broadcast_object_list(shared, src=0)
    ckpt_dir = Path(shared[0])
    t0 = time.perf_counter()
    tag = checkpoint.save(engine, ckpt_dir, args.steps, {"config": dump_config(cfg)}, {}, keep=1)
    save_s = time.perf_counter() - t0
    if env.rank == 0:
        result = {"config": args.config, "zero": args.zero, "precision": cfg.train.precision, "world_size": world,
                  "img_size": cfg.model.img_size, "params": n_params, "save_s": save_s, "ranks": rows,
                  "checkpoint": checkpoint_sizes(ckpt_dir / tag, world)}
        Path(args.result).write_text(json.dumps(result) + "\n")
        shutil.rmtree(ckpt_dir)  # checkpoint.save returns after a barrier: every rank's files are complete


# --- the driver ------------------------------------------------------------------------------------------------------
def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def model_states(b: dict) -> int:
    return b["params"] + b["master"] + b["optim_state"]


def table(res: dict) -> list[str]:
    """Markdown rows: rank 0's figures (the ranks hold equal shares; the JSON has every rank)."""
    lines = ["| model | ranks | ZeRO | params | fp32 master | Adam moments | model states (bytes / param) | "
             "other after backward | live after backward / step | peak RSS (at start) | "
             "checkpoint rank 0: model / optim | checkpoint, all ranks | s per step / save |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in res["cases"]:
        if "error" in c:
            lines.append(f"| {c['config']} | {c['world_size']} | {c['zero']} | error: {c['error'][:120]} |"
                         + " |" * 9)
            continue
        r, ck = c["ranks"][0], c["checkpoint"]
        b, a = r["after_backward"], r["after_step"]
        states = model_states(b)
        gpu = "" if r["cuda_max_allocated"] is None else f"; GPU {gib(r['cuda_max_allocated'])}"
        lines.append(
            f"| {c['config']} ({c['params'] / 1e6:.1f} M) | {c['world_size']} | {c['zero']} | {gib(b['params'])} | "
            f"{gib(b['master'])} | {gib(b['optim_state'])} | {gib(states)} ({states / c['params']:.1f}) | "
            f"{gib(b['other'])} | {gib(b['total'])} / {gib(a['total'])} | {gib(r['peak_rss'])} "
            f"({gib(r['rss_start'])}{gpu}) | {gib(ck['per_rank'][0]['model_states'])} / "
            f"{gib(ck['per_rank'][0]['optim_states'])} | {gib(ck['total'])} | {r['step_s']:.0f} s / "
            f"{c['save_s']:.1f} s |")
    return lines


def projected(res: dict, ranks: int) -> dict[tuple[str, int], float]:
    """Model states per rank at `ranks` ranks, from the measured ones: what ZeRO partitions (stage >= 1: fp32
    master and moments; stage 3: the parameters too) divides by the number of ranks, the rest stays. From the
    run on the fewest ranks."""
    out = {}
    for c in sorted(res["cases"], key=lambda c: -c["world_size"]):
        if "error" not in c:
            b, n = c["ranks"][0]["after_backward"], c["world_size"]
            shared = b["master"] + b["optim_state"] if c["zero"] >= 1 else 0
            shared += b["params"] if c["zero"] == 3 else 0
            out[(c["config"], c["zero"])] = model_states(b) - shared + shared * n / ranks
    return out


def markdown(res: dict) -> str:
    configs = sorted({c["config"] for c in res["cases"]})
    zeros = sorted({c["zero"] for c in res["cases"]})
    proj = {n: projected(res, n) for n in (8, 64)}
    rows = [f"| {cfg} | {n} | " + " | ".join(gib(proj[n].get((cfg, z))) for z in zeros) + " |"
            for cfg in configs for n in proj]
    # the projection against the runs on more ranks than it starts from
    fewest = min(res["world_sizes"])
    errors = [abs(model_states(c["ranks"][0]["after_backward"]) / projected(res, c["world_size"])[(c["config"],
              c["zero"])] - 1) for c in res["cases"] if "error" not in c and c["world_size"] > fewest]
    check = (f" (on {', '.join(str(n) for n in res['world_sizes'] if n > fewest)} ranks the measured model states "
             f"differ from this projection from {fewest} ranks by at most {100 * max(errors):.1f} %)" if errors else "")
    return "\n".join([
        f"{SECTION} (`{res.get('command', 'python bench/zero_memory.py')}`)", "",
        f"{res['machine']}, torch {res['torch']}, DeepSpeed {res['deepspeed']}, "
        f"{' and '.join(map(str, res['world_sizes']))} ranks "
        f"({res['launcher']}), {res['precision']}, the paper-scale configs (`configs/pretrain/<model>.yaml`, image "
        f"{res['img_size']}²) at micro-batch 1 per rank, the trainer's DeepSpeed engine (ZeRO tuning from "
        f"`configs/deepspeed/zero<N>.json`), {res['steps']} training steps, then `pretrain.checkpoint.save`. GiB per "
        f"rank, rank 0 (the ranks hold equal shares; all in `{res['out']}`):", "",
        *table(res), "",
        "Params: the module's parameters as the rank holds them (bf16; under ZeRO-3 its partition). fp32 master and "
        "Adam moments: what the inner AdamW updates and its two moments (ZeRO-0 keeps them whole on every rank, "
        "ZeRO-1/2/3 a 1/N partition). Other: every other live tensor after the backward pass: the gradients and "
        "DeepSpeed's reduction buckets and flat buffers (ZeRO-3's bucket alone is `reduce_bucket_size` = 5e7 bf16 "
        "elements, 95 MiB, whatever the model). Live: every tensor storage the garbage collector reaches, counted "
        "once (the activations are freed by then). Peak RSS: the process' high-water mark: Python, torch and "
        "DeepSpeed (the RSS at start), the fp32 model before DeepSpeed casts it, the activations of one sample. "
        "Checkpoint (`pretrain.checkpoint.save`, on disk): ZeRO-0 writes module and optimizer into rank 0's one "
        "`mp_rank_00_model_states.pt` (14 bytes per parameter); ZeRO-1/2: rank 0 the bf16 module (2 bytes per "
        "parameter), every rank its optimizer partition (fp32 master + moments, 12 bytes per parameter over all "
        "ranks); ZeRO-3: every rank its optimizer partition and no bf16 weights "
        "(`stage3_gather_16bit_weights_on_model_save: false`: its model-state files hold metadata only), 12 bytes "
        "per parameter. The total does not depend on the number of ranks; each rank writes 1/N of the optimizer.", "",
        "Model states per rank (params + fp32 master + moments) on more ranks, projected from the measured "
        "bytes (ZeRO-1/2 divide master and moments by the number of ranks, ZeRO-3 the parameters too); "
        f"gradients, buckets and activations come on top{check}:", "",
        "| model | ranks | " + " | ".join(f"ZeRO-{z}" for z in zeros) + " |",
        "| --- | --- |" + " --- |" * len(zeros),
        *rows, "", *meaning(res, proj)])


def meaning(res: dict, proj: dict) -> list[str]:
    """What the figures mean on a GPU cluster, for the first config (when ZeRO-0, 2 and 3 were all measured)."""
    cases = {c["zero"]: c for c in res["cases"] if "error" not in c and c["config"] == res["cases"][0]["config"]}
    if not {0, 2, 3} <= set(cases):
        return []
    cfg = cases[0]["config"]
    z = {k: (proj[8][(cfg, k)], proj[64][(cfg, k)]) for k in (0, 2, 3)}
    return [f"What it means on a GPU cluster ({cfg}, {cases[0]['params'] / 1e6:.1f} M parameters): per rank, the "
            f"model states are {gib(z[0][0])} GiB with ZeRO-0 on any number of ranks, {gib(z[2][0])} / "
            f"{gib(z[2][1])} GiB with ZeRO-1/2 and {gib(z[3][0])} / {gib(z[3][1])} GiB with ZeRO-3 on 8 / 64 ranks: "
            f"small next to an 80 GiB GPU, so the activations of the micro-batch (the training-step section's peak "
            f"memory) decide what fits, and ZeRO-3's per-layer parameter gathers buy memory these models do not "
            f"need. A checkpoint is {gib(cases[0]['checkpoint']['total'])} GiB (ZeRO-0/1/2) or "
            f"{gib(cases[3]['checkpoint']['total'])} GiB (ZeRO-3) whatever the number of ranks; ZeRO-1/2/3 spread "
            f"its optimizer part over the ranks' files.", ""]


def run_case(args: argparse.Namespace, nproc: int, config: str, zero: int, env: dict) -> dict:
    """One (ranks, config, ZeRO stage) case in its own torchrun: rank 0's result, or the error."""
    with tempfile.NamedTemporaryFile(suffix=".json") as res:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "_worker", "--config", config, "--zero", str(zero), "--result", res.name, "--precision",
               args.precision, "--steps", str(args.steps)]
        cmd += (["--img-size", str(args.img_size)] if args.img_size else []) + (["--tmp", args.tmp] if args.tmp else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        text = Path(res.name).read_text()
    if proc.returncode == 0 and text:
        return json.loads(text)
    tail = (proc.stderr or proc.stdout)[-3000:]
    print(tail, file=sys.stderr)
    return {"config": config, "zero": zero, "world_size": nproc, "error": (tail.strip().splitlines() or ["?"])[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2])
    ap.add_argument("--configs", nargs="+", default=["vita_stage1", "vita_stage2"])
    ap.add_argument("--zero", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=None, help="smaller images: less compute and activation memory, "
                                                               "the same parameters")
    ap.add_argument("--tmp", default=None, help="where the checkpoints are written (default: the system's temp; "
                                                "deleted after measuring)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-markdown", action="store_true")
    if sys.argv[1:2] == ["_worker"]:
        ap.add_argument("_worker")
        ap.add_argument("--config", required=True)
        ap.add_argument("--result", required=True)
        args = ap.parse_args()
        args.zero = args.zero[0]
        return worker(args)
    args = ap.parse_args()

    import deepspeed
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    out = Path(args.out or ROOT / "bench/results" / f"zero_memory_{'cuda' if cuda else 'cpu'}.json")
    env = {**os.environ, **({} if cuda else {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})}
    cases = []
    for nproc, config, zero in itertools.product(args.nproc, args.configs, args.zero):
        t0 = time.perf_counter()
        c = run_case(args, nproc, config, zero, env)
        cases.append(c)
        print(f"{config} ZeRO-{zero}, {nproc} ranks: " + (f"error {c['error']}" if "error" in c else
              f"live {gib(c['ranks'][0]['after_backward']['total'])} GiB after backward, peak RSS "
              f"{gib(c['ranks'][0]['peak_rss'])} GiB, checkpoint {gib(c['checkpoint']['total'])} GiB, "
              f"{time.perf_counter() - t0:.0f} s"), flush=True)
    res = {"machine": f"{os.cpu_count()}-core CPU machine" if not cuda else device, "device": device,
           "torch": torch.__version__, "deepspeed": deepspeed.__version__, "world_sizes": args.nproc,
           "launcher": "torchrun, gloo, DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1" if not cuda else "torchrun, NCCL",
           "precision": args.precision, "steps": args.steps, "img_size": args.img_size or 128,
           "out": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
           "command": " ".join(["python bench/zero_memory.py", *sys.argv[1:]]), "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(table(res)))
    print(f"wrote {out}")
    if not args.no_markdown:
        update_benchmarks(markdown(res), SECTION)


if __name__ == "__main__":
    main()
