"""Gram-iteration family: the bound is a bound (>= the exact norm, fp64 SVD / FFT + SVD / explicit operator
matrices), it tightens with n_iter as the research note's tables say, gradients, registration, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from harness import check_opcheck, check_raises

from torchext import ops
from torchext.nn import (GramSpectralNorm, lipschitz_bound, lipschitz_penalty, record_input_sizes,
                         register_gram_spectral_norm)
from torchext.reference import gram_iteration as ref


def exact_norm(w):
    return torch.linalg.matrix_norm(w.to(torch.complex128 if w.is_complex() else torch.float64), ord=2)


def special_matrices():
    """The inputs the issue names: random, rank-1, repeated top singular value, orthogonal, huge, tiny, complex."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *s, **k: torch.randn(*s, generator=g, dtype=torch.float64, **k)  # noqa: E731
    repeated = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    return {
        "random": randn(40, 30),
        "wide": randn(12, 50),
        "rank1": randn(30, 1) @ randn(1, 20),
        "repeated_top": torch.linalg.qr(randn(5, 5))[0] @ repeated @ torch.linalg.qr(randn(5, 5))[0],
        "orthogonal": torch.linalg.qr(randn(32, 32))[0],
        "scaled_1e30": randn(20, 15) * 1e30,
        "scaled_1e-30": randn(20, 15) * 1e-30,
        "complex": torch.complex(randn(16, 10), randn(16, 10)),
    }


@pytest.mark.parametrize("name", list(special_matrices()))
@pytest.mark.parametrize("n_iter", [1, 4, 6])
def test_upper_and_lower_bounds_hold(name, n_iter):
    w = special_matrices()[name]
    upper, lower = ops.gram_spectral_norm(w, n_iter, return_lower=True)
    exact = exact_norm(w)
    assert upper >= exact * (1 - 1e-12), (upper, exact)
    assert lower <= exact * (1 + 1e-12), (lower, exact)


def test_zero_matrix_gives_zero_not_nan():
    w = torch.zeros(3, 6, 4, requires_grad=True)
    upper, lower = ops.gram_spectral_norm(w, return_lower=True)
    upper.sum().backward()
    assert torch.equal(upper, torch.zeros(3)) and torch.equal(lower, torch.zeros(3)) and w.grad.isfinite().all()


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (2, 0, 4)], ids=str)
def test_matrices_without_entries_have_bound_zero(shape):
    """An empty matrix maps to or from a zero-dimensional space: spectral norm 0 (not amax's IndexError)."""
    w = torch.zeros(shape, requires_grad=True)
    upper, lower = ops.gram_spectral_norm(w, return_lower=True)
    upper.sum().backward()
    assert torch.equal(upper, torch.zeros(shape[:-2])) and torch.equal(lower, upper) and w.grad.shape == w.shape


@pytest.mark.parametrize("shape", [(0, 2, 3), (4, 0, 3), (0, 2, 3, 3)], ids=str)
def test_conv_without_channels_has_bound_zero(shape):
    """No output (or input) channels: bound 0, where the FFT libraries reject the empty kernel."""
    for padding in ("circular", "zeros"):
        assert torch.equal(ops.conv_spectral_norm(torch.ones(shape), 6, padding), torch.zeros(()))


