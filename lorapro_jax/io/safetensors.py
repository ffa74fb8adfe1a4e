"""The safetensors file format: one dtype table, a checked header reader, and a reader and writer for any dtype.

A safetensors file is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(``{name: {"dtype", "shape", "data_offsets"}}`` plus an optional ``"__metadata__"`` of strings), then the
raw little-endian tensor bytes. ``safetensors.numpy`` cannot represent bfloat16 or float8; these
functions read and write every dtype of :data:`DTYPES` by hand (bfloat16 and float8 through
``ml_dtypes``, shipped with jax), so Hugging Face checkpoints, PEFT adapters and merged exports all go
through one implementation.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError

__all__ = ["DTYPES", "SAFETENSORS_EXPECTED", "numpy_dtype", "read_file", "read_header", "save_file"]

SAFETENSORS_EXPECTED = "a safetensors file (8-byte little-endian header length, JSON header, tensor bytes)"

#: safetensors dtype code -> numpy dtype name (``bfloat16`` / ``float8_*`` are ``ml_dtypes`` types).
DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_CODES = {name: code for code, name in DTYPES.items()}


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code (``"BF16"`` -> ``ml_dtypes.bfloat16``)."""
    if code not in DTYPES:
        raise TypeError(f"unsupported safetensors dtype {code!r}")
    name = DTYPES[code]
    if name.startswith(("bfloat", "float8")):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _require(cond: bool, path: str, detail: str) -> None:
    if not cond:
        raise CorruptFileError(path, SAFETENSORS_EXPECTED, detail)


def _entry_ok(info: Any) -> bool:
    return (
        isinstance(info, dict) and info.get("dtype") in DTYPES and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) for o in info["data_offsets"])
    )  # fmt: skip


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file, checked against the file's size.

    Every tensor entry must have a known dtype, a shape of non-negative ints and ``data_offsets`` that
    lie inside the file and hold exactly ``prod(shape) * itemsize`` bytes.

    Raises:
      FileNotFoundError: no such file.
      CorruptFileError: anything else is wrong (the message names the file and the problem).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {SAFETENSORS_EXPECTED}")
    size = os.path.getsize(path)
    _require(size >= 8, path, f"the file has {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        _require(8 + n <= size, path, f"the header length {n} exceeds the file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, SAFETENSORS_EXPECTED, f"the header is not valid JSON: {e}") from e
    _require(isinstance(header, dict), path, "the header is not a JSON object")
    data_len = size - 8 - n
    for k, info in header.items():
        if k == "__metadata__":
            continue
        _require(_entry_ok(info), path, f"tensor {k!r} has a malformed header entry {info!r}")
        start, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * numpy_dtype(info["dtype"]).itemsize
        _require(0 <= start <= end <= data_len, path,
                 f"tensor {k!r} lies at bytes [{start}, {end}) but the file holds {data_len} data bytes (truncated?)")
        _require(end - start == want, path,
                 f"tensor {k!r} has {end - start} bytes, its shape {info['shape']} and dtype {info['dtype']} need {want}")
    return header, 8 + n


def read_file(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (all, or ``keys``) as numpy arrays, header checked first.

    Raises:
      FileNotFoundError, CorruptFileError: as :func:`read_header`; ``KeyError`` for a key not in the file.
    """
    header, start_of_data = read_header(path)
    names = [k for k in header if k != "__metadata__"] if keys is None else list(keys)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for k in names:
            info = header[k]
            start, end = info["data_offsets"]
            f.seek(start_of_data + start)
            buf = f.read(end - start)
            out[k] = np.frombuffer(buf, dtype=numpy_dtype(info["dtype"])).reshape(info["shape"]).copy()
    return out


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` as a safetensors file (keys sorted, header padded to 8 bytes); parent folders are created.

    Raises:
      TypeError: a tensor's dtype has no safetensors code (see :data:`DTYPES`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for k in sorted(tensors):
        v = np.asarray(tensors[k])  # not ascontiguousarray: it turns a 0-d tensor into shape (1,)
        if v.dtype.name not in _CODES:
            raise TypeError(f"cannot write tensor {k!r} of dtype {v.dtype} to safetensors")
        raw = v.tobytes(order="C")
        header[k] = {"dtype": _CODES[v.dtype.name], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
