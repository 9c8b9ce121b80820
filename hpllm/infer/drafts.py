"""Draft proposers for speculative decoding (hpllm.infer.speculative).

A draft has two methods:
    start(tokens, cache_length, dtype)         once, after the target's prefill
    propose(tokens, g, key, **sampling) -> (list of <= g token ids, q (len, V) float32)
    accepted(tokens, n_accepted, n_proposed)   after each verification (tokens now extended)

ModelDraft runs any model sharing the target's vocabulary: the target's own first k layers
with its final norm and LM head (self-speculation, LayerSkip-style: no extra weights), or a
small distilled student (hpllm.compress.distill). NgramDraft copies what followed the most
recent earlier occurrence of the context's last n tokens (prompt lookup decoding): no model,
and its q is one-hot, which the accept/reject rule handles exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError, ModelConfig
from hpllm.infer.generate import _bucket, _prefill
from hpllm.infer.speculative import filtered_probs, sample_with_uniform
from hpllm.model.transformer import forward, init_cache, unstack_layers


class DraftError(ConfigError):
    """A draft that cannot serve this target (vocabulary, layer count, none cached)."""


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
        self.cache = init_cache(self.config, 1, cache_length, dtype)
        context = list(tokens[:-1])
        self.n_cached = len(context)
        if context:
            padded = context + [0] * (_bucket(len(context), cache_length) - len(context))
            _, self.cache = _prefill(self.params, jnp.asarray([padded], jnp.int32),
                                     jnp.int32(len(context)), self.cache, self.config, dtype)

    def propose(self, tokens, g, key, temperature=0.0, top_k=0, top_p=1.0):
        self._start_len = len(tokens)
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
        # Drafts 1..g-1 were fed; those the target kept are valid context in our cache.
        if n_proposed == 0:  # nothing was fed this round
            return
        self.n_cached = self._start_len + min(n_accepted, max(n_proposed - 1, 0))


def self_draft(params, config: ModelConfig, n_layers: int) -> ModelDraft:
    """LayerSkip-style self-speculation: the target's first n_layers layers, then its final
    norm and (tied) LM head. Shares the target's weights; keeps its own n_layers-deep cache
    (the first layers' keys/values equal the target's, but a separate cache keeps the draft
    independent of the target's cache layout: a small duplicate, n_layers/L of the cache)."""
    if not 1 <= n_layers < config.n_layers:
        raise DraftError(f"draft layers must be in [1, {config.n_layers - 1}] for a "
                         f"{config.n_layers}-layer target, got {n_layers}")
    params = unstack_layers(params)
    sliced = {**params, "layers": params["layers"][:n_layers]}
    return ModelDraft(sliced, dataclasses.replace(config, n_layers=n_layers),
                      name=f"self-{n_layers}")


def model_draft(params, config: ModelConfig, target_config: ModelConfig) -> ModelDraft:
    """A separately trained draft (e.g. `hpllm distill`); it must share the target's vocab."""
    if config.vocab_size != target_config.vocab_size:
        raise DraftError(f"draft vocabulary ({config.vocab_size}) differs from the target's "
                         f"({target_config.vocab_size}); distill the draft on the target's "
                         "tokenizer")
    return ModelDraft(params, config, name="distilled")


class NgramDraft:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (n from max_ngram down to min_ngram) and propose the tokens that followed it."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

    def start(self, tokens, cache_length, dtype=jnp.float32):
        pass

    def lookup(self, tokens, g) -> list[int]:
        ids = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            pattern = ids[-n:]
            # windows starting at 0..len-n-1: every occurrence except the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == pattern).all(axis=1))
            if hits.size:
                follow = hits[-1] + n
                return ids[follow:follow + g].tolist()
        return []

    def propose(self, tokens, g, key, temperature=0.0, top_k=0, top_p=1.0):
        proposed = self.lookup(tokens, g) if g else []
        q = jax.nn.one_hot(jnp.asarray(proposed, jnp.int32), self.vocab_size, dtype=jnp.float32)
        return proposed, q

    def accepted(self, tokens, n_accepted, n_proposed):
        pass


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
        from hpllm.compress.distill import load_distilled

        try:
            student_config, student = load_distilled()
        except FileNotFoundError as e:
            raise DraftError(str(e)) from None
        return model_draft(student, student_config, config)
    raise DraftError(f"unknown draft {kind!r} (draft, self or ngram)")


def stream_speculative_text(model, prompt: str, sampling, kind: str, gamma: int = 4,
                            draft_layers: int = 0, adaptive: bool = True, stats=None):
    """Text pieces of a speculative continuation of `prompt` (hpllm.infer.text.Sampling), and
    the SpeculativeStats filled in as it runs (for the CLI's summary line)."""
    from hpllm.infer.speculative import SpeculativeStats, speculative_generate
    from hpllm.infer.text import Stats, text_pieces

    tok = model.tokenizer
    ids = tok.encode(prompt)
    spec = SpeculativeStats()
    draft = make_draft(kind, model, draft_layers)
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(ids)
    yield from text_pieces(
        speculative_generate(model.params, model.config, ids, sampling.max_tokens, draft,
                             gamma=gamma, adaptive=adaptive, max_gamma=max(8, gamma),
                             temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, seed=sampling.seed, stop_ids=tok.stop_ids,
                             stats=spec),
        tok, stats)
    print(f"\n[speculative {draft.name}: acceptance {spec.acceptance_rate:.2f}, "
          f"{spec.tokens_per_round:.2f} tokens per target pass]", file=__import__("sys").stderr)
