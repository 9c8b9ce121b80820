"""Run the workload a roofline prediction describes and time it: the "profile" half of
predict-then-measure. Random weights and tokens: timing does not depend on their values."""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.compress.quantize import quantize_params
from hpllm.config import Config, apply_overrides
from hpllm.infer.paged_model import PagedModel
from hpllm.infer.sampling import pow2_bucket
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import count_params, forward, init_params, unstack_layers
from hpllm.perf import roofline, sizing
from hpllm.perf.hardware import time_calls
from hpllm.perf.profile import profile
from hpllm.perf.roofline import Workload
from hpllm.train.data import random_batch
from hpllm.train.state import init_state
from hpllm.train.step import jit_train_step


def _median_seconds(run, repeats: int) -> float:
    return float(np.median(time_calls(run, repeats)))


def measure_step(config: Config, workload: Workload, repeats: int = 5, quant: str = "") -> float:
    """Median seconds of one step of `workload` on the default device (inference: with the
    matmul weights quantized by `quant`, as `--quant` loads a model)."""
    if workload.kind == "train":
        config = apply_overrides(config, {"batch_size": workload.batch,
                                          "seq_len": workload.seq_len})
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


def compare(config: Config, workload: Workload, chip, mesh=None, *, measure: bool = False,
            repeats: int = 5, quant: str = "") -> dict:
    """Prediction (and, with `measure`, the measured median beside it) as text and JSON."""
    mesh = mesh or roofline.MeshShape()
    m = config.model
    pred = roofline.predict(m, workload, chip, mesh, param_dtype=config.train.param_dtype,
                            compute_dtype=config.train.compute_dtype, remat=config.train.remat,
                            attention=m.attention, model_name=config.preset, quant=quant)
    lines = [pred.table()]
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
    out = dict(pred.to_dict(), config=dataclasses.asdict(m), quant=quant,
               weight_bytes=sum(roofline.matmul_weight_bytes(
                   m, config.train.compute_dtype, quant).values()))
    if measure:
        measured = measure_step(config, workload, repeats=repeats, quant=quant)
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
                      "elementwise": ("elementwise", "loss (softmax x-ent)", "optimizer (AdamW)"),
                      "copies": ()}


def explain(config: Config, workload: Workload, pred) -> str:
    """Why a prediction missed: profile the training step and set each category's measured
    time beside the predicted terms it corresponds to. (Inference workloads: point to the
    profiler, which traces training steps.)"""
    worst = max(pred.terms, key=lambda t: t.seconds)
    if workload.kind != "train":
        return (f"the largest term is '{worst.name}' ({worst.bound}-bound, "
                f"{worst.seconds * 1e3:.1f} ms predicted)")
    cfg = apply_overrides(config, {"batch_size": workload.batch, "seq_len": workload.seq_len})
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
    return "profiled: " + "; ".join(parts)
