"""Speculative decoding inside the engine: draft tokens for the running batch, scored by the
same paged pass that decodes it, accepted or rejected per row (Leviathan et al. 2023).

Per step the scheduler asks each decoding sequence how many lookahead slots it wants and
reserves them after its decode token (BlockManager.prepare_range: blocks allocated, shared
blocks copied). The proposer fills them with draft tokens; one target pass scores
[last token, drafts...] for every decode row (a row without drafts is one token long, the
rest is padding); `accept_reject` (hpllm.infer.speculative) runs per row on device. A row
emits its n accepted drafts plus one token and its num_computed advances by 1 + n.

Rejected drafts leave K/V at positions >= num_computed. The next pass overwrites them before
any query can read them (a query sees positions <= its own), and they are never entered in
the prefix cache (only full blocks of computed tokens are), so nothing is rolled back.

Proposers:
  ngram  prompt lookup over each sequence's own tokens (host side, no model); a sequence
         whose context has no match reserves no slots and costs nothing extra.
  self   the target's first k layers with its final norm and LM head (LayerSkip-style). Its
         K/V for those layers *is* the target's, so it writes into the target's own pool and
         needs no cache: the verify pass rewrites those slots with identical values.
  draft  a separate small model on the target's vocabulary (`hpllm distill`). It has its own
         block pool, indexed by the target's block tables (same block ids, same slots), and
         catches up lazily: before proposing, it computes the positions of the sequence it
         has not seen yet (the whole prompt the first time, then the one or two tokens the
         last step added). K/V at a position depends only on the tokens up to it, so a block
         shared through the prefix cache is rewritten with identical values, never wrong ones.
Requests with penalties or logprobs do not speculate (their processors depend on every
previous token, or report figures the accept step does not compute); they decode normally
in the same batch. Each sequence has its own adaptive gamma (+2 after a round where every
draft was accepted, -1 after a rejection).

Randomness: a row's draws are keyed by (seed, sample index, tokens generated) like the
plain sampler's, so a request's output never depends on what else is batched.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError
from hpllm.infer.drafts import NgramDraft
from hpllm.infer.sampling import SamplingParams, _filter, pow2_bucket
from hpllm.infer.speculative import (AdaptiveGamma, SpeculativeStats, accept_reject,
                                     sample_with_uniform)
from hpllm.model.transformer import forward

PROPOSERS = ("ngram", "self", "draft")
CATCH_UP_CHUNK = 256  # draft catch-up tokens per pass


def speculable(params: SamplingParams) -> bool:
    return not params.has_penalties and params.logprobs is None


def row_probs(logits, temperature, top_k, top_p, min_p, filters: bool):
    """Each row's sampling distribution (R, V), with the engine sampler's processors: one-hot
    argmax for greedy rows, else softmax(logits / T) after top-k, top-p and min-p."""
    logits = logits.astype(jnp.float32)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    t = temperature[:, None]
    scaled = logits / jnp.where(t > 0, t, 1.0)
    if filters:
        scaled = _filter(scaled, top_k, top_p, min_p)
    return jnp.where(t > 0, jax.nn.softmax(scaled, axis=-1), greedy)


def _row_keys(a, purpose: int):
    return jax.vmap(lambda s, i, n: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
        jax.random.key(s), i), n), purpose))(a["seed"], a["sample_index"], a["step"])


def _probs(logits, a, filters):
    """(R, W, V) logits -> (R, W, V) distributions, row r's parameters for all W positions."""
    r, w, v = logits.shape
    rep = functools.partial(jnp.repeat, repeats=w)
    return row_probs(logits.reshape(r * w, v), rep(a["temperature"]), rep(a["top_k"]),
                     rep(a["top_p"]), rep(a["min_p"]), filters).reshape(r, w, v)


@functools.partial(jax.jit, static_argnames=("filters",))
def accept_rows(logits, drafts, q, n_proposed, a, *, filters):
    """logits (R, G+1, V) of [last, drafts...]; drafts (R, G); q (R, G, V) the draft's
    distributions, or None for a deterministic draft (one-hot of its tokens); n_proposed (R,).
    Returns (n_accepted (R,), next_token (R,))."""
    p = _probs(logits, a, filters)
    if q is None:
        q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32)
    keys = _row_keys(a, 2)
    g = drafts.shape[1]
    u_accept = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (g,)))(keys)
    u_next = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    return jax.vmap(accept_reject)(p, q, drafts, u_accept, u_next, n_proposed)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "filters"),
                   donate_argnames=("pool",))
