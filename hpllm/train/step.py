"""The training step as a pure function: state, batch -> new state, metrics.

The state (hpllm/train/state.py) holds master weights in `param_dtype` (float32 by default);
the forward pass casts them to `compute_dtype`, so the gradients and the optimizer update
stay in the master precision. On CPU with bf16 compute, the model's projections (forward
and both gradients) run on the AVX512-BF16 kernel of hpllm/kernels/cpu_matmul.py, its
causal attention on hpllm/kernels/cpu_attention.py and its SwiGLU and RMSNorm on
hpllm/kernels/cpu_elementwise.py (`cpu_kernels`; docs/perf/train_cpu.md has the
measurements).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import optax

from hpllm.config import Config, ModelConfig
from hpllm.kernels import cpu_attention, cpu_elementwise, cpu_matmul
from hpllm.model import moe
from hpllm.model.transformer import decoder_stack, embed, head, unstack_layers
from hpllm.parallel import sharding
from hpllm.parallel.one_f_one_b import pipeline_loss
from hpllm.parallel.pipeline import pipeline_layers
from hpllm.quantized import cast_params
from hpllm.train.state import (learning_rate_schedule, loss_scale_of, make_optimizer,
                               param_shardings, state_shardings)


# Up to this many layers an unsharded training forward unrolls the decoder instead of
# scanning it: the scan stacks every layer's saved activations into (L, ...) buffers with a
# copy each, and slices each layer's weights out of the stacked arrays with another
# (docs/perf/train_cpu.md: 1.24x on the default preset's CPU step). Dense models only.
UNROLL_LAYERS = 8


def training_logits(params, tokens, positions, config: ModelConfig, *, segment_ids=None,
                    dtype=jnp.float32, remat: str = "none", microbatches: int = 0):
    """The model in training form (embed -> decoder stack -> head, no cache): logits
    (B, S, V) float32 and the MoE routing sums (None for a dense model). microbatches > 0:
    the decoder stack runs as a GPipe pipeline over the context mesh's "stage" axis
    (hpllm/parallel/pipeline.py). With `one_f_one_b_nll_sum`, the places training calls
    the model."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)

    stack = functools.partial(_stack, config=config, remat=remat)
    x = embed(params, tokens, positions, config, dtype)
    extras = {"positions": positions, "segment_ids": segment_ids}
    if microbatches:
        x, stats = pipeline_layers(stack, params["layers"], x, extras, microbatches=microbatches)
    else:
        layers = params["layers"]
        if (config.n_layers <= UNROLL_LAYERS and not config.n_experts
                and sharding.context_mesh() is None):  # sharded steps keep their layer loop
            layers = unstack_layers(params)["layers"]
        x, stats = stack(layers, x, extras)
    return head(params, x, config), stats


def _stack(layers, x, ex, *, config: ModelConfig, remat: str):
    x, _, stats = decoder_stack(layers, x, ex["positions"], config,
                                segment_ids=ex["segment_ids"], remat=remat)
    return x, stats


def _nll(logits, targets):
    if cpu_elementwise.routed(logits, dtype=jnp.float32):  # one kernel pass each way
        return cpu_elementwise.softmax_nll(logits, targets)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def one_f_one_b_nll_sum(params, batch, config: Config):
    """Sum over the batch of the masked per-token loss, with the decoder stack and the loss
    run by the 1F1B schedule (hpllm/parallel/one_f_one_b.py): the last stage computes each
    microbatch's logits and loss as soon as its forward is done, then starts its backward.
    Differentiable like `token_nll` (dense models; the config refuses 1F1B with MoE)."""
    model = config.model

    def last(head_params, y, ex):
        return (_nll(head(head_params, y, model), ex["targets"]) * ex["loss_mask"]).sum()

    dtype = jnp.dtype(config.train.compute_dtype)
    x = embed(params, batch["tokens"], batch["positions"], model, dtype)
    extras = {k: batch[k] for k in ("positions", "segment_ids", "targets", "loss_mask")}
    # cast once here, not in each layer: a cast inside a stage would be a vjp residual, so
    # every stashed microbatch would keep its own copy of the stage's weights
    layers = cast_params(params["layers"], dtype)
    head_params = cast_params({k: v for k, v in params.items() if k != "layers"}, dtype)
    loss, _ = pipeline_loss(functools.partial(_stack, config=model, remat=config.train.remat),
                            last, layers, head_params, x, extras,
                            microbatches=config.train.microbatches)
    return loss


def token_nll(params, batch, config: Config, *, moe_stats: bool = False):
    """Per-token negative log-likelihood (B, S) in nats, float32; with moe_stats, also the
    mixture-of-experts routing sums (None for a dense model). With mesh stage > 1 the layers
    run as a GPipe pipeline."""
    pipelined = config.mesh.stage > 1
    logits, stats = training_logits(
        params, batch["tokens"], batch["positions"], config.model,
        segment_ids=batch["segment_ids"], dtype=jnp.dtype(config.train.compute_dtype),
        remat=config.train.remat, microbatches=config.train.microbatches if pipelined else 0)
    nll = _nll(logits, batch["targets"])
    return (nll, stats) if moe_stats else nll


