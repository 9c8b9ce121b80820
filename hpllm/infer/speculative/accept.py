"""The accept/reject rule of speculative decoding (Leviathan, Kalman & Matias 2023; Chen et
al. 2023), and the filtered distributions it compares.

A cheap draft proposes gamma tokens x_1..x_g from its distributions q_1..q_g; the target
scores the last context token and all g drafts in one pass, giving p_1..p_{g+1}. Draft i is
kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is
drawn from norm(max(0, p_i - q_i)); if all g are kept a bonus token is drawn from p_{g+1}.
Every emitted token is then distributed exactly as the target's (temperature, top-k, top-p
and min-p applied identically to p and q, by the engine sampler's filter), and under greedy
decoding (p, q one-hot) the output is the target's greedy output token for token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.infer.sampling import _filter


def row_probs(logits, temperature, top_k, top_p, min_p, filters: bool):
    """Each row's sampling distribution (R, V), with the engine sampler's processors: one-hot
    argmax for greedy rows, else softmax(logits / T) after top-k, top-p and min-p. The
    parameters are (R,) arrays; filters=False skips the filter (no row uses one)."""
    logits = logits.astype(jnp.float32)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    t = temperature[:, None]
    scaled = logits / jnp.where(t > 0, t, 1.0)
    if filters:
        scaled = _filter(scaled, top_k, top_p, min_p)
    return jnp.where(t > 0, jax.nn.softmax(scaled, axis=-1), greedy)


def filtered_probs(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """`row_probs` with one set of parameters for every row of logits (..., V). Greedy is
    static here, so it skips the softmax that row_probs computes and then discards."""
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    rows = flat.shape[0]
    probs = row_probs(flat, jnp.full((rows,), temperature, jnp.float32),
                      jnp.full((rows,), top_k, jnp.int32), jnp.full((rows,), top_p, jnp.float32),
                      jnp.zeros((rows,), jnp.float32), filters=top_k > 0 or top_p < 1.0)
    return probs.reshape(shape)


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


def accept_greedy(target, draft):
    """accept_reject for greedy decoding, from the target's argmax tokens target (g+1,) at
    the scored positions: the drafts up to the first mismatch are kept and the target's token
    there follows (what accept_reject gives for one-hot p and q, without the (g+1, V)
    distributions)."""
    g = draft.shape[0]
    matches = jnp.concatenate([target[:g] == draft, jnp.zeros((1,), bool)])
    n = jnp.argmin(matches).astype(jnp.int32)
    return n, target[n].astype(jnp.int32)


def accept_logits(logits, q, draft, key, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0):
    """The accept/reject step from the target's logits (g+1, V) at [last, drafts...], with
    one set of sampling parameters (static). q (g, V): the draft's distributions, None for a
    deterministic draft (one-hot of its tokens) or under greedy decoding (unused)."""
    if temperature == 0.0:
        return accept_greedy(jnp.argmax(logits, axis=-1), draft)
    p = filtered_probs(logits, temperature, top_k, top_p)
    if q is None:
        q = jax.nn.one_hot(draft, logits.shape[-1], dtype=jnp.float32)
    k_accept, k_next = jax.random.split(key)
    return accept_reject(p, q, draft, jax.random.uniform(k_accept, draft.shape),
                         jax.random.uniform(k_next))


def draw(logits, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """One draft token from logits (V,): (token (1,) int32, q (V,) its filtered distribution,
    or None under greedy decoding, where accept_logits does not read q)."""
    if temperature == 0.0:
        return jnp.argmax(logits)[None].astype(jnp.int32), None
    q = filtered_probs(logits, temperature, top_k, top_p)
    return sample_with_uniform(q, jax.random.uniform(key))[None], q


# -- batched, one request per row (the engine) ------------------------------------------------
def row_keys(a, purpose: int):
    """Row r's key for `purpose`: keyed by (seed, sample index, tokens generated) like the
    plain sampler's, so a request's draws never depend on what else is batched."""
    return jax.vmap(lambda s, i, n: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
        jax.random.key(s), i), n), purpose))(a["seed"], a["sample_index"], a["step"])


def position_probs(logits, a, filters):
    """(R, W, V) logits -> (R, W, V) distributions, row r's parameters for all W positions
    (`a`: the sampler's per-row arrays, hpllm.infer.sampling.row_arrays)."""
    r, w, v = logits.shape
    rep = functools.partial(jnp.repeat, repeats=w)
    return row_probs(logits.reshape(r * w, v), rep(a["temperature"]), rep(a["top_k"]),
                     rep(a["top_p"]), rep(a["min_p"]), filters).reshape(r, w, v)


@functools.partial(jax.jit, static_argnames=("filters",))
def accept_rows(logits, drafts, q, n_proposed, a, *, filters):
    """logits (R, G+1, V) of [last, drafts...]; drafts (R, G); q (R, G, V) the draft's
    distributions, or None for a deterministic draft (one-hot of its tokens); n_proposed (R,).
    Returns (n_accepted (R,), next_token (R,))."""
    p = position_probs(logits, a, filters)
    if q is None:
        q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32)
    keys = row_keys(a, 2)
    g = drafts.shape[1]
    u_accept = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (g,)))(keys)
    u_next = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    return jax.vmap(accept_reject)(p, q, drafts, u_accept, u_next, n_proposed)
