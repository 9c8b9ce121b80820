"""What proposes the drafts, whatever cache it runs on (the single stream's dense cache or
the engine's block pool):

  ngram  prompt lookup: the tokens that followed the most recent earlier occurrence of the
         context's last n tokens. No model; its q is one-hot, which accept/reject handles
         exactly.
  self   the target's first k layers with its final norm and (tied) LM head (LayerSkip-style):
         no extra weights.
  draft  a small model on the target's vocabulary, distilled by `hpllm distill`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.distilled import load_distilled
from hpllm.config import ConfigError, ModelConfig


class DraftError(ConfigError):
    """A draft that cannot serve this target (vocabulary, layer count, none cached)."""


class NgramDraft:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (n from max_ngram down to min_ngram) and propose the tokens that followed it. `start`,
    `propose` and `accepted` are the single stream's draft interface."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

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

    def start(self, tokens, cache_length, dtype=jnp.float32, kernel=False):
        pass

    def propose(self, tokens, g, key, temperature=0.0, top_k=0, top_p=1.0):
        """(tokens, None): a deterministic draft, q is the one-hot of its tokens."""
        return (self.lookup(tokens, g) if g else []), None

    def accepted(self, tokens, n_accepted, n_proposed):
        pass


def first_layers(params, config: ModelConfig, n_layers: int = 0):
    """(params, config) of the self-draft: the first n_layers layers (0: a third of the
    model) of per-layer (unstacked) params, sharing the target's weights."""
    k = n_layers or max(1, config.n_layers // 3)
    if not 1 <= k < config.n_layers:
        raise DraftError(f"draft_layers must be in [1, {config.n_layers - 1}] for a "
                         f"{config.n_layers}-layer model, got {k}")
    return {**params, "layers": params["layers"][:k]}, dataclasses.replace(config, n_layers=k)


def check_draft_vocab(draft: ModelConfig, target: ModelConfig) -> None:
    if draft.vocab_size != target.vocab_size:
        raise DraftError(f"the draft's vocabulary ({draft.vocab_size}) differs from the "
                         f"target's ({target.vocab_size}); distill the draft on the target's "
                         "tokenizer")


def load_distilled_draft():
    """(params, config) of the student `hpllm distill` cached; DraftError when none is."""
    try:
        config, params = load_distilled()
    except FileNotFoundError as e:
        raise DraftError(str(e)) from None
    return params, config
