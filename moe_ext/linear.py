"""``Linear``: an ``nn.Linear`` computed by ``moe_ext.ops.linear``, whose gradients no thread count changes."""

from __future__ import annotations

from torch import Tensor, nn

from . import ops

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose forward is :func:`moe_ext.ops.linear`.

    Being an ``nn.Linear``, it takes what is made for one: peft's LoRA, forward hooks, quantizers.
    The weights follow the input's dtype (an fp32 router casts its input, and with it the
    projection, to float32); under ``torch.autocast`` the op runs in the autocast dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.linear(x, self.weight.to(x.dtype), bias)
