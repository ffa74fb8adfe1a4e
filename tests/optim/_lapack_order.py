"""Which LAPACK custom calls of a compiled XLA:CPU program can run at the same time (read from its HLO).

XLA:CPU's thunk executor runs two thunks concurrently unless one reads a buffer the other writes, directly
or through other thunks. So two LAPACK calls are ordered iff one's output reaches the other's operands
along the dataflow of the optimized HLO. Instructions that emit no thunk and only alias their operands
(``tuple``, ``get-tuple-element``, ``opt-barrier``) carry each tuple element separately: an
``opt-barrier`` that merely bundles a call's output with another call's input orders nothing.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="(lapack_\w+)"')
_INDEX = re.compile(r"\bindex=(\d+)")


def _operands(line: str, start: int) -> list[str]:
    depth, i = 1, start
    while depth and i < len(line):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        i += 1
    return re.findall(r"%([\w.\-]+)", line[start : i - 1])


def parse_entry(hlo: str) -> dict[str, tuple[str, list[str], str]]:
    """``{name: (opcode, operands, line)}`` of the ENTRY computation; raises if LAPACK runs elsewhere."""
    comps, current = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and "{" in line and ("%" in line or line.startswith("ENTRY")):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
            comps[current] = {}
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            comps[current][m.group(1)] = (m.group(2), _operands(line, m.end()), line)
    for comp, instrs in comps.items():
        if comp != "ENTRY" and any(_TARGET.search(v[2]) for v in instrs.values()):
            raise AssertionError(f"a LAPACK custom call sits in computation {comp}, not in ENTRY: not analysed")
    return comps["ENTRY"]


def lapack_calls(hlo: str) -> dict[str, str]:
    """``{instruction name: custom_call_target}`` of the ENTRY computation's LAPACK calls."""
    out = {}
    for name, (op, _, line) in parse_entry(hlo).items():
        m = _TARGET.search(line)
        if op == "custom-call" and m:
            out[name] = m.group(1)
    return out


def concurrent_lapack_pairs(hlo: str) -> list[tuple[str, str]]:
    """Pairs of LAPACK calls of the ENTRY computation that no dataflow path orders."""
    instrs = parse_entry(hlo)
    calls = lapack_calls(hlo)

    def element(name: str, index: int) -> str | None:
        op, ops, line = instrs[name]
        if op == "tuple":
            return ops[index]
        if op == "opt-barrier":
            return element(ops[0], index) or ops[0]
        if op == "get-tuple-element":
            inner = element(ops[0], int(_INDEX.search(line).group(1)))
            return element(inner, index) if inner is not None else None
        return None

    @functools.lru_cache(maxsize=None)
    def reach(name: str) -> frozenset:
        op, ops, line = instrs[name]
        if op == "get-tuple-element":
            src = element(ops[0], int(_INDEX.search(line).group(1)))
            deps = reach(src) if src is not None else reach(ops[0])
        else:
            deps = frozenset().union(*(reach(o) for o in ops if o in instrs))
        return deps | {name} if name in calls else deps

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    return [(a, b) for a, b in itertools.combinations(calls, 2) if a not in reach(b) and b not in reach(a)]
