"""A float64 NumPy Llama over checkpoint tensors as the files store them, written from the
published conventions, not from hpllm's code: used as ground truth by the pretrained-model
tests.

`get(name)` returns HF-named tensors in HF layout: linear weights are (out, in) and applied
as x @ W.T. RoPE comes in the two layouts found in files:
  rotate-half (HF):  dimension j pairs with j + Dh/2;
  interleaved (GGUF, llama.cpp's "normal" rope): dimension 2j pairs with 2j + 1.
Both rotate pair j by pos * theta^(-2j/Dh).
"""

from __future__ import annotations

import numpy as np


def _rope(x, positions, theta, interleaved):
    """x: (S, Dh) one head."""
    dh = x.shape[1]
    j = np.arange(dh // 2)
    ang = positions[:, None] * theta ** (-2.0 * j / dh)[None, :]
    c, s = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[:, 0::2], x[:, 1::2]
    else:
        a, b = x[:, :dh // 2], x[:, dh // 2:]
    ra, rb = a * c - b * s, b * c + a * s
    out = np.empty_like(x)
    if interleaved:
        out[:, 0::2], out[:, 1::2] = ra, rb
    else:
        out[:, :dh // 2], out[:, dh // 2:] = ra, rb
    return out


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def llama_logits(get, *, n_layers, n_heads, n_kv_heads, eps, theta, tokens, tied,
                 interleaved=False):
    """Logits (S, V) of one sequence at positions 0..S-1."""
    f64 = lambda name: np.asarray(get(name), np.float64)  # noqa: E731
    embed = f64("model.embed_tokens.weight")
    x = embed[np.asarray(tokens)]
    s, d = x.shape
    dh = d // n_heads
    positions = np.arange(s, dtype=np.float64)
    causal = np.tril(np.ones((s, s), bool))
    for layer in range(n_layers):
        pre = f"model.layers.{layer}."
        h = _rms(x, f64(pre + "input_layernorm.weight"), eps)
        q = h @ f64(pre + "self_attn.q_proj.weight").T
        k = h @ f64(pre + "self_attn.k_proj.weight").T
        v = h @ f64(pre + "self_attn.v_proj.weight").T
        heads = []
        for head in range(n_heads):
            kv = head * n_kv_heads // n_heads
            qh = _rope(q[:, head * dh:(head + 1) * dh], positions, theta, interleaved)
            kh = _rope(k[:, kv * dh:(kv + 1) * dh], positions, theta, interleaved)
            scores = np.where(causal, qh @ kh.T / np.sqrt(dh), -np.inf)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            heads.append((p / p.sum(axis=1, keepdims=True)) @ v[:, kv * dh:(kv + 1) * dh])
        x = x + np.concatenate(heads, axis=1) @ f64(pre + "self_attn.o_proj.weight").T
        h = _rms(x, f64(pre + "post_attention_layernorm.weight"), eps)
        gate = h @ f64(pre + "mlp.gate_proj.weight").T
        up = h @ f64(pre + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(pre + "mlp.down_proj.weight").T
    x = _rms(x, f64("model.norm.weight"), eps)
    return x @ (embed if tied else f64("lm_head.weight")).T


def random_llama_tensors(rng, L=2, D=32, H=4, K=2, F=64, V=50) -> dict:
    """HF-named float32 weights of a small untied Llama (scaled so activations stay O(1))."""
    dh = D // H
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(D),
         "lm_head.weight": rng.standard_normal((V, D))}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(D),
              p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(D),
              p + "self_attn.q_proj.weight": rng.standard_normal((H * dh, D)) / 4,
              p + "self_attn.k_proj.weight": rng.standard_normal((K * dh, D)) / 4,
              p + "self_attn.v_proj.weight": rng.standard_normal((K * dh, D)) / 4,
              p + "self_attn.o_proj.weight": rng.standard_normal((D, H * dh)) / 4,
              p + "mlp.gate_proj.weight": rng.standard_normal((F, D)) / 4,
              p + "mlp.up_proj.weight": rng.standard_normal((F, D)) / 4,
              p + "mlp.down_proj.weight": rng.standard_normal((D, F)) / 4}
    return {k: v.astype(np.float32) for k, v in t.items()}
