"""Speculative decoding of one stream (`hpllm generate --speculative`): a draft proposes, one
target pass verifies, accept/reject on device (hpllm.infer.speculative.accept), several
tokens per target pass.

On CPU the target (and a model draft the kernel supports) runs through the fused decoder
kernel (hpllm/kernels/cpu_decoder.py) over a one-sequence paged pool, as plain `generate`
does: the verify pass is one kernel step of gamma + 1 rows with logits for all of them, and
costs about one decode step because a step is bound by reading the weights once. Elsewhere
(or with cpu_kernel=False) both run on XLA with a dense KV cache.

Neither cache needs a rollback: a position's key/value is written at its slot by the pass
that feeds it, before any attention of that pass reads it, and a query only sees slots <= its
position. The entries of rejected drafts are overwritten by the next pass before any query
can read them; rolling back is just resetting the position counter.

A draft here has three methods:
    start(tokens, cache_length, dtype, kernel)  once, after the target's prefill
    propose(tokens, g, key, **sampling) -> (list of <= g token ids, q (len, V) float32, or
        None: a deterministic draft, or greedy decoding, where q is not read)
    accepted(tokens, n_accepted, n_proposed)    after each verification (tokens now extended)
NgramDraft (hpllm.infer.speculative.proposers) has them; ModelDraft runs a draft model (the
target's first layers, or a distilled student) with its own cache.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError, ModelConfig
from hpllm.infer.generate import (KERNEL_BLOCK_SIZE, PromptError, kernel_step, _prefill,
                                  prepared_weights, kernel_unsupported)
from hpllm.infer.sampling import SamplingParams, pow2_bucket
from hpllm.infer.speculative.accept import accept_logits, draw
from hpllm.infer.speculative.control import (AdaptiveGamma, CostModelGamma, SpeculativeStats,
                                             draft_cached_until)
from hpllm.infer.speculative.proposers import (DraftError, NgramDraft, check_draft_vocab,
                                               first_layers, load_distilled_draft)
from hpllm.infer.text import Stats, text_pieces
from hpllm.kernels import cpu_decoder
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, unstack_layers

_SAMPLING = ("temperature", "top_k", "top_p")


# -- the XLA path: a dense cache ------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "dtype") + _SAMPLING,
                   donate_argnames=("cache",))
def _dense_draft_step(params, tokens, start, cache, key, config, dtype, temperature, top_k,
                      top_p):
    """Feed tokens (c,) at positions start..; draw the next token from the last position's
    logits. Returns (token (1,), q (V,) or None, cache)."""
    positions = start + jnp.arange(tokens.shape[0])[None]
    logits, cache = forward(params, tokens[None], positions, config, cache=cache, dtype=dtype,
                            logits_at=jnp.asarray([tokens.shape[0] - 1]))
    return *draw(logits[0], key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype") + _SAMPLING,
                   donate_argnames=("cache",))
def _dense_verify(params, tokens, start, cache, q, draft, key, config, dtype, temperature,
                  top_k, top_p):
    """Score [last context token, draft...] (g+1,) at positions start.. in one pass and run
    the accept/reject step on device; only (n_accepted, next_token) go back to the host."""
    positions = start + jnp.arange(tokens.shape[0])[None]
    logits, cache = forward(params, tokens[None], positions, config, cache=cache, dtype=dtype)
    return *accept_logits(logits[0], q, draft, key, temperature, top_k, top_p), cache


class DenseModel:
    """A model and its dense KV cache on XLA (slot = position)."""

    def __init__(self, params, config: ModelConfig, length: int, dtype=jnp.float32):
        self.params, self.config, self.dtype = unstack_layers(params), config, dtype
        self.cache = DenseKVCache.create(config, 1, length, jnp.dtype(dtype).name)

    def prefill(self, tokens: list[int]):
        """Feed tokens at positions 0..; the last one's logits (1, V)."""
        padded = tokens + [0] * (pow2_bucket(len(tokens), 16, self.cache.length) - len(tokens))
        logits, self.cache = _prefill(self.params, jnp.asarray([padded], jnp.int32),
                                      jnp.int32(len(tokens)), self.cache, self.config,
                                      self.dtype)
        return logits

    def draft_step(self, tokens, start: int, key, sampling: dict):
        token, q, self.cache = _dense_draft_step(self.params, tokens, jnp.int32(start),
                                                 self.cache, key, self.config, self.dtype,
                                                 **sampling)
        return token, q

    def verify(self, tokens, start: int, q, draft, key, sampling: dict):
        n, token, self.cache = _dense_verify(self.params, tokens, jnp.int32(start), self.cache,
                                             q, draft, key, self.config, self.dtype, **sampling)
        return n, token


