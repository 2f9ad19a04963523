"""Old public names kept as deprecated aliases: each use warns (a DeprecationWarning that points at the user's line)
and then works as before."""

import sys
import warnings
from types import ModuleType


def warn(old: str, new: str, stacklevel: int) -> None:
    """Say that ``old`` is deprecated for ``new``; stacklevel as warnings.warn's, counted from the caller."""
    warnings.warn(f"{old} is deprecated and will be removed; use {new}", DeprecationWarning, stacklevel=stacklevel + 1)


def alias_module(old: str, new: ModuleType, use: str) -> None:
    """Run by the body of the deprecated module ``old``: the import that loads it warns and gets ``new``."""
    warn(old, use, stacklevel=3)  # this function, the module's body, then the import line (importlib's frames skipped)
    sys.modules[old] = new


def renamed_attribute(module: str, name: str, renames: dict[str, tuple[object, str]]) -> object:
    """A module's ``__getattr__`` (PEP 562) for old names: renames maps each to (what it is now, what to use)."""
    if name not in renames:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, use = renames[name]
    warn(f"{module}.{name}", use, stacklevel=3)  # this function, the module's __getattr__, then the user's line
    return new
