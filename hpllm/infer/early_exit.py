"""Early exit (CALM, Schuster et al. 2022): per token, stop at the first exit point whose
confidence passes a threshold and read the next token off the shared final norm + LM head.

Confidence is the softmax max-probability of the exit logits (CALM's "softmax" measure; no
trained classifier). It costs an LM-head projection per exit point tried, so exits are only
checked at a few layers (`exit_layers`), not after every layer: on SmolLM2-135M the tied head
(49152 x 576) is about a fifth of the model's weights.

Skipped layers still need keys/values at this position for later tokens to attend to. Choice
(CALM's): they are computed from the exit layer's hidden state, i.e. skipped layer l stores
k_l = rope(norm_l(h_exit) W_k,l), v_l = norm_l(h_exit) W_v,l: only the K/V projections of the
skipped layers run (for SmolLM2 192 of the ~3000 output columns of a layer's matrices).

The decoder runs the layers in segments between exit points, each a jitted call of
`transformer.decoder_stack` on that slice of the layers, and `transformer.head` at each exit
point tried, so the layer math is not duplicated; only the K/V fill repeats the projection
lines of a layer. One dense cache per segment (hpllm.model.kv_cache); the decision needs one
host round trip per exit point tried.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ModelConfig
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.layers import apply_rope, rms_norm, rope_angles
from hpllm.model.transformer import decoder_stack, embed, head, unstack_layers
from hpllm.quantized import cast_params, project


class EarlyExitError(ValueError):
    """Exit layers or thresholds that cannot be used."""


@functools.partial(jax.jit, static_argnames=("config", "first", "dtype"),
                   donate_argnames=("cache",))
def _segment(params, tokens, hidden, positions, cache, config, first, dtype=jnp.float32):
    """Run one slice of the layers; the first slice embeds `tokens`, the others take `hidden`."""
    x = embed(params, tokens, positions, config, dtype) if first else hidden
    x, cache, _ = decoder_stack(params["layers"], x, positions, config, cache=cache)
    return x, cache


@functools.partial(jax.jit, static_argnames=("config",))
def _exit_logits(params, hidden, config):
    """Final norm + LM head on the last position's hidden state, and the softmax
    max-probability as the confidence."""
    logits = head(params, hidden[:, -1], config)
    return logits, jax.nn.softmax(logits, axis=-1).max(axis=-1)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _fill_kv(layers, hidden, positions, cache, config):
    """Keys/values of skipped layers from the exit hidden state (the K/V lines of
    transformer.decoder_stack's layer, repeated here: the one duplicated piece)."""
    c = config
    cos, sin = rope_angles(positions, c.head_dim, c.rope_theta)
    for i, w in enumerate(cast_params(layers, hidden.dtype)):
        h = rms_norm(hidden, w["attn_norm"], c.norm_eps)
        k = apply_rope(project(h, w["wk"], "bsd,dhk->bshk"), cos, sin)
        v = project(h, w["wv"], "bsd,dhk->bshk")
        cache = cache.update(i, k, v, positions)
    return cache


class EarlyExitDecoder:
    """Single-stream decoding with per-token early exit. exit_layers: layer counts after which
    an exit may be taken (e.g. (8, 12, 16, 20, 24) of 30); threshold: confidence needed
    (> 1 never exits: the full model)."""

    def __init__(self, params, config: ModelConfig, exit_layers, threshold: float,
                 cache_length: int, dtype=jnp.float32):
        exit_layers = sorted(set(int(e) for e in exit_layers))
        if not exit_layers or exit_layers[0] < 1 or exit_layers[-1] >= config.n_layers:
            raise EarlyExitError(f"exit layers must be in [1, {config.n_layers - 1}], got "
                                 f"{exit_layers}")
        if config.pos_embedding != "rope" or config.n_experts:
            raise EarlyExitError("early exit supports dense RoPE models")
        params = unstack_layers(params)
        self.params, self.config, self.threshold, self.dtype = params, config, threshold, dtype
        bounds = [0] + exit_layers + [config.n_layers]
        self.bounds = bounds
        self.segments = [{**params, "layers": params["layers"][a:b]}
                         for a, b in zip(bounds, bounds[1:])]
        self.seg_configs = [dataclasses.replace(config, n_layers=b - a)
                            for a, b in zip(bounds, bounds[1:])]
        self.caches = [DenseKVCache.create(c, 1, cache_length, jnp.dtype(dtype).name)
                       for c in self.seg_configs]
        self.layers_used: list[int] = []

    def step(self, tokens: list[int], start: int, threshold: float | None = None):
        """Feed tokens at positions start..; returns the last position's logits (1, V).
        Several tokens (a prompt) always run the full model."""
        threshold = self.threshold if (threshold is None and len(tokens) == 1) else (
            threshold if threshold is not None else 2.0)
        ids = jnp.asarray([tokens], jnp.int32)
        positions = start + jnp.arange(len(tokens), dtype=jnp.int32)[None]
        h = None
        for i, (seg, cfg) in enumerate(zip(self.segments, self.seg_configs)):
            h, self.caches[i] = _segment(seg, ids, h, positions, self.caches[i], cfg, i == 0,
                                         self.dtype)
            logits, confidence = _exit_logits(self.params, h, self.config)
            last = i == len(self.segments) - 1
            if not last and float(confidence[0]) >= threshold:
                for j in range(i + 1, len(self.segments)):
                    self.caches[j] = _fill_kv(self.segments[j]["layers"], h, positions,
                                              self.caches[j], self.seg_configs[j])
                self.layers_used.append(self.bounds[i + 1])
                return logits
            if last:
                self.layers_used.append(self.config.n_layers)
                return logits

    def warm_up(self) -> None:
        """Compile every path (all segments, the exit head, each K/V fill) on throwaway
        caches, so that timed decoding does not include compilation."""
        ids = jnp.zeros((1, 1), jnp.int32)
        pos = jnp.zeros((1, 1), jnp.int32)
        h = None
        for i, (seg, cfg) in enumerate(zip(self.segments, self.seg_configs)):
            cache = jax.tree.map(jnp.zeros_like, self.caches[i])
            if i:
                _fill_kv(seg["layers"], h, pos, jax.tree.map(jnp.zeros_like, cache), cfg)
            h, _ = _segment(seg, ids, h, pos, cache, cfg, i == 0, self.dtype)
            jax.block_until_ready(_exit_logits(self.params, h, self.config))

    @property
    def average_layers(self) -> float:
        return float(np.mean(self.layers_used)) if self.layers_used else 0.0


def early_exit_generate(params, config: ModelConfig, prompt: list[int], max_new_tokens: int,
                        *, exit_layers, threshold: float, stop_ids=(), dtype=jnp.float32,
                        decoder_out: list | None = None):
    """Greedy generation with early exit; yields token ids. The prompt runs the full model.
    Pass a list as decoder_out to get the decoder (its layers_used) back."""
    end = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if not prompt or len(prompt) >= end:
        raise EarlyExitError("need a non-empty prompt that leaves room in the context")
    dec = EarlyExitDecoder(params, config, exit_layers, threshold, end, dtype)
    if decoder_out is not None:
        decoder_out.append(dec)
    logits = dec.step(list(prompt), 0, threshold=2.0)
    dec.layers_used.clear()
    tokens = list(prompt)
    while True:
        token = int(jnp.argmax(logits[0]))
        tokens.append(token)
        yield token
        if token in stop_ids or len(tokens) >= end:
            return
        logits = dec.step([token], len(tokens) - 1)


def evaluate_early_exit(model, texts: list[str], n_tokens: int, exit_layers, threshold: float,
                        dtype=jnp.float32) -> dict:
    """Teacher-forced early-exit decoding over the first n_tokens + 1 tokens of `texts`: each
    token is fed one at a time exactly as in generation (so skipped layers' filled keys/values
    affect later tokens as they would), and the exit logits score the next true token.
    Returns bits per byte, average layers used and tokens/s of the decode loop."""
    tok = model.tokenizer
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text)
        if len(ids) > n_tokens:
            break
    ids = ids[:n_tokens + 1]
    if len(ids) < 2:
        raise EarlyExitError("not enough text to evaluate")
    dec = EarlyExitDecoder(model.params, model.config, exit_layers, threshold, len(ids), dtype)
    token_bytes = np.asarray([len(b) for b in tok.token_bytes], np.int64)
    nll, n_bytes = 0.0, 0
    dec.warm_up()
    start = time.perf_counter()
    for t in range(len(ids) - 1):
        logits = dec.step([ids[t]], t)
        logp = jax.nn.log_softmax(logits[0])
        nll -= float(logp[ids[t + 1]])
        n_bytes += int(token_bytes[ids[t + 1]])
    seconds = time.perf_counter() - start
    n = len(ids) - 1
    return {"threshold": threshold, "tokens": n, "bits_per_byte": nll / math.log(2) / n_bytes,
            "average_layers": dec.average_layers, "tokens_per_second": n / seconds}
