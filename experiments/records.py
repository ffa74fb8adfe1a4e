"""The JSON-lines records a run writes (``metrics.jsonl``), read back by the runner's resume and the sweep."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_jsonl"]


def read_jsonl(path: Path, *, missing_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file, one dict per non-blank line.

    Args:
      path: the file.
      missing_ok: return ``[]`` for a file that does not exist (a run that has not logged yet) instead of
        raising ``FileNotFoundError``.
    """
    if missing_ok and not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
