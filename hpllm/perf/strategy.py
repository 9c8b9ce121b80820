"""The training step of one parallel strategy: the roofline's step plus the three terms a
data/FSDP/tensor napkin lacks, namely the pipeline bubble, the stage-to-stage activation
transfers and mixture-of-experts' dispatch and combine all-to-alls.

The roofline (hpllm/perf/roofline.py) prices one device's share of the work and the
collectives of data, FSDP and tensor parallelism, which overlap the compute. Here:

- a pipeline stage holds L/P of the layers and 1/P of the embedding's vocab rows, so the
  base step is the roofline's for a model of L/P layers, its optimizer update on 1/P of
  the parameters. GPipe runs the output projection and loss outside the pipeline,
  vocab-parallel over the stages (1/P each); 1F1B runs them on the last stage inside the
  pipeline, whole, for each microbatch, and every unit of the schedule waits for that stage.
- each stage idles a fraction f of the schedule's steps ((P-1)/(M+P-1) for both), so the
  pipelined work (GPipe: the layers; 1F1B: the layers and the head) takes work / (1 - f):
  the bubble adds work x f / (1 - f) = work x (P-1)/M.
- stage p sends one microbatch's activations (rows/M, seq/tensor, dim) to stage p+1 at every
  step of the schedule, idle or not: GPipe's forward scan M+P-1 times and its transpose as
  many times back; 1F1B both ways (activations up, gradients down) in each of its 2(M+P-1)
  units. A send waits for the stage's compute and the next compute waits for it, so the
  transfers add to the step instead of overlapping it. All-reduces over the stage axis
  bring the results to every stage: GPipe's outputs and input gradients, 1F1B's input
  gradients and head-weight gradients (after gathering the head's weights).
- expert parallelism sends each device's (rows, E, C, D) expert buffer to the experts'
  owners and the results back: two all-to-alls per layer forward, two more backward (and two
  more when remat recomputes the forward). Each device keeps 1/n of its buffer and sends
  the rest; the layer waits for it, so it adds to the step too.

On simulated CPU devices a "link" is the machine's memory: a transfer of n bytes is a copy
(read n, write n) at the measured copy bandwidth (hpllm/perf/hardware.py).
"""

from __future__ import annotations

import dataclasses

from hpllm.config import ModelConfig
from hpllm.model.moe import capacity
from hpllm.parallel.pipeline import SCHEDULES, bubble_fraction
from hpllm.perf import roofline
from hpllm.perf.hardware import cpu_figures

# The roofline's terms for the decoder layers and for the head (output projection, loss).
_LAYER_TERMS = ("weight matmuls", "attention", "elementwise")
_HEAD_TERMS = ("output projection", "loss (softmax x-ent)")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Devices along each mesh axis, and the pipeline's microbatches and schedule."""
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    stage: int = 1
    expert: int = 1
    microbatches: int = 1
    schedule: str = "gpipe"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.schedule!r}")
        if min(self.data, self.fsdp, self.tensor, self.stage, self.expert,
               self.microbatches) < 1:
            raise ValueError(f"every mesh axis and microbatches must be >= 1, got {self}")

    @classmethod
    def from_mesh(cls, shape: dict, microbatches: int = 1, schedule: str = "gpipe"):
        """From a mesh's axis sizes ({"data": 2, "stage": 4, ...}; absent axes are 1)."""
        return cls(**{a: int(shape.get(a, 1)) for a in ("data", "fsdp", "tensor", "stage",
                                                        "expert")},
                   microbatches=microbatches if shape.get("stage", 1) > 1 else 1,
                   schedule=schedule)

    @property
    def row_shards(self) -> int:  # the batch's rows are split over data, fsdp and expert
        return self.data * self.fsdp * self.expert


@dataclasses.dataclass
class Traffic:
    """One kind of transfer a device makes per step: `count` messages of `bytes_each`."""
    name: str
    bytes_each: float
    count: int
    bandwidth: float  # bytes/s a message moves at

    @property
    def bytes(self) -> float:
        return self.bytes_each * self.count

    @property
    def seconds(self) -> float:
        return self.bytes / self.bandwidth if self.bandwidth else float("inf")


