"""Single-stream generation with a dense KV cache (gpt-fast style): one jitted prefill, one
jitted decode step reused for every token. The paged, batched engine builds on the same
`forward(..., cache=...)` interface."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.config import ModelConfig
from hpllm.model.transformer import forward, init_cache


def sample_logits(logits, key, temperature: float = 1.0, top_k: int = 0):
    """Greedy when temperature == 0; else sample from softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _prefill(params, tokens, cache, config, dtype):
    positions = jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _decode(params, token, position, cache, config, dtype):
    logits, cache = forward(params, token[:, None], position[None, None], config, cache=cache,
                            dtype=dtype)
    return logits[:, -1], cache


def generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, stop_ids=(),
             dtype=jnp.float32):
    """Yields new token ids one at a time (so callers can stream them)."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    length = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= length:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                         f"{config.max_seq_len}")
    cache = init_cache(config, 1, length, dtype)
    logits, cache = _prefill(params, jnp.asarray([prompt], jnp.int32), cache, config, dtype)
    key = jax.random.key(seed)
    for position in range(len(prompt), length):
        key, subkey = jax.random.split(key)
        token = sample_logits(logits, subkey, temperature, top_k)
        token_id = int(token[0])
        yield token_id
        if token_id in stop_ids or position + 1 >= length:
            return
        logits, cache = _decode(params, token.astype(jnp.int32), jnp.int32(position), cache,
                                config, dtype)