def _self_draft_step(params, pool, tokens, positions, tables, a, index, config, dtype, filters):
    """One draft token per row from the first layers: feed tokens (R, 1) at positions (R, 1)
    (-1: this row is done drafting), sample from the filtered distribution q (R, V)."""
    cache = {**pool, "block_tables": tables}
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype,
                            logits_at=jnp.zeros(tokens.shape[0], jnp.int32))
    q = _probs(logits[:, None], a, filters)[:, 0]
    keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(_row_keys(a, 1))
    token = jax.vmap(sample_with_uniform)(q, jax.vmap(jax.random.uniform)(keys))
    return token, q, {name: cache[name] for name in pool}


class Speculator:
    """The engine's speculative half: how many slots each sequence wants, the drafts that
    fill them, and the per-row accept/reject. `model` is the engine's PagedModel."""

    def __init__(self, method: str, gamma: int, model, *, adaptive: bool = True,
                 max_gamma: int = 0, draft_layers: int = 0, max_ngram: int = 3,
                 draft_model=None):
        if method not in PROPOSERS:
            raise ConfigError(f"unknown speculative method {method!r} ({', '.join(PROPOSERS)})")
        max_gamma = max_gamma or (max(8, gamma) if adaptive else gamma)
        if not 1 <= gamma <= max_gamma:
            raise ConfigError(f"num_speculative_tokens must be in [1, {max_gamma}], got {gamma}")
        self.method, self.gamma, self.max_gamma, self.adaptive = method, gamma, max_gamma, adaptive
        self.model = model
        # rounds: sequence-steps that scored at least one draft; generated: their tokens
        self.stats = SpeculativeStats()
        self._gammas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._proposals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        config = model.config
        if method == "ngram":
            self.ngram = NgramDraft(config.vocab_size, max_ngram=max_ngram)
        elif method == "draft":
            if draft_model is None:
                raise ConfigError("speculative='draft' needs a draft model (run `hpllm distill`)")
            if draft_model.config.vocab_size != config.vocab_size:
                raise ConfigError(f"the draft's vocabulary ({draft_model.config.vocab_size}) "
                                  f"differs from the target's ({config.vocab_size})")
            self.draft = draft_model  # a PagedModel with as many blocks as the target's
            self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        else:
            k = draft_layers or max(1, config.n_layers // 3)
            if not 1 <= k < config.n_layers:
                raise ConfigError(f"draft_layers must be in [1, {config.n_layers - 1}] for a "
                                  f"{config.n_layers}-layer model, got {k}")
            if not isinstance(model.params["layers"], list):
                raise ConfigError("self-speculation shares the target's per-layer KV pool: it "
                                  "needs unroll_layers=True")
            self.draft_layers = k
            self.draft_params = {**model.params, "layers": model.params["layers"][:k]}
            self.draft_config = dataclasses.replace(config, n_layers=k)

    @property
    def name(self) -> str:
        if self.method == "self":
            return f"self-{self.draft_layers}"
        return "distilled" if self.method == "draft" else self.method

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write copies the target's pool got this step, for the draft's pool."""
        if self.method == "draft":
            self.draft.copy_blocks(pairs)

    def lookahead(self, seq, limit: int) -> int:
        """Slots this sequence wants after its decode token (at most `limit`). The n-gram
        proposal is made here, so a sequence without a match reserves nothing."""
        control = self._gammas.get(seq)
        if control is None:
            control = self._gammas[seq] = AdaptiveGamma(self.gamma, self.max_gamma,
                                                        self.adaptive)
        g = min(control.gamma, limit)
        if g <= 0:
            return 0
        if self.method == "ngram":
            proposal = self.ngram.lookup(seq.tokens, g)
            self._proposals[seq] = proposal
            return len(proposal)
        return g

    def propose(self, chunks, tables, arrays, filters: bool):
        """Drafts for decode chunks (those with lookahead > 0 speculate). Returns numpy
        drafts (R, G) and n_proposed (R,), and q (R, G, V) on device or None (one-hot)."""
        rows = tables.shape[0]
        # Draft slots by powers of two from 4: few compiled widths (compiles dominate short
        # runs), and a wider pass costs little where decoding is memory bound.
        width = pow2_bucket(max(c.lookahead for c in chunks), 4)
        drafts = np.zeros((rows, width), np.int32)
        n_proposed = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            n_proposed[r] = c.lookahead
        if self.method == "ngram":
            for r, c in enumerate(chunks):
                if c.lookahead:
                    drafts[r, :c.lookahead] = self._proposals.pop(c.seq)[:c.lookahead]
            return drafts, n_proposed, None
        if self.method == "draft":
            self._catch_up(chunks, tables)
        # feed each row's last token, then its own drafts, through the draft
        tokens = np.zeros((rows, 1), np.int32)
        starts = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            tokens[r, 0] = c.seq.tokens[c.start]
            starts[r] = c.start
        feed, qs, out = jnp.asarray(tokens), [], []
        for i in range(int(n_proposed.max())):
            positions = np.where(i < n_proposed, starts + i, -1)[:, None].astype(np.int32)
            token, q = self._draft_step(feed, positions, tables, arrays, i, filters)
            feed = token[:, None]  # stays on device between draft steps
            out.append(token)
            qs.append(q)
        drafts[:, :len(out)] = np.asarray(jnp.stack(out, axis=1))
        q = jnp.stack(qs, axis=1)
        if q.shape[1] < width:
            q = jnp.pad(q, ((0, 0), (0, width - q.shape[1]), (0, 0)))
        return drafts, n_proposed, q

    def _draft_step(self, feed, positions, tables, arrays, index, filters):
        if self.method == "draft":
            m = self.draft
            token, q, m.pool = _self_draft_step(m.params, m.pool, feed, jnp.asarray(positions),
                                                jnp.asarray(tables), arrays, index, m.config,
                                                m.dtype, filters)
            return token, q
        # self: the first k layers' slice of the target's own pool, written in place
        pool, k = self.model.pool, self.draft_layers
        sub = {name: layers[:k] for name, layers in pool.items()}
        token, q, sub = _self_draft_step(self.draft_params, sub, feed, jnp.asarray(positions),
                                         jnp.asarray(tables), arrays, index, self.draft_config,
                                         self.model.dtype, filters)
        for name in pool:
            pool[name][:k] = sub[name]
        return token, q

    def _catch_up(self, chunks, tables) -> None:
        """Run the draft over the positions (before each speculating row's last token) it has
        not computed, in chunks of at most CATCH_UP_CHUNK tokens per row."""
        todo = {}
        for r, c in enumerate(chunks):
            seen, preemptions = self._seen.get(c.seq, (0, c.seq.preemptions))
            if preemptions != c.seq.preemptions:  # recomputed from scratch: new blocks
                seen = 0
            if c.lookahead and seen < c.start:
                todo[r] = seen
        while todo:
            rows = tables.shape[0]
            longest = max(chunks[r].start - seen for r, seen in todo.items())
            width = min(pow2_bucket(longest, 16), CATCH_UP_CHUNK)
            tokens = np.zeros((rows, width), np.int32)
            positions = np.full((rows, width), -1, np.int32)
            for r, seen in list(todo.items()):
                n = min(chunks[r].start - seen, width)
                tokens[r, :n] = chunks[r].seq.tokens[seen:seen + n]
                positions[r, :n] = np.arange(seen, seen + n)
                todo[r] = seen + n
                if todo[r] == chunks[r].start:
                    del todo[r]
            self.draft.run(tokens, positions, tables, np.zeros(rows, np.int32))

    def record(self, seq, start: int, n_proposed: int, n_accepted: int) -> None:
        """After a row's accept/reject (the row's last token was at position `start`)."""
        if self.method == "draft" and n_proposed:
            # the draft fed positions start.. start + g - 1 (the last token, drafts 1..g-1);
            # those holding tokens the target kept are valid
            self._seen[seq] = (start + min(n_accepted, n_proposed - 1) + 1, seq.preemptions)
        if n_proposed:
            self.stats.rounds += 1
            self.stats.proposed += n_proposed
            self.stats.accepted += n_accepted
            self.stats.generated += n_accepted + 1
            control = self._gammas.get(seq)
            if control is not None:
                control.update(n_accepted, n_proposed)
