"""Train nGPT with FSDP2 (``fully_shard``), one process per GPU, or CPU processes on gloo:

    torchrun --nproc-per-node 8 examples/ngpt_fsdp.py              # GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/ngpt_fsdp.py --steps 50   # CPU (gloo)

Every rank trains on its own slice of each batch (bytes of torchext's own sources: no download). After each optimizer
step, ``renormalize_after_step`` puts every matrix back on the unit sphere: under fully_shard each rank holds a dim-0
shard of every weight, so rows are normalised locally and columns (the attention and MLP out-projections) from
squared norms that one all_reduce sums across ranks, for all column-normalised matrices together.

Every rank builds the model from the same seed, so the shards fit together (a large model would be built on the
meta device and loaded instead). tests/distributed_checks.py runs ``main`` on 2 CPU ranks in CI.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from torchext.nn import NGPT, NGPTConfig, renormalize_after_step


def corpus(device: torch.device) -> torch.Tensor:
    """The bytes of torchext's Python sources, as int64 token ids (vocab 256)."""
    files = sorted((Path(__file__).resolve().parent.parent / "torchext").rglob("*.py"))
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.int64, device=device)


def main(steps: int = 200, d_model: int = 128, n_layers: int = 4, seq_len: int = 128, batch_per_rank: int = 8,
         log_every: int = 50) -> list[float]:
    """Train; returns the loss of each step averaged over the ranks (rank 0 prints some)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)
    model = NGPT(NGPTConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, max_seq_len=seq_len),
                 device=device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.95))  # nGPT: no weight decay, no warmup
    renormalizer = renormalize_after_step(optimizer, model)

    data = corpus(device)
    generator = torch.Generator().manual_seed(rank)  # each rank draws its own windows
    losses = []
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_per_rank,), generator=generator)
        windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world)
        if step % log_every == 0 or step == steps - 1:
            renormalizer.check()  # raises if a step met a zero row or column
            if rank == 0:
                print(f"step {step}: loss {losses[-1]:.3f} nats/byte")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train nGPT under FSDP2 (run with torchrun).")
    parser.add_argument("--steps", type=int, default=200)
    main(steps=parser.parse_args().steps)
    dist.destroy_process_group()
