"""BatchNorm under DeepSpeed's bf16 engine. The engine casts a model's parameters to bf16 but not its buffers, so
an affine BatchNorm meets bf16 weights next to fp32 running statistics, a mix the kernels refuse. Normalising in
fp32 (as autocast does) runs, and keeps the statistics' small momentum updates exact. `build_model` applies it to
every stage's model; in fp32 training it computes exactly what the plain layer does."""

from __future__ import annotations

from torch import Tensor, nn


class _FP32Norm:
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        weight, bias = (None, None) if self.weight is None else (self.weight.float(), self.bias.float())
        return nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias, self.training,
                                        self.momentum, self.eps).to(x.dtype)


class FP32BatchNorm1d(_FP32Norm, nn.BatchNorm1d):
    pass


class FP32BatchNorm2d(_FP32Norm, nn.BatchNorm2d):
    pass


class FP32BatchNorm3d(_FP32Norm, nn.BatchNorm3d):
    pass


_FP32 = {nn.BatchNorm1d: FP32BatchNorm1d, nn.BatchNorm2d: FP32BatchNorm2d, nn.BatchNorm3d: FP32BatchNorm3d}


def fp32_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` computes in fp32; weights, buffers and state dict unchanged."""
    for m in module.modules():
        cls = _FP32.get(type(m))
        if cls is not None:
            if not (m.track_running_stats and m.momentum is not None):
                raise ValueError(f"{m}: only BatchNorm with running statistics and a fixed momentum")
            m.__class__ = cls
    return module
