"""CPU kernels for the training step's elementwise layers (SwiGLU's gate, RMSNorm, RoPE) and
its softmax cross-entropy, through JAX's FFI, each with a custom VJP whose backward is one
kernel call too.

XLA:CPU runs these as single-threaded loop fusions and, in bf16, rounds after every op (a
convert pair each): on the default preset SwiGLU's forward and backward took ~16 ms of CPU
time per layer, more than the layer's three projections on the matmul kernel
(docs/perf/train_cpu.md), and the loss's exp over the (4096, 2048) float32 logits ~24 ms.
csrc/train_elementwise.cc makes each one pass on every thread of XLA's intra-op pool,
float32 math, one rounding to bf16 (the loss stays float32). Compiled on first use by
hpllm/kernels/native.py; HPLLM_CPU_KERNELS=0 turns it off.

    swiglu(g, u)               silu(g) * u, bf16, differentiable
    rms_norm(x, w, eps)        x / rms(x) * w over the last axis, bf16, differentiable
    rope(x, cos, sin)          the rotate-half rotation of x (..., H, D) bf16, differentiable in x
    softmax_nll(logits, targets)   logsumexp(logits) - logits[target], float32, differentiable
    routing(enabled), routed(*arrays)   the switch the CPU training step turns on

On other platforms the same jitted code runs the XLA expressions (`lax.platform_dependent`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels import native

SOURCE = native.CSRC / "train_elementwise.cc"
HEADERS = (native.CSRC / "parallel_chunks.h", native.CSRC / "vec_math.h")
_SYMBOLS = {"swiglu_fwd": "HpllmSwigluFwd", "swiglu_bwd": "HpllmSwigluBwd",
            "rms_norm_fwd": "HpllmRmsNormFwd", "rms_norm_bwd": "HpllmRmsNormBwd",
            "rope_fwd": "HpllmRopeFwd", "rope_bwd": "HpllmRopeBwd",
            "nll_fwd": "HpllmLossFwd", "nll_bwd": "HpllmLossBwd"}


class KernelError(RuntimeError):
    """Bad operands for an elementwise kernel, or the kernels are unavailable; says why."""


_KERNELS = native.TrainingKernels("train_elementwise", SOURCE, HEADERS, _SYMBOLS, "hpllm_",
                                  KernelError, "elementwise kernels")
_target = _KERNELS.target
_load = _KERNELS.status
available = _KERNELS.available


def _bf16(*arrays) -> bool:
    return all(a.dtype == jnp.bfloat16 for a in arrays)


# ------------------------------------------------------------------------------- SwiGLU

def swiglu_reference(g, u):
    """The XLA twin: silu(g) * u in the operands' dtype."""
    return jax.nn.silu(g) * u


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(variant, g, u):
    return jax.ffi.ffi_call(_target("swiglu_fwd", variant),
                            jax.ShapeDtypeStruct(g.shape, jnp.bfloat16))(g, u)


def _swiglu_fwd(variant, g, u):
    return _swiglu(variant, g, u), (g, u)


def _swiglu_bwd(variant, residuals, dh):
    g, u = residuals
    out = jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
    return tuple(jax.ffi.ffi_call(_target("swiglu_bwd", variant), (out, out))(
        g, u, dh.astype(jnp.bfloat16)))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(g, u, *, variant: str = "native"):
    """silu(g) * u for bf16 g, u of one shape: the kernel on CPU (its gradient too),
    swiglu_reference elsewhere."""
    if g.shape != u.shape or not _bf16(g, u):
        raise KernelError(f"swiglu needs bf16 g and u of one shape, got g {g.dtype}{g.shape}, "
                          f"u {u.dtype}{u.shape}")
    return jax.lax.platform_dependent(g, u, cpu=functools.partial(_swiglu, variant),
                                      default=swiglu_reference)


# ------------------------------------------------------------------------------ RMSNorm

