"""python -m cluster — run cmrfm on SLURM through submitit: multi-node pretraining, Ray data prep on
an allocation, single-GPU fine-tuning, with timeout / preemption requeue and automatic resume."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

from cluster.config import SlurmConfig, format_minutes, time_warning
from core.cli import add_config_arguments, add_show_config_command, cli_parser, run_cli
from core.config import ConfigError, load_config, save_resolved_config

EPILOG = """examples:
  python -m cluster submit pretrain --config configs/pretrain/vita_stage1.yaml --nodes 8 --gpus-per-node 8 \\
      --partition gpu --time 2-00 checkpoint.dir=runs/vita_stage1 data.dataset=data/ukb
  python -m cluster submit pretrain --config configs/pretrain/vita_stage1_tiny.yaml --slurm-config \\
      configs/cluster/local_cpu.yaml --gpus-per-node 0 --tasks-per-node 2 --dry-run     # print the sbatch script
  python -m cluster submit pretrain --cluster local --gpus-per-node 0 --tasks-per-node 2 --wait ...   # laptop
  python -m cluster submit finetune --config configs/finetune/vita_diseases.yaml --sweep seed=0,1,2 \\
      --sweep task.name=phenotypes,diseases encoder=runs/vita_stage2             # a 6-task job array
  python -m cluster submit data_prep ukb --src data/raw/ukb --tabular data/raw/ukb.csv --out data/ukb \\
      --nodes 4 --cpus-per-task 64                                                  # Ray over 4 nodes
  python -m cluster status 123456          (or the job folder)
  python -m cluster logs 123456 --task 1 --err
  python -m cluster cancel 123456
  python -m cluster config --config configs/cluster/slurm_multinode.yaml nodes=16 partition=gpu

`slurm.KEY=VALUE` among the overrides sets any SlurmConfig key (slurm.env={NCCL_DEBUG: INFO},
slurm.setup=['module load cuda'], slurm.max_requeues=20); the other overrides go to the job's own config.
configs/cluster/ holds a multi-node GPU job (slurm_multinode) and the one-node CPU cluster used in CI (local_cpu).
"""

# resource flags: (flag, SlurmConfig key, type, help)
FLAGS = [
    ("--cluster", "cluster", str, "executor: slurm, local (this machine), debug (in process), auto"),
    ("--nodes", "nodes", int, "nodes (pretrain, data prep)"),
    ("--gpus-per-node", "gpus_per_node", int, "GPUs per node (0: CPU, gloo)"),
    ("--tasks-per-node", "tasks_per_node", int, "tasks per node (default: one per GPU, 1 without GPUs)"),
    ("--cpus-per-task", "cpus_per_task", int, "CPUs per task (data prep: the Ray node's CPUs)"),
    ("--mem-gb", "mem_gb", int, "memory per node in GB (0: SLURM's default)"),
    ("--partition", "partition", str, "partition"),
    ("--time", "time", str, "time limit as sbatch reads it: MINUTES, MINUTES:SECONDS, H:MM:SS or D-HH[:MM[:SS]] "
                            "(48 h: 48:00:00 or 2-00; 30:00 is 30 minutes)"),
    ("--account", "account", str, "account"),
    ("--qos", "qos", str, "quality of service"),
    ("--constraint", "constraint", str, "node features (e.g. h100)"),
    ("--max-requeues", "max_requeues", int, "timeout / preemption requeues before giving up"),
    ("--signal-delay", "signal_delay_s", int, "seconds before the time limit that SIGUSR2 comes (checkpoint)"),
    ("--name", "name", str, "job name and job folder name (default: a timestamp)"),
    ("--folder", "folder", str, "root of the job folders (<folder>/<kind>/<name>/)"),
]


# ------------------------------------------------------------------------------------------------ config plumbing
def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(job overrides, SlurmConfig overrides): `slurm.KEY=VALUE` goes to the cluster config."""
    job, slurm = [], []
    for ov in overrides:
        (slurm.append(ov[len("slurm."):]) if ov.startswith("slurm.") else job.append(ov))
    return job, slurm


def kind_defaults(kind: str, base: SlurmConfig) -> list[str]:
    """Overrides a job kind implies, below the command line's flags: fine-tuning is one task on one GPU (or CPU),
    data prep one Ray node per SLURM node without GPUs."""
    if kind == "finetune":
        return ["nodes=1", "tasks_per_node=1", f"gpus_per_node={min(1, base.gpus_per_node)}"]
    if kind == "data_prep":
        return ["tasks_per_node=1", "gpus_per_node=0"]
    return []


