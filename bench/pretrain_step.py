"""Stage I training-step throughput: step time, samples/s, tokens/s, MFU and peak memory, through the real
DeepSpeed engine the trainer builds (same config builder, optimizer groups, schedule), on in-memory batches so
that only the step is measured. Compares, in one run on one device:
  - the paper's shape (width 1025, 5 heads) against a Hopper-friendly one (1024, 8 heads),
  - bf16 against fp32, SDPA fused kernels against the math backend, ZeRO stages.

    python bench/pretrain_step.py [--config configs/pretrain/vita_stage1.yaml] [--micro 32] [--steps 20]
    (one process; on GPU run it on the GPU machine; on CPU use --cpu-small)

Writes bench/results/pretrain_step_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg, label: str, steps: int, backend: str | None) -> dict:
    import deepspeed
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.models.vit import MaskedAutoencoder, flops_per_sample, num_tokens
    from pretrain.train import PEAK_FLOPS, deepspeed_config, lr_lambda, param_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model, cfg.mae)
    model.set_grad_checkpointing(cfg.train.activation_checkpointing)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 1000))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, 1))
    m = cfg.model
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    x = torch.rand(cfg.train.micro_batch, m.sa_planes + m.la_planes, m.frames, m.img_size, m.img_size,
                   device=device).to(dtype)
    backends = {"math": [SDPBackend.MATH], None: None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = engine(x)
        engine.backward(out["loss"])
        engine.step()

    with sdpa_kernel(backends[backend]) if backends.get(backend) else contextlib.nullcontext():
        for _ in range(3):
            step()
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
    flops = flops_per_sample(cfg.model, cfg.mae, train=True)
    row = {"label": label, "dim": m.dim, "heads": m.heads, "precision": cfg.train.precision, "zero": cfg.train.zero_stage,
           "attention": backend or "auto", "micro_batch": cfg.train.micro_batch, "step_ms": 1e3 * dt,
           "samples_per_s": sps, "tokens_per_s": sps * num_tokens(cfg.model),
           "mfu": flops * sps / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain/vita_stage1.yaml"))
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-small", action="store_true", help="a small config that runs on CPU in seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from data_prep.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.dist import init_distributed

    init_distributed()
    base = [f"train.micro_batch={args.micro}", f"train.global_batch={args.micro}"]
    if args.cpu_small:
        base += ["model.img_size=32", "model.dim=128", "model.heads=4", "mae.decoder_dim=64", "mae.decoder_heads=4",
                 "train.precision=fp32"]
        variants = [("small fp32", [], None), ("small fp32 math-attn", [], "math")]
    else:
        variants = [
            ("paper 1025x5 bf16", [], None),
            ("paper 1025x5 bf16 math-attn", [], "math"),
            ("1024x8 bf16", ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024", "mae.decoder_heads=8"], None),
            ("1024x8 bf16 math-attn", ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024",
                                        "mae.decoder_heads=8"], "math"),
            ("1024x8 fp32", ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024", "mae.decoder_heads=8",
                             "train.precision=fp32"], None),
            ("1024x8 bf16 ZeRO-0", ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024", "mae.decoder_heads=8",
                                    "train.zero_stage=0"], None),
            ("1024x8 bf16 ZeRO-3", ["model.dim=1024", "model.heads=8", "mae.decoder_dim=1024", "mae.decoder_heads=8",
                                    "train.zero_stage=3"], None),
            ("paper 1025x5 bf16 act-ckpt", ["train.activation_checkpointing=true"], None),
        ]
    rows = []
    for label, over, backend in variants:
        cfg = load_config(PretrainConfig, args.config, base + over)
        try:
            rows.append(measure(cfg, label, args.steps, backend))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # a variant the device cannot run is reported, not fatal
            rows.append({"label": label, "error": f"{type(e).__name__}: {e}"[:300]})
        r = rows[-1]
        if "error" in r:
            print(f"{label:32s} ERROR {r['error']}", flush=True)
        else:
            print(f"{label:32s} {r['step_ms']:8.1f} ms {r['samples_per_s']:8.1f} samples/s "
                  f"{r['tokens_per_s'] / 1e6:7.2f} Mtok/s MFU {100 * (r['mfu'] or 0):5.1f}% "
                  f"peak {r['peak_mem_gib'] or 0:5.1f} GiB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench/results" / f"pretrain_step_{device.split()[-1] if device != 'cpu' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "micro_batch": args.micro,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
