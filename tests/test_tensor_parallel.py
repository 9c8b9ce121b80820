"""The collective-matmul switch: the model's tensor-parallel projections as ring collective
matmuls (hpllm/parallel/tensor_parallel.py) against plain einsums and the plain (GSPMD)
training step, on 8 simulated CPU devices (conftest)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import ConfigError, MeshConfig, make_config
from hpllm.parallel import sharding as S
from hpllm.parallel.mesh import make_mesh
from hpllm.parallel.tensor_parallel import column_parallel, row_parallel
from hpllm.perf import hlo
from hpllm.train.data import random_batch
from hpllm.train.state import init_sharded_state
from hpllm.train.step import jit_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


def random(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def attention_block(x, wq, wk, wo, ring):
    """Two column-parallel projections sharing one gather, then a row-parallel one."""
    x = S.constrain(x, ("batch", "seq", "embed"))
    q, k = column_parallel(x, (wq, wk), "bsd,dhk->bshk", ring=ring)
    y = row_parallel(q * jnp.sum(k, 2, keepdims=True), wo, "bshk,hkd->bsd", ring=ring)
    return S.constrain(y, ("batch", "seq", "embed"))


def test_ring_projections_equal_float64_einsums_and_the_plain_gradients():
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    args = (random((4, 16, 32), 0), random((32, 8, 4), 1, 0.2), random((32, 4, 4), 2, 0.2),
            random((8, 4, 32), 3, 0.2))
    x, wq, wk, wo = (np.asarray(a, np.float64) for a in args)
    args = args[:1] + tuple(  # the weights laid out as the training state holds them
        jax.device_put(w, S.named_sharding(mesh, axes)) for w, axes in
        zip(args[1:], [("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"),
                       ("heads", "head_dim", "embed")]))
    q, k = np.einsum("bsd,dhk->bshk", x, wq), np.einsum("bsd,dhk->bshk", x, wk)
    expect = np.einsum("bshk,hkd->bsd", q * k.sum(2, keepdims=True), wo)

    def loss(ring):
        return lambda *a: jnp.sum(jnp.sin(attention_block(*a, ring)))

    ring = jax.jit(S.under_rules(functools.partial(attention_block, ring=True), mesh))
    np.testing.assert_allclose(np.asarray(ring(*args)), expect, rtol=1e-5, atol=1e-5)
    grads = [jax.jit(S.under_rules(jax.grad(loss(r), argnums=(0, 1, 2, 3)), mesh))(*args)
             for r in (False, True)]
    for plain, ours in zip(*grads):  # sums in another order; entries up to about 5
        np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-5, atol=1e-4)
    counts = hlo.collective_counts(ring.lower(*args).compile().as_text())
    assert counts["collective-permute"] == 2 * 3 and counts["all-gather"] == 0  # 2 rings of 4


def test_the_ring_falls_back_to_the_plain_projection():
    x, wq, wk, wo = (random((4, 16, 32), 0), random((32, 8, 4), 1), random((32, 2, 4), 2),
                     random((8, 4, 32), 3))
    # no sharding rules (one device, decoding): exactly the plain einsums
    q, k = column_parallel(x, (wq, wk), "bsd,dhk->bshk", ring=True)
    np.testing.assert_array_equal(q, jnp.einsum("bsd,dhk->bshk", x, wq))
    np.testing.assert_array_equal(row_parallel(q, wo, "bshk,hkd->bsd", ring=True),
                                  jnp.einsum("bshk,hkd->bsd", q, wo))
    # 2 KV heads on tensor=4 (GSPMD replicates them): no ring for that projection
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    fn = jax.jit(S.under_rules(functools.partial(attention_block, ring=True), mesh))
    text = fn.lower(x, wq, wk, wo).compile().as_text()
    assert hlo.collective_counts(text)["collective-permute"] == 3  # the row-parallel ring only


def test_bad_switch_is_a_config_error():
    with pytest.raises(ConfigError, match="collective_matmul must be one of off, ring"):
        make_config("tiny", ["--collective_matmul=windowed"])


# ------------------------------------------------------------------------------ training
FAST = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=4", "--vocab_size=128",
        "--max_seq_len=16", "--seq_len=16", "--batch_size=4", "--compute_dtype=float32",
        "--warmup_steps=1", "--lr=1e-2"]
# test_sharding's model: the default preset's shapes at 4 layers, K/V heads = heads
FULL = ["--dim=256", "--n_layers=4", "--n_heads=8", "--n_kv_heads=8", "--vocab_size=2048",
        "--max_seq_len=64", "--seq_len=64", "--batch_size=8", "--compute_dtype=float32",
        "--warmup_steps=1", "--lr=1e-2"]


def train(model, mesh, switch, steps, extra=()):
    """Losses of `steps` sharded steps (each batch one of two, so it learns) and the
    compiled step's HLO text."""
    config = make_config("tiny", model + [f"--mesh={mesh}", f"--collective_matmul={switch}",
                                          f"--steps={steps}", *extra])
    mesh = make_mesh(config.mesh)
    state = init_sharded_state(config, mesh, jax.random.key(0))
    batches = [S.shard_batch(random_batch(config, seed=i % 2), mesh) for i in range(steps)]
    step = jit_train_step(config, mesh).lower(state, batches[0]).compile()
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), step.as_text()


def assert_overlapped(ring_text, plain_text):
    """In the layer loops (forward and backward scans) the ring's hops sit between its dots
    and nothing gathers the activation; the plain step all-gathers before its first dot."""
    bodies = {name: hlo.op_sequence(ring_text, name) for name in hlo.loop_bodies(ring_text)}
    assert bodies and all("all-gather" not in ops for ops in bodies.values()), bodies
    for ops in bodies.values():
        hops = [i for i, op in enumerate(ops) if op == "collective-permute"]
        assert hops and "dot" in ops[hops[0]:hops[-1]], ops  # dots between the hops
    plain = [hlo.op_sequence(plain_text, name) for name in hlo.loop_bodies(plain_text)]
    assert any("all-gather" in ops and ops.index("all-gather") < ops.index("dot")
               for ops in plain), plain
    assert all("collective-permute" not in ops for ops in plain)


def test_ring_training_equals_the_plain_step_and_overlaps():
    plain, plain_text = train(FAST, "data=2,tensor=4", "off", 3)
    ring, ring_text = train(FAST, "data=2,tensor=4", "ring", 3)
    assert plain[-1] < plain[0] - 0.05  # it learns: the comparison is not vacuous
    np.testing.assert_allclose(ring, plain, rtol=1e-5)
    assert_overlapped(ring_text, plain_text)


@pytest.mark.slow  # about a minute of CPU: four compiles of a 4-layer model
@pytest.mark.parametrize("mesh, extra", [("data=2,tensor=4", ["--remat=dots"]),
                                         ("fsdp=2,tensor=4", [])], ids=["dp_tp_remat", "fsdp_tp"])
def test_ring_training_equals_the_plain_step_full_model(mesh, extra):
    plain, plain_text = train(FULL, mesh, "off", 4, extra)
    ring, ring_text = train(FULL, mesh, "ring", 4, extra)
    assert plain[-1] < plain[0] - 0.05
    np.testing.assert_allclose(ring, plain, rtol=1e-5)
    if "fsdp" not in mesh:  # FSDP all-gathers each layer's weights in the loop (as it should)
        assert_overlapped(ring_text, plain_text)
