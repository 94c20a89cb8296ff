"""Expert parallelism: moe_ext.MoE(expert_parallel_group=...) on 2 and 4 gloo ranks against the single-process
layer holding every expert, in dropless, capacity and expert-choice modes, with balanced, skewed and empty
routing; DDP on the dense part; checkpoints across world sizes; bad configurations fail on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from multiprocess import run_workers

import moe_ext
import moe_ext.distributed as moe_dist

# Shared by the workers: the scenarios and a builder, so every rank and the single-process
# reference make the same layers from the same seeds.
COMMON = """
import copy, json
import moe_ext, moe_ext.distributed as moe_dist

H, F, E = 12, 20, 8

SCENARIOS = {
    # name: (layer keywords, tokens per rank, how routing is forced)
    "dropless": (dict(top_k=2), [9, 6, 11, 4], None),
    "dropless_bias_shared": (dict(top_k=3, expert_bias=True, shared_expert_size=8), [7, 10, 5, 8], None),
    "capacity": (dict(top_k=2, capacity_factor=1.0), [10, 10, 10, 10], None),
    "capacity_probs": (dict(top_k=2, capacity_factor=0.5, drop_policy="probs", min_capacity=1), [12, 7, 9, 3], None),
    "expert_choice": (dict(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0), [8, 8, 8, 8], None),
    "skewed_onto_rank0": (dict(top_k=2), [9, 6, 11, 4], "skew"),
    "skewed_capacity": (dict(top_k=2, capacity_factor=1.0), [9, 6, 11, 4], "skew"),
    "empty_rank": (dict(top_k=2, z_loss_coef=0.1), [9, 0, 11, 0], None),
    "empty_rank_capacity": (dict(top_k=2, capacity_factor=1.25), [0, 6, 0, 4], None),
}


def build(kwargs, skew, group=None):
    torch.manual_seed(0)
    layer = moe_ext.MoE(H, F, E, router_bias=True, expert_parallel_group=group, **kwargs)
    if skew:
        with torch.no_grad():  # every token's top choices are the experts of the first rank
            layer.router.bias[:2] += 20.0
    return layer


def inputs(rank, tokens):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(tokens[rank], H, generator=g), torch.randn(tokens[rank], H, generator=g)
"""

EQUIVALENCE_BODY = (
    COMMON
    + """
group = dist.new_group(list(range(world)))
report = {}
for name, (kwargs, tokens, skew) in SCENARIOS.items():
    layer = build(kwargs, skew, group)
    full = build(kwargs, skew)  # the single-process layer: every expert
    lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
    same_init = all(torch.equal(getattr(layer, n), getattr(full, n)[lo:hi])
                    for n in ("w_in", "w_out", "b_in", "b_out") if getattr(layer, n) is not None)

    x, g = inputs(rank, tokens)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()

    # Reference 1: this rank's batch alone -> output, input grad and dense grads.
    own = copy.deepcopy(full)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = own(x_ref)
    (y_ref * g).sum().backward()
    # Reference 2: every rank's batch, losses summed -> expert grads (the owner gets all of them).
    every = copy.deepcopy(full)
    for r in range(world):
        xr, gr = inputs(r, tokens)
        (every(xr) * gr).sum().backward()

    def err(a, b):
        return float((a - b).abs().max()) if a.numel() else 0.0

    errors = {"output": err(y, y_ref), "x.grad": err(x.grad, x_ref.grad)}
    for n, p in layer.named_parameters():
        if n in ("w_in", "w_out", "b_in", "b_out"):
            errors[n + ".grad"] = err(p.grad, getattr(every, n).grad[lo:hi])
        else:
            errors[n + ".grad"] = err(p.grad, own.get_parameter(n).grad)
    report[name] = {"same_init": same_init, "errors": errors, "tokens": tokens[rank],
                    "stats": layer.last_stats.tokens_per_expert.tolist()}