# -- the fused CPU kernel: a one-sequence paged pool ----------------------------------------
@functools.partial(jax.jit, static_argnames=("config",) + _SAMPLING, donate_argnames=("pool",))
def _kernel_draft_step(weights, pool, tokens, start, tables, key, config, temperature, top_k,
                       top_p):
    """_dense_draft_step as one kernel step (logits of the last fed token only)."""
    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    last = jnp.full((1,), tokens.shape[0] - 1, jnp.int32)
    logits, pool = kernel_step(weights, pool, tokens, positions, tables, last, config)
    return *draw(logits[0], key, temperature, top_k, top_p), pool


@functools.partial(jax.jit, static_argnames=("config",) + _SAMPLING, donate_argnames=("pool",))
def _kernel_verify(weights, pool, tokens, start, tables, q, draft, key, config, temperature,
                   top_k, top_p):
    """_dense_verify as one kernel step of g+1 rows, logits for every row."""
    rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    logits, pool = kernel_step(weights, pool, tokens, start + rows, tables, rows, config)
    return *accept_logits(logits, q, draft, key, temperature, top_k, top_p), pool


class KernelModel:
    """A model in the cpu_decoder kernel's layout and its one-sequence pool (blocks 1.. in
    order: block b holds positions (b-1) * KERNEL_BLOCK_SIZE ..; block 0 is the null block)."""

    def __init__(self, weights, config: ModelConfig, length: int):
        self.weights, self.config = weights, config
        blocks = math.ceil(length / KERNEL_BLOCK_SIZE)
        self.length = blocks * KERNEL_BLOCK_SIZE
        self.pool = cpu_decoder.create_pool(config, blocks + 1, KERNEL_BLOCK_SIZE)
        self.tables = jnp.arange(1, blocks + 1, dtype=jnp.int32)[None]

    def prefill(self, tokens: list[int]):
        padded = pow2_bucket(len(tokens), 16, self.length)  # one compiled prefill per bucket
        ids = jnp.asarray(tokens + [0] * (padded - len(tokens)), jnp.int32)
        positions = jnp.where(jnp.arange(padded) < len(tokens), jnp.arange(padded), -1)
        logits, self.pool = kernel_step(self.weights, self.pool, ids,
                                         positions.astype(jnp.int32), self.tables,
                                         jnp.asarray([len(tokens) - 1], jnp.int32), self.config)
        return logits

    def draft_step(self, tokens, start: int, key, sampling: dict):
        token, q, self.pool = _kernel_draft_step(self.weights, self.pool, tokens,
                                                 jnp.int32(start), self.tables, key,
                                                 self.config, **sampling)
        return token, q

    def verify(self, tokens, start: int, q, draft, key, sampling: dict):
        n, token, self.pool = _kernel_verify(self.weights, self.pool, tokens, jnp.int32(start),
                                             self.tables, q, draft, key, self.config,
                                             **sampling)
        return n, token


def use_kernel(params, config: ModelConfig, dtype, cpu_kernel: bool | None) -> bool:
    """generate()'s rule: None takes the kernel where it can run the model, False never,
    True requires it (ValueError saying why not)."""
    if cpu_kernel is False:
        return False
    reason = kernel_unsupported(params, config, dtype)
    if reason is not None and cpu_kernel:
        raise ValueError(f"speculative_generate(cpu_kernel=True): {reason}")
    return reason is None


