"""Partition rules for LoRA pairs and LoRA-Pro states (single process, no devices needed).

Expected specs are written out by hand from the layout rule: kernel (*in, *out) ~ P(*i, *o) gives
a (*in, r) ~ P(*i, None), b (r, *out) ~ P(None, *o), full-size moments (*in, *out) ~ P(*i, *o).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import lorapro_jax as lp
from lorapro_jax import sharding as sh
from lorapro_jax.parallel import process_batch_slice

P = sh.P


class Net(nnx.Module):
    def __init__(self, with_metadata: bool = False):
        meta = {"kernel_metadata": {"out_sharding": (None, "model")}} if with_metadata else {}
        self.q = nnx.Linear(8, 12, rngs=nnx.Rngs(0), **meta)
        self.o = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
        self.g = nnx.LinearGeneral((4, 6), (3, 5), axis=(-2, -1), rngs=nnx.Rngs(0))
        self.e = nnx.Einsum("bd,hdk->bhk", (3, 8, 5), rngs=nnx.Rngs(0))  # kernel axes (h, d, k): in d, out (h, k)


def adapted(with_metadata=False, **cfg):
    with jax.set_mesh(sh.make_mesh(1, 1)):  # NNX shards annotated variables at creation
        m = Net(with_metadata)
    return lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["q", "o", "g", "e"], **cfg), rngs=nnx.Rngs(1))


RULES = [
    (r"q\.kernel", P(None, "model")),
    (r"o\.kernel", P("model", None)),
    (r"g\.kernel", P("data", None, "model", None)),
    (r"e\.kernel", P("model", "data", None)),
    (r".*\.bias", None),
]


def test_pair_specs_of_linear_kernel():
    pair = sh.lora_pair_specs(P("x", "y"), (1, 1), scale=3.0)
    assert pair.a == P("x", None) and pair.b == P(None, "y") and pair.scale == 3.0
    assert sh.moment_spec(pair) == P("x", "y")
    pair = sh.lora_pair_specs(P(("x", "y")), (1, 1))  # short spec, multi-axis entry
    assert pair.a == P(("x", "y"), None) and pair.b == P(None, None)


def test_specs_of_a_model_linear_general_and_einsum():
    specs = nnx.as_pure(sh.lora_partition_specs(adapted(), RULES))
    assert specs["q"]["lora"] == lp.LoraPair(P(None, None), P(None, "model"), 8.0)
    assert specs["o"]["lora"] == lp.LoraPair(P("model", None), P(None, None), 8.0)
    # LinearGeneral kernel (4, 6, 3, 5) ~ P(data, None, model, None)
    assert specs["g"]["lora"] == lp.LoraPair(P("data", None, None), P(None, "model", None), 8.0)
    # Einsum kernel (h, d, k) = (3, 8, 5) ~ P(model, data, None): a (d, r), b (r, h, k)
    assert specs["e"]["lora"] == lp.LoraPair(P("data", None), P(None, "model", None), 8.0)
    assert specs["q"]["base"]["kernel"] == P(None, "model")
    assert specs["q"]["base"]["bias"] == P(None)
    assert specs["g"]["base"]["kernel"] == P("data", None, "model", None)
    for layer in ("q", "o", "g", "e"):
        assert specs[layer]["gate"] == P(None)


def test_rules_written_for_the_unadapted_model_match_and_first_rule_wins():
    assert sh.spec_for_path("enc.0.query.base.kernel", [(r".*query\.kernel", P(None, "m"))]) == P(None, "m")
    assert sh.spec_for_path("enc.0.query.base.kernel", [(r".*query\.base\.kernel", ("m",))]) == P("m")
    first = [(r".*\.kernel", P("a")), (r".*query\.kernel", P("b"))]
    assert sh.spec_for_path("x.query.kernel", first) == P("a")
    assert sh.spec_for_path("x.query.bias", first) is None
    assert sh.spec_for_path("x.query.kernel", [(r"query\.kernel", P("a"))]) is None  # full match only


def test_nnx_sharding_metadata_is_used_and_rules_override_it():
    model = adapted(with_metadata=True)
    specs = nnx.as_pure(sh.lora_partition_specs(model))  # no rules: metadata of q's kernel
    assert specs["q"]["base"]["kernel"] == P(None, "model")
    assert specs["q"]["lora"].b == P(None, "model") and specs["q"]["lora"].a == P(None, None)
    assert specs["o"]["base"]["kernel"] == P(None, None)  # nothing known: replicated
    specs = nnx.as_pure(sh.lora_partition_specs(model, [(r"q\.kernel", P("data", None))]))
    assert specs["q"]["lora"] == lp.LoraPair(P("data", None), P(None, None), 8.0)


def test_mask_and_input_norm_follow_a():
    specs = nnx.as_pure(sh.lora_partition_specs(adapted(a_mask=True, track_input_norm=True), RULES))
    assert specs["g"]["a_mask"] == P("data", None, None)
    assert specs["g"]["input_norm"] == P("data", None)
    assert specs["e"]["a_mask"] == P("data", None) and specs["e"]["input_norm"] == P("data")
    assert specs["q"]["gate"] == P(None)


def test_specs_of_states_and_wrt():
    model = adapted()
    full = sh.lora_partition_specs(model, RULES)
    # keeps the Variables of nnx.state(model): same structure
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(full, is_leaf=lambda x: isinstance(x, P))
    only = sh.lora_partition_specs(model, RULES, wrt=lp.LoRAParam)
    assert jax.tree.structure(lp.lora_state(model)) == jax.tree.structure(
        only, is_leaf=lambda x: isinstance(x, P))
    # from a state that holds no kernels: the rules are applied to the kernel paths
    pure = nnx.as_pure(sh.lora_partition_specs(nnx.as_pure(lp.lora_state(model)), RULES[:2]))
    assert pure["q"]["lora"].b == P(None, "model") and pure["o"]["lora"].a == P("model", None)


def test_einsum_from_state_with_kernel_needs_the_model():
    state = nnx.state(adapted())
    with pytest.raises(ValueError, match=r"e\.lora.*pass the model"):
        sh.lora_partition_specs(state, RULES)


@pytest.mark.parametrize(
    "rules,err,match",
    [
        ([(r"q\.kernel", P(None, "model", None))], ValueError, r"q.*3 entries.*rank 2"),
        ([(r"q\.kernel", P("model", "model"))], ValueError, r"q.*'model' twice"),
        ([(r"q\.kernel", "model")], TypeError, r"q\\\.kernel"),
        ([(r"q(\.kernel", P())], ValueError, r"invalid"),
        ([(r"o\.bias", P("a", "b"))], ValueError, r"o\.base\.bias"),
    ],
)
def test_bad_specs_are_errors_naming_the_path(rules, err, match):
    with pytest.raises(err, match=match):
        sh.lora_partition_specs(adapted(), rules)


def test_named_shardings_checks_axes_and_divisibility():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    model = adapted()
    specs = nnx.as_pure(sh.lora_partition_specs(model, RULES))
    state = nnx.as_pure(nnx.state(model))
    with pytest.raises(ValueError, match=r"q.*size 14.*\('model',\)"):
        sh.named_shardings({"q": P("model")}, mesh, {"q": jnp.zeros((14,))})
    with pytest.raises(ValueError, match=r"e.*dimension 0 of size 3"):
        sh.named_shardings(specs, mesh, state)
    with pytest.raises(ValueError, match=r"mesh axis 'tensor'"):
        sh.named_shardings({"x": P("tensor")}, mesh)
    ok = sh.named_shardings({"x": P("data", "model")}, mesh, {"x": jnp.zeros((4, 8))})
    assert ok["x"].spec == P("data", "model")


def test_optimizer_state_specs_full_form():
    model = adapted()
    params = nnx.as_pure(lp.lora_state(model))
    pspecs = nnx.as_pure(sh.lora_partition_specs(model, RULES, wrt=lp.LoRAParam))
    tx = optax.chain(optax.clip_by_global_norm(1.0), lp.lora_pro_adamw(1e-3, weight_decay=0.1, form="full"))
    specs = sh.optimizer_state_specs(tx, params, pspecs)
    abstract = jax.eval_shape(tx.init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P))
    adam = specs[1][0]
    assert adam.count == P()
    want = {"q": P(None, "model"), "o": P("model", None), "g": P("data", None, "model", None),
            "e": P("data", "model", None)}  # einsum moment in (*in, *out) = (d, h, k) order
    for layer, spec in want.items():
        assert adam.mu[layer]["lora"] == spec and adam.nu[layer]["lora"] == spec
        assert abstract[1][0].mu[layer]["lora"].ndim == len(spec)


def test_optimizer_state_specs_efficient_and_lean_forms():
    model = adapted()
    params = nnx.as_pure(lp.lora_state(model))
    pspecs = nnx.as_pure(sh.lora_partition_specs(model, RULES, wrt=lp.LoRAParam))
    specs = sh.optimizer_state_specs(lp.lora_pro_adamw(1e-3, form="efficient"), params, pspecs)
    found = [x for x in jax.tree.leaves(specs, is_leaf=lp.is_lora_pair) if lp.is_lora_pair(x)]
    assert lp.LoraPair(P("data", None, None), P(None, "model", None), 8.0) in found  # Adam mu/nu of g
    lean_tx = lp.lora_pro_adamw(1e-3, form="lean")
    lean = sh.optimizer_state_specs(lean_tx, params, pspecs)
    abstract = jax.eval_shape(lean_tx.init, params)
    leaves = jax.tree.leaves(lean, is_leaf=lambda x: isinstance(x, P))
    assert all(isinstance(s, P) for s in leaves)
    assert [len(s) for s in leaves] == [x.ndim for x in jax.tree.leaves(abstract)]


def test_make_mesh_and_rules_helpers():
    mesh = sh.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.axis_sizes == (jax.device_count(), 1)
    assert sh.has_explicit_axes(mesh) and not sh.has_explicit_axes(sh.make_mesh(axis_types="auto"))
    with pytest.raises(ValueError, match="device"):
        sh.make_mesh(data=1, model=jax.device_count() + 1)
    rules = sh.tensor_parallel_rules(column=(r"attention\.self\.query",), row=(r"attention\.output\.dense",),
                                     fsdp_axis="data")
    path = "bert.encoder.layer.3.attention.self.query.base.kernel"
    assert sh.spec_for_path(path, rules) == P("data", "model")
    assert sh.spec_for_path("encoder.layer.3.attention.self.query.bias", rules) == P("model")
    assert sh.spec_for_path("encoder.layer.3.attention.output.dense.kernel", rules) == P("model", "data")
    assert sh.spec_for_path("encoder.layer.3.output.dense.kernel", rules) is None
    assert sh.batch_spec(3) == P("data", None, None)


def test_process_batch_slice_single_process():
    assert process_batch_slice(8, sh.make_mesh()) == slice(0, 8)


def test_shard_model_places_variables():
    mesh = sh.make_mesh(1, 1)
    model = sh.shard_model(adapted(), mesh, rules=RULES)
    assert model.g.base.kernel[...].sharding.spec == P("data", None, "model", None)
    assert model.g.lora.get_value().b.sharding.spec == P(None, "model", None)


def test_logical_axis_names_resolve_with_flax_rules():
    import flax.linen as nn

    logical = (("embed", None), ("mlp", "model"))
    with jax.set_mesh(sh.make_mesh(1, 1)), nn.logical_axis_rules(logical):
        m = nnx.Module()
        m.fc = nnx.Linear(8, 12, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("embed", "mlp")})
        lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["fc"]), rngs=nnx.Rngs(1))
        specs = nnx.as_pure(sh.lora_partition_specs(m))
    assert specs["fc"]["lora"] == lp.LoraPair(P(None, None), P(None, "model"), 8.0)
    unresolved = nnx.as_pure(sh.lora_partition_specs(m))  # outside the rules: logical names stay
    with pytest.raises(ValueError, match=r"fc\.base\.kernel.*names mesh axis 'embed'"):
        sh.named_shardings(unresolved, sh.make_mesh(1, 1))
