"""GPU acceptance, one step per call: what `bench/gpu/acceptance.sh` runs, each step in its
own process under its own time budget, so a hang or crash loses only that step.

    python bench/gpu/acceptance.py --step STEP --work DIR [--dry-run]

Steps (each appends JSON lines to DIR/results.jsonl as it goes, so a step killed half way
keeps what it measured; a step exits 1 if any of its checks or cases failed):
  env        device, versions, the chip's peaks from hpllm.perf.hardware
  kernels    every Pallas kernel compiled for the device (flash forward and backward, paged
             attention; flash decoding, which is pure JAX) against its reference at sizes that
             are not multiples of the blocks, float32 and bfloat16
  attention  causal attention forward and forward+backward TFLOP/s, bf16, head dim 128,
             seq 2K/8K/16K: hpllm's Pallas kernel vs cuDNN vs XLA (and JAX's own Mosaic GPU
             kernel, forward only), with % of the chip's peak
  train      a ~1B-parameter Llama (Llama-3.2-1B shape) training step, bf16, full remat,
             Pallas attention, 20 steps: tokens/s and MFU beside the roofline's step time
  decode     batch-1 decode tokens/s and achieved GB/s (MBU) of the same shape with random
             weights, bf16 and int8; the paged engine's throughput at 64 concurrent sequences
The report (DIR/results.jsonl + DIR/steps.tsv -> <date>-<chip>.md and .json) is
bench/gpu/report.py, standard library only, so it is written even if hpllm fails to import.

--dry-run: the same code at toy sizes on CPU (Pallas in interpret mode), for the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import subprocess
import sys
import time
import traceback
import types
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

# Every hpllm name this driver uses, imported here only, so that a rename elsewhere in the
# package breaks one line (and the dry-run test) rather than a step on a lent GPU.
from hpllm.compress.quantize import param_bytes, quantize_params
from hpllm.config import EngineConfig, make_config
from hpllm.infer.generate import generate
from hpllm.infer.llm import LLM
from hpllm.infer.sampling import SamplingParams
from hpllm.kernels.decode_attention import flash_decode
from hpllm.kernels.masking import reference_attention
from hpllm.kernels.paged_attention import paged_attention_gather, paged_attention_pallas
from hpllm.kernels.pallas_attention import default_target, pallas_attention
from hpllm.model.transformer import count_params, init_params
from hpllm.perf.hardware import current_chip, lookup, time_calls
from hpllm.perf.roofline import Workload, predict, train_flops_per_token
from hpllm.train.data import random_batch
from hpllm.train.state import init_state
from hpllm.train.step import jit_train_step

# Relative L2 error ||out - ref|| / ||ref|| allowed against the float32 reference: float32
# on a GPU may run its dots as TF32 (~3e-4); bf16 operands land between 1e-3 and 1e-2.
TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2}
# Llama-3.2-1B's shape (1.24 B parameters with the tied 128K-token embedding).
LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                ffn_dim=8192, rope_theta=500000.0, tie_embeddings=True)
TOY_MODEL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size a step uses; GPU for the lent device, DRY for the CPU dry run."""
    # kernels: (batch, length, heads, kv heads, head dim, window, two segments)
    flash_cases: tuple
    decode_case: tuple  # (batch, context, heads, kv heads, head dim, splits)
    paged_case: tuple  # (contexts per sequence, queries, heads, kv heads, head dim, block)
    # attention
    attn_lengths: tuple
    attn_tokens: int  # batch x length held about constant
    attn_heads: int
    attn_dim: int
    attn_repeats: int
    xla_max_score_bytes: float  # skip the XLA baseline above this S x S score memory
    # train / decode
    model: dict
    train_seq: int
    train_batch: int
    train_steps: int
    decode_prompt: int
    decode_tokens: int
    engine_seqs: int
    engine_prompt: int
    engine_tokens: int


GPU = Sizes(flash_cases=((2, 1000, 8, 2, 128, None, False), (1, 333, 4, 4, 80, 100, True)),
            decode_case=(2, 3001, 8, 2, 128, 8), paged_case=((1000, 37, 517), 7, 8, 2, 128, 16),
            attn_lengths=(2048, 8192, 16384), attn_tokens=32768, attn_heads=16, attn_dim=128,
            attn_repeats=10, xla_max_score_bytes=24 * 2**30,
            model=LLAMA_1B, train_seq=2048, train_batch=8, train_steps=20,
            decode_prompt=32, decode_tokens=128, engine_seqs=64, engine_prompt=128,
            engine_tokens=128)
