"""A small LoRA-Pro training run that checkpoints every step and can SIGKILL itself at a chosen point.

    python tests/reliability/crash_train.py RUN_DIR STEPS [--resume]

``LORAPRO_TEST_FAULT="<point>:<n>"`` makes the process ``SIGKILL`` itself at the ``n``-th (1-based)
occurrence of ``point``:

* ``step-done`` — after a training step has updated the parameters in memory, before its checkpoint;
* ``save-mid-write`` — when orbax starts writing an array group of a checkpoint (two groups per save:
  ``model`` then ``optimizer``), so the step's temporary folder holds a partly written checkpoint;
* ``save-before-rename`` — after orbax has written a whole step into its temporary folder, before the
  rename that commits it;
* ``delete-old`` — while orbax deletes the oldest checkpoint (``max_to_keep=2``): one sub-folder removed,
  then killed, leaving an incomplete old step folder.

At the end the trained LoRA factors, optimizer state and RNG state are written to ``RUN_DIR/final.npz``
and ``RESULT step=<first step run> ...`` is printed. Runs are bitwise reproducible on CPU (fp32).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lorapro_jax as lp  # noqa: E402
from lorapro_jax.checkpoint import TrainCheckpointer  # noqa: E402

FAULT = os.environ.get("LORAPRO_TEST_FAULT", "")
_counts: dict[str, int] = {}


def fault_point(name: str) -> bool:
    """True (after counting) when this is the n-th hit of the configured point."""
    point, _, n = FAULT.partition(":")
    if point != name:
        return False
    _counts[name] = _counts.get(name, 0) + 1
    return _counts[name] == int(n or 1)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults() -> None:
    import shutil

    from orbax.checkpoint._src.handlers import standard_checkpoint_handler
    from orbax.checkpoint._src.path import async_path

    real_rename, real_save, real_rmtree = async_path.rename, standard_checkpoint_handler.StandardCheckpointHandler.async_save, shutil.rmtree

    async def rename(src, dst, *a, **k):
        step_level = Path(str(dst)).name.isdigit()  # not the per-item renames inside a step
        if ".orbax-checkpoint-tmp" in str(src) and step_level and fault_point("save-before-rename"):
            die()
        return await real_rename(src, dst, *a, **k)

    async def async_save(self, *a, **k):
        if fault_point("save-mid-write"):
            die()
        return await real_save(self, *a, **k)

    def rmtree(path, *a, **k):
        p = Path(path)
        if p.name.isdigit() and fault_point("delete-old"):
            real_rmtree(p / "optimizer")
            die()
        return real_rmtree(path, *a, **k)

    async_path.rename = rename
    standard_checkpoint_handler.StandardCheckpointHandler.async_save = async_save
    shutil.rmtree = rmtree


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Linear(6, 5, rngs=rngs)
        self.value = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.query(x) + self.value(x)))[:, 0]


TX = lp.lora_pro_adamw(3e-2, form="full", weight_decay=0.01)


def build(seed: int):
    model = Tiny(nnx.Rngs(0))
    lp.apply_lora(model, lp.LoraConfig(rank=2, alpha=4.0, targets=["query", "value"], dropout=0.2),
                  rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    return model, lp.LoraOptimizer(model, TX, wrt=lp.LoRAParam)


def batch(step: int):
    r = np.random.default_rng(1000 + step)
    return jnp.asarray(r.normal(size=(8, 6)), jnp.float32), jnp.asarray(r.normal(size=(8,)), jnp.float32)


@nnx.jit
def train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean(), argnums=nnx.DiffState(0, lp.LoRAParam))(model)
    opt.update(model, grads)
    return loss


def leaves(*objs) -> dict[str, np.ndarray]:
    out = {}
    for i, obj in enumerate(objs):
        for path, var in nnx.to_flat_state(nnx.state(obj)):
            for kp, leaf in jax.tree_util.tree_flatten_with_path(var.get_value())[0]:
                if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                    leaf = jax.random.key_data(leaf)
                out[f"{i}/{'/'.join(map(str, path))}{jax.tree_util.keystr(kp)}"] = np.asarray(leaf)
    return out


def main(argv: list[str]) -> None:
    run_dir, steps, resume = Path(argv[0]), int(argv[1]), "--resume" in argv
    if FAULT:
        install_faults()
    seed = int(os.environ.get("LORAPRO_TEST_SEED", "1"))  # the tests' control run changes it
    model, opt = build(seed=seed if not resume else seed + 6)  # a resumed run starts from other values
    ckpt = TrainCheckpointer(run_dir / "ckpt", max_to_keep=2, async_save=False)
    start = 0
    if resume and ckpt.latest_step() is not None:
        start = ckpt.restore(model, opt, skip_corrupt=True).data_state["step"]
    elif resume:
        model, opt = build(seed=seed)  # nothing saved yet: start over from the same init
    losses = []
    for step in range(start, steps):
        losses.append(float(train_step(model, opt, *batch(step))))
        if fault_point("step-done"):
            die()
        ckpt.save(step + 1, model, opt, data_state={"step": step + 1})
    ckpt.close()
    np.savez(run_dir / "final.npz", **leaves(model, opt))
    print(f"RESULT start={start} losses={losses}")


if __name__ == "__main__":
    main(sys.argv[1:])
