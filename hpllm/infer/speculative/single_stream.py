"""Speculative decoding of one stream with a dense KV cache (`hpllm generate --speculative`):
a draft proposes, one target pass verifies, accept/reject on device
(hpllm.infer.speculative.accept), several tokens per target pass.

The dense KV cache needs no rollback: slot = position, and a query only sees slots <= its
position, so the cache entries of rejected drafts are overwritten by the next pass before any
query can read them. Rolling back is just resetting the position counter.

A draft here has three methods:
    start(tokens, cache_length, dtype)         once, after the target's prefill
    propose(tokens, g, key, **sampling) -> (list of <= g token ids, q (len, V) float32)
    accepted(tokens, n_accepted, n_proposed)   after each verification (tokens now extended)
NgramDraft (hpllm.infer.speculative.proposers) has them; ModelDraft runs a draft model (the
target's first layers, or a distilled student) with its own dense cache.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError, ModelConfig
from hpllm.infer.generate import PromptError, _prefill
from hpllm.infer.sampling import SamplingParams, pow2_bucket
from hpllm.infer.speculative.accept import accept_reject, filtered_probs, sample_with_uniform
from hpllm.infer.speculative.control import AdaptiveGamma, SpeculativeStats, draft_cached_until
from hpllm.infer.speculative.proposers import (DraftError, NgramDraft, check_draft_vocab,
                                               first_layers, load_distilled_draft)
from hpllm.infer.text import Stats, text_pieces
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, unstack_layers


@functools.partial(jax.jit, static_argnames=("config", "dtype", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _draft_step(params, tokens, start, cache, key, config, dtype, temperature, top_k, top_p):
    """Feed tokens (1, c) at positions start..; sample the next token from the last
    position's filtered distribution q. Returns (token (1,), q (V,), cache)."""
    positions = start + jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype,
                            logits_at=jnp.asarray([tokens.shape[1] - 1]))
    q = filtered_probs(logits[0], temperature, top_k, top_p)
    return sample_with_uniform(q, jax.random.uniform(key))[None], q, cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _verify(params, tokens, start, cache, q, draft, key, config, dtype, temperature, top_k,
            top_p):
    """Score [last context token, draft...] (1, g+1) at positions start.. in one pass and run
    the accept/reject step on device; only (n_accepted, next_token) go back to the host."""
    positions = start + jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype)
    p = filtered_probs(logits[0], temperature, top_k, top_p)
    k_accept, k_next = jax.random.split(key)
    u_accept = jax.random.uniform(k_accept, draft.shape)
    n, token = accept_reject(p, q, draft, u_accept, jax.random.uniform(k_next))
    return n, token, cache


class ModelDraft:
    """An autoregressive draft model with its own dense KV cache.

    Its cache holds positions < n_cached of the agreed context; proposing first feeds the
    context tokens it has not seen (1, or 2 after a round where every draft was accepted:
    the last draft and the bonus token), then one token per further draft.
    """

    def __init__(self, params, config: ModelConfig, name: str = "draft"):
        self.params, self.config, self.name = unstack_layers(params), config, name
        self.cache = None
        self.n_cached = 0

    def start(self, tokens, cache_length, dtype=jnp.float32):
        self.dtype = dtype
        self.cache = DenseKVCache.create(self.config, 1, cache_length, jnp.dtype(dtype).name)
        context = list(tokens[:-1])
        self.n_cached = len(context)
        if context:
            padded = context + [0] * (pow2_bucket(len(context), 16, cache_length) - len(context))
            _, self.cache = _prefill(self.params, jnp.asarray([padded], jnp.int32),
                                     jnp.int32(len(context)), self.cache, self.config, dtype)

    def propose(self, tokens, g, key, temperature=0.0, top_k=0, top_p=1.0):
        self._start = len(tokens) - 1  # the position of the last context token
        if g == 0:
            return [], jnp.zeros((0, self.config.vocab_size), jnp.float32)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        feed = jnp.asarray([tokens[self.n_cached:]], jnp.int32)
        start = self.n_cached
        drafted, qs = [], []
        for key_i in jax.random.split(key, g):
            token, q, self.cache = _draft_step(self.params, feed, jnp.int32(start), self.cache,
                                               key_i, self.config, self.dtype, **sampling)
            start += feed.shape[1]
            feed = token[None]  # stays on device: no host round trip between draft steps
            drafted.append(token)
            qs.append(q)
        return [int(t) for t in np.asarray(jnp.concatenate(drafted))], jnp.stack(qs)

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
                         draft, *, gamma: int = 4, adaptive: bool = False, max_gamma: int = 8,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, stop_ids=(), dtype=jnp.float32,
                         stats: SpeculativeStats | None = None):
    """Yields new token ids, several per target pass, distributed exactly as `generate`'s
    (greedy: identical). `draft`: see the module docstring. Pass a SpeculativeStats to read
    acceptance figures afterwards."""
    if not prompt:
        raise PromptError("generate needs a non-empty prompt")
    if gamma < 1 or (adaptive and max_gamma < gamma):
        raise ConfigError(f"gamma must be >= 1 (and <= max_gamma when adaptive), got {gamma}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= end:
        raise PromptError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len "
                          f"{config.max_seq_len}")
    stats = stats if stats is not None else SpeculativeStats()
    control = AdaptiveGamma(gamma, max_gamma if adaptive else gamma, adaptive)
    params = unstack_layers(params)
    # Drafts run past `end` by up to gamma slots; their writes must land inside the cache.
    length = pow2_bucket(end + control.max_gamma + 1, 256,
                         config.max_seq_len + control.max_gamma + 1)
    cache = DenseKVCache.create(config, 1, length, jnp.dtype(dtype).name)  # compute dtype
    padded = prompt + [0] * (pow2_bucket(len(prompt), 16, length) - len(prompt))
    first_logits, cache = _prefill(params, jnp.asarray([padded], jnp.int32),
                                   jnp.int32(len(prompt)), cache, config, dtype)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)
    key, k0 = jax.random.split(key)
    # The first new token comes from the prefill, as in plain decoding.
    first = sample_with_uniform(filtered_probs(first_logits[0], **sampling), jax.random.uniform(k0))
    tokens = list(prompt) + [int(first)]
    stats.generated += 1
    yield tokens[-1]
    if tokens[-1] in stop_ids or len(tokens) >= end:
        return
    draft.start(tokens, length, dtype)
    while True:
        # Never propose past the end: the last accepted token would have no room.
        g = max(0, min(control.gamma, end - len(tokens) - 1))
        key, k_draft, k_verify = jax.random.split(key, 3)
        proposed, q = draft.propose(tokens, g, k_draft, **sampling)
        g = len(proposed)
        draft_arr = jnp.asarray(proposed, jnp.int32)
        scored = jnp.asarray([[tokens[-1]] + proposed], jnp.int32)
        n, token, cache = _verify(params, scored, jnp.int32(len(tokens) - 1), cache, q, draft_arr,
                                  k_verify, config, dtype, **sampling)
        n, token = int(n), int(token)
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