class ModelDraft:
    """An autoregressive draft model with its own cache (a KernelModel where the target runs
    on the kernel and the kernel supports the draft, else a DenseModel).

    Its cache holds positions < n_cached of the agreed context; proposing first feeds the
    context tokens it has not seen (1, or 2 after a round where every draft was accepted:
    the last draft and the bonus token), then one token per further draft.
    """

    def __init__(self, params, config: ModelConfig, name: str = "draft"):
        self.params, self.config, self.name = unstack_layers(params), config, name
        self.model = None
        self.n_cached = 0
        self._weights = None  # the kernel layout, built on the first kernel start

    def start(self, tokens, cache_length, dtype=jnp.float32, kernel: bool = False):
        if kernel and use_kernel(self.params, self.config, dtype, None):
            if self._weights is None:
                self._weights = cpu_decoder.prepare(self.params, self.config)
            self.model = KernelModel(self._weights, self.config, cache_length)
        else:
            self.model = DenseModel(self.params, self.config, cache_length, dtype)
        context = list(tokens[:-1])
        self.n_cached = len(context)
        if context:
            self.model.prefill(context)

    @property
    def on_kernel(self) -> bool:
        return isinstance(self.model, KernelModel)

    def propose(self, tokens, g, key, temperature=0.0, top_k=0, top_p=1.0):
        self._start = len(tokens) - 1  # the position of the last context token
        if g == 0:
            return [], None
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        feed = jnp.asarray(tokens[self.n_cached:], jnp.int32)
        start = self.n_cached
        drafted, qs = [], []
        for key_i in jax.random.split(key, g):
            token, q = self.model.draft_step(feed, start, key_i, sampling)
            start += feed.shape[0]
            feed = token  # stays on device: no host round trip between draft steps
            drafted.append(token)
            qs.append(q)
        ids = [int(t) for t in np.asarray(jnp.concatenate(drafted))]
        return ids, None if qs[0] is None else jnp.stack(qs)

    def accepted(self, tokens, n_accepted, n_proposed):
        if n_proposed:  # else nothing was fed this round
            self.n_cached = draft_cached_until(self._start, n_accepted, n_proposed)


def self_draft(params, config: ModelConfig, n_layers: int) -> ModelDraft:
    """LayerSkip-style self-speculation: the target's first n_layers layers, then its final
    norm and (tied) LM head. Shares the target's weights; keeps its own n_layers-deep cache
    (the first layers' keys/values equal the target's, but a separate cache keeps the draft
    independent of the target's cache layout: a small duplicate, n_layers/L of the cache)."""
    if n_layers < 1:  # first_layers reads 0 as its default
        raise DraftError(f"draft_layers must be in [1, {config.n_layers - 1}], got {n_layers}")
    sliced, sliced_config = first_layers(unstack_layers(params), config, n_layers)
    return ModelDraft(sliced, sliced_config, name=f"self-{n_layers}")


def model_draft(params, config: ModelConfig, target_config: ModelConfig) -> ModelDraft:
    """A separately trained draft (e.g. `hpllm distill`); it must share the target's vocab."""
    check_draft_vocab(config, target_config)
    return ModelDraft(params, config, name="distilled")


