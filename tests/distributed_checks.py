"""Checks that need several processes, run as ONE job: every rank runs every check in order, and the results (pass or
the error, plus what each check measured) come back as one dict. tests/test_distributed.py starts the job once per
test module (2 CPU ranks on gloo in CI; NCCL on 2 GPUs where there are). Run it by hand to see the measurements:

    python tests/distributed_checks.py                      # 2 ranks, gloo on CPU
    python tests/distributed_checks.py --backend nccl       # one rank per GPU

Ranks start as plain subprocesses that meet through a file (init_method file://), so no TCP port is chosen. Each
rank runs with one intra-op thread (two ranks share two cores; more threads only spin) and without
TRITON_INTERPRET: what is checked here is the sharding around the ops, which is the same on every backend (the
kernels themselves are tested against the references elsewhere).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {}  # name -> check(device) -> dict of measurements; raises on failure. Every rank runs every check.


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# ---- launching --------------------------------------------------------------------------------------------------


def launch(world_size: int = 2, backend: str = "gloo", timeout: float = 300.0) -> dict:
    """Run every check on ``world_size`` ranks; returns {check name: {"ok": bool, "error": str, ...measurements}},
    a check passing only if it passed on every rank (measurements are rank 0's)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(OMP_NUM_THREADS="1", WORLD_SIZE=str(world_size), TORCHEXT_DIST_BACKEND=backend,
                   TORCHEXT_DIST_DIR=tmp, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank)], env={**env, "RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world_size)]
        deadline, logs = time.monotonic() + timeout, []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"the distributed job ran past {timeout:.0f} s") from None
        results = []
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            out = Path(tmp) / f"rank{rank}.json"
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"rank {rank} exited with {proc.returncode}:\n{log[-4000:]}")
            results.append(json.loads(out.read_text()))
    merged = {}
    for name in CHECKS:
        per_rank = [r[name] for r in results]
        failed = [f"rank {rank}: {r['error']}" for rank, r in enumerate(per_rank) if not r["ok"]]
        merged[name] = {**per_rank[0], "ok": not failed, "error": "\n".join(failed)}
    return merged