(out / f"report{rank}.json").write_text(json.dumps(report))
"""
)


@pytest.mark.parametrize("world", [2, 4])
def test_outputs_and_every_gradient_equal_the_single_process_layer(tmp_path, world):
    run_workers(EQUIVALENCE_BODY, world, tmp_path)
    for rank in range(world):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert len(report) == 9
        for name, case in report.items():
            assert case["same_init"], f"rank {rank} {name}: expert shard differs from the seeded full layer"
            for what, error in case["errors"].items():
                assert error <= 2e-5, f"rank {rank} {name}: {what} differs by {error}"
            if name.startswith("skewed"):  # every token went to rank 0's experts (0 and 1)
                assert sum(case["stats"][2:]) == 0 and sum(case["stats"][:2]) == 2 * case["tokens"]
    # the empty-rank scenarios really had ranks without tokens
    assert json.loads((tmp_path / "report1.json").read_text())["empty_rank"]["tokens"] == 0


DDP_TRAINING_BODY = (
    COMMON
    + """
from torch.nn.parallel import DistributedDataParallel as DDP

ep_size = int(os.environ["EP_SIZE"])
# With data-parallel replicas of the expert-parallel groups, the bias follows the loads of every rank.
bias_group = dist.group.WORLD if ep_size < world else None

def make_model(group=None):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, H), build(dict(top_k=2, bias_update_rate=0.01,
                               bias_update_group=bias_group, selection_bias=True, shared_expert_size=8), False,
                               group), torch.nn.Linear(H, 3))

def batch(step, r):
    g = torch.Generator().manual_seed(1000 * step + r)
    return torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)

if ep_size == world:
    ep_group, replica_group = dist.group.WORLD, None  # the same group as DDP's all-reduces