def make_draft(kind: str, model, draft_layers: int = 0):
    """The draft for `hpllm generate --speculative KIND` on a PretrainedModel: "ngram",
    "self" (first draft_layers layers, default a third of the model) or "draft" (the
    distilled student cached by `hpllm distill`)."""
    config = model.config
    if kind == "ngram":
        return NgramDraft(config.vocab_size)
    if kind == "self":
        return self_draft(model.params, config, draft_layers or max(1, config.n_layers // 3))
    if kind == "draft":
        return model_draft(*load_distilled_draft(), config)
    raise DraftError(f"unknown draft {kind!r} (draft, self or ngram)")


def speculative_generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int,
                         draft, *, gamma: int = 4, adaptive: bool | str = False,
                         max_gamma: int = 8, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, stop_ids=(), dtype=jnp.float32,
                         stats: SpeculativeStats | None = None, cpu_kernel: bool | None = None):
    """Yields new token ids, several per target pass, distributed exactly as `generate`'s
    (greedy: identical). `draft`: see the module docstring. gamma: the draft length, fixed
    (adaptive=False), or the first one of an adaptive choice: adaptive=True (or "cost")
    picks each round's gamma from the measured pass and draft costs and the running
    acceptance rate (control.CostModelGamma), "heuristic" grows/shrinks it by acceptance
    (control.AdaptiveGamma). cpu_kernel: as for `generate`. Pass a SpeculativeStats to read
    acceptance figures afterwards."""
    if not prompt:
        raise PromptError("generate needs a non-empty prompt")
    if adaptive not in (False, True, "cost", "heuristic"):
        raise ConfigError(f"adaptive must be False, True, 'cost' or 'heuristic', got {adaptive!r}")
    if gamma < 1 or (adaptive and max_gamma < gamma):
        raise ConfigError(f"gamma must be >= 1 (and <= max_gamma when adaptive), got {gamma}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= end:
        raise PromptError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                          f"{config.max_seq_len}")
    stats = stats if stats is not None else SpeculativeStats()
    if adaptive in (True, "cost"):
        control = CostModelGamma(gamma, max_gamma)
    else:
        control = AdaptiveGamma(gamma, max_gamma if adaptive else gamma, bool(adaptive))
    kernel = use_kernel(params, config, dtype, cpu_kernel)
    # Drafts run past `end` by up to gamma slots; their writes must land inside the cache.
    if kernel:
        target = KernelModel(prepared_weights(params, config), config,
                             pow2_bucket(end + control.max_gamma + 1, 256))
        length = target.length
    else:
        length = pow2_bucket(end + control.max_gamma + 1, 256,
                             config.max_seq_len + control.max_gamma + 1)
        target = DenseModel(params, config, length, dtype)  # cache in the compute dtype
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)
    key, k0 = jax.random.split(key)
    # The first new token comes from the prefill, as in plain decoding.
    first, _ = draw(target.prefill(list(prompt))[0], k0, **sampling)
    tokens = list(prompt) + [int(first[0])]
    stats.generated += 1
    yield tokens[-1]
    if tokens[-1] in stop_ids or len(tokens) >= end:
        return
    draft.start(tokens, length, dtype, kernel=kernel)
    while True:
        # Never propose past the end: the last accepted token would have no room.
        g = max(0, min(control.gamma, end - len(tokens) - 1))
        key, k_draft, k_verify = jax.random.split(key, 3)
        t0 = time.perf_counter()
        proposed, q = draft.propose(tokens, g, k_draft, **sampling)
        t1 = time.perf_counter()
        g = len(proposed)
        n, token = target.verify(jnp.asarray([tokens[-1]] + proposed, jnp.int32),
                                 len(tokens) - 1, q, jnp.asarray(proposed, jnp.int32),
                                 k_verify, sampling)
        n, token = int(n), int(token)
        control.measured(g, t1 - t0, time.perf_counter() - t1)
        stats.record(g, n)
        stats.gammas.append(g)
        control.update(n, g)
        for t in proposed[:n] + [token]:
            tokens.append(t)
            stats.generated += 1
            yield t
            if t in stop_ids or len(tokens) >= end:
                return
        draft.accepted(tokens, n, g)


def stream_speculative_text(model, prompt: str, sampling: SamplingParams, draft,
                            gamma: int = 4, adaptive: bool = True, stats: Stats | None = None):
    """Text pieces of a speculative continuation of `prompt` with `draft` (see `make_draft`);
    prints the acceptance figures to stderr at the end (for the CLI's summary line)."""
    tok = model.tokenizer
    ids = tok.encode(prompt)
    spec = SpeculativeStats()
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(ids)
    yield from text_pieces(
        speculative_generate(model.params, model.config, ids, sampling.max_tokens, draft,
                             gamma=gamma, adaptive=adaptive, max_gamma=max(8, gamma),
                             temperature=sampling.temperature, top_k=max(sampling.top_k, 0),
                             top_p=sampling.top_p, seed=sampling.seed or 0,
                             stop_ids=tok.stop_ids, stats=spec),
        tok, stats)
    print(f"\n[speculative {draft.name}: acceptance {spec.acceptance_rate:.2f}, "
          f"{spec.tokens_per_round:.2f} tokens per target pass]", file=sys.stderr)
