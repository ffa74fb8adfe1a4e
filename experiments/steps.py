"""Loss, prediction, the jitted train / eval steps and evaluation of ``experiments.finetune``.

``train_step`` is ``nnx.jit``-compiled with the task's :class:`~experiments.tasks.TaskSpec` static: it takes
gradients of the trainable variables only (``nnx.DiffState(0, opt.wrt)``) and applies the optimizer. It compiles
once per (model structure, optimizer object, batch shape): the runner keeps one optimizer object per method so
seeds and learning rates share the compiled step (see :mod:`experiments.methods`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lorapro_jax.data import BucketedBatcher, EncodedDataset

from .tasks import TaskData, TaskSpec

__all__ = [
    "batch_loss",
    "causal_lm_nll",
    "device_batch",
    "eval_step",
    "evaluate",
    "example_losses",
    "predict",
    "predict_scores",
    "train_step",
]


def _forward(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec, decoder_input_ids=None) -> jax.Array:
    if spec.arch == "bert":
        return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    if spec.arch in ("t5-cls", "llama", "llama-lm"):
        return model(batch["input_ids"], batch["attention_mask"])
    return model(batch["input_ids"], decoder_input_ids, batch["attention_mask"])


def _target_logprob(model, batch, spec: TaskSpec, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p(target tokens) per example ``(B,)`` (teacher forcing) and the token count."""
    from lorapro_jax.models import shift_right

    dec_in = shift_right(targets, spec.start_id, spec.pad_id)
    logits = _forward(model, batch, spec, dec_in).astype(jnp.float32)  # (B, T, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return jnp.sum(tok * mask, axis=-1)


def causal_lm_nll(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> tuple[jax.Array, jax.Array]:
    """Next-token NLL ``(B, L-1)`` of tokens ``1..L-1`` and their loss weights ``(B, L-1)``.

    The weight of target token ``t`` is ``loss_mask[:, t] * weight`` (response tokens of real rows; prompt,
    padding and filler rows weigh 0). The logits are computed in the model's dtype and the loss in float32.
    """
    logits = _forward(model, batch, spec)[:, :-1].astype(jnp.float32)  # (B, L-1, V)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"][:, 1:])
    w = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["weight"].astype(jnp.float32)[:, None]
    return nll, w


def example_losses(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Per-example loss ``(B,)``: cross-entropy, squared error, or mean target-token NLL (seq2seq, causal LM)."""
    if spec.kind == "causal-lm":
        nll, w = causal_lm_nll(model, batch, spec)
        return jnp.sum(nll * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)
    labels = batch["labels"]
    if spec.kind == "seq2seq":
        table = jnp.asarray(spec.targets, jnp.int32)
        tmask = jnp.asarray(spec.target_mask, jnp.float32)
        lab = jnp.clip(labels, 0, spec.num_labels - 1)
        targets, mask = table[lab], tmask[lab]
        return -_target_logprob(model, batch, spec, targets, mask) / jnp.sum(mask, axis=-1)
    out = _forward(model, batch, spec).astype(jnp.float32)
    if spec.kind == "regression":
        return (out[:, 0] - labels.astype(jnp.float32)) ** 2
    lab = jnp.clip(labels, 0, spec.num_labels - 1)
    return optax.softmax_cross_entropy_with_integer_labels(out, lab)


def batch_loss(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Weighted mean of :func:`example_losses` (filler rows have weight 0); for a causal LM the mean NLL over
    the batch's response tokens (every target token weighs the same, as in Hugging Face's trainers)."""
    if spec.kind == "causal-lm":
        nll, w = causal_lm_nll(model, batch, spec)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    w = batch["weight"].astype(jnp.float32)
    return jnp.sum(w * example_losses(model, batch, spec)) / jnp.maximum(jnp.sum(w), 1.0)


def predict_scores(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Class scores ``(B, C)`` (logits, or target log-likelihoods for seq2seq), ``(B, 1)`` regression."""
    if spec.kind != "seq2seq":
        return _forward(model, batch, spec).astype(jnp.float32)
    b = batch["input_ids"].shape[0]
    table = jnp.asarray(spec.targets, jnp.int32)
    tmask = jnp.asarray(spec.target_mask, jnp.float32)
    cols = []
    for c in range(spec.num_labels):
        t = jnp.broadcast_to(table[c], (b, table.shape[1]))
        m = jnp.broadcast_to(tmask[c], (b, table.shape[1]))
        cols.append(_target_logprob(model, batch, spec, t, m))
    return jnp.stack(cols, axis=-1)


@nnx.jit(static_argnames=("spec",))
def train_step(model: nnx.Module, opt: nnx.Optimizer, batch: dict[str, jax.Array], spec: TaskSpec):
    """One optimizer step on the variables ``opt.wrt``; returns ``(loss, grad_norm)``."""
    loss, grads = nnx.value_and_grad(lambda m: batch_loss(m, batch, spec), argnums=nnx.DiffState(0, opt.wrt))(model)
    opt.update(model, grads)
    return loss, optax.tree.norm(grads)


@nnx.jit(static_argnames=("spec",))
def eval_step(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Class scores of one batch (call with the model in ``eval()`` mode)."""
    return predict_scores(model, batch, spec)


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}


def predict(model: nnx.Module, data: EncodedDataset, spec: TaskSpec, batch_size: int) -> dict[str, np.ndarray]:
    """Scores of every example of ``data``, in dataset order (model switched to ``eval()`` and back).

    Returns:
        ``{"scores": (N, C) float32, "labels": (N,), "index": (N,) int}`` (filler rows removed).
    """
    model.eval()
    scores, labels, index = [], [], []
    for batch in BucketedBatcher(data, batch_size, shuffle=False).epoch(0):
        keep = batch["weight"] > 0
        scores.append(np.asarray(eval_step(model, device_batch(batch), spec))[keep])
        labels.append(batch["labels"][keep])
        index.append(batch["index"][keep])
    model.train()
    order = np.argsort(np.concatenate(index), kind="stable")
    return {k: np.concatenate(v)[order] for k, v in (("scores", scores), ("labels", labels), ("index", index))}


def evaluate(
    model: nnx.Module, data: EncodedDataset, spec: TaskSpec, task: TaskData, batch_size: int,
    predictions: dict[str, Any] | None = None, **lm_options: Any,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``; with a dict ``predictions``, also fills it with :func:`predict`'s arrays.

    A causal-LM task is scored by :func:`experiments.lm_eval.evaluate_lm` (``lm_options`` go there).
    """
    if spec.kind == "causal-lm":
        from .lm_eval import evaluate_lm

        return evaluate_lm(model, data, spec, task, batch_size, predictions=predictions, **lm_options)
    out = predict(model, data, spec, batch_size)
    if predictions is not None:
        predictions.update(out)
    return task.metrics(out["scores"], out["labels"], np.ones(len(out["labels"]), np.float32))
