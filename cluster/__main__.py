"""python -m cluster — run cmrfm on SLURM through submitit: multi-node pretraining, Ray data prep on
an allocation, single-GPU fine-tuning, with timeout / preemption requeue and automatic resume.

The command line only: what a submission does is `cluster.submit` (callable from Python), the jobs themselves
`cluster.jobs`, the scheduler side `cluster.launch`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cluster import launch
from cluster.config import SlurmConfig, format_minutes, time_warning
from cluster.submit import JobPlan, plan_data_prep, plan_finetune, plan_pretrain, resolve_slurm, submit
from core.cli import add_config_arguments, add_show_config_command, cli_parser, run_cli
from core.config import load_config

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


# ----------------------------------------------------------------------------------------------------- submit
def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(job overrides, SlurmConfig overrides): `slurm.KEY=VALUE` goes to the cluster config."""
    job, slurm = [], []
    for ov in overrides:
        (slurm.append(ov[len("slurm."):]) if ov.startswith("slurm.") else job.append(ov))
    return job, slurm


def slurm_config(args: argparse.Namespace, kind: str, slurm_overrides: list[str]) -> SlurmConfig:
    """The cluster config from --slurm-config, the resource flags, then `slurm.KEY=VALUE` overrides."""
    flags = [f"{key}={getattr(args, key)}" for _, key, _, _ in FLAGS if getattr(args, key) is not None]
    return resolve_slurm(args.slurm_config, kind, flags + slurm_overrides)


def _plan_pretrain(args, overrides: list[str], slurm: SlurmConfig) -> JobPlan:
    return plan_pretrain(args.config, overrides, slurm, check=not args.skip_checks)


def _plan_finetune(args, overrides: list[str], slurm: SlurmConfig) -> JobPlan:
    return plan_finetune(args.config, overrides, slurm, args.sweep or [])


def _plan_data_prep(args, overrides: list[str], slurm: SlurmConfig) -> JobPlan:
    flags = {"src": args.src, "job.out": args.out, "tabular": args.tabular}
    return plan_data_prep(args.dataset, args.config, overrides + [f"{k}={v}" for k, v in flags.items()
                                                                  if v is not None], slurm)


def _submit(args) -> int:
    job_overrides, slurm_overrides = split_overrides(list(args.overrides))
    plan = args.plan(args, job_overrides, slurm_config(args, args.kind, slurm_overrides))
    scfg = plan.slurm
    if args.dry_run:
        for point, c in plan.sweep:
            print(f"# array task: {' '.join(point)} -> out={c.out}", file=sys.stderr)
        print(plan.script(), end="")
        print(f"[cluster] dry run: nothing submitted; the job folder would be {plan.folder}, the run directory "
              f"{plan.run_dir}" + (f", {plan.array} array tasks" if plan.array else ""), file=sys.stderr)
        if time_warning(scfg.time):
            print(f"[cluster] {time_warning(scfg.time)}", file=sys.stderr)
        return 0
    rec = submit(plan)
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
    p.set_defaults(func=_submit, plan=_plan_pretrain)
    p = kinds.add_parser("finetune", help="fine-tuning on one GPU; --sweep: a job array",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_submit_flags(p)
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                   help="one job per value (repeat: the cartesian product), each with out=<out>/<KEY-VALUE...>")
    add_config_arguments(p, "configs/finetune/vita_phenotypes.yaml")
    p.set_defaults(func=_submit, plan=_plan_finetune)
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
        p.set_defaults(func=_submit, plan=_plan_data_prep, tabular=None)


# ------------------------------------------------------------------------------------------ status, logs, cancel
def _root(args) -> Path:
    if args.folder:
        return Path(args.folder)
    return load_config(SlurmConfig, args.slurm_config, []).root


def _status(args) -> int:
    st = launch.status(launch.find_job(args.job, _root(args)))
    print(json.dumps(st, indent=1, default=str) if args.json else launch.format_status(st))
    return 0


def _logs(args) -> int:
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