else:  # expert parallelism within blocks of ep_size ranks, data parallelism across the blocks
    blocks = [dist.new_group(list(range(b, b + ep_size))) for b in range(0, world, ep_size)]
    replicas = [dist.new_group(list(range(i, world, ep_size))) for i in range(ep_size)]
    ep_group, replica_group = blocks[rank // ep_size], replicas[rank % ep_size]
model = make_model(ep_group)
excluded = moe_dist.exclude_experts_from_ddp(model)
assert excluded == ["1.w_in", "1.w_out"], excluded
ddp = DDP(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
norms = []
for step in range(4):
    x, t = batch(step, rank)
    opt.zero_grad()
    torch.nn.functional.mse_loss(ddp(x), t).backward()
    moe_dist.average_expert_gradients(model, replica_group)
    norms.append(float(moe_dist.clip_grad_norm_(model, 0.05)))
    opt.step()
state = moe_dist.full_state_dict(model)
if rank == 0:
    torch.save(state, out / "ep_state.pt")
(out / f"norms{rank}.json").write_text(json.dumps(norms))
(out / f"bias{rank}.json").write_text(json.dumps(model[1].selection_bias.tolist()))
"""
)


@pytest.mark.parametrize(("world", "ep_size"), [(2, 2), (4, 2)], ids=["ep2", "ep2xdp2"])
def test_ddp_dense_and_expert_parallel_training_matches_single_process(tmp_path, world, ep_size):
    run_workers(DDP_TRAINING_BODY, world, tmp_path, env={"EP_SIZE": str(ep_size)})
    trained = torch.load(tmp_path / "ep_state.pt")

    # The same steps on one process: the mean of the ranks' losses (each with its own aux loss).
    namespace: dict = {"torch": torch}
    exec(COMMON, namespace)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        namespace["build"](dict(top_k=2, bias_update_rate=0.0, selection_bias=True, shared_expert_size=8), False),
        torch.nn.Linear(12, 3),
    )
    moe_ext.set_aux_loss_scale(model, 1.0 / world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layer = model[1]
    norms = []
    for step in range(4):
        opt.zero_grad()
        counts = torch.zeros(8, dtype=torch.int64)
        for r in range(world):
            g = torch.Generator().manual_seed(1000 * step + r)
            x, t = torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)
            (torch.nn.functional.mse_loss(model(x), t) / world).backward()
            counts += layer.last_stats.tokens_per_expert
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        opt.step()
        # the layers update their shared bias from the loads of every rank's tokens
        moe_ext.routing.balance_bias_update(layer.selection_bias, counts, 0.01)
    expected = model.state_dict()
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert layer.selection_bias.abs().sum() > 0  # the bias did move
    for rank in range(world):  # every rank holds that bias, not only rank 0 (DDP's broadcast) or its own block
        bias = torch.tensor(json.loads((tmp_path / f"bias{rank}.json").read_text()))
        torch.testing.assert_close(bias, layer.selection_bias, rtol=0, atol=0, msg=f"selection_bias on rank {rank}")
    for rank in range(world):  # the same clipping norm on every rank, as on one process (and it did clip)
        ep_norms = json.loads((tmp_path / f"norms{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(ep_norms), torch.tensor(norms), rtol=1e-5, atol=1e-6)
    assert min(norms) > 0.05


CHECKPOINT_BODY = (
    COMMON
    + """
kwargs = dict(top_k=2, expert_bias=True)
layer = build(kwargs, False, dist.new_group(list(range(world))))
x, _ = inputs(rank, [5, 5, 5, 5])
if os.environ["MODE"] == "save":
    with torch.no_grad():
        for p in layer.parameters():  # move away from the seeded init, so loading really matters
            p.add_(0.01 * rank + 0.003)
    local = layer.state_dict()
    state = moe_dist.full_state_dict(model=layer)
    if rank == 0:
        torch.save(state, out / "ckpt.pt")
    torch.save({"local": local, "y": layer(x).detach()}, out / f"saved{rank}.pt")
else:
    torch.manual_seed(123)
    layer = moe_ext.MoE(H, F, E, router_bias=True, expert_parallel_group=dist.new_group(list(range(world))), **kwargs)
    layer.load_state_dict(torch.load(out / "ckpt.pt"))
    torch.save(layer(x).detach(), out / f"loaded{rank}_of{world}.pt")
    try:  # a shard of another world size is refused with a message naming the layouts
        other = torch.load(out / "saved0.pt")["local"]
        layer.load_state_dict(other)
        raise AssertionError("loading a 2-rank shard at world size 4 did not fail")
    except RuntimeError as error:
        assert "holds 4 experts" in str(error) and "full_state_dict" in str(error), str(error)
"""
)


def test_checkpoint_saved_at_world_size_2_loads_at_1_and_4(tmp_path):
    run_workers(CHECKPOINT_BODY, 2, tmp_path, env={"MODE": "save"})
    state = torch.load(tmp_path / "ckpt.pt")
    assert state["w_in"].shape[0] == 8 and state["b_out"].shape[0] == 8

    # world size 1: a plain single-process layer
    namespace: dict = {"torch": torch}
    exec(COMMON, namespace)
    single = moe_ext.MoE(12, 20, 8, top_k=2, expert_bias=True, router_bias=True)
    single.load_state_dict(state)
    for rank in range(2):
        x, _ = namespace["inputs"](rank, [5, 5, 5, 5])
        saved = torch.load(tmp_path / f"saved{rank}.pt")["y"]
        torch.testing.assert_close(single(x), saved, rtol=1e-5, atol=1e-6)

    # world size 4
    run_workers(CHECKPOINT_BODY, 4, tmp_path, env={"MODE": "load"})
    for rank in range(4):
        x, _ = namespace["inputs"](rank, [5, 5, 5, 5])
        torch.testing.assert_close(torch.load(tmp_path / f"loaded{rank}_of4.pt"), single(x), rtol=1e-5, atol=1e-6)


CLONE_BODY = (
    COMMON
    + """
group = dist.new_group(list(range(world)))
layer, full = build({}, False, group), build({}, False)
layer.clone_expert(1, 6, copy_router=True)  # expert 1 lives on rank 0, slot 6 on rank 1 (of 2) or 3 (of 4)
full.clone_expert(1, 6, copy_router=True)
lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
assert torch.equal(layer.w_in, full.w_in[lo:hi]) and torch.equal(layer.w_out, full.w_out[lo:hi])
assert torch.equal(layer.router.weight, full.router.weight)
"""
)


@pytest.mark.parametrize("world", [2, 4])
def test_clone_expert_across_ranks(tmp_path, world):
    run_workers(CLONE_BODY, world, tmp_path)


BAD_CONFIG_BODY = (
    COMMON
    + """
case = os.environ["CASE"]
group = dist.new_group(list(range(world)))
if case == "indivisible":
    moe_ext.MoE(H, F, 6 if world == 4 else 7, expert_parallel_group=group)
elif case == "top_k":
    moe_ext.MoE(H, F, E, top_k=1 + rank, expert_parallel_group=group)
elif case == "hidden":
    moe_ext.MoE(H + rank, F, E, expert_parallel_group=group)
elif case == "experts":
    moe_ext.MoE(H, F, 8 * (1 + rank), expert_parallel_group=group)
elif case == "capacity":
    moe_ext.MoE(H, F, E, capacity_factor=1.0 + rank, expert_parallel_group=group)
"""
)


@pytest.mark.parametrize(
    ("case", "world", "fragment"),
    [
        ("indivisible", 2, "num_experts = 7 must be divisible by the expert_parallel_group size 2"),
        ("indivisible", 4, "num_experts = 6 must be divisible by the expert_parallel_group size 4"),
        ("top_k", 2, "top_k: rank 0=1, rank 1=2"),
        ("hidden", 2, "hidden_size: rank 0=12, rank 1=13"),
        ("experts", 2, "num_experts: rank 0=8, rank 1=16"),
        ("capacity", 4, "capacity_factor: rank 0=1.0, rank 1=2.0, rank 2=3.0, rank 3=4.0"),
    ],
)
def test_bad_configuration_fails_on_every_rank(tmp_path, case, world, fragment):
    errors = run_workers(BAD_CONFIG_BODY, world, tmp_path, env={"CASE": case}, expect_failure=True, timeout=120)
    for rank, err in enumerate(errors):
        assert "ValueError" in err and fragment in err, f"rank {rank}:\n{err[-2000:]}"


def test_single_process_errors_and_helpers():
    group_free = moe_ext.MoE(8, 16, 4)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        moe_ext.MoE(8, 16, 4, expert_parallel_group=object())
    assert moe_dist.expert_parameters(group_free) == []  # no expert-parallel layer: everything is dense
    assert len(moe_dist.dense_parameters(group_free)) == len(list(group_free.parameters()))
    assert moe_dist.full_state_dict(group_free).keys() == group_free.state_dict().keys()


def test_example_trains_under_torchrun_and_its_checkpoint_loads_on_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from multiprocess import ROOT, free_port

    ckpt, summary = tmp_path / "ckpt.pt", tmp_path / "summary.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        os.path.join(ROOT, "examples", "train_expert_parallel.py"),
        "--steps", "6", "--batch", "2", "--context", "32", "--width", "32", "--save", str(ckpt), "--json", str(summary),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "world size 2 (gloo), 8 experts -> 4 per rank" in done.stdout
    result = json.loads(summary.read_text())
    assert result["world_size"] == 2 and result["tokens_per_step"] == 2 * 2 * 32 and result["median_step_s"] > 0

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from train_tiny_lm import TinyLM

    model = TinyLM(32, 2, heads=4, context=32)
    moe_ext.replace_modules(
        model, lambda name, m: name.endswith(".ffn"), lambda name, m: moe_ext.MoE(32, 64, 8, top_k=2, z_loss_coef=1e-3)
    )
    model.load_state_dict(torch.load(ckpt))  # strict: every key, every expert
    tokens = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(tokens)).all()
