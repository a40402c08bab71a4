"""Data-prep throughput and footprint: subjects/s with 1 and 2 Ray workers (parallel efficiency), and bytes per
subject in each format (WebDataset shards, Zarr store) against the source NIfTI.

    python bench/dataprep_throughput.py [--subjects 16] [--workers 1 2] [--cohort DIR] [--out bench/results/data_prep.json]

Each conversion runs as its own `python -m data_prep ukb` process into a fresh directory; the rate is taken from
the manifest's `seconds_convert` (Ray start-up excluded, reported separately). Both runs convert the same
cohort on the same machine, so their ratio holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.fsutil import dir_bytes

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cohort", type=Path, help="an existing synthetic cohort (default: generate one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/data_prep.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cmrfm-bench-"))
    try:
        cohort = args.cohort
        if cohort is None:
            cohort = tmp / "cohort"
            subprocess.run([sys.executable, "-m", "data_prep", "synth", "--out", str(cohort), "--subjects",
                            str(args.subjects), "--kspace-scans", "0", "--quiet"], check=True, cwd=ROOT)
        src = cohort / "ukb"
        n_src = len([d for d in src.iterdir() if d.is_dir()])
        rows = []
        for w in args.workers:
            out = tmp / f"out-w{w}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "data_prep", "ukb", "--src", str(src), "--tabular",
                            str(cohort / "ukb_tabular.csv"), "--out", str(out), "--workers", str(w), "--quiet",
                            "job.block_size=8"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            m = json.loads((out / "manifest.json").read_text())
            run = m["runs"][-1]
            n = run["counts"]["written"]
            rows.append({"workers": w, "subjects": n, "seconds_convert": run["seconds_convert"],
                         "seconds_wall": round(wall, 2), "subjects_per_s": n / run["seconds_convert"],
                         "shard_bytes_per_subject": sum(s["bytes"] for s in m["shards"]) / n,
                         "zarr_bytes_per_subject": dir_bytes(out / "store.zarr") / n})
        base = rows[0]["subjects_per_s"] / rows[0]["workers"]
        for r in rows:
            r["parallel_efficiency"] = r["subjects_per_s"] / (base * r["workers"])
        result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
                  "source_nifti_bytes_per_subject": dir_bytes(src) / n_src, "runs": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        mib = 2**20
        print(f"{result['machine']}; {n_src} synthetic subjects; source NIfTI "
              f"{result['source_nifti_bytes_per_subject'] / mib:.1f} MiB/subject")
        print(f"{'workers':>7} {'subj/s':>7} {'efficiency':>10} {'convert s':>9} {'wall s':>7} {'shards MiB/subj':>15} "
              f"{'zarr MiB/subj':>13}")
        for r in rows:
            print(f"{r['workers']:>7} {r['subjects_per_s']:>7.2f} {r['parallel_efficiency']:>10.2f} "
                  f"{r['seconds_convert']:>9.1f} {r['seconds_wall']:>7.1f} {r['shard_bytes_per_subject'] / mib:>15.2f} "
                  f"{r['zarr_bytes_per_subject'] / mib:>13.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
