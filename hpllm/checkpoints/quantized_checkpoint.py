"""Quantized checkpoints: a directory that `load_model` reads back already quantized.

model.safetensors holds the codes, scales and float leaves (each quantized leaf's layout in
the header), config.json the ModelConfig and the scheme, and the tokenizer sits beside them
as tokenizer.json/tokenizer_config.json (`hpllm quantize` writes it).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hpllm.checkpoints import ModelError
from hpllm.config import ModelConfig
from hpllm.quantized import QuantizedWeight, is_quantized

QUANT_CONFIG_KEY = "hpllm_quantized"  # in config.json: marks a directory saved by save_quantized


def save_quantized(out_dir, config, params: dict, tokenizer, scheme: str, **settings) -> None:
    """A directory that `load_model` reads back with no --quant: model.safetensors (codes,
    scales and float leaves; each quantized leaf's layout in the header), config.json
    (ModelConfig + the scheme) and the tokenizer as tokenizer.json/tokenizer_config.json."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, layouts = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if not is_quantized(leaf):
            tensors[name] = np.asarray(leaf)
            continue
        layouts[name] = {"scheme": leaf.scheme, "shape": list(leaf.shape),
                         "in_axes": list(leaf.in_axes), "group_size": leaf.group_size,
                         "threshold": leaf.threshold}
        for part in ("q", "scale", "zero"):
            if getattr(leaf, part) is not None:
                tensors[f"{name}:{part}"] = np.asarray(getattr(leaf, part))
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": "hpllm-quantized", "layouts": json.dumps(layouts)})
    (out / "config.json").write_text(json.dumps(
        {QUANT_CONFIG_KEY: {"scheme": scheme, **settings},
         "model": dataclasses.asdict(config)}, indent=1))
    tokenizer.hf.save(str(out / "tokenizer.json"))
    token = tokenizer.hf.id_to_token
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": token(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
        "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template},
        indent=1))


def is_quantized_dir(path) -> bool:
    cfg = pathlib.Path(path) / "config.json"
    try:
        return QUANT_CONFIG_KEY in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def load_quantized(path):
    """(ModelConfig, params with QuantizedWeight leaves, the scheme settings) of a directory
    written by save_quantized."""
    folder = pathlib.Path(path)
    try:
        meta = json.loads((folder / "config.json").read_text())
        config = ModelConfig(**meta["model"])
        with safe_open(str(folder / "model.safetensors"), "numpy") as f:
            layouts = json.loads(f.metadata()["layouts"])
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # missing file, bad JSON, unknown config key, bad safetensors
        raise ModelError(f"{folder}: not a readable quantized checkpoint ({e})") from None
    params: dict = {}

    def put(name, value):
        *parents, last = name.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    for name, a in arrays.items():
        if ":" not in name:
            put(name, jnp.asarray(a))
    for name, lay in layouts.items():
        part = {p: (jnp.asarray(arrays[f"{name}:{p}"]) if f"{name}:{p}" in arrays else None)
                for p in ("q", "scale", "zero")}
        put(name, QuantizedWeight(part["q"], part["scale"], part["zero"], lay["scheme"],
                                  tuple(lay["shape"]), tuple(lay["in_axes"]),
                                  lay["group_size"], lay["threshold"]))
    return config, params, meta[QUANT_CONFIG_KEY]