DRY = Sizes(flash_cases=((1, 45, 4, 2, 32, None, False), (1, 37, 2, 2, 24, 16, True)),
            decode_case=(1, 101, 4, 2, 32, 4), paged_case=((40, 7, 23), 3, 4, 2, 32, 8),
            attn_lengths=(64, 128), attn_tokens=128, attn_heads=2, attn_dim=32,
            attn_repeats=2, xla_max_score_bytes=2**30,
            model=TOY_MODEL, train_seq=32, train_batch=2, train_steps=3,
            decode_prompt=4, decode_tokens=6, engine_seqs=4, engine_prompt=6, engine_tokens=4)


class Recorder:
    """Appends one JSON object per line, flushed at once: what a killed step measured stays."""

    def __init__(self, work: pathlib.Path, step: str):
        self.path, self.step, self.failed = work / "results.jsonl", step, 0

    def __call__(self, kind: str, **fields) -> dict:
        row = {"step": self.step, "kind": kind, **fields}
        self.failed += fields.get("ok") is False or "error" in fields
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        print(json.dumps(row, default=_jsonable), flush=True)
        return row


def _jsonable(x):
    return float(x) if np.isscalar(x) else str(x)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _guarded(rec, kind, fn, *, baseline=False, **fields):
    """Run one case; an exception is recorded as that case's error and the step goes on. A
    `baseline` (someone else's kernel we compare with) that fails is recorded as unavailable,
    not as a failure of hpllm."""
    try:
        return fn()
    except Exception as e:  # a kernel that fails to compile must not hide the others
        traceback.print_exc()
        if baseline:
            rec(kind, **fields, ok=True, skipped=f"unavailable: {_error(e)}")
        else:
            rec(kind, **fields, error=_error(e))
        return None


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


@functools.cache
def _chip(dry: bool):
    """The chip table's entry for this GPU. A dry run divides by the H100's figures instead
    of measuring the CPU (slow, and refused on a loaded machine): its ratios mean nothing."""
    return lookup("H100") if dry else current_chip()


def _model_config(sizes: Sizes, **overrides):
    return make_config("shakespeare", **sizes.model, max_seq_len=max(sizes.train_seq, 256),
                       seq_len=sizes.train_seq, batch_size=sizes.train_batch,
                       compute_dtype="bfloat16", **overrides)


# ---------------------------------------------------------------------------------- env

def step_env(rec, sizes: Sizes, dry: bool):
    chip = _chip(dry)
    device = jax.devices()[0]
    smi = ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    rec("env", ok=True, dry_run=dry, python=platform.python_version(), jax=jax.__version__,
        jaxlib=jaxlib.__version__, backend=jax.default_backend(), devices=jax.device_count(),
        device_kind=getattr(device, "device_kind", ""), pallas_target=default_target(),
        nvidia_smi=smi, hpllm_commit=commit, chip=chip.name, chip_source=chip.source,
        peak_bf16=chip.peak("bfloat16"), peak_f32=chip.peak("float32"),
        hbm_bandwidth=chip.hbm_bandwidth, sizes=dataclasses.asdict(sizes))


# ------------------------------------------------------------------------------ kernels

def _attention_inputs(rng, b, s, h, kv, d, two_segments, dtype):
    q = rng.standard_normal((b, s, h, d))
    k, v = rng.standard_normal((2, b, s, kv, d))
    pos = np.broadcast_to(np.arange(s), (b, s))
    seg = np.ones((b, s), np.int32)
    if two_segments:  # two packed documents; the second's positions restart at 0
        cut = s // 3
        seg[:, cut:] = 2
        pos = np.where(seg == 1, pos, pos - cut)
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(pos, jnp.int32), \
        jnp.asarray(seg)


