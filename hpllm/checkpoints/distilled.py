"""Distilled draft models on disk: <cache>/distilled/<model>/ holds params.npz (one array per
parameter, keyed by its tree path) and config.json (the student's ModelConfig and a training
summary). `hpllm distill` (hpllm/compress/distill.py) writes them; speculative decoding loads
them as drafts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.cache import cache_dir
from hpllm.config import ModelConfig
from hpllm.model.transformer import init_params


def distilled_dir(model: str = "smollm2-135m"):
    return cache_dir() / "distilled" / model


def save_distilled(model: str, config: ModelConfig, params, **facts) -> dict:
    """Write the draft of `model`; facts (steps, seconds, final KL) go into config.json beside
    the config. Returns what config.json holds."""
    out = distilled_dir(model)
    out.mkdir(parents=True, exist_ok=True)
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out / "params.npz", **flat)
    record = {"config": dataclasses.asdict(config), **facts, "model": model}
    (out / "config.json").write_text(json.dumps(record, indent=1))
    return record


def load_distilled(model: str = "smollm2-135m"):
    """(ModelConfig, params) of the cached draft; FileNotFoundError when `hpllm distill` has
    not been run for this model."""
    out = distilled_dir(model)
    if not (out / "params.npz").exists():
        raise FileNotFoundError(f"no distilled draft for {model} in {out}: run `hpllm distill`")
    summary = json.loads((out / "config.json").read_text())
    cfg = ModelConfig(**summary["config"])
    template = init_params(cfg, jax.random.key(0))
    stored = np.load(out / "params.npz")
    leaves = [jnp.asarray(stored[jax.tree_util.keystr(k)])
              for k, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    return cfg, jax.tree.unflatten(jax.tree.structure(template), leaves)
