"""A CPU kernel for large bfloat16 matmuls (training's projections) through JAX's FFI, with a
custom VJP so `jax.grad` runs both gradients through it too.

XLA:CPU's bf16 dot runs at ~300 GFLOP/s on the 2-core Zen 5 dev machine; csrc/bf16_matmul.cc
uses the AVX512-BF16 dot-product instruction (a portable scalar loop where the compiler does
not target it) and reaches ~2x that on training's shapes (docs/perf/train_cpu.md). It is
compiled on first use by hpllm/kernels/native.py; HPLLM_CPU_KERNELS=0 turns it off.

    matmul(a, b, trans_a=False, trans_b=False, out_dtype=bf16)   op(a) @ op(b), f32 accumulate
    project_bf16(x, w, w_layout)        x (..., K) @ w, w (K, N) "kn" or (N, K) "nk", with VJP
    bf16_project(x, w, equation)        an einsum projection in that form, or None if not

Routing the model's projections is opt-in, per traced function (`routing()`), so only the
callers that measured a gain (the CPU training step) use it; on other platforms the same
jitted code lowers to XLA's dot through `lax.platform_dependent`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hpllm.kernels import native

SOURCE = native.CSRC / "bf16_matmul.cc"
HEADERS = (native.CSRC / "parallel_chunks.h", native.CSRC / "vec_math.h")
_TARGETS = {"f32": "HpllmBf16MatmulF32", "bf16": "HpllmBf16MatmulBf16"}
# Rows of x from which the kernel beats XLA's bf16 dot (packing B is paid per call); below,
# XLA. Measured on training's shapes in bench/train_vs_torch.py --kernels.
MIN_ROWS = 256


class KernelError(RuntimeError):
    """Bad operands for the bf16 matmul kernel, or the kernel is unavailable; says why."""


def _targets(variant: str) -> dict:
    suffix = "" if variant == "native" else f"_{variant}"
    return {f"hpllm_bf16_matmul_{k}{suffix}": s for k, s in _TARGETS.items()}


def _status(variant: str) -> str | None:
    return native.load_status("bf16_matmul", [SOURCE], HEADERS, targets=_targets(variant),
                              portable=variant == "portable")


def available() -> bool:
    """Whether the native kernel is enabled, compiled and registered (built on first call)."""
    return _status("native") is None


def _suffix(variant: str) -> str:
    reason = _status(variant)
    if reason is not None:
        raise KernelError(f"bf16 matmul kernel unavailable: {reason}")
    return "" if variant == "native" else f"_{variant}"


def matmul(a, b, *, trans_a: bool = False, trans_b: bool = False, out_dtype=jnp.bfloat16,
           variant: str = "native"):
    """op(a) @ op(b) for 2-D bf16 a, b (op: transpose where asked), float32 accumulate,
    returned as out_dtype (float32 or bfloat16). The kernel call itself, CPU only."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        raise KernelError(f"matmul needs 2-D bfloat16 operands, got a {a.dtype}{a.shape}, "
                          f"b {b.dtype}{b.shape}")
    m, k = a.shape[::-1] if trans_a else a.shape
    kb, n = b.shape[::-1] if trans_b else b.shape
    if k != kb:
        raise KernelError(f"matmul: contraction sizes differ: op(a) {m}x{k}, op(b) {kb}x{n}")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.float32, jnp.bfloat16):
        raise KernelError(f"matmul: out_dtype must be float32 or bfloat16, got {out_dtype}")
    kind = "f32" if out_dtype == jnp.float32 else "bf16"
    call = jax.ffi.ffi_call(f"hpllm_bf16_matmul_{kind}{_suffix(variant)}",
                            jax.ShapeDtypeStruct((m, n), out_dtype))
    return call(a, b, trans_a=int(trans_a), trans_b=int(trans_b))


def reference(a, b, *, trans_a=False, trans_b=False, out_dtype=jnp.bfloat16):
    """The XLA twin of `matmul`."""
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


# --------------------------------------------------------------- the projection, with VJP
# y = x @ W with W stored (K, N) ("kn") or (N, K) ("nk"): each gradient is one kernel call
# with the transposes folded into its packing, so XLA makes no transposed copies.

def _xw(variant, layout, x, w, out_dtype):
    return matmul(x, w, trans_b=layout == "nk", out_dtype=out_dtype, variant=variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 4))
def _project2d(variant, layout, x, w, out_dtype):
    return _xw(variant, layout, x, w, out_dtype)


