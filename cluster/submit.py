"""Submitting a job: a job config + a cluster config -> a job folder and a submitit job (or the sbatch script).

`python -m cluster submit ...` is a thin command line over this module; a script or a notebook calls it directly::

    from cluster.submit import plan_pretrain, resolve_slurm, submit
    slurm = resolve_slurm("configs/cluster/slurm_multinode.yaml", "pretrain", ["nodes=2", "partition=gpu"])
    plan = plan_pretrain("configs/pretrain/vita_stage1.yaml", ["data.dataset=data/ukb"], slurm)
    print(plan.script())          # what --dry-run prints
    record = submit(plan)         # cluster.launch.JobRecord: job id, job folder, run directory

A plan checks everything that can be checked before anything is queued (the configs, the batch against the
world size, and unless told otherwise the dataset, the geometry and the paths); `submit` writes the job folder
(cluster.yaml, config.yaml, run_dir.txt) and submits.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cluster import launch
from cluster.config import SlurmConfig
from cluster.jobs import DataPrepJob, FinetuneJob, PretrainJob
from core.config import ConfigError, load_config, save_resolved_config


# ----------------------------------------------------------------------------------------------- cluster config
def kind_defaults(kind: str, base: SlurmConfig) -> list[str]:
    """Overrides a job kind implies, below the command line's flags: fine-tuning is one task on one GPU (or CPU),
    data prep one Ray node per SLURM node without GPUs."""
    if kind == "finetune":
        return ["nodes=1", "tasks_per_node=1", f"gpus_per_node={min(1, base.gpus_per_node)}"]
    if kind == "data_prep":
        return ["tasks_per_node=1", "gpus_per_node=0"]
    return []


def resolve_slurm(path: Optional[str | Path], kind: str, overrides: Sequence[str] = ()) -> SlurmConfig:
    """The cluster config of a `kind` job: the YAML at `path` (None: defaults), the kind's defaults, then
    `overrides` (KEY=VALUE, later ones win)."""
    base = load_config(SlurmConfig, path, [])
    cfg = load_config(SlurmConfig, path, kind_defaults(kind, base) + list(overrides))
    if kind == "finetune" and (cfg.nodes != 1 or cfg.ntasks_per_node != 1 or cfg.gpus_per_node > 1):
        raise ConfigError(f"finetune runs one task on one GPU (got nodes={cfg.nodes}, tasks_per_node="
                          f"{cfg.ntasks_per_node}, gpus_per_node={cfg.gpus_per_node}); use --sweep for more runs")
    return cfg


# ------------------------------------------------------------------------------------------------------ sweeps
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


def expand_sweep(specs: Sequence[str]) -> list[list[str]]:
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


def sweep_tag(overrides: Sequence[str]) -> str:
    """A folder name for one sweep point: task.name=phenotypes seed=0 -> task.name-phenotypes_seed-0."""
    def one(ov: str) -> str:
        key, _, value = ov.partition("=")
        return f"{key}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', value).strip('-')}"

    return "_".join(one(ov) for ov in overrides) or "run"


# ------------------------------------------------------------------------------------------------------- plans
@dataclass
class JobPlan:
    """A job ready to submit: where it goes, what it runs, and the callables submitit pickles (built by
    `make_jobs` from the written job folder, one per array task)."""

    kind: str  # pretrain | finetune | data_prep
    slurm: SlurmConfig
    folder: Path
    run_dir: str
    job_name: str
    job_config: Any  # saved as <folder>/config.yaml
    make_jobs: Callable[["JobPlan"], list[Callable]]
    sweep: list[tuple[list[str], Any]] = field(default_factory=list)  # (overrides, config) per array task

    @property
    def env(self) -> dict[str, str]:
        return launch.env_for(self.slurm, self.kind)

    @property
    def array(self) -> int:
        """Array tasks (0: a plain job)."""
        return len(self.sweep) if len(self.sweep) > 1 else 0

    def script(self) -> str:
        """What would be submitted: the sbatch script, or the local executor's command and setup lines."""
        setup = launch.setup_lines(self.slurm, self.env)
        if launch.executor_name(self.slurm) == "local":
            return "\n".join([f"# local executor: {self.slurm.ntasks_per_node} task(s) of "
                              f"`{launch.submitit_command(self.folder)}`, time limit {self.slurm.time_min} min, "
                              f"SIGUSR2 {self.slurm.signal_delay_s} s before it"]
                             + [f"# setup: {line}" for line in setup]) + "\n"
        return launch.sbatch_script(self.slurm, self.folder, self.job_name, setup, array=self.array)


