"""Seconds from launch to the first training step, fresh against resumed, with the real trainer: tiny ViTa Stage I
(configs/pretrain/vita_stage1_tiny.yaml) under torchrun on CPU ranks (DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1,
as tests/test_pretrain.py runs it), on the tiny cohort converted as the tests' `shards` fixture does. Per repeat:

  fresh, 2 ranks     a new run to step 4 (checkpoint at step 4: the resume point of the next runs)
  resume, 2 -> 2     a copy of that run resumed on 2 ranks (DeepSpeed load of the ZeRO-2 checkpoint), to step 6
  fresh, 1 rank      a new run on 1 rank (the baseline of the next one)
  resume, 2 -> 1     a copy resumed on 1 rank: `pretrain.checkpoint.to_universal` converts the checkpoint with
                     DeepSpeed's ds_to_universal (a subprocess), then the universal checkpoint is loaded

Timed from outside (wall clock of this process): launch -> the header line `[pretrain] ...: world N ...` (printed
after the checkpoint is loaded) -> the first `[pretrain] step N/...` line (the tiny config logs every step).
Timed inside each rank by a probe (default; `--plain` runs the bare `-m pretrain train` instead): the trainer
runs unchanged (`pretrain.__main__.main`), with timers wrapped around `init_distributed`, `deepspeed.initialize`,
`pretrain.checkpoint.load` (and `to_universal` inside it) and the loader's first batch, and the process start time
from /proc. The resume cost from outside is the difference of launch -> first step between a resume and the fresh
run on the same number of ranks; from inside it is the `checkpoint.load` time. Each variant runs `--repeats`
times (interleaved); the fastest run (per phase: the shortest) is reported, all are in the JSON.

    python bench/resume.py [--dataset DIR] [--repeats 2] [--plain] [--out bench/results/resume.json] [--no-markdown]

--dataset: a converted tiny dataset (default: built here: `python -m data_prep synth --config
configs/data_prep/synth_tiny.yaml`, then the UK Biobank job in-process on a local 2-CPU Ray cluster with
UKBPreprocessConfig(sa_planes=3, crop=32), block size 1, everything in the training split). Writes the JSON and
the "## Resume" section of BENCHMARKS.md. A tiny model: the figures are the fixed costs of starting (imports,
process group, DeepSpeed engine) and of loading / converting a checkpoint, not of moving paper-scale weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import update_benchmarks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/pretrain/vita_stage1_tiny.yaml"
SECTION = "## Resume"
PROBE_ENV = "CMRFM_BENCH_RESUME_PROBE"
HEADER_RE = re.compile(r"\[pretrain\] .*: world (\d+)")
STEP_RE = re.compile(r"\[pretrain\] step (\d+)/(\d+)")


# --- the probe: runs inside each rank (torchrun ... bench/resume.py _probe train ...) -----------------------------
def _process_start() -> float | None:
    """This process's start time (epoch seconds) from /proc, or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def probe_main(argv: list[str]) -> int:
    """The unchanged trainer, with wall-clock stamps of its start-up phases written to $PROBE/rank<R>.json."""
    events: dict[str, float] = {"module_start": time.time()}
    start = _process_start()
    if start is not None:
        events["process_start"] = start
    out = Path(os.environ[PROBE_ENV]) / f"rank{os.environ.get('RANK', '0')}.json"

    def stamp(name: str) -> None:
        events[name] = time.time()
        out.write_text(json.dumps(events))

    def timed(obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def wrapper(*a, **kw):
            stamp(f"{name}_start")
            try:
                return fn(*a, **kw)
            finally:
                stamp(f"{name}_end")

        setattr(obj, attr, wrapper)

    sys.path.insert(0, str(ROOT))
    import deepspeed

    import pretrain.__main__ as cli
    import pretrain.checkpoint
    import pretrain.data
    import pretrain.train

    stamp("imported")
    timed(pretrain.train, "init_distributed", "init_distributed")
    timed(deepspeed, "initialize", "deepspeed_initialize")
    timed(pretrain.checkpoint, "load", "checkpoint_load")
    timed(pretrain.checkpoint, "to_universal", "to_universal")
    batches = pretrain.data.ResumableLoader._batches

    def first_batch(self, generation):
        it = batches(self, generation)
        yield next(it)
        stamp("first_batch")
        yield from it

    pretrain.data.ResumableLoader._batches = first_batch
    try:
        return cli.main(argv)
    finally:
        stamp("exit")


# --- the driver -------------------------------------------------------------------------------------------------
def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    e.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    return e


def build_dataset(tmp: Path) -> tuple[Path, dict]:
    """The tests' `shards` fixture: the tiny cohort through the real UK Biobank job at the tiny model's size."""
    cohort = tmp / "cohort"
    cmd = [sys.executable, "-m", "data_prep", "synth", "--config", str(ROOT / "configs/data_prep/synth_tiny.yaml"),
           "--out", str(cohort), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    t_synth = time.perf_counter() - t0
    import ray

    from data_prep.engine import JobConfig
    from data_prep.ukb.job import UKBJobConfig, run
    from data_prep.ukb.preprocess import UKBPreprocessConfig

    out = tmp / "shards"
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        cfg = UKBJobConfig(src=cohort / "ukb", tabular=cohort / "ukb_tabular.csv",
                           features=ROOT / "configs/data_prep/ukb_features.yaml",
                           job=JobConfig(out=out, block_size=1, workers=2, val_fraction=0.0, test_fraction=0.0),
                           preprocess=UKBPreprocessConfig(sa_planes=3, crop=32))
        report, _ = run(cfg, progress=False)
    finally:
        ray.shutdown()
    return out, {"synth_cmd": " ".join(cmd[1:]), "synth_s": round(t_synth, 1),
                 "convert": "UKBJobConfig(block_size=1, workers=2, val/test 0, UKBPreprocessConfig(sa_planes=3, "
                            "crop=32)) on a local 2-CPU Ray cluster", "convert_s": round(time.perf_counter() - t0, 1),
                 "written": report.counts["written"]}


def launch(run_dir: Path, dataset: Path, nproc: int, overrides: list[str], probe: Path | None,
           timeout: float) -> dict:
    """One trainer run; wall-clock stamps of its console lines as they stream."""
    target = [str(Path(__file__).resolve()), "_probe"] if probe else ["-m", "pretrain"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
           "train", "--config", str(TINY), f"checkpoint.dir={run_dir}", f"data.dataset={dataset}", *overrides]
    e = env()
    if probe:
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir(parents=True)
        e[PROBE_ENV] = str(probe)
    t_launch = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1, start_new_session=True)
    killer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    killer.start()
    t_header = t_step = None
    first_step, header, lines = None, "", []
    try:
        for line in p.stdout:
            now = time.time()
            lines.append(line)
            if t_header is None and HEADER_RE.search(line):
                t_header, header = now, line.strip()
            m = STEP_RE.search(line)
            if t_step is None and m:
                t_step, first_step = now, int(m.group(1))
        p.wait()
    finally:
        killer.cancel()
    t_end = time.time()
    if p.returncode != 0 or t_step is None:
        raise RuntimeError(f"run failed (rc {p.returncode}): {' '.join(cmd)}\n{''.join(lines[-60:])}")
    row = {"cmd": " ".join([Path(cmd[0]).name, *cmd[1:]]), "nproc": nproc, "header": header,
           "first_step": first_step, "launch_to_header_s": round(t_header - t_launch, 2),
           "launch_to_first_step_s": round(t_step - t_launch, 2), "header_to_first_step_s": round(t_step - t_header, 2),
           "run_wall_s": round(t_end - t_launch, 2)}
    if probe:
        row["probe"] = probe_phases(probe, t_launch)
    return row


def probe_phases(probe: Path, t_launch: float) -> dict:
    """Seconds since launch of each rank's phases, and their durations (rank 0, and the max over ranks)."""
    ranks = [json.loads(f.read_text()) for f in sorted(probe.glob("rank*.json"))]
    per = []
    for ev in ranks:
        d = {}
        if "process_start" in ev:
            d["process_start_s"] = round(ev["process_start"] - t_launch, 2)
        d["imports_done_s"] = round(ev["imported"] - t_launch, 2)
        for name in ("init_distributed", "deepspeed_initialize", "checkpoint_load", "to_universal"):
            if f"{name}_end" in ev:
                d[f"{name}_s"] = round(ev[f"{name}_end"] - ev[f"{name}_start"], 3)
        if "first_batch" in ev:
            d["first_batch_at_s"] = round(ev["first_batch"] - t_launch, 2)
        per.append(d)
    keys = sorted({k for d in per for k in d})
    return {"ranks": per, "max": {k: max(d[k] for d in per if k in d) for k in keys}}


# --- the report -------------------------------------------------------------------------------------------------
VARIANTS = [("fresh2", "fresh, 2 ranks"), ("resume2", "resume 2 -> 2 ranks"), ("fresh1", "fresh, 1 rank"),
            ("resume1", "resume 2 -> 1 rank (universal)")]


def summarise(rows: list[dict]) -> dict:
    out = {}
    for v, _ in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        best = min  # a shared machine only ever slows a run down: the fastest run is the best estimate
        s = {"runs": len(rs), "first_step": rs[0]["first_step"],
             "launch_to_first_step_s": best([r["launch_to_first_step_s"] for r in rs]),
             "launch_to_header_s": best([r["launch_to_header_s"] for r in rs]),
             "header_to_first_step_s": best([r["header_to_first_step_s"] for r in rs]),
             "launch_to_first_step_all": [r["launch_to_first_step_s"] for r in rs]}
        if all("probe" in r for r in rs):
            for k in ("imports_done_s", "init_distributed_s", "deepspeed_initialize_s", "checkpoint_load_s",
                      "to_universal_s"):
                xs = [r["probe"]["max"][k] for r in rs if k in r["probe"]["max"]]
                if xs:
                    s[k] = best(xs)
        out[v] = s
    for resumed, fresh in (("resume2", "fresh2"), ("resume1", "fresh1")):
        if resumed in out and fresh in out:
            out[resumed]["vs_fresh_s"] = round(out[resumed]["launch_to_first_step_s"]
                                               - out[fresh]["launch_to_first_step_s"], 2)
    return out


def markdown(res: dict) -> str:
    m, s = res["machine"], res["summary"]
    probe = "checkpoint_load_s" in s.get("resume2", {})
    lines = [SECTION + " (`python bench/resume.py`)", "",
             f"{m['cpus']}-core CPU machine ({m['note']}; load average {m['loadavg_start'][0]:.1f} at the start, "
             f"{m['loadavg_end'][0]:.1f} at the end), torch {m['torch']}, DeepSpeed {m['deepspeed']}, "
             f"{m['date']}: tiny ViTa Stage I (`configs/pretrain/vita_stage1_tiny.yaml`, ZeRO-2, fp32) under "
             f"torchrun on CPU ranks (gloo), from launch to the first logged training step, best of "
             f"{res['repeats']} runs each (`bench/results/resume.json`; checkpoint of step 4: "
             f"{res['checkpoint_mib']:.1f} MiB, its universal conversion {res['universal_mib']:.1f} MiB):", "",
             "| run | launch to first step | launch to header (after the load) | "
             + ("imports | process group | DeepSpeed engine | `checkpoint.load` | of it ds_to_universal | "
                if probe else "") + "launch to first step minus fresh |",
             "| --- | --- | --- | " + ("--- | --- | --- | --- | --- | " if probe else "") + "--- |"]
    fmt = lambda x: "-" if x is None else f"{x:.1f} s"  # noqa: E731
    for v, label in VARIANTS:
        if v not in s:
            continue
        r = s[v]
        cells = [label + f" (step {r['first_step']})", fmt(r["launch_to_first_step_s"]), fmt(r["launch_to_header_s"])]
        if probe:
            fmt2 = lambda x: "-" if x is None else f"{x:.2f} s"  # noqa: E731
            cells += [fmt(r.get("imports_done_s")), fmt(r.get("init_distributed_s")),
                      fmt(r.get("deepspeed_initialize_s")), fmt2(r.get("checkpoint_load_s")),
                      fmt2(r.get("to_universal_s"))]
        d = r.get("vs_fresh_s")
        cells.append("-" if d is None else f"{d + 0.0:+.1f} s".replace("-0.0", "+0.0"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Imports: launch to the trainer's modules imported (torchrun, Python, torch, DeepSpeed); phases "
              "are the slowest rank's. `checkpoint.load` includes, on another number of ranks, converting the "
              "checkpoint with DeepSpeed's `ds_to_universal` (a separate Python process, once per checkpoint; a "
              "second resume from the same checkpoint reuses it). The tiny model's checkpoint is small, so "
              "these are fixed costs; at paper scale the load adds reading the ZeRO shards (and the conversion "
              "rewrites every parameter's fp32 and optimizer state)."
              if probe else "Timed from outside only (`--plain`)."]
    spread = max((max(r["launch_to_first_step_all"]) - min(r["launch_to_first_step_all"]) for r in s.values()),
                 default=0.0)
    if res["repeats"] > 1:
        lines += ["", f"Every column is the fastest of its runs, separately. Runs of the same variant differed by up "
                  f"to {spread:.1f} s here (launch to first step), so an outside difference smaller than that is "
                  f"noise" + ("; the inside `checkpoint.load` time is the resume's own cost." if probe else ".")]
    if res.get("notes"):
        lines += ["", res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, help="a converted tiny dataset (default: built as the tests do)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (the fastest is reported)")
    ap.add_argument("--plain", action="store_true", help="run `-m pretrain train` bare: outside timing only")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per trainer run")
    ap.add_argument("--note", default="shared with concurrent test runs",
                    help="how the machine was loaded (goes into the table's caption)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/resume.json")
    ap.add_argument("--no-markdown", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from core.fsutil import dir_bytes

    tmp = Path(tempfile.mkdtemp(prefix="cmrfm-resume-"))
    try:
        load0 = os.getloadavg()
        made = {}
        dataset = args.dataset
        if dataset is None:
            dataset, made = build_dataset(tmp)
            print(f"built the tiny dataset: synth {made['synth_s']} s, convert {made['convert_s']} s "
                  f"({made['written']} subjects)", flush=True)
        first = ["train.epochs=2", "train.samples_per_epoch=16", "checkpoint.every_steps=4"]  # 4 steps, ckpt at 4
        more = ["train.epochs=3", "train.samples_per_epoch=16", "checkpoint.every_steps=4"]  # resume: steps 5, 6
        pristine = tmp / "pristine"
        rows, sizes = [], {}

        def go(variant: str, run_dir: Path, nproc: int, overrides: list[str], rep: int) -> None:
            r = launch(run_dir, dataset, nproc, overrides, None if args.plain else tmp / "probe", args.timeout)
            r.update(variant=variant, repeat=rep)
            rows.append(r)
            extra = ""
            if "probe" in r:
                p = r["probe"]["max"]
                extra = (f"; inside: imports {p.get('imports_done_s', 0):.1f} s, engine "
                         f"{p.get('deepspeed_initialize_s', 0):.1f} s"
                         + (f", checkpoint.load {p['checkpoint_load_s']:.2f} s" if "checkpoint_load_s" in p else "")
                         + (f" (to_universal {p['to_universal_s']:.2f} s)" if "to_universal_s" in p else ""))
            print(f"{variant:8s} rep {rep}: first step {r['first_step']} at {r['launch_to_first_step_s']:.1f} s "
                  f"(header at {r['launch_to_header_s']:.1f} s){extra}", flush=True)

        for rep in range(args.repeats):
            fresh = tmp / f"fresh2-{rep}"
            go("fresh2", fresh, 2, first, rep)
            if rep == 0:
                shutil.copytree(fresh, pristine)
                sizes["checkpoint_mib"] = dir_bytes(pristine / "checkpoints" / "step00000004") / 2**20
            for variant, nproc in (("resume2", 2), ("resume1", 1)):
                d = tmp / f"{variant}-{rep}"
                shutil.copytree(pristine, d)
                if variant == "resume1":
                    go("fresh1", tmp / f"fresh1-{rep}", 1, ["train.epochs=1", *first[1:]], rep)
                go(variant, d, nproc, more, rep)
                if variant == "resume1":
                    assert (d / "checkpoints" / "step00000004_universal").is_dir()
                    sizes["universal_mib"] = dir_bytes(d / "checkpoints" / "step00000004_universal") / 2**20
            for d in tmp.glob(f"*-{rep}"):
                shutil.rmtree(d, ignore_errors=True)
        from importlib.metadata import version

        import torch

        load1 = os.getloadavg()
        res = {"machine": {"platform": f"{platform.machine()} {platform.system()}", "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "deepspeed": version("deepspeed"),
                           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in load1],
                           "note": args.note},
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "dataset": made or str(dataset),
               "env": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"},
               "repeats": args.repeats, "probe": not args.plain,
               **{k: round(v, 2) for k, v in sizes.items()}, "summary": summarise(rows), "runs": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print()
        for v, label in VARIANTS:
            r = res["summary"].get(v)
            if r:
                print(f"{label:32s} launch->first step {r['launch_to_first_step_s']:6.1f} s (best of {r['runs']}: "
                      f"{r['launch_to_first_step_all']})"
                      + (f", vs fresh {r['vs_fresh_s']:+.1f} s" if "vs_fresh_s" in r else "")
                      + (f", checkpoint.load {r['checkpoint_load_s']:.2f} s" if "checkpoint_load_s" in r else ""))
        print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; wrote {args.out}")
        if not args.no_markdown:
            update_benchmarks(markdown(res), SECTION)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        sys.exit(probe_main(sys.argv[2:]))
    main()
