"""LoRA-Pro (AdamW, full form) on a ``("data", "model")`` device mesh.

Runs on anything JAX sees; on a CPU-only machine it simulates devices::

    python experiments/sharded_train.py --cpu-devices 8 --data 2 --model 4 --steps 20
    python experiments/sharded_train.py --cpu-devices 8 --data 4 --model 2 --arch bert --fsdp
    python experiments/sharded_train.py --cpu-devices 8 --data 2 --model 4 --arch minilm   # real weights

The model's attention / MLP kernels are split Megatron-style over ``"model"`` (query/key/value and
the first MLP layer by output features, the attention output and second MLP layer by input
features); LoRA's ``a`` / ``b`` and LoRA-Pro's full-size moments follow their base kernels (see
``lorapro_jax.sharding``); the batch is split over ``"data"``. ``--fsdp`` additionally shards the
other kernel dimension over ``"data"``. With ``--check`` the same steps are re-run on one device and
the largest relative difference of the LoRA parameters is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lp
from lorapro_jax import sharding as sh
from lorapro_jax.parallel import make_train_step, shard_for_training

TINY_TARGETS = r".*\.(query|key|value|out|fc1|fc2)"
TINY_RULES = sh.tensor_parallel_rules(column=("query", "key", "value", "fc1"), row=("out", "fc2"))
BERT_TARGETS = r".*\.(query|key|value|attention\.output\.dense|intermediate\.dense|[0-9]+\.output\.dense)"
BERT_RULES = sh.tensor_parallel_rules(
    column=(r"attention\.self\.(query|key|value)", r"intermediate\.dense"),
    row=(r"attention\.output\.dense", r"[0-9]+\.output\.dense"),
)


class Block(nnx.Module):
    """Post-LN transformer block: attention (query/key/value/out) and an MLP (fc1/fc2)."""

    def __init__(self, d: int, heads: int, ff: int, *, param_dtype: Any, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.fc1, self.fc2 = lin(d, ff), lin(ff, d)
        self.ln1 = nnx.LayerNorm(d, param_dtype=param_dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, d)
        x = self.ln1(x + self.out(o))
        return self.ln2(x + self.fc2(jax.nn.gelu(self.fc1(x))))


class TinyTransformer(nnx.Module):
    """Token + position embeddings, ``layers`` blocks, mean pooling and a linear classifier."""

    def __init__(
        self,
        vocab: int = 64,
        seq: int = 8,
        d: int = 32,
        heads: int = 4,
        ff: int = 64,
        layers: int = 2,
        classes: int = 4,
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab, d, param_dtype=param_dtype, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d), param_dtype))
        self.layers = nnx.List([Block(d, heads, ff, param_dtype=param_dtype, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, classes, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) + self.pos[...][: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(axis=1))


def classification_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of ``model(ids)`` against integer labels."""
    ids, labels = batch
    logits = model(ids)
    if hasattr(logits, "logits"):
        logits = logits.logits
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def synthetic_batches(n: int, batch: int, seq: int, vocab: int, classes: int, seed: int = 0):
    """A learnable toy task: the label is the first token modulo ``classes``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
        out.append((ids, (ids[:, 0] % classes).astype(np.int32)))
    return out


def build_model(arch: str, rank: int, seed: int = 0, param_dtype: Any = jnp.float32):
    """``(model, rules, vocab, seq, classes)`` with LoRA applied to the attention and MLP kernels."""
    if arch == "tiny":
        model = TinyTransformer(param_dtype=param_dtype, rngs=nnx.Rngs(seed))
        targets, rules, vocab, seq, classes = TINY_TARGETS, TINY_RULES, 64, 8, 4
    elif arch in ("bert", "minilm"):
        from transformers import BertConfig

        from lorapro_jax.models import (
            BertForSequenceClassification,
            load_pretrained,
            minilm_path,
        )

        if arch == "bert":
            cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=32, num_labels=4,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = BertForSequenceClassification(cfg, pooling="mean", param_dtype=param_dtype, rngs=nnx.Rngs(seed))
            vocab = 128
        else:
            model = load_pretrained(BertForSequenceClassification, minilm_path(), pooling="mean", num_labels=4,
                                    config_overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
            vocab = 1000
        targets, rules, seq, classes = BERT_TARGETS, BERT_RULES, 16, 4
    else:
        raise ValueError(f"unknown --arch {arch!r} (tiny | bert | minilm)")
    lp.apply_lora(model, lp.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets), rngs=nnx.Rngs(seed + 1))
    return model, rules, vocab, seq, classes


def _relerr(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def run(args: argparse.Namespace) -> dict:
    mesh = sh.make_mesh(data=args.data, model=args.model, axis_types=args.axis_types)
    tx = lp.lora_pro_adamw(args.lr, weight_decay=args.weight_decay, form="full", on_nonfinite="ignore")
    model, rules, vocab, seq, classes = build_model(args.arch, args.rank, args.seed)
    if args.fsdp:
        if args.arch != "tiny":
            rules = sh.tensor_parallel_rules(
                column=(r"attention\.self\.(query|key|value)", r"intermediate\.dense"),
                row=(r"attention\.output\.dense", r"[0-9]+\.output\.dense"), fsdp_axis=sh.DATA_AXIS)
        else:
            rules = sh.tensor_parallel_rules(column=("query", "key", "value", "fc1"), row=("out", "fc2"),
                                             fsdp_axis=sh.DATA_AXIS)
    graphdef, state, specs = shard_for_training(model, tx, mesh, rules)
    step = make_train_step(graphdef, classification_loss, tx, mesh, specs, donate=False)
    batches = synthetic_batches(args.steps, args.batch, seq, vocab, classes, args.seed)
    batch_sharding = sh.named_shardings(sh.batch_spec(1), mesh)
    losses, t0 = [], time.perf_counter()
    for b in batches:
        state, loss = step(state, jax.device_put(b, batch_sharding))
        losses.append(float(loss))
    elapsed = time.perf_counter() - t0

    # Memory: bytes of LoRA-Pro moments per device vs. their global size.
    mu = state.opt_state[0].mu
    per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(mu))
    total = sum(x.nbytes for x in jax.tree.leaves(mu))
    report = {
        "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))),
        "arch": args.arch,
        "losses": losses,
        "seconds": elapsed,
        "moment_bytes_per_device": per_dev,
        "moment_bytes_global": total,
        "example_shardings": {},
    }
    flat = jax.tree_util.tree_flatten_with_path(state.lora, is_leaf=lp.is_lora_pair)[0][:2]
    for kp, pair in flat:
        report["example_shardings"][sh.path_str(kp)] = {"a": str(pair.a.sharding.spec), "b": str(pair.b.sharding.spec)}
    if args.check:
        ref_model, *_ = build_model(args.arch, args.rank, args.seed)
        lora, _ = train_single_device(ref_model, classification_loss, tx, batches)
        report["max_rel_diff_vs_single_device"] = max(jax.tree.leaves(jax.tree.map(_relerr, state.lora, lora)))
    return report


def train_single_device(model: nnx.Module, loss_fn, tx: optax.GradientTransformation, batches) -> tuple[Any, Any]:
    """The unsharded reference: one jitted step per batch on the LoRA params of ``model``.

    Returns the final ``(lora, opt_state)`` as pure pytrees (``LoraPair`` leaves), for comparison with a
    sharded or otherwise transformed run of the same steps. ``loss_fn(model, batch)`` is a scalar.
    """
    g, lora, frozen = nnx.split(model, lp.LoRAParam, ...)
    lora, frozen = nnx.as_pure(lora), nnx.as_pure(frozen)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt, batch):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(g, p, frozen), batch))(lora)
        upd, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, upd), opt

    for b in batches:
        lora, opt = step(lora, opt, b)
    return lora, opt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices (CPU only)")
    p.add_argument("--data", type=int, default=None, help="data-parallel mesh size (default: devices / model)")
    p.add_argument("--model", type=int, default=1, help="tensor-parallel mesh size")
    p.add_argument("--axis-types", choices=("explicit", "auto"), default="explicit")
    p.add_argument("--arch", choices=("tiny", "bert", "minilm"), default="tiny")
    p.add_argument("--fsdp", action="store_true", help="also shard kernels over the data axis")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with the same steps on one device")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    report = run(args)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
