"""Single-stream generation with a dense KV cache (gpt-fast style): one jitted prefill, one
jitted decode-and-sample step reused for every token and dispatched a token ahead of the
host. The paged, batched engine builds on the same `forward(..., cache=...)` interface
(hpllm.model.kv_cache).

On CPU, when the fused decoder kernel (hpllm/kernels/cpu_decoder.py) is built and supports
the model, prefill and decode run through it instead (one FFI call per step over a
one-sequence paged pool); `generate(..., cpu_kernel=False)` forces the XLA path."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ModelConfig
from hpllm.infer.sampling import _filter, pow2_bucket
from hpllm.kernels import cpu_decoder
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


_SAMPLING = ("temperature", "top_k", "top_p")


def _next(logits, key, temperature, top_k, top_p):
    """The token drawn from logits and the key to carry on: the split generate() has always
    done before each draw, so a seed keeps giving the same tokens."""
    key, subkey = jax.random.split(key)
    return sample_logits(logits, subkey, temperature, top_k, top_p).astype(jnp.int32), key


_first = jax.jit(_next, static_argnames=_SAMPLING)


@functools.partial(jax.jit, static_argnames=("config", "dtype", *_SAMPLING),
                   donate_argnames=("cache",))
def _decode_next(params, token, position, key, cache, config, dtype, temperature, top_k, top_p):
    """One token of the XLA path as one executable: (next token, next position, key, cache)."""
    logits, cache = forward(params, token[:, None], position[None], config, cache=cache,
                            dtype=dtype)
    token, key = _next(logits[:, -1], key, temperature, top_k, top_p)
    return token, position + 1, key, cache


KERNEL_BLOCK_SIZE = 64  # positions per block of the kernel path's one-sequence pool


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("pool",))
def kernel_step(weights, pool, tokens, positions, tables, logits_index, config):
    """One step of the kernel path: tokens of the one sequence (slot 0), padding at -1."""
    return cpu_decoder.step(weights, pool, tokens, positions, jnp.zeros_like(tokens), tables,
                            logits_index, config=config)


@functools.partial(jax.jit, static_argnames=("config", *_SAMPLING), donate_argnames=("pool",))
def _kernel_next(weights, pool, token, position, key, tables, config, temperature, top_k,
                 top_p):
    """One token of the kernel path as one executable: (next token, next position, key,
    pool)."""
    logits, pool = cpu_decoder.step(weights, pool, token, position, jnp.zeros_like(token),
                                    tables, jnp.zeros_like(token), config=config)
    token, key = _next(logits, key, temperature, top_k, top_p)
    return token, position + 1, key, pool


def kernel_unsupported(params, config: ModelConfig, dtype=jnp.float32,
                       kv_dtype: str = "float32") -> str | None:
    """Why generate() cannot take the fused CPU decoder path here (None: it can)."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    if jnp.dtype(dtype) != jnp.float32:
        return f"compute dtype {jnp.dtype(dtype).name} (the kernel computes in float32)"
    if not cpu_decoder.available():
        return "the cpu_decoder kernel is not available (disabled or not built)"
    return cpu_decoder.unsupported(config, params, kv_dtype)


_PREPARED: list = []  # [(param leaves, config, weights)]: the last model's kernel layout


def prepared_weights(params, config: ModelConfig):
    """cpu_decoder.prepare(params), reused while the same parameter arrays come back."""
    leaves = jax.tree.leaves(params)
    if _PREPARED:
        old, old_config, weights = _PREPARED[0]
        if old_config == config and len(old) == len(leaves) and all(
                a is b for a, b in zip(old, leaves)):
            return weights
    weights = cpu_decoder.prepare(params, config)
    _PREPARED[:] = [(leaves, config, weights)]
    return weights


