"""Baselines for moe_ext.MoE benchmarks, each built with the weights of a given moe_ext layer.

Every baseline computes the same function as a dropless moe_ext.MoE with SwiGLU
experts and softmax top-k renormalized routing (``normalize_weights=True``):

    y[t] = sum_j w[t, j] * down_e(silu(x[t] @ gate_e) * (x[t] @ up_e)),  e = indices[t, j]
           (+ shared(x[t]) when the layer has a shared expert)

Baselines (``make_peers``):
    hf_mixtral[impl]  transformers' MixtralSparseMoeBlock, experts_implementation = impl
    hf_qwen3[impl]    transformers' Qwen3MoeSparseMoeBlock (norm_topk_prob=True), same experts code
    torch_sorted_gmm  plain PyTorch: sort by expert, index_select, torch._grouped_mm, index_add_
    torch_sorted_loop the same with one torch.mm per expert (one host sync for the counts)
    gshard_einsum     GShard/fairscale/DeepSpeed dense dispatch: one-hot [T, E, C] dispatch and
                      combine tensors and einsums, with C = the largest expert load (nothing drops)
and ``GemmFloor``: only the expert GEMMs, on tokens already grouped by expert.

Peers have their own copies of the weights (in their own layouts), so gradients never mix.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moe_ext

__all__ = [
    "GemmFloor",
    "GShardEinsumMoE",
    "Peer",
    "TorchSortedMoE",
    "hf_block",
    "hf_experts_implementations",
    "make_peers",
    "transformers_version",
]


def _check_layer(layer: moe_ext.MoE) -> None:
    if layer.activation != "swiglu" or layer.capacity_factor is not None or layer.score_func != "softmax":
        raise ValueError("peers: the layer must be dropless, SwiGLU, softmax-routed")
    if not layer.normalize_weights or layer.routed_scaling_factor != 1.0 or layer.b_in is not None:
        raise ValueError("peers: the layer must renormalize its top-k weights, unscaled, without expert biases")
    if layer.n_group != 1 or layer.selection_bias is not None or layer.shared_expert_gate is not None:
        raise ValueError("peers: group-limited routing, selection bias and gated shared experts are not mirrored")


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


def _route(x: Tensor, router_weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax over all experts in float32, top-k, renormalized (Mixtral): (weights [T, k] f32, indices [T, k])."""
    probs = torch.softmax(F.linear(x, router_weight).float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    return top / top.sum(dim=-1, keepdim=True), idx


class Peer(nn.Module):
    """A baseline MoE body plus, when the moe_ext layer has one, a copy of its dense shared expert."""

    def __init__(self, body: nn.Module, shared: nn.Module | None, takes_3d: bool = False) -> None:
        super().__init__()
        self.body = body
        self.shared = shared
        self.takes_3d = takes_3d  # transformers' blocks unpack [batch, seq, hidden]

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x.unsqueeze(0)).squeeze(0) if self.takes_3d else self.body(x)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


# ----- plain PyTorch ------------------------------------------------------------------------------


class TorchSortedMoE(nn.Module):
    """The best-effort plain-PyTorch dropless MoE: sort assignments by expert, gather, grouped GEMMs, scatter-add.

    grouped=True runs the expert GEMMs as torch._grouped_mm (no host sync); False as
    one torch.mm per expert with a non-empty group (one host sync to read the counts).
    """

    def __init__(self, layer: moe_ext.MoE, grouped: bool = True) -> None:
        super().__init__()
        _check_layer(layer)
        self.k, self.num_experts, self.grouped = layer.top_k, layer.num_experts, grouped
        self.router_weight = _param(layer.router.weight)
        self.w_in = _param(layer.w_in)  # [E, H, 2F] = [gate | up]
        self.w_out = _param(layer.w_out)  # [E, F, H]

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = _route(x, self.router_weight, self.k)
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // self.k
        x_sorted = x.index_select(0, token)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.grouped:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = torch._grouped_mm(x_sorted, self.w_in, offs=offs)
        else:
            sizes = counts.tolist()
            h = torch.cat([xs @ self.w_in[e] for e, xs in enumerate(x_sorted.split(sizes)) if sizes[e]])
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
        if self.grouped:
            y_sorted = torch._grouped_mm(a, self.w_out, offs=offs)
        else:
            nonempty = [e for e in range(self.num_experts) if sizes[e]]
            parts = a.split([sizes[e] for e in nonempty])
            y_sorted = torch.cat([p @ self.w_out[e] for e, p in zip(nonempty, parts, strict=True)])
        y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        return torch.zeros_like(x).index_add_(0, token, y_sorted)


