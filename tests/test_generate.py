import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import make_config
from hpllm.infer import generate as gen
from hpllm.infer.generate import generate, sample_logits
from hpllm.infer.sampling import pow2_bucket
from hpllm.kernels import cpu_decoder
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import forward, init_params, unstack_layers


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


def _sequential(params, config, prompt, n, seed, cpu_kernel, **sampling):
    """generate()'s loop before it was pipelined: split the key, sample, read the token back,
    then run the next step on it (the steps generate() keeps for the bench and the engine)."""
    end = min(len(prompt) + n, config.max_seq_len)
    length = pow2_bucket(end, 256, config.max_seq_len)
    padded = pow2_bucket(len(prompt), 16, length)
    if cpu_kernel:
        weights = gen.prepared_weights(params, config)
        blocks = -(-length // gen.KERNEL_BLOCK_SIZE)
        pool = cpu_decoder.create_pool(config, blocks + 1, gen.KERNEL_BLOCK_SIZE)
        tables = jnp.arange(1, blocks + 1, dtype=jnp.int32)[None]
        positions = np.where(np.arange(padded) < len(prompt), np.arange(padded), -1)
        logits, pool = gen.kernel_step(
            weights, pool, jnp.asarray(prompt + [0] * (padded - len(prompt)), jnp.int32),
            jnp.asarray(positions, jnp.int32), tables, jnp.asarray([len(prompt) - 1]), config)

        def step(token, position):
            nonlocal pool
            out, pool = gen.kernel_step(weights, pool, token, jnp.full(1, position, jnp.int32),
                                         tables, jnp.zeros(1, jnp.int32), config)
            return out
    else:
        layers = unstack_layers(params)
        cache = DenseKVCache.create(config, 1, length)
        logits, cache = gen._prefill(
            layers, jnp.asarray([prompt + [0] * (padded - len(prompt))], jnp.int32),
            jnp.int32(len(prompt)), cache, config, jnp.float32)

        def step(token, position):
            nonlocal cache
            out, cache = gen._decode(layers, token, jnp.int32(position), cache, config,
                                     jnp.float32)
            return out
    key, out = jax.random.key(seed), []
    for position in range(len(prompt), end):
        key, subkey = jax.random.split(key)
        token = sample_logits(logits, subkey, **sampling)
        out.append(int(token[0]))
        if position + 1 < end:
            logits = step(token.astype(jnp.int32), position)
    return out


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
def test_pipelined_loop_gives_the_sequential_loops_tokens(model, cpu_kernel):
    config, params = model
    assert gen.kernel_unsupported(params, config) is None  # the kernel path is the one tested
    prompt = [7, 3, 90, 12]
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)  # greedy: the tests above
    want = _sequential(params, config, prompt, 30, 11, cpu_kernel, **sampling)
    got = list(generate(params, config, prompt, 30, seed=11, cpu_kernel=cpu_kernel,
                        **sampling))
    assert got == want and len(got) == config.max_seq_len - len(prompt)
    assert len(set(got)) > 3  # sampled, not stuck on one token
    other = list(generate(params, config, prompt, 30, seed=12, cpu_kernel=cpu_kernel,
                          **sampling))
    assert other != got  # the seed reaches the draws
    # a stop id ends the stream at its first occurrence (the step dispatched ahead of it is
    # dropped); max_new_tokens caps it
    stop = got[6]
    stopped = list(generate(params, config, prompt, 30, seed=11, cpu_kernel=cpu_kernel,
                            stop_ids=(stop,), **sampling))
    assert stopped == got[:got.index(stop) + 1]
    assert list(generate(params, config, prompt, 5, seed=11, cpu_kernel=cpu_kernel,
                         **sampling)) == got[:5]
    assert list(generate(params, config, prompt, 1, seed=11, cpu_kernel=cpu_kernel,
                         **sampling)) == got[:1]
