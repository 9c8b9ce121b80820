"""GPipe over the "stage" axis on 8 simulated CPU devices: the schedule and its bubble, a toy
pipeline and the decoder against one device (values and gradients), MoE inside stages, the
compiled collectives, and 5 training steps against one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import ConfigError, MeshConfig, make_config
from hpllm.model import moe
from hpllm.model.transformer import decoder_stack, embed, head, init_params
from hpllm.parallel.mesh import make_mesh
from hpllm.parallel.pipeline import bubble_fraction, gpipe, gpipe_schedule
from hpllm.train.step import training_logits

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


def mesh_of(**sizes):
    return make_mesh(MeshConfig(**sizes))


@pytest.mark.parametrize("p, m", [(1, 1), (2, 1), (4, 8), (3, 5), (8, 2)])
def test_schedule_runs_each_microbatch_once_per_stage_in_order(p, m):
    table = gpipe_schedule(p, m)
    assert table.shape == (m + p - 1, p)
    for stage in range(p):
        work = table[:, stage][table[:, stage] >= 0]
        np.testing.assert_array_equal(work, np.arange(m))  # each microbatch once, in order
    # microbatch j reaches stage s+1 the step after stage s finished it
    for stage in range(p - 1):
        done = {mb: t for t, mb in enumerate(table[:, stage]) if mb >= 0}
        start = {mb: t for t, mb in enumerate(table[:, stage + 1]) if mb >= 0}
        assert all(start[j] == done[j] + 1 for j in range(m))
    assert (table < 0).mean() == pytest.approx(bubble_fraction(p, m))


def toy_stage(w, x, extras):
    """A stage of two tanh layers; w (2, D, D) are this stage's layers."""
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i] + extras["bias"][:, None])
    return x, {"rows": jnp.full((1,), x.shape[0], jnp.float32)}


@needs_8
@pytest.mark.parametrize("p, m, data", [(4, 8, 2), (8, 3, 1), (2, 1, 2), (4, 4, 1)])
def test_gpipe_equals_sequential_and_counts_the_bubble(p, m, data):
    rng = np.random.default_rng(p * 10 + m)
    b, d = 2 * m * data, 12
    w = jnp.asarray(rng.standard_normal((p, 2, d, d)) / np.sqrt(d), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    extras = {"bias": jnp.asarray(rng.standard_normal(b), jnp.float32)}

    def sequential(w, x):
        for s in range(p):
            x, _ = toy_stage(w[s], x, extras)
        return x

    mesh = mesh_of(data=data, stage=p)
    run = jax.jit(functools.partial(gpipe, toy_stage, microbatches=m, mesh=mesh))
    y, stats, busy = run(w, x, extras)
    np.testing.assert_allclose(np.asarray(y), np.asarray(sequential(w, x)), rtol=1e-5, atol=1e-6)
    # the schedule that ran: each stage busy M of M+P-1 steps
    np.testing.assert_array_equal(np.asarray(busy), np.full(p, m))
    ran_bubble = 1 - int(busy.sum()) / (p * (m + p - 1))
    assert ran_bubble == pytest.approx((p - 1) / (m + p - 1))
    assert ran_bubble == pytest.approx(bubble_fraction(p, m))
    np.testing.assert_array_equal(np.asarray(stats["rows"]), np.full(p, b))  # summed over mbs
    # gradients through the ppermutes equal the sequential ones
    ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    g_pipe = jax.grad(lambda w, x: jnp.sum(run(w, x, extras)[0] * ct), argnums=(0, 1))(w, x)
    g_seq = jax.grad(lambda w, x: jnp.sum(sequential(w, x) * ct), argnums=(0, 1))(w, x)
    for a, b_ in zip(g_pipe, g_seq):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)


@needs_8
@pytest.mark.parametrize("mesh_sizes, layers, experts, m", [
    (dict(stage=4, data=2), 4, 0, 4),
    pytest.param(dict(stage=2, data=4), 2, 4, 2, marks=pytest.mark.slow)])
