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

import json
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from core.cli import eta
from core.config import ConfigError, dump_config, flat_config, project_path, save_resolved_config
from core.fsutil import atomic_write_text
from core.manifest import Manifest
from pretrain import checkpoint
from pretrain.config import PretrainConfig
from pretrain.dist import init_distributed
from pretrain.models.precision import fp32_batchnorm
from pretrain.models.vit import MaskedAutoencoder, flops_per_sample, num_tokens, sdpa_backend_report
from pretrain.schedule import warmup_cosine

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: ZeRO tuning from configs/deepspeed/zero<N>.json, everything else from `cfg`."""
    t = cfg.train
    per_step = t.micro_batch * world_size
    if t.global_batch % per_step:
        raise ValueError(f"train.global_batch {t.global_batch} is not a multiple of micro_batch x world size "
                         f"= {t.micro_batch} x {world_size}")
    path = project_path(Path(t.deepspeed_dir) / f"zero{t.zero_stage}.json")  # the project's, from any directory
    ds = json.loads(path.read_text())
    ds["zero_optimization"]["stage"] = t.zero_stage
    ds.update({"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
               "gradient_accumulation_steps": t.global_batch // per_step, "gradient_clipping": cfg.optim.grad_clip,
               "bf16": {"enabled": t.precision == "bf16"}, "steps_per_print": 10**9, "wall_clock_breakdown": False})
    return ds


def lr_lambda(cfg: PretrainConfig, steps_per_epoch: int):
    """Linear warm-up over `warmup_epochs`, then cosine to 0 over the rest of the run (or constant)."""
    return warmup_cosine(cfg.optim.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                         constant=cfg.optim.schedule == "constant")


def text_corpus(dataset_dir: Path, run_dir: Path) -> list[str]:
    """MetaCLIP-CMR: every metadata sentence of the dataset (all templates), the vocabulary of a from-scratch text
    encoder. Frozen in the run directory on the first start, so that a resume (even on a grown dataset) rebuilds
    the same tokenizer."""
    frozen = Path(run_dir) / "text_corpus.json"
    if frozen.exists():
        return json.loads(frozen.read_text())
    texts = set()
    for path in sorted((Path(dataset_dir) / "meta").glob("block-*.jsonl")):
        for line in path.read_text().splitlines():
            texts.update(json.loads(line).get("texts", ()))
    if not texts:
        raise ValueError(f"{dataset_dir}: no metadata sentences in meta/*.jsonl (is it a converted k-space dataset?)")
    return sorted(texts)


def build_model(cfg: PretrainConfig, dataset_dir: Path, corpus: Optional[list[str]] = None) -> torch.nn.Module:
    """The stage's model; Stage II and MetaCLIP-CMR (ViT) may start their image encoder from an earlier export
    (`checkpoint.init_from`)."""
    if cfg.stage == "mae":
        return MaskedAutoencoder(cfg.model, cfg.mae)  # no BatchNorm
    if cfg.stage == "tabular_clip":
        from pretrain.models.clip import ImageTabularCLIP

        manifest = Manifest.load(dataset_dir)
        if "stats" not in manifest.tabular:
            raise ValueError(f"{dataset_dir}: no tabular features/statistics (convert with --tabular)")
        model = ImageTabularCLIP(cfg.model, cfg.tabular, manifest.tabular_features)
    else:
        from pretrain.models.metaclip import MetaCLIP

        model = MetaCLIP(cfg.model, cfg.metaclip, corpus or [], seed=cfg.train.seed)
    if cfg.checkpoint.init_from is not None:
        model.load_encoder(cfg.checkpoint.init_from)
    return fp32_batchnorm(model)  # the ResNet-50's and Stage II's feature norm, under the bf16 engine


def train_flops(cfg: PretrainConfig, model: torch.nn.Module) -> Optional[float]:
    """Model FLOPs per training sample for MFU (None: not counted for MetaCLIP-CMR)."""
    if cfg.stage == "mae":
        return flops_per_sample(cfg.model, cfg.mae, train=True)
    return model.flops_per_sample(train=True) if cfg.stage == "tabular_clip" else None


def build_transform(cfg: PretrainConfig, manifest: Manifest, train: bool):
    """The per-sample transform of the stage's loader (None: the default UK Biobank `SampleTransform`) and, for
    evaluation (`train=False`), a deterministic one without augmentation."""
    from dataclasses import replace

    from pretrain.data import KSpaceTransform, SampleTransform

    if cfg.stage == "metaclip":
        return KSpaceTransform(cfg.data, cfg.metaclip, cfg.train.seed, train=train)
    if train:
        return None
    plain = replace(cfg.data, rotation_deg=0.0, flip=False, contrast=0.0, temporal_offset=False, seg=False)
    return SampleTransform(plain, cfg.train.seed, manifest.tabular_stats(), frames=cfg.model.frames)


def model_inputs(cfg: PretrainConfig, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    images = batch["image"].to(device, dtype, non_blocking=True)
    if cfg.stage == "mae":
        return {"images": images}
    if cfg.stage == "metaclip":
        return {"images": images, "valid": batch["valid"].to(device), "texts": batch["text"],
                "modality": batch["modality"].to(device), "view": batch["view"].to(device),
                "view_valid": batch["view_valid"].to(device)}
    return {"images": images, "tab_values": batch["tabular_values"].to(device, non_blocking=True),
            "tab_missing": batch["tabular_missing"].to(device, non_blocking=True)}


def evaluate(cfg: PretrainConfig, model: torch.nn.Module, manifest: Manifest, device: torch.device,
             dtype: torch.dtype, cache: dict) -> dict:
    """Collective: validation of a stage (`pretrain/evaluate.py`): Stage I reconstruction PSNR against its two
    references (the training mean image is computed once and kept in `cache`); retrieval and loss of a
    contrastive stage."""
    from pretrain import evaluate as ev
    from pretrain.data import list_shards

    shards = list_shards(cfg.data.dataset, cfg.train.eval_split, manifest)
    if not shards:
        return {}
    world = dist.get_world_size()
    limit = -(-cfg.train.eval_samples // world)
    transform = build_transform(cfg, manifest, train=False)
    was_training = model.training
    model.eval()
    try:
        if cfg.stage == "mae":
            if "mean_image" not in cache:
                cache["mean_image"] = ev.mean_image(list_shards(cfg.data.dataset, "train", manifest), transform,
                                                    limit, device)
            return ev.mae_metrics(model, shards, transform, cache["mean_image"], batch_size=cfg.train.micro_batch,
                                  limit=limit, seed=cfg.train.seed, device=device, dtype=dtype)
        if cfg.stage == "tabular_clip":
            emb = ev.embed_split(lambda b: model.embed(**model_inputs(cfg, b, device, dtype)), shards, transform,
                                 batch_size=cfg.train.micro_batch, limit=limit)
            return ev.tabular_clip_metrics(emb, cfg.tabular.temperature, cfg.tabular.loss_weight,
                                           cfg.train.global_batch)
        emb = ev.embed_split(lambda b: {"image": model.embed_images(b["image"].to(device, dtype),
                                                                    b["valid"].to(device))},
                             shards, transform, batch_size=cfg.train.micro_batch, limit=limit,
                             labels=("text", "modality", "view", "view_valid"))
        sentences = sorted(set(emb["text"]))
        with torch.no_grad():  # every rank embeds all sentences alike (ZeRO-3 forwards are collective)
            text_emb = torch.cat([model.embed_texts(sentences[i:i + 256]).float().cpu()
                                  for i in range(0, len(sentences), 256)])
        mc = cfg.metaclip
        return ev.metaclip_metrics(emb, text_emb, sentences, model.logit_scale(), mc.alpha_modality, mc.beta_view,
                                   cfg.train.global_batch)
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


def reconstruction_grid(model: MaskedAutoencoder, images: torch.Tensor, out: dict) -> torch.Tensor:
    """(3, rows, cols) image for TensorBoard: per plane (rows) the input, the masked input and the
    reconstruction (columns) of the first sample's middle frame."""
    with torch.no_grad():
        x = images[:1].float()
        recon = model.reconstruct(x, out["pred"][:1], out["mask"][:1])
        mask_img = model.encoder.unpatchify(out["mask"][:1, :, None].float().expand(-1, -1, out["pred"].shape[-1]))
        visible = x * (1 - mask_img)
        t = x.shape[2] // 2
        rows = [torch.cat([x[0, p, t], visible[0, p, t], recon[0, p, t]], dim=1) for p in range(x.shape[1])]
        grid = torch.cat(rows, dim=0).clamp(0, 1).cpu()
    return grid[None].expand(3, -1, -1)


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 (SLURM before a timeout or preemption): save at the next step, then stop."""

    def __init__(self):
        self.received = None
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STAGE_DATASET = {"mae": "ukb", "tabular_clip": "ukb", "metaclip": "kspace"}  # what each stage trains on


def preflight(cfg: PretrainConfig, check_device: bool = True) -> Manifest:
    """Checks that need no GPU, Ray or DeepSpeed, run before any of them starts (and by `cluster submit` before
    anything is queued, `check_device` off there); a ConfigError line each. Returns the dataset's manifest."""
    manifest = Manifest.load(cfg.data.dataset, (STAGE_DATASET[cfg.stage],), "data.dataset")
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
    import deepspeed

    from pretrain.data import build_loader

    manifest = preflight(cfg)
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
    corpus = text_corpus(cfg.data.dataset, run_dir) if cfg.stage == "metaclip" else None
    if corpus is not None and rank == 0:
        atomic_write_text(run_dir / "text_corpus.json", json.dumps(corpus, indent=0))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, cfg.data.dataset, corpus)
    model.set_grad_checkpointing(cfg.train.activation_checkpointing)
    loader = build_loader(cfg.data.dataset, cfg.data, rank=rank, world_size=world, batch_size=cfg.train.micro_batch,
                          seed=cfg.train.seed, frames=cfg.model.frames, transform=build_transform(cfg, manifest, True))
    steps_per_epoch = max(1, (cfg.train.samples_per_epoch or loader.samples_per_epoch) // cfg.train.global_batch)
    total_steps = cfg.train.epochs * steps_per_epoch
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.encoder_lr_scale)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    ds_config = deepspeed_config(cfg, world)
    tag = checkpoint.latest_tag(ckpt_dir) if cfg.checkpoint.resume == "auto" else None
    universal = tag is not None and checkpoint.saved_world_size(ckpt_dir, tag) != world
    if universal:  # another number of ranks than the checkpoint's: load its universal conversion
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    gas = engine.gradient_accumulation_steps()

    # --- resume ---
    step, samples = 0, 0
    state = checkpoint.load(engine, ckpt_dir, universal) if tag is not None else None
    if state is not None:
        step, samples = state["step"], state["samples"]
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
              f"global {cfg.train.global_batch}; {total_steps} steps; attention: {backend}"
              + (f"; resumed from {state['tag']} at step {step}" if state else ""), flush=True)
    flops = train_flops(cfg, model)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    tokens = num_tokens(cfg.model)
    stop = StopSignal()
    quality = "psnr" if cfg.stage == "mae" else "acc"  # reconstruction PSNR (dB) / in-batch retrieval accuracy
    batches = iter(loader)
    eval_cache: dict = {}
    t_last, wait, n_last = time.perf_counter(), 0.0, 0
    t_start, step_start = t_last, step  # the ETA: this process's pace (a resumed run counts from its resume)
    last_loss = float("nan")  # the last logged loss, for TensorBoard's hparams view

    # --- the loop ---
    while step < total_steps:
        losses, psnrs = [], []
        for micro in range(gas):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            inputs = model_inputs(cfg, batch, device, dtype)
            gen = torch.Generator().manual_seed(((cfg.train.seed * 1_000_003 + step) * 1009 + micro) * 131 + rank)
            out = engine(**inputs, generator=gen)
            engine.backward(out["loss"])
            engine.step()
            losses.append(out["loss"].detach().float())
            psnrs.append(out[quality].detach().float())
        step += 1
        samples += cfg.train.global_batch
        if rank == 0 and cfg.stage == "mae" and cfg.train.image_every and step % cfg.train.image_every == 0:
            writer.add_image("reconstruction (input | masked | MAE)",
                             reconstruction_grid(engine.module, inputs["images"], out), step)
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
            val = evaluate(cfg, engine.module, manifest, device, dtype, eval_cache)
            if rank == 0 and val:
                metrics.write(json.dumps({"step": step, "samples": samples, "split": "val", **val}) + "\n")
                metrics.flush()
                for k, v in val.items():
                    if k not in ("n", "sentences"):  # counts, not curves (they stay in metrics.jsonl)
                        writer.add_scalar(f"val/{k}", v, step)
                print(f"[pretrain] step {step} validation: " + " ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()), flush=True)
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
