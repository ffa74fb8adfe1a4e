"""Write the Debian ``fortunes`` classification benchmark as train / validation / test files.

    apt-get download fortunes fortunes-min
    for f in fortunes*.deb; do dpkg-deb -x "$f" /tmp/fortunes-x; done      # no install needed
    python -m experiments.prepare_fortunes data/fortunes --source /tmp/fortunes-x

then train on it with ``python -m experiments.finetune --task local --data-files
train=data/fortunes/train.csv,validation=data/fortunes/validation.csv,test=data/fortunes/test.csv``.
See :mod:`lorapro_jax.data.fortunes` for the filters and the split, and ``docs/results.md`` for the
source, the package versions and the licence.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from lorapro_jax.data.fortunes import prepare_fortunes


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.prepare_fortunes", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="output folder for train/validation/test files and meta.json")
    p.add_argument("--source", default=None,
                   help="extracted package root (dpkg-deb -x) or the category folder itself; "
                        "default: /usr/share/games/fortunes")
    p.add_argument("--format", dest="fmt", choices=("csv", "jsonl"), default="csv", help="output format")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class subsample and of the split")
    p.add_argument("--fractions", default="0.6,0.2,0.2", help="train,validation,test fractions")
    p.add_argument("--min-chars", type=int, default=20, help="drop shorter texts (characters)")
    p.add_argument("--max-chars", type=int, default=300, help="drop longer texts (characters)")
    p.add_argument("--min-per-class", type=int, default=100, help="drop categories with fewer texts")
    p.add_argument("--max-per-class", type=int, default=None, help="keep at most this many texts per category")
    p.add_argument("--categories", default=None, help="comma-separated category names to keep (default: all)")
    a = p.parse_args(argv)
    fractions = tuple(float(x) for x in a.fractions.split(","))
    if len(fractions) != 3:
        p.error(f"--fractions: expected 3 comma-separated numbers, got {a.fractions!r}")
    cats = [c.strip() for c in a.categories.split(",") if c.strip()] if a.categories else None
    try:
        meta = prepare_fortunes(a.out_dir, a.source, fmt=a.fmt, fractions=fractions, seed=a.seed,
                                min_chars=a.min_chars, max_chars=a.max_chars, min_per_class=a.min_per_class,
                                max_per_class=a.max_per_class, categories=cats)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"prepare_fortunes: {e}") from None
    print(json.dumps({k: meta[k] for k in ("source", "debian_packages", "num_classes", "sizes", "files")}, indent=1))
    return meta


if __name__ == "__main__":
    main()
