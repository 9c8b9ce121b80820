"""Hugging Face Llama directories: config.json + *.safetensors + tokenizer.json, written here
from random weights with the safetensors package and HF's naming."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from hpllm.checkpoints import ModelError
from hpllm.checkpoints.registry import load_model
from hpllm.infer.generate import generate
from hpllm.model.transformer import forward
from hpllm.train.data import byte_tokenizer
from llama_numpy import llama_logits, random_llama_tensors

V, D, L, H, K, F = 262, 32, 2, 4, 2, 64


def _hf_config(**changes):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
           "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H,
           "num_key_value_heads": K, "intermediate_size": F, "max_position_embeddings": 128,
           "rope_theta": 20000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "hidden_act": "silu", "torch_dtype": "float32"}
    return cfg | changes


@pytest.fixture
def hf_dir(tmp_path):
    tensors = random_llama_tensors(np.random.default_rng(5), L=L, D=D, H=H, K=K, F=F, V=V)
    names = sorted(tensors)
    # two shards, as large checkpoints come
    save_file({n: tensors[n] for n in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    byte_tokenizer().save(tmp_path / "tokenizer.json")  # 259 byte-level tokens
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|eos|>", "bos_token": "<|bos|>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"}))
    return tmp_path, tensors


def test_hf_directory_gives_the_logits_of_its_weights(hf_dir):
    folder, tensors = hf_dir
    model = load_model(str(folder), progress=False)
    c = model.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim,
            c.rope_theta, c.tie_embeddings) == (V, D, L, H, K, F, 20000.0, False)
    tokens = model.tokenizer.encode("hi there")
    assert tokens[0] == model.tokenizer.bos_id and len(tokens) == 9  # BOS + one per byte
    expected = llama_logits(tensors.__getitem__, n_layers=L, n_heads=H, n_kv_heads=K, eps=1e-6,
                            theta=20000.0, tokens=tokens, tied=False)
    logits, _ = forward(model.params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], c)
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=2e-4, atol=2e-4)
    greedy = list(generate(model.params, c, tokens, 1))
    assert greedy == [int(expected[-1].argmax())]
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<user>x"
    assert model.tokenizer.stop_ids == {model.tokenizer.eos_id}


def test_hf_bfloat16_weights_load_as_their_float32_values(hf_dir):
    import jax.numpy as jnp
    from safetensors.flax import save_file as save_jax

    folder, tensors = hf_dir
    for f in folder.glob("*.safetensors"):
        f.unlink()
    bf16 = {n: jnp.asarray(x, jnp.bfloat16) for n, x in tensors.items()}
    save_jax(bf16, str(folder / "model.safetensors"))
    model = load_model(str(folder), progress=False)
    np.testing.assert_array_equal(np.asarray(model.params["embed"]),
                                  np.asarray(bf16["model.embed_tokens.weight"], np.float32))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unsupported architecture"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "unsupported rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "divisible"),
])
def test_unsupported_hf_configs_are_refused(hf_dir, change, message):
    folder, _ = hf_dir
    (folder / "config.json").write_text(json.dumps(_hf_config(**change)))
    with pytest.raises(ModelError, match=message):
        load_model(str(folder), progress=False)


def test_missing_tensor_and_empty_directory(hf_dir, tmp_path_factory):
    folder, tensors = hf_dir
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({n: x for n, x in tensors.items() if "layers.1.mlp.up" not in n},
              folder / "model.safetensors")
    with pytest.raises(ModelError, match="layers.1.mlp.up_proj.weight missing"):
        load_model(str(folder), progress=False)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ModelError, match="without config.json"):
        load_model(str(empty), progress=False)


def test_a_sentencepiece_style_tokenizer_is_refused(hf_dir):
    from tokenizers import Tokenizer, decoders, models

    folder, _ = hf_dir
    sp = Tokenizer(models.BPE(vocab={"▁the": 0, "<0x0A>": 1}, merges=[]))
    sp.decoder = decoders.Metaspace()
    sp.save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelError, match="only byte-level BPE"):
        load_model(str(folder), progress=False)
