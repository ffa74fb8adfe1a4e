"""lorapro_jax.io.safetensors against the reference implementation (the ``safetensors`` package).

The package's own writer and reader are the independent check: what ours writes, theirs reads back bit for
bit, and the reverse; bf16 / fp8 (which ``safetensors.numpy`` cannot hold as numpy) are checked through the
torch-free byte layout: the file written by ``safetensors.numpy`` from the raw integer bits.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from lorapro_jax.errors import CorruptFileError
from lorapro_jax.io import safetensors as st

safetensors_numpy = pytest.importorskip("safetensors.numpy")

NUMPY_NATIVE = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
                "uint8", "bool"]


def _tensors(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(dtypes):
        shape = [(3, 4), (5,), (2, 1, 3), ()][i % 4]
        x = np.asarray(rng.normal(size=shape) * 50)  # a 0-d array, not a numpy scalar, for shape ()
        out[f"t{i}.{name}"] = np.asarray((x > 0) if name == "bool" else x.astype(np.dtype(getattr(ml_dtypes, name, name))))
    return out


def test_ours_written_reference_read(tmp_path):
    tensors = _tensors(NUMPY_NATIVE)
    st.save_file(tensors, tmp_path / "a.safetensors", {"format": "pt"})
    back = safetensors_numpy.load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_reference_written_ours_read(tmp_path):
    tensors = _tensors(NUMPY_NATIVE, seed=1)
    safetensors_numpy.save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    back = st.read_file(tmp_path / "b.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert set(st.read_file(tmp_path / "b.safetensors", keys=["t0.float64"])) == {"t0.float64"}


@pytest.mark.parametrize("name,code", [("bfloat16", "BF16"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")])
def test_ml_dtypes_bytes_match_the_format(tmp_path, name, code):
    """A bf16 / fp8 tensor is written as its raw little-endian bits under the format's dtype code."""
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.5).astype(getattr(ml_dtypes, name))
    st.save_file({"x": x}, tmp_path / "c.safetensors")
    raw = (tmp_path / "c.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["x"]["dtype"] == code and header["x"]["shape"] == [3, 4]
    a, b = header["x"]["data_offsets"]
    assert raw[8 + n + a : 8 + n + b] == x.tobytes()
    back = st.read_file(tmp_path / "c.safetensors")["x"]
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))


def test_truncated_file_names_the_file(tmp_path):
    f = tmp_path / "d.safetensors"
    st.save_file({"x": np.ones((4, 4), np.float32)}, f)
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match=r"d\.safetensors.*truncated"):
        st.read_file(f)


def test_unwritable_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        st.save_file({"z": np.ones(2, np.complex64)}, tmp_path / "e.safetensors")
