"""Bad inputs and the errors they must raise: one table shared by the tests and by docs/reliability.md.

Each :class:`Case` is a function ``run(tmp: Path)`` that makes one bad call, the exception type it must
raise and a regular expression its message must match (``re.search``). ``python
tests/reliability/reliability_cases.py`` runs every case and prints the markdown table of
docs/reliability.md with the messages actually raised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: this checkout's lorapro_jax, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
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


# -- item 2: files --------------------------------------------------------------------------------------
def leaves(*objs) -> dict[str, np.ndarray]:
    """Every array leaf of every object (typed PRNG keys as key data), keyed by object index and path."""
    out = {}
    for i, obj in enumerate(objs):
        for path, var in nnx.to_flat_state(nnx.state(obj)):
            for kp, leaf in jax.tree_util.tree_flatten_with_path(var.get_value())[0]:
                if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
                    leaf = jax.random.key_data(leaf)
                out[f"{i}:{'/'.join(map(str, path))}{jax.tree_util.keystr(kp)}"] = np.array(leaf)
    return out


def untouched(objs, fn):
    """Runs ``fn()``; if it raises, checks that every leaf of ``objs`` is bitwise what it was, then re-raises."""
    before = leaves(*objs)
    try:
        return fn()
    except Exception:
        after = leaves(*objs)
        changed = [k for k in before if k not in after or not np.array_equal(before[k], after[k], equal_nan=True)]
        if changed or after.keys() != before.keys():
            raise AssertionError(f"a failed restore modified the target: {changed[:5]}")
        raise


def trained(seed: int):
    """An adapted model with non-zero B and a LoraOptimizer after one step (non-trivial moments)."""
    model = adapted(seed)
    opt = lp.LoraOptimizer(model, TX, wrt=lp.LoRAParam)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(4, 6)), jnp.float32)
    grads = nnx.grad(lambda m: (m(x) ** 2).mean(), argnums=nnx.DiffState(0, lp.LoRAParam))(model)
    opt.update(model, grads)
    return model, opt


TX = optax.adam(0.1)


def _adapters(tmp: Path, corrupt, target=None):
    ck = _ckpt()
    ck.save_adapters(tmp / "ad", trained(1)[0])
    ck.save_adapters(tmp / "other", trained(3)[0])
    corrupt(tmp / "ad", tmp / "other")
    model = target() if target else trained(2)[0]
    return untouched([model], lambda: ck.restore_adapters(tmp / "ad", model))


def _train(tmp: Path, corrupt):
    ck = _ckpt()
    for name, seed in (("c", 1), ("o", 3)):
        with ck.TrainCheckpointer(tmp / name, async_save=False) as c:
            c.save(1, *trained(seed))
    corrupt(tmp / "c" / "1", tmp / "o" / "1")
    model, opt = trained(2)
    with ck.TrainCheckpointer(tmp / "c", async_save=False) as c:
        return untouched([model, opt], lambda: c.restore(model, opt))


def _write(text: str | bytes, *parts):
    def corrupt(d: Path, _other):
        f = d.joinpath(*parts)
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    return corrupt


def _truncate(folder: str):
    def corrupt(d: Path, _other):
        for f in sorted((d / folder).rglob("*")):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return corrupt


def _swap(folder: str):
    def corrupt(d: Path, other: Path):
        import shutil

        shutil.rmtree(d / folder)
        shutil.copytree(other / folder, d / folder)
    return corrupt


def _edit_meta(fn):
    def corrupt(d: Path, _other):
        f = d / "meta" / "metadata"
        meta = json.loads(f.read_text())
        fn(meta)
        f.write_text(json.dumps(meta))
    return corrupt


def _rm(*parts):
    def corrupt(d: Path, _other):
        import shutil

        p = d.joinpath(*parts)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return corrupt


def _rank3():
    model = Tiny(nnx.Rngs(0))
    lp.apply_lora(model, lp.LoraConfig(rank=3, alpha=6.0, targets=["query", "value"]), rngs=nnx.Rngs(2))
    return model


CE = lp.CorruptFileError
AD = r"/ad/"
CHECKPOINT_CASES = [
    Case("adapter checkpoints", "meta/metadata overwritten with garbage",
         lambda t: _adapters(t, _write("garbage", "meta", "metadata")),
         CE, r"/ad/meta/metadata: corrupt.*expected a lorapro_jax adapter checkpoint written by save_adapters \(JSONDecodeError"),
    Case("adapter checkpoints", "meta/metadata empty (truncated to 0 bytes)",
         lambda t: _adapters(t, _write("", "meta", "metadata")),
         CE, r"/ad/meta/metadata: corrupt"),
    Case("adapter checkpoints", "meta/metadata deleted",
         lambda t: _adapters(t, _rm("meta", "metadata")),
         CE, r"/ad: corrupt.*its meta/metadata file is missing"),
    Case("adapter checkpoints", "metadata of a future format version",
         lambda t: _adapters(t, _edit_meta(lambda m: m.update(version=99))),
         CE, r"/ad/meta/metadata: .*version 99 is not one this lorapro_jax reads"),
    Case("adapter checkpoints", "metadata without 'leaves' (bad metadata)",
         lambda t: _adapters(t, _edit_meta(lambda m: m.pop("leaves"))),
         CE, r"/ad/meta/metadata: .*'leaves' is not a mapping"),
    Case("adapter checkpoints", "array files truncated to half",
         lambda t: _adapters(t, _truncate("adapters")),
         CE, r"/ad/adapters: corrupt.*orbax could not read it"),
    Case("adapter checkpoints", "array folder deleted",
         lambda t: _adapters(t, _rm("adapters")),
         CE, r"/ad: corrupt.*its array folder 'adapters' is missing"),
    Case("adapter checkpoints", "array folder replaced by another checkpoint's (same shapes, other values)",
         lambda t: _adapters(t, _swap("adapters")),
         CE, r"/ad/adapters: corrupt.*does not match the fingerprints recorded at save time"),
    Case("adapter checkpoints", "a recorded fingerprint altered",
         lambda t: _adapters(t, _edit_meta(lambda m: m["fingerprints"].update({"query/lora/a": 1}))),
         CE, r"/ad/adapters: .*\['query/lora/a'\] does not match the fingerprints"),
    Case("adapter checkpoints", "a leaf missing from the metadata (missing key)",
         lambda t: _adapters(t, _edit_meta(lambda m: (m["leaves"].pop("query/gate"), m["fingerprints"].pop("query/gate")))),
         ValueError, r"checkpoint group 'adapters' does not fit the restore target; missing from the checkpoint: \['query/gate'\]"),
    Case("adapter checkpoints", "target of another rank (wrong shape)",
         lambda t: _adapters(t, lambda d, o: None, target=_rank3),
         ValueError, r"query: rank is 2 in the checkpoint but 3 in the target"),
    Case("adapter checkpoints", "not a checkpoint (empty folder)",
         lambda t: _adapters(t, lambda d, o: [_rm(p.name)(d, o) for p in list(d.iterdir())]),
         CE, r"/ad: corrupt.*its meta/metadata file is missing"),
    Case("training checkpoints", "optimizer array files truncated (model group intact)",
         lambda t: _train(t, lambda d, o: _truncate("optimizer")(d, o)),
         CE, r"/c/1/optimizer: corrupt.*expected a lorapro_jax training checkpoint written by TrainCheckpointer.save"),
    Case("training checkpoints", "optimizer group replaced by another run's (same shapes)",
         lambda t: _train(t, _swap("optimizer")),
         CE, r"/c/1/optimizer: .*does not match the fingerprints recorded at save time"),
    Case("training checkpoints", "meta/metadata garbage",
         lambda t: _train(t, _write(b"\x00\xff", "meta", "metadata")),
         CE, r"/c/1/meta/metadata: corrupt"),
    Case("training checkpoints", "metadata without 'groups'",
         lambda t: _train(t, _edit_meta(lambda m: m.pop("groups"))),
         CE, r"/c/1/meta/metadata: .*'groups' is not a mapping"),
    Case("training checkpoints", "model array folder deleted",
         lambda t: _train(t, _rm("model")),
         CE, r"/c/1: corrupt.*its array folder 'model' is missing"),
]


def _peft(tmp: Path, corrupt):
    ex = _export()
    ex.save_peft_adapter(trained(1)[0], tmp / "peft", base_model_name_or_path=None)
    corrupt(tmp / "peft")
    model = trained(2)[0]
    return untouched([model], lambda: ex.load_peft_adapter(model, tmp / "peft"))


def _peft_cfg(fn):
    def corrupt(d: Path):
        f = d / "adapter_config.json"
        cfg = json.loads(f.read_text())
        fn(cfg)
        f.write_text(json.dumps(cfg))
    return corrupt


def _st_bytes(fn, name="adapter_model.safetensors"):
    def corrupt(d: Path):
        f = d / name
        f.write_bytes(fn(f.read_bytes()))
    return corrupt


def _nan_in_a(d: Path):
    from safetensors.numpy import load_file, save_file

    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    k = sorted(t)[0]
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan
    save_file(t, str(f))


PEFT_CASES = [
    Case("PEFT adapters", "adapter_config.json is not JSON",
         lambda t: _peft(t, lambda d: (d / "adapter_config.json").write_text("{r: 8")),
         CE, r"/peft/adapter_config.json: corrupt.*expected a PEFT adapter_config.json.*not valid JSON"),
    Case("PEFT adapters", "adapter_config.json with r = \"eight\"",
         lambda t: _peft(t, _peft_cfg(lambda c: c.update(r="eight"))),
         CE, r"/peft/adapter_config.json: .*\(r is 'eight'\)"),
    Case("PEFT adapters", "adapter_config.json missing",
         lambda t: _peft(t, lambda d: (d / "adapter_config.json").unlink()),
         FileNotFoundError, r"/peft/adapter_config.json: no such file; expected a PEFT adapter_config.json"),
    Case("PEFT adapters", "adapter_model.safetensors truncated by 10 bytes",
         lambda t: _peft(t, _st_bytes(lambda b: b[:-10])),
         CE, r"/peft/adapter_model.safetensors: .*lies at bytes \[\d+, \d+\) but the file holds \d+ data bytes \(truncated\?\)"),
    Case("PEFT adapters", "adapter_model.safetensors with a huge header length",
         lambda t: _peft(t, _st_bytes(lambda b: (10**9).to_bytes(8, "little") + b[8:])),
         CE, r"/peft/adapter_model.safetensors: .*the header length 1000000000 exceeds the file size"),
    Case("PEFT adapters", "adapter_model.safetensors is a text file",
         lambda t: _peft(t, _st_bytes(lambda b: b"hello")),
         CE, r"/peft/adapter_model.safetensors: .*fewer than the 8-byte header length"),
    Case("PEFT adapters", "NaN in lora_A",
         lambda t: _peft(t, _nan_in_a),
         CE, r"/peft/adapter_model.safetensors: .*expected finite LoRA weights \(NaN or inf in"),
]


def _hf(tmp: Path, corrupt, load="read"):
    from transformers import BertConfig

    from lorapro_jax import models

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    d = models.save_hf_checkpoint(models.BertModel(cfg, rngs=nnx.Rngs(0)), tmp / "hf", config=cfg)
    corrupt(d)
    if load == "read":
        return models.read_safetensors(d)
    return models.load_pretrained("bert", d)


def _shard(d: Path, index: dict | str):
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


HF_CASES = [
    Case("Hugging Face checkpoints", "model.safetensors truncated by 100 bytes",
         lambda t: _hf(t, _st_bytes(lambda b: b[:-100], "model.safetensors")),
         CE, r"/hf/model.safetensors: .*\(truncated\?\)"),
    Case("Hugging Face checkpoints", "model.safetensors with a corrupt header",
         lambda t: _hf(t, _st_bytes(lambda b: b[:8] + b"#" + b[9:], "model.safetensors")),
         CE, r"/hf/model.safetensors: .*the header is not valid JSON"),
    Case("Hugging Face checkpoints", "config.json is not JSON (load_pretrained)",
         lambda t: _hf(t, lambda d: (d / "config.json").write_text("{"), load="pretrained"),
         CE, r"/hf/config.json: corrupt.*expected a Hugging Face config.json"),
    Case("Hugging Face checkpoints", "config.json without model_type (load_pretrained)",
         lambda t: _hf(t, lambda d: (d / "config.json").write_text("{}"), load="pretrained"),
         CE, r"/hf/config.json: .*\(no model_type\)"),
    Case("Hugging Face checkpoints", "model.safetensors.index.json without weight_map",
         lambda t: _hf(t, lambda d: _shard(d, {"metadata": {}})),
         CE, r"/hf/model.safetensors.index.json: .*no weight_map"),
    Case("Hugging Face checkpoints", "model.safetensors.index.json naming a missing shard",
         lambda t: _hf(t, lambda d: _shard(d, {"weight_map": {"x": "model-00002-of-00002.safetensors"}})),
         FileNotFoundError, r"/hf/model-00002-of-00002.safetensors: shard listed in .*index.json does not exist"),
    Case("Hugging Face checkpoints", "model.safetensors.index.json truncated",
         lambda t: _hf(t, lambda d: _shard(d, '{"weight_map": {"x": "mod')),
         CE, r"/hf/model.safetensors.index.json: corrupt.*not valid JSON"),
]


def _data(tmp: Path, name: str, content: str | bytes):
    from lorapro_jax.data import load_text_dataset

    f = tmp / name
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return load_text_dataset(str(f), cache_dir=tmp / "cache")


DATA_CASES = [
    Case("data files", "empty csv", lambda t: _data(t, "e.csv", ""),
         CE, r"/e.csv: corrupt.*expected a readable csv file of labelled examples \(EmptyDataError"),
    Case("data files", "csv row with more fields than the header",
         lambda t: _data(t, "r.csv", "text,label\nhello,pos,extra,more\nbye,neg\n"),
         CE, r"/r.csv: .*some rows have more fields than the header"),
    Case("data files", "csv row without a label",
         lambda t: _data(t, "n.csv", "text,label\nhello,pos\nbye,\n"),
         CE, r"/n.csv: .*rows \[1\] .* have no 'label' value"),
    Case("data files", "jsonl truncated mid-record",
         lambda t: _data(t, "t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "lab'),
         CE, r"/t.jsonl: corrupt.*expected a readable json file"),
    Case("data files", "parquet that is not parquet",
         lambda t: _data(t, "p.parquet", b"PAR1 not really"),
         CE, r"/p.parquet: corrupt.*Parquet magic bytes not found"),
    Case("data files", "tsv that is binary",
         lambda t: _data(t, "b.tsv", bytes(range(256)) * 4),
         CE, r"/b.tsv: corrupt.*expected a readable tsv file"),
]

ALL_CASES: list[Case] = [*ARGUMENT_CASES, *CHECKPOINT_CASES, *PEFT_CASES, *HF_CASES, *DATA_CASES]


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
    groups = sys.argv[1:] or list(dict.fromkeys(c.group for c in ALL_CASES))
    with tempfile.TemporaryDirectory() as d:
        for g in groups:
            print(f"\n### {g}\n")
            print(markdown_table([c for c in ALL_CASES if c.group == g], Path(d)))
