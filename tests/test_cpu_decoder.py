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
from hpllm.model.transformer import forward
from hpllm.quantized import dequantize, is_quantized

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


def reference_logits(p: dict, config: ModelConfig, tokens: list[int]) -> np.ndarray:
    """Float64 Llama (rotate-half RoPE, GQA, optional window): logits (S, V) of one sequence
    at positions 0..S-1, written from the published conventions."""
    c = config
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
        h = rms(x, w["attn_norm"])
        q = rope(np.einsum("sd,dhk->shk", h, w["wq"]))
        k = rope(np.einsum("sd,dhk->shk", h, w["wk"]))
        v = np.einsum("sd,dhk->shk", h, w["wv"])
        out = np.empty_like(q)
        for head in range(H):
            g = head // (H // K)
            scores = np.where(visible, q[:, head] @ k[:, g].T / np.sqrt(Dh), -np.inf)
            e = np.exp(scores - scores.max(1, keepdims=True))
            out[:, head] = (e / e.sum(1, keepdims=True)) @ v[:, g]
        x = x + np.einsum("shk,hkd->sd", out, w["wo"])
        h = rms(x, w["mlp_norm"])
        gate, up = h @ w["w_gate"], h @ w["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["w_down"]
    x = rms(x, p["final_norm"])
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


def run_steps(weights, config, streams, *, portable=False):
    """Runs STEPS through cpu_decoder.step (jitted, pool donated); yields per step the
    (sequence, position) of each valid token and its logits."""
    pool = cpu_decoder.create_pool(config, 12, BLOCK)
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


def check_against_reference(params, config, *, portable=False, atol=2e-4):
    streams = streams_for(config)
    ref64 = float64(params)
    refs = [reference_logits(ref64, config, s) for s in streams]
    weights = cpu_decoder.prepare(params, config)
    checked = 0
    for where, logits in run_steps(weights, config, streams, portable=portable):
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
    check_against_reference(params, CONFIG)


WINDOWED = dataclasses.replace(CONFIG, dim=32, n_heads=2, n_kv_heads=1, attention_window=5,
                               tie_embeddings=False, vocab_size=37)


def test_window_untied_head_and_head_dim_16():
    check_against_reference(random_params(WINDOWED, seed=3), WINDOWED)


@pytest.mark.slow  # a second g++ build of the kernel (~10-20 s); decoder.cc itself has no
# ISA-specific code; gemm.h's scalar paths are tested in tests/test_cpu_quant_matmul.py
def test_portable_build():
    params = quantize_params(random_params(WINDOWED, seed=4), "int4", group_size=8)
    check_against_reference(params, WINDOWED, portable=True)


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
    assert "int8" in cpu_decoder.unsupported(CONFIG, params, kv_dtype="int8")
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


def test_copy_blocks_copies_every_layer_and_nothing_else():
    pool = cpu_decoder.create_pool(CONFIG, 6, BLOCK)
    rng = np.random.default_rng(2)
    k = rng.standard_normal(pool.k.shape).astype(np.float32)
    v = rng.standard_normal(pool.v.shape).astype(np.float32)
    out = cpu_decoder.copy_blocks(cpu_decoder.KVPool(jnp.asarray(k), jnp.asarray(v)),
                                  [4, 1], [2, 5])
    want_k, want_v = k.copy(), v.copy()
    want_k[:, [2, 5]], want_v[:, [2, 5]] = k[:, [4, 1]], v[:, [4, 1]]
    np.testing.assert_array_equal(np.asarray(out.k), want_k)
    np.testing.assert_array_equal(np.asarray(out.v), want_v)
