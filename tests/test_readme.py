"""The README's example runs as written."""

import pathlib
import re


def test_readme_example_runs(capsys):
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- example:e2e -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its e2e example"
    ns: dict = {"__name__": "readme_example"}
    exec(compile(block.group(1), "README.md", "exec"), ns)
    out = capsys.readouterr().out
    loss = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    assert loss < 0.2, out
