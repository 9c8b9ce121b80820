"""GGUF loading: Q/K un-permutation, a synthetic GGUF written with the gguf package, and the
real SmolLM2-135M file (fetched once into the cache by `pull`)."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.checkpoints import ModelError
from hpllm.checkpoints.gguf import load_gguf, permute_qk, read_gguf, unpermute_qk
from hpllm.checkpoints.registry import load_model, pull
from hpllm.infer.generate import PromptError
from hpllm.infer.perplexity import evaluate_texts
from hpllm.infer.sampling import SamplingParams
from hpllm.infer.text import stream_ids
from hpllm.model.transformer import forward
from hpllm.train.data import shakespeare_validation_texts
from llama_numpy import _rope, llama_logits, random_llama_tensors

# GGUF tensor name -> HF name, written out here independently of the loader's table.
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def test_unpermute_inverts_permute_and_turns_interleaved_rope_into_rotate_half():
    rng = np.random.default_rng(0)
    n_heads, dh, d, s = 3, 8, 5, 7
    w = rng.standard_normal((n_heads * dh, d))
    assert np.array_equal(unpermute_qk(permute_qk(w, n_heads), n_heads), w)
    assert not np.array_equal(permute_qk(w, n_heads), w)
    # What matters: rotate-half RoPE on HF rows gives the same attention scores as
    # interleaved RoPE on the permuted (GGUF) rows.
    x = rng.standard_normal((s, d))
    pos = np.arange(s, dtype=np.float64)
    hf, gg = x @ w.T, x @ permute_qk(w, n_heads).T
    for h in range(n_heads):
        a = _rope(hf[:, h * dh:(h + 1) * dh], pos, 10000.0, interleaved=False)
        b = _rope(gg[:, h * dh:(h + 1) * dh], pos, 10000.0, interleaved=True)
        np.testing.assert_allclose(a @ a.T, b @ b.T, rtol=1e-12, atol=1e-12)
        assert not np.allclose(a @ a.T, _rope(gg[:, h * dh:(h + 1) * dh], pos, 10000.0,
                                              interleaved=False) @ a.T)


def _write_llama_gguf(path, t, L=2, D=32, H=4, K=2, F=64, qtype=gguf.GGMLQuantizationType.F32):
    """A llama GGUF as llama.cpp's converter writes one: Q/K rows permuted, GGUF names."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    hf_to_gguf = {v: k for k, v in GGUF_NAMES.items()}
    for name, x in t.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            short = {v: k for k, v in LAYER_NAMES.items()}[rest.removesuffix(".weight")]
            out = f"blk.{i}.{short}.weight"
        else:
            out = hf_to_gguf[name.removesuffix(".weight")] + ".weight"
        if "q_proj" in name:
            x = permute_qk(x, H)
        elif "k_proj" in name:
            x = permute_qk(x, K)
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(out, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_synthetic_gguf_gives_the_logits_of_its_hf_weights(tmp_path, qtype):
    rng = np.random.default_rng(1)
    t = random_llama_tensors(rng)
    qt = gguf.GGMLQuantizationType[qtype]
    _write_llama_gguf(tmp_path / "m.gguf", t, qtype=qt)
    config, params, _, _ = load_gguf(tmp_path / "m.gguf", progress=False)
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.ffn_dim,
            config.rope_theta, config.tie_embeddings) == (2, 32, 4, 2, 64, 5000.0, False)
    # The reference reads the HF weights rounded as the file rounds them (blocks run along
    # rows, so permuting rows does not change the rounding).
    def rounded(name):
        x = t[name]
        if x.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            return x
        return gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)

    tokens = [3, 17, 42, 8, 29, 11]
    expected = llama_logits(rounded, n_layers=2, n_heads=4, n_kv_heads=2, eps=1e-5, theta=5000.0,
                            tokens=tokens, tied=False)
    logits, _ = forward(jax.tree.map(jnp.asarray, params), jnp.asarray([tokens]),
                        jnp.arange(len(tokens))[None], config)
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=2e-4, atol=2e-4)


def test_bad_gguf_files_raise_model_errors(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello, I am not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        read_gguf(not_gguf)
    with pytest.raises(ModelError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    t = random_llama_tensors(np.random.default_rng(2))
    _write_llama_gguf(tmp_path / "m.gguf", t)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "tail.gguf").write_bytes(data[:-100])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf(tmp_path / "tail.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((10, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf", progress=False)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF, ~94 MiB; pulled once into ~/.cache/hpllm/models)


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", progress=False)


def test_smollm2_config_and_greedy_next_token(smollm):
    c = smollm.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0
    assert smollm.load_seconds > 0  # measured (its size is the machine's, not asserted)
    tok = smollm.tokenizer
    ids = tok.encode("The capital of France is")
    logits, _ = forward(smollm.params, jnp.asarray([ids]), jnp.arange(len(ids))[None], c)
    assert tok.decode([int(jnp.argmax(logits[0, -1]))]) == " Paris"


def test_smollm2_forward_equals_float64_numpy_on_the_raw_gguf_tensors(smollm):
    """The reference reads the file's tensors through the gguf package, by GGUF names, and
    applies llama.cpp's interleaved RoPE to the stored (permuted) Q/K rows: no code of the
    loader's conversion is shared."""
    file = read_gguf(smollm.path)
    c = smollm.config

    def get(hf_name):
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            short = {v: k for k, v in LAYER_NAMES.items()}[rest.removesuffix(".weight")]
            name = f"blk.{i}.{short}.weight"
        else:
            name = {v: k for k, v in GGUF_NAMES.items()}[hf_name.removesuffix(".weight")] + ".weight"
        info = file.tensors[name]
        raw = np.fromfile(smollm.path, np.uint8, info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1]))
        return gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(info.qtype))

    tokens = smollm.tokenizer.encode("To be, or not to be")
    expected = llama_logits(get, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                            eps=c.norm_eps, theta=c.rope_theta, tokens=tokens, tied=True,
                            interleaved=True)
    logits, _ = forward(smollm.params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], c)
    logits = np.asarray(logits[0], np.float64)
    scale = np.abs(expected).max()
    assert np.abs(logits - expected).max() <= 1e-4 * scale
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_prompt_longer_than_the_context_is_refused(smollm):
    with pytest.raises(PromptError, match="does not fit the context of 8192"):
        next(stream_ids(smollm, [100] * 8192, SamplingParams()))


def test_perplexity_and_bits_per_byte_on_a_validation_slice(smollm):
    texts = shakespeare_validation_texts()
    r = evaluate_texts(smollm, texts, max_tokens=200, window=128, progress=False)
    assert (r["tokens"], r["window"]) == (200, 128)
    first = smollm.tokenizer.encode(texts[0])[1:201]
    assert r["bytes"] == len(smollm.tokenizer.decode(first).encode())
    assert 2 < r["perplexity"] < 1000 and 0.5 < r["bits_per_byte"] < 3.0, r
    # bits/byte and perplexity describe the same summed log-likelihood
    assert abs(r["bits_per_byte"] * r["bytes"] - np.log2(r["perplexity"]) * r["tokens"]) < 1e-6 * r["bytes"]


def test_pull_is_cached_and_unknown_names_are_refused():
    path = pull("smollm2-135m")
    assert path.stat().st_size > 90e6 and path.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        pull("nope")