def slurm_config(args: argparse.Namespace, kind: str, slurm_overrides: list[str]) -> SlurmConfig:
    flags = []
    for flag, key, _, _ in FLAGS:
        value = getattr(args, key)
        if value is not None:
            flags.append(f"{key}={value}")
    base = load_config(SlurmConfig, args.slurm_config, [])
    cfg = load_config(SlurmConfig, args.slurm_config, kind_defaults(kind, base) + flags + slurm_overrides)
    if kind == "finetune" and (cfg.nodes != 1 or cfg.ntasks_per_node != 1 or cfg.gpus_per_node > 1):
        raise ConfigError(f"finetune runs one task on one GPU (got nodes={cfg.nodes}, tasks_per_node="
                          f"{cfg.ntasks_per_node}, gpus_per_node={cfg.gpus_per_node}); use --sweep for more runs")
    return cfg


def _split_values(text: str) -> list[str]:
    """`a,b,[1,2],{x: 1}` -> ['a', 'b', '[1,2]', '{x: 1}']: commas inside brackets / braces / quotes stay."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    if any(v == "" for v in out):
        raise ConfigError(f"sweep values {text!r}: empty value")
    return out


def expand_sweep(specs: list[str]) -> list[list[str]]:
    """`--sweep task.name=phenotypes,diseases --sweep seed=0,1` -> the cartesian product as override lists
    (first axis slowest): [[task.name=phenotypes, seed=0], [task.name=phenotypes, seed=1], ...]; [[]] if none."""
    axes, keys = [], set()
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"malformed --sweep {spec!r}: expected section.key=v1,v2,...")
        if key in keys:
            raise ConfigError(f"--sweep {key} given twice")
        keys.add(key)
        axes.append([f"{key}={v}" for v in _split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep_tag(overrides: list[str]) -> str:
    """A folder name for one sweep point: task.name=phenotypes seed=0 -> task.name-phenotypes_seed-0."""
    def one(ov: str) -> str:
        key, _, value = ov.partition("=")
        return f"{key}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', value).strip('-')}"

    return "_".join(one(ov) for ov in overrides) or "run"


# ----------------------------------------------------------------------------------------------------- submit
def _prepare(args, kind: str):
    from cluster import launch

    job_overrides, slurm_overrides = split_overrides(list(args.overrides))
    scfg = slurm_config(args, kind, slurm_overrides)
    return launch, scfg, job_overrides, launch.new_job_folder(scfg, kind)


def _dry_run(launch, scfg: SlurmConfig, kind: str, folder: Path, env: dict, array: int, run_dir: str) -> int:
    name = launch.executor_name(scfg)
    job_name = f"cmrfm-{kind}" if not scfg.name else scfg.name
    setup = launch.setup_lines(scfg, env)
    if name == "local":
        print(f"# local executor: {scfg.ntasks_per_node} task(s) of `{launch.submitit_command(folder)}`, "
              f"time limit {scfg.time_min} min, SIGUSR2 {scfg.signal_delay_s} s before it")
        print("\n".join(f"# setup: {line}" for line in setup))
    else:
        print(launch.sbatch_script(scfg, folder, job_name, setup, array=array if array > 1 else 0), end="")
    print(f"[cluster] dry run: nothing submitted; the job folder would be {folder}, the run directory {run_dir}"
          + (f", {array} array tasks" if array > 1 else ""), file=sys.stderr)
    if time_warning(scfg.time):
        print(f"[cluster] {time_warning(scfg.time)}", file=sys.stderr)
    return 0


def _write_folder(folder: Path, scfg: SlurmConfig, job_cfg, run_dir: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_resolved_config(scfg, folder, "cluster.yaml")
    if job_cfg is not None:
        save_resolved_config(job_cfg, folder, "config.yaml")
    (folder / "run_dir.txt").write_text(run_dir + "\n")


def _finish(args, launch, rec, scfg: SlurmConfig) -> int:
    n = len(rec.element_ids)
    print(f"submitted {rec.kind} job {rec.job_id} ({rec.executor}"
          + (f", {n} array tasks" if rec.array else f", {rec.tasks} task(s)")
          + f", time limit {format_minutes(scfg.time_min)})")
    print(f"  job folder {rec.folder}")
    print(f"  run dir    {rec.run_dir}")
    if time_warning(scfg.time):
        print(f"[cluster] {time_warning(scfg.time)}", file=sys.stderr)
    if not args.wait or rec.executor == "debug":
        return 0
    t0 = time.time()
    try:
        results = launch.wait(rec, timeout_s=args.wait_timeout or float("inf"))
    except launch.JobFailed as e:
        print(f"job {rec.job_id} failed after {time.time() - t0:.0f}s: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 3
    print(f"job {rec.job_id} finished after {time.time() - t0:.0f}s")
    for el, res in results.items():
        for t, r in enumerate(res):
            print(f"  {el} task {t}: {json.dumps(r, default=str)}")
    return 0


def _submit_pretrain(args) -> int:
    from cluster.jobs import PretrainJob
    from pretrain.config import PretrainConfig

    launch, scfg, job_overrides, folder = _prepare(args, "pretrain")
    pcfg = load_config(PretrainConfig, args.config, job_overrides)
    world = scfg.nodes * scfg.ntasks_per_node
    if pcfg.train.global_batch % (pcfg.train.micro_batch * world):
        raise ConfigError(f"train.global_batch {pcfg.train.global_batch} is not a multiple of train.micro_batch x "
                          f"world size = {pcfg.train.micro_batch} x {world} ({scfg.nodes} nodes x "
                          f"{scfg.ntasks_per_node} tasks)")
    run_dir = str(Path(pcfg.checkpoint.dir).absolute())
    if not args.skip_checks:  # the dataset, the geometry and the paths, before anything is queued (not the GPU:
        from pretrain.train import preflight  # this login node may have none)

        preflight(pcfg, check_device=False)
    env = launch.env_for(scfg, "pretrain")
    if args.dry_run:
        return _dry_run(launch, scfg, "pretrain", folder, env, 0, run_dir)
    _write_folder(folder, scfg, pcfg, run_dir)
    fn = PretrainJob(pcfg, str(folder), scfg.max_requeues, cpu=scfg.gpus_per_node == 0, env=env,
                     port=scfg.master_port)
    rec = launch.submit(scfg, "pretrain", folder, [fn], scfg.name or "cmrfm-pretrain", env, run_dir)
    return _finish(args, launch, rec, scfg)


def _submit_finetune(args) -> int:
    from cluster.jobs import FinetuneJob
    from finetune.config import FinetuneConfig

    launch, scfg, job_overrides, folder = _prepare(args, "finetune")
    base = load_config(FinetuneConfig, args.config, job_overrides)
    points = expand_sweep(args.sweep or [])
    cfgs = []
    for point in points:
        extra = [f"out={Path(base.out) / sweep_tag(point)}"] if args.sweep else []
        cfgs.append((point, load_config(FinetuneConfig, args.config, job_overrides + point + extra)))
    run_dirs = [str(Path(c.out).absolute()) for _, c in cfgs]
    run_dir = str(Path(base.out).absolute())
    env = launch.env_for(scfg, "finetune")
    if args.dry_run:
        for point, c in cfgs if args.sweep else []:
            print(f"# array task: {' '.join(point)} -> out={c.out}", file=sys.stderr)
        return _dry_run(launch, scfg, "finetune", folder, env, len(cfgs), run_dir)
    _write_folder(folder, scfg, base, run_dir)
    fns = []
    for i, (point, c) in enumerate(cfgs):
        path = (save_resolved_config(c, folder / "sweep", f"{i:03d}_{sweep_tag(point)}.yaml") if args.sweep
                else folder / "config.yaml")
        fns.append(FinetuneJob(str(path), env=env))
    rec = launch.submit(scfg, "finetune", folder, fns, scfg.name or "cmrfm-finetune", env, run_dir,
                        run_dirs if args.sweep else ())
    return _finish(args, launch, rec, scfg)


def _submit_data_prep(args) -> int:
    from importlib import import_module

    from cluster.jobs import DataPrepJob

    launch, scfg, job_overrides, folder = _prepare(args, "data_prep")
    flags = {"src": args.src, "job.out": args.out, "tabular": args.tabular}
    job_overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    module = import_module(f"data_prep.{args.dataset}.job")
    dcfg = load_config(module.JOB_CONFIG, args.config, job_overrides)
    for key, path in (("src", dcfg.src), ("tabular", getattr(dcfg, "tabular", None))):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{key} {path}: no such file or directory")
    run_dir = str(Path(dcfg.job.out).absolute())
    env = launch.env_for(scfg, "data_prep")
    if args.dry_run:
        return _dry_run(launch, scfg, "data_prep", folder, env, 0, run_dir)
    _write_folder(folder, scfg, dcfg, run_dir)
    fn = DataPrepJob(args.dataset, str(folder / "config.yaml"), str(folder), cpus=scfg.cpus_per_task,
                     ray_port=scfg.ray_port, env=env)
    rec = launch.submit(scfg, "data_prep", folder, [fn], scfg.name or f"cmrfm-data-{args.dataset}", env, run_dir)
    return _finish(args, launch, rec, scfg)


def _add_submit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm-config", type=Path, metavar="PATH",
                   help="cluster config YAML (configs/cluster/*.yaml); flags and slurm.KEY=VALUE override it")
    g = p.add_argument_group("resources (override --slurm-config)")
    for flag, key, tp, help_ in FLAGS:
        kw = {"choices": ["auto", "slurm", "local", "debug"]} if key == "cluster" else {}
        g.add_argument(flag, dest=key, type=tp, help=help_, **kw)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--skip-checks", action="store_true",
                   help="queue even if the dataset or the encoder does not exist yet (a job chained after a "
                        "conversion that writes it)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and print every task's result")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="S", help="give up waiting after S seconds")


def _add_submit(sub) -> None:
    s = sub.add_parser("submit", help="submit a pretraining, fine-tuning or data prep job",
                       description="Submit a job through submitit (SLURM, or this machine with --cluster local).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = s.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = kinds.add_parser("pretrain", help="multi-node DeepSpeed pretraining, one task per GPU; requeue + resume",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_submit_flags(p)
    add_config_arguments(p, "configs/pretrain/vita_stage1_tiny.yaml")
    p.set_defaults(func=_submit_pretrain)
    p = kinds.add_parser("finetune", help="fine-tuning on one GPU; --sweep: a job array",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_submit_flags(p)
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                   help="one job per value (repeat: the cartesian product), each with out=<out>/<KEY-VALUE...>")
    add_config_arguments(p, "configs/finetune/vita_phenotypes.yaml")
    p.set_defaults(func=_submit_finetune)
    d = kinds.add_parser("data_prep", help="a Ray cluster over the allocation runs `python -m data_prep ukb|kspace`",
                         description="Start a Ray cluster inside the allocation (head on the first node, one worker "
                                     "per further node), run the conversion on it, tear it down.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets = d.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, what in (("ukb", "UK Biobank cine + tabular CSV"), ("kspace", "raw multi-coil k-space")):
        p = datasets.add_parser(name, help=f"convert {what} (python -m data_prep {name})", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--src", help="the raw source directory (config key: src)")
        if name == "ukb":
            p.add_argument("--tabular", help="the tabular CSV export (config key: tabular)")
        p.add_argument("--out", help="output directory (config key: job.out)")
        _add_submit_flags(p)
        add_config_arguments(p)
        p.set_defaults(func=_submit_data_prep, tabular=None)


# ------------------------------------------------------------------------------------------ status, logs, cancel
def _root(args) -> Path:
    if args.folder:
        return Path(args.folder)
    return load_config(SlurmConfig, args.slurm_config, []).root


def _status(args) -> int:
    from cluster import launch

    st = launch.status(launch.find_job(args.job, _root(args)))
    print(json.dumps(st, indent=1, default=str) if args.json else launch.format_status(st))
    return 0


def _logs(args) -> int:
    from cluster import launch

    rec = launch.find_job(args.job, _root(args))
    for path in launch.log_paths(rec, args.task, args.err, args.element):
        if not path.exists():
            print(f"{path}: not written yet", file=sys.stderr)
            return 1
        lines = path.read_text(errors="replace").splitlines()
        print(f"==> {path} <==", file=sys.stderr)
        print("\n".join(lines[-args.lines:] if args.lines else lines))
    return 0


def _cancel(args) -> int:
    from cluster import launch

    print(launch.cancel(launch.find_job(args.job, _root(args))))
    return 0


def _add_job_command(sub, name: str, help_: str, func):
    p = sub.add_parser(name, help=help_)
    p.add_argument("job", metavar="JOB", help="job id (123456, 123456_2) or job folder")
    p.add_argument("--folder", help="root of the job folders to look the id up in (default: the config's folder)")
    p.add_argument("--slurm-config", type=Path, metavar="PATH", help="cluster config whose folder is searched")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli_parser("python -m cluster", __doc__, EPILOG)
    _add_submit(sub)
    p = _add_job_command(sub, "status", "scheduler state, task results, requeues, checkpoint of a job", _status)
    p.add_argument("--json", action="store_true", help="machine-readable")
    p = _add_job_command(sub, "logs", "print a task's log (stdout, or --err)", _logs)
    p.add_argument("--task", type=int, default=0, help="task (rank) number (default 0)")
    p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    p.add_argument("--element", help="array element id of a sweep (default: the first)")
    p.add_argument("-n", "--lines", type=int, default=100, help="last N lines (0: all; default 100)")
    _add_job_command(sub, "cancel", "cancel a job (scancel; local: stop its controller)", _cancel)
    add_show_config_command(sub, SlurmConfig, "configs/cluster/slurm_multinode.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
