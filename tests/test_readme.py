"""The README's examples run as written."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(name: str) -> str:
    m = re.search(rf"<!-- example:{name} -->\s*```python\n(.*?)```", README, re.S)
    assert m, f"README lost its {name} example"
    return m.group(1)


def test_readme_e2e_example_runs(capsys):
    ns: dict = {"__name__": "readme_example"}
    exec(compile(_block("e2e"), "README.md", "exec"), ns)
    out = capsys.readouterr().out
    loss = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    assert loss < 0.2, out


@pytest.mark.parametrize("name", ["lora-ga", "rank", "scan"])
def test_readme_feature_examples_run(name):
    exec(compile(_block(name), "README.md", "exec"), {"__name__": f"readme_{name}"})


def test_readme_qwix_example_runs(capsys):
    pytest.importorskip("qwix")  # the .[interop] extra (installed by .ci/run)
    exec(compile(_block("qwix"), "README.md", "exec"), {"__name__": "readme_qwix"})
    out = capsys.readouterr().out
    assert "qwix QLoRA + LoRA-Pro: loss" in out, out


@pytest.mark.slow  # loads the real SmolLM2 GGUF file and its tokenizer (~40 s on 2 CPU cores)
@pytest.mark.timeout(300)
def test_readme_generate_example_runs(capsys):
    pytest.importorskip("gguf")
    from lorapro_jax.models import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    exec(compile(_block("generate"), "README.md", "exec"), {"__name__": "readme_generate"})
    out = capsys.readouterr().out
    assert "17 + 25 = 32." in out and "<|im_end|>" in out, out
