"""The Pallas attention kernels lower for real GPU (Triton) and TPU (Mosaic) targets.

No accelerator is needed: JAX lowers a jitted function for another platform on CPU, which
runs the Pallas -> Triton IR / Mosaic MLIR lowering, including its block-shape rules.
The final device compile (ptxas / Mosaic's layout passes) still needs the hardware."""

import jax
import jax.numpy as jnp
import pytest

from hpllm.kernels.pallas_attention import pallas_attention


def lowered_text(platform, target, grads):
    shapes = (jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((1, 256), jnp.int32))

    def fwd(q, k, v, pos):
        seg = jnp.ones_like(pos)
        return pallas_attention(q, k, v, pos, pos, seg, seg, window=100, target=target)

    def fwd_bwd(q, k, v, pos):
        return jax.grad(lambda q, k, v: fwd(q, k, v, pos).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    fn = fwd_bwd if grads else fwd
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("grads", [False, True])
def test_lowers_to_triton_for_gpu(grads):
    text = lowered_text("cuda", "gpu", grads)
    assert text.count('@__gpu$xla.gpu.triton(') == (3 if grads else 1)


@pytest.mark.parametrize("grads", [False, True])
def test_lowers_to_mosaic_for_tpu(grads, monkeypatch):
    # Mosaic asks the default device which TPU generation it targets; register the CPU
    # device as a TPU v5e for this lowering (private API: pinned to the tested JAX).
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, "cpu", lambda: tpu_info.get_tpu_info_for_chip(
        tpu_info.ChipVersion.TPU_V5E, 1))
    text = lowered_text("tpu", "tpu", grads)
    assert text.count("@tpu_custom_call(") == (3 if grads else 1)


def test_unknown_target_is_rejected():
    x = jnp.zeros((1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="unknown Pallas target 'cuda'"):
        pallas_attention(x, x, x, pos, pos, pos, pos, target="cuda")
