"""Which fused attention kernels serve the paper's shapes, and how fast, on this machine.

ViTa's encoder is 1025 wide with 5 heads, i.e. head dim 205 — not a multiple of 8, which the flash kernels
require. This compares every SDPA backend at the paper's sequence lengths (9 planes x 256 patches = 2304
tokens; 691 visible at 70 % masking) for several head dims, so the model config can pick a shape the fused
kernels accept (5 x 208: the zero-padded heads `pretrain.models.vit.Attention` runs). Writes JSON (default bench/results/sdpa_backends.json) and prints a table.

    python bench/sdpa_backends.py [--out FILE] [--iters N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_backend(backend, q, k, v, iters: int) -> float | None:
    """Seconds per forward+backward, or None if the backend rejects the shape/dtype."""
    try:
        with sdpa_kernel([backend]):
            for _ in range(2):  # warm-up (and the rejection, if any, happens here)
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            if q.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            if q.is_cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / iters
    except RuntimeError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sdpa_backends.json")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 32 if cuda else 2
    rows = []
    for tokens in (691, 2304):
        for heads, head_dim in ((5, 205), (5, 208), (8, 128), (16, 64), (4, 256)):
            shape = (batch, heads, tokens, head_dim)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            for name, backend in BACKENDS.items():
                if not cuda and name != "math":
                    continue
                s = time_backend(backend, q, k, v, args.iters if cuda else 2)
                # fwd + bwd attention FLOPs: 4 * B * H * N^2 * D forward, x2.5 with backward
                tflops = None if s is None else 2.5 * 4 * batch * heads * tokens**2 * head_dim / s / 1e12
                rows.append({"tokens": tokens, "heads": heads, "head_dim": head_dim, "backend": name,
                             "ms": None if s is None else 1e3 * s, "tflops": tflops})
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    result = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "batch": batch, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{device_name}, torch {torch.__version__}, {dtype}, batch {batch} (fwd+bwd)")
    print(f"{'tokens':>6} {'heads':>5} {'hdim':>5} {'backend':>9} {'ms':>9} {'TFLOP/s':>8}")
    for r in rows:
        ms = "rejected" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "" if r["tflops"] is None else f"{r['tflops']:.1f}"
        print(f"{r['tokens']:>6} {r['heads']:>5} {r['head_dim']:>5} {r['backend']:>9} {ms:>9} {tf:>8}")


if __name__ == "__main__":
    main()
