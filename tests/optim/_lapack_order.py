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
import math
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


_SHAPE = re.compile(r"operand_layout_constraints=\{\w+\[([\d,]*)\]")


def parse(hlo: str) -> dict[str, dict[str, tuple[str, list[str], str]]]:
    """``{computation: {name: (opcode, operands, line)}}``; the entry computation is ``"ENTRY"``."""
    comps, current = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and "{" in line and ("%" in line or line.startswith("ENTRY")):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            comps[current] = {}
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            comps[current][m.group(1)] = (m.group(2), _operands(line, m.end()), line)
    return comps


def lapack_calls(hlo: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{instruction name: (custom_call_target, operand shape)}`` of every LAPACK call, in any computation."""
    out = {}
    for instrs in parse(hlo).values():
        for name, (op, _, line) in instrs.items():
            m = _TARGET.search(line)
            if op == "custom-call" and m:
                dims = _SHAPE.search(line).group(1)
                out[name] = (m.group(1), tuple(int(d) for d in dims.split(",") if d))
    return out


def splittable_lapack_calls(hlo: str, flops: int = 200_000) -> list[str]:
    """LAPACK calls that jaxlib 0.10 may split over the pool: batch >= 2 and batch * 10 n m min(n, m) >= flops."""
    bad = []
    for name, (target, shape) in lapack_calls(hlo).items():
        *batch, n, m = shape
        b = math.prod(batch)
        if b >= 2 and b * 10 * n * m * min(n, m) >= flops:
            bad.append(f"{name} {target} {shape}")
    return bad


def _called(comps, line: str) -> list[str]:
    """Computations an instruction calls (loop bodies, fusions, branches): ``%names`` after its operands."""
    return [c for c in re.findall(r"%([\w.\-]+)", line[line.index(")") :]) if c in comps]


def _runs_lapack(comps, comp: str, seen: set) -> bool:
    if comp in seen:
        return False
    seen.add(comp)
    return any(
        (op == "custom-call" and _TARGET.search(line)) or any(_runs_lapack(comps, c, seen) for c in _called(comps, line))
        for op, _, line in comps[comp].values()
    )


def concurrent_lapack_pairs(hlo: str) -> list[tuple[str, str]]:
    """Pairs of ENTRY instructions that run LAPACK (a call, or a loop whose body has one) that no dataflow path
    orders."""
    comps = parse(hlo)
    instrs = comps["ENTRY"]
    calls = {
        name
        for name, (op, _, line) in instrs.items()
        if (op == "custom-call" and _TARGET.search(line)) or any(_runs_lapack(comps, c, set()) for c in _called(comps, line))
    }

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

