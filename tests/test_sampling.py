"""The engine's batched sampler against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.infer.sampling import (SampleRow, SamplingError, SamplingParams, _filter,
                                  apply_penalties, categorical, sample)


def _row(params, seed=0, index=0, step=0, prompt=(), out=()):
    return SampleRow(params, seed, index, step, list(prompt), list(out))


def test_penalties_match_numpy():
    rng = np.random.default_rng(1)
    b, v = 3, 37
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    prompts = [rng.integers(0, v, 5), rng.integers(0, v, 1), rng.integers(0, v, 9)]
    outs = [rng.integers(0, v, 7), np.array([], int), rng.integers(0, v, 3)]
    rep, pres, freq = np.array([1.3, 0.8, 1.0]), np.array([0.5, -0.2, 0]), np.array([0.25, 1, 2])
    expected = logits.astype(np.float64).copy()
    for i in range(b):
        counts = np.bincount(outs[i], minlength=v)
        seen = (counts + np.bincount(prompts[i], minlength=v)) > 0
        x = expected[i]
        x[seen] = np.where(x[seen] > 0, x[seen] / rep[i], x[seen] * rep[i])
        expected[i] = x - freq[i] * counts - pres[i] * (counts > 0)

    def pad(lists):
        out = np.full((b, 12), -1, np.int32)
        for i, ids in enumerate(lists):
            out[i, :len(ids)] = ids
        return out

    got = apply_penalties(jnp.asarray(logits), pad(prompts), pad(outs), jnp.asarray(rep, jnp.float32),
                          jnp.asarray(pres, jnp.float32), jnp.asarray(freq, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2),
                                               (7, 0.5, 0.05), (1, 1.0, 0.0), (0, 0.01, 0.0)])
def test_filters_keep_the_numpy_support(top_k, top_p, min_p):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
    v = 41
    logits = rng.normal(size=(2, v)).astype(np.float32) * 2
    got = np.asarray(jax.jit(_filter)(jnp.asarray(logits), jnp.full(2, top_k),  # one compile
                                      jnp.full(2, top_p, jnp.float32),
                                      jnp.full(2, min_p, jnp.float32)))
    for row in range(2):
        x = logits[row].astype(np.float64)
        order = np.argsort(-x)
        keep = np.zeros(v, bool)
        keep[order[:top_k or v]] = True
        p = np.exp(x - x[keep].max()) * keep
        p /= p.sum()
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros(v, bool)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
        q = np.exp(x - x.max()) * keep
        q /= q.sum()
        keep &= q >= min_p * q.max()
        assert keep[order[0]]
        np.testing.assert_array_equal(np.isfinite(got[row]), keep)


def test_greedy_and_logprobs():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 50)).astype(np.float32))  # 4 rows, 3 used
    rows = [_row(SamplingParams(temperature=0, logprobs=3)), _row(SamplingParams(temperature=0)),
            _row(SamplingParams(temperature=0, logprobs=0))]
    out = sample(logits, rows)
    ref = jax.nn.log_softmax(logits[:3].astype(jnp.float64), axis=-1)
    np.testing.assert_array_equal(out.tokens, np.argmax(np.asarray(logits[:3]), -1))
    np.testing.assert_allclose(out.logprobs, np.asarray(ref).max(-1), rtol=1e-5)
    np.testing.assert_array_equal(out.top_ids[0, :3], np.argsort(-np.asarray(logits[0]))[:3])
    np.testing.assert_allclose(out.top_logprobs[0, :3], np.sort(np.asarray(ref[0]))[::-1][:3],
                               rtol=1e-5)


def test_draws_depend_only_on_own_seed_and_step():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(8, 30)).astype(np.float32))
    p = SamplingParams(temperature=1.0, top_p=0.9)
    alone = sample(logits[:1], [_row(p, seed=42, step=5)]).tokens[0]
    others = [_row(SamplingParams(temperature=0.5, top_k=3), seed=i) for i in range(5)]
    shuffled = jnp.concatenate([logits[1:4], logits[:1], logits[4:]])
    mixed = sample(shuffled, others[:3] + [_row(p, seed=42, step=5)] + others[3:]).tokens[3]
    assert alone == mixed
    draws = {int(sample(logits[:1], [_row(p, seed=s)]).tokens[0]) for s in range(40)}
    assert len(draws) > 3  # different seeds explore


def test_sampling_follows_softmax():
    """Over many steps the draws' histogram matches softmax(logits / T) (chi-square)."""
    v, n, t = 6, 4000, 0.7
    logits = np.array([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0]], np.float32)
    rows = [_row(SamplingParams(temperature=t), seed=7, step=i) for i in range(n)]
    draws = sample(jnp.repeat(jnp.asarray(logits), n, axis=0), rows).tokens
    p = np.exp(logits[0] / t - (logits[0] / t).max())
    p /= p.sum()
    counts = np.bincount(draws, minlength=v)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 20.5  # p = 0.001 at 5 degrees of freedom


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"),
    ({"n": 2, "temperature": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0},
                                                    "repetition_penalty"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"temperature": float("nan")}, "temperature"), ({"seed": -1}, "seed")])
def test_bad_params_name_the_parameter(kw, param):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kw).validate(vocab_size=100)
    assert err.value.param == param and param in str(err.value)


def test_single_stream_refuses_parameters_it_does_not_apply():
    """hpllm generate/chat (hpllm.infer.text) take SamplingParams but apply only max_tokens,
    temperature, top_k, top_p and seed; any other field set is a clear error, not ignored."""
    from hpllm.infer.text import check_single_stream

    ok = SamplingParams(max_tokens=4, temperature=0.5, top_k=5, top_p=0.9, seed=3)
    assert check_single_stream(ok) is ok
    for field, kw in [("min_p", dict(min_p=0.1)), ("n", dict(n=2)), ("stop", dict(stop="x")),
                      ("logprobs", dict(logprobs=1)),
                      ("repetition_penalty", dict(repetition_penalty=1.2))]:
        with pytest.raises(SamplingError, match=f"^{field}: single-stream") as err:
            check_single_stream(SamplingParams(**kw))
        assert err.value.param == field
    with pytest.raises(SamplingError, match="^top_p"):  # and the usual validation
        check_single_stream(SamplingParams(top_p=0))


def test_draws_across_cdf_slices_follow_softmax_and_skip_masked_tokens():
    """The two-level inverse CDF (256-wide slices) over an odd vocabulary of 3 slices: the
    histogram matches the softmax (chi-square) and -inf tokens are never drawn."""
    v, n = 601, 3000
    logits = np.full((1, v), -np.inf, np.float32)
    support = [0, 255, 256, 300, 511, 512, 600]
    logits[0, support] = [0.5, 1.0, -0.3, 0.8, 0.0, 1.2, -1.0]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(n))
    draws = np.asarray(jax.jit(categorical)(keys, jnp.repeat(jnp.asarray(logits), n, axis=0)))
    assert set(draws.tolist()) <= set(support)
    p = np.exp(logits[0, support] - logits[0, support].max())
    p /= p.sum()
    counts = np.array([(draws == t).sum() for t in support])
    assert ((counts - n * p) ** 2 / (n * p)).sum() < 22.5  # p = 0.001 at 6 degrees of freedom
