"""Pipelines over the "stage" axis on 8 simulated CPU devices: the GPipe and 1F1B schedules
and their bubbles, toy pipelines and the decoder against one device (values and gradients),
MoE inside stages, the compiled collectives, the stage-sharded training state (memory,
checkpoints), and 5 training steps of each schedule against one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.checkpoints import orbax_io
from hpllm.config import ConfigError, MeshConfig, make_config
from hpllm.model import moe
from hpllm.model.transformer import decoder_stack, embed, head, init_params
from hpllm.parallel import one_f_one_b as f1b
from hpllm.parallel import sharding
from hpllm.parallel.mesh import make_mesh
from hpllm.parallel.pipeline import bubble_fraction, gpipe, gpipe_schedule
from hpllm.perf.hlo import parse_module, shapes
from hpllm.train import state as state_lib
from hpllm.train import step as step_lib
from hpllm.train.data import random_batch
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


# --------------------------------------------------------------------------------------- 1F1B
@pytest.mark.parametrize("p, m", [(1, 3), (2, 1), (4, 8), (3, 5), (8, 2), (4, 4)])
def test_1f1b_schedule_keeps_the_dependencies_and_at_most_p_microbatches(p, m):
    table = f1b.schedule(p, m)
    assert table.shape == (2 * (m + p - 1), p, 2)
    f, b = f1b._times(table, f1b.FORWARD), f1b._times(table, f1b.BACKWARD)
    assert (f >= 0).all() and (b >= 0).all()  # each microbatch once each way on each stage
    assert ((table[..., 0] == f1b.IDLE) == (table[..., 1] < 0)).all()
    assert (f[1:] > f[:-1]).all()  # forward after the previous stage's
    assert (b[:-1] > b[1:]).all()  # backward after the next stage's
    assert (b[-1] > f[-1]).all()  # the last stage: backward after its own forward
    for stage in range(p):  # one forward, one backward in the steady state (1F1B)
        ops = [op for op in table[:, stage, 0] if op != f1b.IDLE]
        warm = min(p - 1 - stage, m)
        steady = ops[warm:warm + 2 * (m - warm)]
        assert steady == [f1b.FORWARD, f1b.BACKWARD] * (m - warm)
    idle = (table[..., 0] == f1b.IDLE).mean()
    assert idle == pytest.approx(bubble_fraction(p, m, "1f1b"))
    assert idle == pytest.approx((p - 1) / (m + p - 1))
    np.testing.assert_array_equal(f1b.in_flight(p, m), np.minimum(p - np.arange(p), m))


def toy_loss(head_w, y, extras):
    return jnp.sum(jnp.tanh(y @ head_w) * extras["ct"])


@needs_8
@pytest.mark.parametrize("p, m, data", [
    (4, 8, 2), *(pytest.param(*a, marks=pytest.mark.slow) for a in [(8, 3, 1), (2, 5, 4)])])
def test_1f1b_equals_sequential_and_counts_the_bubble(p, m, data):
    """Loss and the gradients in stage weights, head weights and input against jax.grad of
    the sequential stages; the busy units against the bubble formula."""
    rng = np.random.default_rng(p * 10 + m)
    b, d = 2 * m * data, 12
    w = jnp.asarray(rng.standard_normal((p, 2, d, d)) / np.sqrt(d), jnp.float32)
    head_w = jnp.asarray(rng.standard_normal((d, 3)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    extras = {"bias": jnp.asarray(rng.standard_normal(b), jnp.float32),
              "ct": jnp.asarray(rng.standard_normal((b, 3)), jnp.float32)}

    def sequential(w, head_w, x):
        for s in range(p):
            x, _ = toy_stage(w[s], x, extras)
        return toy_loss(head_w, x, extras)

    mesh = mesh_of(data=data, stage=p)
    run = jax.jit(functools.partial(f1b.one_f_one_b, toy_stage, toy_loss, microbatches=m,
                                    mesh=mesh))
    loss, stats, grads, busy = run(w, head_w, x, extras)
    want, want_grads = jax.value_and_grad(sequential, argnums=(0, 1, 2))(w, head_w, x)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["rows"]), np.full(p, b))
    # the schedule that ran: each stage busy 2M of the 2(M+P-1) units
    units = len(f1b.schedule(p, m))
    np.testing.assert_array_equal(np.asarray(busy), np.full(p, 2 * m))
    ran_bubble = 1 - int(busy.sum()) / (p * units)
    assert ran_bubble == pytest.approx(bubble_fraction(p, m, "1f1b"))


# ------------------------------------------------------------------- the stage-sharded state
def state_bytes_on(state, device) -> int:
    """Bytes of parameters and optimizer state that `device` holds."""
    leaves = jax.tree.leaves({"params": state["params"], "opt": state["opt_state"]})
    return sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == device)


def train_losses(config, mesh, steps=5):
    """Losses of `steps` training steps from the same initialisation, and the compiled step."""
    batches = [random_batch(config, seed=i) for i in range(steps)]
    if mesh is None:
        state = jax.jit(state_lib.init_state, static_argnums=0)(config, jax.random.key(0))
    else:
        state = state_lib.init_sharded_state(config, mesh, jax.random.key(0))
        batches = [sharding.shard_batch(b, mesh) for b in batches]
    compiled = step_lib.jit_train_step(config, mesh).lower(state, batches[0]).compile()
    # the compiled step's arguments less one device's rows of the batch: state bytes
    ways = sharding.batch_axis_size(mesh) if mesh is not None else 1
    state_bytes = compiled.memory_analysis().argument_size_in_bytes - sum(
        a.nbytes for a in batches[0].values()) // ways
    out = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        out.append(float(metrics["loss"]))
    return out, compiled, state_bytes, state


TRAIN = dict(n_layers=4, compute_dtype="float32", batch_size=8, seq_len=32, steps=5)


@functools.cache
def one_device_run():
    losses, _, state_bytes, _ = train_losses(make_config("tiny", **TRAIN), None)
    return losses, state_bytes


def layer_collectives(hlo: str, config) -> list[str]:
    """Collectives in compiled HLO that move a layer parameter (or its gradient): an array
    shaped like a stacked layer weight, whole, per stage or reshaped (P, L/P, ...)."""
    stage = config.mesh.stage
    stacked = jax.tree.leaves(jax.eval_shape(
        lambda: state_lib.init_state(config, jax.random.key(0)))["params"]["layers"])
    layer_shapes = set()
    for s in stacked:
        n, rest = s.shape[0], s.shape[1:]
        layer_shapes |= {s.shape, (n // stage, *rest), (stage, n // stage, *rest)}
    _, instrs = parse_module(hlo)
    moving = {"all-gather", "all-to-all", "collective-permute"}
    return [f"{i.opcode} {i.type_text}" for i in instrs.values()
            if i.opcode.removesuffix("-start") in moving
            and any(dims in layer_shapes for _, dims in shapes(i.type_text))]


@needs_8
@pytest.mark.parametrize("schedule", [pytest.param("gpipe", marks=pytest.mark.slow), "1f1b"])
def test_five_training_steps_pipelined_equal_one_device(schedule, tmp_path):
    """stage=4 x data=2 against one device: the losses, the state's bytes per device (1/4),
    where the layers live, no collective moving them, and a checkpoint of the trained state
    restored onto another mesh."""
    config = make_config("tiny", mesh="stage=4,data=2", microbatches=4,
                         pipeline_schedule=schedule, **TRAIN)
    mesh = mesh_of(stage=4, data=2)
    got, compiled, state_bytes, state = train_losses(config, mesh)
    want, one_device_bytes = one_device_run()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # parameters + AdamW: the compiled step's arguments, and the arrays' shards
    whole = sum(a.nbytes for a in jax.tree.leaves((state["params"], state["opt_state"])))
    per_device = [state_bytes_on(state, d) for d in mesh.devices.flat]
    print(f"\n{schedule}: params + AdamW bytes per device {per_device[0]} of {whole} "
          f"({per_device[0] / whole:.3f}); compiled state arguments {state_bytes} of one "
          f"device's {one_device_bytes} ({state_bytes / one_device_bytes:.3f})")
    assert state_bytes == pytest.approx(one_device_bytes / 4, rel=0.15)
    assert max(per_device) == pytest.approx(whole / 4, rel=0.15)
    for shard in state["opt_state"][1][0].mu["layers"]["wq"].addressable_shards:
        stage = int(np.argwhere(mesh.devices == shard.device)[0][1])  # stage p: layer p
        assert shard.index[0] == slice(stage, stage + 1)
    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    # the reshape (L, ...) -> (P, L/P, ...) of the stage-sharded layers moves nothing
    assert layer_collectives(hlo, config) == []
    orbax_io.save(tmp_path, 5, state, {})
    abstract = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.key(0)))
    shardings = state_lib.state_shardings(config, mesh_of(stage=2, fsdp=4))
    wanted = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
    restored, _ = orbax_io.restore(tmp_path, 5, wanted)
    for a, b, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                        jax.tree.leaves(shardings)):
        assert a.sharding.is_equivalent_to(sh, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@needs_8
def test_1f1b_needs_less_activation_memory_than_gpipe_at_8_microbatches():
    """Compiled temporaries (activations, stashes, gradients in flight) of the train step,
    stage=4 x data=2, M = 8; the state's bytes are the same."""
    mesh = mesh_of(stage=4, data=2)
    memory = {}
    for schedule in ("gpipe", "1f1b"):
        config = make_config("tiny", mesh="stage=4,data=2", microbatches=8, n_layers=8,
                             batch_size=32, seq_len=64, compute_dtype="float32",
                             pipeline_schedule=schedule)
        state = jax.eval_shape(lambda: state_lib.init_sharded_state(config, mesh,
                                                                    jax.random.key(0)))
        batch = sharding.shard_batch(random_batch(config, seed=0), mesh)
        memory[schedule] = step_lib.jit_train_step(config, mesh).lower(
            state, batch).compile().memory_analysis()
    temp = {k: m.temp_size_in_bytes for k, m in memory.items()}
    print(f"\ntrain-step temp bytes per device, P=4, M=8: {temp}")
    assert memory["gpipe"].argument_size_in_bytes == memory["1f1b"].argument_size_in_bytes
    assert temp["1f1b"] < temp["gpipe"]


@pytest.mark.parametrize("args, message", [
    (dict(microbatches=0), "microbatches"),
    (dict(microbatches=3, batch_size=8), "microbatches"),
    (dict(mesh="stage=3", n_layers=4), "n_layers divisible"),
    (dict(pipeline_schedule="zigzag"), "pipeline_schedule"),
    (dict(mesh="stage=2", n_experts=4, pipeline_schedule="1f1b"), "does not train MoE"),
    (dict(mesh="stage=2,data=2,tensor=2", pipeline_schedule="1f1b"), "tensor > 1 needs"),
])
def test_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", **args)


def test_gpipe_without_a_stage_mesh_says_so():
    with pytest.raises(ValueError, match="needs a mesh with a 'stage' axis"):
        gpipe(toy_stage, jnp.zeros((1, 2, 3, 3)), jnp.zeros((2, 3)),
              {"bias": jnp.zeros(2)}, microbatches=1)
