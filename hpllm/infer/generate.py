"""Single-stream generation with a dense KV cache (gpt-fast style): one jitted prefill, one
jitted decode step reused for every token. The paged, batched engine builds on the same
`forward(..., cache=...)` interface."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.config import ModelConfig
from hpllm.infer.sampling import _filter
from hpllm.model.transformer import forward, init_cache, unstack_layers


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, or no room left in the context)."""


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample_logits(logits, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Greedy when temperature == 0; else sample from softmax(logits / T) restricted to the
    top k tokens and then to the smallest set of most likely tokens whose probability
    reaches top_p (nucleus sampling; the most likely token always stays)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k or top_p < 1.0:  # the engine sampler's filter, one row's parameters per row
        rows = logits.shape[0]
        logits = _filter(logits, jnp.full(rows, top_k), jnp.full(rows, top_p, jnp.float32),
                         jnp.zeros(rows, jnp.float32))
    return jax.random.categorical(key, logits, axis=-1)


def _bucket(n: int, limit: int, smallest: int = 16) -> int:
    """n rounded up to a power of two (at least `smallest`), capped at `limit`: one compiled
    prefill and decode serve all prompt and cache lengths in a bucket."""
    return min(limit, max(smallest, 1 << (n - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _prefill(params, tokens, length, cache, config, dtype):
    """Tokens are padded to a bucket; padding after the prompt writes cache slots that decode
    overwrites before any query can see them (a slot is written at its position first)."""
    positions = jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype)
    return logits[:, length - 1], cache


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _decode(params, token, position, cache, config, dtype):
    logits, cache = forward(params, token[:, None], position[None, None], config, cache=cache,
                            dtype=dtype)
    return logits[:, -1], cache


def generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids=(), dtype=jnp.float32, kv_dtype: str | None = None):
    """Yields new token ids one at a time (so callers can stream them).
    kv_dtype="int8" keeps the KV cache as int8 with per-token-per-head scales."""
    if not prompt:
        raise PromptError("generate needs a non-empty prompt")
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= end:
        raise PromptError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                          f"{config.max_seq_len}")
    params = unstack_layers(params)  # decode reads each layer's weights as its own array
    cache = init_cache(config, 1, _bucket(end, config.max_seq_len, 256), dtype, kv_dtype)
    padded = prompt + [0] * (_bucket(len(prompt), cache["k"].shape[2]) - len(prompt))
    logits, cache = _prefill(params, jnp.asarray([padded], jnp.int32), jnp.int32(len(prompt)),
                             cache, config, dtype)
    key = jax.random.key(seed)
    for position in range(len(prompt), end):
        key, subkey = jax.random.split(key)
        token = sample_logits(logits, subkey, temperature, top_k, top_p)
        token_id = int(token[0])
        yield token_id
        if token_id in stop_ids or position + 1 >= end:
            return
        logits, cache = _decode(params, token.astype(jnp.int32), jnp.int32(position), cache,
                                config, dtype)
