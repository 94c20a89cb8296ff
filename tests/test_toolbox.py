"""moe_ext layers with the PyTorch toolbox: autocast, checkpoint, save/load, deepcopy, dtype moves, export, DDP,
plus the module swappers (replace_modules, upcycle) and `python -m moe_ext`."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_workers
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn: nn.Module = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def moe_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block())
    moe_ext.replace_modules(model, lambda name, m: name.endswith("ffn"), lambda name, m: moe_ext.MoE(16, 24, 4))
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_replace_modules_counts_and_swaps():
    model = nn.Sequential(Block(), nn.Sequential(Block(), Block()))
    count = moe_ext.replace_modules(model, lambda name, m: name.endswith("ffn"), lambda n, m: moe_ext.MoE(16, 8, 4))
    assert count == 3
    assert sum(isinstance(m, moe_ext.MoE) for m in model.modules()) == 3
    assert moe_ext.replace_modules(model, nn.LayerNorm, lambda n, m: nn.Identity()) == 3
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    y = model(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16)


@pytest.mark.parametrize("activation", [nn.GELU, nn.ReLU, nn.SiLU])
def test_upcycle_sequential_equals_dense(activation):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 40), activation(), nn.Linear(40, 16))
    moe = moe_ext.upcycle(dense, num_experts=6, top_k=2)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)
    assert moe.b_in is not None and moe.num_experts == 6


def test_upcycle_gated_mlp_equals_dense():
    class GatedMLP(nn.Module):  # Llama / Mistral / Qwen layout
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(16, 40, bias=False)
            self.up_proj = nn.Linear(16, 40, bias=False)
            self.down_proj = nn.Linear(40, 16, bias=False)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(1)
    dense = GatedMLP()
    moe = moe_ext.upcycle(dense, num_experts=8, top_k=2)
    assert moe.activation == "swiglu" and moe.b_in is None
    x = torch.randn(50, 16)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="upcycle"):
        moe_ext.upcycle(nn.Linear(3, 3), num_experts=2)


def test_autocast_bf16_runs_experts_in_bf16_and_matches_fp32():
    model = moe_model()
    layer = model[0].ffn
    x = torch.randn(4, 6, 16)
    reference, reference_layer = model(x), layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_layer = layer(x)
        y = model(x)
    assert y_layer.dtype == torch.bfloat16, "the expert matmuls run in the autocast dtype, like nn.Linear"
    torch.testing.assert_close(y_layer.float(), reference_layer, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), reference, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    for name, grad in grads(model).items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name


def test_checkpoint_gives_same_gradients():
    model = moe_model()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 5, 16)
    model(x).square().sum().backward()
    out = x
    for block in twin:
        out = checkpoint(block, out, use_reentrant=False)
    out.square().sum().backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(grads(twin)[name], grad, rtol=1e-6, atol=1e-7)


def test_save_load_whole_model_and_state_dict(tmp_path):
    model = moe_model()
    x = torch.randn(2, 3, 16)
    expected = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = moe_model(seed=5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_deepcopy_and_dtype_moves():
    model = moe_model()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        moved = copy.deepcopy(model).to(dtype)
        y = moved(x.to(dtype))
        assert y.dtype == dtype
        tol = {torch.float64: 1e-6, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
        torch.testing.assert_close(y.float(), model(x), rtol=tol, atol=tol)


def test_torch_export_round_trip():
    layer = moe_ext.MoE(16, 24, 4, top_k=2).eval()
    x = torch.randn(10, 16)
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("moe_ext.topk_gating" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=1e-6, atol=1e-6)


def test_python_m_moe_ext():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "moe_ext"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"moe_ext {moe_ext.__version__}" in out.stdout
    assert f"built against torch {torch.__version__.split('+')[0]}" in out.stdout
    assert "CUDA kernels compiled in: no" in out.stdout or "CUDA kernels compiled in: yes" in out.stdout


DDP_BODY = """
from torch.nn.parallel import DistributedDataParallel as DDP
import moe_ext
torch.manual_seed(0)
layer = moe_ext.MoE(16, 24, 4, top_k=2, aux_loss_coef=0.01)
model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), layer))
x = torch.randn(world, 10, 8, generator=torch.Generator().manual_seed(1))[rank]
model(x).square().mean().backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
torch.save(grads, out / f"grad{rank}.pt")
"""


def test_distributed_data_parallel_gloo_two_processes(tmp_path):
    run_workers(DDP_BODY, 2, tmp_path)
    g0, g1 = torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt")
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # DDP all-reduced: identical on both ranks

    # the averaged gradient equals the single-process gradient of the mean of both ranks' losses
    torch.manual_seed(0)
    layer = moe_ext.MoE(16, 24, 4, top_k=2, aux_loss_coef=0.01)
    model = nn.Sequential(nn.Linear(8, 16), layer)
    moe_ext.set_aux_loss_scale(model, 0.5)  # each half-loss carries half the injected aux gradient
    xs = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    for x in xs:
        (model(x).square().mean() / 2).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(g0, expected, rtol=1e-5, atol=1e-6)


def test_training_step_with_compile_and_optimizer():
    torch._dynamo.reset()
    model = moe_model()
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(8, 4, 16), torch.randn(8, 4, 16)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(compiled(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_upcycled_transformer_encoder_example_matches_dense_in_inference():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from upcycle_transformer_encoder import upcycle_encoder
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():  # the inference fast path must not bypass the MoE
        dense = encoder(x)
        assert upcycle_encoder(encoder, num_experts=4, top_k=2) == 2
        upcycled = encoder(x)
    torch.testing.assert_close(upcycled, dense, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m.ffn, moe_ext.MoE) for m in encoder.layers)
    assert all(m.ffn.last_stats is not None for m in encoder.layers), "the MoE layers really ran"


def test_main_job_trains_the_dense_baseline_and_the_moe_model(tmp_path):
    """The main job's script at tiny sizes: both models train on the same batches, the table names their
    parameters, active parameters and tokens/s, and both plots are written."""
    command = [
        sys.executable, os.path.join(ROOT, "examples", "train_tiny_lm.py"), "--steps", "4", "--batch", "2",
        "--context", "16", "--width", "16", "--log-every", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("dense ", "moe_ext "))}
    dense, moe = rows["dense"], rows["moe_ext"]
    # width 16: dense SwiGLU F = 2 x 32 = 64 against 8 experts of F = 32, top-2
    assert dense[1:3] == ["SwiGLU", "F=64"] and moe[1:5] == ["MoE", "8x", "F=32", "top-2"]
    dense_params, dense_active = (int(v.replace(",", "")) for v in dense[3:5])
    moe_params, moe_active = (int(v.replace(",", "")) for v in moe[5:7])
    assert dense_params == dense_active and moe_params > moe_active
    assert abs(moe_active - dense_active) <= 2 * 16 * 8  # the same FFN FLOPs; the MoE adds its routers
    assert (tmp_path / "dense_vs_moe.png").stat().st_size > 0
    assert (tmp_path / "expert_utilization.png").stat().st_size > 0
