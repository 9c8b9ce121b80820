"""The fused CPU decoder step (hpllm/kernels/cpu_decoder.py) against a float64 NumPy Llama
on ragged batches over a paged pool, and against hpllm's XLA forward."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.compress.quantize import quantize_params
from hpllm.config import ModelConfig
from hpllm.infer.generate import generate
from hpllm.kernels import cpu_decoder
from hpllm.kernels import cpu_quant_matmul as cq
from hpllm.model.transformer import forward
from hpllm.quantized import dequantize, is_quantized
from test_cpu_quant_matmul import _quantized_x as quantized_x

pytestmark = pytest.mark.skipif(not cpu_decoder.available(),
                                reason="cpu_decoder kernel not built (no g++?)")

# odd vocab, head_dim 8, GQA 3:1, odd ffn (int4 groups pad it), three layers
CONFIG = ModelConfig(vocab_size=61, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=37,
                     max_seq_len=64, rope_theta=500.0, norm_eps=1e-5)


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Weights scaled so activations and logits stay O(1) (init_params' are tiny)."""
    rng = np.random.default_rng(seed)
    c = config
    L, D, H, K, Dh, F = c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    n = lambda *s, fan=1: (rng.standard_normal(s) / np.sqrt(fan)).astype(np.float32)
    params = {
        "embed": n(c.vocab_size, D),
        "final_norm": 1 + 0.1 * n(D),
        "layers": {"attn_norm": 1 + 0.1 * n(L, D), "mlp_norm": 1 + 0.1 * n(L, D),
                   "wq": n(L, D, H, Dh, fan=D), "wk": n(L, D, K, Dh, fan=D),
                   "wv": n(L, D, K, Dh, fan=D), "wo": n(L, H, Dh, D, fan=D),
                   "w_gate": n(L, D, F, fan=D), "w_up": n(L, D, F, fan=D),
                   "w_down": n(L, F, D, fan=F)},
    }
    if not c.tie_embeddings:
        params["unembed"] = n(D, c.vocab_size, fan=D)
    return jax.tree.map(jnp.asarray, params)


def float64(params) -> dict:
    return jax.tree.map(lambda w: np.asarray(dequantize(w) if is_quantized(w) else w,
                                             np.float64), params, is_leaf=is_quantized)