@dataclasses.dataclass
class StepPrediction:
    strategy: Strategy
    base: roofline.Prediction  # the roofline's step for one stage's share of the work
    layers_s: float  # the pipelined terms' seconds (all microbatches, no idling)
    bubble: float  # idle fraction of the schedule
    traffic: list  # Traffic: stage transfers and all-to-alls, on the critical path
    param_opt_bytes: float  # parameters + AdamW moments per device

    @property
    def bubble_s(self) -> float:
        return self.layers_s * self.bubble / (1 - self.bubble)

    def seconds_of(self, prefix: str) -> float:
        return sum(t.seconds for t in self.traffic if t.name.startswith(prefix))

    @property
    def transfer_s(self) -> float:
        return self.seconds_of("stage")

    @property
    def all_to_all_s(self) -> float:
        return self.seconds_of("all-to-all")

    @property
    def local_s(self) -> float:
        return (sum(t.seconds for t in self.base.terms) + self.bubble_s + self.transfer_s
                + self.all_to_all_s)

    @property
    def step_s(self) -> float:  # data/FSDP/tensor collectives overlap, as in the roofline
        return max(self.local_s, self.base.comm_s)

    @property
    def bound(self) -> str:
        """What the step waits on most: the overlapped collectives if they outlast the rest,
        else the largest of the base's kinds and the three added terms."""
        if self.base.comm_s > self.local_s:
            return "communication"
        kinds = {"compute": 0.0, "memory": 0.0, "overhead": 0.0, "bubble": self.bubble_s,
                 "stage transfers": self.transfer_s, "all-to-all": self.all_to_all_s}
        for t in self.base.terms:
            kinds[t.bound] += t.seconds
        return max(kinds, key=kinds.get)

    def to_dict(self) -> dict:
        return {"strategy": dataclasses.asdict(self.strategy),
                "base_ms": 1e3 * sum(t.seconds for t in self.base.terms),
                "collectives_ms": 1e3 * self.base.comm_s, "layers_ms": 1e3 * self.layers_s,
                "bubble_fraction": self.bubble, "bubble_ms": 1e3 * self.bubble_s,
                "transfer_ms": 1e3 * self.transfer_s, "all_to_all_ms": 1e3 * self.all_to_all_s,
                "total_ms": 1e3 * self.step_s, "bound": self.bound,
                "traffic": [dict(dataclasses.asdict(t), bytes=t.bytes, seconds=t.seconds)
                            for t in self.traffic],
                "param_opt_bytes_per_device": self.param_opt_bytes}


def stage_transfers(model: ModelConfig, workload: roofline.Workload, s: Strategy,
                    compute_dtype: str, bandwidth: float, param_dtype: str = "float32"
                    ) -> list:
    """The pipeline's transfers per device per step (see the module's docstring): sends of
    one microbatch's activations or gradients (rows/M, seq/tensor, dim) at every step of the
    schedule, and ring all-reduces over the stage axis (2(P-1)/P of the array each)."""
    if s.stage <= 1:
        return []
    c, p, m = model, s.stage, s.microbatches
    cb = roofline._BYTES[compute_dtype]
    act = workload.batch / s.row_shards * workload.seq_len * c.dim * cb / s.tensor
    ring = 2 * (p - 1) / p  # of the array, per device, in a ring all-reduce
    if s.schedule == "gpipe":
        return [Traffic("stage send", act / m, 2 * (m + p - 1), bandwidth),
                Traffic("stage all-reduce (outputs, input grads)", ring * act, 2, bandwidth)]
    head = (c.vocab_size * c.dim * (1 + (not c.tie_embeddings)) + c.dim) \
        * roofline._BYTES[param_dtype] / s.tensor
    return [Traffic("stage send", act / m, 4 * (m + p - 1), bandwidth),
            Traffic("stage all-reduce (input grads)", ring * act, 1, bandwidth),
            Traffic("stage head gather + grad all-reduce", (ring + (p - 1) / p) * head, 1,
                    bandwidth)]


def moe_all_to_alls(model: ModelConfig, workload: roofline.Workload, s: Strategy,
                    compute_dtype: str, bandwidth: float, remat: str = "none") -> list:
    """Expert parallelism's all-to-alls per device per step: each layer sends the (rows, E, C,
    dim) buffer of this device's rows (C = capacity slots per expert and sequence) less the
    1/n it keeps, to dispatch and again to combine; forward, backward, and the forward's
    recomputation under remat. In a pipeline stage its layers do so for one microbatch's
    rows at each of GPipe's M+P-1 steps (the idle ones too: the scan runs them all)."""
    c = model
    if not c.n_experts or s.expert <= 1:
        return []
    cb = roofline._BYTES[compute_dtype]
    slots = capacity(workload.seq_len, c.n_experts, c.experts_per_token, c.capacity_factor)
    rows = workload.batch / s.row_shards / s.microbatches
    sent = (s.expert - 1) / s.expert * rows * c.n_experts * slots * c.dim * cb
    passes = 2 + (remat != "none")  # forward, backward (its transpose), recomputed forward
    count = passes * c.n_layers // s.stage * (s.microbatches + s.stage - 1)
    return [Traffic("all-to-all dispatch", sent, count, bandwidth),
            Traffic("all-to-all combine", sent, count, bandwidth)]


