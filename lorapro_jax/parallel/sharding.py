"""Partition rules for LoRA factors and LoRA-Pro optimizer states (meshes and placement: :mod:`.placement`).

A LoRA pair inherits its sharding from the base kernel it adapts (Flax layout, see
:mod:`lorapro_jax.lora.pair`). For a kernel ``W0: (*in_shape, *out_shape)`` with
``PartitionSpec(*in_spec, *out_spec)``:

* ``a: (*in_shape, r)``  gets ``P(*in_spec, None)``   (input axes as the kernel, rank replicated);
* ``b: (r, *out_shape)`` gets ``P(None, *out_spec)``  (rank replicated, output axes as the kernel);
* LoRA-Pro's full-form Adam moments ``(*in_shape, *out_shape)`` get ``P(*in_spec, *out_spec)``,
  i.e. exactly the kernel's sharding;
* the ``r x r`` matrices of the LoRA-Pro solve (``BᵀB``, ``AAᵀ``, their inverses, ``X``) are
  replicated: they are produced by contractions over ``n`` or ``m`` (one all-reduce of ``r x r``).

With these specs every full-size (``m x n``) array of the LoRA-Pro full-form update — the equivalent
gradient ``s (ĝ_a b + a ĝ_b)``, the moments, the Adam direction ``d`` — is an elementwise function of
arrays sharded like ``W0`` or an outer product ``(n, r) @ (r, m)`` of a row-sharded and a
column-sharded factor, so it is born with ``W0``'s sharding; it only meets other devices through
the contractions ``d @ bᵀ`` (``n x r``) and ``aᵀ @ d`` (``r x m``). No device ever holds (or
gathers) a full ``m x n`` array.

Stacked pairs (scan-over-layers models, see :mod:`lorapro_jax.lora.kernel_spec`): a kernel
``(*layers, *per_layer)`` gets its stack entries in front of the per-layer ones: ``a`` gets
``P(*stack_spec, *in_spec, None)`` and ``b`` ``P(*stack_spec, None, *out_spec)``. A rule (or metadata) spec
with as many entries as the kernel has axes is taken as it is (e.g. ``P("layers", None, "model")`` shards
the layer axis over a ``layers`` mesh axis); a shorter one is a *per-layer* spec (e.g. the 2-D specs of
:func:`tensor_parallel_rules`), and the layer axes get ``stack_axis`` (default ``None``: replicated).

Kernel specs come from, in order: regex ``rules`` over dotted parameter paths (first
``re.fullmatch`` wins; a rule for ``"...query.kernel"`` also matches the adapted path
``"...query.base.kernel"``), then NNX sharding metadata (``out_sharding``, formerly
``sharding_names``, e.g. set by ``nnx.with_partitioning`` or ``kernel_metadata``, resolved with
the current Flax logical-axis rules), else replication.

Example:
    >>> mesh = make_mesh(data=2, model=4)                                   # doctest: +SKIP
    >>> rules = tensor_parallel_rules(column=("query", "key", "value"), row=("out",))
    >>> specs = lora_partition_specs(model, rules)                          # doctest: +SKIP
    >>> model = shard_model(model, mesh, specs)                             # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from .. import _utils
from ..lora.nnx_lora import (
    KernelSpec,
    LoRAGate,
    LoRAMask,
    LoRAStat,
    lora_layers,
)
from ..lora.pair import LoraPair, is_lora_pair

__all__ = [
    "P",
    "Rules",
    "DATA_AXIS",
    "MODEL_AXIS",
    "tensor_parallel_rules",
    "spec_for_path",
    "lora_pair_specs",
    "moment_spec",
    "stacked_kernel_spec",
    "lora_partition_specs",
    "optimizer_state_specs",
    "path_str",
]

P = PartitionSpec
Rules = Sequence[tuple[str, Any]]
"""Sharding rules: ``[(regex, spec), ...]``; ``spec`` is a ``PartitionSpec``, a tuple of axis
names (``None`` for a replicated dimension) or ``None`` (fully replicated)."""

DATA_AXIS = "data"
MODEL_AXIS = "model"


# -- rules --------------------------------------------------------------------------------------------
def tensor_parallel_rules(
    column: Sequence[str] = (),
    row: Sequence[str] = (),
    *,
    axis: str = MODEL_AXIS,
    fsdp_axis: str | None = None,
) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style rules for 2-D ``nnx.Linear`` kernels ``(in, out)``.

    Column-parallel layers shard their output features (kernel ``P(fsdp, axis)``, bias
    ``P(axis)``), row-parallel layers their input features (kernel ``P(axis, fsdp)``, bias
    replicated). Layer names are regexes for the last part(s) of the dotted module path, e.g.
    ``column=("query", "key", "value", "intermediate.dense")``, ``row=("attention.output.dense",)``.

    Args:
      column: module-name patterns of column-parallel layers.
      row: module-name patterns of row-parallel layers.
      axis: the tensor-parallel mesh axis.
      fsdp_axis: optionally shard the other kernel dimension over this axis too (ZeRO-3/FSDP style).

    Returns:
      A rule list for :func:`lora_partition_specs`.
    """
    rules: list[tuple[str, PartitionSpec]] = []
    for name in column:
        rules.append((rf"(.*\.)?{name}\.kernel", P(fsdp_axis, axis)))
        rules.append((rf"(.*\.)?{name}\.bias", P(axis)))
    for name in row:
        rules.append((rf"(.*\.)?{name}\.kernel", P(axis, fsdp_axis)))
        rules.append((rf"(.*\.)?{name}\.bias", P(None)))
    return rules


