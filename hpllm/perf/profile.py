"""Trace training steps with `jax.profiler` and say where the step time goes, per op category.

`profile(config, steps)` builds the training step exactly as `hpllm train` does (init_state,
jit_train_step, the prefetching loader), compiles and warms it up, then runs `steps` steps under
`jax.profiler.trace(..., create_perfetto_trace=True)`. Each step is one StepTraceAnnotation that
spans fetching the batch, dispatching the step and waiting for its results, so the *step time*
is the wall span from asking for the batch to having the new state.

The summary is built from two sources, each read with what jax/jaxlib provide:
- the trace (`*.xplane.pb`, read with `jax.profiler.ProfileData`): every executed HLO op is an
  event carrying its `hlo_op` name, plus our host annotations `hpllm.data` and `hpllm.dispatch`;
- the compiled HLO text of the same executable (read with `hpllm.perf.hlo`): opcodes, fusion
  bodies, dot/convolution shapes and the JAX name stack (`.../attention/...` from the named
  scope in the model) give each op a category, its FLOPs (2·M·N·K per dot) and the bytes it
  reads and writes.

Wall time is attributed instant by instant (`attribute`): when ops run concurrently on several
threads or streams each gets an equal share, an op nested in another (a loop body inside `while`)
takes the time from its parent, a control-flow op (`while`) counts only while none of its body's
ops runs anywhere, an op that finishes asynchronously (XLA:CPU hands some dots to Eigen's pool)
runs until its completion event, and when no op runs the time goes to the host (data, then
dispatch) or, if nothing is recorded, stays unattributed and is shown as its own line. So the
categories plus the unattributed line add up to the step time exactly.

Approximate: bytes are each executed op's operands plus results (no cache reuse, in-place
updates and gathers counted by the part they touch); elementwise FLOPs are one per output
element; the GPU/TPU path (device planes, "XLA Ops" lines, cuBLAS custom calls) follows the
xplane layout of those backends but has not been run on one.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import json
import math
import pathlib
import re
import statistics
import time

import jax

from hpllm.perf.hardware import current_chip
from hpllm.perf.hlo import COLLECTIVES, MATMUL_TARGET, Instr, nbytes, parse_module, shapes
from hpllm.perf.roofline import train_flops_per_token
from hpllm.train import data as data_lib
from hpllm.train.state import init_state
from hpllm.train.step import jit_train_step

CATEGORIES = {  # key -> label, in the order of the table
    "matmul": "matmul/convolution fusion",
    "attention": "attention",
    "collectives": "collectives",
    "elementwise": "elementwise/loop fusion",
    "copies": "copies/transposes",
    "data": "data (input wait, host->device)",
    "dispatch": "host dispatch",
    "other": "other (loops, gather/scatter, ...)",
}
UNATTRIBUTED = "unattributed (idle between ops)"
DATA_ANNOTATION, DISPATCH_ANNOTATION, STEP_NAME = "hpllm.data", "hpllm.dispatch", "hpllm_step"

# ---------------------------------------------------------------------------------------------
# The compiled HLO: category, FLOPs and bytes of every instruction

_MOVEMENT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
             "dynamic-update-slice", "concatenate", "pad", "reverse", "parameter", "constant",
             "tuple", "get-tuple-element", "copy-start", "copy-done", "bitcast-convert", "iota"}
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_OTHER = {"gather", "scatter", "sort", "rng", "rng-bit-generator", "rng-get-and-update-state",
          "custom-call", "infeed", "outfeed", "fft", "cholesky", "triangular-solve", "top-k"}


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One executed HLO instruction: category key, FLOPs and bytes per execution."""
    category: str
    flops: float
    bytes: float
    opcode: str
    scope: str  # the JAX name stack (op_name metadata)