def _project2d_fwd(variant, layout, x, w, out_dtype):
    return _xw(variant, layout, x, w, out_dtype), (x, w)


def _project2d_bwd(variant, layout, out_dtype, residuals, dy):
    x, w = residuals
    dy = dy.astype(jnp.bfloat16)
    mm = functools.partial(matmul, variant=variant)
    dx = mm(dy, w, trans_b=layout == "kn")  # dy (M, N) @ W^T
    if layout == "kn":
        dw = mm(x, dy, trans_a=True)  # (K, N) = x^T dy
    else:
        dw = mm(dy, x, trans_a=True)  # (N, K) = dy^T x
    return dx, dw


_project2d.defvjp(_project2d_fwd, _project2d_bwd)


def _xla_project2d(x, w, layout, out_dtype):
    eq = "mk,kn->mn" if layout == "kn" else "mk,nk->mn"
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def project_bf16(x, w, layout: str, out_dtype=jnp.bfloat16, *, variant: str = "native"):
    """x (..., K) bf16 @ w: w (K, N) for layout "kn", (N, K) for "nk"; (..., N) out_dtype.
    The kernel on CPU (gradients too), XLA's dot elsewhere."""
    k = x.shape[-1]
    if w.ndim != 2 or (w.shape[0] if layout == "kn" else w.shape[1]) != k:
        raise KernelError(f"project_bf16: x {x.shape} does not contract with {layout} "
                          f"weight {w.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    kernel = functools.partial(_project2d, variant, layout, out_dtype=out_dtype)
    xla = functools.partial(_xla_project2d, layout=layout, out_dtype=out_dtype)
    y = jax.lax.platform_dependent(x2, w, cpu=lambda x, w: kernel(x, w), default=xla)
    return y.reshape(*lead, y.shape[-1])


# --------------------------------------------------------------------- einsum routing

_ROUTING = native.Routing("hpllm_bf16_routing", lambda: available())


def routing(enabled: bool = True):
    """Within this context (while a function is traced), `bf16_project` routes eligible
    projections to the kernel."""
    return _ROUTING(enabled)


def _parse(equation: str, x_ndim: int, w_ndim: int):
    """(x axes contracted, w layout, w output axes) of `equation` when it is a projection
    x (..., contracted) @ w (contracted, out) or w (out, contracted), else None."""
    if "->" not in equation:
        return None
    ins, out = equation.replace(" ", "").split("->")
    if ins.count(",") != 1:
        return None
    xs, ws = ins.split(",")
    if "." in ws or len(ws) != w_ndim:
        return None
    if xs.startswith("...") and out.startswith("..."):  # name the ellipsis's axes
        fill = "".join(chr(0x100 + i) for i in range(x_ndim - len(xs) + 3))
        xs, out = fill + xs[3:], fill + out[3:]
    if len(xs) != x_ndim or len(set(xs)) != len(xs) or len(set(ws)) != len(ws):
        return None
    contracted = "".join(c for c in xs if c in ws and c not in out)
    n_in = len(contracted)
    if not n_in or xs[-n_in:] != contracted:
        return None
    lead, w_out = xs[:-n_in], "".join(c for c in ws if c not in contracted)
    if any(c in ws for c in lead) or out != lead + w_out:
        return None
    if ws == contracted + w_out:
        return n_in, "kn", len(w_out)
    if ws == w_out + contracted:
        return n_in, "nk", len(w_out)
    return None


def bf16_project(x, w, equation: str, preferred_element_type=None):
    """`jnp.einsum(equation, x, w)` through the kernel when routing is on (`routing()`), x
    and w are bf16 arrays, x has at least MIN_ROWS rows and the equation is a projection;
    None otherwise (the caller runs its einsum)."""
    if not _ROUTING.on() or not isinstance(w, jax.Array):
        return None
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return None
    out_dtype = jnp.dtype(preferred_element_type or jnp.bfloat16)
    if out_dtype not in (jnp.float32, jnp.bfloat16):
        return None
    parsed = _parse(equation, x.ndim, w.ndim)
    if parsed is None:
        return None
    n_in, layout, n_out = parsed
    lead = x.shape[:x.ndim - n_in]
    if math.prod(lead) < MIN_ROWS:
        return None
    k = math.prod(x.shape[x.ndim - n_in:])
    w_out = w.shape[n_in:] if layout == "kn" else w.shape[:n_out]
    w2 = w.reshape(k, -1) if layout == "kn" else w.reshape(-1, k)
    y = project_bf16(x.reshape(*lead, k), w2, layout, out_dtype)
    return y.reshape(*lead, *w_out)
