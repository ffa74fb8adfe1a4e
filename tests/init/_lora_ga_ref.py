"""Test helpers for LoRA-GA: a small NNX net with Linear / LinearGeneral / interleaved Einsum layers and an
independent NumPy forward + backward of the same net (written from the layer equations, no lorapro_jax code)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

N_IN, N_OUT = 10, 6


class Net(nnx.Module):
    """x (b, 10) -> fc Linear(10, 8) -> tanh -> gen LinearGeneral(8, (2, 4)) -> tanh -> ein 'bhd,odh->bo' (6)."""

    def __init__(self, rngs, dtype=jnp.float32):
        bi = nnx.initializers.normal(0.1)
        self.fc = nnx.Linear(10, 8, param_dtype=dtype, bias_init=bi, rngs=rngs)
        self.gen = nnx.LinearGeneral(8, (2, 4), param_dtype=dtype, bias_init=bi, rngs=rngs)  # kernel (8, 2, 4)
        # kernel 'odh' = (6, 4, 2): output axis first, then the input axes d, h (interleaved order).
        self.ein = nnx.Einsum("bhd,odh->bo", (6, 4, 2), (6,), param_dtype=dtype, bias_init=bi, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.fc(x))
        h = jnp.tanh(self.gen(h))
        return self.ein(h)


def loss_fn(model, batch):
    x, t = batch
    return 0.5 * jnp.mean(jnp.sum((model(x) - t) ** 2, axis=-1))


def make_batches(n_batches, size, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(size, N_IN)).astype(dtype), rng.normal(size=(size, N_OUT)).astype(dtype))
        for _ in range(n_batches)
    ]


def weights(model):
    """Base weights of a (possibly LoRA-adapted) Net as float64 NumPy arrays, plus the LoRA deltas if any."""
    out = {}
    for name in ("fc", "gen", "ein"):
        layer = getattr(model, name)
        base = getattr(layer, "base", layer)
        out[name] = (np.asarray(base.kernel[...], np.float64), np.asarray(base.bias[...], np.float64))
    return out


def np_loss_and_grads(w, x, t):
    """NumPy float64 loss and kernel gradients (in each kernel's own shape) of Net for one batch."""
    (w1, b1), (w2, b2), (w3, b3) = w["fc"], w["gen"], w["ein"]
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(np.einsum("bi,ihd->bhd", h1, w2) + b2)
    y = np.einsum("bhd,odh->bo", h2, w3) + b3
    loss = 0.5 * np.mean(np.sum((y - t) ** 2, axis=-1))
    dy = (y - t) / x.shape[0]
    g3 = np.einsum("bhd,bo->odh", h2, dy)
    dz2 = np.einsum("bo,odh->bhd", dy, w3) * (1 - h2**2)
    g2 = np.einsum("bi,bhd->ihd", h1, dz2)
    dz1 = np.einsum("bhd,ihd->bi", dz2, w2) * (1 - h1**2)
    g1 = x.T @ dz1
    return loss, {"fc": g1, "gen": g2, "ein": g3}


def np_loss(w, x, t):
    return np_loss_and_grads(w, x, t)[0]


def to_paper(name, kernel_like):
    """A kernel-shaped array -> the paper's (m, n) = (out, in) matrix, written out per layer by hand."""
    k = np.asarray(kernel_like)
    if name == "fc":  # (in 10, out 8)
        return k.T
    if name == "gen":  # (in 8, out 2, out 4)
        return k.reshape(8, 8).T
    if name == "ein":  # (out o=6, in d=4, in h=2): in axes in kernel order (d, h)
        return np.transpose(k, (1, 2, 0)).reshape(8, 6).T
    raise KeyError(name)


def pair_paper(pair):
    """A LoraPair (Flax layout) -> paper A (r, n), B (m, r) as float64 NumPy arrays."""
    a = np.asarray(pair.a, np.float64)
    b = np.asarray(pair.b, np.float64)
    r = a.shape[-1]
    return a.reshape(-1, r).T, b.reshape(r, -1).T


def truncated(g, k):
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]