def test_pipelined_decoder_equals_forward(mesh_sizes, layers, experts, m):
    """Logits, gradients and MoE routing stats (summed over microbatches, so the aux loss is
    the whole batch's) against the unpipelined forward."""
    config = make_config("tiny", n_layers=layers, n_experts=experts, capacity_factor=1.0,
                         pos_embedding="learned", tie_embeddings=False).model
    params = init_params(config, jax.random.key(0))
    b, s = 8, 13
    tokens = jax.random.randint(jax.random.key(1), (b, s), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    segments = jnp.asarray(np.repeat([[1] * 6 + [2] * 7], b, 0), jnp.int32)

    def loss(logits):
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    def ref(params):
        x = embed(params, tokens, positions, config)
        x, _, stats = decoder_stack(params["layers"], x, positions, config,
                                    segment_ids=segments)
        logits = head(params, x, config)
        return loss(logits), (logits, stats)

    def piped(params):
        logits, stats = training_logits(params, tokens, positions, config, microbatches=m,
                                        segment_ids=segments)
        return loss(logits), (logits, stats)

    (_, (want, want_stats)), want_g = jax.jit(jax.value_and_grad(ref, has_aux=True))(params)
    with jax.set_mesh(mesh_of(**mesh_sizes)):
        fn = jax.jit(jax.value_and_grad(piped, has_aux=True))
        compiled = fn.lower(params).compile()
        (_, (got, got_stats)), got_g = compiled(params)
    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b_ in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-6)
    if experts:
        np.testing.assert_array_equal(np.asarray(got_stats["dropped"]),
                                      np.asarray(want_stats["dropped"]))
        assert float(moe.load_balancing_loss(got_stats)) == pytest.approx(
            float(moe.load_balancing_loss(want_stats)), rel=1e-5)


@pytest.mark.slow
@needs_8
def test_five_training_steps_pipelined_equal_one_device():
    from hpllm.parallel import sharding
    from hpllm.train import state as state_lib
    from hpllm.train import step as step_lib
    from hpllm.train.data import random_batch

    def losses(config, mesh):
        batches = [random_batch(config, seed=i) for i in range(5)]
        if mesh is None:
            state = jax.jit(state_lib.init_state, static_argnums=0)(config, jax.random.key(0))
        else:
            state = state_lib.init_sharded_state(config, mesh, jax.random.key(0))
            batches = [sharding.shard_batch(b, mesh) for b in batches]
        compiled = step_lib.jit_train_step(config, mesh).lower(state, batches[0]).compile()
        out = []
        for batch in batches:
            state, metrics = compiled(state, batch)
            out.append(float(metrics["loss"]))
        return out, compiled.as_text()

    kw = dict(n_layers=4, compute_dtype="float32", batch_size=8, seq_len=32, steps=5)
    ref, _ = losses(make_config("tiny", **kw), None)
    got, hlo = losses(make_config("tiny", mesh="stage=4,data=2", microbatches=4, **kw),
                      mesh_of(stage=4, data=2))
    assert "collective-permute" in hlo
    np.testing.assert_allclose(got, ref, rtol=2e-5)


@pytest.mark.parametrize("args, message", [
    (dict(microbatches=0), "microbatches"),
    (dict(microbatches=3, batch_size=8), "microbatches"),
    (dict(mesh="stage=3", n_layers=4), "n_layers divisible"),
    (dict(mesh="stage=2,expert=2", n_experts=4), "not supported"),
])
def test_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", **args)


def test_gpipe_without_a_stage_mesh_says_so():
    with pytest.raises(ValueError, match="needs a mesh with a 'stage' axis"):
        gpipe(toy_stage, jnp.zeros((1, 2, 3, 3)), jnp.zeros((2, 3)),
              {"bias": jnp.zeros(2)}, microbatches=1)
