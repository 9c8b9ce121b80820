"""The training step as a pure function: state, batch -> new state, metrics.

State is a pytree {"params", "opt_state", "step", "rng"} with master weights in
`param_dtype` (float32 by default); the forward pass casts them to `compute_dtype`, so the
gradients and the optimizer update stay in the master precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from hpllm.config import Config, TrainConfig
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


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
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


def token_nll(params, batch, config: Config):
    """Per-token negative log-likelihood (B, S) in nats, float32."""
    logits, _ = forward(params, batch["tokens"], batch["positions"], config.model,
                        segment_ids=batch["segment_ids"],
                        dtype=jnp.dtype(config.train.compute_dtype), remat=config.train.remat)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return logz - target_logit


def loss_fn(params, batch, config: Config):
    nll = token_nll(params, batch, config)
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    return (nll * mask).sum() / n, {"tokens": mask.sum()}


def train_step(state: dict, batch: dict, config: Config) -> tuple[dict, dict]:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, config)
    optimizer = make_optimizer(config.train)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.train)(state["step"]), "tokens": aux["tokens"]}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics


def eval_step(params, batch: dict, config: Config) -> dict:
    """Sums over the batch, so evaluations over many batches add up exactly."""
    nll = token_nll(params, batch, config)
    mask = batch["loss_mask"]
    return {"nll": (nll * mask).sum(), "tokens": mask.sum(),
            "bytes": batch["target_bytes"].sum()}


def jit_train_step(config: Config):
    """The whole step under one jit; the old state's buffers are donated to the new one."""
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


def jit_eval_step(config: Config):
    return jax.jit(functools.partial(eval_step, config=config))
