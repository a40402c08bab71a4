"""`train.compile`: the transformer blocks through torch.compile (inductor) give the eager model's loss and
gradients. CPU inductor (a C++ compiler is on every machine the project runs on); a minute or so of compiling."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from pretrain.config import MAEConfig, ViTConfig
from pretrain.models.vit import Attention, Block, MaskedAutoencoder, compile_blocks

VIT = ViTConfig(img_size=16, sa_planes=2, la_planes=1, frames=5, patch=(5, 8, 8), dim=60, depth=2, heads=4)
MAE = MAEConfig(mask_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def _loss_and_grads(model, images, checkpointing=False):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    out = model(images, generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_equal_eager():
    counters.clear()
    torch.manual_seed(0)
    eager = MaskedAutoencoder(VIT, MAE)
    compiled = MaskedAutoencoder(VIT, MAE)
    compiled.load_state_dict(eager.state_dict())
    # heads of 15: the compiled attention runs the zero-padded head dim (16) as well
    assert any(m.pad for m in compiled.modules() if isinstance(m, Attention))
    n = compile_blocks(compiled)
    assert n == sum(isinstance(m, Block) for m in eager.modules()) == VIT.depth + MAE.decoder_depth
    images = torch.rand(2, 3, 5, 16, 16)
    for checkpointing in (False, True):
        le, ge = _loss_and_grads(eager, images, checkpointing)
        lc, gc = _loss_and_grads(compiled, images, checkpointing)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
    # the blocks really went through dynamo and inductor: graphs were captured, none fell back to eager
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.modules() if isinstance(m, Block))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert counters["inductor"]
