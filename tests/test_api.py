"""The public API is one consistent shape (issue 15): no function shadows a module, old public names warn and still
work, an op and a module helper never share a name with other arguments, attention ops share one return convention,
and every public function of torchext.ops is a registered op or a documented Python helper."""

import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close

from torchext import nn as tnn
from torchext import ops
from torchext.ops import FAMILIES

PACKAGES = ("torchext", "torchext.ops", "torchext.nn", "torchext.reference", "torchext.triton_kernels")
MOVED_OPS_MODULES = ("ngpt", "int8_matmul", "gram_iteration", "kv_quant")  # torchext.ops.<these>: deprecated


# ---- no function shadows a module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_no_attribute_shadows_a_submodule(package):
    """`import torchext.x.y as m` and `torchext.x.y` give the same module (a function of the module's name bound in
    the package gave the function to the first and left the module unreachable)."""
    parent = importlib.import_module(package)
    for info in pkgutil.iter_modules(parent.__path__):
        if info.name.startswith("__"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the old ops module paths: tested below
            module = importlib.import_module(f"{package}.{info.name}")
            assert getattr(parent, info.name) is module, f"{package}.{info.name}"


def test_no_public_function_has_a_module_of_its_name():
    for name in ops.__all__:
        assert importlib.util.find_spec(f"torchext.ops.{name}") is None, name


def test_families_are_the_private_modules():
    assert set(FAMILIES) == {"ngpt", "int8_matmul", "gram_iteration", "kv_quant", "kde_attention",
                             "kronecker_attention", "tensor_attention"}
    for family, module in FAMILIES.items():
        assert module.__name__ == f"torchext.ops._{family}"
    public_modules = {info.name for info in pkgutil.iter_modules(ops.__path__) if not info.name.startswith("_")}
    assert public_modules == set(MOVED_OPS_MODULES)


@pytest.mark.parametrize("family", MOVED_OPS_MODULES)
def test_old_ops_module_paths_warn_at_the_users_line_and_give_the_family_module(family, monkeypatch):
    name = f"torchext.ops.{family}"
    monkeypatch.delitem(sys.modules, name, raising=False)  # as if never imported, so that its import warns
    monkeypatch.delitem(vars(ops), family, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{name} is deprecated") as caught:
        module = getattr(ops, family)
    assert module is FAMILIES[family] and caught[0].filename == __file__
    with pytest.warns(DeprecationWarning, match=rf"{name} is deprecated") as caught:
        exec(compile(f"import {name} as imported", "<user code>", "exec"), namespace := {})
    assert namespace["imported"] is FAMILIES[family] and caught[0].filename == "<user code>"


def test_kde_min_seq_len_default_is_set_on_the_family_module(monkeypatch):
    """The documented way to change kde_attention's exact-attention threshold takes effect."""
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    run = lambda **kw: ops.kde_attention(q, k, v, seed=1, bucket_size=16, num_samples=4, **kw)  # noqa: E731
    assert_close(run(), F.scaled_dot_product_attention(q, k, v), "exact below the default threshold")
    monkeypatch.setattr(FAMILIES["kde_attention"], "MIN_SEQ_LEN", 0)
    estimate = run()
    torch.testing.assert_close(estimate, run(min_seq_len=0), atol=0, rtol=0)
    assert not torch.allclose(estimate, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


# ---- an op and a module helper with one name take the same arguments -----------------------------------------------


def _public_nn_callables() -> dict[str, object]:
    """Every public function and class defined in torchext.nn's modules, by name."""
    found = {}
    for info in pkgutil.iter_modules(tnn.__path__):
        module = importlib.import_module(f"torchext.nn.{info.name}")
        found.update({name: value for name, value in vars(module).items()
                      if callable(value) and not name.startswith("_") and value.__module__ == module.__name__})
    return found


def test_no_module_helper_takes_other_arguments_than_the_op_of_its_name():
    for name, helper in _public_nn_callables().items():
        if name in ops.__all__:
            assert inspect.signature(helper) == inspect.signature(getattr(ops, name)), name


@pytest.mark.parametrize("module, old, new", [("torchext.nn", "renormalize_", "renormalize_model_"),
                                              ("torchext.nn.ngpt", "renormalize_", "renormalize_model_"),
                                              ("torchext.nn", "gram_spectral_norm", "register_gram_spectral_norm"),
                                              ("torchext.nn.gram_iteration", "gram_spectral_norm",
                                               "register_gram_spectral_norm")])
def test_renamed_module_helpers_warn_and_still_work(module, old, new):
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated.*torchext\.nn\.{new}") as caught:
        helper = getattr(importlib.import_module(module), old)
    assert helper is getattr(tnn, new) and caught[0].filename == __file__
    assert old not in tnn.__all__


# ---- attention ops share one return convention ---------------------------------------------------------------------

ATTENTION_OPS = [name for name in ops.__all__ if "attention" in name]


def test_attention_ops_return_out_unless_asked_for_lse():
    """Each attention op either takes return_lse (default: out alone; tensor_attention's None is its deprecation
    period) or has no lse and returns out alone."""
    assert set(ATTENTION_OPS) == {"kde_attention", "kronecker_attention", "kv_quant_decode_attention",
                                  "tensor_attention"}
    for name in ATTENTION_OPS:
        signature = inspect.signature(getattr(ops, name))
        if "return_lse" in signature.parameters:
            expected = None if name == "tensor_attention" else False
            assert signature.parameters["return_lse"].default is expected, name
        else:
            assert signature.return_annotation is torch.Tensor, name


@pytest.mark.parametrize("name", ["kde_attention", "tensor_attention"])
def test_return_lse(name):
    q, k, v = (torch.randn(2, 1, 8, 16) for _ in range(3))  # batch 2: an `out, lse = out` would unpack silently
    call = {"kde_attention": lambda **kw: ops.kde_attention(q, k, v, seed=0, **kw),
            "tensor_attention": lambda **kw: ops.tensor_attention(q, k, v, k, v, **kw)}[name]
    out, lse = call(return_lse=True)
    assert out.shape == (2, 1, 8, 16) and lse.shape == (2, 1, 8)
    alone = call(return_lse=False)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(alone, out)
    with pytest.raises(TypeError, match=f"{name}: return_lse must be a bool"):
        call(return_lse="yes")


def test_tensor_attention_without_return_lse_warns_and_returns_both():
    q = torch.randn(2, 1, 4, 8)
    with pytest.warns(FutureWarning, match="pass return_lse=True to keep both") as caught:
        out, lse = ops.tensor_attention(q, q, q, q, q)
    assert caught[0].filename == __file__
    assert out.shape == (2, 1, 4, 8) and lse.shape == (2, 1, 4)


# ---- every public function is a registered op or a documented Python helper ---------------------------------------


@pytest.mark.parametrize("name", ops.__all__)
def test_public_function_is_a_registered_op_or_a_listed_helper_and_documents_shapes_and_dtypes(name):
    registered = hasattr(torch.ops.torchext, name)
    assert registered != (name in ops.PYTHON_HELPERS), f"{name}: registered {registered}, helper listed " \
        f"{name in ops.PYTHON_HELPERS}"
    doc = " ".join((inspect.getdoc(getattr(ops, name)) or "").split())
    if not registered:
        assert "Python helper, not a registered op" in doc, name
    assert re.search(r"\[[^\]]+\]", doc), f"{name}: no shape ([...]) in its docstring"
    assert re.search(r"float|bf16|fp16|fp32|fp64|int8|int32|int64|dtype|complex", doc), f"{name}: no dtype"