class GShardEinsumMoE(nn.Module):
    """GShard-style dense dispatch, as DeepSpeed's topkgating + MOELayer einsums (fairscale's top2gating for k=2).

    mask [T, E] k-hot, slot = per-expert running count in token order, dispatch [T, E, C]
    one-hot, combine [T, E, C] = dispatch * weight; x_e = einsum('tec,th->ech'), expert
    FFNs as bmm over [E, C, .], y = einsum('tec,ech->th'). C = the largest expert load of the
    batch (one host sync), so nothing is dropped and the output equals a dropless MoE; the
    padded slots still cost GEMM work, as in GShard.
    """

    def __init__(self, layer: moe_ext.MoE) -> None:
        super().__init__()
        _check_layer(layer)
        self.k, self.num_experts = layer.top_k, layer.num_experts
        self.router_weight = _param(layer.router.weight)
        self.w_in = _param(layer.w_in)
        self.w_out = _param(layer.w_out)

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = _route(x, self.router_weight, self.k)
        with torch.no_grad():
            mask = torch.zeros(x.shape[0], self.num_experts, dtype=torch.int64, device=x.device)
            mask.scatter_(1, indices, 1)
            capacity = max(1, int(mask.sum(0).max()))
            slot = (torch.cumsum(mask, 0) - 1) * mask  # [T, E]
            dispatch = F.one_hot(slot, capacity).mul_(mask.unsqueeze(-1)).to(x.dtype)  # [T, E, C]
        gates = torch.zeros(mask.shape, dtype=weights.dtype, device=x.device).scatter(1, indices, weights)
        combine = gates.to(x.dtype).unsqueeze(-1) * dispatch  # [T, E, C]
        x_e = torch.einsum("tec,th->ech", dispatch, x)
        gate, up = torch.bmm(x_e, self.w_in).chunk(2, dim=-1)
        y_e = torch.bmm(F.silu(gate) * up, self.w_out)
        return torch.einsum("tec,ech->th", combine, y_e)


