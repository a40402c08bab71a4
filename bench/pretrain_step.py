"""Training-step throughput of ViTa Stage I (MAE), Stage II (image-tabular CLIP) or MetaCLIP-CMR: step time,
samples/s, tokens/s, MFU and peak memory, through the real DeepSpeed engine the trainer builds (its `build_model`,
`build_engine`, `model_inputs`), on in-memory batches so that only the step is measured. Compares, in one run on
one device:
  - the paper's shape (width 1025, 5 heads of 205, zero-padded to 208 inside attention) against a Hopper-friendly
    one (1024, 8 heads),
  - the blocks compiled + torch's fused AdamW (`train.compile`, `optim.fused`) against eager + the default AdamW,
  - bf16 against fp32, SDPA fused kernels against the math backend, ZeRO stages, activation checkpointing, a
    bigger micro-batch.

    python bench/pretrain_step.py [--stage mae|tabular_clip|metaclip] [--config ...] [--micro 32] [--steps 20]
        [--only LABEL ...] [--sync-audit]
        [--dataset DIR]   Stage II: the converted dataset whose tabular schema sizes the tabular encoder
                          (default: the schema the UK Biobank conversion writes, 117 features)
    (one process, on the GPU machine; on CPU: DS_ACCELERATOR=cpu python bench/pretrain_step.py --cpu-small --micro 4)

MetaCLIP-CMR has no FLOP formula: its FLOPs per sample are counted over one training step (FlopCounterMode), and
its text encoder is the scratch BERT (the paper's DistilBERT is a local checkpoint a benchmark machine may lack).
`--sync-audit` lists the host syncs CUDA reports inside one steady-state step (`host_syncs_in_one_step`).
Writes bench/results/pretrain_step_<stage>_<device>.json and prints a table. (bench/results/pretrain_step_h100.json
is an earlier Stage I run, written before the file name carried the stage.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from common import ROOT, stage_engine, stage_inputs
from pretrain.config import PretrainConfig

CONFIGS = {"mae": "configs/pretrain/vita_stage1.yaml", "tabular_clip": "configs/pretrain/vita_stage2.yaml",
           "metaclip": "configs/pretrain/metaclip_cmr.yaml"}
# MetaCLIP-CMR's paper text encoder is DistilBERT from a local checkpoint a benchmark machine may lack: the
# scratch BERT (256-d, 4 layers) stands in; the image encoder (ResNet-50 on 12 images of 224² per sequence) dominates
METACLIP_TEXT = ["metaclip.text_encoder=null", "metaclip.text_init=scratch"]
# the Hopper-friendly shape: 1024 wide, 8 heads of 128, for every transformer of the stage
FAST = {"mae": ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024", "mae.decoder_heads=8"],
        "tabular_clip": ["model.dim=1024", "model.heads=8", "tabular.dim=1024", "tabular.heads=8"],
        "metaclip": ["metaclip.image_encoder=vit", "model.dim=1024", "model.heads=8"]}
# issue 17's step: the blocks compiled, torch's fused AdamW
FASTER = ["train.compile=true", "optim.fused=true"]
# --cpu-small: images 32², width 128, 4 heads, fp32 (in main), and per stage
SMALL = {"mae": ["mae.decoder_dim=64", "mae.decoder_heads=4"],
         "tabular_clip": ["tabular.dim=128", "tabular.heads=4", "tabular.projection_dim=32"],
         "metaclip": ["metaclip.image_size=32", "metaclip.image_encoder=vit", "metaclip.projection_dim=32"]}


def measure(cfg: PretrainConfig, label: str, steps: int, backend: str | None, dataset: Path | None,
            sync_audit: bool = False) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.models.vit import num_tokens
    from pretrain.stages import get_stage
    from pretrain.train import PEAK_FLOPS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, engine = stage_engine(cfg, 1, dataset)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    inputs = stage_inputs(cfg, model, cfg.train.micro_batch, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = engine(**inputs)
        engine.backward(out["loss"])
        engine.step()

    flops = get_stage(cfg.stage).flops(cfg, model)
    counted = flops is None
    with sdpa_kernel([SDPBackend.MATH]) if backend == "math" else contextlib.nullcontext():
        if counted:  # no analytic formula (MetaCLIP-CMR): count the FLOPs of one training step as it runs
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops() / cfg.train.micro_batch
        for _ in range(3):
            step()
        audit = None
        if sync_audit and device.type == "cuda":  # host syncs inside one steady-state step
            import warnings

            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode("default")
            audit = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    sps = cfg.train.micro_batch / dt
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    m = cfg.model
    return {"label": label, "stage": cfg.stage, "dim": m.dim, "heads": m.heads, "precision": cfg.train.precision,
            "zero": cfg.train.zero_stage, "activation_checkpointing": cfg.train.activation_checkpointing,
            "attention": backend or "auto", "micro_batch": cfg.train.micro_batch, "step_ms": 1e3 * dt,
            "samples_per_s": sps, "tokens_per_s": sps * num_tokens(m), "flops_per_sample": flops,
            "flops_counted": counted, "compile": cfg.train.compile, "fused_adamw": cfg.optim.fused,
            "host_syncs_in_one_step": audit,
            "mfu": flops * sps / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def variants(stage: str, cpu_small: bool) -> list[tuple[str, list[str], str | None]]:
    """(label, config overrides, attention backend) per measured variant."""
    if cpu_small:
        return [("small fp32", [], None), ("small fp32 math-attn", [], "math"),
                ("small fp32 compiled fused-AdamW", FASTER, None)]
    fast = FAST[stage]
    big = ["train.micro_batch=96", "train.global_batch=96"]
    if stage == "metaclip":
        return [("paper resnet50 224 bf16", [], None), ("paper resnet50 224 bf16 fused-AdamW", ["optim.fused=true"], None),
                ("paper resnet50 224 fp32", ["train.precision=fp32"], None),
                ("vit 1024x8 bf16", fast, None), ("vit 1024x8 bf16 compiled fused-AdamW", fast + FASTER, None)]
    if stage == "mae":
        paper = [("paper 1025x5 bf16", [], None), ("paper 1025x5 bf16 compiled fused-AdamW", FASTER, None),
                 ("paper 1025x5 bf16 math-attn", [], "math")]
        last = [("paper 1025x5 bf16 act-ckpt", ["train.activation_checkpointing=true"], None)]
    else:  # vita_stage2.yaml checkpoints activations (the paper's batch 256 needs it)
        paper = [("paper 1025x5 bf16 act-ckpt", [], None),
                 ("paper 1025x5 bf16 act-ckpt compiled fused-AdamW", FASTER, None),
                 ("paper 1025x5 bf16 act-ckpt math-attn", [], "math")]
        last = [("paper 1025x5 bf16 no act-ckpt", ["train.activation_checkpointing=false"], None)]
    return paper + [
        ("1024x8 bf16", fast, None),
        ("1024x8 bf16 compiled fused-AdamW", fast + FASTER, None),
        ("1024x8 bf16 compiled fused-AdamW micro 96", fast + FASTER + big, None),
        ("1024x8 bf16 math-attn", fast, "math"),
        ("1024x8 fp32", fast + ["train.precision=fp32"], None),
        ("1024x8 bf16 ZeRO-0", fast + ["train.zero_stage=0"], None),
        ("1024x8 bf16 ZeRO-3", fast + ["train.zero_stage=3"], None),
    ] + last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=sorted(CONFIGS), default="mae")
    ap.add_argument("--config", default=None, help="default: the stage's paper config")
    ap.add_argument("--dataset", type=Path, default=None, help="Stage II: a converted dataset (its tabular schema)")
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-small", action="store_true", help="a small config that runs on CPU in seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="measure only the variants with these labels")
    ap.add_argument("--sync-audit", action="store_true", help="CUDA: list the host syncs of one steady-state step "
                                                               "(torch.cuda.set_sync_debug_mode)")
    args = ap.parse_args()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    from core.config import load_config
    from pretrain.dist import init_distributed

    init_distributed()
    config = args.config or str(ROOT / CONFIGS[args.stage])
    base = [f"train.micro_batch={args.micro}", f"train.global_batch={args.micro}"]
    if args.stage == "metaclip":
        base += METACLIP_TEXT
    if args.cpu_small:
        base += ["model.img_size=32", "model.dim=128", "model.heads=4", "train.precision=fp32"] + SMALL[args.stage]
    rows = []
    for label, over, backend in variants(args.stage, args.cpu_small):
        if args.only and label not in args.only:
            continue
        cfg = load_config(PretrainConfig, config, base + over)
        if cfg.stage != args.stage:
            raise SystemExit(f"{config} is a {cfg.stage} config, not {args.stage} (--stage)")
        try:
            rows.append(measure(cfg, label, args.steps, backend, args.dataset, args.sync_audit))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # a variant the device cannot run is reported, not fatal
            rows.append({"label": label, "error": f"{type(e).__name__}: {e}"[:300]})
        r = rows[-1]
        if "error" in r:
            print(f"{label:38s} ERROR {r['error']}", flush=True)
        else:
            print(f"{label:38s} {r['step_ms']:8.1f} ms {r['samples_per_s']:8.1f} samples/s "
                  f"{r['tokens_per_s']:9.3g} tokens/s MFU {100 * (r['mfu'] or 0):5.1f}% "
                  f"peak {r['peak_mem_gib'] or 0:5.1f} GiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    from pretrain.train import PEAK_FLOPS

    tag = next((k.lower() for k in PEAK_FLOPS if k in device), device.split()[-1].lower())  # h100, ..., cpu
    out = Path(args.out or ROOT / "bench/results" / f"pretrain_step_{args.stage}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "stage": args.stage, "config": config,
                               "micro_batch": args.micro, "cpu_small": args.cpu_small, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
