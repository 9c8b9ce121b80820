"""FLOP counting for the model, the numerator of MFU and of every roofline prediction."""

from __future__ import annotations

from hpllm.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token: all layer projections and the output
    projection (also when tied to the embedding). Embedding lookups and norm scales do not."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # wq, wo, wk, wv
    mlp = 3 * c.dim * c.hidden_dim
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