# -- paths and rules ----------------------------------------------------------------------------------
def path_str(keypath: Sequence[Any]) -> str:
    """Dotted string of a JAX key path, e.g. ``"layers.0.query.lora"`` (as NNX module paths)."""
    return _utils.path_string(keypath, ".")


def _as_spec(value: Any, where: str) -> PartitionSpec:
    if value is None:
        return P()
    if isinstance(value, PartitionSpec):
        return value
    if isinstance(value, (tuple, list)):
        return P(*value)
    raise TypeError(f"sharding rule '{where}': expected a PartitionSpec, a tuple of axis names or None, got {value!r}.")


def _compile_rules(rules: Rules | None) -> list[tuple[re.Pattern, Any, str]]:
    out = []
    for item in rules or ():
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"sharding rules must be (regex, spec) pairs, got {item!r}.")
        try:
            out.append((re.compile(item[0]), item[1], item[0]))
        except re.error as e:
            raise ValueError(f"sharding rule regex {item[0]!r} is invalid: {e}.") from e
    return out


def _unadapted(path: str) -> str:
    """``"x.query.base.kernel"`` -> ``"x.query.kernel"``: the path before ``apply_lora`` wrapped it."""
    return re.sub(r"(^|\.)base\.(?=[^.]+$)", r"\1", path)


def spec_for_path(path: str, rules: Rules | None) -> PartitionSpec | None:
    """The spec of the first rule whose regex fully matches ``path`` (or its un-adapted form).

    Returns ``None`` when no rule matches.
    """
    compiled = rules if (rules and isinstance(rules[0][0], re.Pattern)) else _compile_rules(rules)
    for cand in dict.fromkeys((path, _unadapted(path))):
        for pat, spec, raw in compiled:
            if pat.fullmatch(cand):
                return _as_spec(spec, raw)
    return None


def _pad(spec: PartitionSpec, ndim: int, where: str) -> tuple:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where}: PartitionSpec {spec} has {len(entries)} entries but the array has rank {ndim}.")
    used: list[str] = []
    for e in entries:
        for name in (e,) if isinstance(e, str) else (e or ()):
            if name in used:
                raise ValueError(f"{where}: PartitionSpec {spec} uses mesh axis {name!r} twice.")
            used.append(name)
    return entries + (None,) * (ndim - len(entries))


