"""Speculative decoding inside the engine: draft tokens for the running batch, scored by the
same paged pass that decodes it, accepted or rejected per row (hpllm.infer.speculative.accept).

Per step the scheduler asks each decoding sequence how many lookahead slots it wants and
reserves them after its decode token (BlockManager.prepare_range: blocks allocated, shared
blocks copied). The proposer fills them with draft tokens; one target pass scores
[last token, drafts...] for every decode row (a row without drafts is one token long, the
rest is padding); `accept_rows` runs the accept/reject rule per row on device. A row emits
its n accepted drafts plus one token and its num_computed advances by 1 + n.

Rejected drafts leave K/V at positions >= num_computed. The next pass overwrites them before
any query can read them (a query sees positions <= its own), and they are never entered in
the prefix cache (only full blocks of computed tokens are), so nothing is rolled back.

How each proposer (hpllm.infer.speculative.proposers) runs on the block pool:
  ngram  host side, at scheduling time; a sequence whose context has no match reserves no
         slots and costs nothing extra.
  self   its K/V for the first k layers *is* the target's, so it writes into the target's own
         pool and needs no cache: the verify pass rewrites those slots with identical values.
  draft  its own block pool, indexed by the target's block tables (same block ids, same
         slots), caught up lazily: before proposing, it computes the positions of the
         sequence it has not seen yet (the whole prompt the first time, then the one or two
         tokens the last step added). K/V at a position depends only on the tokens up to it,
         so a block shared through the prefix cache is rewritten with identical values.
Requests that are not `speculable` decode normally in the same batch. Each sequence has its
own adaptive gamma (+2 after a round where every draft was accepted, -1 after a rejection).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import SPECULATIVE_PROPOSERS, ConfigError
from hpllm.infer.sampling import SampleRow, pow2_bucket, row_arrays
from hpllm.infer.speculative.accept import position_probs, row_keys, sample_with_uniform
from hpllm.infer.speculative.control import AdaptiveGamma, SpeculativeStats, draft_cached_until
from hpllm.infer.speculative.proposers import NgramDraft, check_draft_vocab, first_layers
from hpllm.model.transformer import forward

CATCH_UP_CHUNK = 256  # draft catch-up tokens per pass


@functools.partial(jax.jit, static_argnames=("config", "dtype", "filters"),
                   donate_argnames=("pool",))
def _draft_step(params, pool, tokens, positions, tables, a, index, config, dtype, filters):
    """One draft token per row: feed tokens (R, 1) at positions (R, 1) (-1: this row is done
    drafting), sample from the filtered distribution q (R, V)."""
    logits, pool = forward(params, tokens, positions, config, cache=pool.with_tables(tables),
                           dtype=dtype, logits_at=jnp.zeros(tokens.shape[0], jnp.int32))
    q = position_probs(logits[:, None], a, filters)[:, 0]
    keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(row_keys(a, 1))
    token = jax.vmap(sample_with_uniform)(q, jax.vmap(jax.random.uniform)(keys))
    return token, q, pool.with_tables(None)


@dataclasses.dataclass
class SpecRows:
    """The decode rows of one step with their drafts, laid into the step's flat batch: row r
    is [its last token, its n_proposed[r] drafts], and its `width` = 1 + G logits come back
    as rows r * width .. (r + 1) * width - 1 of the pass (the rows' first logits)."""
    drafts: np.ndarray  # (R, G) numpy
    n_proposed: np.ndarray  # (R,)
    q: jax.Array | None  # (R, G, V) the draft's distributions, None: one-hot (n-gram)
    arrays: dict  # the rows' sampling arrays (row_arrays) on device
    filters: bool

    @property
    def width(self) -> int:
        return 1 + self.drafts.shape[1]

    @property
    def num_logits(self) -> int:
        return self.drafts.shape[0] * self.width

    def add_rows(self, builder, chunks) -> list[int]:
        """Append each row's tokens to the flat batch; returns the logits index (padding
        entries repeat a row's last token, padding rows token 0)."""
        index = []
        for r, c in enumerate(chunks):
            n = int(self.n_proposed[r])
            flat = builder.add(c.seq.table.blocks,
                               [c.seq.tokens[c.start], *self.drafts[r, :n].tolist()], c.start)
            index += [flat[min(j, n)] for j in range(self.width)]
        return index + [0] * (self.num_logits - len(index))

    def scores(self, logits):
        """(R, 1 + G, V): every position's logits of every row."""
        return logits[:self.num_logits].reshape(self.drafts.shape[0], self.width, -1)


class Speculator:
    """The engine's speculative half: how many slots each sequence wants, the drafts that
    fill them, and the bookkeeping after accept/reject. `model` is the engine's PagedModel;
    `draft_model` a PagedModel of the distilled draft with as many blocks (method "draft")."""

    def __init__(self, method: str, gamma: int, model, *, adaptive: bool = True,
                 max_gamma: int = 0, draft_layers: int = 0, max_ngram: int = 3,
                 draft_model=None):
        if method not in SPECULATIVE_PROPOSERS:
            raise ConfigError(f"unknown speculative method {method!r} "
                              f"({', '.join(SPECULATIVE_PROPOSERS)})")
        max_gamma = max_gamma or (max(8, gamma) if adaptive else gamma)
        if not 1 <= gamma <= max_gamma:
            raise ConfigError(f"num_speculative_tokens must be in [1, {max_gamma}], got {gamma}")
        self.method, self.gamma, self.max_gamma, self.adaptive = method, gamma, max_gamma, adaptive
        self.model = model
        self.stats = SpeculativeStats()
        self._gammas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._proposals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        config = model.config
        if method == "ngram":
            self.ngram = NgramDraft(config.vocab_size, max_ngram=max_ngram)
        elif method == "draft":
            if draft_model is None:
                raise ConfigError("speculative='draft' needs a draft model (run `hpllm distill`)")
            check_draft_vocab(draft_model.config, config)
            self.draft = draft_model
            self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        else:
            if not isinstance(model.params["layers"], list):  # and the pool per-layer lists
                raise ConfigError("self-speculation shares the target's per-layer KV pool: it "
                                  "needs unroll_layers=True")
            self.draft_params, self.draft_config = first_layers(model.params, config,
                                                                draft_layers)
            self.draft_layers = self.draft_config.n_layers

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

    def propose_rows(self, chunks, tables) -> SpecRows:
        """Drafts for this step's decode chunks (tables: their (pow2 rows, width) tables)."""
        rows = [SampleRow(c.seq.request.params, c.seq.request.seed, c.seq.index,
                          c.seq.num_generated, c.seq.request.prompt_ids, c.seq.output_ids)
                for c in chunks]
        arrays = {k: jnp.asarray(v) for k, v in row_arrays(rows, tables.shape[0]).items()}
        filters = any(r.params.has_filters for r in rows)
        drafts, n_proposed, q = self.propose(chunks, tables, arrays, filters)
        return SpecRows(drafts, n_proposed, q, arrays, filters)

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
            token, q, m.pool = _draft_step(m.params, m.pool, feed, jnp.asarray(positions),
                                           jnp.asarray(tables), arrays, index, m.config,
                                           m.dtype, filters)
            return token, q
        # self: the first k layers' slice of the target's own pool, written in place
        pool = self.model.pool
        token, q, sub = _draft_step(self.draft_params, pool.slice_layers(0, self.draft_layers),
                                    feed, jnp.asarray(positions), jnp.asarray(tables), arrays,
                                    index, self.draft_config, self.model.dtype, filters)
        self.model.pool = pool.merge_layers(0, sub)
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
        if not n_proposed:
            return
        if self.method == "draft":
            self._seen[seq] = (draft_cached_until(start, n_accepted, n_proposed),
                               seq.preemptions)
        self.stats.record(n_proposed, n_accepted)
        self.stats.generated += n_accepted + 1
        control = self._gammas.get(seq)
        if control is not None:
            control.update(n_accepted, n_proposed)