def check_flash(rec, case, dtype):
    b, s, h, kv, d, window, two_segments = case
    rng = np.random.default_rng(s * d)
    (q, k, v), pos, seg = _attention_inputs(rng, b, s, h, kv, d, two_segments, dtype)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return (fn(q, k, v, pos, pos, seg, seg, window=window).astype(jnp.float32) * cot).sum()

    ours = jax.jit(lambda q, k, v: (pallas_attention(q, k, v, pos, pos, seg, seg,
                                                     window=window),
                                    jax.grad(lambda *a: loss(pallas_attention, *a),
                                             argnums=(0, 1, 2))(q, k, v)))
    with jax.default_matmul_precision("highest"):  # the reference in float32 proper
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = jax.jit(lambda q, k, v: (reference_attention(q, k, v, pos, pos, seg, seg,
                                                           window=window),
                                       jax.grad(lambda *a: loss(reference_attention, *a),
                                                argnums=(0, 1, 2))(q, k, v)))(*f32)
    t0 = time.perf_counter()
    out, grads = jax.block_until_ready(ours(q, k, v))
    seconds = time.perf_counter() - t0
    shape = dict(batch=b, length=s, heads=h, kv_heads=kv, head_dim=d, window=window,
                 segments=2 if two_segments else 1, dtype=dtype)
    for name, o, r in [("flash forward", out, ref[0])] + [
            (f"flash backward d{x}", g, rg) for x, g, rg in zip("qkv", grads, ref[1])]:
        err = _rel_err(o, r)
        rec("kernel", kernel=name, **shape, rel_err=err, tolerance=TOLERANCE[dtype],
            ok=err <= TOLERANCE[dtype], compile_and_run_s=seconds)


def check_flash_decode(rec, case, dtype):
    b, t, h, kv, d, splits = case
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), dtype)
    k, v = (jnp.asarray(x, dtype) for x in rng.standard_normal((2, b, t, kv, d)))
    kv_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    q_pos = jnp.full((b, 1), t - 1)
    q_seg, kv_seg = jnp.ones((b, 1), jnp.int32), jnp.ones((b, t), jnp.int32)
    out = jax.jit(lambda q, k, v: flash_decode(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                               num_splits=splits))(q, k, v)
    with jax.default_matmul_precision("highest"):
        ref = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), q_pos, kv_pos,
                                  q_seg, kv_seg)
    err = _rel_err(out, ref)
    rec("kernel", kernel="flash decode (pure JAX, no Pallas path)", batch=b, context=t,
        heads=h, kv_heads=kv, head_dim=d, splits=splits, dtype=dtype, rel_err=err,
        tolerance=TOLERANCE[dtype], ok=err <= TOLERANCE[dtype])


