"""The training step as a pure function: state, batch -> new state, metrics.

State is a pytree {"params", "opt_state", "step", "rng"} with master weights in
`param_dtype` (float32 by default); the forward pass casts them to `compute_dtype`, so the
gradients and the optimizer update stay in the master precision.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from hpllm.config import Config, TrainConfig
from hpllm.model import moe
from hpllm.model.transformer import forward, init_params


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


def token_nll(params, batch, config: Config, *, moe_stats: bool = False):
    """Per-token negative log-likelihood (B, S) in nats, float32; with moe_stats, also the
    mixture-of-experts routing sums (None for a dense model). With mesh stage > 1 the layers
    run as a GPipe pipeline (hpllm/parallel/pipeline.py)."""
    kw = dict(segment_ids=batch["segment_ids"], dtype=jnp.dtype(config.train.compute_dtype),
              remat=config.train.remat)
    if config.mesh.stage > 1:
        from hpllm.parallel.pipeline import pipeline_forward

        logits, stats = pipeline_forward(params, batch["tokens"], batch["positions"],
                                         config.model, microbatches=config.train.microbatches,
                                         **kw)
    else:
        logits, _, stats = forward(params, batch["tokens"], batch["positions"], config.model,
                                   moe_stats=True, **kw)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return (logz - target_logit, stats) if moe_stats else logz - target_logit


def loss_fn(params, batch, config: Config):
    """Mean cross-entropy, plus router_aux_weight x the load-balancing loss for MoE models;
    aux["ce"] is the cross-entropy alone (the loss that is logged)."""
    nll, stats = token_nll(params, batch, config, moe_stats=True)
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / n
    aux = {"tokens": mask.sum(), "ce": ce}
    if stats is None:
        return ce, aux
    aux["aux_loss"] = moe.load_balancing_loss(stats)
    aux["dropped_fraction"] = moe.dropped_fraction(stats)
    aux["dropped"] = stats["dropped"].sum()  # (token, expert) assignments over capacity
    return ce + config.model.router_aux_weight * aux["aux_loss"], aux


def train_step(state: dict, batch: dict, config: Config) -> tuple[dict, dict]:
    scale = loss_scale_of(state["opt_state"], config.train)  # float16: gradients stay in range

    def scaled_loss(params):
        loss, aux = loss_fn(params, batch, config)
        return loss * scale, aux

    (_, aux), grads = jax.value_and_grad(scaled_loss, has_aux=True)(state["params"])
    grads = jax.tree.map(lambda g: g / scale, grads)
    optimizer = make_optimizer(config.train)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": aux.pop("ce"), "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.train)(state["step"]), **aux}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics


def eval_step(params, batch: dict, config: Config) -> dict:
    """Sums over the batch, so evaluations over many batches add up exactly."""
    nll = token_nll(params, batch, config)
    mask = batch["loss_mask"]
    return {"nll": (nll * mask).sum(), "tokens": mask.sum(),
            "bytes": batch["target_bytes"].sum()}


def jit_train_step(config: Config, mesh=None, rules=None, *, opt_memory_kind=None):
    """The whole step under one jit; the old state's buffers are donated to the new one.
    With a mesh (`hpllm.parallel.mesh.make_mesh`): the state stays in its sharded layout
    (`hpllm.parallel.sharding.state_shardings`), batch rows are split over the batch axes,
    activations follow the sharding rules, and XLA inserts the collectives.
    opt_memory_kind="pinned_host": the optimizer state lives in host memory (state from
    `init_sharded_state(..., opt_memory_kind=...)`), copied in for the update and back."""
    step = functools.partial(train_step, config=config)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    from hpllm.parallel import sharding

    rules = rules or sharding.RULES
    state = sharding.state_shardings(config, mesh, rules, opt_memory_kind=opt_memory_kind)
    if opt_memory_kind is not None:
        on_device = sharding.state_shardings(config, mesh, rules)["opt_state"]
        device_step = step

        def step(s, batch):  # ops cannot mix memory spaces: move it in, and back out
            s = {**s, "opt_state": jax.device_put(s["opt_state"], on_device)}
            new, metrics = device_step(s, batch)
            return {**new, "opt_state": jax.device_put(new["opt_state"],
                                                       state["opt_state"])}, metrics
    return jax.jit(sharding.under_rules(step, mesh, rules),
                   in_shardings=(state, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(state, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(config: Config, mesh=None, rules=None):
    step = functools.partial(eval_step, config=config)
    if mesh is None:
        return jax.jit(step)
    from hpllm.parallel import sharding

    rules = rules or sharding.RULES
    return jax.jit(sharding.under_rules(step, mesh, rules),
                   in_shardings=(sharding.param_shardings(config, mesh, rules),
                                 sharding.batch_sharding(mesh, rules)),
                   out_shardings=sharding.replicated(mesh))
