"""Single-stream generation with a dense KV cache (gpt-fast style): one jitted prefill, one
jitted decode step reused for every token. The paged, batched engine builds on the same
`forward(..., cache=...)` interface (hpllm.model.kv_cache)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.config import ModelConfig
from hpllm.infer.sampling import _filter, pow2_bucket
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, unstack_layers


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
             stop_ids=(), dtype=jnp.float32, kv_dtype: str = "float32"):
    """Yields new token ids one at a time (so callers can stream them). `dtype` is the
    compute dtype; kv_dtype (float32, bfloat16 or int8) the KV cache's: int8 keeps codes
    with per-token-per-head scales."""
    if not prompt:
        raise PromptError("generate needs a non-empty prompt")
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= end:
        raise PromptError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                          f"{config.max_seq_len}")
    params = unstack_layers(params)  # decode reads each layer's weights as its own array
    cache = DenseKVCache.create(config, 1, pow2_bucket(end, 256, config.max_seq_len), kv_dtype)
    # one compiled prefill and decode serve all prompt and cache lengths in a bucket
    padded = prompt + [0] * (pow2_bucket(len(prompt), 16, cache.length) - len(prompt))
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
