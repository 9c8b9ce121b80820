"""An independent float64 NumPy implementation of the hpllm decoder, written from the spec.

Used only by tests/test_model.py as the ground truth for the JAX model. It deliberately
differs in structure from hpllm/model: plain matrices instead of einsums over head axes,
explicit loops over batch rows and heads, index-causal masking inside each segment (the JAX
code masks by position value), and K/V heads selected per query head by index arithmetic
rather than by a grouped reshape.

Specification (Llama decoder):
  x = embed[tokens]                     (+ pos_embed[positions] when pos_embedding == "learned")
  per layer l:
      h = x + Attn_l(RMSNorm(x; attn_norm_l))
      x = h + SwiGLU_l(RMSNorm(h; mlp_norm_l))
  x = RMSNorm(x; final_norm)
  logits = x @ embed.T  (tied)  or  x @ unembed  (untied)

  RMSNorm(x; w) = x / sqrt(mean(x^2) + eps) * w
  RoPE (rotate-half): inv_freq_j = theta^(-2j/Dh), j < Dh/2; angle = pos * inv_freq_j;
      (x_j, x_{j+Dh/2}) -> (x_j cos - x_{j+Dh/2} sin,  x_{j+Dh/2} cos + x_j sin)
  Attention: query head h reads KV head h // (H / K); scores / sqrt(Dh); query i sees key j
      iff j <= i (sequence index) and segment_ids[i] == segment_ids[j].
  SwiGLU(x) = (silu(x W_gate) * (x W_up)) W_down
"""

from __future__ import annotations

import numpy as np


def to_numpy64(params) -> dict:
    """Any nested dict of array-likes -> the same nesting of float64 numpy arrays."""
    if isinstance(params, dict):
        return {k: to_numpy64(v) for k, v in params.items()}
    return np.array(params, dtype=np.float64)


def rms_norm(x, w, eps):
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w


def silu(z):
    return z / (1.0 + np.exp(-z))


def rope(x, positions, theta):
    """x: (S, Dh) for one head of one row; positions: (S,)."""
    s, dh = x.shape
    half = dh // 2
    out = np.empty_like(x)
    for j in range(half):
        inv_freq = theta ** (-2.0 * j / dh)
        ang = positions.astype(np.float64) * inv_freq
        c, sn = np.cos(ang), np.sin(ang)
        a, b = x[:, j], x[:, j + half]
        out[:, j] = a * c - b * sn
        out[:, j + half] = b * c + a * sn
    return out


def softmax(z):
    z = z - np.max(z)
    e = np.exp(z)
    return e / np.sum(e)


def attention_row(q, k, v, segments):
    """One batch row, one head. q, k, v: (S, Dh); returns (S, Dh)."""
    s, dh = q.shape
    out = np.zeros((s, dh))
    for i in range(s):
        visible = [j for j in range(i + 1) if segments[j] == segments[i]]
        scores = np.array([q[i] @ k[j] for j in visible]) / np.sqrt(dh)
        p = softmax(scores)
        out[i] = sum(pj * v[j] for pj, j in zip(p, visible))
    return out


def forward(params, tokens, positions, cfg, segment_ids=None):
    """Logits (B, S, V) in float64. params: nested dict as produced by to_numpy64."""
    tokens = np.asarray(tokens)
    positions = np.asarray(positions)
    bsz, seq = tokens.shape
    if segment_ids is None:
        segment_ids = np.ones((bsz, seq), dtype=np.int64)
    segment_ids = np.asarray(segment_ids)
    dim, n_heads, n_kv = cfg.dim, cfg.n_heads, cfg.n_kv_heads
    dh = dim // n_heads
    group = n_heads // n_kv
    lp = params["layers"]

    logits = np.zeros((bsz, seq, cfg.vocab_size))
    for b in range(bsz):
        x = params["embed"][tokens[b]].copy()  # (S, D)
        if cfg.pos_embedding == "learned":
            x = x + params["pos_embed"][positions[b]]
        for layer in range(cfg.n_layers):
            hn = rms_norm(x, lp["attn_norm"][layer], cfg.norm_eps)
            wq = lp["wq"][layer].reshape(dim, n_heads * dh)
            wk = lp["wk"][layer].reshape(dim, n_kv * dh)
            wv = lp["wv"][layer].reshape(dim, n_kv * dh)
            wo = lp["wo"][layer].reshape(n_heads * dh, dim)
            q_all, k_all, v_all = hn @ wq, hn @ wk, hn @ wv
            heads_out = np.zeros((seq, n_heads * dh))
            for h in range(n_heads):
                kvh = h // group
                q = q_all[:, h * dh:(h + 1) * dh]
                k = k_all[:, kvh * dh:(kvh + 1) * dh]
                v = v_all[:, kvh * dh:(kvh + 1) * dh]
                if cfg.pos_embedding == "rope":
                    q = rope(q, positions[b], cfg.rope_theta)
                    k = rope(k, positions[b], cfg.rope_theta)
                heads_out[:, h * dh:(h + 1) * dh] = attention_row(q, k, v, segment_ids[b])
            hres = x + heads_out @ wo
            hn2 = rms_norm(hres, lp["mlp_norm"][layer], cfg.norm_eps)
            mlp = (silu(hn2 @ lp["w_gate"][layer]) * (hn2 @ lp["w_up"][layer])) @ lp["w_down"][layer]
            x = hres + mlp
        x = rms_norm(x, params["final_norm"], cfg.norm_eps)
        unembed = params["embed"].T if cfg.tie_embeddings else params["unembed"]
        logits[b] = x @ unembed
    return logits


def log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def masked_mean_xent(logits, targets, mask):
    """sum(mask * -log p(target)) / sum(mask)."""
    lsm = log_softmax(logits)
    nll = -np.take_along_axis(lsm, np.asarray(targets)[..., None], axis=-1)[..., 0]
    mask = np.asarray(mask, dtype=np.float64)
    return float(np.sum(nll * mask) / np.sum(mask))
