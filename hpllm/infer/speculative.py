"""Speculative decoding (Leviathan, Kalman & Matias 2023; Chen et al. 2023).

A cheap draft proposes gamma tokens x_1..x_g from its distributions q_1..q_g; the target
scores the last context token and all g drafts in one pass, giving p_1..p_{g+1}. Draft i is
kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is
drawn from norm(max(0, p_i - q_i)); if all g are kept a bonus token is drawn from p_{g+1}.
Every emitted token is then distributed exactly as the target's (temperature, top-k and top-p
applied identically to p and q), and under greedy decoding (p, q one-hot) the output is the
target's greedy output token for token.

The dense KV cache needs no rollback: slot = position, and a query only sees slots <= its
position, so the cache entries of rejected drafts are overwritten by the next pass before any
query can read them. Rolling back is just resetting the position counter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from hpllm.config import ConfigError, ModelConfig
from hpllm.infer.generate import PromptError, _bucket, _prefill
from hpllm.infer.sampling import _filter
from hpllm.model.transformer import forward, init_cache, unstack_layers


def filtered_probs(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """The sampling distribution (..., V) of logits (..., V): one-hot argmax when greedy, else
    softmax(logits / T) after the engine's top-k/top-p filter (hpllm.infer.sampling._filter),
    so target and draft distributions are filtered by the very same code."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]) / temperature
    if top_k > 0 or top_p < 1.0:
        rows = flat.shape[0]
        flat = _filter(flat, jnp.full((rows,), top_k, jnp.int32),
                       jnp.full((rows,), top_p, jnp.float32), jnp.zeros((rows,), jnp.float32))
    return jax.nn.softmax(flat, axis=-1).reshape(shape)


def sample_with_uniform(probs, u):
    """Inverse-CDF draw from probs (V,) (need not be normalised) with u in [0, 1): a pure
    function of u, so the accept/reject step is testable over all its random outcomes.
    Zero-probability tokens are never drawn (side='right' skips flat steps of the CDF)."""
    cdf = jnp.cumsum(probs)
    index = jnp.searchsorted(cdf, u * cdf[-1], side="right")
    return jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)


def accept_reject(p, q, draft, u_accept, u_next, n_proposed=None):
    """The Leviathan et al. step as a pure function.

    p (g+1, V): the target's distributions at the g+1 scored positions (p[i] conditions on
    draft[:i]); q (g, V): the draft's; draft (g,) int: the proposed tokens; u_accept (g,) and
    u_next (): uniforms in [0, 1). Returns (n_accepted, next_token): the emitted tokens are
    draft[:n_accepted] followed by next_token, drawn from norm(max(0, p - q)) at the first
    rejection, or from p[n_accepted] (the bonus token) when all are accepted.
    n_proposed (traced int <= g, default g): only the first n_proposed drafts are real (a batch
    row whose draft proposed fewer tokens); the rest are padding and never accepted.
    """
    g = draft.shape[0]
    n_proposed = g if n_proposed is None else n_proposed
    idx = jnp.arange(g)
    p_x = p[idx, draft]
    q_x = q[idx, draft]
    # u < p/q accepts with probability min(1, p/q); q_x > 0 for any token the draft could
    # propose, so no 0/0 arises for real drafts.
    accepted = (u_accept * q_x < p_x) & (idx < n_proposed)
    n = jnp.argmin(jnp.concatenate([accepted, jnp.zeros((1,), bool)])).astype(jnp.int32)
    at = jnp.minimum(n, max(g - 1, 0))
    residual = jnp.maximum(p[at] - q[at], 0.0) if g else p[0]
    # p == q up to rounding leaves no residual mass; then p itself is the right distribution.
    residual = jnp.where(residual.sum() > 0, residual, p[n])
    dist = jnp.where(n < n_proposed, residual, p[n])
    return n, sample_with_uniform(dist, u_next)


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


@dataclass
class SpeculativeStats:
    rounds: int = 0  # target verification passes
    proposed: int = 0  # draft tokens scored by the target
    accepted: int = 0
    generated: int = 0  # tokens emitted (accepted + one per round)
    gammas: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0


class AdaptiveGamma:
    """gamma grows by 2 after a round where every draft was accepted and shrinks by 1 after a
    rejection (the heuristic of Hugging Face's assisted generation), within [1, max_gamma]."""

    def __init__(self, gamma: int, max_gamma: int, adaptive: bool):
        self.gamma, self.max_gamma, self.adaptive = gamma, max_gamma, adaptive

    def update(self, n_accepted: int, n_proposed: int) -> None:
        if not self.adaptive or n_proposed == 0:
            return
        if n_accepted == n_proposed:
            self.gamma = min(self.max_gamma, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)


def speculative_generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int,
                         draft, *, gamma: int = 4, adaptive: bool = False, max_gamma: int = 8,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, stop_ids=(), dtype=jnp.float32,
                         stats: SpeculativeStats | None = None):
    """Yields new token ids, several per target pass, distributed exactly as `generate`'s
    (greedy: identical). `draft` is a proposer from hpllm.infer.drafts. Pass a
    SpeculativeStats to read acceptance figures afterwards."""
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
    length = _bucket(end + control.max_gamma + 1, config.max_seq_len + control.max_gamma + 1, 256)
    cache = init_cache(config, 1, length, dtype)
    padded = prompt + [0] * (_bucket(len(prompt), length) - len(prompt))
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
        stats.rounds += 1
        stats.proposed += g
        stats.accepted += n
        stats.gammas.append(g)
        control.update(n, g)
        for t in proposed[:n] + [token]:
            tokens.append(t)
            stats.generated += 1
            yield t
            if t in stop_ids or len(tokens) >= end:
                return
        draft.accepted(tokens, n, g)