# ----- Hugging Face transformers ----------------------------------------------------------------


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def hf_experts_implementations() -> list[str]:
    """experts_implementation values transformers registers (plus "eager", the reference loop)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def hf_block(kind: str, layer: moe_ext.MoE, experts_implementation: str) -> nn.Module:
    """transformers' Mixtral or Qwen3-MoE sparse block from a tiny config of the layer's sizes, weights copied.

    transformers 5.x stores experts fused: gate_up_proj [E, 2F, H] (gate rows first, used as
    F.linear weights) and down_proj [E, H, F]; moe_ext's w_in [E, H, 2F] = [gate | up] and
    w_out [E, F, H] are their transposes. The router is gate.weight [E, H] = router.weight.
    """
    _check_layer(layer)
    H, Fh, E, k = layer.hidden_size, layer.ffn_hidden_size, layer.num_experts, layer.top_k
    common = dict(
        hidden_size=H,
        num_experts_per_tok=k,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=16,
        hidden_act="silu",
    )
    # A block built outside a PreTrainedModel keeps config._experts_implementation = None (the eager
    # loop, with a warning); PreTrainedModel resolves None to "grouped_mm". Set it explicitly.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            config = MixtralConfig(intermediate_size=Fh, num_local_experts=E, router_jitter_noise=0.0, **common)
            block = MixtralSparseMoeBlock(config)
        elif kind == "qwen3":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            config = Qwen3MoeConfig(
                moe_intermediate_size=Fh, intermediate_size=Fh, num_experts=E, norm_topk_prob=True, head_dim=H, **common
            )
            block = Qwen3MoeSparseMoeBlock(config)
        else:
            raise ValueError(f"hf_block: kind must be 'mixtral' or 'qwen3', got {kind!r}")
    config._experts_implementation = experts_implementation
    ref = layer.w_in
    with torch.no_grad():
        block.gate.weight = _param(layer.router.weight)
        block.experts.gate_up_proj = _param(layer.w_in.transpose(1, 2))
        block.experts.down_proj = _param(layer.w_out.transpose(1, 2))
    return block.to(device=ref.device, dtype=ref.dtype)


# ----- the floor ----------------------------------------------------------------------------------


class GemmFloor:
    """Only the expert GEMMs of a dropless SwiGLU MoE, on inputs already grouped by expert.

    Forward per expert with rows: x_e @ w_in[e] ([H, 2F]: gate and up fused into one GEMM, as
    moe_ext does -- 3 GEMMs' worth of FLOPs in 2 calls) and a_e @ w_out[e]. Backward per expert:
    the 6 GEMMs' worth in 4 calls: grad_a = g_e @ w_out[e]^T, grad_w_out = a_e^T @ g_e,
    grad_x = grad_h @ w_in[e]^T, grad_w_in = x_e^T @ grad_h. Plus the same GEMMs of the dense
    shared expert when the layer has one. torch.mm with out= into preallocated, pre-sliced
    buffers: no gather, activation, routing, combine or allocation is timed.

    ``forward``/``backward`` run the GEMMs one after another, each using all intra-op threads
    (what a per-expert loop does). ``*_expert_parallel`` runs them on ``threads`` Python
    threads instead, experts spread by row count, each GEMM single-threaded -- the
    parallelization moe_ext's CPU grouped_mm uses. The true floor is the faster of the two.
    """

    def __init__(self, layer: moe_ext.MoE, x: Tensor) -> None:
        _check_layer(layer)
        with torch.no_grad():
            x2 = x.reshape(-1, layer.hidden_size)
            weights, indices, _ = moe_ext.ops.topk_gating(F.linear(x2, layer.router.weight), layer.top_k)
            plan = moe_ext.ops.make_plan(indices, layer.num_experts)
        offsets = plan.offsets.tolist()
        N, H, Fh = plan.token_of.shape[0], layer.hidden_size, layer.ffn_hidden_size
        opts = dict(dtype=x.dtype, device=x.device)
        w_in, w_out = layer.w_in.detach(), layer.w_out.detach()
        self.row_counts = [offsets[e + 1] - offsets[e] for e in range(layer.num_experts)]
        buffers = {
            name: torch.randn(N, width, **opts)
            for name, width in (
                ("x", H),
                ("h", 2 * Fh),
                ("a", Fh),
                ("y", H),
                ("gy", H),
                ("ga", Fh),
                ("gh", 2 * Fh),
                ("gx", H),
            )
        }
        gw_in, gw_out = torch.empty_like(w_in), torch.empty_like(w_out)
        self.groups = []  # one (weights, row slices, weight-grad views) per non-empty expert
        for e in range(layer.num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi > lo:
                rows = {name: buf[lo:hi] for name, buf in buffers.items()}
                self.groups.append((w_in[e], w_out[e], rows, gw_in[e], gw_out[e]))
        self.shared = None
        if layer.shared_expert is not None:
            T, Fs = x2.shape[0], layer.shared_expert.w_out.in_features
            ws_in = layer.shared_expert.w_in.weight.detach().t().contiguous()
            ws_out = layer.shared_expert.w_out.weight.detach().t().contiguous()
            rows = {
                name: torch.randn(T, width, **opts)
                for name, width in (
                    ("x", H),
                    ("h", 2 * Fs),
                    ("a", Fs),
                    ("y", H),
                    ("gy", H),
                    ("ga", Fs),
                    ("gh", 2 * Fs),
                    ("gx", H),
                )
            }
            self.shared = (ws_in, ws_out, rows, torch.empty_like(ws_in), torch.empty_like(ws_out))
        self.num_rows = N
        self._pool = None
        self._pool_threads = 0
        self._pool_bins: list[list] = []

    def _all(self):
        return self.groups if self.shared is None else [*self.groups, self.shared]

    def _bins(self, threads: int) -> list[list]:
        """Groups spread over ``threads`` bins, largest first onto the least loaded bin (LPT)."""
        bins: list[list] = [[] for _ in range(threads)]
        load = [0] * threads
        for group in sorted(self._all(), key=lambda g: -g[2]["x"].shape[0] * g[0].shape[1]):
            i = load.index(min(load))
            bins[i].append(group)
            load[i] += group[2]["x"].shape[0] * group[0].shape[1]
        return bins

    def forward(self) -> None:
        for group in self._all():
            self._forward_group(*group)

    def backward(self) -> None:
        for group in self._all():
            self._backward_group(*group)

    def forward_backward(self) -> None:
        self.forward()
        self.backward()

    def _run_expert_parallel(self, body) -> None:
        threads = torch.get_num_threads()
        if self._pool is None or self._pool_threads != threads:
            from concurrent.futures import ThreadPoolExecutor

            self._pool, self._pool_threads = ThreadPoolExecutor(max_workers=threads), threads
            self._pool_bins = self._bins(threads)

        def work(groups) -> None:
            torch.set_num_threads(1)  # this thread's OpenMP and MKL: one thread per GEMM
            for group in groups:
                body(*group)

        try:
            for future in [self._pool.submit(work, b) for b in self._pool_bins]:
                future.result()
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _forward_group(w_in, w_out, r, gw_in, gw_out) -> None:
        torch.mm(r["x"], w_in, out=r["h"])
        torch.mm(r["a"], w_out, out=r["y"])

    @staticmethod
    def _backward_group(w_in, w_out, r, gw_in, gw_out) -> None:
        torch.mm(r["gy"], w_out.t(), out=r["ga"])
        torch.mm(r["a"].t(), r["gy"], out=gw_out)
        torch.mm(r["gh"], w_in.t(), out=r["gx"])
        torch.mm(r["x"].t(), r["gh"], out=gw_in)

    def forward_expert_parallel(self) -> None:
        self._run_expert_parallel(self._forward_group)

    def forward_backward_expert_parallel(self) -> None:
        self._run_expert_parallel(self._forward_group)
        self._run_expert_parallel(self._backward_group)

    def working_set_bytes(self, backward: bool) -> int:
        """Bytes of the tensors a step must produce, all counted as live at once: the grouped
        input and the GEMM outputs (x, h, a, y) in forward; also the gradients of the expert
        rows (gy, ga, gh, gx) and of every expert weight in forward+backward. The floor's
        stand-in for peak memory: an upper bound on what it holds, since it never frees."""
        names = ("x", "h", "a", "y", "gy", "ga", "gh", "gx") if backward else ("x", "h", "a", "y")
        total = 0
        for _, _, rows, _, _ in self._all():
            total += sum(rows[n].nbytes for n in names)
        if backward:
            seen = set()
            for _, _, _, gw_in, gw_out in self._all():
                for t in (gw_in, gw_out):  # per-expert views of one [E, ...] buffer: count it once
                    base = t._base if t._base is not None else t
                    if id(base) not in seen:
                        seen.add(id(base))
                        total += base.nbytes
        return total

    def flops(self, backward: bool) -> int:
        """Multiply-adds x 2 of the GEMMs run (forward: 3 per expert row; backward: 6)."""
        total = 0
        for w_in, w_out, r, _, _ in self._all():
            n = r["x"].shape[0]
            total += 2 * n * (w_in.shape[0] * w_in.shape[1] + w_out.shape[0] * w_out.shape[1])
        return total * (3 if backward else 1)


# ----- all of them --------------------------------------------------------------------------------


def make_peers(
    layer: moe_ext.MoE, hf_impls: dict[str, list[str]] | None = None, include: set[str] | None = None
) -> dict[str, nn.Module]:
    """name -> module (x [T, H] -> y [T, H]) for every baseline that can be built here.

    hf_impls maps "mixtral"/"qwen3" to the experts_implementation values to build
    (default: eager and grouped_mm for both). ``include`` filters by name. transformers
    missing -> no hf_* peers (the caller reports it).
    """
    shared = copy.deepcopy(layer.shared_expert) if layer.shared_expert is not None else None

    def wrap(body: nn.Module, takes_3d: bool = False) -> Peer:
        return Peer(body, copy.deepcopy(shared), takes_3d)

    builders = {
        "torch_sorted_gmm": lambda: wrap(TorchSortedMoE(layer, grouped=True)),
        "torch_sorted_loop": lambda: wrap(TorchSortedMoE(layer, grouped=False)),
        "gshard_einsum": lambda: wrap(GShardEinsumMoE(layer)),
    }
    if transformers_version() is not None:
        impls = hf_impls or {"mixtral": ["eager", "grouped_mm"], "qwen3": ["eager", "grouped_mm"]}
        for kind, names in impls.items():
            for impl in names:
                builders[f"hf_{kind}[{impl}]"] = lambda kind=kind, impl=impl: wrap(
                    hf_block(kind, layer, impl), takes_3d=True
                )
    return {name: build() for name, build in builders.items() if include is None or name in include}
