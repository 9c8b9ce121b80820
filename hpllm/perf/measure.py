"""Run the workload a roofline prediction describes and time it: the "profile" half of
predict-then-measure. Random weights and tokens: timing does not depend on their values.

Decode and engine steps run on the backend hpllm itself would choose (`step_backend`):
on CPU, where it supports the model, the fused decoder kernel that generate() and the
engine run (hpllm/kernels/cpu_decoder.py), else XLA's program; `backend` forces one."""

from __future__ import annotations

import dataclasses
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.compress.quantize import quantize_params
from hpllm.config import Config, ConfigError, apply_overrides
from hpllm.infer.generate import KERNEL_BLOCK_SIZE, kernel_unsupported
from hpllm.infer.paged_model import PagedModel
from hpllm.infer.ragged import SMALLEST_TOKEN_BUCKET, FlatBatch
from hpllm.infer.sampling import pow2_bucket
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import count_params, forward, init_params, unstack_layers
from hpllm.perf import roofline, sizing
from hpllm.perf.hardware import call_key, decoder_figures, time_calls, train_figures
from hpllm.perf.hlo import parse_module, shapes
from hpllm.perf.profile import _FREE, parse_hlo, profile
from hpllm.perf.roofline import Workload
from hpllm.train.data import random_batch
from hpllm.train.state import init_state
from hpllm.train.step import jit_train_step, kernels_routed


def _median_seconds(run, repeats: int) -> float:
    return float(np.median(time_calls(run, repeats)))


BACKENDS = ("auto", "kernel", "xla")


def _abstract_params(model, dtype, quant: str):
    """The parameter tree's shapes and dtypes (nothing allocated), quantized by `quant`."""
    return jax.eval_shape(lambda key: (quantize_params(init_params(model, key, dtype), quant)
                                       if quant else init_params(model, key, dtype)),
                          jax.random.key(0))


def step_backend(config: Config, workload: Workload, quant: str = "",
                 requested: str = "auto") -> str:
    """"kernel" or "xla": what a decode or engine step of `workload` runs on, as generate()
    and EngineCore choose it ("auto": the fused CPU decoder kernel wherever it runs the
    model; "kernel" where it cannot is a ConfigError). Training and prefill: "xla"."""
    if requested not in BACKENDS:
        raise ConfigError(f"backend must be {', '.join(BACKENDS)}, got {requested!r}")
    if not workload.decoding or requested == "xla":
        if requested == "kernel":
            raise ConfigError(f"the fused decoder kernel runs decode and engine steps, not "
                              f"{workload.kind}")
        return "xla"
    dtype = jnp.dtype(config.train.compute_dtype)
    reason = kernel_unsupported(_abstract_params(config.model, dtype, quant), config.model,
                                dtype)
    if reason is None and quant not in roofline.KERNEL_FORMATS:
        reason = f"no kernel prediction for {quant} weights"
    if reason is None:
        return "kernel"
    if requested == "kernel":
        raise ConfigError(f"--backend kernel: {reason}")
    return "xla"


