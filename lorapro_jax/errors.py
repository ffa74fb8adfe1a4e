"""Errors for bad files and argument checks for the public entry points.

* :class:`CorruptFileError` — a file the library reads is corrupt, truncated or holds something
  else than expected. It is a ``ValueError`` carrying ``path`` (the offending file or directory) and
  ``expected`` (what should have been there), and its message names both.
* ``check_*`` — the argument checks the public entry points run first, so that a swapped
  ``(path, model)``, a config that is not a :class:`~lorapro_jax.LoraConfig` or an optimizer that is
  not an ``optax.GradientTransformation`` fail with a ``TypeError`` that says which argument got
  what, instead of an ``AttributeError`` deep inside.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CorruptFileError", "check_config", "check_module", "check_path", "check_tx"]


class CorruptFileError(ValueError):
    """A file is corrupt, truncated or holds other content than expected.

    Attributes:
      path: the file (or checkpoint directory) that could not be read.
      expected: what the reader expected to find there.
    """

    def __init__(self, path: str | os.PathLike, expected: str, detail: str | None = None):
        self.path = os.fspath(path)
        self.expected = expected
        self.detail = detail
        msg = f"{self.path}: corrupt, truncated or not the expected file; expected {expected}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __reduce__(self):  # picklable across processes despite the custom __init__
        return (type(self), (self.path, self.expected, self.detail))


def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return f"the path {os.fspath(x)!r}"
    if x is None:
        return "None"
    if callable(x) and hasattr(x, "__qualname__") and not isinstance(x, type):
        return f"the function {getattr(x, '__module__', '?')}.{x.__qualname__}"
    return f"a {type(x).__module__}.{type(x).__qualname__}"


def _is_module(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def check_module(x: Any, arg: str, who: str, signature: str) -> None:
    """Raises ``TypeError`` unless ``x`` (the argument ``arg`` of ``who``) is an ``nnx.Module``."""
    if _is_module(x):
        return
    hint = " (are the arguments swapped?)" if isinstance(x, (str, os.PathLike)) else ""
    raise TypeError(f"{who}: `{arg}` must be an nnx.Module, got {_describe(x)}{hint}. Call it as {signature}.")


def check_path(x: Any, arg: str, who: str, signature: str) -> None:
    """Raises ``TypeError`` unless ``x`` (the argument ``arg`` of ``who``) is a ``str`` / ``os.PathLike``."""
    if isinstance(x, (str, os.PathLike)):
        return
    hint = " (are the arguments swapped?)" if _is_module(x) else ""
    raise TypeError(f"{who}: `{arg}` must be a path (str or os.PathLike), got {_describe(x)}{hint}. Call it as {signature}.")


def check_config(x: Any, who: str, *, arg: str = "config", optional: bool = False) -> None:
    """Raises ``TypeError`` unless ``x`` is a :class:`~lorapro_jax.LoraConfig` (or ``None`` if ``optional``)."""
    from .lora.config import LoraConfig

    if isinstance(x, LoraConfig) or (optional and x is None):
        return
    hint = " Build one with lp.LoraConfig(**d)." if isinstance(x, dict) else ""
    raise TypeError(f"{who}: `{arg}` must be a lorapro_jax.LoraConfig, got {_describe(x)}.{hint}")


def check_tx(x: Any, who: str, *, arg: str = "tx") -> None:
    """Raises ``TypeError`` unless ``x`` is an ``optax.GradientTransformation``."""
    import optax

    if isinstance(x, optax.GradientTransformation):
        return
    if callable(x) and getattr(x, "__module__", "").startswith(("optax", "lorapro_jax")):
        hint = f" `{getattr(x, '__name__', x)}` is an optimizer factory: call it, e.g. {getattr(x, '__name__', 'f')}(1e-3)."
    elif _is_module(x):
        hint = " (are the arguments swapped?)"
    else:
        hint = ""
    raise TypeError(f"{who}: `{arg}` must be an optax.GradientTransformation, got {_describe(x)}.{hint}")