# -- LoRA pair specs ----------------------------------------------------------------------------------
def lora_pair_specs(
    kernel_spec: PartitionSpec,
    kernel: KernelSpec | tuple[int, int],
    *,
    scale: float = 1.0,
    path: str = "LoRA pair",
    layer_ndim: int = 0,
    in_ndim: int | None = None,
) -> LoraPair:
    """Specs of ``a`` and ``b`` from the base kernel's spec.

    Args:
      kernel_spec: the base kernel's ``PartitionSpec`` in the kernel's own axis order.
      kernel: the layer's :class:`~lorapro_jax.lora.nnx_lora.KernelSpec` (needed for ``nnx.Einsum``
        kernels whose axes are not ``(*in, *out)``), or ``(in_ndim, out_ndim)`` for a
        ``(*in_shape, *out_shape)`` kernel.
      scale: the pair's static scale, so that the spec tree has the structure of the params tree.
      path: for error messages.
      layer_ndim: number of leading layer (``nnx.vmap``) axes of the kernel; ``kernel_spec`` must then
        cover them (see :func:`stacked_kernel_spec`).
      in_ndim: the pair's static ``in_ndim`` (set for stacked pairs), so the spec tree matches the params.

    Returns:
      ``LoraPair(a=P(*stack_spec, *in_spec, None), b=P(*stack_spec, None, *out_spec), scale)`` (rank axis
      replicated; ``stack_spec`` covers the layer axes and, for batched kernels, the batch axes).
    """
    if isinstance(kernel, KernelSpec):
        n_in, n_out, n_b = len(kernel.in_shape), len(kernel.out_shape), len(kernel.batch_shape)
        entries = _pad(kernel_spec, layer_ndim + n_b + n_in + n_out, f"{path} (base kernel)")
        lead, entries = entries[:layer_ndim], entries[layer_ndim:]
        if kernel.kind == "einsum":
            _, k, _, ins, outs = kernel.einsum
            by_letter = dict(zip(k, entries))
            in_spec = tuple(by_letter[c] for c in ins)
            out_spec = tuple(by_letter[c] for c in outs)
            stack_spec = lead + tuple(by_letter[c] for c in kernel.batch_letters)
        else:
            stack_spec = lead + entries[:n_b]
            in_spec, out_spec = entries[n_b : n_b + n_in], entries[n_b + n_in :]
    else:
        n_in, n_out = kernel
        entries = _pad(kernel_spec, layer_ndim + n_in + n_out, f"{path} (base kernel)")
        stack_spec, entries = entries[:layer_ndim], entries[layer_ndim:]
        in_spec, out_spec = entries[:n_in], entries[n_in:]
    return LoraPair(P(*stack_spec, *in_spec, None), P(*stack_spec, None, *out_spec), scale, in_ndim=in_ndim)


def stacked_kernel_spec(spec: PartitionSpec, kernel_ndim: int, layer_ndim: int, stack_axis: Any = None) -> PartitionSpec:
    """The spec of a kernel with ``layer_ndim`` leading layer axes from a rule/metadata ``spec``.

    A spec with ``kernel_ndim`` entries is kept; a shorter one is a per-layer spec and gets
    ``stack_axis`` (a mesh axis name, or ``None`` for replicated) on each layer axis in front.
    """
    if layer_ndim and len(tuple(spec)) < kernel_ndim:
        return P(*((stack_axis,) * layer_ndim), *tuple(spec))
    return spec


def moment_spec(pair_spec: LoraPair) -> PartitionSpec:
    """Spec of a full-size ``(*stack, *in_shape, *out_shape)`` array of a pair (LoRA-Pro full-form moments).

    It is ``P(*a_spec[:-1], *b_spec[k + 1:])`` (``k`` stack axes): the kernel's spec in ``(*stack, *in, *out)`` order.
    """
    a = tuple(pair_spec.a)
    k = 0 if pair_spec.in_ndim is None else len(a) - 1 - pair_spec.in_ndim
    return P(*a[:-1], *tuple(pair_spec.b)[k + 1 :])


