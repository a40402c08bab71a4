"""The contrastive batch under gradient accumulation: GradCache (Gao et al., 2021; open_clip's `--accum-freq`).

A contrastive loss is not a sum over samples: each sample's negatives are the rest of the batch. With `A`
micro-steps of accumulation on `W` ranks, a loss computed per micro-step sees `W x micro` samples, not the global
batch of `W x micro x A` the config promises. One optimizer step here instead:

1. embeds every micro-batch WITHOUT gradients (one micro-batch of activations alive at a time), remembering each
   micro-step's RNG state (dropout) and putting back the BatchNorm buffers afterwards;
2. computes the loss over the whole global batch from the cached embeddings (all micro-steps concatenated, then
   gathered over the ranks by the loss itself) and its gradient w.r.t. every cached embedding;
3. embeds each micro-batch again WITH gradients (same masks, same dropout) and back-propagates the surrogate
   ``sum(embedding * cached gradient)`` through the engine: the chain rule makes the accumulated gradient the one
   of a single process holding the whole global batch.

The model contract: ``model(**inputs, generator=g, features_only=True)`` returns a dict of the loss's inputs —
per-sample tensors (rows: embeddings, labels), 0-dim tensors shared by the whole batch (a learnable temperature),
or lists (texts) — and ``model.contrastive_loss(features, grad_reduction)`` the dict with "loss" that `forward`
would return from the same features.

Scaling. DeepSpeed divides each micro-step's loss by `A` and averages gradients over the `W` ranks, so the surrogate
is multiplied by ``W x A``. The loss is called with ``grad_reduction="sum"``: the gradient w.r.t. a rank's rows is
then exactly the slice of the one-process gradient; a shared scalar's gradient on each rank is that rank's share of
the total, so each micro-step carries 1/A of it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _concat(parts: Sequence[dict]) -> dict:
    """Micro-batches' features -> one batch: rows concatenated, shared scalars taken once, lists joined."""
    out = {}
    for k, first in parts[0].items():
        if isinstance(first, Tensor) and first.ndim == 0:
            out[k] = first
        elif isinstance(first, Tensor):
            out[k] = torch.cat([p[k] for p in parts])
        else:
            out[k] = [x for p in parts for x in p[k]]
    return out


def _differentiable(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def contrastive_step(engine, model: nn.Module, micro_inputs: Sequence[dict],
                     generators: Sequence[Callable[[], torch.Generator]], world_size: int,
                     device: torch.device) -> dict:
    """One optimizer step of a contrastive model over the whole global batch (see the module docstring).

    engine: the DeepSpeed engine around `model`; micro_inputs: this rank's micro-batches (the model's keyword
    arguments); generators: a fresh generator per micro-step, the same each call (masking, corruption).
    Returns the loss's outputs ("loss": the global loss, the same on every rank) detached.
    """
    steps = len(micro_inputs)
    # 1. embeddings without gradients; training-mode BatchNorm must update its running statistics once per micro-
    # batch (in pass 3, as without caching), so its buffers are put back after this pass
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    states, cached = [], []
    with torch.no_grad():
        for inputs, gen in zip(micro_inputs, generators):
            states.append(_rng_state(device))
            cached.append(engine(**inputs, generator=gen(), features_only=True))
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)

    # 2. the global batch's loss and its gradient w.r.t. every cached embedding
    feats = _concat(cached)
    leaves = {k: v.detach().requires_grad_() for k, v in feats.items() if _differentiable(v)}
    out = model.contrastive_loss({**feats, **leaves}, grad_reduction="sum")
    grads = dict(zip(leaves, torch.autograd.grad(out["loss"], list(leaves.values()), allow_unused=True)))

    # 3. each micro-batch again, with gradients, back-propagating the cached gradient through the engine
    rows = 0
    scale = world_size * steps  # undoes DeepSpeed's 1/A per micro-step and its average over the ranks
    for m, (inputs, gen) in enumerate(zip(micro_inputs, generators)):
        _set_rng_state(states[m], device)
        f = engine(**inputs, generator=gen(), features_only=True)
        n = next(len(v) for v in f.values() if not (isinstance(v, Tensor) and v.ndim == 0))
        surrogate = 0.0
        for k, g in grads.items():
            if g is None:
                continue
            g = g / steps if f[k].ndim == 0 else g[rows:rows + n]
            surrogate = surrogate + (f[k].float() * g.float()).sum()
        engine.backward(surrogate * scale)
        engine.step()
        rows += n
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in out.items()}
