import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import make_config
from hpllm.infer.generate import generate, sample_logits
from hpllm.model.transformer import forward, init_params


@pytest.fixture(scope="module")
def model():
    config = make_config("tiny", ["--vocab_size=97", "--max_seq_len=24", "--seq_len=24"]).model
    params = init_params(config, jax.random.key(3))
    # Larger weights than init so that greedy continuations are not all the same token.
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)
    return config, params


def test_greedy_generation_equals_argmax_of_full_forward(model):
    config, params = model
    prompt = [5, 17, 42, 8, 61]
    out = list(generate(params, config, prompt, 12))
    # The slow, obviously right way: rerun the whole sequence for every token. The sequence is
    # zero-padded to a fixed length (causal: padding after a position cannot change it), so
    # one compiled forward serves every step.
    n = config.max_seq_len
    full = jax.jit(lambda t: forward(params, t, jnp.arange(n)[None], config)[0])
    seq = list(prompt)
    for _ in range(12):
        logits = full(jnp.asarray([seq + [0] * (n - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert out == seq[len(prompt):]
    assert len(set(out)) > 1


def test_generation_stops_at_stop_id_and_at_max_seq_len(model):
    config, params = model
    prompt = [1, 2, 3]
    full = list(generate(params, config, prompt, 100))
    assert len(full) == config.max_seq_len - len(prompt)  # clipped to the context
    stop = full[4]
    first = full.index(stop)
    assert list(generate(params, config, prompt, 100, stop_ids=(stop,))) == full[:first + 1]


def test_generation_rejects_impossible_prompts(model):
    config, params = model
    with pytest.raises(ValueError, match="non-empty prompt"):
        next(generate(params, config, [], 4))
    with pytest.raises(ValueError, match="no room"):
        next(generate(params, config, list(range(config.max_seq_len)), 4))


def test_sampling_respects_temperature_and_top_k():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5, -1.0]])
    assert int(sample_logits(logits, jax.random.key(0), temperature=0.0)[0]) == 1
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_k=2)[0])(keys))
    assert set(draws) == {1, 3}  # only the two largest logits survive top-k
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0)[0])(keys))
    expected = np.asarray(jax.nn.softmax(logits[0]))
    observed = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.035)  # ~4 sigma at n=2000


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray([probs]))
    keys = jax.random.split(jax.random.key(2), 2000)

    def draws(**kw):
        return set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, 1.0, **kw)[0])(keys)))

    assert draws(top_p=0.4) == {0}  # the most likely token alone already reaches 0.4
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(top_p=0.9) == {0, 1, 2}
    assert draws(top_p=1.0) == {0, 1, 2, 3}
    assert draws(top_k=3, top_p=0.7) == {0, 1}