def _kernel_generate(params, config, prompt, end, temperature, top_k, top_p, seed, stop_ids,
                     kv_dtype):
    weights = prepared_weights(params, config)
    length = pow2_bucket(end, 256, config.max_seq_len)
    blocks = math.ceil(length / KERNEL_BLOCK_SIZE)
    pool = cpu_decoder.create_pool(config, blocks + 1, KERNEL_BLOCK_SIZE, kv_dtype)  # + null
    tables = jnp.arange(1, blocks + 1, dtype=jnp.int32)[None]
    padded = pow2_bucket(len(prompt), 16, length)  # one compiled prefill per bucket
    tokens = jnp.asarray(prompt + [0] * (padded - len(prompt)), jnp.int32)
    positions = jnp.where(jnp.arange(padded) < len(prompt), jnp.arange(padded), -1)
    last = jnp.asarray([len(prompt) - 1], jnp.int32)
    logits, pool = kernel_step(weights, pool, tokens, positions.astype(jnp.int32), tables,
                                last, config)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def advance(token, position, key):
        nonlocal pool
        token, position, key, pool = _kernel_next(weights, pool, token, position, key, tables,
                                                  config, **sampling)
        return token, position, key

    yield from _pipelined(_first(logits, jax.random.key(seed), **sampling),
                          range(len(prompt), end), stop_ids, advance)


def _pipelined(first, positions: range, stop_ids, advance):
    """Yields the token at each position, from first = (token, key) and advance(token,
    position, key) -> (next token, next position, key), until a stop id or the last position.
    Why this shape: advance is one asynchronous dispatch whose inputs are the previous
    step's outputs, so the step for token n + 1 is queued before token n is read back to
    the host; the kernel never waits on Python's sampling, int() or the caller's handling
    of a token. A stop id costs one discarded step (the cache is private to the call)."""
    token, key = first
    position = jnp.full(1, positions.start, jnp.int32)
    for p in positions:
        last = p + 1 == positions.stop
        if not last:
            following, position, key = advance(token, position, key)
        token_id = int(np.asarray(token)[0])  # a host copy; token[0] would be a dispatch
        yield token_id
        if last or token_id in stop_ids:
            return
        token = following


def generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids=(), dtype=jnp.float32, kv_dtype: str = "float32",
             cpu_kernel: bool | None = None):
    """Yields new token ids one at a time (so callers can stream them). `dtype` is the
    compute dtype; kv_dtype (float32, bfloat16 or int8) the KV cache's: int8 keeps codes
    with per-token-per-head scales. cpu_kernel: None runs through the fused CPU decoder
    when `kernel_unsupported` finds nothing against it, False always takes the XLA path,
    True requires the kernel (ValueError saying why not)."""
    if not prompt:
        raise PromptError("generate needs a non-empty prompt")
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= end:
        raise PromptError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                          f"{config.max_seq_len}")
    if cpu_kernel is not False:
        reason = kernel_unsupported(params, config, dtype, kv_dtype)
        if reason is None:
            yield from _kernel_generate(params, config, prompt, end, temperature, top_k, top_p,
                                        seed, stop_ids, kv_dtype)
            return
        if cpu_kernel:
            raise ValueError(f"generate(cpu_kernel=True): {reason}")
    params = unstack_layers(params)  # decode reads each layer's weights as its own array
    cache = DenseKVCache.create(config, 1, pow2_bucket(end, 256, config.max_seq_len), kv_dtype)
    # one compiled prefill and decode serve all prompt and cache lengths in a bucket
    padded = prompt + [0] * (pow2_bucket(len(prompt), 16, cache.length) - len(prompt))
    logits, cache = _prefill(params, jnp.asarray([padded], jnp.int32), jnp.int32(len(prompt)),
                             cache, config, dtype)

    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def advance(token, position, key):
        nonlocal cache
        token, position, key, cache = _decode_next(params, token, position, key, cache,
                                                   config, dtype, **sampling)
        return token, position, key

    yield from _pipelined(_first(logits, jax.random.key(seed), **sampling),
                          range(len(prompt), end), stop_ids, advance)