def check_paged(rec, case, dtype):
    contexts, n_q, h, kv, d, bs = case
    b = len(contexts)
    rng = np.random.default_rng(sum(contexts))
    width = max(-(-c // bs) for c in contexts)
    n_blocks = 1 + b * width
    pages = rng.standard_normal((2, n_blocks, bs, kv, d))
    k_pages, v_pages = (jnp.asarray(x, dtype) for x in pages)
    tables = 1 + rng.permutation(b * width).reshape(b, width)  # scattered; block 0 unused
    # The last n_q positions of each context: a prefill chunk (n_q > 1) over the cache.
    q_pos = np.stack([np.arange(c - n_q, c) for c in contexts]).clip(-1)
    q = jnp.asarray(rng.standard_normal((b, n_q, h, d)), dtype)
    tables, q_pos = jnp.asarray(tables, jnp.int32), jnp.asarray(q_pos, jnp.int32)
    for n in sorted({1, n_q}):
        qn, pn = q[:, -n:], q_pos[:, -n:]
        out = jax.jit(lambda q, kp, vp: paged_attention_pallas(q, kp, vp, tables, pn))(
            qn, k_pages, v_pages)
        with jax.default_matmul_precision("highest"):
            ref = paged_attention_gather(qn.astype(jnp.float32), k_pages.astype(jnp.float32),
                                         v_pages.astype(jnp.float32), tables, pn)
        err = _rel_err(out, ref)
        rec("kernel", kernel=f"paged attention pallas ({'decode' if n == 1 else 'chunk'})",
            contexts=list(contexts), queries=n, heads=h, kv_heads=kv, head_dim=d,
            block_size=bs, dtype=dtype, rel_err=err, tolerance=TOLERANCE[dtype],
            ok=err <= TOLERANCE[dtype])


def step_kernels(rec, sizes: Sizes, dry: bool):
    for dtype in ("float32", "bfloat16"):
        for case in sizes.flash_cases:
            _guarded(rec, "kernel", lambda: check_flash(rec, case, dtype), kernel="flash",
                     case=list(case), dtype=dtype)
        _guarded(rec, "kernel", lambda: check_flash_decode(rec, sizes.decode_case, dtype),
                 kernel="flash decode", dtype=dtype)
        _guarded(rec, "kernel", lambda: check_paged(rec, sizes.paged_case, dtype),
                 kernel="paged attention pallas", dtype=dtype)


# ---------------------------------------------------------------------------- attention

def _mosaic_gpu_attention(q, k, v):
    """JAX's own Mosaic GPU flash attention (Hopper, forward only when causal): what a
    Mosaic GPU port of hpllm's kernel could reach. Its API is marked unstable, hence here."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # reason: GPU-only, unstable

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                         causal=True)
    return attention_mgpu.attention(q, k, v, config)


def _attention_impls(dry: bool):
    """name -> (causal attention (q, k, v) -> out for (B, S, H, D) inputs, is a baseline,
    has a backward pass)."""
    def ours(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        seg = jnp.ones(q.shape[:2], jnp.int32)
        return pallas_attention(q, k, v, pos, pos, seg, seg)

    def jax_nn(implementation):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation=implementation)

    impls = {"hpllm pallas": (ours, False, True), "xla": (jax_nn("xla"), True, True)}
    if not dry:  # neither runs on a CPU
        impls["cudnn"] = (jax_nn("cudnn"), True, True)
        impls["jax mosaic-gpu"] = (_mosaic_gpu_attention, True, False)
    return impls


def step_attention(rec, sizes: Sizes, dry: bool):
    peak = _chip(dry).peak("bfloat16")
    h, d = sizes.attn_heads, sizes.attn_dim
    if dry:
        rec("attention", impl="cudnn, jax mosaic-gpu", ok=True, skipped="need a GPU (dry run)")
    for s in sizes.attn_lengths:
        b = max(1, sizes.attn_tokens // s)
        rng = np.random.default_rng(s)
        q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in rng.standard_normal((3, b, s, h, d)))
        causal_flops = 4 * b * h * d * s * (s + 1) / 2  # QK^T and PV over the triangle
        score_bytes = b * h * s * s * 4
        for name, (fn, baseline, has_bwd) in _attention_impls(dry).items():
            for pass_, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # bwd: 5 matmuls vs 2
                case = dict(impl=name, pass_=pass_, batch=b, length=s, heads=h, head_dim=d)
                if pass_ == "fwd+bwd" and not has_bwd:
                    continue
                if name == "xla" and score_bytes * (1 if pass_ == "fwd" else 3) \
                        > sizes.xla_max_score_bytes:
                    rec("attention", **case, ok=True, skipped=f"S x S scores of "
                        f"{score_bytes / 2**30:.0f} GiB per pass")
                    continue
                run = fn if pass_ == "fwd" else jax.grad(
                    lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2))
                run = jax.jit(run)

                def measure():
                    seconds = float(np.median(time_calls(lambda: run(q, k, v),
                                                         sizes.attn_repeats)))
                    rate = causal_flops * factor / seconds
                    rec("attention", **case, ok=True, seconds=seconds, tflops=rate / 1e12,
                        fraction_of_peak=rate / peak)
                _guarded(rec, "attention", measure, baseline=baseline, **case)


# -------------------------------------------------------------------------------- train

def _train_once(rec, sizes: Sizes, attention: str, chip):
    config = _model_config(sizes, remat="full", attention=attention)
    tokens = sizes.train_batch * sizes.train_seq
    state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(0))
    step = jit_train_step(config)
    batch = jax.device_put(random_batch(config))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    loss0 = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(sizes.train_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    flops = train_flops_per_token(config.model, sizes.train_seq) * tokens
    pred = predict(config.model, Workload("train", sizes.train_batch, seq_len=sizes.train_seq),
                   chip, param_dtype=config.train.param_dtype, compute_dtype="bfloat16",
                   remat="full", attention=attention)
    loss = float(metrics["loss"])
    rec("train", ok=bool(np.isfinite(loss)), attention=attention,
        params=count_params(config.model), batch=sizes.train_batch, seq_len=sizes.train_seq,
        steps=sizes.train_steps, compile_s=compile_s, step_s=seconds,
        step_s_min=float(np.min(times)), tokens_per_s=tokens / seconds,
        tflops=flops / seconds / 1e12, mfu=flops / seconds / chip.peak("bfloat16"),
        predicted_step_s=pred.step_s, predicted_bound=pred.bound, first_loss=loss0,
        last_loss=loss)


def step_train(rec, sizes: Sizes, dry: bool):
    ok = _guarded(rec, "train", lambda: _train_once(rec, sizes, "pallas", _chip(dry)) or True,
                  attention="pallas")
    if not ok:  # still give a training figure: the pure-JAX blockwise kernel
        _guarded(rec, "train", lambda: _train_once(rec, sizes, "flash", _chip(dry)),
                 attention="flash")


# ------------------------------------------------------------------------------- decode

def _decode_once(rec, sizes: Sizes, weights: str, chip):
    config = _model_config(sizes).model
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    if weights == "int8":
        params = quantize_params(params, "int8")
    prompt = [int(t) for t in np.random.default_rng(1).integers(1, config.vocab_size,
                                                                   sizes.decode_prompt)]

    def run():
        stamps = [time.perf_counter()]
        for _ in generate(params, config, prompt, sizes.decode_tokens, dtype=jnp.bfloat16):
            stamps.append(time.perf_counter())  # each token was read back: its step is done
        return np.diff(stamps)[1:]  # the first interval is the prefill

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    seconds = float(np.median(run()))
    cache_len = 1 << max(8, (sizes.decode_prompt + sizes.decode_tokens - 1).bit_length())
    kv = 2 * config.n_layers * min(cache_len, config.max_seq_len) * config.n_kv_heads \
        * config.head_dim * 2  # generate's dense cache is in the compute dtype (bf16); the
    # decode step reads every slot of it
    weight_bytes = param_bytes(params)
    nbytes = weight_bytes + kv
    pred = predict(config, Workload("decode", 1, context=cache_len), chip,
                   param_dtype="bfloat16", compute_dtype="bfloat16")
    rec("decode", ok=True, weights=weights, batch=1, params=count_params(config),
        tokens=sizes.decode_tokens, compile_s=compile_s, step_s=seconds,
        tokens_per_s=1 / seconds, weight_bytes=weight_bytes, kv_bytes=kv,
        achieved_gbs=nbytes / seconds / 1e9, mbu=nbytes / seconds / chip.hbm_bandwidth,
        roofline_bf16_step_s=pred.step_s)


def _engine_once(rec, sizes: Sizes):
    config = _model_config(sizes).model
    params = init_params(config, jax.random.key(0), jnp.bfloat16)
    n, p, out = sizes.engine_seqs, sizes.engine_prompt, sizes.engine_tokens
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2
    # All prompts in one prefill step, then decode steps of n rows: few shapes to compile.
    ec = EngineConfig(max_num_seqs=n, max_num_batched_tokens=max(256, n * p),
                      dtype="bfloat16", kv_dtype="bfloat16", enable_prefix_caching=False,
                      kv_memory_mb=max(64.0, 2 * n * (p + out) * per_token / 2**20))
    llm = LLM(types.SimpleNamespace(params=params, config=config, tokenizer=None), ec)
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(1, config.vocab_size, p)] for _ in range(n)]
    sampling = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, sampling)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    rec("engine", ok=generated == n * out, concurrent=n, prompt_tokens=p, output_tokens=out,
        generated=generated, first_run_s=first_s, seconds=seconds,
        output_tokens_per_s=generated / seconds, total_tokens_per_s=n * (p + out) / seconds)


def step_decode(rec, sizes: Sizes, dry: bool):
    for weights in ("bfloat16", "int8"):
        _guarded(rec, "decode", lambda: _decode_once(rec, sizes, weights, _chip(dry)),
                 weights=weights)
    _guarded(rec, "engine", lambda: _engine_once(rec, sizes), concurrent=sizes.engine_seqs)


# --------------------------------------------------------------------------------- main

STEP_FUNCTIONS = {"env": step_env, "kernels": step_kernels, "attention": step_attention,
                  "train": step_train, "decode": step_decode}


def run_step(name: str, work: pathlib.Path, sizes: Sizes) -> int:
    """One step in this process; 0 if every case ran and passed. Sizes other than GPU's
    (DRY, or smaller for a test) mean a dry run."""
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder(work, name)
    with warnings.catch_warnings(record=True) as caught:  # e.g. JAX 0.11's Triton deprecation
        warnings.simplefilter("always")
        _guarded(rec, name, lambda: STEP_FUNCTIONS[name](rec, sizes, sizes is not GPU))
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]  # noise
    messages = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    if messages:
        rec("warnings", messages=messages[:10], count=len(caught))
    return 1 if rec.failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", required=True, choices=STEP_FUNCTIONS)
    ap.add_argument("--work", required=True, help="folder of results.jsonl and steps.tsv")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes, CPU, Pallas interpreted")
    args = ap.parse_args(argv)
    work = pathlib.Path(args.work)
    if not args.dry_run and jax.default_backend() == "cpu":
        print("no GPU backend in this JAX (use --dry-run for the CPU rehearsal)")
        return 2
    return run_step(args.step, work, DRY if args.dry_run else GPU)


if __name__ == "__main__":
    sys.exit(main())
