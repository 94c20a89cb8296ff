"""Sparse upcycling of a trained nn.TransformerEncoder: every layer's FFN becomes a moe_ext.MoE.

nn.TransformerEncoderLayer inlines its FFN (linear1 -> activation -> linear2)
in its forward, so the example swaps the whole layer for a subclass whose FFN
is a module, then upcycles that FFN: each expert starts as a copy of the dense
FFN, so the upcycled model computes the same function at step 0. Then it
fine-tunes a few steps and prints the routing.

    python examples/upcycle_transformer_encoder.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import moe_ext


class MoEEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose feed-forward block is a module (here a moe_ext.MoE)."""

    @classmethod
    def upcycled_from(cls, layer: nn.TransformerEncoderLayer, num_experts: int, top_k: int) -> MoEEncoderLayer:
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)  # same submodules, norms, attention and flags
        activation = {F.relu: nn.ReLU(), F.gelu: nn.GELU()}[layer.activation]
        dense = nn.Sequential(layer.linear1, activation, layer.linear2)
        new.ffn = moe_ext.upcycle(dense, num_experts=num_experts, top_k=top_k)
        # The inference fast path would call linear1/linear2 directly and skip the MoE: turn it off
        # and drop the dense weights, which the experts now hold.
        new.activation_relu_or_gelu = 0
        del new.linear1, new.linear2
        return new

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.ffn(x))


def upcycle_encoder(encoder: nn.TransformerEncoder, num_experts: int = 4, top_k: int = 2) -> int:
    return moe_ext.replace_modules(
        encoder,
        nn.TransformerEncoderLayer,
        lambda name, layer: MoEEncoderLayer.upcycled_from(layer, num_experts, top_k),
    )


def main() -> None:
    torch.manual_seed(0)
    width = 32
    layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(4, 10, width)
    dense_out = encoder(x)

    swapped = upcycle_encoder(encoder, num_experts=4, top_k=2)
    moe_out = encoder(x)
    print(f"upcycled {swapped} encoder layers; max |MoE - dense| at step 0: {(moe_out - dense_out).abs().max():.2e}")

    encoder.train()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    target = torch.randn(4, 10, width)
    for step in range(1, 21):
        optimizer.zero_grad()
        loss = F.mse_loss(encoder(x), target)
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            print(f"step {step:2d} loss {loss.item():.4f}")
    for name, module in encoder.named_modules():
        if isinstance(module, moe_ext.MoE):
            print(f"{name}: tokens per expert {module.last_stats.tokens_per_expert.tolist()}")


if __name__ == "__main__":
    main()
