"""Sampling parameters of a request and the batched sampler of the engine.

One jitted function samples a whole batch whose rows have different parameters (each row's
temperature, top-k, ... arrive as arrays), so a batch never has to be split by parameters.
Order of the logit processors, per row (as vLLM/HF do it):
  the structured-output mask (forbidden tokens -> -inf) and logit_bias (added)
  -> penalties (repetition over prompt + output; presence and frequency over output)
  -> greedy argmax if temperature == 0, else: / temperature -> top-k -> top-p -> min-p -> draw.
Randomness: row r's key is fold_in(fold_in(key(seed), sample_index), n_generated), so a
request's draws depend only on its own seed and progress, never on what else is batched.
Log-probabilities reported are those of the model's raw distribution (log_softmax of the
logits before penalties and temperature).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.infer.structured import StructuredOutput

MAX_LOGPROBS = 20
LOGPROBS_BUCKET = 8  # top log-probabilities computed for any logprobs <= 8 (one shape)
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries


class SamplingError(ValueError):
    """Sampling parameters that cannot be used; the message names the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # independent samples of the prompt (they share its KV blocks)
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-turn tokens
    ignore_eos: bool = False
    min_tokens: int = 0  # stop tokens/strings are ignored before this many tokens
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k's
    structured: StructuredOutput | None = None  # the output must match this constraint
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs

    def __post_init__(self):
        # Accept lists (JSON) for the tuple fields; keep the dataclass hashable.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value) if value is not None else ())
        bias = self.logit_bias or ()
        if isinstance(bias, dict):  # OpenAI sends {"token id": bias}
            bias = bias.items()
        object.__setattr__(self, "logit_bias", tuple(
            (int(t) if isinstance(t, str) and t.strip().lstrip("-").isdigit() else t, b)
            for t, b in bias))

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def check(ok, param, message):
            if not ok:
                raise SamplingError(f"{param}: {message}", param)

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        for name in ("n", "max_tokens", "top_k", "min_tokens"):
            check(is_int(getattr(self, name)), name, f"must be an integer, got "
                  f"{getattr(self, name)!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            check(is_num(value) and np.isfinite(value), name,
                  f"must be a finite number, got {value!r}")
        check(1 <= self.n <= 64, "n", f"must be between 1 and 64, got {self.n}")
        check(self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k >= -1, "top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0, "repetition_penalty",
              f"must be > 0, got {self.repetition_penalty}")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
              f"must be a non-negative integer, got {self.seed!r}")
        check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              f"must be in [0, max_tokens], got {self.min_tokens}")
        check(self.logprobs is None or (is_int(self.logprobs)
                                        and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be non-empty strings")
        for t in self.stop_token_ids:
            check(is_int(t) and 0 <= t and (vocab_size is None or t < vocab_size),
                  "stop_token_ids", f"{t!r} is not a token id")
        check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
              f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for t, b in self.logit_bias:
            check(is_int(t) and 0 <= t and (vocab_size is None or t < vocab_size),
                  "logit_bias", f"{t!r} is not a token id")
            check(is_num(b) and -100 <= b <= 100, "logit_bias",
                  f"the bias of token {t} must be a number in [-100, 100], got {b!r}")
        check(self.structured is None or isinstance(self.structured, StructuredOutput),
              "structured", "must be a StructuredOutput")
        if self.n > 1 and self.temperature == 0:
            raise SamplingError("n: n > 1 needs temperature > 0 (greedy samples would all be "
                                "the same)", "n")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def has_filters(self) -> bool:
        """Whether the top-k/top-p/min-p filter changes this request's draws (greedy takes
        the argmax whatever the filter keeps)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)


def pow2_bucket(n: int, smallest: int = 1, limit: int | None = None) -> int:
    """n rounded up to a power of two, at least `smallest` and at most `limit` (few compiled
    shapes: one serves every size in its bucket)."""
    bucket = max(smallest, 1 << max(0, n - 1).bit_length())
    return bucket if limit is None else min(limit, bucket)


@dataclass
class SampleRow:
    """What the sampler needs about one row of the batch."""
    params: SamplingParams
    seed: int
    sample_index: int
    n_generated: int
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class Sampled:
    tokens: np.ndarray  # (B,) int
    logprobs: np.ndarray | None  # (B,) chosen tokens' log-probabilities
    top_ids: np.ndarray | None  # (B, k) the k most likely ids
    top_logprobs: np.ndarray | None


def sample(logits, rows: list[SampleRow], mask: np.ndarray | None = None) -> Sampled:
    """Sample one token for each of the first len(rows) rows of `logits` (B', V), B' >= B
    (padding rows are ignored). mask: (B', ceil(V / 32)) int32 packed allowed-token bits
    (hpllm.infer.structured.fill_masks), or None when no row is constrained."""
    b = len(rows)
    pad = logits.shape[0]
    params = [r.params for r in rows]
    penalties = any(p.has_penalties for p in params)
    n_top = max((p.logprobs or 0) for p in params)
    want_logprobs = any(p.logprobs is not None for p in params)
    draw = not all(p.greedy for p in params)

    if not (penalties or want_logprobs or draw or mask is not None
            or any(p.logit_bias for p in params)):
        return Sampled(_greedy(logits)[:b], None, None, None)
    arrays = row_arrays(rows, pad)
    # what runs is mostly data (lax.cond), not compiled variants: per row bucket one greedy
    # and one drawing executable serve every mix of filters and logprobs 0..LOGPROBS_BUCKET
    arrays["flags"] = np.array([any(p.has_filters for p in params), want_logprobs], np.bool_)
    if penalties:
        arrays.update(
            repetition=_column([p.repetition_penalty for p in params], np.float32, pad) + (
                np.arange(pad) >= b),
            presence=_column([p.presence_penalty for p in params], np.float32, pad),
            frequency=_column([p.frequency_penalty for p in params], np.float32, pad),
            prompt_ids=_pad_ids([r.prompt_ids for r in rows], pad),
            output_ids=_pad_ids([r.output_ids for r in rows], pad),
        )
    if mask is not None:
        arrays["mask"] = mask
    biases = max(len(p.logit_bias) for p in params)
    if biases:
        arrays["bias_ids"], arrays["bias_values"] = _bias_arrays(params, pad,
                                                                 pow2_bucket(biases, 8))
    top = min(logits.shape[-1], max(LOGPROBS_BUCKET, pow2_bucket(n_top)))
    out = _sample_batch(logits, arrays, penalties=penalties, n_top=top, draw=draw)
    if not want_logprobs:  # fetch only the tokens
        return Sampled(np.asarray(out["tokens"])[:b], None, None, None)
    out = jax.device_get(out)
    top_ids = out["top_ids"][:b, :n_top] if n_top else None
    top_lp = out["top_logprobs"][:b, :n_top] if n_top else None
    return Sampled(out["tokens"][:b], out["logprobs"][:b], top_ids, top_lp)


def _greedy(logits) -> np.ndarray:
    """Each row's argmax: on the host where the logits already are (numpy's is ~10x faster
    than XLA:CPU's and needs no executable), else on their device."""
    if isinstance(logits, np.ndarray) or all(d.platform == "cpu" for d in logits.devices()):
        return np.asarray(logits).argmax(-1)
    return np.asarray(_argmax_rows(logits))


@jax.jit
def _argmax_rows(logits):
    return argmax(logits)


def row_arrays(rows: list[SampleRow], pad: int) -> dict:
    """Each row's temperature, filters and draw key parts as (pad,) numpy columns; padding
    rows are greedy with no filters."""
    params = [r.params for r in rows]
    column = functools.partial(_column, pad=pad)
    return dict(
        temperature=column([p.temperature for p in params], np.float32),
        top_k=column([p.top_k if p.top_k > 0 else 0 for p in params], np.int32),
        top_p=column([p.top_p for p in params], np.float32) + (np.arange(pad) >= len(rows)),
        min_p=column([p.min_p for p in params], np.float32),
        seed=column([r.seed & 0xFFFFFFFF for r in rows], np.uint32),
        sample_index=column([r.sample_index for r in rows], np.int32),
        step=column([r.n_generated for r in rows], np.int32),
    )


def _column(values, dtype, pad: int) -> np.ndarray:
    """values padded with zeros to `pad` rows."""
    out = np.zeros(pad, dtype)
    out[:len(values)] = values
    return out


def _bias_arrays(params: list[SamplingParams], rows: int, width: int):
    """Each row's logit_bias as (rows, width) token ids and values (padding: id 0, bias 0)."""
    ids = np.zeros((rows, width), np.int32)
    values = np.zeros((rows, width), np.float32)
    for r, p in enumerate(params):
        if p.logit_bias:
            k = len(p.logit_bias)
            ids[r, :k], values[r, :k] = zip(*p.logit_bias)
    return ids, values


def _pad_ids(lists, rows: int) -> np.ndarray:
    """Token id lists as a (rows, bucket) array padded with -1 (ignored)."""
    width = pow2_bucket(max((len(x) for x in lists), default=1), 16)
    out = np.full((rows, width), -1, np.int32)
    for i, ids in enumerate(lists):
        out[i, :len(ids)] = ids
    return out


@functools.partial(jax.jit, static_argnames=("penalties", "n_top", "draw"))
def _sample_batch(logits, a, *, penalties, n_top, draw):
    """a["flags"]: (any row filtered, logprobs wanted) as data, so the filters and the
    log-probabilities are skipped at run time (lax.cond), not compiled apart; n_top: the
    top log-probabilities computed (callers slice theirs); draw: some row samples (else
    the filters and the draw are not compiled at all)."""
    filtered, want_logprobs = a["flags"][0], a["flags"][1]
    logits = logits.astype(jnp.float32)
    raw = logits
    if "mask" in a:
        logits = apply_token_mask(logits, a["mask"])
    if "bias_ids" in a:
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, a["bias_ids"]].add(a["bias_values"])
    if penalties:
        logits = apply_penalties(logits, a["prompt_ids"], a["output_ids"], a["repetition"],
                                 a["presence"], a["frequency"])
    greedy_tokens = argmax(logits)

    def drawn():
        t = a["temperature"][:, None]
        scaled = logits / jnp.where(t > 0, t, 1.0)
        scaled = jax.lax.cond(filtered, lambda s: _filter(s, a["top_k"], a["top_p"],
                                                          a["min_p"]), lambda s: s, scaled)
        keys = jax.vmap(lambda s, i, n: jax.random.fold_in(
            jax.random.fold_in(jax.random.key(s), i), n))(a["seed"], a["sample_index"],
                                                          a["step"])
        return jnp.where(a["temperature"] > 0, categorical(keys, scaled), greedy_tokens)

    tokens = drawn() if draw else greedy_tokens

    def with_logprobs():
        logprobs = jax.nn.log_softmax(raw, axis=-1)
        chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(logprobs, n_top)
        return chosen, top_lp, top_ids.astype(jnp.int32)

    def without():
        b = logits.shape[0]
        return (jnp.zeros(b, jnp.float32), jnp.zeros((b, n_top), jnp.float32),
                jnp.zeros((b, n_top), jnp.int32))

    chosen, top_lp, top_ids = jax.lax.cond(want_logprobs, with_logprobs, without)
    return {"tokens": tokens, "logprobs": chosen, "top_logprobs": top_lp, "top_ids": top_ids}


def apply_token_mask(logits, mask):
    """logits (B, V); mask (B, ceil(V / 32)) int32, bit i of word w allowing token 32w + i:
    forbidden tokens -> -inf."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(mask.shape[0], -1)[:, :logits.shape[-1]] > 0
    return jnp.where(allowed, logits, -jnp.inf)


def apply_penalties(logits, prompt_ids, output_ids, repetition, presence, frequency):
    """logits (B, V); id arrays (B, n) padded with -1; per-row penalties (B,). Repetition
    (CTRL/HF): a seen token's logit is divided by r if positive, multiplied if negative.
    Presence/frequency (OpenAI): minus p once, minus f per occurrence in the output."""
    bsz, vocab = logits.shape
    rows = jnp.arange(bsz)[:, None]

    def counts(ids):
        return jnp.zeros((bsz, vocab), jnp.int32).at[rows, jnp.maximum(ids, 0)].add(ids >= 0)

    out_counts = counts(output_ids)
    seen = (out_counts + counts(prompt_ids)) > 0
    r = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * out_counts - presence[:, None] * (out_counts > 0)


def _filter(logits, top_k, top_p, min_p):
    """Per-row top-k (0 = off), then top-p over what is left, then min-p; masked -> -inf.
    The most likely token always survives. No sort (XLA:CPU sorts a 49k vocabulary at
    ~30 ms a row): each cutoff is found by bisection over the floats' ordered bit patterns
    (32 vectorised passes), and is exactly the sorted prefix's (up to ties)."""
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    # top-k: the smallest t with fewer than k logits above it; keep those >= t
    kth = _smallest_where(logits, lambda t: (logits > t).sum(-1, keepdims=True) < k)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    # top-p: the smallest t with less than top_p of the mass above it
    cutoff = _smallest_where(logits, lambda t: jnp.where(logits > t, probs, 0.0).sum(
        -1, keepdims=True) < top_p[:, None])
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p[:, None] * probs.max(-1, keepdims=True), -jnp.inf, logits)


def _ordered(x):
    """float32 -> int32 keys in the floats' order (and back: the map is its own inverse)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _smallest_where(x, pred):
    """Per row of x (B, V): the smallest float32 t in [min, max] of the row with pred(t)
    (B, 1) true, pred monotone (false below, true from t on); pred(max) must hold."""
    lo = _ordered(jnp.min(x, -1, keepdims=True)) - 1  # pred false (below every value)
    hi = _ordered(jnp.max(x, -1, keepdims=True))  # pred true

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
        ok = pred(jax.lax.bitcast_convert_type(_ordered(mid), jnp.float32))
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return jax.lax.bitcast_convert_type(_ordered(hi), jnp.float32)


def argmax(x):
    """jnp.argmax(x, -1) (the first of equal maxima) as a max and a min: XLA:CPU's
    variadic argmax reduction is ~10x slower (SmolLM2's vocabulary, 32 rows: 20 -> 2 ms)."""
    top = x.max(-1, keepdims=True)
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), -1)


def categorical(keys, logits, block: int = 256):
    """One draw per row from softmax(logits) by inverting the CDF at one uniform per row
    (jax.random.categorical draws a Gumbel per vocabulary entry: ~3 ms a row on CPU). The
    CDF is two-level (sums of `block`-wide slices, then one slice) to keep scans short."""
    b, v = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.pad(probs, ((0, 0), (0, -v % block))).reshape(b, -1, block)
    bits = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(keys)
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * 2.0 ** -24  # in (0, 1)
    sums = jnp.cumsum(probs.sum(-1), axis=-1)  # (B, blocks) inclusive
    target = u * sums[:, -1]
    blk = jnp.minimum((sums < target[:, None]).sum(-1), sums.shape[1] - 1)
    rows = jnp.arange(b)
    rest = target - jnp.where(blk > 0, sums[rows, blk - 1], 0.0)
    inside = probs[rows, blk]  # (B, block)
    last = jnp.max(jnp.where(inside > 0, jnp.arange(block), 0), -1)  # rounding may overshoot
    pos = jnp.minimum((jnp.cumsum(inside, axis=-1) < rest[:, None]).sum(-1), last)
    return (blk * block + pos).astype(jnp.int32)