def _dot_flops(ins: Instr, instrs: dict[str, Instr]) -> float:
    out = math.prod(d for _, dims in shapes(ins.type_text) for d in dims)
    lhs = instrs.get(ins.operands[0]) if ins.operands else None
    if lhs is None:
        return 0.0
    lhs_dims = shapes(lhs.type_text)[0][1] if shapes(lhs.type_text) else ()
    if ins.opcode == "dot":
        contracting = ins.attr_ints("lhs_contracting_dims")
        return 2.0 * out * math.prod(lhs_dims[i] for i in contracting if i < len(lhs_dims))
    # convolution: each output element is a dot over the kernel's input features and window
    rhs = instrs.get(ins.operands[1]) if len(ins.operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
    if rhs is None or not labels or not shapes(rhs.type_text):
        return 0.0
    kernel = shapes(rhs.type_text)[0][1]
    o = labels.group(1).find("o")
    return 2.0 * out * math.prod(kernel) / max(kernel[o] if 0 <= o < len(kernel) else 1, 1)


def _custom_gemm_flops(ins: Instr, instrs: dict[str, Instr]) -> float:
    """cuBLAS-style custom calls carry dot dimension numbers in their backend config;
    hpllm's CPU matmul kernels (hpllm_*matmul*: x (..., K) or op(a) (M, K) against a weight,
    out (..., N)) are sized from their shapes: K = x's elements / out's rows."""
    out_shapes = shapes(ins.type_text)[:1]
    out = math.prod(d for _, dims in out_shapes for d in dims)
    lhs = instrs.get(ins.operands[0]) if ins.operands else None
    if lhs is None or not shapes(lhs.type_text):
        return 0.0
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    if not m and ins.custom_call_target.startswith("hpllm_") and out_shapes:
        rows = math.prod(out_shapes[0][1][:-1])
        return 2.0 * out * math.prod(shapes(lhs.type_text)[0][1]) / max(rows, 1)
    if not m:
        return 0.0
    dims = shapes(lhs.type_text)[0][1]
    k = math.prod(dims[int(i.strip('" '))] for i in m.group(1).split(",") if i.strip('" '))
    return 2.0 * out * k


# hpllm's CPU training attention (kernels/cpu_attention.py): fwd(q, k, v, ...) and
# bwd(q, k, v, out, d_out, ...), q (B, S, H, D) and k, v (B, T, KV, D).
ATTENTION_TARGET = "hpllm_attention_"


# hpllm's CPU training kernels for SwiGLU, RMSNorm, RoPE and the loss
# (kernels/cpu_elementwise.py): elementwise work, as the XLA fusions they replace.
ELEMENTWISE_TARGET = re.compile(r"hpllm_(swiglu|rms_norm|rope|nll)_")


def _custom_attention_flops(ins: Instr, instrs: dict[str, Instr]) -> float:
    """FLOPs of the attention kernel's call over the whole S x T square (as the dense
    reference's dots count it): forward QK^T and PV, 4 x B H S T D; backward (FlashAttention
    -2) recomputes QK^T and forms dP, dV, dQ, dK, 10 x B H S T D."""
    operands = [instrs.get(o) for o in ins.operands[:2]]
    if None in operands or not all(shapes(o.type_text) for o in operands):
        return 0.0
    (b, s, h, d), t = shapes(operands[0].type_text)[0][1], shapes(operands[1].type_text)[0][1][1]
    return (10.0 if "bwd" in ins.custom_call_target else 4.0) * b * h * s * t * d


def _is_attention(scope: str) -> bool:
    return "attention" in re.split(r"[/()]", scope)


def parse_hlo(text: str) -> dict[str, OpCost]:
    """Category, FLOPs and bytes per execution of every instruction of a compiled HLO module
    (`jax.jit(f).lower(...).compile().as_text()`), by instruction name.

    FLOPs: 2·(output elements)·(contracted size) per dot or convolution, wherever it sits inside
    a fusion; one FLOP per output element of other arithmetic. Bytes: operands plus results of
    the instruction as it runs (a fusion's internals stay in registers/cache), except that
    updates in place and gathers count only the part they touch. Control flow (while, call,
    conditional) costs nothing itself: its body's instructions are traced and counted one by one.
    """
    computations, instrs = parse_module(text)
    inner_cache: dict[str, tuple[float, float, set[str], list[str]]] = {}

    def inner(comp: str):
        """(dot FLOPs, other FLOPs, opcodes, dot scopes) of a fused computation, recursively."""
        if comp in inner_cache:
            return inner_cache[comp]
        dot = other = 0.0
        opcodes: set[str] = set()
        dot_scopes: list[str] = []
        for ins in computations.get(comp, []):
            opcodes.add(ins.opcode)
            if ins.opcode in ("dot", "convolution"):
                dot += _dot_flops(ins, instrs)
                dot_scopes.append(ins.scope)
            elif ins.opcode == "fusion":
                d, o, ops, scopes = inner(ins.called[0]) if ins.called else (0, 0, set(), [])
                dot, other = dot + d, other + o
                opcodes, dot_scopes = opcodes | ops, dot_scopes + scopes
            elif ins.opcode not in _MOVEMENT and ins.opcode not in _FREE:
                reduce = ins.opcode == "reduce" and ins.operands  # counts its input elements
                src = instrs.get(ins.operands[0], ins) if reduce else ins
                other += sum(math.prod(d) for _, d in shapes(src.type_text)[:1])
        inner_cache[comp] = (dot, other, opcodes, dot_scopes)
        return inner_cache[comp]

    fused = {c for ins in instrs.values() if ins.opcode == "fusion" for c in ins.called}
    fused |= {c for ins in instrs.values() if ins.opcode not in _CONTROL and ins.opcode != "fusion"
              for c in ins.called}  # reducers and scatter combiners: not separately executed
    costs: dict[str, OpCost] = {}
    for comp, body in computations.items():
        if comp in fused:
            continue
        for ins in body:
            costs[ins.name] = _cost(ins, instrs, inner)
    return costs


def _bytes_moved(opcodes: set[str], operand_types: list[str], result_type: str) -> float:
    """Operands read plus results written; an update in place (dynamic-update-slice, scatter)
    touches only the updated part of its buffer, and a gather reads only the rows it returns."""
    sizes = sorted(map(nbytes, operand_types))
    result = nbytes(result_type)
    if sizes and opcodes & {"dynamic-update-slice", "scatter"}:
        return 2 * sum(sizes[:-1])  # read and write the updates; the big buffer stays put
    if sizes and "gather" in opcodes:
        return sum(sizes[:-1]) + 2 * result
    return sum(sizes) + result


def _cost(ins: Instr, instrs: dict[str, Instr], inner) -> OpCost:
    op, scope = ins.opcode, ins.scope
    if op in _FREE or op in _CONTROL:
        return OpCost("other", 0.0, 0.0, op, scope)
    operand_types = [instrs[o].type_text for o in ins.operands if o in instrs]
    if op == "fusion":
        dot, other, opcodes, dot_scopes = inner(ins.called[0]) if ins.called else (0, 0, set(), [])
        nbytes = _bytes_moved(opcodes, operand_types, ins.type_text)
        if dot:
            attention = any(map(_is_attention, dot_scopes))
            return OpCost("attention" if attention else "matmul", dot + other, nbytes, op, scope)
        if opcodes & COLLECTIVES:
            category = "collectives"
        elif opcodes <= _MOVEMENT | _FREE:
            category = "copies"
        elif opcodes & {"gather", "scatter"} and opcodes <= _MOVEMENT | _FREE | _OTHER:
            category = "other"
        else:
            category = "elementwise"
        if category != "collectives" and _is_attention(scope):
            category = "attention"
        return OpCost(category, other, nbytes, op, scope)
    nbytes = _bytes_moved({op}, operand_types, ins.type_text)
    flops = 0.0
    if op in ("dot", "convolution"):
        flops, category = _dot_flops(ins, instrs), "matmul"
    elif op == "custom-call" and MATMUL_TARGET.search(ins.custom_call_target):
        flops, category = _custom_gemm_flops(ins, instrs), "matmul"
    elif op == "custom-call" and ins.custom_call_target.startswith(ATTENTION_TARGET):
        flops, category = _custom_attention_flops(ins, instrs), "attention"
    elif op == "custom-call" and ELEMENTWISE_TARGET.match(ins.custom_call_target):
        category = "elementwise"  # one FLOP per result element, as XLA's own fusions count
        flops = float(sum(math.prod(d) for _, d in shapes(ins.type_text)))
    elif op in COLLECTIVES or any(op.startswith(c) for c in COLLECTIVES):
        category = "collectives"
    elif op in _MOVEMENT:
        category = "copies"
    elif op in _OTHER:
        category = "other"
    else:
        category = "elementwise"
        src = operand_types[0] if op == "reduce" and operand_types else ins.type_text
        flops = float(sum(math.prod(d) for _, d in shapes(src)[:1]))
    if category in ("matmul", "elementwise", "copies") and _is_attention(scope):
        category = "attention"
    return OpCost(category, flops, nbytes, op, scope)


# ---------------------------------------------------------------------------------------------
# The trace: events, and wall time attributed instant by instant


@dataclasses.dataclass(frozen=True)
class OpEvent:
    track: str  # thread or stream: ops on one track nest, ops on different tracks overlap
    start: int  # ns
    end: int
    name: str  # the HLO instruction
    module: str
    tail: bool = False  # the asynchronous rest of an execution whose start is another event


@dataclasses.dataclass
class TraceEvents:
    steps: list[tuple[int, int]]  # wall span of each traced step (ns)
    ops: list[OpEvent]
    data: list[tuple[int, int]]  # host blocked on the next batch
    dispatch: list[tuple[int, int]]  # host launching the step


def read_xplane(path) -> TraceEvents:
    """Steps, op executions and our host annotations from an xplane.pb, via jax.profiler.

    On the CPU an op's event can end before its work does: a thunk that hands a dot to the
    Eigen thread pool returns at once, and the runtime records the completion as an event
    named "end: <op>" linked to the start by a flow id. The time from the op's event to that
    completion becomes a `tail` event on a track of its own, so it overlaps (and shares the
    wall time with) whatever else runs meanwhile."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(path))
    planes = [p for p in data.planes if p.name.startswith(("/host:", "/device:"))]
    device_ops = any(p.name.startswith("/device:") and _has_ops(p) for p in planes)
    out = TraceEvents([], [], [], [])
    for plane in planes:
        use_ops = plane.name.startswith("/device:") or not device_ops
        lines = list(plane.lines)
        if use_ops and any(line.name == "XLA Ops" for line in lines):  # GPU/TPU: one op line
            op_lines = {"XLA Ops"}
        else:
            op_lines = {line.name for line in lines}
        flows: dict[int, OpEvent] = {}
        done: dict[int, int] = {}
        for line in lines:
            for e in line.events:
                start, end = int(e.start_ns), int(e.start_ns + e.duration_ns)
                if e.name == STEP_NAME:
                    out.steps.append((start, end))
                elif e.name == DATA_ANNOTATION:
                    out.data.append((start, end))
                elif e.name == DISPATCH_ANNOTATION:
                    out.dispatch.append((start, end))
                elif use_ops and line.name in op_lines:
                    stats = dict(e.stats)
                    if "hlo_op" in stats:
                        op = OpEvent(f"{plane.name}/{line.name}", start, end,
                                     str(stats["hlo_op"]), str(stats.get("hlo_module", "")))
                        out.ops.append(op)
                        if "_p" in stats:
                            flows[stats["_p"]] = op
                    elif e.name.startswith("end: ") and "_c" in stats:
                        done[stats["_c"]] = max(done.get(stats["_c"], 0), end)
        for flow, op in flows.items():
            if done.get(flow, 0) > op.end:
                out.ops.append(dataclasses.replace(op, track=f"{op.track}/async {flow}",
                                                   start=op.end, end=done[flow], tail=True))
    out.steps.sort()
    return out


def _has_ops(plane) -> bool:
    return any("hlo_op" in dict(e.stats) for line in plane.lines for e in line.events)


def leaf_pieces(ops: list[OpEvent]) -> list[tuple[int, int, int]]:
    """(start, end, op index) pieces in which a track runs exactly one innermost op: an op
    nested in another (a loop body's op inside `while`) takes that time from its parent."""
    by_track: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        by_track.setdefault(op.track, []).append(i)
    pieces = []
    for idx in by_track.values():
        idx.sort(key=lambda i: (ops[i].start, -ops[i].end))
        stack: list[int] = []  # open ops, innermost last
        t = 0  # where the innermost open op's current piece begins
        for i in idx + [None]:
            until = ops[i].start if i is not None else None
            while stack and (until is None or ops[stack[-1]].end <= until):  # close finished ops
                top = stack.pop()
                if ops[top].end > t:
                    pieces.append((t, ops[top].end, top))
                t = max(t, ops[top].end)
            if i is None:
                break
            if stack and until > t:
                pieces.append((t, until, stack[-1]))
            t = until
            stack.append(i)
    return pieces


def attribute(pieces: list[tuple[int, int, int]], host: list[tuple[int, int, str]],
              step: tuple[int, int], weak: frozenset = frozenset()
              ) -> tuple[dict[int, float], dict[str, float]]:
    """Wall time (ns) of one step by op index and by host activity ("data", "dispatch",
    "unattributed"), from `leaf_pieces` and host spans. The values add up to the step's span:
    ops running at the same time share it equally; host time counts only while no op runs.
    `weak` ops (control flow: a `while` whose body runs on other threads) count only while no
    other op runs: then it is the loop's own overhead."""
    s0, s1 = step
    pieces = [(max(a, s0), min(b, s1), i) for a, b, i in pieces if b > s0 and a < s1]
    host = [(max(a, s0), min(b, s1), kind) for a, b, kind in host if b > s0 and a < s1]
    cuts = sorted({s0, s1, *(p[0] for p in pieces), *(p[1] for p in pieces),
                   *(h[0] for h in host), *(h[1] for h in host)})
    active: list[list[int]] = [[] for _ in cuts[1:]]
    for a, b, i in pieces:  # pieces of one track never overlap: few ops per interval
        for k in range(bisect.bisect_left(cuts, a), bisect.bisect_left(cuts, b)):
            active[k].append(i)
    kinds: list[set] = [set() for _ in cuts[1:]]
    for a, b, kind in host:
        for k in range(bisect.bisect_left(cuts, a), bisect.bisect_left(cuts, b)):
            kinds[k].add(kind)
    by_op: dict[int, float] = {}
    by_host = {"data": 0.0, "dispatch": 0.0, "unattributed": 0.0}
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        running = [i for i in active[k] if i not in weak] or active[k]
        if running:
            for i in running:
                by_op[i] = by_op.get(i, 0.0) + (b - a) / len(running)
        else:
            kind = "data" if "data" in kinds[k] else "dispatch" if kinds[k] else "unattributed"
            by_host[kind] += b - a
    return by_op, by_host


# ---------------------------------------------------------------------------------------------
# Summary


def summarize(events: TraceEvents, costs: dict[str, OpCost], peak_flops: float,
              peak_bandwidth: float, model_flops_per_step: float = 0.0,
              module: str = "") -> dict:
    """Per-category time, FLOPs and bytes per step (means over the traced steps), achieved
    FLOP/s and bandwidth against the peaks, and the top ops. Pure: a function of its inputs.
    `costs` (from `parse_hlo`) describe the ops of HLO module `module` (any module if empty);
    ops of other modules count as "other" without FLOPs."""
    if not events.steps:
        raise ValueError(f"the trace holds no {STEP_NAME!r} step annotations")
    n = len(events.steps)
    cat = {k: {"time_s": 0.0, "flops": 0.0, "bytes": 0.0, "ops": 0} for k in CATEGORIES}
    per_op: dict[str, dict] = {}
    unattributed = 0.0
    step_times = []
    unknown = 0
    pieces = leaf_pieces(events.ops)
    host = [(a, b, "data") for a, b in events.data] + [(a, b, "dispatch")
                                                       for a, b in events.dispatch]
    weak = frozenset(i for i, op in enumerate(events.ops)
                     if op.name in costs and costs[op.name].opcode in _CONTROL)
    for step in events.steps:
        by_op, by_host = attribute(pieces, host, step, weak)
        step_times.append((step[1] - step[0]) / 1e9)
        for kind in ("data", "dispatch"):
            cat[kind]["time_s"] += by_host[kind] / 1e9
        unattributed += by_host["unattributed"] / 1e9
        for i, op in enumerate(events.ops):
            if not step[0] <= op.start < step[1] and i not in by_op:
                continue
            cost = costs.get(op.name) if not module or op.module in ("", module) else None
            if cost is None:
                unknown += 1
                cost = OpCost("other", 0.0, 0.0, "?", "")
            c = cat[cost.category]
            rec = per_op.setdefault(op.name, {"category": cost.category, "opcode": cost.opcode,
                                              "time_s": 0.0, "flops": 0.0, "bytes": 0.0,
                                              "count": 0, "scope": cost.scope})
            c["time_s"] += by_op.get(i, 0.0) / 1e9
            rec["time_s"] += by_op.get(i, 0.0) / 1e9
            if step[0] <= op.start < step[1] and not op.tail:  # each execution once
                c["flops"] += cost.flops
                c["bytes"] += cost.bytes
                c["ops"] += 1
                rec["flops"] += cost.flops
                rec["bytes"] += cost.bytes
                rec["count"] += 1
    total = sum(step_times)
    rows = {}
    for key, c in cat.items():
        t = c["time_s"] / n
        flops, nbytes = c["flops"] / n, c["bytes"] / n
        rows[key] = {"label": CATEGORIES[key], "time_fraction": c["time_s"] / total,
                     "time_per_step_s": t, "flops_per_step": flops, "bytes_per_step": nbytes,
                     "ops_per_step": c["ops"] / n,
                     "flop_per_s": flops / t if t else 0.0,
                     "flops_fraction_of_peak": flops / t / peak_flops if t and peak_flops else 0.0,
                     "bytes_per_s": nbytes / t if t else 0.0,
                     "bandwidth_fraction_of_peak": (nbytes / t / peak_bandwidth
                                                    if t and peak_bandwidth else 0.0)}
    attributed = sum(r["time_fraction"] for r in rows.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1]["time_s"])[:15]
    mean_step = total / n
    return {
        "steps": n, "step_times_s": step_times, "step_time_s": mean_step,
        "median_step_time_s": statistics.median(step_times),
        "categories": rows,
        "attributed_fraction": attributed,
        "unattributed": {"label": UNATTRIBUTED, "time_fraction": unattributed / total,
                         "time_per_step_s": unattributed / n},
        "hlo_flops_per_step": sum(c["flops"] for c in cat.values()) / n,
        "hlo_bytes_per_step": sum(c["bytes"] for c in cat.values()) / n,
        "model_flops_per_step": model_flops_per_step,
        "mfu": model_flops_per_step / mean_step / peak_flops if peak_flops else 0.0,
        "peak_flop_per_s": peak_flops, "peak_bytes_per_s": peak_bandwidth,
        "op_events_without_hlo": unknown,
        "top_ops": [{"name": name, **{k: (v / n if k in ("time_s", "flops", "bytes", "count")
                                          else v) for k, v in rec.items()}}
                    for name, rec in top],
    }


def format_summary(s: dict) -> str:
    """The summary as a table (like xprof's op profile, by category) and the top ops."""
    head = (f"{'category':34s} {'time %':>6s} {'ms/step':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
            f"{'% peak':>6s} {'MB':>8s} {'GB/s':>7s} {'% BW':>5s}")
    lines = [head, "-" * len(head)]
    for r in s["categories"].values():
        lines.append(f"{r['label']:34s} {100 * r['time_fraction']:6.1f} "
                     f"{1e3 * r['time_per_step_s']:9.2f} {r['flops_per_step'] / 1e9:8.3f} "
                     f"{r['flop_per_s'] / 1e9:8.1f} {100 * r['flops_fraction_of_peak']:6.1f} "
                     f"{r['bytes_per_step'] / 1e6:8.1f} {r['bytes_per_s'] / 1e9:7.2f} "
                     f"{100 * r['bandwidth_fraction_of_peak']:5.1f}")
    lines.append("-" * len(head))
    lines.append(f"{'categories together':34s} {100 * s['attributed_fraction']:6.1f}")
    u = s["unattributed"]
    lines.append(f"{u['label']:34s} {100 * u['time_fraction']:6.1f} "
                 f"{1e3 * u['time_per_step_s']:9.2f}")
    lines.append(f"{'step (wall span, mean)':34s} {100.0:6.1f} {1e3 * s['step_time_s']:9.2f} "
                 f"{s['hlo_flops_per_step'] / 1e9:8.3f} "
                 f"{s['hlo_flops_per_step'] / s['step_time_s'] / 1e9:8.1f} {'':6s} "
                 f"{s['hlo_bytes_per_step'] / 1e6:8.1f}")
    lines.append("")
    lines.append(f"{'top ops':34s} {'time %':>6s} {'ms/step':>9s} {'GFLOP':>8s} {'runs':>5s}  "
                 "category")
    for op in s["top_ops"][:8]:
        lines.append(f"{op['name'][:34]:34s} {100 * op['time_s'] / s['step_time_s']:6.1f} "
                     f"{1e3 * op['time_s']:9.2f} {op['flops'] / 1e9:8.3f} {op['count']:5.0f}  "
                     f"{op['category']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running it


def _trace_files(session: pathlib.Path) -> dict[str, pathlib.Path]:
    xplanes = sorted(session.glob("*.xplane.pb"))
    if not xplanes:
        raise FileNotFoundError(f"the profiler wrote no .xplane.pb into {session}")
    files = {"xplane": xplanes[0]}
    perfetto = session / "perfetto_trace.json.gz"
    if perfetto.exists():
        files["perfetto"] = perfetto
    return files


def read_perfetto(path) -> list[dict]:
    """The trace events of a perfetto_trace.json.gz (Chrome JSON trace format)."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile(config, steps: int = 3, out_dir="runs/profile", synthetic: bool = False,
            warmup: int = 2, log=print) -> dict:
    """Trace `steps` training steps of `config` into out_dir and return the summary dict (also
    written as profile_summary.json next to the trace). `synthetic` uses random tokens instead
    of the corpus. Prints through `log`."""
    config.validate()
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    tc = config.train
    if synthetic:
        def batch_fn(step):
            return data_lib.random_batch(config, seed=tc.seed + step)
    else:
        batch_fn = data_lib.prepare_data(config).train.batch_at
    state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(tc.seed))
    t0 = time.perf_counter()
    compiled = jit_train_step(config).lower(state, jax.device_put(batch_fn(0))).compile()
    hlo = compiled.as_text()
    costs = parse_hlo(hlo)
    module = re.match(r"HloModule\s+([\w.\-]+)", hlo)
    log(f"compiled the train step in {time.perf_counter() - t0:.1f} s "
        f"({len(costs)} HLO instructions)")
    xla_flops = _xla_flops(compiled)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set((out / "plugins" / "profile").glob("*"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames cost a lot of overhead; our annotations stay
    with data_lib.Prefetcher(batch_fn, 0, tc.prefetch) as prefetcher:
        def run_step(i):
            with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=i):
                with jax.profiler.TraceAnnotation(DATA_ANNOTATION):
                    _, batch = prefetcher.next()
                with jax.profiler.TraceAnnotation(DISPATCH_ANNOTATION):
                    new_state, metrics = compiled(state, batch)
                jax.block_until_ready((new_state, metrics))
            return new_state

        for i in range(warmup):
            state = run_step(i)
        with jax.profiler.trace(str(out), create_perfetto_trace=True, profiler_options=options):
            for i in range(warmup, warmup + steps):
                state = run_step(i)
    sessions = sorted(set((out / "plugins" / "profile").glob("*")) - before)
    if not sessions:
        raise FileNotFoundError(f"the profiler wrote no session under {out}/plugins/profile")
    files = _trace_files(sessions[-1])

    chip = current_chip()
    peak = chip.peak(tc.compute_dtype)
    tokens = tc.batch_size * tc.seq_len
    summary = summarize(read_xplane(files["xplane"]), costs, peak, chip.hbm_bandwidth,
                        train_flops_per_token(config.model, tc.seq_len) * tokens,
                        module.group(1) if module else "")
    summary.update(config=config.to_dict(), chip=chip.name, compute_dtype=tc.compute_dtype,
                   tokens_per_step=tokens, xla_cost_analysis_flops=xla_flops,
                   trace_dir=str(sessions[-1]), files={k: str(v) for k, v in files.items()})
    json_path = sessions[-1] / "profile_summary.json"
    json_path.write_text(json.dumps(summary, indent=1))
    summary["files"]["summary"] = str(json_path)
    return summary


def _xla_flops(compiled) -> float:
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        return float(analysis.get("flops", 0.0))
    except Exception:  # cost analysis is optional, backend-dependent
        return 0.0


def describe(summary: dict) -> str:
    """Header, table and how to open the trace: what `hpllm profile` prints."""
    s = summary
    c = s["config"]
    head = (f"profile: preset {c['preset']}, {s['steps']} traced steps of "
            f"{c['train']['batch_size']} x {c['train']['seq_len']} tokens, "
            f"{s['compute_dtype']}, on {s['chip']} (peak {s['peak_flop_per_s'] / 1e12:.3f} "
            f"TFLOP/s, {s['peak_bytes_per_s'] / 1e9:.1f} GB/s)\n"
            f"step time {1e3 * s['step_time_s']:.1f} ms mean ("
            + ", ".join(f"{1e3 * t:.1f}" for t in s["step_times_s"]) + " ms); model "
            f"{s['model_flops_per_step'] / 1e9:.2f} GFLOP/step -> MFU {100 * s['mfu']:.1f}%; "
            f"executed HLO {s['hlo_flops_per_step'] / 1e9:.2f} GFLOP/step (XLA cost analysis of "
            f"the module: {s['xla_cost_analysis_flops'] / 1e9:.2f}, loop bodies counted once)\n")
    over = [r["label"] for r in s["categories"].values() if r["flops_fraction_of_peak"] > 1
            or r["bandwidth_fraction_of_peak"] > 1]
    if over:
        head += (f"note: {', '.join(over)} ran above the peak: the peak is too low (a CPU peak "
                 "measured on a busy machine?); re-measure with `hpllm hw --refresh` when idle\n")
    files = s["files"]
    logdir = pathlib.Path(s["trace_dir"]).parents[2]  # <logdir>/plugins/profile/<session>
    tail = (f"\ntrace: {files.get('perfetto', files['xplane'])}\n"
            f"  Perfetto: open https://ui.perfetto.dev and drag the .json.gz in;\n"
            f"  TensorBoard/XProf: pip install xprof && xprof --logdir {logdir}\n"
            f"summary JSON: {files['summary']}")
    return head + "\n" + format_summary(s) + "\n" + tail
