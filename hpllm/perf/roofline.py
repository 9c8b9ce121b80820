"""FLOP counting for the model, the numerator of MFU and of every roofline prediction."""

from __future__ import annotations

import dataclasses
import math

from hpllm.config import ModelConfig
from hpllm.kernels.paged_attention import ONLINE_STEP_TOKENS


def matmul_params(config: ModelConfig, active_only: bool = True) -> int:
    """Weights that take part in a matmul per token: all layer projections and the output
    projection (also when tied to the embedding). Embedding lookups and norm scales do not.
    Mixture of experts: the router and the experts_per_token experts a token is sent to;
    active_only=False counts every expert (the weights held in memory)."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # wq, wo, wk, wv
    mlp = 3 * c.dim * c.hidden_dim
    if c.n_experts:
        mlp = c.dim * c.n_experts + mlp * (c.experts_per_token if active_only else c.n_experts)
    return c.n_layers * (attn + mlp) + c.dim * c.vocab_size


# Weight quantization schemes the predictor counts (hpllm/quantized.py): int8 codes plus a
# float32 scale per output row (and, int8-zp, a float32 zero point per row).
QUANT_ROW_BYTES = {"int8": 4, "int8-zp": 8}


def matmul_weight_bytes(config: ModelConfig, dtype: str = "float32", quant: str = "") -> dict:
    """Bytes of the matmul weights as stored: {"layers": every layer projection, "output":
    the output projection (the tied embedding)}. Float: params x the dtype's size; `quant`:
    one byte per weight plus QUANT_ROW_BYTES per output row of each matrix (N of the (N, K)
    codes that hpllm/compress/quantize.py makes)."""
    c = config
    if not quant:
        return {"layers": (matmul_params(c, active_only=False) - c.dim * c.vocab_size)
                * _BYTES[dtype], "output": c.dim * c.vocab_size * _BYTES[dtype]}
    if quant not in QUANT_ROW_BYTES:
        raise ValueError(f"the roofline counts weights quantized as "
                         f"{' or '.join(QUANT_ROW_BYTES)}, not {quant!r}")
    if c.n_experts:
        raise ValueError("quantized mixture-of-experts weights are not counted (experts stay "
                         "float when quantized)")
    row = QUANT_ROW_BYTES[quant]
    layer = sum(n * k + n * row for n, k in layer_matrices(c))
    return {"layers": c.n_layers * layer, "output": c.vocab_size * (c.dim + row)}


def layer_matrices(config: ModelConfig) -> list:
    """(N, K) of a dense layer's seven weight matrices: q, k, v, o, gate, up, down."""
    c = config
    qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return [(qd, c.dim), (kvd, c.dim), (kvd, c.dim), (c.dim, qd),
            (c.hidden_dim, c.dim), (c.hidden_dim, c.dim), (c.dim, c.hidden_dim)]


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV per token, averaged over a causal sequence of seq_len.

    Causal masking is counted as the useful triangle: query i attends to i+1 keys, so the
    average context is (seq_len + 1) / 2. (PaLM's appendix counts the full square; we count
    what a causal kernel that skips masked blocks must do, so MFU is not inflated by work
    that is thrown away.) Per key: 2 FLOPs for the q.k dot and 2 for the p*v accumulate, per
    head dimension and head.
    """
    c = config
    avg_context = (seq_len + 1) / 2
    return c.n_layers * 2 * 2 * c.n_heads * c.head_dim * avg_context


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 2 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs for one training token: forward + backward (twice the forward), i.e. the
    familiar 6·N per token plus attention. Recomputation under remat is not model FLOPs."""
    return 3 * forward_flops_per_token(config, seq_len)


