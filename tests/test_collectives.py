"""Ring collectives and collective matmuls vs XLA's built-ins on 2, 4 and 8 CPU devices, and
the model's MLP through them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hpllm.config import MeshConfig
from hpllm.model.layers import swiglu
from hpllm.parallel import collectives as C
from hpllm.parallel.mesh import make_mesh
from hpllm.parallel.sharding import constrain, named_sharding, under_rules
from hpllm.perf.hlo import collective_counts, op_sequence

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest)")


def mesh_of(n, names=("x",), shape=None):
    shape = shape or (n,)
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])


def random_array(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(-1000, 1000, shape), dtype)
    return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("impl", ["ring", "ring_bidir"])
@pytest.mark.parametrize("dtype, rows, cols", [(jnp.int32, 4, 3), (jnp.float32, 2, 5),
                                               (jnp.float32, 6, 1), (jnp.bfloat16, 4, 7)])
def test_ring_equals_xla(n, kind, impl, dtype, rows, cols):
    # rows per device before the collective: reduce-scatter needs them divisible by n; 2 and
    # 6 rows make the bidirectional split fall back or split unevenly for some n.
    rows = rows * n if kind == "reduce_scatter" else rows
    x = random_array((n * rows, cols), dtype, seed=n * 100 + rows)
    mesh = mesh_of(n)
    ours = C.sharded_collective(kind, impl, mesh, "x")(x)
    ref = C.sharded_collective(kind, "xla", mesh, "x")(x)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert ours.sharding.is_equivalent_to(ref.sharding, ours.ndim)
    if kind == "all_gather" or dtype == jnp.int32:
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    else:  # sums in a different order: float rounding only
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                                   rtol=tol, atol=tol * n)
    if kind != "all_gather":  # and both really are the sum of the per-device blocks
        total = np.asarray(x, np.float64).reshape(n, rows, cols).sum(0)
        if kind == "reduce_scatter":
            total = total.reshape(rows, cols)
        np.testing.assert_allclose(np.asarray(ours, np.float64), total,
                                   rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=0.1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_other_dimensions_untiled_and_a_2d_mesh(bidirectional):
    """Gather/scatter along dim 1, untiled gather, and a ring over one axis of a 2x4 mesh."""
    mesh = mesh_of(8, ("a", "b"), (2, 4))
    x = random_array((2, 8, 12), jnp.float32, 7)

    def body(x):
        return (C.ring_all_gather(x, "b", axis=1, bidirectional=bidirectional),
                C.ring_all_gather(x, "b", axis=1, tiled=False, bidirectional=bidirectional),
                C.ring_reduce_scatter(x, "b", scatter_dimension=2, bidirectional=bidirectional),
                C.ring_all_reduce(x, "b", bidirectional=bidirectional))

    def ref(x):
        return (jax.lax.all_gather(x, "b", axis=1, tiled=True),
                jax.lax.all_gather(x, "b", axis=1),
                jax.lax.psum_scatter(x, "b", scatter_dimension=2, tiled=True),
                jax.lax.psum(x, "b"))

    specs = dict(mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"), check_vma=False)
    ours = jax.jit(jax.shard_map(body, **specs))(x)
    theirs = jax.jit(jax.shard_map(ref, **specs))(x)
    for o, t in zip(ours, theirs):
        assert o.shape == t.shape
        np.testing.assert_allclose(np.asarray(o), np.asarray(t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("impl", ["ring", "ring_bidir"])
def test_gradients_equal_xla(kind, impl):
    n, mesh = 4, mesh_of(4)
    x = random_array((n * 8, 3), jnp.float32, 11)

    def loss(impl_name):
        fn = C.sharded_collective(kind, impl_name, mesh, "x")

        def f(x):
            y = fn(x)
            w = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
            return jnp.sum(jnp.sin(y) * w)
        return jax.jit(jax.grad(f))

    ours, ref = loss(impl)(x), loss("xla")(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(ref).sum()) > 0


def test_indivisible_dimension_is_an_error():
    mesh = mesh_of(4)
    fn = jax.shard_map(lambda x: C.ring_reduce_scatter(x, "x"), mesh=mesh, in_specs=P("x"),
                       out_specs=P("x"), check_vma=False)
    with pytest.raises(ValueError, match="not divisible by the axis size 4"):
        fn(jnp.ones((4 * 3, 2)))


def _collective_matmuls(n):
    mesh = mesh_of(n)
    ag = jax.jit(jax.shard_map(lambda a, w: C.all_gather_matmul(a, w, "x"), mesh=mesh,
                               in_specs=(P("x"), P(None, "x")), out_specs=P(None, "x"),
                               check_vma=False))
    rs = jax.jit(jax.shard_map(lambda a, w: C.matmul_reduce_scatter(a, w, "x"), mesh=mesh,
                               in_specs=(P(None, "x"), P("x")), out_specs=P("x"),
                               check_vma=False))
    return ag, rs


@pytest.mark.parametrize("n", [2, 4, 8])
def test_collective_matmuls_equal_the_plain_matmul(n):
    ag, rs = _collective_matmuls(n)
    a = random_array((3 * n, 10), jnp.float32, n)  # rows sharded: all-gather matmul
    w = random_array((10, 2 * n), jnp.float32, n + 1)  # columns sharded (tensor parallel)
    expect = np.asarray(a, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(ag(a, w)), expect, rtol=1e-5, atol=1e-5)
    a = random_array((2 * n, 5 * n), jnp.float32, n + 2)  # contraction dim sharded
    w = random_array((5 * n, 7), jnp.float32, n + 3)
    expect = np.asarray(a, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(rs(a, w)), expect, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, w: jnp.sum(rs(a, w) ** 2), argnums=(0, 1))(a, w)
    plain = jax.grad(lambda a, w: jnp.sum((a @ w) ** 2), argnums=(0, 1))(a, w)
    for g, p in zip(grads, plain):
        np.testing.assert_allclose(np.asarray(g), np.asarray(p), rtol=1e-4, atol=1e-4)


def _entry_ops(compiled_text):
    """The scheduled entry computation as 'permute' / 'dot' / 'all-gather' / ..."""
    return ["permute" if op == "collective-permute" else op for op in op_sequence(compiled_text)]


def test_all_gather_matmul_hlo_interleaves_hops_and_dots():
    n = 4
    ag, _ = _collective_matmuls(n)
    a, w = jnp.ones((16 * n, 32)), jnp.ones((32, 8 * n))
    ops = _entry_ops(ag.lower(a, w).compile().as_text())
    assert ops.count("permute") == n - 1 and ops.count("dot") == n and "all-gather" not in ops
    first_dot, last_permute = ops.index("dot"), len(ops) - 1 - ops[::-1].index("permute")
    assert first_dot < last_permute, ops  # a matmul runs before the last hop: interleaved

    mesh = mesh_of(n)  # the plain version: one all-gather, then the matmul
    plain = jax.jit(jax.shard_map(lambda a, w: jax.lax.all_gather(a, "x", tiled=True) @ w,
                                  mesh=mesh, in_specs=(P("x"), P(None, "x")),
                                  out_specs=P(None, "x"), check_vma=False))
    plain_ops = _entry_ops(plain.lower(a, w).compile().as_text())
    assert "all-gather" in plain_ops and "permute" not in plain_ops
    assert plain_ops.index("all-gather") < plain_ops.index("dot")


def test_matmul_reduce_scatter_hlo_is_hops_and_block_matmuls():
    n = 4
    _, rs = _collective_matmuls(n)
    a, w = jnp.ones((8 * n, 16 * n)), jnp.ones((16 * n, 8))
    text = rs.lower(a, w).compile().as_text()
    ops = _entry_ops(text)
    # n block matmuls and n-1 hops, no reduce-scatter/all-reduce. Only the adds depend on
    # the hops; the matmuls do not, which leaves the scheduler free to overlap them (XLA's CPU
    # scheduler, having no asynchronous collectives, simply runs them first).
    assert ops.count("permute") == n - 1 and ops.count("dot") == n, ops
    assert not re.search(r"(reduce-scatter|all-reduce)(-start)?\(", text)


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_swiglu_equals_the_unsharded_mlp(n, ring):
    """The model's MLP under sequence-parallel rules on tensor=n, with and without the ring
    collective matmuls, against the same MLP on one device (and its gradients)."""
    b, s, d, f = 2, 6 * n, 12, 10 * n
    x, wg, wu, wd = (random_array(shape, jnp.float32, i) / np.sqrt(shape[0]) for i, shape in
                     enumerate([(b, s, d), (d, f), (d, f), (f, d)]))  # entries of order 1
    mesh = make_mesh(MeshConfig(tensor=n))
    # the weights laid out as the training state holds them: columns / rows over tensor
    wg, wu, wd = (jax.device_put(w, named_sharding(mesh, axes)) for w, axes in
                  [(wg, ("embed", "mlp")), (wu, ("embed", "mlp")), (wd, ("mlp", "embed"))])

    def mlp(x, *w):
        x = constrain(x, ("batch", "seq", "embed"))
        return constrain(swiglu(x, *w, ring=ring), ("batch", "seq", "embed"))

    sharded = jax.jit(under_rules(mlp, mesh))
    np.testing.assert_allclose(np.asarray(sharded(x, wg, wu, wd)),
                               np.asarray(swiglu(x, wg, wu, wd)), rtol=1e-5, atol=1e-5)
    loss = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2, 3))  # noqa
    for g, r in zip(jax.jit(loss(sharded))(x, wg, wu, wd), loss(swiglu)(x, wg, wu, wd)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
    counts = collective_counts(sharded.lower(x, wg, wu, wd).compile().as_text())
    # the switch really changes the program: ring hops instead of XLA's collectives
    assert (counts["collective-permute"] == 2 * (n - 1)) == ring
    assert (counts["all-gather"] + counts["all-reduce"] + counts["reduce-scatter"] == 0) == ring