def _var_metadata_spec(var: nnx.Variable) -> PartitionSpec | None:
    """The spec from NNX metadata (``out_sharding``; Flax 0.12 stores the deprecated ``sharding_names`` /
    ``sharding`` there too), resolved with the active Flax logical-axis rules; None without metadata."""
    if var.get_metadata().get("out_sharding"):
        return nnx.spmd.get_var_pspec(var)
    return None


def _shape(x: Any) -> tuple[int, ...] | None:
    v = _utils.unwrap(x)
    return tuple(v.shape) if hasattr(v, "shape") else None


def lora_partition_specs(
    model_or_state: nnx.Module | Any,
    rules: Rules | None = None,
    *,
    default: PartitionSpec | None = None,
    wrt: Any = None,
    stack_axis: str | tuple[str, ...] | None = None,
) -> Any:
    """A ``PartitionSpec`` tree for ``nnx.state(model)`` (or for the given state).

    Every array gets a spec: base weights and other parameters from ``rules`` / NNX metadata /
    ``default``; each :class:`LoRAParam` pair a ``LoraPair(P_a, P_b)`` derived from its base
    kernel (:func:`lora_pair_specs`); ``LoRAGate`` ``(r,)`` replicated; ``LoRAMask`` like ``a``;
    ``LoRAStat`` ``(*in_shape,)`` like the kernel's input axes.

    Args:
      model_or_state: an NNX module (its full ``nnx.state``), or a state/pytree from it, e.g.
        ``nnx.state(model)``, ``nnx.state(model, LoRAParam)`` or ``nnx.as_pure(...)`` of them
        (Variables are kept, with their values replaced by specs). For ``nnx.Einsum`` targets pass
        the model: a state alone does not say how the einsum kernel's axes are ordered.
      rules: ``[(regex, spec), ...]`` over dotted paths such as ``"encoder.layer.0.attention.self.
        query.kernel"``; the first full match wins. Rules win over NNX metadata.
      default: spec of arrays no rule or metadata covers (default: replicated).
      wrt: optional NNX filter (e.g. ``LoRAParam``): return the specs of ``nnx.state(model, wrt)``
        only (the params an ``nnx.Optimizer(model, tx, wrt=wrt)`` sees).
      stack_axis: mesh axis for the layer axes of stacked LoRA layers whose kernel spec is per-layer
        (shorter than the kernel); default ``None``: replicated. A full-length rule wins over it.

    Returns:
      A pytree with the structure of the state whose array leaves are ``PartitionSpec`` and whose
      LoRA pairs are ``LoraPair(a=PartitionSpec, b=PartitionSpec)``.

    Raises:
      ValueError: a spec has more entries than its array's rank or repeats a mesh axis, or a
        pair's shapes do not fit its base kernel (the message names the path).
    """
    compiled = _compile_rules(rules)
    default = P() if default is None else default
    layer_specs: dict[str, KernelSpec] = {}
    if isinstance(model_or_state, nnx.Module):
        layer_specs = {p: layer.spec for p, layer in lora_layers(model_or_state).items()}
        state = nnx.state(model_or_state)
    else:
        state = model_or_state
    is_leaf = lambda x: isinstance(x, nnx.Variable) or is_lora_pair(x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_leaf)
    by_path = {path_str(kp): leaf for kp, leaf in flat}

    def kernel_spec_of(layer: str, layer_ndim: int = 0) -> tuple[PartitionSpec, tuple[int, ...] | None]:
        """Spec (rules, else metadata, else default) and shape (None if absent) of a layer's base kernel."""
        kpath = f"{layer}.base.kernel"  # LoRALayer.base; rules for f"{layer}.kernel" match it too
        kernel = by_path.get(kpath)
        spec = spec_for_path(kpath, compiled)
        if spec is None and isinstance(kernel, nnx.Variable):
            spec = _var_metadata_spec(kernel)
        spec = default if spec is None else spec
        kshape = None if kernel is None else _shape(kernel)
        if layer_ndim:
            spec = stacked_kernel_spec(spec, len(kshape) if kshape else layer_ndim + len(tuple(spec)), layer_ndim,
                                       stack_axis)
        return spec, kshape

    pair_cache: dict[str, LoraPair] = {}

    def pair_spec_of(layer: str, pair: LoraPair) -> LoraPair:
        if layer in pair_cache:
            return pair_cache[layer]
        a_shape, b_shape, k = tuple(pair.a.shape), tuple(pair.b.shape), pair.stack_ndim
        where = f"LoRA pair {layer}.lora"
        if layer in layer_specs:
            ks = layer_specs[layer]
            n_layers = k - len(ks.batch_shape)
            if n_layers < 0 or tuple(ks.in_shape) != a_shape[k:-1] or tuple(ks.out_shape) != b_shape[k + 1 :]:
                raise ValueError(
                    f"{where}: a{a_shape}, b{b_shape} do not fit the layer's kernel in_shape {ks.in_shape}, "
                    f"out_shape {ks.out_shape}, batch_shape {ks.batch_shape}."
                )
            kspec, _ = kernel_spec_of(layer, n_layers)
            out = lora_pair_specs(kspec, ks, scale=pair.scale, path=where, layer_ndim=n_layers, in_ndim=pair.in_ndim)
        else:
            kspec, kshape = kernel_spec_of(layer, k)
            if kshape is not None and kshape != tuple(pair.kernel_shape):
                raise ValueError(
                    f"{where}: base kernel shape {kshape} is not (*stack, *a.shape[k:-1], *b.shape[k+1:]) = "
                    f"{tuple(pair.kernel_shape)}; for nnx.Einsum kernels pass the model, not its state."
                )
            n_in = len(a_shape) - 1 - k
            out = lora_pair_specs(kspec, (n_in, len(b_shape) - 1 - k), scale=pair.scale, path=where, layer_ndim=k,
                                  in_ndim=pair.in_ndim)
        pair_cache[layer] = out
        return out

    # LoRA layers present in the tree (pair paths end in ".lora").
    pair_shapes = {}
    for p, leaf in by_path.items():
        v = _utils.unwrap(leaf)
        if is_lora_pair(v) and p.endswith(".lora"):
            pair_shapes[p[: -len(".lora")]] = v
        elif is_lora_pair(v):
            raise ValueError(f"LoRA pair at {p!r}: expected its path to end in '.lora' (a LoRALayer's LoRAParam).")

    def spec_of(p: str, leaf: Any) -> Any:
        v = _utils.unwrap(leaf)
        parent, _, name = p.rpartition(".")
        if is_lora_pair(v):
            return pair_spec_of(parent, v)
        if not hasattr(v, "shape"):
            return None
        ndim = len(v.shape)
        if parent in pair_shapes and (
            isinstance(leaf, (LoRAGate, LoRAMask, LoRAStat)) or name in ("gate", "a_mask", "input_norm")
        ):
            ps = pair_spec_of(parent, pair_shapes[parent])
            if isinstance(leaf, LoRAGate) or name == "gate":  # (*stack, r): sliced like the pair, rank replicated
                return P(*tuple(ps.a)[: ndim - 1], None)
            if isinstance(leaf, LoRAMask) or name == "a_mask":
                return ps.a
            return P(*tuple(ps.a)[:-1])
        spec = spec_for_path(p, compiled)
        if spec is None and isinstance(leaf, nnx.Variable):
            spec = _var_metadata_spec(leaf)
        spec = default if spec is None else spec
        if parent.endswith(".base") and parent[: -len(".base")] in pair_shapes:
            # a stacked LoRA layer's base kernel / bias: per-layer specs get the layer axes in front
            layer = parent[: -len(".base")]
            lp = pair_shapes[layer]
            ks = layer_specs.get(layer)
            n_layers = lp.stack_ndim - (len(ks.batch_shape) if ks is not None else 0)
            spec = stacked_kernel_spec(spec, ndim, n_layers, stack_axis)
        return P(*_pad(spec, ndim, f"parameter {p!r}"))

    leaves = []
    for kp, leaf in flat:
        s = spec_of(path_str(kp), leaf)
        leaves.append(leaf.replace(s) if isinstance(leaf, nnx.Variable) else s)
    specs = jax.tree_util.tree_unflatten(treedef, leaves)
    if wrt is not None:
        if not isinstance(specs, nnx.State):
            raise TypeError("lora_partition_specs: `wrt` needs a model or an nnx.State with Variables.")
        specs = nnx.split_state(specs, wrt, ...)[0]
    return specs