# ----------------------------------------------------------------------------- the napkin
# A workload is split into terms, each with its FLOPs and the bytes it must move through
# device memory; a term takes max(FLOPs / peak, bytes / bandwidth) (its own roofline) and
# the terms run one after another. On a CPU two measured figures join the napkin: the weight
# reads of a decode step stream at the bandwidth XLA's mat-vec reaches (below what the cores
# can read), and every launched op and call costs the runtime a fixed time ("dispatch"). Collectives overlap the compute (XLA schedules them
# asynchronously), so the step takes max(sum of terms, communication). All figures are per
# device for one step.

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
DECODE_KINDS = ("decode", "engine")  # engine: the paged engine's batched decode step
_WEIGHT_TERMS = ("weight matmuls", "output projection")
# Kernels a layer launches per pass, counted from the model: 7 weight matmuls (q, k, v, o,
# gate, up, down), 2 attention dots and the softmax, 2 norms, RoPE, 2 KV-cache writes, the
# SwiGLU gate and 2 residual adds. Outside the layers: embedding, final norm, output dot.
OPS_PER_LAYER = 18
# What XLA:CPU really launches per layer of a one-token decode step (counted in the compiled
# program, tiny to SmolLM2-135M, float32 or int8: 36-38): the 7 weight dots and ~29 loop
# fusions, as it fuses the decode step's small ops far less than the napkin's list.
DECODE_OPS_PER_LAYER = 36
OPS_OUTSIDE_LAYERS = 3
WEIGHT_DOTS_PER_LAYER = 7  # q, k, v, o, gate, up, down (and the output projection outside)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str  # "train" (one optimizer step), "prefill" (batch x seq_len tokens), "decode",
    # "engine" (a decode step of the paged engine: batch rows, each with its own block table)
    batch: int
    seq_len: int = 0  # tokens per sequence (train, prefill)
    context: int = 0  # KV-cache length each decode token attends over (decode)

    def __post_init__(self):
        if self.kind not in ("train", "prefill", *DECODE_KINDS):
            raise ValueError(f"workload must be train, prefill, decode or engine, got "
                             f"{self.kind!r}")
        if self.batch < 1 or (not self.decoding and self.seq_len < 1) or (
                self.decoding and self.context < 1):
            raise ValueError(f"{self.kind} needs batch >= 1 and "
                             f"{'context' if self.decoding else 'seq_len'} >= 1")

    @property
    def decoding(self) -> bool:
        return self.kind in DECODE_KINDS

    @property
    def tokens(self) -> int:
        return self.batch * (1 if self.decoding else self.seq_len)

    def describe(self) -> str:
        if self.kind == "engine":
            return f"paged engine step, {self.batch} rows, context {self.context}"
        if self.kind == "decode":
            return f"decode step, batch {self.batch}, context {self.context}"
        return f"{self.kind}, batch {self.batch} x {self.seq_len} tokens"


@dataclasses.dataclass
class Term:
    name: str
    flops: float
    bytes: float
    compute_s: float = 0.0
    memory_s: float = 0.0
    overhead_s: float = 0.0  # fixed runtime cost (op launches), neither FLOPs nor bytes

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s, self.overhead_s)

    @property
    def bound(self) -> str:
        if self.overhead_s > max(self.compute_s, self.memory_s):
            return "overhead"
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass
class Collective:
    name: str  # e.g. "all-gather weights"
    axis: str
    bytes: float  # sent per device
    seconds: float


