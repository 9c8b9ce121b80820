"""FLOP counting for the model, the numerator of MFU and of every roofline prediction."""

from __future__ import annotations

import dataclasses

from hpllm.config import ModelConfig


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
# the terms run one after another. Collectives overlap the compute (XLA schedules them
# asynchronously), so the step takes max(sum of terms, communication). All figures are per
# device for one step.

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


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
    kind: str  # "train" (one optimizer step), "prefill" (batch x seq_len tokens), "decode"
    batch: int
    seq_len: int = 0  # tokens per sequence (train, prefill)
    context: int = 0  # KV-cache length each decode token attends over (decode)

    def __post_init__(self):
        if self.kind not in ("train", "prefill", "decode"):
            raise ValueError(f"workload must be train, prefill or decode, got {self.kind!r}")
        if self.batch < 1 or (self.kind != "decode" and self.seq_len < 1) or (
                self.kind == "decode" and self.context < 1):
            raise ValueError(f"{self.kind} needs batch >= 1 and "
                             f"{'context' if self.kind == 'decode' else 'seq_len'} >= 1")

    @property
    def tokens(self) -> int:
        return self.batch * (1 if self.kind == "decode" else self.seq_len)

    def describe(self) -> str:
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

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
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
    def memory_s(self) -> float:
        return self.bytes / self.bandwidth

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
        by_kind = {"compute": 0.0, "memory": 0.0}
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
                         f"{t.memory_s * 1e3:>11.3f}  {t.bound}")
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


def predict(model: ModelConfig, workload: Workload, chip, mesh: MeshShape = MeshShape(), *,
            param_dtype: str = "float32", compute_dtype: str = "bfloat16", remat: str = "none",
            attention: str = "reference", model_name: str = "model") -> Prediction:
    """The roofline prediction of one step of `workload` on `mesh` devices of `chip`."""
    c, w = model, workload
    cb, pb = _BYTES[compute_dtype], _BYTES[param_dtype]
    peak, bw = chip.peak(compute_dtype), chip.hbm_bandwidth
    n_dev, shard = mesh.devices, mesh.fsdp * mesh.tensor
    batch_dev = w.batch / (mesh.data * mesh.fsdp)  # sequences per device (tensor splits heads)
    tokens_dev = batch_dev * (1 if w.kind == "decode" else w.seq_len)
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
                  passes * ((p_held - c.dim * c.vocab_size) * cb / mesh.tensor
                            + tokens_dev * act_per_token * cb / mesh.tensor)),
             Term("output projection", passes * 2 * c.dim * c.vocab_size * tokens_dev
                  / mesh.tensor,
                  passes * (c.dim * c.vocab_size * cb / mesh.tensor
                            + tokens_dev * (c.dim * cb + c.vocab_size * 4 / mesh.tensor)))]

    # Attention core (QK^T, softmax, PV).
    heads_dev = c.n_heads / mesh.tensor
    if w.kind == "decode":
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
        # AdamW reads params, grads, m, v and writes params, m, v (all param_dtype).
        terms.append(Term("optimizer (AdamW)", 12 * p_all / shard, 7 * p_all * pb / shard))
    for t in terms:
        t.compute_s, t.memory_s = t.flops / peak, t.bytes / bw

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
        grad_bytes = p_all * 4 / shard
        coll.append(Collective("all-reduce grads", "data", 2 * grad_bytes,
                               2 * _ring_seconds(grad_bytes, mesh.data, axis_bw)))
    if mesh.tensor > 1:  # Megatron: an all-gather and a reduce-scatter per block and pass
        per = tokens_dev * c.dim * cb
        count = 4 * c.n_layers * passes
        coll.append(Collective(f"tensor-parallel AG/RS x{count}", "tensor", count * per,
                               count * _ring_seconds(per, mesh.tensor, axis_bw)))

    # Memory per device.
    memory = {"params": p_all * (pb if train else cb) / shard}
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
        length = w.context if w.kind == "decode" else w.seq_len
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
