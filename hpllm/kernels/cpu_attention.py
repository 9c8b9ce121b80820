"""A CPU kernel for training's causal grouped-query attention through JAX's FFI, with a
custom VJP: the forward pass saves each query row's log-sum-exp, the backward pass
recomputes the probabilities from it (FlashAttention-2), so no (B, H, S, T) array is ever
stored.

The dense reference attention (hpllm.kernels.masking.reference_attention) spent ~36 % of the
default preset's CPU training step on memory passes over its float32 scores, masks and
transposes (docs/perf/train_cpu.md); csrc/attention_train.cc keeps one (batch row, KV head)'s
keys and values in cache while its group of query heads runs against them. Same contract and
masking rule as reference_attention; bf16 inputs, float32 math. Compiled on first use by
hpllm/kernels/native.py; HPLLM_CPU_KERNELS=0 turns it off.

    attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=None)   the kernel, with VJP
    routing(enabled)       context in which the model's attention takes the kernel (CPU)
    routed(q, k)           whether a call with these operands would take it now
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.kernels import native
from hpllm.kernels.masking import reference_attention

SOURCE = native.CSRC / "attention_train.cc"
HEADERS = (native.CSRC / "parallel_chunks.h", native.CSRC / "vec_math.h")
MAX_HEAD_DIM = 256


class KernelError(RuntimeError):
    """Bad operands for the attention kernel, or the kernel is unavailable; says why."""


_SYMBOLS = {"fwd": "HpllmAttentionFwd", "bwd": "HpllmAttentionBwd"}


_KERNELS = native.TrainingKernels("attention_train", SOURCE, HEADERS, _SYMBOLS,
                                  "hpllm_attention_", KernelError, "attention kernel")
_load = _KERNELS.status  # None once both targets of a variant are registered, else why not
available = _KERNELS.available
_target = _KERNELS.target  # the FFI target of "fwd" or "bwd"; KernelError where unloadable


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise KernelError(f"attention needs q (B,S,H,D), k = v (B,T,KV,D); got q {q.shape}, "
                          f"k {k.shape}, v {v.shape}")
    if {q.dtype, k.dtype, v.dtype} != {jnp.dtype(jnp.bfloat16)}:
        raise KernelError(f"attention needs bfloat16 q, k, v; got {q.dtype}, {k.dtype}, "
                          f"{v.dtype}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise KernelError(f"attention: q {q.shape} does not fit k/v {k.shape} (batch, "
                          "head_dim, or heads not a multiple of KV heads)")
    if d > MAX_HEAD_DIM:
        raise KernelError(f"attention: head_dim {d} > {MAX_HEAD_DIM}")


def _forward(variant, window, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    b, s, h, _ = q.shape
    call = jax.ffi.ffi_call(_target("fwd", variant),
                            (jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                             jax.ShapeDtypeStruct((b, h, s), jnp.float32)))
    return call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=int(window or 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(variant, window, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _forward(variant, window, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _attention_fwd(variant, window, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _forward(variant, window, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attention_bwd(variant, window, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    call = jax.ffi.ffi_call(_target("bwd", variant),
                            (jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                             jax.ShapeDtypeStruct(k.shape, jnp.bfloat16),
                             jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)))
    dq, dk, dv = call(q, k, v, out, d_out.astype(jnp.bfloat16), lse, q_pos, kv_pos, q_seg,
                      kv_seg, window=int(window or 0))
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, variant: str = "native"):
    """reference_attention's contract (q (B,S,H,D); k, v (B,T,KV,D) bf16; positions and
    segment ids (B,S)/(B,T) int) through the kernel, differentiable; (B,S,H,D) bf16. On
    platforms other than CPU, reference_attention."""
    _check(q, k, v)
    ints = [a.astype(jnp.int32) for a in (q_pos, kv_pos, q_seg, kv_seg)]
    kernel = functools.partial(_attention, variant, window)
    xla = functools.partial(reference_attention, window=window)
    return jax.lax.platform_dependent(q, k, v, *ints, cpu=kernel, default=xla)


# --------------------------------------------------------------------------- routing

_ROUTING = native.Routing("hpllm_attention_routing", lambda: available())


def routing(enabled: bool = True):
    """Within this context (while a function is traced), the model's attention without a KV
    cache runs on the kernel where `routed` holds (the CPU training step enters it)."""
    return _ROUTING(enabled)


def routed(q, k) -> bool:
    """Whether routing is on and the operands are the kernel's (bf16, 4-D, GQA-shaped)."""
    return (_ROUTING.on() and q.dtype == jnp.bfloat16 and k.dtype == jnp.bfloat16
            and q.ndim == 4 and k.ndim == 4 and q.shape[2] % k.shape[2] == 0
            and q.shape[3] <= MAX_HEAD_DIM)
