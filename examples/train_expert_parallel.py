"""Trains the tiny byte-level MoE language model of train_tiny_lm.py with its experts sharded over processes.

Expert parallelism on the experts (moe_ext.MoE(expert_parallel_group=...): each rank holds E / W experts
and exchanges token rows with all_to_all), data parallelism on everything else (DistributedDataParallel
with the expert shards excluded). Each rank reads its own batches; the global batch is W x --batch.

    torchrun --nproc-per-node 2 examples/train_expert_parallel.py          # gloo on CPU
    torchrun --nproc-per-node 4 examples/train_expert_parallel.py --steps 20
    python examples/train_expert_parallel.py                               # one process (world size 1)

On GPUs the same script runs with --backend nccl (one process per GPU). It prints the loss, the median step
time and the tokens per second, and with --save writes a full checkpoint (all experts, the single-process
layout) that loads at any world size dividing the number of experts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from train_tiny_lm import TinyLM, load_corpus

import moe_ext
import moe_ext.distributed as moe_dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per process)")
    parser.add_argument("--save", default=None, help="write the full checkpoint here at the end")
    parser.add_argument("--json", default=None, help="append the timing summary here (rank 0)")
    args = parser.parse_args()

    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    dist.init_process_group(args.backend, timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    # The same seed everywhere: dense weights start equal on every rank, and each rank's expert
    # shard is exactly the slice of the experts a single process would draw.
    torch.manual_seed(args.seed)
    model = TinyLM(args.width, args.layers, heads=4, context=args.context)
    moe_ext.replace_modules(
        model,
        match=lambda name, module: name.endswith(".ffn"),
        build=lambda name, module: moe_ext.MoE(
            args.width,
            2 * args.width,
            args.experts,
            top_k=args.top_k,
            z_loss_coef=1e-3,
            expert_parallel_group=dist.group.WORLD,
        ),
    )
    model.to(device)
    excluded = moe_dist.exclude_experts_from_ddp(model)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own batches
    if rank == 0:
        print(
            f"world size {world} ({args.backend}), {args.experts} experts -> {args.experts // world} per rank, "
            f"{len(excluded)} expert tensors excluded from DDP, {torch.get_num_threads()} threads per rank"
        )

    step_times, losses = [], []
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=generator)
        window = torch.stack([data[s : s + args.context + 1] for s in starts.tolist()]).to(device)
        begin = time.perf_counter()
        logits = ddp(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        moe_dist.average_expert_gradients(model)  # experts: gradient of the mean loss, as DDP gives the rest
        moe_dist.clip_grad_norm_(model, 1.0)
        optimizer.step()
        step_times.append(time.perf_counter() - begin)
        losses.append(loss.detach())
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            mean = torch.stack(losses[-10:]).mean()
            print(f"step {step:4d}  loss {float(mean):.3f} (rank 0's batches)  {step_times[-1] * 1e3:.0f} ms/step")

    timed = step_times[min(5, len(step_times) - 1) :]  # the first steps warm up allocators and threads
    median = statistics.median(timed)
    tokens = world * args.batch * args.context
    summary = {
        "world_size": world,
        "backend": args.backend,
        "threads_per_rank": torch.get_num_threads(),
        "median_step_s": median,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "final_loss_rank0": float(torch.stack(losses[-10:]).mean()),
    }
    state = moe_dist.full_state_dict(model)  # a collective: every rank takes part
    if rank == 0:
        print(f"median step {median * 1e3:.1f} ms, {tokens / median:,.0f} tokens/s ({tokens} tokens per step)")
        if args.save:
            torch.save(state, args.save)
            print(f"full checkpoint: {args.save}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(summary) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
