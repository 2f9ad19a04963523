"""The fuzz suite (issue 12): every case of tests/fuzz_cases.py on every path this machine has (the reference; the
Triton interpreter for the cases marked for it; CUDA where there is a GPU) must be a clear error or the right
value. A failure names the path, the op, the category and the case.

bench/fuzz_report.py prints the same cases as counts per outcome, per path and op.
"""

import pytest
import torch
from harness import given, settings, st

import fuzz_cases as fz
import torchext.nn
import torchext.ops


def _params():
    return [pytest.param(case, path, id=f"{path.name}:{case.id}") for path in fz.available_paths()
            for case in fz.cases_on(path)]


@pytest.mark.parametrize(("case", "path"), _params())
def test_contract(case: fz.Case, path: fz.Path):
    outcome = fz.classify(case, path)
    assert outcome.kind in fz.PASSING, f"{case.id} on the {path.name} path: {outcome.kind}: {outcome.detail}"


def test_every_public_op_and_module_has_cases():
    covered = {case.op for case in fz.CASES}
    modules = {f"nn.{name}" for name in torchext.nn.__all__
               if isinstance(getattr(torchext.nn, name), type) and issubclass(getattr(torchext.nn, name),
                                                                                torch.nn.Module)}
    assert set(torchext.ops.__all__) - covered == set()
    assert modules - covered == set()


def test_case_ids_are_unique():
    ids = [case.id for case in fz.CASES]
    assert len(ids) == len(set(ids))


# ---- the classifier itself ----------------------------------------------------------------------------------------


def _case(run, expect) -> fz.Case:
    return fz.Case("l2_normalize", "classifier", "synthetic", lambda device: {}, run, expect)


def _raise(error):
    def run(_):
        raise error
    return run


@pytest.mark.parametrize(("run", "expect", "kind"), [
    (_raise(TypeError("l2_normalize: x must be a torch.Tensor")), fz.Raises(TypeError, "x"), "clear error"),
    (_raise(ValueError("l2_normalize: x must be a torch.Tensor")), fz.Raises(TypeError, "x"), "unclear error"),
    (_raise(TypeError("x must be a torch.Tensor")), fz.Raises(TypeError, "x"), "unclear error"),
    (_raise(TypeError("l2_normalize: must be a torch.Tensor")), fz.Raises(TypeError, "x"), "unclear error"),
    (_raise(AttributeError("'list' object has no attribute 'dim'")), fz.Raises(TypeError, "x"), "unclear error"),
    (lambda _: torch.ones(2), fz.Raises(TypeError, "x"), "accepted"),
    (lambda _: torch.tensor([1.0, float("nan")]), fz.Matches(lambda _: torch.tensor([1.0, float("nan")])), "right"),
    (lambda _: torch.tensor([1.0, 2.0]), fz.Matches(lambda _: torch.tensor([1.0, float("nan")])), "wrong"),
    (lambda _: torch.ones(2, dtype=torch.float64), fz.Matches(lambda _: torch.ones(2)), "wrong"),
    (lambda _: (torch.ones(2), None), fz.Matches(lambda _: (torch.ones(2), None)), "right"),
    (_raise(RuntimeError("boom")), fz.Matches(lambda _: torch.ones(2)), "error on valid input"),
], ids=["clear", "wrong type", "no op name", "no argument", "attribute error", "accepted", "nan positions",
        "nan missing", "dtype", "tuple", "valid input"])
def test_classifier(run, expect, kind):
    assert fz.classify(_case(run, expect), fz.REFERENCE).kind == kind


# ---- properties ---------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 3), cols=st.integers(1, 40), exponent=st.integers(-37, 37),
       nan_at=st.one_of(st.none(), st.integers(0, 119)))
def test_l2_normalize_any_magnitude_gives_unit_rows(rows, cols, exponent, nan_at):
    """Rows of any fp32 magnitude normalise to x / max(||x||, eps) (unit rows unless tiny); a NaN makes its row NaN."""
    def x(t):
        t = fz.randn(rows, cols, device=t.device) * 10.0 ** exponent
        if nan_at is not None and nan_at < t.numel():
            t.view(-1)[nan_at] = float("nan")
        return t

    case = fz.L2.matches("property", f"{rows}x{cols} of 1e{exponent}", expected=fz.unit_rows_of, x=x)
    for path in fz.available_paths():
        outcome = fz.classify(case, path)
        assert outcome.kind == "right", f"{path.name}: {outcome.detail}"


@settings(max_examples=30, deadline=None)
@given(exponent=st.integers(-30, 30), rows=st.integers(1, 4), cols=st.integers(1, 4))
def test_gram_bound_is_homogeneous(exponent, rows, cols):
    """bound(c W) = c bound(W) for c = 10^exponent, whatever the magnitude (the iteration rescales every step)."""
    factor = 10.0 ** exponent
    case = fz.GRAM.matches("property", f"{rows}x{cols} times 1e{exponent}",
                           w=lambda t: fz.randn(2, rows, cols, device=t.device) * factor,
                           expected=lambda a: fz.ref_gram.gram_spectral_norm(a["w"] / factor) * factor,
                           tolerance=fz.at_scale(factor))
    for path in fz.available_paths():
        outcome = fz.classify(case, path)
        assert outcome.kind == "right", f"{path.name}: {outcome.detail}"