def test_error_falls_with_iterations_as_in_the_note():
    """Gaussian 500x400: the note measured 5.3e-2, 1.5e-2, 2.9e-3, 2.8e-4, 5.6e-6 at T = 4..8."""
    w = torch.randn(500, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_norm(w)
    errors = [(ops.gram_spectral_norm(w, t) / exact - 1).item() for t in range(4, 9)]
    assert all(a > b > 0 for a, b in zip(errors, errors[1:])), errors
    assert 1e-2 < errors[0] < 1e-1 and errors[2] < 1e-2 and errors[4] < 1e-4, errors


def test_fp32_agrees_with_fp64():
    w = torch.randn(8, 48, 40, dtype=torch.float64)
    b64 = ops.gram_spectral_norm(w)
    b32 = ops.gram_spectral_norm(w.float())
    assert b32.dtype == torch.float32
    torch.testing.assert_close(b32.double(), b64, rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 9), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradient_matches_autograd_of_the_reference(shape, dtype):
    w = torch.randn(*shape, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape[:-2], dtype=torch.float64)
    got, = torch.autograd.grad(ops.gram_spectral_norm(w, 5), w, grad)
    expected, = torch.autograd.grad(ref.gram_spectral_norm(w, 5), w, grad)
    torch.testing.assert_close(got, expected)


def test_gradcheck_opcheck_compile():
    w = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: ops.gram_spectral_norm(w, 4), (w,))
    check_opcheck(torch.ops.torchext.gram_spectral_norm.default, (w, 4))
    check_opcheck(torch.ops.torchext.gram_spectral_norm_backward.default, (torch.randn(2, dtype=torch.float64),
                                                                          w.detach(), 4))
    compiled = torch.compile(lambda w: ops.gram_spectral_norm(w, 4), fullgraph=True)
    torch.testing.assert_close(compiled(w), ops.gram_spectral_norm(w, 4))


# ---- convolutions ---------------------------------------------------------------------------------------------


def conv_operator(weight, n, padding, stride=1, groups=1):
    """The explicit matrix of a small Conv1d/Conv2d (zero or circular padding), column by column."""
    d, c_in = weight.dim() - 2, weight.shape[1] * groups
    conv = F.conv1d if d == 1 else F.conv2d
    columns = []
    for e in torch.eye(c_in * n ** d, dtype=weight.dtype):
        x = e.reshape(1, c_in, *(n,) * d)
        if padding == "circular":
            x, pad = F.pad(x, (weight.shape[-1] // 2,) * (2 * d), mode="circular"), 0
        else:
            pad = weight.shape[-1] // 2
        columns.append(conv(x, weight, padding=pad, stride=stride, groups=groups).flatten())
    return torch.stack(columns, 1)


CONV_CASES = [  # (weight shape, n, stride, groups)
    ((6, 4, 3, 3), 5, 1, 1), ((4, 6, 3, 3), 6, 2, 1), ((6, 2, 3, 3), 4, 1, 3), ((5, 3, 3), 7, 1, 1),
    ((4, 4, 5), 6, 2, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_conv_bound_holds_against_the_explicit_operator(case, padding):
    shape, n, stride, groups = case
    weight = torch.randn(*shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(conv_operator(weight, n, padding, stride, groups), ord=2)
    bound = ops.conv_spectral_norm(weight, n, padding, stride, groups, n_iter=12)
    assert bound >= exact * (1 - 1e-10), (bound, exact)
    if padding == "circular":  # the frequency blocks are the operator itself: the bound is tight
        torch.testing.assert_close(bound, exact, rtol=1e-8, atol=0)


def test_circular_norm_at_n_is_not_a_zero_padding_bound():
    """The note's counterexample: kernel [1, -1] at n = 3. Taking the FFT at n + k - 1 fixes it."""
    weight = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    zero_padded = torch.linalg.matrix_norm(conv_operator(weight, 3, "zeros"), ord=2)
    circular = ops.conv_spectral_norm(weight, 3, "circular", n_iter=12)
    assert circular < zero_padded
    assert ops.conv_spectral_norm(weight, 3, "zeros", n_iter=12) >= zero_padded


def test_conv_gradient_flows_through_the_winning_block_only():
    weight = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    got, = torch.autograd.grad(ops.conv_spectral_norm(weight, 6, n_iter=6), weight)
    expected, = torch.autograd.grad(ref.conv_spectral_norm(weight, (6, 6), n_iter=6), weight)
    torch.testing.assert_close(got, expected)


def test_conv_opcheck_and_compiles_fullgraph():
    weight = torch.randn(8, 4, 3, 3)
    # A composite op: fake tensors and autograd come from its parts (AOT dispatch: the compile below, for CI time).
    torch.library.opcheck(torch.ops.torchext.conv_spectral_norm.default, (weight.requires_grad_(), [6, 6], "zeros", 2,
                          1, 6), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda w: ops.conv_spectral_norm(w, 8), fullgraph=True)
    torch.testing.assert_close(compiled(weight), ops.conv_spectral_norm(weight, 8))


def bad_input_cases():
    return [
        (lambda: ops.gram_spectral_norm(torch.ones(4)), ValueError, "w must have at least 2 dim(s)"),
        (lambda: ops.gram_spectral_norm([[1.0]]), TypeError, "gram_spectral_norm: w must be a torch.Tensor, got list"),
        (lambda: ops.gram_spectral_norm(torch.ones(4, 4, dtype=torch.int32)), TypeError, "w must have dtype in"),
        (lambda: ops.gram_spectral_norm(torch.ones(4, 4), n_iter=0), ValueError, "n_iter must be in [1, 30]"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3, 3), 8, padding="reflect"), ValueError,
         "padding must be 'circular' or 'zeros'"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 5, 5), 3), ValueError,
         "conv_spectral_norm: input_size (3, 3) is smaller than the kernel (5, 5)"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3, 3), 7, stride=2), ValueError,
         "conv_spectral_norm: stride 2 must divide input_size (7, 7)"),
        # n_iter, input_size: checked by the op itself (not by its schema, nor as gram_spectral_norm's argument)
        (lambda: ops.gram_spectral_norm(torch.ones(4, 4), n_iter=2.0), TypeError,
         "gram_spectral_norm: n_iter must be an int, got float"),
        (lambda: ops.gram_spectral_norm(torch.ones(4, 4), n_iter=True), TypeError,
         "gram_spectral_norm: n_iter must be an int, got bool"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3), 8, n_iter=0), ValueError,
         "conv_spectral_norm: n_iter must be in [1, 30], got 0"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3), 8, n_iter=6.0), TypeError,
         "conv_spectral_norm: n_iter must be an int"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3), 8.0), TypeError,
         "conv_spectral_norm: input_size must be a list or tuple of ints, got float"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3), "8"), TypeError,
         "conv_spectral_norm: input_size must be a list or tuple of ints, got str"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3), 0), ValueError,
         "conv_spectral_norm: input_size must be >= 1"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3, 3), (6, -4)), ValueError,
         "conv_spectral_norm: input_size[1] must be >= 1, got -4"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3, 3), 8, stride=0), ValueError, "stride must be >= 1, got 0"),
        (lambda: ops.conv_spectral_norm(torch.ones(2, 2, 3, 3), 8, stride=-1), ValueError,
         "stride must be >= 1, got -1"),
        (lambda: ops.conv_spectral_norm(torch.ones(4, 2, 3, 3), 8, groups=3), ValueError,
         "groups=3 must divide the 4 output channels"),
        (lambda: ops.conv_spectral_norm(torch.ones(4, 2, 3, 3), 8, groups=0), ValueError, "groups must be >= 1, got 0"),
    ]


