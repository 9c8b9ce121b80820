"""The small pieces of a Llama-family decoder: RMSNorm, RoPE, SwiGLU."""

import jax
import jax.numpy as jnp

from hpllm.kernels import cpu_elementwise
from hpllm.parallel.tensor_parallel import column_parallel, row_parallel
from hpllm.quantized import project


def rms_norm(x, weight, eps):
    """x / rms(x) * weight, with the statistics in float32 whatever the compute dtype."""
    if cpu_elementwise.routed(x, weight):  # the CPU training step: one kernel pass each way
        return cpu_elementwise.rms_norm(x, weight, eps)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions, head_dim, theta):
    """cos, sin of shape positions.shape + (head_dim,), for the rotate-half layout."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., head_dim/2)
    # cos/sin of the half, then duplicated: the same values, half the transcendentals (the
    # training step's sin was 3 % of it on CPU, docs/perf/train_cpu.md)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate x (..., seq, heads, head_dim) by per-position angles (..., seq, head_dim).

    Rotate-half layout (as in HF Llama): dimension i pairs with i + head_dim/2. GGUF files
    store Q/K rows permuted for the interleaved layout; their loader undoes that.
    """
    if (cpu_elementwise.routed(x) and cpu_elementwise.routed(cos, sin, dtype=jnp.float32)
            and cos.shape == x.shape[:-2] + x.shape[-1:]):  # the CPU training step
        return cpu_elementwise.rope(x, cos, sin)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return (x32 * cos + rotated * sin).astype(x.dtype)


def swiglu(x, w_gate, w_up, w_down, *, ring: bool = False):
    """Shazeer's SwiGLU MLP: down(silu(x @ gate) * (x @ up)). `project`: an einsum, or a
    quantized weight's matmul; `ring`: the tensor-parallel ring collective matmuls where
    the sharding rules split the sequence (gate and up share one gather)."""
    gate, up = column_parallel(x, (w_gate, w_up), "bsd,df->bsf", ring=ring, project=project)
    if cpu_elementwise.routed(gate, up):  # the CPU training step: one kernel pass each way
        hidden = cpu_elementwise.swiglu(gate, up)
    else:
        hidden = jax.nn.silu(gate) * up
    return row_parallel(hidden, w_down, "bsf,fd->bsd", ring=ring,
                        project=project)