# -- optimizer states ---------------------------------------------------------------------------------
def _is_spec_leaf(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or is_lora_pair(x) or x is None


def optimizer_state_specs(
    tx_or_init: Any,
    params: Any,
    params_specs: Any,
) -> Any:
    """``PartitionSpec`` tree for ``tx.init(params)``, found by ``jax.eval_shape`` (no allocation).

    Every part of the optimizer state that mirrors the params tree (Adam's ``mu``/``nu``, LoRA-Pro
    states, ...) is matched position by position:

    * a ``LoraPair`` in the state (low-rank moments, efficient form) gets the pair's specs;
    * an array of the pair's kernel shape ``(*in_shape, *out_shape)`` (LoRA-Pro full form ``mu``,
      ``nu``) gets :func:`moment_spec`, i.e. the base kernel's sharding;
    * an array shaped like its parameter gets the parameter's spec;
    * anything else there (e.g. factored or scalar statistics) and every leaf outside such parts
      (step counts, schedule state) is replicated.

    Args:
      tx_or_init: an ``optax.GradientTransformation`` or its ``init`` function.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; ``nnx.State`` allowed).
      params_specs: specs of ``params`` from :func:`lora_partition_specs` (same structure).

    Returns:
      A pytree with the structure of ``tx.init(params)`` whose leaves are ``PartitionSpec``.
    """
    init = getattr(tx_or_init, "init", tx_or_init)
    abstract = jax.eval_shape(init, params)
    pdef = jax.tree_util.tree_structure(params, is_leaf=is_lora_pair)
    p_leaves = jax.tree_util.tree_leaves(params, is_leaf=is_lora_pair)
    s_leaves = jax.tree_util.tree_leaves(params_specs, is_leaf=_is_spec_leaf)
    if len(s_leaves) != len(p_leaves):
        raise ValueError(
            f"optimizer_state_specs: params_specs has {len(s_leaves)} leaves/pairs but params has {len(p_leaves)}; "
            "build it with lora_partition_specs(params)."
        )

    replicated = lambda x: P(*([None] * len(x.shape)))

    def leaf_spec(param, pspec, node):
        if not (hasattr(node, "shape") or is_lora_pair(node)):  # None, MaskedNode, nested stats
            return jax.tree.map(replicated, node)
        if is_lora_pair(param):
            if is_lora_pair(node):
                if node.a.shape == param.a.shape and node.b.shape == param.b.shape:
                    return node.replace(a=pspec.a, b=pspec.b)
                return node.replace(a=replicated(node.a), b=replicated(node.b))
            kshape = tuple(param.kernel_shape)  # (*stack, *in, *out)
            if tuple(node.shape) == kshape:
                return moment_spec(pspec)
            return replicated(node)
        if tuple(node.shape) == tuple(param.shape):
            return pspec
        return replicated(node)

    single_leaf = pdef.num_nodes == 1

    def visit(node):
        subs = None
        if not single_leaf or hasattr(node, "shape") or is_lora_pair(node):
            try:
                subs = pdef.flatten_up_to(node)
            except (ValueError, TypeError):
                subs = None
        if subs is not None:
            return pdef.unflatten([leaf_spec(p, s, n) for p, s, n in zip(p_leaves, s_leaves, subs)])
        if hasattr(node, "shape"):
            return replicated(node)
        children, sdef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if sdef.num_nodes == 1 and not children:
            return node  # empty node (optax.EmptyState, MaskedNode, ...)
        return jax.tree_util.tree_unflatten(sdef, [visit(c) for c in children])

    return visit(abstract)
