"""Pruning of the linear layers: unstructured magnitude pruning to a sparsity level, and 2:4
structured pruning (of every 4 consecutive inputs of an output, the 2 largest |w| survive:
the pattern sparse tensor cores run at twice the dense rate), with an optional short
recovery fine-tune that keeps the pruned weights at zero.

Which leaves are linear layers, and which axes they contract, comes from the quantizer's
table (`MATRIX_IN_AXES`); the embedding table is left dense by default, since pruning it
removes token rows' information rather than redundant connections. Masks are float 0/1
trees with the params' structure (None for leaves that are not pruned).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hpllm.compress.quantize import MATRIX_IN_AXES
from hpllm.quantized import QuantizationError, _from_nk, _to_nk
from hpllm.train.state import make_optimizer
from hpllm.train.step import loss_fn


class PruneError(QuantizationError):
    """An impossible pruning request (sparsity out of range, shape not divisible by 4)."""


def _prunable(path, w, include_embed: bool):
    keys = [getattr(k, "key", None) for k in path]
    name = keys[-1]
    if name not in MATRIX_IN_AXES or "moe" in keys or (name == "embed" and not include_embed):
        return None
    trailing, in_axes = MATRIX_IN_AXES[name]
    return (trailing, in_axes) if w.ndim >= trailing else None


def magnitude_masks(params: dict, sparsity: float, include_embed: bool = False) -> dict:
    """Keep-masks zeroing the `sparsity` fraction of smallest-|w| entries of each matrix (of
    each layer's slice separately when layers are stacked)."""
    if not 0.0 <= sparsity < 1.0:
        raise PruneError(f"sparsity must be in [0, 1), got {sparsity}")

    def leaf(path, w):
        spec = _prunable(path, w, include_embed)
        if spec is None:
            return None
        trailing, _ = spec
        flat = jnp.abs(w).reshape(*w.shape[:w.ndim - trailing], -1)
        k = int(round(sparsity * flat.shape[-1]))
        if k == 0:
            return jnp.ones_like(w)
        # the k-th smallest magnitude of each slice; ties at it are pruned too
        kth = jnp.sort(flat, axis=-1)[..., k - 1:k]
        return (flat > kth).astype(w.dtype).reshape(w.shape)

    return jax.tree_util.tree_map_with_path(leaf, params)


def two_four_masks(params: dict, include_embed: bool = False) -> dict:
    """2:4 keep-masks: along each output's inputs (the contraction axis, in groups of 4
    consecutive inputs), the 2 entries of largest |w| are kept."""
    def leaf(path, w):
        spec = _prunable(path, w, include_embed)
        if spec is None:
            return None
        trailing, in_axes = spec
        shape = tuple(w.shape[w.ndim - trailing:])
        nk = _to_nk(jnp.abs(w), shape, in_axes)
        if nk.shape[-1] % 4:
            raise PruneError(f"2:4 pruning needs the input size divisible by 4; "
                             f"{jax.tree_util.keystr(path)} has {nk.shape[-1]}")
        groups = nk.reshape(*nk.shape[:-1], -1, 4)
        rank = jnp.argsort(jnp.argsort(-groups, axis=-1), axis=-1)  # 0 = largest
        keep = (rank < 2).astype(w.dtype).reshape(nk.shape)
        return _from_nk(keep, shape, in_axes)

    return jax.tree_util.tree_map_with_path(leaf, params)


def apply_masks(params: dict, masks: dict) -> dict:
    return jax.tree.map(lambda w, m: w if m is None else w * m, params, masks,
                        is_leaf=lambda x: x is None)


def sparsity_of(params: dict, masks: dict) -> float:
    """Fraction of the masked matrices' entries that are zero."""
    pairs = [(w, m) for w, m in zip(jax.tree.leaves(params),
                                    jax.tree.leaves(masks, is_leaf=lambda x: x is None))
             if m is not None]
    zeros = sum(int(jnp.sum(w == 0)) for w, _ in pairs)
    return zeros / max(sum(w.size for w, _ in pairs), 1)


def prune(params: dict, method: str, sparsity: float = 0.5, include_embed: bool = False):
    """(pruned params, masks); method "magnitude" (at `sparsity`) or "2:4"."""
    if method == "magnitude":
        masks = magnitude_masks(params, sparsity, include_embed)
    elif method == "2:4":
        masks = two_four_masks(params, include_embed)
    else:
        raise PruneError(f"unknown pruning method {method!r} (known: magnitude, 2:4)")
    return apply_masks(params, masks), masks


def recover(params: dict, masks: dict, config, batches, steps: int):
    """A short fine-tune of pruned params with the trainer's loss and optimizer
    (hpllm.train.step); gradients of pruned entries are masked and the weights re-masked
    after each update, so the sparsity pattern survives AdamW's decay and momentum.
    `config` is a Config (its train section sets lr, schedule and dtypes); `batches` yields
    the trainer's batch dicts. Returns the params and the losses."""
    optimizer = make_optimizer(config.train)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, config)
        grads = apply_masks(grads, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return apply_masks(optax.apply_updates(params, updates), masks), opt_state, loss

    params = apply_masks(params, masks)
    opt_state, losses = optimizer.init(params), []
    for _, batch in zip(range(steps), batches):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, losses