def loss_fn(params, batch, config: Config):
    """Mean cross-entropy, plus router_aux_weight x the load-balancing loss for MoE models;
    aux["ce"] is the cross-entropy alone (the loss that is logged). With mesh stage > 1 and
    pipeline_schedule "1f1b" the loss is the 1F1B pipeline's (`one_f_one_b_nll_sum`)."""
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    if config.mesh.stage > 1 and config.train.pipeline_schedule == "1f1b":
        ce = one_f_one_b_nll_sum(params, batch, config) / n
        return ce, {"tokens": mask.sum(), "ce": ce}
    nll, stats = token_nll(params, batch, config, moe_stats=True)
    ce = (nll * mask).sum() / n
    aux = {"tokens": mask.sum(), "ce": ce}
    if stats is None:
        return ce, aux
    aux["aux_loss"] = moe.load_balancing_loss(stats)
    aux["dropped_fraction"] = moe.dropped_fraction(stats)
    aux["dropped"] = stats["dropped"].sum()  # (token, expert) assignments over capacity
    aux["expert_load"] = moe.expert_load(stats)  # (L, E) shares of the assignments
    return ce + config.model.router_aux_weight * aux["aux_loss"], aux


CPU_KERNELS = ("matmul", "attention", "elementwise")


@contextlib.contextmanager
def _kernel_routing(config: Config, cpu_kernels):
    """The context in which the step is traced: the CPU bf16 kernels ("matmul" for the
    model's projections, "attention", "elementwise" for SwiGLU, RMSNorm, RoPE and the loss;
    cpu_kernels True = all, False = none, or a collection of those names) when the compute
    dtype is bf16 and no mesh shards the step (the kernels are one device's; XLA partitions
    its own ops)."""
    names = set(CPU_KERNELS if cpu_kernels is True else cpu_kernels or ())
    if names - set(CPU_KERNELS):
        raise ValueError(f"unknown CPU kernels {sorted(names - set(CPU_KERNELS))}; "
                         f"known: {', '.join(CPU_KERNELS)}")
    on = config.train.compute_dtype == "bfloat16" and sharding.context_mesh() is None
    with cpu_matmul.routing(on and "matmul" in names), \
            cpu_attention.routing(on and "attention" in names), \
            cpu_elementwise.routing(on and "elementwise" in names):
        yield


def kernels_routed(config: Config) -> bool:
    """Whether a step of `config` traced here (no mesh) runs on the CPU kernels: bf16
    compute on the CPU backend with the matmul kernel built."""
    return (config.train.compute_dtype == "bfloat16" and jax.default_backend() == "cpu"
            and cpu_matmul.available())


def train_step(state: dict, batch: dict, config: Config, *,
               cpu_kernels=True) -> tuple[dict, dict]:
    scale = loss_scale_of(state["opt_state"], config.train)  # float16: gradients stay in range

    def scaled_loss(params):
        loss, aux = loss_fn(params, batch, config)
        return loss * scale, aux

    with _kernel_routing(config, cpu_kernels):
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


def eval_step(params, batch: dict, config: Config, *, cpu_kernels=True) -> dict:
    """Sums over the batch, so evaluations over many batches add up exactly."""
    with _kernel_routing(config, cpu_kernels):
        nll = token_nll(params, batch, config)
    mask = batch["loss_mask"]
    return {"nll": (nll * mask).sum(), "tokens": mask.sum(),
            "bytes": batch["target_bytes"].sum()}


def jit_train_step(config: Config, mesh=None, rules=None, *, opt_memory_kind=None,
                   cpu_kernels=True):
    """The whole step under one jit; the old state's buffers are donated to the new one.
    With a mesh (`hpllm.parallel.mesh.make_mesh`): the state stays in its sharded layout
    (`hpllm.train.state.state_shardings`), batch rows are split over the batch axes,
    activations follow the sharding rules, and XLA inserts the collectives.
    opt_memory_kind="pinned_host": the optimizer state lives in host memory (state from
    `init_sharded_state(..., opt_memory_kind=...)`), copied in for the update and back.
    cpu_kernels=False: XLA's ops only (the same-run baseline of bench/train_step.py); a
    collection of CPU_KERNELS names: those kernels only."""
    step = functools.partial(train_step, config=config, cpu_kernels=cpu_kernels)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    rules = rules or sharding.RULES
    state = state_shardings(config, mesh, rules, opt_memory_kind=opt_memory_kind)
    if opt_memory_kind is not None:
        on_device = state_shardings(config, mesh, rules)["opt_state"]
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
    rules = rules or sharding.RULES
    return jax.jit(sharding.under_rules(step, mesh, rules),
                   in_shardings=(param_shardings(config, mesh, rules),
                                 sharding.batch_sharding(mesh, rules)),
                   out_shardings=sharding.replicated(mesh))