@pytest.mark.parametrize("case", range(len(bad_input_cases())))
def test_bad_inputs_raise_clear_errors(case):
    check_raises(*bad_input_cases()[case])


# ---- modules --------------------------------------------------------------------------------------------------


def lipschitz_net(target=1.0):
    return torch.nn.Sequential(
        register_gram_spectral_norm(torch.nn.Conv2d(1, 8, 3, padding=1), target=target), torch.nn.ReLU(),
        register_gram_spectral_norm(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), target=target), torch.nn.ReLU(),
        torch.nn.Flatten(), register_gram_spectral_norm(torch.nn.Linear(8 * 4 * 4, 10), target=target))


@pytest.mark.parametrize("target", [1.0, 0.5])
def test_parametrized_network_is_certifiably_lipschitz(target):
    net = lipschitz_net(target)
    x = torch.randn(256, 1, 8, 8)
    net(x)
    total, table = lipschitz_bound(net)
    for row in table:
        torch.testing.assert_close(row["bound"], torch.tensor(target), rtol=1e-5, atol=0)
    # Pairs close together probe the local Jacobian norm, the worst case for a piecewise-linear net.
    a = torch.randn(64, 1, 8, 8)
    b = a + 1e-3 * torch.randn_like(a)
    ratios = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratios.max() <= total * (1 + 1e-4), (ratios.max(), total)


def test_eval_mode_caches_the_bound_until_the_weight_changes():
    conv = register_gram_spectral_norm(torch.nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 6, 6)
    conv.eval()
    first = conv(x)
    assert torch.equal(conv(x), first)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(2)
    torch.testing.assert_close(conv(x), first)  # rescaled back to the same operator norm