def _rank_main(rank: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world_size, backend = int(os.environ["WORLD_SIZE"]), os.environ["TORCHEXT_DIST_BACKEND"]
    out_dir = Path(os.environ["TORCHEXT_DIST_DIR"])
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A check that fails between two collectives leaves the other rank waiting: the timeout turns that into an error.
    dist.init_process_group(backend, init_method=f"file://{out_dir / 'rendezvous'}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    results = {}
    for name, fn in CHECKS.items():
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, **(fn(device) or {})}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ---- helpers ----------------------------------------------------------------------------------------------------


def _mesh(device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _max_diff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# ---- nGPT: renormalize_ on DTensors, training under FSDP2 and DDP -------------------------------------------------


@check
def renormalize_dtensors_match_one_process(device):
    """renormalize_ on DTensor shards equals renormalize_ on the whole tensors: rows and columns, uneven shards, an
    empty shard, a 3-D tensor, a Shard(1) split, a replicated tensor, bf16, a zero column; and all the split vectors
    of one call cost one all_reduce (the vectors whole on each rank, none)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torchext import ops
    from torchext.reference import ngpt as ref

    mesh = _mesh(device)
    gen = torch.Generator().manual_seed(1)
    cases = [((7, 5), 0, Shard(0), torch.float32), ((7, 5), 1, Shard(0), torch.float32),
             ((1, 6), 0, Shard(0), torch.float32), ((5, 3, 4), 0, Shard(0), torch.float32),
             ((5, 3, 4), 1, Shard(0), torch.float32), ((6, 9), 1, Shard(1), torch.float32),
             ((4, 4), 0, Replicate(), torch.float32), ((9, 6), 0, Shard(0), torch.bfloat16)]
    wholes = [torch.randn(shape, generator=gen).to(dtype) for shape, _, _, dtype in cases]
    wholes[0][:, 2] = 0  # a zero column, counted
    dims = [dim for _, dim, _, _ in cases]
    sharded = [distribute_tensor(w.to(device), mesh, [p]) for w, (_, _, p, _) in zip(wholes, cases)]

    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real_all_reduce(*args, **kwargs)
    try:
        counts = ops.renormalize_(sharded, dims)
        collectives_split = len(calls)
        calls.clear()
        row_only = [distribute_tensor(w.to(device), mesh, [Shard(0)]) for w in wholes[:1]]
        ops.renormalize_(row_only, [1])
        collectives_whole = len(calls)
    finally:
        dist.all_reduce = real_all_reduce
    expected = [w.clone() for w in wholes]
    expected_counts = ref.renormalize_(expected, dims)
    worst = {}
    for (shape, dim, placement, dtype), got, want in zip(cases, sharded, expected):
        diff = _max_diff(got.full_tensor().cpu(), want)
        worst[str(dtype)] = max(worst.get(str(dtype), 0.0), diff)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # bf16: fp64 vs fp32 math may round to the next value
        assert diff <= tol, f"{shape} dim {dim} {placement} {dtype}: differs from one process by {diff:.3g}"
    assert collectives_split == 1, f"{collectives_split} all_reduce calls for the split vectors, expected 1"
    assert collectives_whole == 0, f"{collectives_whole} all_reduce calls for whole rows, expected 0"
    assert int(counts[0]) == 1 and int(expected_counts[0]) == 1, f"zero column counts {counts.tolist()}"
    return {"max_diff_fp32": worst["torch.float32"], "max_diff_bf16": worst["torch.bfloat16"]}


@check
def naive_shard_renormalization_is_wrong(device):
    """The reduction is necessary: normalising each rank's shard of a column-normalised weight on its own (what
    renormalize_ would do if it ignored the sharding) leaves columns of norm sqrt(ranks), not 1; rows under the same
    dim-0 sharding are whole on each rank and come out right either way."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    from torchext import ops

    mesh = _mesh(device)
    whole = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    naive, right = (distribute_tensor(whole.to(device), mesh, [Shard(0)]) for _ in range(2))
    ops.renormalize_([naive.to_local()], [0])  # each shard alone: wrong
    ops.renormalize_([right], [0])
    naive_dev = float((naive.full_tensor().norm(dim=0) - 1).abs().max())
    right_dev = float((right.full_tensor().norm(dim=0) - 1).abs().max())
    rows = distribute_tensor(whole.to(device), mesh, [Shard(0)])
    ops.renormalize_([rows.to_local()], [1])
    rows_dev = float((rows.full_tensor().norm(dim=1) - 1).abs().max())
    world = dist.get_world_size()
    assert world == 1 or naive_dev > 0.5 * (math.sqrt(world) - 1), f"naive per-shard columns deviate by {naive_dev}"
    assert right_dev < 1e-6 and rows_dev < 1e-6, f"renormalize_ columns {right_dev}, local rows {rows_dev}"
    return {"naive_column_norm_deviation": naive_dev, "renormalize_column_norm_deviation": right_dev}


NGPT_STEPS = 20


def _ngpt_config():
    from torchext.nn import NGPTConfig

    # vocab 33: the embedding and head rows split 17 / 16 over 2 ranks (uneven shards)
    return NGPTConfig(vocab_size=33, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)


def _unit_deviation(model) -> float:
    """max | ||vector|| - 1 | over every normalised matrix (whole, gathered from shards) along its norm_dim."""
    from torchext.nn.ngpt import _normalized_weights

    worst = 0.0
    for weight, dim in zip(*_normalized_weights(model)):
        whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        worst = max(worst, float((whole.detach().double().norm(dim=dim) - 1).abs().max()))
    return worst


def _train_ngpt(model, batch, targets, device, average_loss) -> tuple[list[float], float]:
    """NGPT_STEPS Adam steps with renormalize_after_step; (the loss of each step, the worst unit-norm deviation
    after any step)."""
    import torch

    from torchext.nn import renormalize_after_step

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    hook = renormalize_after_step(optimizer, model)
    losses, worst = [], 0.0
    for _ in range(NGPT_STEPS):
        _, loss = model(batch, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(average_loss(loss.detach()))
        worst = max(worst, _unit_deviation(model))
    hook.check()
    return losses, worst


def _ngpt_data(device):
    import torch

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, _ngpt_config().vocab_size, (4, 9), generator=gen)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def _one_process_losses(device) -> list[float]:
    import torch

    from torchext.nn import NGPT

    torch.manual_seed(0)
    model = NGPT(_ngpt_config(), device=device)
    batch, targets = _ngpt_data(device)
    return _train_ngpt(model, batch, targets, device, float)[0]


def _ngpt_parallel(device, wrap) -> dict:
    """The same model and data as one process, wrapped by ``wrap``, each rank on its slice of the batch; the loss of
    each step averaged over ranks (equal slices: the mean over the whole batch)."""
    import torch
    import torch.distributed as dist

    from torchext.nn import NGPT

    reference = _one_process_losses(device)
    torch.manual_seed(0)
    model = wrap(NGPT(_ngpt_config(), device=device))
    batch, targets = _ngpt_data(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * batch.shape[0] // world, (rank + 1) * batch.shape[0] // world)

    def average(loss):
        dist.all_reduce(loss)
        return float(loss) / world

    losses, worst = _train_ngpt(model, batch[rows], targets[rows], device, average)
    loss_diff = max(abs(a - b) for a, b in zip(losses, reference))
    assert losses[-1] < losses[0] - 0.05, f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert loss_diff < 1e-4, f"loss curve differs from one process by {loss_diff:.3g}"
    assert worst < 1e-5, f"a normalised vector has norm 1 +- {worst:.3g} after a step"
    return {"max_loss_diff": loss_diff, "max_unit_norm_deviation": worst, "first_loss": losses[0],
            "last_loss": losses[-1]}


@check
def ngpt_fsdp2_matches_one_process(device):
    """NGPT under fully_shard (each block and the root) trains like one process over 20 steps, unit vectors after
    every step."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)

    def shard(model):
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    return _ngpt_parallel(device, shard)


@check
def ngpt_ddp_matches_one_process(device):
    """NGPT under DDP trains like one process over 20 steps, unit vectors after every step."""
    from torch.nn.parallel import DistributedDataParallel

    return _ngpt_parallel(device, lambda model: DistributedDataParallel(model))


# ---- Int8Linear under tensor parallelism ----------------------------------------------------------------------------


def _int8_input(device):
    """[5, 16] activations with two outlier columns (|x| up to ~30, over the 6.0 threshold)."""
    import torch

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    x[:, 3] *= 15
    x[:, 11] *= 10
    return x.to(device)


def _parallel_int8(linear, mesh, style, outlier_cols=None, outliers="dynamic"):
    """linear (in a Sequential) parallelized with ``style``, then replace_linear: the order the docs give."""
    from torch import nn
    from torch.distributed.tensor.parallel import parallelize_module

    from torchext.nn import replace_linear

    model = parallelize_module(nn.Sequential(linear), mesh, {"0": style})
    replace_linear(model, outliers=outliers, outlier_cols=None if outlier_cols is None else {"0": outlier_cols})
    return model


@check
def int8_linear_tensor_parallel(device):
    """Int8Linear after ColwiseParallel / RowwiseParallel + replace_linear, dynamic and static outliers, uneven splits
    (23 features over 2 ranks): colwise equals the one-process layer; rowwise equals the sum over ranks of
    int8_linear on each rank's K-slice (each slice quantized with its own row absmax) and is as close to the float
    layer as one process is."""
    import copy

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from torchext import ops
    from torchext.nn import Int8Linear

    mesh = _mesh(device)
    torch.manual_seed(5)
    x = _int8_input(device)
    measured = {}
    for outliers in ("dynamic", "static"):
        cols = torch.tensor([3, 11], device=device) if outliers == "static" else None
        # colwise: all of K on every rank, this rank's rows of the output; gathered here to compare
        linear = nn.Linear(16, 23, device=device)
        one = Int8Linear.from_float(linear, outliers=outliers, outlier_cols=cols)
        tp = _parallel_int8(copy.deepcopy(linear), mesh, ColwiseParallel(output_layouts=Replicate()), cols, outliers)
        diff = _max_diff(tp(x), one(x))
        assert diff <= 1e-5, f"colwise {outliers}: differs from one process by {diff:.3g}"
        measured[f"colwise_{outliers}_max_diff"] = diff

        # rowwise: this rank's K-slice of x and of the codes; partial outputs summed
        h = torch.relu(linear(x)).detach() * 3  # some columns over the threshold
        linear2 = nn.Linear(23, 16, device=device)
        cols2 = torch.tensor([0, 12, 20], device=device) if outliers == "static" else None
        one = Int8Linear.from_float(linear2, outliers=outliers, outlier_cols=cols2)
        tp = _parallel_int8(copy.deepcopy(linear2), mesh, RowwiseParallel(input_layouts=Replicate()), cols2, outliers)
        y_tp = tp(h)
        slices = torch.arange(23).chunk(dist.get_world_size())
        by_slices = linear2.bias.detach().clone()
        for k in slices:
            k = k.to(device)
            static = None
            if outliers == "static":
                static = torch.nonzero(one.weight16_slot[k] >= 0).flatten().to(torch.int32)
            by_slices = by_slices + ops.int8_linear(
                h[:, k].contiguous(), one.weight[:, k].contiguous(), one.SCB, None, one.threshold, None, static,
                one.weight16, one.weight16_slot[k].contiguous() if one.weight16_slot is not None else None)
        diff = _max_diff(y_tp, by_slices)
        assert diff <= 1e-5, f"rowwise {outliers}: differs from the sum over K-slices by {diff:.3g}"
        exact = linear2(h).detach()
        err_tp, err_one = _max_diff(y_tp, exact), _max_diff(one(h), exact)
        assert err_tp <= 1.5 * err_one, f"rowwise {outliers}: error {err_tp:.3g} vs one process {err_one:.3g}"
        measured.update({f"rowwise_{outliers}_vs_slices": diff, f"rowwise_{outliers}_error": err_tp,
                         f"one_process_{outliers}_error": err_one})
    return measured


@check
def int8_mlp_tensor_parallel_forward_backward(device):
    """A colwise -> rowwise MLP (the Megatron plan, local hidden between the layers) converted by replace_linear
    after parallelize_module: outputs, input gradients and bias gradients as one process (to int8 rounding), and
    calibrate_outliers on the parallel float model finds the one-process columns."""
    import copy

    import torch
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from torchext.nn import calibrate_outliers, replace_linear

    mesh = _mesh(device)
    torch.manual_seed(6)
    mlp = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16)).to(device)  # local hidden: even split
    x = _int8_input(device)
    tp = parallelize_module(copy.deepcopy(mlp), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    cols_one, cols_tp = calibrate_outliers(mlp, [x]), calibrate_outliers(tp, [x])
    assert {k: v.tolist() for k, v in cols_one.items()} == {k: v.tolist() for k, v in cols_tp.items()}, \
        f"calibration: one process {cols_one}, tensor parallel {cols_tp}"
    one = copy.deepcopy(mlp)
    replace_linear(one, outliers="static", outlier_cols=cols_one)
    replace_linear(tp, outliers="static", outlier_cols=cols_tp)
    grads = []
    for model in (one, tp):
        xg = x.clone().requires_grad_()
        y = model(xg)
        y.square().sum().backward()
        grads.append((y.detach(), xg.grad, model[0].bias.grad.full_tensor() if hasattr(model[0].bias.grad,
                      "full_tensor") else model[0].bias.grad))
    (y1, gx1, gb1), (y2, gx2, gb2) = grads
    scale = float(y1.abs().max())
    out_diff, gx_diff, gb_diff = _max_diff(y1, y2) / scale, _max_diff(gx1, gx2), _max_diff(gb1, gb2)
    assert out_diff < 2e-2, f"output differs from one process by {out_diff:.3g} of its peak"
    assert gx_diff < 5e-2 * float(gx1.abs().max()) and gb_diff < 5e-2 * float(gb1.abs().max()), \
        f"gradients differ: input {gx_diff:.3g}, bias {gb_diff:.3g}"
    return {"output_rel_diff": out_diff, "input_grad_diff": gx_diff, "bias_grad_diff": gb_diff}


@check
def int8_wrong_orders_say_what_to_do(device):
    """replace_linear before parallelize_module: torch's styles refuse a non-nn.Linear (and the docs give the order);
    replace_linear on a fully_shard model: refused with the order that works."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from torchext.nn import replace_linear

    mesh = _mesh(device)
    model = nn.Sequential(nn.Linear(8, 8)).to(device)
    replace_linear(model)
    try:
        parallelize_module(model, mesh, {"0": ColwiseParallel()})
        raise AssertionError("parallelize_module accepted an Int8Linear")
    except NotImplementedError as e:
        assert "nn.Linear" in str(e), e
    sharded = fully_shard(nn.Sequential(nn.Linear(8, 8)).to(device), mesh=mesh)
    try:
        replace_linear(sharded)
        raise AssertionError("replace_linear accepted a fully_shard model")
    except NotImplementedError as e:
        assert "before fully_shard" in str(e), e
    # ... and that order works: quantize, then fully_shard (the bias is sharded, the int8 buffers replicated)
    torch.manual_seed(7)
    float_model = nn.Sequential(nn.Linear(8, 8)).to(device)
    x = torch.randn(3, 8, device=device)
    replace_linear(float_model)
    expected = float_model(x)
    got = fully_shard(float_model, mesh=mesh)(x)
    assert _max_diff(got, expected) <= 1e-6, "replace_linear then fully_shard changed the outputs"


# ---- attention modules under head-sharded tensor parallelism --------------------------------------------------------


def _heads_plan(colwise, rowwise):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in colwise}, **{name: RowwiseParallel() for name in rowwise}}


