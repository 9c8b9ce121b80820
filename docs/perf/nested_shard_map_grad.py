"""jax 0.10.2: the gradient of a shard_map nested inside a shard_map fails to lower when the
outer one is manual over "stage" (a pipeline) and the inner one over other axes (expert
parallelism's all-to-alls); the forward pass works. Run: python docs/perf/nested_shard_map_grad.py
Error: 'sdy.manual_computation' op operand 1 - operates on axis "stage" which is already
bound by a parent sdy.manual_computation op. hpllm/model/moe.py therefore places its
all-to-alls with sharding constraints instead of a nested shard_map."""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((2, 2, 2), ("stage", "data", "expert"), axis_types=(AxisType.Auto,) * 3)


def experts(x, w):  # inner: manual over data and expert, an all-to-all each way
    y = jax.lax.all_to_all(x, "expert", 1, 0, tiled=True) @ w
    return jax.lax.all_to_all(y, "expert", 0, 1, tiled=True)


def stage(w, x):  # outer: manual over "stage" only, like hpllm/parallel/pipeline.py
    inner = jax.shard_map(experts, mesh=jax.sharding.get_abstract_mesh(),
                          in_specs=(P(("data", "expert")), P()),
                          out_specs=P(("data", "expert")), axis_names={"data", "expert"})
    return jax.lax.psum(inner(x, w[0]).sum(), "stage")


def loss(w, x):
    return jax.shard_map(stage, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P(),
                         axis_names={"stage"})(w, x)


w, x = jnp.ones((2, 4, 4)), jnp.ones((8, 4, 4))
with jax.set_mesh(mesh):
    print("forward:", jax.jit(loss)(w, x))  # works
    print("gradient:", jax.jit(jax.grad(loss))(w, x).shape)  # fails to lower
