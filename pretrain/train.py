"""The pretraining loop of every stage (ViTa Stage I MAE, Stage II image-tabular CLIP, MetaCLIP-CMR), DeepSpeed
ZeRO 0-3, one file that reads top to bottom.

    torchrun --nproc_per_node 2 -m pretrain train --config configs/pretrain/vita_stage1_tiny.yaml
    deepspeed --num_gpus 8 --module pretrain train --config configs/pretrain/vita_stage1.yaml
    srun python -m pretrain train --config ...        (SLURM, one task per GPU)
    python -m pretrain train --config ...             (one process)

Everything that decides what the run computes is saved in the checkpoint and restored together: model,
optimizer and scheduler (DeepSpeed), step and samples seen, every rank's loader position, RNG states, the
resolved config. Masking noise comes from a generator seeded by (seed, step, micro-step, rank), so a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.cli import eta
from core.config import ConfigError, dump_config, flat_config, project_path, save_resolved_config
from core.fsutil import atomic_write_text
from core.manifest import Manifest
from pretrain import checkpoint
from pretrain.config import PretrainConfig
from pretrain.dist import init_distributed
from pretrain.models.vit import compile_blocks, num_tokens, sdpa_backend_report
from pretrain.schedule import warmup_cosine
from pretrain.stages import Stage, get_stage

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: ZeRO tuning from configs/deepspeed/zero<N>.json, everything else from `cfg`."""
    t = cfg.train
    accumulation = t.accumulation_steps(world_size)
    path = project_path(Path(t.deepspeed_dir) / f"zero{t.zero_stage}.json")  # the project's, from any directory
    ds = json.loads(path.read_text())
    ds["zero_optimization"]["stage"] = t.zero_stage
    ds.update({"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
               "gradient_accumulation_steps": accumulation, "gradient_clipping": cfg.optim.grad_clip,
               "bf16": {"enabled": t.precision == "bf16"}, "steps_per_print": 10**9, "wall_clock_breakdown": False})
    return ds


def _generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The random stream of one micro-step on one rank (masking, tabular corruption)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 131 + rank)


def lr_lambda(cfg: PretrainConfig, steps_per_epoch: int):
    """Linear warm-up over `warmup_epochs`, then cosine to 0 over the rest of the run (or constant)."""
    return warmup_cosine(cfg.optim.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                         constant=cfg.optim.schedule == "constant")


def evaluate(cfg: PretrainConfig, stage: Stage, model: torch.nn.Module, manifest: Manifest, device: torch.device,
             dtype: torch.dtype, cache: dict) -> dict:
    """Collective: the stage's validation (`Stage.evaluate`) on the evaluation split, in eval mode, with its
    deterministic transform and at most `eval_samples` samples over all ranks."""
    from pretrain.data import list_shards

    shards = list_shards(cfg.data.dataset, cfg.train.eval_split, manifest)
    if not shards:
        return {}
    limit = -(-cfg.train.eval_samples // dist.get_world_size())
    was_training = model.training
    model.eval()
    try:
        return stage.evaluate(cfg, model, manifest, shards, stage.transform(cfg, manifest, train=False), limit,
                              device, dtype, cache)
    finally:
        model.train(was_training)


def param_groups(model: torch.nn.Module, weight_decay: float, encoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: biases and norms without weight decay (MAE); with `encoder_lr_scale` != 1 the image encoder's
    (`encoder.*`) learning rate is that fraction of the others' (a contrastive stage started from a Stage I export:
    < 1 keeps more of what Stage I learnt). The others come first: their lr is the one logged."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_encoder = encoder_lr_scale != 1.0 and name.startswith("encoder.")
            groups.setdefault((is_encoder, p.ndim >= 2), []).append(p)  # ndim < 2: biases, norms
    out = []
    for (is_encoder, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if is_encoder:
            group["lr_scale"] = encoder_lr_scale
        out.append(group)
    return out


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, world: int, steps_per_epoch: int,
                 universal: bool = False):
    """The DeepSpeed engine a run trains with: AdamW over `param_groups`, the warm-up + cosine schedule, ZeRO as
    configured. `universal`: the checkpoint to resume from was saved on another number of ranks, so the engine loads
    its universal conversion (`checkpoint.load`)."""
    import deepspeed  # (slow to import: only where an engine is built)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.encoder_lr_scale)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  **({"fused": True} if cfg.optim.fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    ds_config = deepspeed_config(cfg, world)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (the checkpoint resumed from) from metrics.jsonl, atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            pass
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
        print(f"[pretrain] {path}: {len(lines) - len(keep)} rows after step {step} dropped (they are rerun)",
              flush=True)


def _test_hold() -> tuple[int, Path] | None:
    """Fault injection (tests): CMRFM_HOLD_AT_STEP=<step>:<release file> holds every rank after that step's log
    line until a stop signal arrives or the file exists, so a test's signal lands at a known step whatever the
    machine's speed (like CMRFM_KILL_IN_SAVE in `checkpoint.save`). Read once, before the loop."""
    at, _, release = os.environ.get("CMRFM_HOLD_AT_STEP", "").partition(":")
    return (int(at), Path(release)) if at else None


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 (SLURM before a timeout or preemption) and SIGINT (Ctrl-C): save at the next
    check (every 10 steps), then stop with exit code 75. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received = None
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def preflight(cfg: PretrainConfig, check_device: bool = True) -> Manifest:
    """Checks that need no GPU, Ray or DeepSpeed, run before any of them starts (and by `cluster submit` before
    anything is queued, `check_device` off there); a ConfigError line each. Returns the dataset's manifest."""
    manifest = Manifest.load(cfg.data.dataset, (get_stage(cfg.stage).dataset,), "data.dataset")
    geometry = manifest.geometry  # UK Biobank only (the k-space loader resizes on load)
    if geometry.get("crop") not in (None, cfg.model.img_size):
        raise ConfigError(f"model.img_size is {cfg.model.img_size} but {cfg.data.dataset} holds "
                          f"{geometry['crop']}-pixel images")
    if geometry.get("sa_planes") not in (None, cfg.model.sa_planes):
        raise ConfigError(f"model.sa_planes is {cfg.model.sa_planes} but {cfg.data.dataset} holds "
                          f"{geometry['sa_planes']} short-axis planes per subject")
    if cfg.checkpoint.init_from is not None and not Path(cfg.checkpoint.init_from).exists():
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from} does not exist")
    if check_device and cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda (a GPU config) but this machine has no CUDA GPU; add --allow-cpu "
                          "(or train.device=cpu) to train on the CPU")
    return manifest