def _expect_error(fn, error, text):
    try:
        fn()
    except error as e:
        assert text in str(e), f"{error.__name__} without {text!r}: {e}"
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")


@check
def tensor_attention_head_sharded(device):
    """TensorAttention with q, k1, k2, v1, v2 colwise and out rowwise (GQA: 4 query heads, 2 kv heads over 2 ranks)
    gives the one-process output; a split that cuts a head is refused with the reason."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import parallelize_module

    from torchext.nn import TensorAttention

    mesh = _mesh(device)
    torch.manual_seed(8)
    plan = _heads_plan(("q", "k1", "k2", "v1", "v2"), ("out",))
    attn = TensorAttention(d_model=16, n_heads=4, n_kv_heads=2, device=device)
    x = torch.randn(2, 6, 16, device=device)
    diff = _max_diff(parallelize_module(copy.deepcopy(attn), mesh, plan)(x), attn(x))
    assert diff <= 1e-5, f"head-sharded TensorAttention differs from one process by {diff:.3g}"
    if dist.get_world_size() == 2:
        cut = parallelize_module(TensorAttention(d_model=12, n_heads=3, device=device), mesh, plan)
        _expect_error(lambda: cut(torch.randn(1, 4, 12, device=device)), ValueError, "must divide n_heads")
    return {"max_diff": diff}


def _attention_layer(d_model, head_dim, device):
    """An attention layer as users write it: q, k, v, out projections around F.scaled_dot_product_attention, the
    heads counted from the projections' widths."""
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.head_dim = head_dim
            self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model, bias=False, device=device)
                                                for _ in range(4))

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))

    return Attention()


