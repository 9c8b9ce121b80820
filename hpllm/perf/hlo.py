"""Reading compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`): one parser for
the profiler's op costs (`hpllm.perf.profile`) and the sharding checks (which collectives a
strategy compiles to, whether a collective matmul interleaves its hops with its dots).

`parse_module` splits the text into computations, each a list of instructions in the order
printed, which for a compiled (scheduled) module is the order they run in. Standard library
only: the text is all it needs.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
# The kinds `collective_counts` reports, and every collective opcode (for categories).
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")
COLLECTIVES = {*COLLECTIVE_KINDS, "collective-broadcast", "ragged-all-to-all", "send", "recv",
               "send-done", "recv-done"}
MATMUL_TARGET = re.compile(r"gemm|matmul|cublas|cudnn|conv|onednn", re.I)  # custom calls


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of each array in an HLO type, e.g. '(f32[2,3]{1,0}, s32[])'."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE.findall(type_text) if dt in DTYPE_BYTES or dt.startswith("f8")]


def nbytes(type_text: str) -> float:
    return sum(DTYPE_BYTES.get(dt, 1) * math.prod(dims) for dt, dims in shapes(type_text))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclasses.dataclass
class Instr:
    """One HLO instruction: `%name = type_text opcode(%operands...), attrs`."""
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attrs: str

    def attr_ints(self, key: str) -> list[int]:
        m = re.search(rf"\b{key}={{([0-9,]*)}}", self.attrs)
        return [int(x) for x in m.group(1).split(",") if x] if m else []

    @property
    def called(self) -> list[str]:
        """The computations this instruction calls (fusion body, loop body and condition,
        branches, reducer)."""
        names = []
        for key in ("calls", "body", "condition", "branch_computations", "called_computations",
                    "to_apply"):
            m = re.search(rf"\b{key}=({{[^}}]*}}|%[\w.\-]+)", self.attrs)
            if m:
                names += re.findall(r"%([\w.\-]+)", m.group(1))
        return names

    @property
    def scope(self) -> str:
        """The JAX name stack of the op (op_name metadata)."""
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def custom_call_target(self) -> str:
        m = re.search(r'custom_call_target="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


def parse_module(text: str) -> tuple[dict[str, list[Instr]], dict[str, Instr]]:
    """Computations (name -> instructions, in printed order) and every instruction by its
    module-unique name."""
    text = re.sub(r"/\*.*?\*/", "", text)
    computations: dict[str, list[Instr]] = {}
    instrs: dict[str, Instr] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
            continue
        m = re.match(r"\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
        if not m or current is None:
            continue
        rest = line[m.end():]
        end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
        type_text, rest = rest[:end], rest[end:].lstrip()
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        close = _balanced(rest, op.end() - 1)
        operands = re.findall(r"%([\w.\-]+)", rest[op.end():close - 1])
        instr = Instr(m.group(1), type_text, op.group(1), operands, rest[close:])
        current.append(instr)
        instrs[instr.name] = instr
    return computations, instrs


def entry_name(text: str) -> str:
    m = re.search(r"^ENTRY\s+%([\w.\-]+)", text, re.M)
    if not m:
        raise ValueError("no ENTRY computation in this HLO text")
    return m.group(1)


def _calls_opcode(computations: dict[str, list[Instr]], instr: Instr, opcodes: set[str]) -> bool:
    """Whether `instr` is one of `opcodes` or is a fusion with one inside (at any depth)."""
    if instr.opcode in opcodes:
        return True
    return instr.opcode == "fusion" and any(
        _calls_opcode(computations, inner, opcodes)
        for name in instr.called for inner in computations.get(name, []))


def is_matmul(computations: dict[str, list[Instr]], instr: Instr) -> bool:
    """A dot or convolution, a fusion holding one, or a GEMM library call."""
    if instr.opcode == "custom-call":
        return bool(MATMUL_TARGET.search(instr.custom_call_target))
    return _calls_opcode(computations, instr, {"dot", "convolution"})


def collective_counts(text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text by kind (async -start halves counted once), plus
    "all-reduce+slice": all-reduces whose result each device then slices to its own part.
    That is how a reduce-scatter looks on XLA:CPU, whose pipeline lacks the pass that fuses
    the pair into one reduce-scatter op (ReduceScatterCreator runs for GPU and TPU)."""
    computations, instrs = parse_module(text)
    every = [i for body in computations.values() for i in body]
    counts = {kind: sum(i.opcode in (kind, kind + "-start") for i in every)
              for kind in COLLECTIVE_KINDS}
    reduced = {i.name for i in every if i.opcode.startswith("all-reduce")}
    reduced |= {i.name for i in every if i.opcode == "get-tuple-element"
                and i.operands and i.operands[0] in reduced}
    counts["all-reduce+slice"] = sum(
        1 for i in every
        if not i.opcode.startswith("all-reduce") and reduced.intersection(i.operands)
        and _calls_opcode(computations, i, {"dynamic-slice"}))
    return counts


def loop_bodies(text: str) -> list[str]:
    """Names of the `while` loops' body computations (a `lax.scan` over layers is one)."""
    computations, _ = parse_module(text)
    return [m.group(1) for body in computations.values() for i in body if i.opcode == "while"
            for m in [re.search(r"\bbody=%([\w.\-]+)", i.attrs)] if m]


def op_sequence(text: str, computation: str | None = None) -> list[str]:
    """The instructions of one computation (default: ENTRY) in the order they run, as
    opcodes with "dot" for every matmul (see `is_matmul`), each async collective once under
    its own name (the -start; the -done left out) and the free bookkeeping (parameters,
    tuples, bitcasts, constants) left out: what to read a schedule's interleaving from."""
    computations, _ = parse_module(text)
    name = computation or entry_name(text)
    if name not in computations:
        raise KeyError(f"no computation {name!r} in this HLO text")
    free = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
    out = []
    for instr in computations[name]:
        if instr.opcode in free or instr.opcode.endswith("-done"):
            continue
        out.append("dot" if is_matmul(computations, instr) else instr.opcode.removesuffix("-start"))
    return out
