"""Quantizing a model: which leaves of the params tree are matrices, and the whole tree to
and from quantized weights.

The quantized-weight type, its schemes, one matrix's quantize/dequantize and the matmuls
the model runs with it are in hpllm/quantized.py; quantized checkpoints on disk are
hpllm/checkpoints/quantized_checkpoint.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hpllm.quantized import (DEFAULT_GROUP_SIZE, DEFAULT_THRESHOLD, check_scheme, dequantize,
                             is_quantized, quantize)

# Which leaves are matrices, and which of their trailing axes a matmul contracts.
# The embedding table (V, D) contracts D when it is the tied output projection.
MATRIX_IN_AXES = {
    "wq": (3, (0,)), "wk": (3, (0,)), "wv": (3, (0,)), "wo": (3, (0, 1)),
    "w_gate": (2, (0,)), "w_up": (2, (0,)), "w_down": (2, (0,)),
    "embed": (2, (1,)), "unembed": (2, (0,)),
}


def quantize_params(params: dict, scheme: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                    threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The params tree with every matrix (MATRIX_IN_AXES; stacked or unstacked layers)
    replaced by a QuantizedWeight; norms, position embeddings, mixture-of-experts weights and
    unknown leaves stay float. Already-quantized leaves are kept."""
    check_scheme(scheme, group_size, threshold)

    def leaf(path, w):
        if is_quantized(w):
            return w
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] not in MATRIX_IN_AXES or "moe" in keys:  # experts stay float (for now)
            return w
        name = keys[-1]
        trailing, in_axes = MATRIX_IN_AXES[name]
        if w.ndim < trailing:
            return w
        return quantize(w, scheme, in_axes, group_size=group_size, threshold=threshold,
                        trailing=trailing)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_quantized)


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    return jax.tree.map(lambda w: dequantize(w, dtype) if is_quantized(w) else w, params,
                        is_leaf=is_quantized)


def param_bytes(params: dict) -> int:
    """Bytes the parameters occupy (codes, scales and float leaves)."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(params))

