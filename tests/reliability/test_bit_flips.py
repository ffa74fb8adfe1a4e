"""Single-bit flips anywhere in an adapter checkpoint's array folder never load silently.

Each flip either makes ``restore_adapters`` raise ``CorruptFileError`` (the target untouched) or lands in
bytes the reader does not use (the restored arrays are then bitwise the saved ones); a restore that
returns other values is a failure.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
from reliability_cases import leaves, trained, untouched

import lorapro_jax as lp
from lorapro_jax.checkpoint import restore_adapters, save_adapters


def test_bit_flips_are_detected_or_harmless(tmp_path):
    model = trained(1)[0]
    save_adapters(tmp_path / "ref", model)
    saved = {k: v for k, v in leaves(model).items() if "lora" in k or "gate" in k}
    files = sorted(p for p in (tmp_path / "ref" / "adapters").rglob("*") if p.is_file())
    outcomes = {"detected": 0, "harmless": 0}
    for f in files:
        size = f.stat().st_size
        for pos in range(0, size, max(1, size // 5)):
            d = tmp_path / "flip"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(tmp_path / "ref", d)
            g = d / f.relative_to(tmp_path / "ref")
            b = bytearray(g.read_bytes())
            b[pos] ^= 0x04
            g.write_bytes(bytes(b))
            target = trained(2)[0]
            try:
                untouched([target], lambda: restore_adapters(d, target))
            except lp.CorruptFileError:
                outcomes["detected"] += 1
                continue
            got = {k: v for k, v in leaves(target).items() if k in saved}
            bad = [k for k in saved if not np.array_equal(got[k], saved[k])]
            assert not bad, f"flip at byte {pos} of {g.relative_to(d)} restored other values silently: {bad}"
            outcomes["harmless"] += 1
    print(outcomes)
    assert outcomes["detected"] > 0 and jax.tree.reduce(lambda a, b: a + b, outcomes) >= len(files) * 5
