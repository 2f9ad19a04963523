"""Serve an int8 model with tensor parallelism: shard the float model with parallelize_module, then quantize it with
replace_linear, on every rank:

    torchrun --nproc-per-node 2 examples/int8_tensor_parallel.py

The model here is a stack of transformer-style MLP blocks (the layers that hold most of an LLM's weights); the plan
is Megatron's: the up-projection colwise (each rank computes its own hidden features from the whole input) and the
down-projection rowwise (each rank multiplies its hidden slice, and one all_reduce sums the partial outputs). The
order matters: torch's ColwiseParallel / RowwiseParallel shard only nn.Linear, and replace_linear turns each sharded
nn.Linear into an Int8Linear whose int8 codes, per-row scales and outlier columns are split to match.
tests/distributed_checks.py runs ``main`` on 2 CPU ranks in CI.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torchext.nn import replace_linear


class MLPBlock(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def main(d_model: int = 256, n_blocks: int = 4) -> float:
    """Returns the int8 model's largest error relative to the float model's output peak (rank 0 prints it)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same float weights and inputs on every rank (a real model is loaded instead)
    model = nn.Sequential(*(MLPBlock(d_model) for _ in range(n_blocks))).to(device)
    x = torch.randn(8, d_model, device=device)
    x[:, 7] *= 20  # an outlier feature, as LLM activations have: its column takes LLM.int8()'s 16-bit path
    with torch.no_grad():
        expected = model(x)

    plan = {f"{i}.up": ColwiseParallel() for i in range(n_blocks)}
    plan.update({f"{i}.down": RowwiseParallel() for i in range(n_blocks)})
    parallelize_module(model, mesh, plan)
    replace_linear(model)  # after parallelize_module: each rank quantizes the whole layer, keeps its shard
    with torch.no_grad():
        y = model(x)
    error = float((y - expected).abs().max() / expected.abs().max())
    if rank == 0:
        print(f"int8, {world}-way tensor parallel: max error {error:.2%} of the float output's peak")
    return error


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
