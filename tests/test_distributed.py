"""torchext under torch.distributed (issue 16): 2 ranks on gloo, as one job for the whole module.

Every check of tests/distributed_checks.py (nGPT's renormalize_ on DTensors and training under FSDP2 and DDP,
Int8Linear and the attention modules under tensor parallelism, the README's distributed examples) runs on every rank
of one job started once for this module (about 25 s of the 2 CPU cores); each test here reports one check. The
``gpu`` variant runs the same checks on NCCL, one rank per GPU, where there are at least 2.
"""

import pytest
import torch
import torch.distributed as dist

from distributed_checks import CHECKS, launch

# One xdist worker takes the whole module (./dev runs xdist with --dist loadgroup), so the job starts once.
pytestmark = [pytest.mark.xdist_group("distributed"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]


@pytest.fixture(scope="module")
def gloo_results():
    return launch(world_size=2, backend="gloo")


@pytest.mark.run_first
@pytest.mark.parametrize("name", list(CHECKS))
def test_on_two_cpu_ranks(gloo_results, name):
    result = gloo_results[name]
    assert result["ok"], result["error"]
    print(name, {k: v for k, v in result.items() if k not in ("ok", "error")})


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one rank per GPU)")
def test_on_gpus_with_nccl():
    results = launch(world_size=torch.cuda.device_count(), backend="nccl")
    failed = {name: r["error"] for name, r in results.items() if not r["ok"]}
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
