"""Hugging Face Llama checkpoints: a directory of config.json + *.safetensors (+ tokenizer.json).

Also the one conversion from HF tensor names and layouts to our parameter tree, which the GGUF
loader reuses after renaming its tensors: HF stores each linear layer as (out, in), we store
(in, out) split into heads, with the layers stacked on a leading axis.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from hpllm.checkpoints import ModelError
from hpllm.config import ConfigError, ModelConfig

# HF name inside layer i -> our name
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Llama config.json dict; anything our decoder cannot run is refused."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if hf.get("model_type") != "llama" and not set(archs) & set(LLAMA_ARCHITECTURES):
        raise ModelError(f"unsupported architecture {'/'.join(archs)} (supported: Llama)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ModelError(f"unsupported: {flag}=true (our Llama has no biases)")
    if hf.get("rope_scaling"):
        raise ModelError(f"unsupported rope_scaling {hf['rope_scaling']}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"unsupported hidden_act {hf['hidden_act']!r} (SwiGLU needs silu)")
    n_heads = hf["num_attention_heads"]
    return checked_config(dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False))), hf.get("head_dim"), "config.json")


def checked_config(fields: dict, head_dim: int | None, where: str) -> ModelConfig:
    """ModelConfig(**fields), refused unless it is valid and its head_dim (dim / n_heads in our
    decoder) equals the checkpoint's own `head_dim` (None: not stated)."""
    config = ModelConfig(**fields)
    if head_dim is not None and head_dim != config.head_dim:
        raise ModelError(f"{where}: unsupported head_dim {head_dim} != dim / heads "
                         f"({config.head_dim})")
    try:
        config.validate()
    except ConfigError as e:
        raise ModelError(f"{where}: impossible model config: {e}") from None
    return config


def params_from_hf_tensors(get, config: ModelConfig, progress=None) -> dict:
    """Our parameter tree (float32 numpy) from HF-named tensors; `get(name)` returns the
    float32 (out, in) matrix or vector. Stacked arrays are filled in place, one layer at a time,
    so peak memory is about one copy of the model."""
    c = config
    L, D, H, K, Dh, F = c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim
    shapes = {"attn_norm": (D,), "wq": (D, H, Dh), "wk": (D, K, Dh), "wv": (D, K, Dh),
              "wo": (H, Dh, D), "mlp_norm": (D,), "w_gate": (D, F), "w_up": (D, F),
              "w_down": (F, D)}
    layers = {k: np.empty((L, *s), np.float32) for k, s in shapes.items()}

    def fetch(name, shape, n_in=1):
        """The (out, in) matrix `name` transposed and split to `shape`, whose first `n_in`
        axes are the input features; vectors as they are."""
        w = get(name)
        expected = shape if len(shape) == 1 else (int(np.prod(shape[n_in:])),
                                                  int(np.prod(shape[:n_in])))
        if w.shape != expected:
            raise ModelError(f"tensor {name} has shape {w.shape}, config implies {expected}")
        return w if w.ndim == 1 else w.T.reshape(shape)

    embed = fetch("model.embed_tokens.weight", (D, c.vocab_size)).T  # stored (V, D)
    for i in range(L):
        for hf_name, ours in _LAYER_TENSORS.items():
            layers[ours][i] = fetch(f"model.layers.{i}.{hf_name}", shapes[ours],
                                    n_in=2 if ours == "wo" else 1)
        if progress is not None:
            progress.update(1)
    params = {"embed": np.ascontiguousarray(embed), "layers": layers,
              "final_norm": fetch("model.norm.weight", (D,))}
    if not c.tie_embeddings:
        params["unembed"] = fetch("lm_head.weight", (D, c.vocab_size))
    return params


def load_hf_dir(path) -> tuple[ModelConfig, dict]:
    """(config, float32 numpy params) of an HF Llama directory with safetensors weights."""
    from safetensors import safe_open

    folder = pathlib.Path(path)
    try:
        config = config_from_hf(json.loads((folder / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ModelError(f"{folder}/config.json: cannot read a Llama config ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights")
    where = {}
    try:
        for f in files:
            # framework="flax" returns JAX arrays, which (unlike NumPy) know bfloat16
            h = safe_open(str(f), framework="flax")
            where.update({k: h for k in h.keys()})
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise ModelError(f"cannot read {f}: {e}") from None

    def get(name):
        if name not in where:
            raise ModelError(f"{folder}: tensor {name} missing from the safetensors files")
        return np.asarray(where[name].get_tensor(name), np.float32)

    return config, params_from_hf_tensors(get, config)