def measure_step(config: Config, workload: Workload, repeats: int = 5, quant: str = "",
                 backend: str = "xla") -> float:
    """Median seconds of one step of `workload` on the default device (inference: with the
    matmul weights quantized by `quant`, as `--quant` loads a model; decode and engine steps
    through `backend`, "kernel" (the fused CPU decoder) or "xla")."""
    if workload.kind == "train":
        config = _train_config(config, workload)
        step = jit_train_step(config)
        state = [init_state(config, jax.random.key(0))]
        batch = jax.device_put(random_batch(config))

        def run():
            state[0], metrics = step(state[0], batch)
            return metrics["loss"]

        return _median_seconds(run, repeats)

    dtype = jnp.dtype(config.train.compute_dtype)
    model = config.model
    length = workload.context if workload.decoding else workload.seq_len
    if length > model.max_seq_len and model.pos_embedding == "learned":
        raise ValueError(f"length {length} exceeds max_seq_len {model.max_seq_len}")
    model = dataclasses.replace(model, max_seq_len=max(model.max_seq_len, length))
    params = init_params(model, jax.random.key(0), dtype)
    if quant:
        params = quantize_params(params, quant)
    if backend == "kernel":
        return _kernel_step_seconds(params, model, workload, repeats)
    if workload.kind == "engine":
        return _engine_step_seconds(params, model, workload, dtype, repeats)
    if workload.kind == "decode":
        params = unstack_layers(params)  # as generation runs it
    cache = DenseKVCache.create(model, workload.batch, length, dtype.name)  # KV in compute dtype
    if workload.kind == "prefill":
        tokens = jnp.zeros((workload.batch, workload.seq_len), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(workload.seq_len), tokens.shape)
    else:  # one new token per sequence at the end of a full cache
        tokens = jnp.zeros((workload.batch, 1), jnp.int32)
        positions = jnp.full((workload.batch, 1), length - 1, jnp.int32)
    # The cache is donated and threaded through, as a decode loop does: without donation
    # every step would also copy the whole cache.
    fn = jax.jit(lambda p, t, pos, c: forward(p, t, pos, model, cache=c, dtype=dtype),
                 donate_argnums=3)
    state = [cache]

    def run():
        logits, state[0] = fn(params, tokens, positions, state[0])
        return logits

    return _median_seconds(run, repeats)


