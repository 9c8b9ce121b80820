"""Mesh, logical-axis rules, sharded init and checkpoints, and DP / FSDP / TP / FSDP+TP training
steps against one device on 8 simulated CPU devices (conftest)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hpllm.checkpoints import orbax_io
from hpllm.config import ConfigError, MeshConfig, make_config
from hpllm.model.transformer import param_shapes
from hpllm.parallel import sharding as S
from hpllm.parallel.mesh import make_mesh, resolve_shape
from hpllm.perf import roofline
from hpllm.perf.hardware import CHIPS
from hpllm.perf.hlo import collective_counts
from hpllm.train.data import random_batch
from hpllm.train.state import init_sharded_state, init_state, param_shardings, state_shardings
from hpllm.train.step import jit_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")

# The default preset's shapes (K/V heads = heads, so tensor=8 splits them too), a batch of
# 8 x 64, float32 compute: reductions in another order are the only difference to one device.
MODEL = ["--dim=256", "--n_layers=4", "--n_heads=8", "--n_kv_heads=8", "--vocab_size=2048",
         "--max_seq_len=64", "--seq_len=64", "--batch_size=8", "--compute_dtype=float32",
         "--warmup_steps=1", "--lr=1e-2", "--steps=5"]
STRATEGIES = {"DP": "data=8", "FSDP": "fsdp=8", "TP": "tensor=8", "FSDP+TP": "fsdp=4,tensor=2"}
STEPS = 5


def config_for(mesh: str = "", extra=()):
    return make_config("tiny", MODEL + ([f"--mesh={mesh}"] if mesh else []) + list(extra))


def batches(config):
    # Each step sees the same 2 rows repeated, so the model visibly learns within 5 steps.
    out = []
    for step in range(STEPS):
        b = random_batch(config, seed=step % 2)
        out.append(b)
    return out


@functools.cache
def one_device_run():
    config = config_for()
    state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(0))
    initial = jax.device_get(state["params"])
    step = jit_train_step(config)
    losses = []
    for batch in batches(config):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"]), initial


@functools.cache
def sharded_run(strategy: str):
    """Losses, final params, compiled HLO text and memory analysis of 5 steps on `strategy`."""
    config = config_for(STRATEGIES[strategy])
    mesh = make_mesh(config.mesh)
    state = init_sharded_state(config, mesh, jax.random.key(0))
    initial = jax.device_get(state)
    shard_shapes = {jax.tree_util.keystr(k): {s.data.shape for s in v.addressable_shards}
                    for k, v in jax.tree_util.tree_leaves_with_path(state)}
    step = jit_train_step(config, mesh)
    first = S.shard_batch(batches(config)[0], mesh)
    compiled = step.lower(state, first).compile()
    losses = []
    for batch in batches(config):
        state, metrics = compiled(state, S.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    placed = {jax.tree_util.keystr(k): v.sharding.spec
              for k, v in jax.tree_util.tree_leaves_with_path(state["params"])}
    return (np.array(losses), jax.device_get(state["params"]), compiled.as_text(),
            compiled.memory_analysis(), placed, config, mesh, initial, shard_shapes)


# ------------------------------------------------------------------------------ mesh and rules
def test_mesh_resolves_minus_one_and_orders_tensor_innermost():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    assert mesh.axis_names[-1] == "tensor"
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # Tensor neighbours are consecutive devices: ids differ by 1 along the last axis.
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert (np.diff(ids, axis=-1) == 1).all()
    assert make_mesh(MeshConfig()).size == 1  # the default is one device on any machine
    assert make_mesh(MeshConfig(tensor=2)).size == 2


@pytest.mark.parametrize("mesh, devices, message", [
    (MeshConfig(data=3, fsdp=-1), 8, "not divisible"),
    (MeshConfig(data=4, tensor=4), 8, "needs 16 devices"),
    (MeshConfig(data=-1, fsdp=-1), 8, "at most one"),
    (MeshConfig(tensor=0), 8, "positive or -1"),
])
def test_bad_meshes_say_why(mesh, devices, message):
    with pytest.raises(ConfigError, match=message):
        resolve_shape(mesh, devices)


def test_mesh_flag_parsing():
    config = make_config("tiny", ["--mesh=data=2,fsdp=2,tensor=2"])
    assert config.mesh == MeshConfig(data=2, fsdp=2, tensor=2)
    assert make_config("tiny", ["--mesh.expert=-1"]).mesh.expert == -1
    for bad, message in [("data=2,pipe=2", "cannot parse mesh"), ("data=two", "expects int"),
                         ("data=2,data=4", "given twice")]:
        with pytest.raises(ConfigError, match=message):
            make_config("tiny", [f"--mesh={bad}"])


def test_logical_spec_uses_each_mesh_axis_once_and_only_where_it_divides():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # Without a mesh: the rules as written.
    assert S.logical_spec(("batch", "seq", "embed")) == P(("data", "fsdp", "expert"), "tensor")
    # Activations: batch takes data and fsdp, so embed (fsdp in the rules) stays whole.
    assert S.logical_spec(("batch", "seq", "embed"), mesh=mesh) == P(("data", "fsdp"), "tensor")
    # A parameter: FSDP on embed, TP on heads; a size-1 axis (expert) is left out.
    assert S.logical_spec(("layers", "embed", "heads", "head_dim"), mesh=mesh) == \
        P(None, "fsdp", "tensor")
    # 3 KV heads cannot be split 2 ways: replicated along tensor rather than padded.
    assert S.logical_spec(("embed", "kv_heads"), mesh=mesh, shape=(64, 3)) == P("fsdp")
    # batch 2 over data x fsdp = 4: takes data (2), not fsdp.
    assert S.logical_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")
    assert S.logical_spec(("experts", None, "mlp")) == P("expert", None, "tensor")
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'bogus'"):
        S.logical_spec(("bogus",))


def test_param_and_state_shardings_cover_every_leaf():
    config = config_for("fsdp=4,tensor=2", ["--tie_embeddings=false", "--pos_embedding=learned"])
    mesh = make_mesh(config.mesh)
    shardings = param_shardings(config, mesh)
    shapes = param_shapes(config.model)
    assert jax.tree.structure(shardings) == jax.tree.structure(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert shardings["layers"]["w_down"].spec == P(None, "tensor", "fsdp")
    assert shardings["layers"]["wo"].spec == P(None, "tensor", None, "fsdp")
    assert shardings["unembed"].spec == P("fsdp", "tensor")
    state = state_shardings(config, mesh)
    abstract = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    # Adam's moments are laid out as their parameter; counters are replicated.
    mu = state["opt_state"][1][0].mu
    assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, shardings)
    assert state["step"].spec == P()


def test_constrain_is_the_identity_outside_a_sharded_trace():
    x = jnp.arange(12.0).reshape(2, 3, 2)
    assert S.constrain(x, ("batch", "seq", "embed")) is x
    mesh = make_mesh(MeshConfig(data=2))
    with S.use_rules(mesh):
        with pytest.raises(ValueError, match="3 axis names"):
            S.constrain(jnp.ones((2, 3)), ("batch", "seq", "embed"))
    assert S.active_rules() is None


def test_batch_must_split_evenly():
    with pytest.raises(ConfigError, match="batch_size \\(6\\) must be divisible by the 4"):
        S.training_mesh(make_config("tiny", ["--mesh=data=2,fsdp=2,tensor=2",
                                             "--batch_size=6"]))
    assert S.training_mesh(make_config("tiny")) is None  # one device: the plain step


# ------------------------------------------------------------------------------ sharded init
def test_sharded_init_equals_one_device_init_and_is_split():
    initial, shard_shapes = sharded_run("FSDP+TP")[7:9]  # fsdp=4, tensor=2
    ref = one_device_run()[2]  # the same key's parameters, made on one device
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(initial["params"]),
                            jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert all(not np.any(m) for m in jax.tree.leaves(initial["opt_state"][1][0].mu))
    # (L, D, H, Dh): D over fsdp=4, H over tensor=2; each device holds only its block.
    assert shard_shapes["['params']['layers']['wq']"] == {(4, 256 // 4, 8 // 2, 32)}
    assert shard_shapes["['opt_state'][1][0].nu['layers']['w_gate']"] == {(4, 256 // 4, 704 // 2)}
    assert shard_shapes["['params']['embed']"] == {(2048 // 2, 256 // 4)}


# ------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_like_one_device(strategy):
    ref_losses, ref_params, initial = one_device_run()
    losses, params, *_ = sharded_run(strategy)
    assert ref_losses[-1] < ref_losses[0] - 0.05  # it learns: the comparison is not vacuous
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam divides by sqrt(v): where a gradient is ~0, a rounding-level difference in it can
    # move that one weight by a visible part of lr (1e-2). So: each weight within 1 % of one
    # step's lr, and each matrix's 5-step update equal to 1e-4 of its norm.
    for (path, a), b, b0 in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(ref_params), jax.tree.leaves(initial)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=str(path))
        update = np.linalg.norm(b - b0)
        assert update > 0 and np.linalg.norm(a - b) <= 1e-4 * update, path


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_compiles_to_its_collectives(strategy):
    hlo, placed = sharded_run(strategy)[2], sharded_run(strategy)[4]
    counts = collective_counts(hlo)
    scatters = counts["reduce-scatter"] + counts["all-reduce+slice"]
    if strategy == "DP":  # replicated weights: gradients all-reduced, nothing gathered
        assert counts["all-reduce"] > 0 and counts["all-gather"] == 0
        assert placed["['layers']['wq']"] == P()
    if "FSDP" in strategy:  # weights gathered before use, gradients reduce-scattered
        assert counts["all-gather"] > 0 and scatters > 0
        assert "fsdp" in placed["['layers']['wq']"]
    if "TP" in strategy:  # each block ends in an all-reduce or a reduce-scatter
        assert counts["all-reduce"] + scatters > 0
        assert "tensor" in placed["['layers']['w_gate']"]


def _predicted(strategy):
    config, mesh = sharded_run(strategy)[5:7]
    shape = roofline.MeshShape(data=mesh.shape["data"], fsdp=mesh.shape["fsdp"],
                               tensor=mesh.shape["tensor"])
    workload = roofline.Workload("train", config.train.batch_size, config.train.seq_len)
    return roofline.predict(config.model, workload, CHIPS["h100"], shape,
                            param_dtype="float32", compute_dtype="float32",
                            attention=config.model.attention).memory


@pytest.mark.parametrize("strategy", ["DP", "FSDP", "TP"])
def test_compiled_memory_matches_the_roofline_per_device(strategy):
    stats = sharded_run(strategy)[3]
    compiled = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    predicted = _predicted(strategy)["total"]
    assert compiled == pytest.approx(predicted, rel=0.25)


def test_fsdp_holds_one_eighth_of_the_state():
    # The step's arguments are the state (and the batch): per device, FSDP's is 1/8 of DP's.
    batch_bytes = 6 * 8 * 64 * 4 / 8  # six (8, 64) 4-byte arrays, rows split 8 ways
    dp, fsdp = (sharded_run(s)[3].argument_size_in_bytes - batch_bytes for s in ("DP", "FSDP"))
    assert fsdp * 8 == pytest.approx(dp, rel=0.02)  # norm scales of 256 split 8 ways: exact
    pred = {s: _predicted(s) for s in ("DP", "FSDP")}
    assert pred["FSDP"]["params"] + pred["FSDP"]["optimizer"] == pytest.approx(
        (pred["DP"]["params"] + pred["DP"]["optimizer"]) / 8)


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_restores_onto_another_mesh(tmp_path):
    config = config_for("fsdp=4,tensor=2")
    saved_mesh = make_mesh(config.mesh)
    state = init_sharded_state(config, saved_mesh, jax.random.key(5))
    orbax_io.save(tmp_path, 3, state, {"note": "fsdp=4,tensor=2"})
    abstract = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    for target in ("data=2,tensor=4", "fsdp=8"):
        mesh = make_mesh(MeshConfig.parse(target))
        shardings = state_shardings(config, mesh)
        wanted = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              abstract, shardings)
        restored, meta = orbax_io.restore(tmp_path, 3, wanted)
        assert meta == {"note": "fsdp=4,tensor=2"}
        for (path, a), b, sh in zip(jax.tree_util.tree_leaves_with_path(restored),
                                    jax.tree.leaves(state), jax.tree.leaves(shardings)):
            assert a.sharding.is_equivalent_to(sh, a.ndim), path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


# ------------------------------------------------------------------------------ host memory
@pytest.mark.slow  # about 20 s of CPU: one more sharded compile
def test_optimizer_state_in_host_memory_trains_like_one_device():
    """Where the backend has a host memory space (CPU does: "pinned_host"), the optimizer
    state can live there between steps; the losses do not change."""
    if "pinned_host" not in {m.kind for m in jax.devices()[0].addressable_memories()}:
        pytest.skip("this backend has no pinned_host memory")
    config = config_for("fsdp=8")
    mesh = make_mesh(config.mesh)
    state = init_sharded_state(config, mesh, jax.random.key(0), opt_memory_kind="pinned_host")
    mu = state["opt_state"][1][0].mu["layers"]["wq"]
    assert mu.sharding.memory_kind == "pinned_host"
    assert state["params"]["layers"]["wq"].sharding.memory_kind == "device"
    step = jit_train_step(config, mesh, opt_memory_kind="pinned_host")
    losses = []
    for batch in batches(config)[:3]:
        state, metrics = step(state, S.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert state["opt_state"][1][0].nu["embed"].sharding.memory_kind == "pinned_host"
    np.testing.assert_allclose(losses, one_device_run()[0][:3], rtol=1e-5)