def test_penalty_adds_the_bounds_above_tau_and_is_differentiable():
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Linear(5, 5))
    record_input_sizes(net)
    net(torch.randn(1, 2, 5))
    bounds = [lipschitz_bound(net)[1][i]["bound"] for i in range(2)]
    penalty = lipschitz_penalty(net, tau=0.0)
    torch.testing.assert_close(penalty, bounds[0] + bounds[1])
    penalty.backward()
    assert net[0].weight.grad is not None and net[1].weight.grad is not None


def test_registering_the_parametrization_by_hand_normalises_the_weight():
    """torch's register_parametrization evaluates the parametrization at once; it must not be left a no-op."""
    linear = torch.nn.Linear(5, 4)
    torch.nn.utils.parametrize.register_parametrization(linear, "weight", GramSpectralNorm(linear, target=2.0))
    torch.testing.assert_close(ops.gram_spectral_norm(linear.weight.detach()), torch.tensor(2.0), rtol=1e-5, atol=0)
    conv = torch.nn.Conv1d(2, 3, 3, padding=1)
    check_raises(lambda: torch.nn.utils.parametrize.register_parametrization(conv, "weight", GramSpectralNorm(conv)),
                 RuntimeError, "pass input_size to register_gram_spectral_norm / GramSpectralNorm")
    conv = torch.nn.Conv1d(2, 3, 3, padding=1)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", GramSpectralNorm(conv, input_size=(8,)))
    conv(torch.randn(1, 2, 6))  # the size hook follows the input
    bound = ops.conv_spectral_norm(conv.weight.detach(), 6, "zeros")
    torch.testing.assert_close(bound, torch.tensor(1.0), rtol=1e-5, atol=0)


def test_parametrization_checks_its_arguments():
    check_raises(lambda: GramSpectralNorm(torch.nn.Linear(5, 4), n_iter=0), ValueError,
                 "GramSpectralNorm: n_iter must be in [1, 30], got 0")
    check_raises(lambda: GramSpectralNorm(torch.nn.Linear(5, 4), target=0.0), ValueError,
                 "GramSpectralNorm: target must be finite and > 0")
    check_raises(lambda: GramSpectralNorm(torch.nn.Embedding(5, 4)), TypeError, "GramSpectralNorm: expected Linear")


def test_unsupported_layers_say_why():
    check_raises(lambda: register_gram_spectral_norm(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")),
                 NotImplementedError, "only 'zeros' and 'circular' are bounded")
    check_raises(lambda: register_gram_spectral_norm(torch.nn.Conv2d(2, 2, 3, dilation=2)), NotImplementedError,
                 "dilation")
    check_raises(lambda: register_gram_spectral_norm(torch.nn.Conv3d(2, 2, 3)), TypeError,
                 "expected Linear, Conv1d or Conv2d")
    check_raises(lambda: lipschitz_bound(torch.nn.Conv2d(2, 2, 3)), RuntimeError, "its input size is unknown")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("shape", [(544, 64, 64), (7, 1, 1), (3, 64, 5), (2, 9, 40), (1, 33, 33)], ids=str)
def test_shared_memory_cuda_kernel_matches_the_reference(shape, dtype):
    """csrc/gram_iteration: every iteration of every matrix in one launch, against the fp64 reference."""
    from torchext._backend import CUDA_EXT

    assert CUDA_EXT is not None and hasattr(CUDA_EXT, "gram_iteration"), "torchext._C was built without the kernel"
    w = torch.randn(*shape, dtype=dtype, device="cuda")
    w[0] = 0
    if shape[0] > 2:
        w[1] *= 1e30
    upper, lower = ops.gram_spectral_norm(w, 6, return_lower=True)
    expected_upper, expected_lower = (b.exp() for b in ref.gram_log_bounds(w.to(torch.complex128 if w.is_complex()
                                                                                else torch.float64), 6))
    torch.testing.assert_close(upper.double(), expected_upper, rtol=1e-5, atol=0)
    torch.testing.assert_close(lower.double(), expected_lower, rtol=1e-5, atol=0)
