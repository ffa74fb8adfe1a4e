"""Base class shared by every Hugging Face-mirroring NNX model in :mod:`lorapro_jax.models`."""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

__all__ = ["HFModule", "StaticConfig"]


class StaticConfig:
    """Identity-hashed holder for a ``transformers`` config.

    ``PretrainedConfig`` defines ``__eq__`` and is therefore unhashable, which would break
    ``nnx.split``/``jax.jit`` (the graphdef, which contains static attributes, must be hashable).
    Wrapping it keeps the config reachable from the module without that problem.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"StaticConfig({type(self.value).__name__})"


class HFModule(nnx.Module):
    """Mixin for top-level models whose attribute tree mirrors a Hugging Face checkpoint.

    Class attributes used by :func:`lorapro_jax.models.load_pretrained`:

    Attributes:
        model_type: ``config.model_type`` this class accepts (``"bert"``, ``"t5"``, ``"llama"``).
        base_model_prefix: attribute name under which task models nest the base model (HF's
            ``base_model_prefix``), used to add/strip that prefix when a base checkpoint is loaded
            into a task model or vice versa. ``None`` disables prefix handling.
        hf_ignore_unexpected: regexes of checkpoint keys that are silently ignored (buffers such as
            ``embeddings.position_ids``, parts of the checkpoint this class does not build).
        hf_tied_aliases: ``{alias: source}`` checkpoint keys that are tied copies of another
            tensor; an alias present in the checkpoint is accepted if it equals its source.
        hf_default_allow_missing: regexes of parameters that are newly initialised by design
            (task heads) and therefore may be absent from a base checkpoint.
    """

    model_type: ClassVar[str] = ""
    base_model_prefix: ClassVar[str | None] = None
    hf_ignore_unexpected: ClassVar[tuple[str, ...]] = ()
    hf_tied_aliases: ClassVar[dict[str, str]] = {}
    hf_default_allow_missing: ClassVar[tuple[str, ...]] = ()

    _config_holder: StaticConfig

    def _set_config(self, config: Any) -> None:
        self._config_holder = StaticConfig(config)

    @property
    def config(self) -> Any:
        """The ``transformers`` config the model was built from."""
        return self._config_holder.value

    def hf_init_std(self) -> float:
        """Std of the normal init used for parameters missing from a checkpoint (HF's
        ``config.initializer_range``)."""
        return float(getattr(self.config, "initializer_range", 0.02))

    def hf_ignore_unexpected_for_instance(self) -> tuple[str, ...]:
        """Instance-level ignore list (e.g. a disabled pooler); defaults to the class list."""
        return tuple(self.hf_ignore_unexpected)

    def hf_tied_aliases_for_instance(self) -> dict[str, str]:
        """Instance-level tied aliases (depends on e.g. ``tie_word_embeddings``)."""
        return dict(self.hf_tied_aliases)


def resolve_dtype(dtype: Any) -> Any:
    """Normalise a dtype-like (``"bfloat16"``, ``jnp.float32``, ``None``) to a numpy dtype or None."""
    if dtype is None:
        return None
    return jnp.dtype(dtype)
