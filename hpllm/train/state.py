"""The training state: its optimizer, its initialisation, and its layout on a device mesh.

State is a pytree {"params", "opt_state", "step", "rng"} with master weights in
`param_dtype` (float32 by default). On a mesh every parameter is sharded by its logical axis
names (`hpllm.model.transformer.param_axes`) under the rules table of
hpllm/parallel/sharding.py, and each optimizer moment like its parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from hpllm.config import Config, ModelConfig, TrainConfig
from hpllm.model.transformer import init_params, param_axes, param_shapes
from hpllm.parallel.sharding import RULES, Rules, replicated, tree_shardings


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norm scales: shrinking them towards 0 only fights the normalisation.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


class LossScaleState(NamedTuple):
    scale: jax.Array  # the loss is multiplied by this before differentiation
    good_steps: jax.Array  # finite steps since the scale last changed


def dynamic_loss_scale(init: float = 2.0 ** 15, period: int = 1000) -> optax.GradientTransformation:
    """float16 loss scaling, kept in the optimizer state: halve the scale on a step whose
    (unscaled) gradients are not finite, double it after `period` finite steps. Updates pass
    through unchanged; `optax.apply_if_finite` after it skips the non-finite steps."""
    def init_fn(params):
        return LossScaleState(jnp.float32(init), jnp.int32(0))

    def update_fn(updates, state, params=None):
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(updates)]))
        grow = finite & (state.good_steps + 1 >= period)
        scale = jnp.where(finite, jnp.where(grow, state.scale * 2, state.scale),
                          jnp.maximum(state.scale / 2, 1.0))
        good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
        return updates, LossScaleState(scale, good)

    return optax.GradientTransformation(init_fn, update_fn)


def loss_scale_of(opt_state, tc: TrainConfig):
    """The current loss scale: 1 unless compute_dtype is float16."""
    return opt_state[0].scale if tc.compute_dtype == "float16" else 1.0


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    if tc.compute_dtype == "float16":  # scale first, then skip the steps that overflowed
        return optax.chain(dynamic_loss_scale(),
                           optax.apply_if_finite(_base_optimizer(tc), max_consecutive_errors=100))
    return _base_optimizer(tc)


def _base_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(tc), b1=tc.beta1, b2=tc.beta2,
                    weight_decay=tc.weight_decay, mask=_decay_mask))


def init_state(config: Config, key) -> dict:
    """Fresh parameters and optimizer state. Pure, so jax.eval_shape gives its structure."""
    init_key, rng = jax.random.split(key)
    params = init_params(config.model, init_key, jnp.dtype(config.train.param_dtype))
    opt_state = make_optimizer(config.train).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(rng)}


# ------------------------------------------------------------------------ on a device mesh

def param_shardings(config: Config | ModelConfig, mesh: Mesh, rules: Rules = RULES) -> dict:
    """NamedSharding of every parameter (the tree of `init_params`)."""
    model = config.model if isinstance(config, Config) else config
    return tree_shardings(mesh, param_axes(model), param_shapes(model), rules)


def state_shardings(config: Config, mesh: Mesh, rules: Rules = RULES, *,
                    opt_memory_kind: str | None = None) -> dict:
    """NamedSharding of every leaf of the training state (`init_state`): optimizer moments
    as their parameter, counters replicated. `opt_memory_kind` ("pinned_host") keeps the
    optimizer state in host memory where the backend has one."""
    shapes = jax.eval_shape(lambda: init_state(config, jax.random.key(0)))
    params = param_shardings(config, mesh, rules)
    if opt_memory_kind is not None:
        params_opt = jax.tree.map(
            lambda s: NamedSharding(mesh, s.spec, memory_kind=opt_memory_kind), params)
    else:
        params_opt = params
    opt = optax.tree_map_params(make_optimizer(config.train), lambda _, s: s,
                                shapes["opt_state"], params_opt,
                                transform_non_params=lambda _: replicated(mesh, opt_memory_kind),
                                is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    jax.tree.map(lambda s, shape: s, opt, shapes["opt_state"])  # same tree, or raise here
    return {"params": params, "opt_state": opt, "step": replicated(mesh),
            "rng": replicated(mesh)}


def init_sharded_state(config: Config, mesh: Mesh, key, rules: Rules = RULES, *,
                       opt_memory_kind: str | None = None) -> dict:
    """The training state created directly in its sharded layout: one jit whose outputs
    are sharded, so no device ever holds a whole parameter it does not own (the random
    numbers are the same whatever the sharding: JAX's partitionable threefry)."""
    shardings = state_shardings(config, mesh, rules, opt_memory_kind=opt_memory_kind)
    return jax.jit(init_state, static_argnums=0, out_shardings=shardings)(config, key)
