"""Speculative steps for a batch of streams: every round, each row proposes up to gamma
tokens by prompt lookup (hpllm.infer.drafts.NgramDraft, host-side and free), one target pass
scores all rows' [last token, drafts...] at their own positions, and `accept_reject` runs per
row (vmapped) with a per-row count of real proposals. Rows advance by different amounts; the
dense cache needs no rollback (slot = position, per row).

This is a static batch over the dense KV cache (the same `forward(..., cache=...)` the
single-stream loop uses), not the paged continuous-batching EngineCore: rows do not join or
leave mid-run, and only the n-gram draft is batched (a model draft would need a batched draft
cache). docs/perf/speculative.md lists what the paged engine would need.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError, ModelConfig
from hpllm.infer.drafts import NgramDraft
from hpllm.infer.generate import PromptError, _bucket
from hpllm.infer.speculative import accept_reject, filtered_probs, sample_with_uniform
from hpllm.model.transformer import forward, init_cache, unstack_layers


@functools.partial(jax.jit, static_argnames=("config", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _batch_prefill(params, tokens, lengths, cache, key, config, temperature, top_k, top_p):
    """Prompts (B, S) right-padded; each row's first new token from its last prompt position."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    logits, cache = forward(params, tokens, positions, config, cache=cache,
                            logits_at=lengths - 1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    u = jax.random.uniform(key, lengths.shape)
    return jax.vmap(sample_with_uniform)(probs, u), cache


@functools.partial(jax.jit, static_argnames=("config", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _batch_verify(params, tokens, starts, cache, drafts, n_proposed, key, config, temperature,
                  top_k, top_p):
    """tokens (B, g+1) = [last, drafts...] at positions starts[b]..; per-row accept/reject."""
    positions = starts[:, None] + jnp.arange(tokens.shape[1])[None]
    logits, cache = forward(params, tokens, positions, config, cache=cache)
    p = filtered_probs(logits, temperature, top_k, top_p)  # (B, g+1, V)
    q = jax.nn.one_hot(drafts, config.vocab_size, dtype=jnp.float32)  # n-gram: one-hot
    b, g = drafts.shape
    k_accept, k_next = jax.random.split(key)
    n, token = jax.vmap(accept_reject)(p, q, drafts, jax.random.uniform(k_accept, (b, g)),
                                       jax.random.uniform(k_next, (b,)), n_proposed)
    return n, token, cache


def batched_speculative_generate(params, config: ModelConfig, prompts: list[list[int]],
                                 max_new_tokens: int, *, gamma: int = 4, temperature: float = 0.0,
                                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=(),
                                 max_ngram: int = 3, stats: dict | None = None):
    """New token ids of every prompt (a list per row), decoded together with n-gram
    speculation; greedy rows equal `generate`'s output for that prompt alone."""
    if not prompts or any(not p for p in prompts):
        raise PromptError("every prompt must be non-empty")
    if gamma < 1:
        raise ConfigError(f"gamma must be >= 1, got {gamma}")
    ends = [min(len(p) + max_new_tokens, config.max_seq_len) for p in prompts]
    if any(len(p) >= e for p, e in zip(prompts, ends)):
        raise PromptError(f"a prompt leaves no room in max_seq_len {config.max_seq_len}")
    params = unstack_layers(params)
    b = len(prompts)
    length = _bucket(max(ends) + gamma + 1, config.max_seq_len + gamma + 1, 256)
    cache = init_cache(config, b, length)
    width = _bucket(max(len(p) for p in prompts), length)
    padded = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)
    key, k0 = jax.random.split(key)
    first, cache = _batch_prefill(params, jnp.asarray(padded),
                                  jnp.asarray([len(p) for p in prompts], jnp.int32), cache, k0,
                                  config, **sampling)
    seqs = [list(p) + [int(t)] for p, t in zip(prompts, np.asarray(first))]
    done = [s[-1] in stop_ids or len(s) >= e for s, e in zip(seqs, ends)]
    ngram = NgramDraft(config.vocab_size, max_ngram=max_ngram)
    stats = stats if stats is not None else {}
    stats.update(rounds=0, proposed=0, accepted=0)
    while not all(done):
        drafts = np.zeros((b, gamma), np.int32)
        n_prop = np.zeros(b, np.int32)
        for i, s in enumerate(seqs):
            if not done[i]:
                proposal = ngram.lookup(s, max(0, min(gamma, ends[i] - len(s) - 1)))
                drafts[i, :len(proposal)] = proposal
                n_prop[i] = len(proposal)
        # A finished row rescores its own last slots (harmless rewrites), results ignored.
        scored = np.concatenate([np.asarray([[s[-1]] for s in seqs], np.int32), drafts], axis=1)
        starts = np.asarray([len(s) - 1 for s in seqs], np.int32)
        key, k = jax.random.split(key)
        n, token, cache = _batch_verify(params, jnp.asarray(scored), jnp.asarray(starts), cache,
                                        jnp.asarray(drafts), jnp.asarray(n_prop), k, config,
                                        **sampling)
        n, token = np.asarray(n), np.asarray(token)
        stats["rounds"] += 1
        for i, s in enumerate(seqs):
            if done[i]:
                continue
            stats["proposed"] += int(n_prop[i])
            stats["accepted"] += int(n[i])
            for t in list(drafts[i, :n[i]]) + [token[i]]:
                s.append(int(t))
                if s[-1] in stop_ids or len(s) >= ends[i]:
                    done[i] = True
                    break
    return [s[len(p):] for s, p in zip(seqs, prompts)]
