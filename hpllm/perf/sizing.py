"""Back-of-the-envelope sizing: the questions asked before buying or reserving chips.

Each answer is one line of arithmetic from a chip's datasheet figures (`hpllm.perf.hardware`),
kept here so the CLI, the roofline and a notebook all use the same formulas. Tests reproduce
the worked numbers of "How to Scale Your Model" (Austin et al., 2025).
"""

from __future__ import annotations


def mfu(achieved_flops: float, peak_flops: float) -> float:
    """Model FLOP utilisation: useful FLOP/s over the chip's peak."""
    return achieved_flops / peak_flops


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int,
                   bytes_per_value: float = 2) -> float:
    """Keys and values of every layer for `tokens` positions of one sequence."""
    return 2 * n_layers * n_kv_heads * head_dim * tokens * bytes_per_value


def chips_to_hold(n_params: float, bytes_per_param: float, chip) -> float:
    """Chips whose memory just holds the weights (nothing else: a lower bound)."""
    return n_params * bytes_per_param / chip.hbm_bytes


def chips_for_prefill(n_params: float, prompt_tokens: int, ttft_s: float, chip,
                      dtype: str = "bfloat16") -> float:
    """Chips to process a prompt within a time-to-first-token, compute-bound at peak:
    2 FLOPs per parameter per token (attention FLOPs left out, as in the worked example)."""
    return 2 * n_params * prompt_tokens / (chip.peak(dtype) * ttft_s)


def chips_for_decode_rate(n_params: float, bytes_per_param: float, tokens_per_s: float,
                          chip) -> float:
    """Chips to decode `tokens_per_s` tokens per second for one sequence: each step reads
    every weight once, so the memory bandwidth sets the rate."""
    return n_params * bytes_per_param * tokens_per_s / chip.hbm_bandwidth


def fsdp_min_batch_per_chip(chip, ici_bandwidth: float | None = None,
                            dtype: str = "bfloat16") -> float:
    """FSDP hides its weight all-gathers behind compute when the tokens per chip in a step
    exceed C / W_ici (peak FLOP/s over the chip's interconnect bandwidth)."""
    return chip.peak(dtype) / (ici_bandwidth or chip.ici_bandwidth)


def tensor_parallel_max_degree(ffn_dim: int, chip, axis_bandwidth: float | None = None,
                               dtype: str = "bfloat16") -> float:
    """Megatron tensor parallelism over Y chips stays compute-bound while F / Y exceeds
    C / W (W: the bandwidth of the mesh axis it runs over): Y < F * W / C."""
    return ffn_dim * (axis_bandwidth or chip.axis_bandwidth) / chip.peak(dtype)
