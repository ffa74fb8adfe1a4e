"""``nnx.Optimizer`` for models whose parameters hold :class:`~lorapro_jax.LoraPair` values."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from ..errors import check_module, check_tx

__all__ = ["LoraOptimizer"]


class LoraOptimizer(nnx.Optimizer):
    """Drop-in ``nnx.Optimizer`` (same constructor and ``update(model, grads)``) that keeps ``LoraPair`` state.

    Any optax optimizer whose state mirrors the parameters (``optax.adam``, ``optax.adamw``, LoRA-Pro's
    ``efficient`` and ``lean`` forms, momentum SGD, LoRA+ ...) holds a ``LoraPair`` for every
    :class:`~lorapro_jax.LoRAParam`. flax 0.12's ``nnx.Optimizer.update`` writes the new state back
    through ``nnx.update(opt_state, nnx.state(new_state))``, and ``nnx.state`` turns each ``LoraPair``
    into a plain ``State({"a", "b"})`` — dropping the pair type and its static scale — so the second
    update fails with a pytree-structure error. This class writes the new state back variable by
    variable, keeping every value's type. ``nnx.Optimizer`` works for optimizers whose state holds no
    pair (LoRA-Pro ``full`` form, plain SGD); ``LoraOptimizer`` works for all of them.

    Example::

        optimizer = lp.LoraOptimizer(model, optax.adamw(1e-3), wrt=lp.LoRAParam)
        optimizer.update(model, grads)
    """

    def __init__(self, model, tx, **kwargs):
        check_module(model, "model", "LoraOptimizer", "LoraOptimizer(model, tx, wrt=...)")
        check_tx(tx, "LoraOptimizer")
        super().__init__(model, tx, **kwargs)

    def update(self, model, grads, /, **kwargs):  # same contract as nnx.Optimizer.update
        """Updates the optimizer state and the parameters of ``model`` selected by ``wrt``; returns the updates."""
        graph = getattr(self, "graph", None)
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=graph))
        updates, new_state = self.tx.update(grad_arrays, nnx.as_pure(self.opt_state), params, **nnx.as_pure(kwargs))
        nnx.update(model, optax.apply_updates(params, updates))

        def put(var, value):
            var.set_value(value)

        jax.tree.map(put, self.opt_state, new_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.step[...] += 1
        return updates