def _job_name(slurm: SlurmConfig, default: str) -> str:
    return slurm.name or default


def plan_pretrain(config: Optional[str | Path], overrides: Sequence[str], slurm: SlurmConfig,
                  check: bool = True) -> JobPlan:
    """Multi-node DeepSpeed pretraining, one task per GPU. `check`: the dataset, geometry and paths now (not the
    GPU: a login node may have none); off for a job chained after the conversion that writes its dataset."""
    from pretrain.config import PretrainConfig  # lazy: torch and DeepSpeed only for a pretraining job
    from pretrain.train import preflight

    cfg = load_config(PretrainConfig, config, list(overrides))
    try:
        cfg.train.accumulation_steps(slurm.nodes * slurm.ntasks_per_node,
                                     f" ({slurm.nodes} nodes x {slurm.ntasks_per_node} tasks)")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if check:
        preflight(cfg, check_device=False)

    def jobs(plan: JobPlan) -> list[Callable]:
        return [PretrainJob(cfg, str(plan.folder), slurm.max_requeues, cpu=slurm.gpus_per_node == 0, env=plan.env,
                            port=slurm.master_port)]

    return JobPlan("pretrain", slurm, launch.new_job_folder(slurm, "pretrain"), str(Path(cfg.checkpoint.dir).absolute()),
                   _job_name(slurm, "cmrfm-pretrain"), cfg, jobs)


def plan_finetune(config: Optional[str | Path], overrides: Sequence[str], slurm: SlurmConfig,
                  sweep: Sequence[str] = ()) -> JobPlan:
    """Fine-tuning on one GPU; `sweep` (KEY=V1,V2 each): a job array over the cartesian product, each point
    writing to out=<out>/<KEY-VALUE...>."""
    from finetune.config import FinetuneConfig  # lazy: torch only for a fine-tuning job

    base = load_config(FinetuneConfig, config, list(overrides))
    points = []
    for point in expand_sweep(sweep):
        extra = [f"out={Path(base.out) / sweep_tag(point)}"] if sweep else []
        points.append((point, load_config(FinetuneConfig, config, list(overrides) + point + extra)))

    def jobs(plan: JobPlan) -> list[Callable]:
        if not sweep:
            return [FinetuneJob(str(plan.folder / "config.yaml"), env=plan.env)]
        return [FinetuneJob(str(save_resolved_config(c, plan.folder / "sweep", f"{i:03d}_{sweep_tag(point)}.yaml")),
                            env=plan.env) for i, (point, c) in enumerate(points)]

    return JobPlan("finetune", slurm, launch.new_job_folder(slurm, "finetune"), str(Path(base.out).absolute()),
                   _job_name(slurm, "cmrfm-finetune"), base, jobs, sweep=points if sweep else [])


def plan_data_prep(dataset: str, config: Optional[str | Path], overrides: Sequence[str],
                   slurm: SlurmConfig) -> JobPlan:
    """A Ray cluster over the allocation runs `python -m data_prep <dataset>` (ukb | kspace)."""
    module = import_module(f"data_prep.{dataset}.job")  # the source's job module names its config
    cfg = load_config(module.JOB_CONFIG, config, list(overrides))
    if cfg.src is None:
        raise ConfigError("src is not set: the raw source directory (--src or src=...)")
    for key, path in (("src", cfg.src), ("tabular", getattr(cfg, "tabular", None))):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{key} {path}: no such file or directory")

    def jobs(plan: JobPlan) -> list[Callable]:
        return [DataPrepJob(dataset, str(plan.folder / "config.yaml"), str(plan.folder), cpus=slurm.cpus_per_task,
                            ray_port=slurm.ray_port, env=plan.env)]

    return JobPlan("data_prep", slurm, launch.new_job_folder(slurm, "data_prep"), str(Path(cfg.job.out).absolute()),
                   _job_name(slurm, f"cmrfm-data-{dataset}"), cfg, jobs)


def submit(plan: JobPlan) -> launch.JobRecord:
    """Write the job folder (cluster.yaml, config.yaml, run_dir.txt) and submit the plan's job (or job array)."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    save_resolved_config(plan.slurm, plan.folder, "cluster.yaml")
    save_resolved_config(plan.job_config, plan.folder, "config.yaml")
    (plan.folder / "run_dir.txt").write_text(plan.run_dir + "\n")
    run_dirs = [str(Path(c.out).absolute()) for _, c in plan.sweep]
    return launch.submit(plan.slurm, plan.kind, plan.folder, plan.make_jobs(plan), plan.job_name, plan.env,
                         plan.run_dir, run_dirs)