@dataclasses.dataclass
class Prediction:
    model: str
    workload: Workload
    mesh: MeshShape
    chip: str
    peak_flops: float
    bandwidth: float
    terms: list
    collectives: list
    memory: dict  # bytes per device by kind, plus "total" and "capacity"
    notes: list
    model_flops: float = 0.0  # useful FLOPs (causal triangle, no recompute): MFU's numerator

    @property
    def flops(self) -> float:
        return sum(t.flops for t in self.terms)

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def intensity(self) -> float:
        return self.flops / max(self.bytes, 1.0)

    @property
    def compute_s(self) -> float:
        return self.flops / self.peak_flops

    @property
    def memory_s(self) -> float:  # each term's bytes at the bandwidth that term streams at
        return sum(t.memory_s for t in self.terms)

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def step_s(self) -> float:
        return max(sum(t.seconds for t in self.terms), self.comm_s)

    @property
    def bound(self) -> str:
        local = sum(t.seconds for t in self.terms)
        if self.comm_s > local:
            return "communication"
        by_kind = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}
        for t in self.terms:
            by_kind[t.bound] += t.seconds
        return max(by_kind, key=by_kind.get)

    def to_dict(self) -> dict:
        return {"model": self.model, "workload": dataclasses.asdict(self.workload),
                "mesh": dataclasses.asdict(self.mesh), "chip": self.chip,
                "peak_flops": self.peak_flops, "bandwidth": self.bandwidth,
                "flops": self.flops, "bytes": self.bytes, "intensity": self.intensity,
                "compute_s": self.compute_s, "memory_s": self.memory_s, "comm_s": self.comm_s,
                "predicted_s": self.step_s, "bound": self.bound,
                "model_flops": self.model_flops,
                "terms": [dict(dataclasses.asdict(t), seconds=t.seconds, bound=t.bound)
                          for t in self.terms],
                "collectives": [dataclasses.asdict(c) for c in self.collectives],
                "memory_per_device": self.memory, "notes": self.notes}

    def table(self) -> str:
        lines = [f"{self.model} | {self.workload.describe()} | mesh data={self.mesh.data} "
                 f"fsdp={self.mesh.fsdp} tensor={self.mesh.tensor} | {self.chip}: "
                 f"{self.peak_flops / 1e12:.3f} TFLOP/s, {self.bandwidth / 1e9:.1f} GB/s",
                 f"{'term':<22}{'GFLOP':>10}{'MB':>10}{'FLOP/B':>8}{'compute ms':>12}"
                 f"{'memory ms':>11}  bound"]
        for t in self.terms:
            lines.append(f"{t.name:<22}{t.flops / 1e9:>10.3f}{t.bytes / 1e6:>10.1f}"
                         f"{t.flops / max(t.bytes, 1):>8.1f}{t.compute_s * 1e3:>12.3f}"
                         f"{t.memory_s * 1e3:>11.3f}  {t.bound}"
                         + (f" {t.overhead_s * 1e3:.3f} ms" if t.overhead_s else ""))
        lines.append(f"{'total':<22}{self.flops / 1e9:>10.3f}{self.bytes / 1e6:>10.1f}"
                     f"{self.intensity:>8.1f}{self.compute_s * 1e3:>12.3f}"
                     f"{self.memory_s * 1e3:>11.3f}")
        for c in self.collectives:
            lines.append(f"  {c.name:<30} over {c.axis:<7}{c.bytes / 1e6:>10.1f} MB "
                         f"{c.seconds * 1e3:>10.3f} ms")
        lines.append(f"predicted step {self.step_s * 1e3:.3f} ms ({self.bound}-bound; "
                     f"critical intensity {self.peak_flops / self.bandwidth:.1f} FLOP/B)")
        mem = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.memory.items()
                        if k not in ("total", "capacity") and v)
        cap = self.memory.get("capacity", 0)
        lines.append(f"memory per device: {mem}; total {self.memory['total'] / 2**30:.3f} GiB"
                     + (f" of {cap / 2**30:.1f} GiB" if cap else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ring_seconds(nbytes: float, n: int, bandwidth: float) -> float:
    """A ring all-gather / reduce-scatter over n devices moves (n-1)/n of the full array."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth if bandwidth else float("inf")


def optimizer_term(params: float, param_bytes: float, shard: int = 1) -> Term:
    """AdamW's update of 1/shard of `params`: it reads params, grads, m, v and writes params,
    m, v (all param_bytes each), 12 FLOPs a parameter."""
    return Term("optimizer (AdamW)", 12 * params / shard, 7 * params * param_bytes / shard)


def grad_all_reduce(grad_bytes: float, n: int, bandwidth: float) -> Collective:
    """Data parallelism's float32 gradient all-reduce over n devices: a ring reduce-scatter
    and all-gather of the `grad_bytes` each device holds."""
    return Collective("all-reduce grads", "data", 2 * grad_bytes,
                      2 * _ring_seconds(grad_bytes, n, bandwidth))


def predict(model: ModelConfig, workload: Workload, chip, mesh: MeshShape = MeshShape(), *,
            param_dtype: str = "float32", compute_dtype: str = "bfloat16", remat: str = "none",
            attention: str = "reference", model_name: str = "model", quant: str = "",
            backend: str = "xla") -> Prediction:
    """The roofline prediction of one step of `workload` on `mesh` devices of `chip`, with
    the matmul weights quantized by `quant` (QUANT_ROW_BYTES; "" float). backend "kernel":
    a decode or engine step through the fused CPU decoder kernel (kernel_prediction), from
    the chip's measured decoder figures; "xla": XLA's program of the model."""
    c, w = model, workload
    if quant and w.kind == "train":
        raise ValueError("quantized weights are for inference workloads, not train")
    if backend not in ("xla", "kernel"):
        raise ValueError(f"backend must be xla or kernel, got {backend!r}")
    if backend == "kernel":
        return kernel_prediction(c, w, chip, quant=quant, model_name=model_name)
    stored = matmul_weight_bytes(c, compute_dtype, quant)
    cb, pb = _BYTES[compute_dtype], _BYTES[param_dtype]
    peak, bw = chip.peak(compute_dtype), chip.hbm_bandwidth
    n_dev, shard = mesh.devices, mesh.fsdp * mesh.tensor
    batch_dev = w.batch / (mesh.data * mesh.fsdp)  # sequences per device (tensor splits heads)
    tokens_dev = batch_dev * (1 if w.decoding else w.seq_len)
    hd, kvd = c.head_dim, c.n_kv_heads * c.head_dim
    qd = c.n_heads * hd
    p_mm = matmul_params(c)  # per token: MoE counts only the active experts
    p_held = matmul_params(c, active_only=False)  # in memory: every expert
    p_all = p_held + (0 if c.tie_embeddings else c.vocab_size * c.dim) + c.n_layers * 2 * c.dim
    train = w.kind == "train"
    passes = 3 if train else 1  # backward = two more matmuls per forward matmul
    notes = []

    # Weight matmuls: every weight read once per pass (in the compute dtype), the matmul inputs
    # and outputs of each layer written/read once per pass.
    act_per_token = c.n_layers * (2 * c.dim + 2 * qd + 2 * kvd + 2 * c.dim + 3 * c.hidden_dim
                                  + 2 * c.dim) + c.dim
    terms = [Term("weight matmuls", passes * 2 * (p_mm - c.dim * c.vocab_size) * tokens_dev
                  / mesh.tensor,
                  passes * (stored["layers"] / mesh.tensor
                            + tokens_dev * act_per_token * cb / mesh.tensor)),
             Term("output projection", passes * 2 * c.dim * c.vocab_size * tokens_dev
                  / mesh.tensor,
                  passes * (stored["output"] / mesh.tensor
                            + tokens_dev * (c.dim * cb + c.vocab_size * 4 / mesh.tensor)))]

    # Attention core (QK^T, softmax, PV).
    heads_dev = c.n_heads / mesh.tensor
    if w.decoding:
        kv_len = w.context
        flops = 4 * batch_dev * c.n_layers * heads_dev * hd * kv_len
        kv_bytes = 2 * batch_dev * c.n_layers * kv_len * kvd / mesh.tensor * cb
        terms.append(Term("attention (KV read)", flops,
                          kv_bytes + 3 * batch_dev * c.n_layers * heads_dev * kv_len * 4))
    else:
        s = w.seq_len
        dense = attention in ("reference",) or (attention == "auto" and s < 512)
        pairs = s * s if dense else s * (s + 1) / 2  # the dense kernel computes the square
        flops = passes * 4 * batch_dev * c.n_layers * heads_dev * hd * pairs
        if dense:  # scores and probabilities go through memory, float32
            score_passes = 10 if train else 4
            nbytes = score_passes * batch_dev * c.n_layers * heads_dev * s * s * 4
            notes.append(f"dense attention moves {nbytes / 1e6:.0f} MB of S x S scores; "
                         "flash (--attention=flash) keeps them on chip")
        else:
            nbytes = passes * 4 * tokens_dev * c.n_layers * (qd + kvd) * cb
        terms.append(Term("attention", flops, nbytes))

    # Elementwise: norms, RoPE, residual adds, SwiGLU gate, casts; each reads and writes
    # the activation it touches (XLA fuses chains, so count one read + one write each).
    ew_elems = c.n_layers * (6 * c.dim + 2 * (qd + kvd) + 3 * c.hidden_dim) + 2 * c.dim
    terms.append(Term("elementwise", passes * 8 * tokens_dev * ew_elems / mesh.tensor,
                      passes * 2 * tokens_dev * ew_elems * cb / mesh.tensor))
    if train:
        terms.append(Term("loss (softmax x-ent)", 5 * tokens_dev * c.vocab_size / mesh.tensor,
                          3 * tokens_dev * c.vocab_size * 4 / mesh.tensor))
        terms.append(optimizer_term(p_all, pb, shard))
    # Decode's weight matmuls are mat-vecs: their weights stream at what the runtime's dot
    # (or, quantized, the CPU int8 kernel) reaches at one row where that was measured (CPU),
    # else at the memory bandwidth. With several rows they compute at the rate measured for
    # that many rows, far below the large-matmul peak.
    matvec_bw = (chip.int8_matvec_bandwidth if quant else 0.0) or chip.matvec_bandwidth
    weights_bw = (matvec_bw or bw) if w.decoding else bw
    weights_peak, rows = peak, math.ceil(tokens_dev)
    if w.decoding and rows > 1:
        weights_peak = batched_rate(chip, "int8" if quant else compute_dtype, rows) or peak
    for t in terms:
        weight = t.name in _WEIGHT_TERMS
        t.compute_s = t.flops / (weights_peak if weight else peak)
        t.memory_s = t.bytes / (weights_bw if weight else bw)
    dot_kind = "int8" if quant else compute_dtype
    dot_times = (w.decoding and rows == 1 and
                 one_row_dot_seconds(c, chip, dot_kind, quant, mesh.tensor))
    if dot_times:  # each weight dot at the time measured for its size: streaming and fixed
        for t in terms:
            t.memory_s = dot_times.get(t.name, t.memory_s)
        notes.append(f"one row: each weight dot takes the measured time of a "
                     f"{'int8 kernel' if quant else 'XLA'} dot of its size (fixed cost and "
                     f"streaming together)")
    if w.kind == "decode" and chip.decode_attention_flops:
        # XLA:CPU transposes each layer's whole cache into a copy for the attention's dots
        attention_term = next(t for t in terms if t.name == "attention (KV read)")
        attention_term.compute_s = attention_term.flops / chip.decode_attention_flops
        notes.append(f"attention at the measured {chip.decode_attention_flops / 1e9:.1f} "
                     f"GFLOP/s of one-token attention over a dense cache (its transposes)")
    if w.kind == "engine":
        attention_term = next(t for t in terms if t.name == "attention (KV read)")
        flops, seconds = paged_attention_seconds(c, w, chip, heads_dev)
        if seconds:
            attention_term.flops, attention_term.compute_s = flops, seconds
            notes.append(f"paged attention: the online kernel's {flops / 1e9:.2f} GFLOP (padded "
                         f"rows, {ONLINE_STEP_TOKENS}-key steps) at its measured "
                         f"{flops / seconds / 1e9:.1f} GFLOP/s (gathering blocks, small dots)")
    if weights_bw != bw and not dot_times:
        notes.append(f"decode weights stream at the measured {'int8 kernel' if quant else 'XLA'}"
                     f" mat-vec {weights_bw / 1e9:.1f} GB/s (the cores can read "
                     f"{bw / 1e9:.1f} GB/s)")
    if weights_peak != peak:
        notes.append(f"{rows} rows: the weight matmuls compute at the measured "
                     f"{weights_peak / 1e9:.0f} GFLOP/s of a dot chain with that many rows "
                     f"(large-matmul peak {peak / 1e9:.0f})")
    if chip.op_overhead_s or chip.call_overhead_s:
        per_layer = DECODE_OPS_PER_LAYER if w.decoding else OPS_PER_LAYER
        launches = passes * (c.n_layers * per_layer + OPS_OUTSIDE_LAYERS)
        if dot_times:  # the dots' launches are in their measured times
            launches -= c.n_layers * WEIGHT_DOTS_PER_LAYER + 1
        dispatch = Term("dispatch", 0.0, 0.0)
        dispatch.overhead_s = launches * chip.op_overhead_s + chip.call_overhead_s
        notes.append(f"dispatch: {launches} ops x {chip.op_overhead_s * 1e6:.2f} us + "
                     f"{chip.call_overhead_s * 1e6:.0f} us per call (measured)")
        per_dot = ((chip.int8_matvec_dot_s if quant else chip.matvec_dot_s)
                   if w.decoding and not dot_times else 0)
        if per_dot:  # the weight dots' own fixed cost, beyond streaming (their fork/join)
            dots = passes * (c.n_layers * WEIGHT_DOTS_PER_LAYER + 1)
            dispatch.overhead_s += dots * per_dot
            notes.append(f"dispatch: + {dots} weight dots x {per_dot * 1e6:.1f} us each "
                         f"({'int8 kernel' if quant else 'XLA'}, measured)")
        terms.append(dispatch)

    # Collectives, per device.
    axis_bw = chip.axis_bandwidth
    coll = []
    if mesh.fsdp > 1:
        gathers = 2 if train else 1  # forward, and again for the backward pass
        coll.append(Collective(f"all-gather weights x{gathers}", "fsdp", gathers * p_all * cb
                               / mesh.tensor, gathers * _ring_seconds(
                                   p_all * cb / mesh.tensor, mesh.fsdp, axis_bw)))
        if train:
            coll.append(Collective("reduce-scatter grads", "fsdp", p_all * 4 / mesh.tensor,
                                   _ring_seconds(p_all * 4 / mesh.tensor, mesh.fsdp, axis_bw)))
    if mesh.data > 1 and train:
        coll.append(grad_all_reduce(p_all * 4 / shard, mesh.data, axis_bw))
    if mesh.tensor > 1:  # Megatron: an all-gather and a reduce-scatter per block and pass
        per = tokens_dev * c.dim * cb
        count = 4 * c.n_layers * passes
        coll.append(Collective(f"tensor-parallel AG/RS x{count}", "tensor", count * per,
                               count * _ring_seconds(per, mesh.tensor, axis_bw)))

    # Memory per device.
    memory = {"params": p_all * (pb if train else cb) / shard}
    if quant:  # quantized matrices (an untied embedding too), float norms
        memory["params"] = (stored["layers"] + stored["output"] * (1 + (not c.tie_embeddings))
                            + c.n_layers * 2 * c.dim * cb) / shard
    if train:
        memory["optimizer"] = 2 * p_all * pb / shard
        memory["grads"] = p_all * 4 / shard
        per_token_layer = {"none": 6 * c.dim + 2 * qd + 2 * kvd + 3 * c.hidden_dim,
                           "dots": 2 * c.dim + qd + 2 * kvd + 2 * c.hidden_dim,
                           "full": c.dim}[remat]
        acts = tokens_dev * c.n_layers * per_token_layer * cb / mesh.tensor
        if mesh.tensor > 1 and remat != "full":  # the two gathered (whole) block inputs per
            # layer that column-parallel matmuls read are kept for their weight gradients
            acts += tokens_dev * c.n_layers * 2 * c.dim * cb * (1 - 1 / mesh.tensor)
        if remat == "full":  # one layer's activations live during its recomputation
            acts += tokens_dev * (6 * c.dim + 2 * qd + 2 * kvd + 3 * c.hidden_dim) * cb
        if dense and remat != "full":
            acts += 2 * batch_dev * c.n_layers * heads_dev * w.seq_len ** 2 * 4
        acts += 2 * tokens_dev * c.vocab_size * 4 / mesh.tensor  # logits and their gradient
        memory["activations"] = acts
    else:
        length = w.context if w.decoding else w.seq_len
        memory["kv_cache"] = 2 * c.n_layers * batch_dev * length * kvd * cb / mesh.tensor
        memory["activations"] = tokens_dev * (c.dim * 4 + c.vocab_size * 4)
    if mesh.fsdp > 1:  # ZeRO-3's working set: one layer's weights (or the embedding table)
        # gathered whole before use and, training, its float32 gradient before the scatter
        largest = max((p_all - c.vocab_size * c.dim) / c.n_layers, c.vocab_size * c.dim)
        memory["gathered weights"] = largest * (cb + (4 if train else 0)) / mesh.tensor
    memory["total"] = sum(memory.values())
    memory["capacity"] = chip.hbm_bytes
    if chip.hbm_bytes and memory["total"] > chip.hbm_bytes:
        notes.append(f"does not fit: {memory['total'] / 2**30:.1f} GiB per device > "
                     f"{chip.hbm_bytes / 2**30:.1f} GiB")
    if n_dev > 1 and not axis_bw:
        notes.append("no interconnect bandwidth known for this chip: collectives not timed")
    if w.kind == "train":
        useful = train_flops_per_token(c, w.seq_len) * tokens_dev
    elif w.kind == "prefill":
        useful = forward_flops_per_token(c, w.seq_len) * tokens_dev
    else:
        useful = (2 * p_mm + 4 * c.n_layers * c.n_heads * hd * w.context) * tokens_dev
    return Prediction(model_name, w, mesh, chip.name, peak, bw, terms, coll, memory, notes,
                      useful / mesh.tensor)


# ------------------------------------------------------------- the fused CPU decoder
# generate() and the engine run a CPU decode step as one FFI call (kernels/cpu_decoder.py):
# per layer a few phases, each streaming one fused weight matrix with every thread and ending
# in a barrier. Every term's rate is the kernel's own, timed on it (hardware.measure_decoder).
KERNEL_FORMATS = {"": "float32", "int8": "int8"}  # --quant -> the kernel's weight format
ENGINE_MIN_TOKENS = 8  # the engine pads a step's tokens to a power of two from 8


def kernel_rows(workload: Workload) -> tuple[int, int]:
    """(tokens, logits rows) of the kernel's step: decode runs its batch as is; the engine
    pads tokens to a power of two from ENGINE_MIN_TOKENS and logits rows to a power of two."""
    if workload.kind != "engine":
        return workload.batch, workload.batch
    pow2 = 1 << max(0, workload.batch - 1).bit_length()
    return max(pow2, ENGINE_MIN_TOKENS), pow2


def kernel_prediction(config: ModelConfig, workload: Workload, chip, *, quant: str = "",
                      model_name: str = "model") -> Prediction:
    """The fused CPU decoder kernel's step (decode or engine) from the chip's decoder figures
    (chip.decoder, measured on the kernel): the weights of every phase at the kernel's
    streaming rate for their format, or at its FLOP/s for the step's token count where that
    is slower; attention FLOPs at its attention rate at that many tokens; each layer's fixed
    cost (its phases' barriers) and the call's. The memory's bandwidth only for the
    elementwise traffic. ValueError where the kernel does not run it or nothing was measured."""
    c, w = config, workload
    figures = chip.decoder or {}
    if not w.decoding:
        raise ValueError("the fused decoder kernel runs decode and engine steps")
    if quant not in KERNEL_FORMATS:
        raise ValueError(f"the fused decoder kernel has no {quant!r} weights")
    fmt = KERNEL_FORMATS[quant]
    if fmt not in figures.get("stream_bandwidth", {}):
        raise ValueError(f"no measured decoder-kernel figures for {fmt} weights on "
                         f"{chip.name} (`hpllm hw --refresh`)")
    tokens, rows = kernel_rows(w)
    stored = matmul_weight_bytes(c, "float32", quant)
    stream = figures["stream_bandwidth"][fmt]
    bw, notes = chip.hbm_bandwidth, []

    def rate(table: dict, m: int) -> float:  # at the fewest measured rows >= m, else largest
        if not table:
            raise ValueError(f"no measured decoder-kernel figures for {fmt} weights on "
                             f"{chip.name} (`hpllm hw --decoder`)")
        return _rate_at_rows(table, m) or table[max(table, key=int)]

    hd, kvd = c.head_dim, c.n_kv_heads * c.head_dim
    layer_flops = 2 * tokens * (matmul_params(c) - c.dim * c.vocab_size)
    head_flops = 2 * rows * c.dim * c.vocab_size
    weights = Term("weight matmuls", layer_flops, stored["layers"])
    head = Term("output projection", head_flops, stored["output"])
    for t, m in ((weights, tokens), (head, rows)):
        t.memory_s = t.bytes / stream
        t.compute_s = t.flops / rate(figures["matmul_flops"][fmt], m)
    attention_flops = 4 * w.batch * c.n_layers * c.n_heads * hd * w.context
    kv_bytes = 2 * w.batch * c.n_layers * w.context * kvd * 4
    attn = Term("attention (KV read)", attention_flops, kv_bytes)
    attn.compute_s = attention_flops / rate(figures["attention_flops"], tokens)
    attn.memory_s = kv_bytes / bw
    ew_elems = c.n_layers * (6 * c.dim + 2 * (c.n_heads * hd + kvd) + 3 * c.hidden_dim)
    elementwise = Term("elementwise", 8 * tokens * ew_elems, 2 * tokens * ew_elems * 4)
    elementwise.memory_s = elementwise.bytes / bw
    layers = Term("layer phases", 0.0, 0.0)
    layers.overhead_s = c.n_layers * rate(figures["layer_s"], tokens)
    call = Term("call", 0.0, 0.0)
    call.overhead_s = rate(figures["call_s"], tokens)
    terms = [weights, head, attn, elementwise, layers, call]
    notes.append(f"fused CPU decoder kernel, {fmt} weights, {tokens} tokens ({rows} logits "
                 f"rows): weights stream at its measured {stream / 1e9:.1f} GB/s, compute at "
                 f"{rate(figures['matmul_flops'][fmt], tokens) / 1e9:.0f} GFLOP/s at {tokens} "
                 f"tokens; attention at {rate(figures['attention_flops'], tokens) / 1e9:.1f} "
                 f"GFLOP/s; {layers.overhead_s / c.n_layers * 1e6:.1f} us per layer of phase "
                 f"barriers, {call.overhead_s * 1e6:.0f} us per call (hpllm hw, measured "
                 f"on the kernel)")
    memory = {"params": stored["layers"] + stored["output"] + c.n_layers * 2 * c.dim * 4,
              "kv_cache": kv_bytes,
              "activations": tokens * (c.dim * 4) + rows * c.vocab_size * 4}
    memory["total"] = sum(memory.values())
    memory["capacity"] = chip.hbm_bytes
    useful = (2 * matmul_params(c) + 4 * c.n_layers * c.n_heads * hd * w.context) * w.batch
    peak = chip.peak("float32")
    return Prediction(model_name, w, MeshShape(), chip.name, peak, bw, terms, [], memory,
                      notes, useful)


# ------------------------------------------------------------- the CPU bf16 training step
# On CPU with bf16 compute the training step is hpllm's FFI kernel calls (the projections'
# forward and both gradients, attention, SwiGLU, RMSNorm, RoPE, the loss) and XLA's loop
# fusions between them. Its terms: each call at the seconds it takes alone at its own shape
# (hardware.train_figures, measured on the kernel), the fusions' bytes at the rate XLA:CPU's
# fusions of those kinds run (measured by a probe), and every executed op's launch.
_TRAIN_KERNEL_TERMS = (("attention", "attention"), ("matmul", "weight matmuls"),
                       ("nll", "loss (softmax x-ent)"), ("", "elementwise kernels"))


def _train_term(call: dict, vocab: int) -> str:
    """The term a kernel call of the training step belongs to."""
    if "matmul" in call["target"]:
        dims = [d for _, shape in call["operands"] + call["results"] for d in shape]
        return "output projection" if vocab in dims else "weight matmuls"
    return next(name for part, name in _TRAIN_KERNEL_TERMS if part in call["target"])


def train_kernel_prediction(config: ModelConfig, workload: Workload, chip, program: dict,
                            figures: dict, *, remat: str = "none",
                            model_name: str = "model") -> Prediction:
    """A CPU bf16 training step from its compiled program (`program`: "calls", every kernel
    call it executes as {"target", "operands", "results", "attrs", "flops", "bytes", "key"};
    "xla_bytes" and "xla_ops", what XLA's own executed ops move and how many there are) and
    the measured figures (`figures`: "calls" {key: seconds}, "fusion_bandwidth" bytes/s):
    each call at its measured seconds, the fusions' bytes at the fusion rate, every op's
    launch at chip.op_overhead_s plus one call's chip.call_overhead_s. ValueError where a
    call was not measured."""
    c, w = config, workload
    if w.kind != "train":
        raise ValueError("train_kernel_prediction predicts training steps")
    base = predict(c, w, chip, remat=remat, model_name=model_name)  # memory per device, peak
    terms = {name: Term(name, 0.0, 0.0) for name in
             ("weight matmuls", "output projection", "attention", "elementwise kernels",
              "loss (softmax x-ent)")}
    for call in program["calls"]:
        if call["key"] not in figures.get("calls", {}):
            raise ValueError(f"no measured time for the kernel call {call['key']}")
        t = terms[_train_term(call, c.vocab_size)]
        t.flops += call["flops"]
        t.bytes += call["bytes"]
        t.compute_s += figures["calls"][call["key"]]
    for t in terms.values():
        t.memory_s = t.bytes / chip.hbm_bandwidth
    fusions = Term("XLA fusions", 0.0, program["xla_bytes"])
    fusions.memory_s = program["xla_bytes"] / figures["fusion_bandwidth"]
    dispatch = Term("dispatch", 0.0, 0.0)
    ops = program["xla_ops"] + len(program["calls"])
    dispatch.overhead_s = ops * chip.op_overhead_s + chip.call_overhead_s
    out = [t for t in terms.values() if t.flops or t.bytes] + [fusions, dispatch]
    notes = [f"CPU bf16 step: {len(program['calls'])} kernel calls, each at its measured time "
             f"alone at its own shape (hpllm's FFI kernels); XLA's {program['xla_ops']} other "
             f"ops move {program['xla_bytes'] / 1e6:.0f} MB at the measured "
             f"{figures['fusion_bandwidth'] / 1e9:.1f} GB/s of its loop fusions; {ops} ops x "
             f"{chip.op_overhead_s * 1e6:.2f} us + {chip.call_overhead_s * 1e6:.0f} us per "
             f"call (figures at load {figures.get('load_average', [0.0])[0]:.2f})"]
    return Prediction(model_name, w, MeshShape(), chip.name, base.peak_flops, base.bandwidth,
                      out, [], base.memory, notes, base.model_flops)


def batched_rate(chip, kind: str, rows: int) -> float:
    """The measured FLOP/s of a dot chain (chip.batched_flops[kind], "float32" or "int8")
    at the fewest measured rows >= `rows` (the engine pads rows up to a power of two);
    0 where none was measured or `rows` is beyond them (then the large-matmul peak holds)."""
    return _rate_at_rows((chip.batched_flops or {}).get(kind, {}), rows)


def _rate_at_rows(rates: dict, rows: int) -> float:
    measured = {int(m): r for m, r in rates.items()}
    above = [m for m in measured if m >= rows]
    return measured[min(above)] if above else 0.0


def matvec_seconds(chip, kind: str, nbytes: float) -> float:
    """Seconds of one one-row weight dot of `nbytes` from the chip's measured table
    (chip.matvec_seconds[kind]: [[bytes, seconds], ...]): linear between the measured sizes,
    the smallest's time below them, and beyond the largest at the largest's bytes/s (big
    matrices just stream). 0 without a table."""
    table = sorted((chip.matvec_seconds or {}).get(kind) or [])
    if not table:
        return 0.0
    if nbytes >= table[-1][0]:
        return table[-1][1] * nbytes / table[-1][0]
    if nbytes <= table[0][0]:
        return table[0][1]
    for (b0, s0), (b1, s1) in zip(table, table[1:]):
        if nbytes <= b1:
            return s0 + (s1 - s0) * (nbytes - b0) / (b1 - b0)


def one_row_dot_seconds(config: ModelConfig, chip, kind: str, quant: str = "",
                        tensor: int = 1) -> dict:
    """{"weight matmuls": seconds, "output projection": seconds} of one token's weight dots,
    each of the model's matrices (N, K) at the time measured for its bytes (matvec_seconds;
    `quant`: codes plus QUANT_ROW_BYTES per row, as matmul_weight_bytes counts them). {}
    without a table for `kind`, or for mixture-of-experts layers (not in it)."""
    if not (chip.matvec_seconds or {}).get(kind) or config.n_experts:
        return {}
    row, item = QUANT_ROW_BYTES.get(quant, 0), 1 if quant else _BYTES[kind]

    def dot(n, k):
        return matvec_seconds(chip, kind, (n * k * item + n * row) / tensor)

    return {"weight matmuls": config.n_layers * sum(dot(n, k) for n, k in layer_matrices(config)),
            "output projection": dot(config.vocab_size, config.dim)}


def paged_attention_seconds(config: ModelConfig, workload: Workload, chip,
                            heads: float) -> tuple[float, float]:
    """(FLOPs, seconds) of the paged engine step's attention at the measured rate of its
    online kernel (chip.paged_attention_flops, at the fewest measured rows >= the step's).
    The kernel computes every row the engine pads to (a power of two) over whole steps of
    ONLINE_STEP_TOKENS keys, whatever the context. (0, 0) where no rate was measured."""
    rows = 1 << max(0, math.ceil(workload.batch) - 1).bit_length()
    rate = _rate_at_rows(chip.paged_attention_flops or {}, rows)
    keys = -(-workload.context // ONLINE_STEP_TOKENS) * ONLINE_STEP_TOKENS
    flops = 4 * rows * config.n_layers * heads * config.head_dim * keys
    return (flops, flops / rate) if rate else (0.0, 0.0)


def plot(predictions: list, path, measured: list | None = None) -> None:
    """A roofline chart (FLOP/s vs arithmetic intensity, log-log) with each workload's
    predicted point, and its measured point when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = predictions[0]
    peak, bw = first.peak_flops, first.bandwidth
    xs = [10 ** (i / 20) for i in range(-40, 101)]
    ax.plot(xs, [min(peak, x * bw) for x in xs], "k-", lw=1.5,
            label=f"{first.chip}: {peak / 1e12:.2f} TFLOP/s, {bw / 1e9:.0f} GB/s")
    for i, p in enumerate(predictions):
        ai = p.intensity
        ax.plot(ai, p.flops / p.step_s, "o", ms=8, label=f"{p.workload.describe()} (predicted)")
        if measured and measured[i]:
            ax.plot(ai, p.flops / measured[i], "x", ms=9, mew=2, color=ax.lines[-1].get_color(),
                    label="  measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s per device")
    ax.set_title(f"roofline: {first.model}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
