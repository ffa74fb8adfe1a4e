"""Bad inputs and the errors they must raise: one table shared by the tests and by docs/reliability.md.

Each :class:`Case` is a function ``run(tmp: Path)`` that makes one bad call, the exception type it must
raise and a regular expression its message must match (``re.search``). ``python
tests/reliability/reliability_cases.py`` runs every case and prints the markdown table of
docs/reliability.md with the messages actually raised.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: this checkout's lorapro_jax, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax.numpy as jnp
import optax
from flax import nnx

import lorapro_jax as lp


@dataclasses.dataclass(frozen=True)
class Case:
    group: str
    name: str
    run: Callable[[Path], object]
    error: type[BaseException]
    match: str


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Linear(6, 5, rngs=rngs)
        self.value = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        return self.query(x).sum(-1) + self.value(x).sum(-1)


CFG = lp.LoraConfig(rank=2, alpha=4.0, targets=["query", "value"])


def adapted(seed: int = 1) -> Tiny:
    model = Tiny(nnx.Rngs(0))
    lp.apply_lora(model, CFG, rngs=nnx.Rngs(seed))
    return model


# -- item 4: argument checks ----------------------------------------------------------------------------
def _ckpt():
    from lorapro_jax import checkpoint

    return checkpoint


def _export():
    from lorapro_jax import export

    return export


def _mesh_step(fn):
    def run(tmp):
        from lorapro_jax import parallel, sharding

        mesh = sharding.make_mesh(1, 1)
        model = adapted()
        if fn == "shard_for_training":
            return parallel.shard_for_training(model, optax.adam, mesh)
        graphdef, state, specs = parallel.shard_for_training(model, optax.sgd(0.1), mesh)
        return parallel.make_train_step(graphdef, lambda m, b: m(b).mean(), {"lr": 0.1}, mesh, specs)

    return run


ARGUMENT_CASES = [
    Case("arguments", "save_adapters(model, path) (swapped)",
         lambda t: _ckpt().save_adapters(adapted(), t / "ad"),
         TypeError, r"save_adapters: `path` must be a path .*got a .*Tiny \(are the arguments swapped\?\)"),
    Case("arguments", "restore_adapters(model, path) (swapped)",
         lambda t: _ckpt().restore_adapters(adapted(), t / "ad"),
         TypeError, r"restore_adapters: `path` must be a path .*\(are the arguments swapped\?\)"),
    Case("arguments", "read_adapter_metadata(model)",
         lambda t: _ckpt().read_adapter_metadata(adapted()),
         TypeError, r"read_adapter_metadata: `path` must be a path"),
    Case("arguments", "save_adapters(path, model, config={...}) (a dict, not a LoraConfig)",
         lambda t: _ckpt().save_adapters(t / "ad", adapted(), config={"rank": 2}),
         TypeError, r"save_adapters: `config` must be a lorapro_jax.LoraConfig, got a builtins.dict"),
    Case("arguments", "TrainCheckpointer(model)",
         lambda t: _ckpt().TrainCheckpointer(adapted()),
         TypeError, r"TrainCheckpointer: `directory` must be a path"),
    Case("arguments", "TrainCheckpointer.save(step, optimizer, model) (swapped)",
         lambda t: (lambda m: _ckpt().TrainCheckpointer(t / "c").save(1, lp.LoraOptimizer(m, optax.sgd(0.1), wrt=lp.LoRAParam), m))(adapted()),
         TypeError, r"TrainCheckpointer.save: `model` must be an nnx.Module|`optimizer` must be an nnx.Optimizer"),
    Case("arguments", "TrainCheckpointer.restore(path)",
         lambda t: _ckpt().TrainCheckpointer(t / "c").restore(str(t / "c")),
         TypeError, r"TrainCheckpointer.restore: `model` must be an nnx.Module, got the path .*\(are the arguments swapped\?\)"),
    Case("arguments", "save_peft_adapter(path, model) (swapped)",
         lambda t: _export().save_peft_adapter(str(t / "peft"), adapted(), base_model_name_or_path=None),
         TypeError, r"save_peft_adapter: `model` must be an nnx.Module, got the path .*\(are the arguments swapped\?\)"),
    Case("arguments", "load_peft_adapter(path, model) (swapped)",
         lambda t: _export().load_peft_adapter(str(t / "peft"), adapted()),
         TypeError, r"load_peft_adapter: `model` must be an nnx.Module, got the path .*\(are the arguments swapped\?\)"),
    Case("arguments", "export_merged(path)",
         lambda t: _export().export_merged(str(t)),
         TypeError, r"export_merged: `model` must be an nnx.Module, got the path"),
    Case("arguments", "export_merged_hf(path, model) (swapped)",
         lambda t: _export().export_merged_hf(str(t / "m.safetensors"), adapted()),
         TypeError, r"export_merged_hf: `model` must be an nnx.Module, got the path"),
    Case("arguments", "peft_state_dict(path)",
         lambda t: _export().peft_state_dict(str(t)),
         TypeError, r"peft_state_dict: `model` must be an nnx.Module"),
    Case("arguments", "apply_lora(model, {...}) (a dict, not a LoraConfig)",
         lambda t: lp.apply_lora(Tiny(nnx.Rngs(0)), {"rank": 2}, rngs=nnx.Rngs(0)),
         TypeError, r"apply_lora: `config` must be a lorapro_jax.LoraConfig, got a builtins.dict. Build one with lp.LoraConfig\(\*\*d\)"),
    Case("arguments", "apply_lora(config, model) (swapped)",
         lambda t: lp.apply_lora(CFG, Tiny(nnx.Rngs(0)), rngs=nnx.Rngs(0)),
         TypeError, r"apply_lora: `model` must be an nnx.Module, got a lorapro_jax.lora.config.LoraConfig"),
    Case("arguments", "apply_lora on an adapted layer (targets ['query'] twice)",
         lambda t: lp.apply_lora(adapted(), lp.LoraConfig(rank=2, targets=["query"]), rngs=nnx.Rngs(0)),
         ValueError, r"LoRA target 'query' is already adapted"),
    Case("arguments", "apply_lora on an adapted layer (regex '.*' twice)",
         lambda t: lp.apply_lora(adapted(), lp.LoraConfig(rank=2), rngs=nnx.Rngs(0)),
         ValueError, r"LoRA target 'query' is already adapted"),
    Case("arguments", "apply_alora(model, {...})",
         lambda t: lp.apply_alora(Tiny(nnx.Rngs(0)), {"rank": 2}, max_rank=4, rngs=nnx.Rngs(0)),
         TypeError, r"apply_alora: `config` must be a lorapro_jax.LoraConfig"),
    Case("arguments", "apply_prilora(model, 'rank=4')",
         lambda t: lp.apply_prilora(Tiny(nnx.Rngs(0)), "rank=4", rngs=nnx.Rngs(0)),
         TypeError, r"prilora_config: `config` must be a lorapro_jax.LoraConfig, got the path 'rank=4'"),
    Case("arguments", "apply_lora_ga(model, None, ...)",
         lambda t: lp.apply_lora_ga(Tiny(nnx.Rngs(0)), None, lambda m, b: 0.0, [], rngs=nnx.Rngs(0)),
         TypeError, r"apply_lora_ga: `config` must be a lorapro_jax.LoraConfig, got None"),
    Case("arguments", "LoraOptimizer(model, optax.adam) (factory, not called)",
         lambda t: lp.LoraOptimizer(adapted(), optax.adam, wrt=lp.LoRAParam),
         TypeError, r"LoraOptimizer: `tx` must be an optax.GradientTransformation, got the function optax.*adam.* call it, e.g. adam\(1e-3\)"),
    Case("arguments", "LoraOptimizer(model, 'adam')",
         lambda t: lp.LoraOptimizer(adapted(), "adam", wrt=lp.LoRAParam),
         TypeError, r"LoraOptimizer: `tx` must be an optax.GradientTransformation, got the path 'adam'"),
    Case("arguments", "LoraOptimizer(tx, model) (swapped)",
         lambda t: lp.LoraOptimizer(optax.sgd(0.1), adapted(), wrt=lp.LoRAParam),
         TypeError, r"LoraOptimizer: `model` must be an nnx.Module, got a optax"),
    Case("arguments", "shard_optimizer(lora_pro_adamw, specs)",
         lambda t: lp.shard_optimizer(lp.lora_pro_adamw, {}),
         TypeError, r"shard_optimizer: `tx` must be an optax.GradientTransformation, got the function .*lora_pro_adamw.*call it"),
    Case("arguments", "shard_for_training(model, optax.adam, mesh)",
         _mesh_step("shard_for_training"),
         TypeError, r"shard_for_training: `tx` must be an optax.GradientTransformation"),
    Case("arguments", "make_train_step(graphdef, loss_fn, {'lr': 0.1}, ...)",
         _mesh_step("make_train_step"),
         TypeError, r"make_train_step: `tx` must be an optax.GradientTransformation, got a builtins.dict"),
]

ALL_CASES: list[Case] = [*ARGUMENT_CASES]


def message_of(case: Case, tmp: Path) -> tuple[type[BaseException] | None, str]:
    """Runs one case; returns (exception type or None, message)."""
    try:
        case.run(tmp)
    except Exception as e:  # noqa: BLE001 - we report whatever is raised
        return type(e), str(e)
    return None, "(no error raised)"


def markdown_table(cases: list[Case], root: Path) -> str:
    def cell(s: str) -> str:
        s = s.replace(str(root), "<tmp>").replace("|", "\\|").replace("\n", "<br>")
        return f"`{s}`" if "`" not in s else s

    rows = ["| bad input | error | message |", "|---|---|---|"]
    for i, c in enumerate(cases):
        tmp = root / f"case{i}"
        tmp.mkdir(parents=True, exist_ok=True)
        etype, msg = message_of(c, tmp)
        name = etype.__name__ if etype else "none"
        ok = etype is not None and issubclass(etype, c.error) and re.search(c.match, msg)
        rows.append(f"| {c.name} | {name}{'' if ok else ' (UNEXPECTED)'} | {cell(msg)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    groups = sys.argv[1:] or sorted({c.group for c in ALL_CASES})
    with tempfile.TemporaryDirectory() as d:
        for g in groups:
            print(f"\n### {g}\n")
            print(markdown_table([c for c in ALL_CASES if c.group == g], Path(d)))