def int8_roundtrip(x: np.ndarray) -> np.ndarray:
    """Keys or values (..., head_dim) through int8 codes with one absmax / 127 scale per
    token per head (round half to even), back to float64."""
    scale = np.abs(x).max(-1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def int4_x(x):
    """The x (S, K) that gemm.h's int4 path multiplies at few rows (cq.int4_x8_max_rows)."""
    return quantized_x(x, 8)[0]


def reference_logits(p: dict, config: ModelConfig, tokens: list[int],
                     kv_int8: bool = False, matmul_x=lambda x: x) -> np.ndarray:
    """Float64 Llama (rotate-half RoPE, GQA, optional window): logits (S, V) of one sequence
    at positions 0..S-1, written from the published conventions; kv_int8: keys and values
    stored as int8 codes (int8_roundtrip); matmul_x: what each weight matmul's input becomes
    first (int4_x: the int4 kernel's rounding of x)."""
    c = config
    mx = matmul_x
    H, K, Dh = c.n_heads, c.n_kv_heads, c.head_dim
    rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * w
    x = p["embed"][np.asarray(tokens)]
    s = len(tokens)
    pos = np.arange(s, dtype=np.float64)
    ang = pos[:, None] * c.rope_theta ** (-np.arange(0, Dh, 2) / Dh)[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # (S, heads, Dh)
        a, b = v[..., :Dh // 2], v[..., Dh // 2:]
        cs, sn = cos[:, None], sin[:, None]
        return np.concatenate([a * cs - b * sn, b * cs + a * sn], -1)

    i, j = np.arange(s)[:, None], np.arange(s)[None]
    visible = (j <= i) & ((j > i - c.attention_window) if c.attention_window else True)
    for layer in range(c.n_layers):
        w = {k: v[layer] for k, v in p["layers"].items()}
        h = mx(rms(x, w["attn_norm"]))
        q = rope(np.einsum("sd,dhk->shk", h, w["wq"]))
        k = rope(np.einsum("sd,dhk->shk", h, w["wk"]))
        v = np.einsum("sd,dhk->shk", h, w["wv"])
        if kv_int8:
            k, v = int8_roundtrip(k), int8_roundtrip(v)
        out = np.empty_like(q)
        for head in range(H):
            g = head // (H // K)
            scores = np.where(visible, q[:, head] @ k[:, g].T / np.sqrt(Dh), -np.inf)
            e = np.exp(scores - scores.max(1, keepdims=True))
            out[:, head] = (e / e.sum(1, keepdims=True)) @ v[:, g]
        x = x + np.einsum("shk,hkd->sd", mx(out.reshape(s, -1)).reshape(out.shape), w["wo"])
        h = mx(rms(x, w["mlp_norm"]))
        gate, up = h @ w["w_gate"], h @ w["w_up"]
        x = x + mx(gate / (1 + np.exp(-gate)) * up) @ w["w_down"]
    x = mx(rms(x, p["final_norm"]))
    return x @ (p["embed"].T if c.tie_embeddings else p["unembed"])


BLOCK = 4
TABLES = np.array([[3, 7, 1, 9, 0],      # sequence 0: blocks out of order
                   [2, 5, 10, 0, 0],     # sequence 1
                   [4, 6, 8, 11, 0]], np.int32)  # sequence 2; block 0: the null block
# Three steps of (sequence, number of new tokens) plus padding tokens: prefill chunks,
# decode tokens, chunks that cross block boundaries, a sequence continuing over steps.
STEPS = [([(0, 7), (1, 3)], 2), ([(0, 1), (1, 4), (2, 5)], 1), ([(2, 1), (0, 1), (1, 6)], 3)]


@functools.partial(jax.jit, static_argnames=("config", "portable"), donate_argnums=1)
def jitted_step(weights, pool, *args, config, portable):
    return cpu_decoder.step(weights, pool, *args, config=config, portable=portable)


def run_steps(weights, config, streams, *, portable=False, kv_dtype="float32"):
    """Runs STEPS through cpu_decoder.step (jitted, pool donated); yields per step the
    (sequence, position) of each valid token and its logits."""
    pool = cpu_decoder.create_pool(config, 12, BLOCK, kv_dtype)
    run = functools.partial(jitted_step, config=config, portable=portable)
    done = [0, 0, 0]
    for chunks, padding in STEPS:
        tokens, positions, seqs = [], [], []
        for s, n in chunks:
            tokens += streams[s][done[s]:done[s] + n]
            positions += list(range(done[s], done[s] + n))
            seqs += [s] * n
            done[s] += n
        valid = list(zip(seqs, positions))
        tokens += [0] * padding
        positions += [-1] * padding
        seqs += [0] * padding
        logits_index = np.arange(len(valid), dtype=np.int32)[::-1].copy()  # any order
        logits, pool = run(weights, pool, np.asarray(tokens, np.int32),
                           np.asarray(positions, np.int32), np.asarray(seqs, np.int32),
                           TABLES, logits_index)
        yield [valid[i] for i in logits_index], np.asarray(logits)


def streams_for(config, seed=1):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, config.vocab_size, 20)) for _ in range(3)]


def check_against_reference(params, config, *, portable=False, atol=2e-4, kv_dtype="float32",
                            int4_group=0):
    """int4_group: the params are int4 in groups of that many k; where gemm.h takes its int4
    x int8 path (every step here has <= 12 rows) the reference rounds x as it does."""
    matmul_x = lambda x: x
    if int4_group:
        max_rows = cq.int4_x8_max_rows(int4_group, "portable" if portable else "native")
        assert max_rows == 0 or max_rows >= max(sum(n for _, n in c) + pad for c, pad in STEPS)
        matmul_x = int4_x if max_rows else matmul_x
    streams = streams_for(config)
    ref64 = float64(params)
    refs = [reference_logits(ref64, config, s, kv_dtype == "int8", matmul_x) for s in streams]
    weights = cpu_decoder.prepare(params, config)
    checked = 0
    for where, logits in run_steps(weights, config, streams, portable=portable,
                                   kv_dtype=kv_dtype):
        expected = np.stack([refs[s][p] for s, p in where])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(logits, expected, atol=atol * scale, rtol=0)
        checked += len(where)
    assert checked == sum(n for chunks, _ in STEPS for _, n in chunks)


