import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import make_config
from hpllm.infer.early_exit import (EarlyExitDecoder, EarlyExitError, _fill_kv, _segment,
                                    early_exit_generate)
from hpllm.infer.generate import generate
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import init_params, unstack_layers


@pytest.fixture(scope="module")
def model():
    config = make_config("tiny", ["--vocab_size=97", "--max_seq_len=48", "--seq_len=48",
                                  "--n_layers=4"]).model
    params = init_params(config, jax.random.key(5))
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)
    return config, params


PROMPT = [5, 17, 42, 8, 61, 3]


def test_threshold_above_one_is_the_full_model(model):
    config, params = model
    out = []
    got = list(early_exit_generate(params, config, PROMPT, 20, exit_layers=(1, 2),
                                   threshold=1.01, decoder_out=out))
    assert got == list(generate(params, config, PROMPT, 20))
    assert out[0].average_layers == config.n_layers


def test_threshold_zero_exits_at_the_first_exit_point(model):
    # Every new token exits after layer 2, so later layers are never read: the output is the
    # greedy output of the 2-layer truncated model (the prompt's keys/values of layers 0-1
    # are the same either way).
    config, params = model
    out = []
    got = list(early_exit_generate(params, config, PROMPT, 20, exit_layers=(2, 3),
                                   threshold=0.0, decoder_out=out))
    p = unstack_layers(params)
    truncated = {**p, "layers": p["layers"][:2]}
    first = next(generate(params, config, PROMPT, 1))  # the prompt runs the full model
    want = [first] + list(generate(truncated, dataclasses.replace(config, n_layers=2),
                                   PROMPT + [first], 19))
    assert got == want
    assert out[0].average_layers == 2


def test_intermediate_threshold_mixes_exit_layers(model):
    config, params = model
    out = []
    got = list(early_exit_generate(params, config, PROMPT, 30, exit_layers=(1, 2, 3),
                                   threshold=0.12, decoder_out=out))
    used = set(out[0].layers_used)
    assert len(got) == 30 and len(used) > 1, used
    assert 1 <= out[0].average_layers <= config.n_layers


def test_fill_kv_matches_the_layers_own_keys_and_values(model):
    # A skipped layer's filled K/V must be what that layer computes from the same input.
    config, params = model
    p = unstack_layers(params)
    one = dataclasses.replace(config, n_layers=1)
    seg = {**p, "layers": p["layers"][2:3]}
    h = jax.random.normal(jax.random.key(1), (1, 3, config.dim))
    positions = jnp.asarray([[4, 5, 6]])
    ids = jnp.zeros((1, 3), jnp.int32)
    _, want = _segment(seg, ids, h, positions, DenseKVCache.create(one, 1, 8), one, False)
    got = _fill_kv(seg["layers"], h, positions, DenseKVCache.create(one, 1, 8), one)
    for name in ("k", "v"):
        got_kv, want_kv = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        np.testing.assert_allclose(got_kv, want_kv, rtol=1e-5, atol=1e-5)
        assert np.abs(got_kv[0, 0, 4:7]).max() > 0


def test_bad_exit_layers_raise(model):
    config, params = model
    with pytest.raises(EarlyExitError, match="exit layers"):
        EarlyExitDecoder(params, config, (0, 2), 0.5, 16)
    with pytest.raises(EarlyExitError, match="exit layers"):
        EarlyExitDecoder(params, config, (4,), 0.5, 16)