def train(cfg: PretrainConfig) -> dict:
    from pretrain.data import build_loader

    manifest = preflight(cfg)
    stage = get_stage(cfg.stage)
    env = init_distributed()
    rank, world = env.rank, env.world_size
    run_dir = Path(cfg.checkpoint.dir)
    ckpt_dir = run_dir / "checkpoints"
    use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    lock = checkpoint.acquire_run_lock(run_dir, device)  # noqa: F841 (held until the process ends)
    if rank == 0:
        removed = checkpoint.sweep(ckpt_dir)
        if removed:
            print(f"[pretrain] removed what an interrupted save left in {ckpt_dir}: {', '.join(removed)}", flush=True)
        save_resolved_config(cfg, run_dir, "config.yaml")
    dist.barrier()

    # --- model, optimizer, schedule: identical initial weights on every rank ---
    torch.manual_seed(cfg.train.seed)
    model = stage.build_model(cfg, manifest, run_dir, rank)
    model.set_grad_checkpointing(cfg.train.activation_checkpointing)
    compiled = compile_blocks(model) if cfg.train.compile else 0
    loader = build_loader(cfg.data.dataset, cfg.data, rank=rank, world_size=world, batch_size=cfg.train.micro_batch,
                          seed=cfg.train.seed, frames=cfg.model.frames, transform=stage.transform(cfg, manifest, True))
    steps_per_epoch = max(1, (cfg.train.samples_per_epoch or loader.samples_per_epoch) // cfg.train.global_batch)
    total_steps = cfg.train.epochs * steps_per_epoch
    say = (lambda msg: print(f"[pretrain] {msg}", flush=True)) if rank == 0 else None
    tag = checkpoint.latest_tag(ckpt_dir, say) if cfg.checkpoint.resume == "auto" else None
    universal = checkpoint.needs_universal(ckpt_dir, tag, world)
    engine = build_engine(cfg, model, world, steps_per_epoch, universal)
    gas = engine.gradient_accumulation_steps()

    # --- resume ---
    step, samples = 0, 0
    state = checkpoint.load(engine, ckpt_dir, tag, universal)
    if state is not None:
        step, samples = state["step"], state["samples"]
        if rank == 0:  # rows a crash logged after this checkpoint are logged again by the rerun: keep one copy
            _trim_metrics(run_dir / "metrics.jsonl", step)
        loader.load_state_dict(state["mine"]["loader"] if state["mine"] else
                               {**state["per_rank"][0]["loader"], "consumed_global": samples})

    # --- logging ---
    writer, metrics = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
        metrics = open(run_dir / "metrics.jsonl", "a")
        backend = sdpa_backend_report(device, dtype, cfg.model.heads, cfg.model.dim // cfg.model.heads)
        print(f"[pretrain] {env.launcher}: world {world}, device {device}, {cfg.train.precision}, ZeRO-"
              f"{cfg.train.zero_stage}, micro {cfg.train.micro_batch} x {world} ranks x {gas} accumulation = "
              f"global {cfg.train.global_batch}"
              + (" (the contrastive batch: GradCache over the micro-steps)" if stage.contrastive and gas > 1 else "")
              + ("; the image features are batch-normalised per micro-batch of "
                 f"{cfg.train.micro_batch}, not over the global batch" if cfg.stage == "tabular_clip"
                 and cfg.tabular.image_feature_norm == "batchnorm" and cfg.train.micro_batch < cfg.train.global_batch
                 else "")
              + f"; {total_steps} steps; attention: {backend}"
              + (f"; {compiled} transformer blocks compiled" if compiled else "")
              + ("; fused AdamW" if cfg.optim.fused else "")
              + (f"; resumed from {state['tag']} at step {step}" if state else ""), flush=True)
    flops = stage.flops(cfg, model)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    tokens = num_tokens(cfg.model)
    stop = StopSignal()
    hold = _test_hold()
    quality = stage.quality
    batches = iter(loader)
    eval_cache: dict = {}
    t_last, wait, n_last = time.perf_counter(), 0.0, 0
    t_start, step_start = t_last, step  # the ETA: this process's pace (a resumed run counts from its resume)
    last_loss = float("nan")  # the last logged loss, for TensorBoard's hparams view

    # --- the loop ---
    while step < total_steps:
        micro_inputs = []
        for _ in range(gas):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            micro_inputs.append(stage.inputs(cfg, batch, device, dtype))
        # a fresh generator per micro-step (masks, corruption), the same whenever asked again
        generators = [functools.partial(_generator, cfg.train.seed, step, micro, rank) for micro in range(gas)]
        outs = stage.train_step(engine, micro_inputs, generators, world, device)
        losses = [o["loss"].detach().float() for o in outs]
        psnrs = [o[quality].detach().float() for o in outs]
        inputs, out = micro_inputs[-1], outs[-1]
        step += 1
        samples += cfg.train.global_batch
        if rank == 0 and cfg.train.image_every and step % cfg.train.image_every == 0:
            stage.log_images(writer, step, engine.module, inputs, out)
        if step % cfg.train.log_every == 0 or step == total_steps:
            stats = torch.stack([torch.stack(losses).mean(), torch.stack(psnrs).mean()]).to(device)
            dist.all_reduce(stats)
            stats /= world
            now = time.perf_counter()
            sps = (samples - n_last) / (now - t_last)
            row = {"step": step, "samples": samples, "loss": stats[0].item(), quality: stats[1].item(),
                   "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "samples_per_s": sps, "tokens_per_s": sps * tokens, "data_wait": wait / (now - t_last),
                   "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
                   "mfu": (flops * sps / (peak * world)) if peak and flops else None}
            t_last, wait, n_last, last_loss = now, 0.0, samples, row["loss"]
            if rank == 0:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                for k, v in row.items():
                    if v is not None and k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                print(f"[pretrain] step {step}/{total_steps} loss {row['loss']:.4f} {quality} {row[quality]:.3f} "
                      f"lr {row['lr']:.2e} {sps:.1f} samples/s data-wait {100 * row['data_wait']:.0f}%"
                      + (f" mfu {100 * row['mfu']:.1f}%" if row["mfu"] else "")
                      + f" {eta(now - t_start, step - step_start, total_steps - step_start)}".rstrip(), flush=True)
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total_steps):
            val = evaluate(cfg, stage, engine.module, manifest, device, dtype, eval_cache)
            if rank == 0 and val:
                metrics.write(json.dumps({"step": step, "samples": samples, "split": "val", **val}) + "\n")
                metrics.flush()
                for k, v in val.items():
                    if k not in ("n", "sentences"):  # counts, not curves (they stay in metrics.jsonl)
                        writer.add_scalar(f"val/{k}", v, step)
                print(f"[pretrain] step {step} validation: " + " ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()), flush=True)
        if hold is not None and step == hold[0]:
            while not stop.received and not hold[1].exists():
                time.sleep(0.05)
        # every 10 steps (not every step: the all-reduce is a device sync); all ranks decide alike
        signalled = step % 10 == 0 and stop.any_rank(device)
        if step % cfg.checkpoint.every_steps == 0 or step == total_steps or signalled:
            checkpoint.save(engine, ckpt_dir, step, {"samples": samples, "config": dump_config(cfg)},
                            {"loader": loader.state_dict()}, cfg.checkpoint.keep)
        if signalled:
            if rank == 0:
                print(f"[pretrain] {stop.received or 'signal'}: checkpoint saved at step {step}, stopping", flush=True)
            break
    if rank == 0:
        writer.add_hparams(flat_config(cfg), {"hparam/loss_last": last_loss}, run_name="hparams")
        writer.close()
        metrics.close()
    dist.barrier()
    return {"step": step, "samples": samples, "stopped": stop.received}