def rms_norm_reference(x, w, eps):
    """hpllm.model.layers.rms_norm's math: float32 statistics, the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * w.astype(jnp.float32)).astype(x.dtype)


def _norm_call(variant, x, w, eps):
    return jax.ffi.ffi_call(_target("rms_norm_fwd", variant),
                            (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                             jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)))(
        x, w, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _rms_norm(variant, x, w, eps):
    return _norm_call(variant, x, w, eps)[0]


def _rms_norm_fwd(variant, x, w, eps):
    y, r = _norm_call(variant, x, w, eps)
    return y, (x, w, r)


def _rms_norm_bwd(variant, eps, residuals, dy):
    x, w, r = residuals
    return tuple(jax.ffi.ffi_call(_target("rms_norm_bwd", variant),
                                  (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                   jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)))(
        x, w, r, dy.astype(jnp.bfloat16)))


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, w, eps: float, *, variant: str = "native"):
    """x / rms(x) * w over x's last axis, for bf16 x (..., D) and w (D): the kernel on CPU
    (its gradients too), rms_norm_reference elsewhere."""
    if x.ndim < 1 or w.shape != x.shape[-1:] or not _bf16(x, w):
        raise KernelError(f"rms_norm needs bf16 x (..., D) and w (D,), got x "
                          f"{x.dtype}{x.shape}, w {w.dtype}{w.shape}")
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: _rms_norm(variant, x, w, eps),
        default=lambda x, w: rms_norm_reference(x, w, eps))


# --------------------------------------------------------------------------------- RoPE

def rope_reference(x, cos, sin):
    """hpllm.model.layers.apply_rope's math: float32, the result in x's dtype."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def _rope_call(kind, variant, x, cos, sin):
    return jax.ffi.ffi_call(_target(kind, variant),
                            jax.ShapeDtypeStruct(x.shape, jnp.bfloat16))(x, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rope(variant, x, cos, sin):
    return _rope_call("rope_fwd", variant, x, cos, sin)


def _rope_fwd(variant, x, cos, sin):
    return _rope(variant, x, cos, sin), (cos, sin)


def _rope_bwd(variant, residuals, dy):  # the angles come from positions: no gradient
    cos, sin = residuals
    return (_rope_call("rope_bwd", variant, dy.astype(jnp.bfloat16), cos, sin),
            jnp.zeros_like(cos), jnp.zeros_like(sin))


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope(x, cos, sin, *, variant: str = "native"):
    """x (..., H, D) bf16 rotated by per-position angles cos, sin (..., D) float32 (the
    rotate-half layout): the kernel on CPU, rope_reference elsewhere. Differentiable in x
    (the angles' cotangents are zero: they come from positions)."""
    if (x.ndim < 2 or cos.shape != sin.shape or cos.shape != x.shape[:-2] + x.shape[-1:]
            or x.shape[-1] % 2 or x.dtype != jnp.bfloat16 or cos.dtype != jnp.float32
            or sin.dtype != jnp.float32):
        raise KernelError(f"rope needs bf16 x (..., H, even D) and float32 cos, sin (..., D), "
                          f"got x {x.dtype}{x.shape}, cos {cos.dtype}{cos.shape}, sin "
                          f"{sin.dtype}{sin.shape}")
    return jax.lax.platform_dependent(x, cos, sin, cpu=functools.partial(_rope, variant),
                                      default=rope_reference)


# ------------------------------------------------------------------ softmax cross-entropy

def softmax_nll_reference(logits, targets):
    """The XLA twin: logsumexp(logits) - logits[target] over the last axis."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _nll_call(variant, logits, targets):
    rows = jax.ShapeDtypeStruct(targets.shape, jnp.float32)
    return jax.ffi.ffi_call(_target("nll_fwd", variant), (rows, rows))(logits, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_nll(variant, logits, targets):
    return _nll_call(variant, logits, targets)[0]


def _softmax_nll_fwd(variant, logits, targets):
    nll, lse = _nll_call(variant, logits, targets)
    return nll, (logits, targets, lse)


def _softmax_nll_bwd(variant, residuals, g):
    logits, targets, lse = residuals
    dlogits = jax.ffi.ffi_call(_target("nll_bwd", variant),
                               jax.ShapeDtypeStruct(logits.shape, jnp.float32))(
        logits, targets, lse, g.astype(jnp.float32))
    return dlogits, np.zeros(targets.shape, jax.dtypes.float0)


_softmax_nll.defvjp(_softmax_nll_fwd, _softmax_nll_bwd)


def softmax_nll(logits, targets, *, variant: str = "native"):
    """Per-row negative log-likelihood logsumexp(logits) - logits[target] for float32 logits
    (..., V) and int targets (...) in [0, V): the kernel on CPU (one pass forward, one
    backward writing g (softmax - onehot)), softmax_nll_reference elsewhere."""
    if (logits.ndim < 1 or targets.shape != logits.shape[:-1]
            or logits.dtype != jnp.float32 or not jnp.issubdtype(targets.dtype, jnp.integer)):
        raise KernelError(f"softmax_nll needs float32 logits (..., V) and int targets (...), "
                          f"got logits {logits.dtype}{logits.shape}, targets "
                          f"{targets.dtype}{targets.shape}")
    targets = targets.astype(jnp.int32)
    return jax.lax.platform_dependent(logits, targets,
                                      cpu=functools.partial(_softmax_nll, variant),
                                      default=softmax_nll_reference)


# --------------------------------------------------------------------------- routing

_ROUTING = native.Routing("hpllm_elementwise_routing", lambda: available())


def routing(enabled: bool = True):
    """Within this context (while a function is traced), the model's SwiGLU, RMSNorm and
    RoPE and the training loss run on the kernels where `routed` holds (the CPU training
    step enters it)."""
    return _ROUTING(enabled)


def routed(*arrays, dtype=jnp.bfloat16) -> bool:
    """Whether routing is on and every operand is an array of `dtype`."""
    return _ROUTING.on() and all(a.dtype == dtype for a in arrays)