@check
def kde_attention_head_sharded(device):
    """KDEAttention inside a head-sharded attention layer (q, k, v colwise, out rowwise): each rank estimates its own
    heads, so the output is the one-process layer's with each rank's heads run through kde_attention (the draws of a
    head are keyed by its index in the call, i.e. its local index; the default seed=None draws fresh ones anyway)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import parallelize_module

    from torchext.nn import KDEAttention, use_kde_attention
    from torchext.ops import kde_attention

    mesh = _mesh(device)
    torch.manual_seed(9)
    layer = _attention_layer(d_model=32, head_dim=8, device=device)
    kde = KDEAttention(bucket_size=16, num_samples=16, min_seq_len=0, seed=0)
    x = torch.randn(2, 64, 32, device=device)
    tp = parallelize_module(copy.deepcopy(layer), mesh, _heads_plan("qkv", ("out",)))
    with use_kde_attention(tp, kde):
        y_tp = tp(x)
    B, T, _ = x.shape
    q, k, v = (p(x).view(B, T, -1, 8).transpose(1, 2) for p in (layer.q, layer.k, layer.v))
    per_rank = [kde_attention(*(t[:, heads] for t in (q, k, v)), bucket_size=16, num_samples=16, min_seq_len=0, seed=0)
                for heads in torch.arange(4).chunk(dist.get_world_size())]
    expected = layer.out(torch.cat(per_rank, dim=1).transpose(1, 2).reshape(B, T, -1))
    diff = _max_diff(y_tp, expected)
    assert diff <= 1e-5, f"head-sharded KDE attention differs from its heads run per rank by {diff:.3g}"
    exact = layer(x)
    with use_kde_attention(layer, kde):
        y_one = layer(x)
    err_tp, err_one = _max_diff(y_tp, exact), _max_diff(y_one, exact)
    return {"max_diff": diff, "error_vs_exact_tensor_parallel": err_tp, "error_vs_exact_one_process": err_one}


@check
def ngpt_and_kronecker_refuse_tensor_parallelism(device):
    """Where a head split cannot be expressed, the error says why and what to use: nGPT's fused q|k|v (and W_u|W_v)
    weights, whose contiguous ColwiseParallel split is not whole heads; Kronecker attention's 1x1 convolutions, which
    torch's parallel styles do not shard (DTensor splits convolutions only along the batch)."""
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from torchext.nn import KroneckerAttention2d, NormalizedAttention, NormalizedSwiGLU

    mesh = _mesh(device)
    attn = parallelize_module(NormalizedAttention(16, 2, max_seq_len=8, device=device), mesh,
                              _heads_plan(("qkv",), ("out",)))
    _expect_error(lambda: attn(torch.randn(1, 4, 16, device=device)), NotImplementedError, "fully_shard")
    mlp = parallelize_module(NormalizedSwiGLU(16, device=device), mesh, _heads_plan(("up",), ("down",)))
    _expect_error(lambda: mlp(torch.randn(1, 4, 16, device=device)), NotImplementedError, "fully_shard")
    block = KroneckerAttention2d(8, heads=2).to(device)
    _expect_error(lambda: parallelize_module(block, mesh, {"in_proj": ColwiseParallel()}), NotImplementedError,
                  "nn.Linear")


# ---- the README's examples ------------------------------------------------------------------------------------------


def _example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@check
def examples_run(device):
    """examples/ngpt_fsdp.py and examples/int8_tensor_parallel.py (the README's distributed section), small."""
    losses = _example("ngpt_fsdp").main(steps=12, d_model=32, n_layers=1, seq_len=32, batch_per_rank=4, log_every=100)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], f"nGPT FSDP2 losses {losses}"
    error = _example("int8_tensor_parallel").main(d_model=32, n_blocks=2)
    assert error < 0.05, f"int8 tensor-parallel error {error:.3g} of the output peak"
    return {"ngpt_fsdp_first_last_loss": [losses[0], losses[-1]], "int8_tp_relative_error": error}


# ---- running by hand ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set by launch() for each rank it starts
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    if args.rank is not None:
        return _rank_main(args.rank)
    start = time.perf_counter()
    results = launch(args.world_size, args.backend)
    for name, result in results.items():
        measured = {k: v for k, v in result.items() if k not in ("ok", "error")}
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {name} {json.dumps(measured)}")
        if not result["ok"]:
            print(result["error"])
    print(f"{len(results)} checks on {args.world_size} ranks ({args.backend}) in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
