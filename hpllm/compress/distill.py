"""Knowledge distillation of a small draft model from a pretrained target (`hpllm distill`).

The student is a tiny Llama on the target's tokenizer and vocabulary (so its next-token
distribution is comparable token for token, as speculative decoding needs), with tied
embeddings initialised from the target's embedding projected onto its top principal
directions. It is trained on Shakespeare windows (the training split of `hpllm train`, tokenized
by the target's tokenizer) to minimise KL(target || student) of the next-token distributions,
the target's logits computed on the fly. The result is cached under
<cache>/distilled/<model>/ (hpllm/checkpoints/distilled.py, which also loads it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hpllm.checkpoints.distilled import distilled_dir, load_distilled, save_distilled
from hpllm.checkpoints.registry import load_model
from hpllm.config import ModelConfig, TrainConfig
from hpllm.model.transformer import forward, init_params
from hpllm.train.data import load_documents, split_documents


def student_config(target: ModelConfig, dim: int = 192, n_layers: int = 2) -> ModelConfig:
    head_dim = target.head_dim
    if dim % head_dim:
        raise ValueError(f"student dim {dim} must be a multiple of the target's head dim "
                         f"{head_dim}")
    return dataclasses.replace(target, dim=dim, n_layers=n_layers, n_heads=dim // head_dim,
                               n_kv_heads=1, ffn_dim=0, tie_embeddings=True, n_experts=0)


def kl_loss(student_params, teacher_logits, tokens, config: ModelConfig):
    """Mean over tokens of KL(teacher || student) in nats."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
    logits, _ = forward(student_params, tokens, positions, config)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def learning_rate(peak: float, step: int, spent: float, warmup: int = 20) -> float:
    """Linear warmup over `warmup` steps, then cosine from peak to peak / 10 as the spent
    fraction of the budget goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + np.cos(np.pi * min(spent, 1.0))))


def distill(model: str = "smollm2-135m", *, minutes: float = 8.0, steps: int = 10_000,
            batch: int = 4, window: int = 128, dim: int = 192, n_layers: int = 2,
            lr: float = 3e-3, seed: int = 0, resume: bool = False, log=print) -> dict:
    """Train and cache a draft for `model`; stops after `steps` or `minutes` of wall time.
    resume: start from the cached draft (which must have this dim and n_layers) instead of a
    fresh one, and continue its step and time counts."""
    target = load_model(model, progress=False)
    tc = TrainConfig()
    train_docs, _ = split_documents(load_documents(tc), tc.val_fraction, tc.seed)
    ids = np.concatenate([np.asarray(target.tokenizer.encode(d.text), np.int32)
                          for d in train_docs])
    cfg = student_config(target.config, dim, n_layers)
    done = {"steps": 0, "seconds": 0.0}
    if resume:
        cached_cfg, params = load_distilled(model)
        if (cached_cfg.dim, cached_cfg.n_layers) != (dim, n_layers):
            raise ValueError(f"the cached draft of {model} is not a {n_layers}-layer, dim {dim} "
                             "student; cannot resume it")
        done = json.loads((distilled_dir(model) / "config.json").read_text())
        rng_seed = seed + done["steps"]  # other windows than the run it continues
    else:
        params = init_params(cfg, jax.random.key(seed))
        # PCA of the target's embedding: the student starts with its token geometry.
        emb = np.asarray(target.params["embed"], np.float32)
        _, _, vt = np.linalg.svd(emb - emb.mean(0), full_matrices=False)
        params["embed"] = jnp.asarray(emb @ vt[:dim].T)
        rng_seed = seed
    # The learning rate is set per step from the budget spent (steps or minutes, whichever
    # runs out first), so a run cut by the clock still anneals: warmup, then cosine to lr/10.
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=0.0))
    opt_state = opt.init(params)

    # The teacher's weights are an argument, not a closure: closed-over arrays become
    # constants that XLA folds at compile time (minutes for the 49152 x 576 embedding).
    @jax.jit
    def teacher(teacher_params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
        return forward(teacher_params, tokens, positions, target.config)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, teacher_logits):
        loss, grads = jax.value_and_grad(kl_loss)(params, teacher_logits, tokens, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(rng_seed)
    start, losses = time.perf_counter(), []
    for i in range(steps):
        offsets = rng.integers(0, len(ids) - window, batch)
        tokens = jnp.asarray(np.stack([ids[o:o + window] for o in offsets]))
        spent = max(i / steps, (time.perf_counter() - start) / (minutes * 60))
        opt_state[1].hyperparams["learning_rate"] = jnp.float32(learning_rate(lr, i, spent))
        params, opt_state, loss = step(params, opt_state, tokens,
                                       teacher(target.params, tokens))
        losses.append(float(loss))
        elapsed = time.perf_counter() - start
        if i % 10 == 0:
            log(f"step {i}: KL {np.mean(losses[-20:]):.3f} nats/token, {elapsed:.0f} s")
        if elapsed > minutes * 60:
            break
    summary = save_distilled(model, cfg, params, steps=done["steps"] + i + 1,
                             seconds=done["seconds"] + elapsed,
                             final_kl=float(np.mean(losses[-10:])))
    log(f"saved {distilled_dir(model)} after {i + 1} steps: KL {summary['final_kl']:.3f}")
    return summary