@pytest.mark.parametrize("scheme", ["float32", "int8", "int4"])
def test_ragged_steps_match_float64_llama(scheme):
    params = random_params(CONFIG)
    if scheme != "float32":
        params = quantize_params(params, scheme, group_size=16)
    assert cpu_decoder.unsupported(CONFIG, params) is None
    check_against_reference(params, CONFIG, int4_group=16 if scheme == "int4" else 0)


def test_int8_kv_pool_matches_float64_llama_with_int8_keys_and_values():
    """An int8 pool (codes + per-token-per-head scales): the float64 reference quantizes its
    keys and values the same way; the unquantized reference is measurably farther."""
    params = random_params(CONFIG, seed=10)
    assert cpu_decoder.unsupported(CONFIG, params, kv_dtype="int8") is None
    check_against_reference(params, CONFIG, kv_dtype="int8")
    streams = streams_for(CONFIG)
    plain = [reference_logits(float64(params), CONFIG, s) for s in streams]
    quant = [reference_logits(float64(params), CONFIG, s, True) for s in streams]
    gap = max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(plain, quant))
    assert gap > 1e-3  # int8 keys/values change the logits by more than the tolerance


WINDOWED = dataclasses.replace(CONFIG, dim=32, n_heads=2, n_kv_heads=1, attention_window=5,
                               tie_embeddings=False, vocab_size=37)


def test_window_untied_head_and_head_dim_16():
    check_against_reference(random_params(WINDOWED, seed=3), WINDOWED)


LONG = dataclasses.replace(CONFIG, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=24,
                           max_seq_len=256)


@pytest.mark.parametrize("scheme", ["float32", "int8"])
def test_long_context_attention_tiles_and_head_dim_32(scheme):
    """A 150-token prefill chunk, then decode tokens at positions 150 and 151: attention over
    several 64-position tiles (online-softmax rescaling), as a phase of its own both with
    the norms split by tokens (prefill: blocked attention over blocks of tokens, the packed
    matmul panels, int8's x quantized once per phase) and not (decode); head_dim 32 takes
    the vector attention path that head_dim 8 (CONFIG) does not. The prefill's logits rows
    are some of its tokens (any order) and trailing padding, whose rows come out zero."""
    params = random_params(LONG, seed=8)
    if scheme != "float32":
        params = quantize_params(params, scheme)
    stream = list(np.random.default_rng(9).integers(0, LONG.vocab_size, 152))
    ref = reference_logits(float64(params), LONG, stream)
    weights = cpu_decoder.prepare(params, LONG)
    block = 16
    pool = cpu_decoder.create_pool(LONG, 12, block)
    table = np.array([[5, 2, 9, 1, 3, 11, 4, 7, 6, 10, 8, 0]], np.int32)  # any order
    run = functools.partial(jitted_step, config=LONG, portable=False)
    pad = 3
    steps = [(0, 150, [149, 0, 150 + pad - 1, 97, 48, 33]), (150, 151, [0]), (151, 152, [0])]
    if scheme != "float32":  # int8's new paths are the prefill's: spare two compilations
        steps = steps[:1]
    for lo, hi, rows in steps:
        n = hi - lo
        padding = pad if lo == 0 else 0
        tokens = np.asarray(stream[lo:hi] + [0] * padding, np.int32)
        positions = np.concatenate([np.arange(lo, hi), -np.ones(padding)]).astype(np.int32)
        logits, pool = run(weights, pool, tokens, positions,
                           np.zeros(n + padding, np.int32), table, np.array(rows, np.int32))
        logits = np.asarray(logits)
        real = [i for i, r in enumerate(rows) if r < n]
        expected = ref[lo + np.array([rows[i] for i in real])]
        np.testing.assert_allclose(logits[real], expected,
                                   atol=2e-4 * np.abs(expected).max(), rtol=0)
        assert not logits[[i for i in range(len(rows)) if i not in real]].any()


@pytest.mark.slow  # a second g++ build of the kernel (~10-20 s); decoder.cc itself has no
# ISA-specific code; gemm.h's scalar paths are tested in tests/test_cpu_quant_matmul.py
def test_portable_build():
    params = quantize_params(random_params(WINDOWED, seed=4), "int4", group_size=8)
    check_against_reference(params, WINDOWED, portable=True, int4_group=8)