def param_opt_bytes(model: ModelConfig, s: Strategy, param_dtype: str = "float32") -> float:
    """Parameters plus AdamW's two moments held per device, as the sharding rules split them:
    the layers and the vocab rows over `stage`, experts over `expert`, heads, KV heads, the
    MLP's hidden units and the vocab over `tensor` where it divides them (else they stay
    whole), the model dimension over `fsdp`."""
    c, t = model, s.tensor
    over_tensor = lambda units: t if units % t == 0 else 1  # noqa: E731
    attn = c.dim * c.head_dim * (2 * c.n_heads / over_tensor(c.n_heads)
                                 + 2 * c.n_kv_heads / over_tensor(c.n_kv_heads))
    mlp = 3 * c.dim * c.hidden_dim / over_tensor(c.hidden_dim)
    if c.n_experts:  # the router stays whole; the experts split over `expert`
        mlp = c.dim * c.n_experts + mlp * c.n_experts / s.expert
    layers = c.n_layers * (attn + mlp + 2 * c.dim) / s.stage
    vocab = c.vocab_size * c.dim * (1 + (not c.tie_embeddings)) / (t * s.stage)
    return 3 * (layers + vocab + c.dim) / s.fsdp * roofline._BYTES[param_dtype]


def link_bandwidth(chip) -> float:
    """Bytes/s one device-to-device message moves at: a measured CPU's memory copy (each
    byte read and written; the probe counts both), else one interconnect link."""
    if chip.measured:
        return cpu_figures()["copy_bandwidth"] / 2
    return chip.link_bandwidth


def predict_step(model: ModelConfig, workload: roofline.Workload, chip, s: Strategy, *,
                 bandwidth: float | None = None, param_dtype: str = "float32",
                 compute_dtype: str = "bfloat16", remat: str = "none",
                 attention: str = "reference", model_name: str = "model") -> StepPrediction:
    """One training step of `workload` under strategy `s`; `bandwidth` for the stage sends
    and all-to-alls (default: link_bandwidth(chip))."""
    if workload.kind != "train":
        raise ValueError(f"predict_step prices a training step, not {workload.kind!r}")
    if model.n_layers % s.stage:
        raise ValueError(f"n_layers ({model.n_layers}) is not divisible into {s.stage} stages")
    if workload.batch % s.row_shards or workload.batch % s.microbatches:
        raise ValueError(f"batch {workload.batch} does not split into {s.row_shards} row "
                         f"shards and into {s.microbatches} microbatches")
    bw = link_bandwidth(chip) if bandwidth is None else bandwidth
    stage_model = dataclasses.replace(model, n_layers=model.n_layers // s.stage)
    # expert devices are data-parallel outside the experts (the rows split over them too)
    base = roofline.predict(stage_model, workload, chip,
                            roofline.MeshShape(data=s.data * s.expert, fsdp=s.fsdp,
                                               tensor=s.tensor),
                            param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat,
                            attention=attention, model_name=model_name)
    held = param_opt_bytes(model, s, param_dtype)
    params = held / 3 / roofline._BYTES[param_dtype]  # this device's parameters
    base.terms = [_stage_share(t, s, params, param_dtype) for t in base.terms]
    # the gradients this device holds, not the L/P model's
    base.collectives = [roofline.grad_all_reduce(params * 4, s.data * s.expert,
                                                 chip.axis_bandwidth)
                        if coll.name == "all-reduce grads" else coll
                        for coll in base.collectives]
    pipelined = _LAYER_TERMS + (_HEAD_TERMS if s.stage > 1 and s.schedule == "1f1b" else ())
    layers_s = sum(t.seconds for t in base.terms if t.name in pipelined)
    traffic = (stage_transfers(model, workload, s, compute_dtype, bw, param_dtype)
               + moe_all_to_alls(model, workload, s, compute_dtype, bw, remat))
    # (P-1)/(M+P-1): 0 without a pipeline
    return StepPrediction(s, base, layers_s, bubble_fraction(s.stage, s.microbatches,
                                                             s.schedule), traffic, held)


def _stage_share(term: roofline.Term, s: Strategy, params: float, param_dtype: str):
    """A roofline term of the L/P-layer model as this device runs it: AdamW updates its
    `params` (vocab rows split over stages, experts over `expert`); GPipe's head is
    vocab-parallel over the stages."""
    if term.name == "optimizer (AdamW)":
        mine = roofline.optimizer_term(params, roofline._BYTES[param_dtype])
        return dataclasses.replace(term, flops=mine.flops, bytes=mine.bytes,
                                   compute_s=term.compute_s * mine.flops / term.flops,
                                   memory_s=term.memory_s * mine.bytes / term.bytes)
    if term.name in _HEAD_TERMS and s.stage > 1 and s.schedule == "gpipe":
        return dataclasses.replace(term, flops=term.flops / s.stage, bytes=term.bytes / s.stage,
                                   compute_s=term.compute_s / s.stage,
                                   memory_s=term.memory_s / s.stage)
    return term