def _engine_step_seconds(params, model, workload: Workload, dtype, repeats: int,
                         block_size: int = 16) -> float:
    """Median seconds of the paged engine's decode step (PagedModel.run, the device half of
    EngineCore.step, with the host-to-device copies of its inputs): `batch` sequences of
    `context` tokens, each in its own blocks, one new token each, padded as EngineCore pads
    them (rows to a power of two, block tables to the width of the model's max_seq_len)."""
    pages = -(-workload.context // block_size)
    rows = pow2_bucket(workload.batch)
    width = pow2_bucket(-(-model.max_seq_len // block_size), 4)
    paged = PagedModel(params, model, 1 + workload.batch * pages, block_size, dtype,
                       kv_dtype=dtype.name)
    tables = np.zeros((rows, width), np.int32)  # block 0: the null block
    tables[:workload.batch, :pages] = 1 + np.arange(workload.batch * pages).reshape(-1, pages)
    tokens = np.zeros((rows, 1), np.int32)
    positions = np.full((rows, 1), -1, np.int32)
    positions[:workload.batch] = workload.context - 1
    last = np.zeros(rows, np.int32)
    return _median_seconds(lambda: paged.run(tokens, positions, tables, last), repeats)


def _kernel_step_seconds(params, model, workload: Workload, repeats: int) -> float:
    """Median seconds of the fused decoder kernel's step as hpllm runs it (the engine's
    PagedModel.run_ragged, with its host-to-device copies): `batch` sequences of `context`
    tokens, one new token each. Decode: generate()'s one-sequence pool (blocks of
    KERNEL_BLOCK_SIZE, sized to the context's power-of-two bucket); engine: blocks of 16, the
    table as wide as the model's max_seq_len, tokens padded to a power of two from the
    engine's smallest bucket and logits rows to a power of two."""
    b, context = workload.batch, workload.context
    if workload.kind == "engine":
        block_size, tokens = 16, max(pow2_bucket(b), SMALLEST_TOKEN_BUCKET)
        rows, width = pow2_bucket(b), pow2_bucket(-(-model.max_seq_len // 16), 4)
        own = -(-context // block_size)  # blocks of each sequence
    else:
        block_size, tokens, rows = KERNEL_BLOCK_SIZE, b, b
        own = width = -(-pow2_bucket(context, 256, model.max_seq_len) // block_size)
    paged = PagedModel(params, model, 1 + b * own, block_size, backend="kernel")
    tables = np.zeros((b, width), np.int32)
    tables[:, :own] = 1 + np.arange(b * own).reshape(b, own)
    positions = np.full(tokens, -1, np.int32)
    positions[:b] = context - 1
    seq_index = np.zeros(tokens, np.int32)
    seq_index[:b] = np.arange(b)
    index = np.zeros(rows, np.int32)
    index[:b] = np.arange(b)
    batch = FlatBatch(np.zeros(tokens, np.int32), positions, seq_index, tables, index)
    return _median_seconds(lambda: paged.run_ragged(batch), repeats)


def _train_config(config: Config, workload: Workload) -> Config:
    return apply_overrides(config, {"batch_size": workload.batch, "seq_len": workload.seq_len})


_ATTR = re.compile(r"(\w+) = ([-+0-9.eE]+) : ([if])\d+")


def train_program(config: Config, workload: Workload) -> dict:
    """The compiled training step of `workload` as the kernel prediction reads it: "calls",
    every hpllm FFI kernel call it executes ({"target", "operands", "results" as [(HLO dtype,
    dims)], "attrs", "flops", "bytes", "key"}), and "xla_bytes" / "xla_ops": the bytes XLA's
    other executed ops move (hpllm.perf.profile's count: operands + results) and how many
    launch. Compiled, not run."""
    config = _train_config(config, workload)
    state = jax.eval_shape(lambda k: init_state(config, k), jax.random.key(0))
    batch = jax.eval_shape(lambda: random_batch(config))
    text = jit_train_step(config).lower(state, batch).compile().as_text()
    costs, (_, instrs) = parse_hlo(text), parse_module(text)
    calls, xla_bytes, xla_ops = [], 0.0, 0
    for name, cost in costs.items():
        ins = instrs[name]
        if ins.opcode == "custom-call" and ins.custom_call_target.startswith("hpllm_"):
            config_text = re.search(r"backend_config=\{([^}]*)\}", ins.attrs)
            attrs = {k: (int(v) if t == "i" else float(v)) for k, v, t in
                     _ATTR.findall(config_text.group(1) if config_text else "")}
            call = {"target": ins.custom_call_target, "attrs": attrs,
                    "operands": [shapes(instrs[o].type_text)[0] for o in ins.operands],
                    "results": shapes(ins.type_text), "flops": cost.flops, "bytes": cost.bytes}
            calls.append(dict(call, key=call_key(call)))
        elif cost.opcode not in _FREE:
            xla_bytes += cost.bytes
            xla_ops += 1
    return {"calls": calls, "xla_bytes": xla_bytes, "xla_ops": xla_ops}


def train_kernel_step(config: Config, workload: Workload, chip) -> bool:
    """Whether `workload` is a training step that runs on hpllm's CPU kernels here (a measured
    CPU chip, bf16 compute): then train_kernel_prediction predicts it."""
    return (workload.kind == "train" and chip.measured and jax.default_backend() == "cpu"
            and kernels_routed(config))


def compare(config: Config, workload: Workload, chip, mesh=None, *, measure: bool = False,
            repeats: int = 5, quant: str = "", backend: str = "auto") -> dict:
    """Prediction (and, with `measure`, the measured median beside it) as text and JSON;
    decode and engine steps of the backend step_backend chooses (kernel predictions need
    the chip's measured decoder figures: other chips, or none measured, predict XLA's)."""
    mesh = mesh or roofline.MeshShape()
    m = config.model
    requested, backend = backend, step_backend(config, workload, quant, backend)
    if backend == "kernel" and chip.measured and not chip.decoder:  # this CPU: measure them
        chip = dataclasses.replace(chip, decoder=decoder_figures())
    figures = (chip.decoder or {}).get("stream_bandwidth", {})
    if backend == "kernel" and roofline.KERNEL_FORMATS[quant] not in figures:
        if requested == "kernel":
            raise ConfigError(f"no measured figures of the fused decoder kernel for "
                              f"{chip.name}: `hpllm hw --decoder` measures them")
        backend = "xla"  # another chip (--chip), or none measured: XLA's program
    if mesh.devices == 1 and train_kernel_step(config, workload, chip):
        program = train_program(config, workload)
        pred = roofline.train_kernel_prediction(
            m, workload, chip, program, train_figures(program["calls"]),
            remat=config.train.remat, model_name=config.preset)
        backend = "kernel"
    else:
        pred = roofline.predict(m, workload, chip, mesh, param_dtype=config.train.param_dtype,
                                compute_dtype=config.train.compute_dtype,
                                remat=config.train.remat, attention=m.attention,
                                model_name=config.preset, quant=quant, backend=backend)
    lines = [pred.table()]
    if workload.decoding:
        lines.append(f"backend: {backend}" + (" (the fused CPU decoder kernel generate() and "
                                              "the engine run)" if backend == "kernel" else ""))
    n_params = count_params(m)
    length = workload.context if workload.decoding else workload.seq_len
    kv = sizing.kv_cache_bytes(m.n_layers, m.n_kv_heads, m.head_dim, length)
    sizes = [f"sizing: {n_params / 1e6:.2f}M params; bf16 KV cache {kv / 2**20:.2f} MiB per "
             f"{length}-token sequence"]
    if chip.hbm_bytes:
        sizes.append(f"{sizing.chips_to_hold(n_params, 2, chip):.3g} chips just to hold the "
                     "bf16 weights")
    if chip.ici_bandwidth:
        sizes.append(f"FSDP compute-bound above {sizing.fsdp_min_batch_per_chip(chip):.0f} "
                     f"tokens per chip per step; tensor parallelism compute-bound up to "
                     f"{sizing.tensor_parallel_max_degree(m.hidden_dim, chip):.2g}-way")
    lines.append("; ".join(sizes))
    out = dict(pred.to_dict(), config=dataclasses.asdict(m), quant=quant, backend=backend,
               weight_bytes=sum(roofline.matmul_weight_bytes(
                   m, config.train.compute_dtype, quant).values()))
    if measure:
        measured = measure_step(config, workload, repeats=repeats, quant=quant,
                                backend=backend)
        err = (pred.step_s - measured) / measured
        mfu = pred.model_flops / measured / pred.peak_flops
        mbu = pred.bytes / measured / pred.bandwidth
        lines.append(f"measured {measured * 1e3:.3f} ms (median of {repeats}) vs predicted "
                     f"{pred.step_s * 1e3:.3f} ms: error {100 * err:+.1f}%; MFU "
                     f"{100 * mfu:.1f}%, MBU {100 * mbu:.1f}%")
        if abs(err) > 0.25:
            lines.append(f"note: off by more than 25%: {explain(config, workload, pred)}")
        out.update(measured_s=measured, error=err, mfu=mfu, mbu=mbu)
    return {"prediction": pred, "text": "\n".join(lines), "json": out}


# Which predicted terms each profile category measures.
_TERMS_OF_CATEGORY = {"matmul": ("weight matmuls", "output projection"),
                      "attention": ("attention", "attention (KV read)"),
                      "elementwise": ("elementwise", "loss (softmax x-ent)", "optimizer (AdamW)",
                                      "elementwise kernels", "XLA fusions"),
                      "copies": ()}


def explain(config: Config, workload: Workload, pred) -> str:
    """Why a prediction missed: profile the training step and set each category's measured
    time beside the predicted terms it corresponds to. (Inference workloads: point to the
    profiler, which traces training steps.)"""
    worst = max(pred.terms, key=lambda t: t.seconds)
    if workload.kind != "train":
        return (f"the largest term is '{worst.name}' ({worst.bound}-bound, "
                f"{worst.seconds * 1e3:.1f} ms predicted)")
    cfg = _train_config(config, workload)
    with tempfile.TemporaryDirectory() as tmp:
        summary = profile(cfg, steps=2, out_dir=tmp, synthetic=True, log=lambda *a: None)
    by_name = {t.name: t.seconds for t in pred.terms}
    parts = []
    for category, row in summary["categories"].items():
        predicted = sum(by_name.get(n, 0.0) for n in _TERMS_OF_CATEGORY.get(category, ()))
        measured = row["time_per_step_s"]
        if measured > 0.05 * summary["step_time_s"] or predicted:
            parts.append(f"{row['label']} {measured * 1e3:.0f} ms measured vs "
                         f"{predicted * 1e3:.0f} ms predicted")
    idle = summary["unattributed"]["time_per_step_s"]  # no op running: waits, preemption
    return (f"profiled: {'; '.join(parts)}; {idle * 1e3:.0f} ms of the "
            f"{summary['step_time_s'] * 1e3:.0f} ms step ran no op")