def test_agrees_with_the_xla_forward():
    """The same sequences through hpllm.model.transformer.forward (float32)."""
    params = random_params(CONFIG, seed=5)
    streams = streams_for(CONFIG, seed=6)
    run = jax.jit(lambda p, t: forward(p, t, jnp.arange(t.shape[1])[None], CONFIG)[0][0])
    full = [np.asarray(run(params, jnp.asarray([s]))) for s in streams]
    weights = cpu_decoder.prepare(params, CONFIG)
    for where, logits in run_steps(weights, CONFIG, streams):
        expected = np.stack([full[s][p] for s, p in where])
        np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())


def test_generate_through_the_kernel_matches_the_xla_path():
    params = random_params(CONFIG, seed=7)
    prompt = [5, 17, 3, 44, 2, 9, 30]
    kernel = list(generate(params, CONFIG, prompt, 30))
    xla = list(generate(params, CONFIG, prompt, 30, cpu_kernel=False))
    assert kernel == xla and len(kernel) == 30


def test_unsupported_says_why():
    params = random_params(CONFIG)
    assert "learned" in cpu_decoder.unsupported(
        dataclasses.replace(CONFIG, pos_embedding="learned"), params)
    assert "experts" in cpu_decoder.unsupported(dataclasses.replace(CONFIG, n_experts=4),
                                                params)
    assert "bfloat16" in cpu_decoder.unsupported(CONFIG, params, kv_dtype="bfloat16")
    assert "llm.int8" in cpu_decoder.unsupported(CONFIG, quantize_params(params, "llm.int8"))
    biased = {**params, "layers": {**params["layers"], "bq": params["layers"]["attn_norm"]}}
    assert "bq" in cpu_decoder.unsupported(CONFIG, biased)
    with pytest.raises(ValueError, match="cannot run"):
        cpu_decoder.prepare(params, dataclasses.replace(CONFIG, n_experts=4))


def test_bad_token_is_an_error_and_leaves_the_pool_alone():
    params = random_params(CONFIG)
    weights = cpu_decoder.prepare(params, CONFIG)
    pool = cpu_decoder.create_pool(CONFIG, 4, BLOCK)
    with pytest.raises(Exception, match="token id out of range"):
        cpu_decoder.step(weights, pool, np.array([CONFIG.vocab_size], np.int32),
                         np.array([0], np.int32), np.array([0], np.int32),
                         np.array([[1]], np.int32), np.array([0], np.int32), config=CONFIG)
    assert not np.asarray(pool.k).any()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["float32", "int8"])
def test_smollm2_greedy_identical_to_the_xla_path(scheme):
    """Acceptance: SmolLM2-135M, 128 greedy tokens through the kernel equal the XLA path's
    (same weights; both compute in float32)."""
    from hpllm.checkpoints.registry import load_model

    model = load_model("smollm2-135m", progress=False)
    params = model.params if scheme == "float32" else quantize_params(model.params, scheme)
    assert cpu_decoder.unsupported(model.config, params) is None
    prompt = model.tokenizer.encode("Once upon a time, in a small village,")
    kernel = list(generate(params, model.config, prompt, 128, cpu_kernel=True))
    xla = list(generate(params, model.config, prompt, 128, cpu_kernel=False))
    assert len(kernel) == 128 and kernel == xla


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_copy_blocks_copies_every_layer_and_nothing_else(kv_dtype):
    pool = cpu_decoder.create_pool(CONFIG, 6, BLOCK, kv_dtype)
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(a.shape).astype(np.float32) * (50 if a.ndim == 5 else 1)
              for a in (pool.k, pool.v, pool.k_scale, pool.v_scale) if a is not None]
    arrays = [a.astype(pool.k.dtype) if a.ndim == 5 else a for a in arrays]
    out = cpu_decoder.copy_blocks(cpu_decoder.KVPool(*map(jnp.asarray, arrays)), [4, 1],
                                  [2, 5])
    got = [a for a in (out.k, out.v, out.k_scale, out.v_scale) if a is not None]
    assert len(got) == (4 if kv_dtype == "int8" else 2)
    for a, b in zip(arrays, got):
        want = a.copy()
        want[:, [2, 5]] = a[:, [4, 1]]
        np.testing.assert_array_equal(np.asarray(b), want)
