"""The paged, continuously batched engine against single-sequence greedy decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import EngineConfig, ModelConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.generate import PromptError, generate
from hpllm.infer.llm import LLM
from hpllm.infer.ragged import FlatBatchBuilder, pow_buckets, ragged_forward
from hpllm.infer.sampling import SamplingError, SamplingParams
from hpllm.kernels import cpu_decoder
from hpllm.model.kv_cache import PagedKVCache
from hpllm.model.transformer import forward, init_params, unstack_layers

CFG = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  init_std=0.2)


REFERENCE_CFG = dataclasses.replace(CFG, attention="reference")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@jax.jit
def _last_logits(params, tokens, length):
    positions = jnp.arange(tokens.shape[1])[None]
    logits, _ = forward(params, tokens, positions, REFERENCE_CFG)
    return logits[0, length - 1]


def greedy_reference(params, prompt, max_tokens):
    """The plainest single-sequence greedy decoding: no KV cache at all, the whole sequence
    re-run for every token (one compiled shape)."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        padded = jnp.asarray([tokens + [0] * (CFG.max_seq_len - len(tokens))], jnp.int32)
        tokens.append(int(jnp.argmax(_last_logits(params, padded, len(tokens)))))
    return tokens[len(prompt):]


def _prompts(seed, count, shared_prefix=0):
    rng = np.random.default_rng(seed)
    prefix = list(rng.integers(0, CFG.vocab_size, shared_prefix))
    return [prefix + list(rng.integers(0, CFG.vocab_size, int(n)))
            for n in rng.integers(1, 45, count)]


def _run(engine, prompts, params_list):
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    engine.blocks.check_no_leak()
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("name,engine_config,shared", [
    ("batched", EngineConfig(block_size=16, num_blocks=64), 0),
    ("chunked prefill", EngineConfig(block_size=5, num_blocks=200, max_num_batched_tokens=7), 0),
    ("chunked prefill xla", EngineConfig(block_size=5, num_blocks=200, max_num_batched_tokens=7,
                                         step_backend="xla"), 0),
    ("prefix cache", EngineConfig(block_size=4, num_blocks=200, max_num_seqs=3), 21),
    ("preemption", EngineConfig(block_size=4, num_blocks=24, max_num_batched_tokens=32), 0),
])
def test_greedy_engine_equals_single_sequence_decoding(params, name, engine_config, shared):
    prompts = _prompts(len(name), 6, shared)
    max_tokens = [int(n) for n in np.random.default_rng(1).integers(1, 30, len(prompts))]
    engine = EngineCore(params, CFG, None, engine_config)
    outs = _run(engine, prompts, [SamplingParams(temperature=0, max_tokens=m)
                                  for m in max_tokens])
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.outputs[0].token_ids == greedy_reference(params, prompt, m)
        assert out.outputs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["generation_tokens"] == sum(max_tokens)
    if name == "prefix cache":  # the shared 21-token prefix = 5 cached blocks per later request
        assert stats["prefix_hits"] >= 5 * 4 * (len(prompts) - 3)  # after the first 3 ran
        assert max(o.num_cached_tokens for o in outs) == 20
    if name == "preemption":
        assert stats["preemptions"] > 0
    if name.startswith("chunked prefill"):
        assert stats["steps"] > sum(len(p) for p in prompts) / 7
    # the step trace: every step within the token budget, in a bucket that holds it
    assert len(engine.trace) == stats["steps"]
    assert sum(d + p for d, p, *_ in engine.trace) == stats["batched_tokens"]
    assert sum(t for _, _, t, _, _ in engine.trace) == stats["padded_tokens"]
    for d, p, t, r, seconds in engine.trace:
        assert 0 < d + p <= engine_config.max_num_batched_tokens and d + p <= t
        assert t in engine.token_buckets and r in engine.row_buckets and seconds > 0


def test_output_does_not_depend_on_the_batch(params):
    prompt = _prompts(5, 1)[0]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=3)
    alone = _run(EngineCore(params, CFG, None, EngineConfig(block_size=8, num_blocks=64)),
                 [prompt, prompt], [greedy, sampled])
    others = _prompts(6, 5)
    crowd = _run(EngineCore(params, CFG, None, EngineConfig(block_size=8, num_blocks=64)),
                 others[:3] + [prompt, prompt] + others[3:],
                 [SamplingParams(temperature=1.0, max_tokens=9)] * 3 + [greedy, sampled]
                 + [SamplingParams(temperature=0, max_tokens=5)] * 2)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids
                                                       for o in crowd[3:5]]


@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_greedy_output_is_the_same_whatever_shares_its_steps(params, backend):
    """One request alone, then with others of other lengths arriving while it decodes, so
    its decode tokens share passes (and token buckets) with their prefill chunks."""
    prompt = _prompts(12, 1)[0]
    greedy = SamplingParams(temperature=0, max_tokens=14, logprobs=1)
    config = EngineConfig(block_size=4, num_blocks=200, max_num_batched_tokens=24,
                          step_backend=backend)
    alone = _run(EngineCore(params, CFG, None, config), [prompt], [greedy])[0].outputs[0]
    engine = EngineCore(params, CFG, None, config)
    if backend == "auto":
        assert engine.backend == ("kernel" if cpu_decoder.available() else "xla")
    engine.add_request("p", prompt, greedy)
    engine.add_request("early", _prompts(13, 1)[0], SamplingParams(temperature=0, max_tokens=5))
    mixed = 0
    for i, late in enumerate(_prompts(14, 4)):
        engine.step()
        seq = engine.requests["p"].seqs[0]
        engine.add_request(f"late{i}", late + late, SamplingParams(temperature=1.0, max_tokens=3))
        decoding = len(seq.tokens) - seq.num_computed == 1
        engine.step()  # p decodes while late{i}'s prompt is prefilled in chunks
        mixed += decoding and engine.requests[f"late{i}"].seqs[0].num_computed > 0
    assert mixed > 0
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    engine.blocks.check_no_leak()
    crowd = done["p"].outputs[0]
    assert crowd.token_ids == alone.token_ids == greedy_reference(params, prompt, 14)
    np.testing.assert_allclose([d["logprob"] for d in crowd.logprobs],
                               [d["logprob"] for d in alone.logprobs], atol=1e-5)


_forward = jax.jit(forward, static_argnames=("config",))


@pytest.mark.parametrize("kv_dtype,window,unroll", [("float32", 0, True), ("int8", 5, False)])
def test_ragged_forward_equals_the_full_forward(kv_dtype, window, unroll):
    """Three sequences in one flat batch: a decode over 10 cached positions, a fresh
    7-token prefill and a 5-token chunk after 5 cached ones (block size 3: chunks straddle
    blocks); every token's logits against the cache-free forward of its whole sequence."""
    cfg = dataclasses.replace(REFERENCE_CFG, attention_window=window)
    full = init_params(cfg, jax.random.key(3))
    params = unstack_layers(full) if unroll else full
    pool = PagedKVCache.create(cfg, 40, 3, kv_dtype, unrolled=unroll)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (11, 7, 10)]
    cached, tables = [10, 0, 5], [[5, 2, 9, 1], [3, 7, 4], [6, 8, 10, 11]]
    for seq, n, blocks in zip(seqs, cached, tables):  # the cached prefixes, the old way
        if n:
            padded = np.pad(np.array([seq[:n]]), ((0, 0), (0, 16 - n)))
            positions = np.where(np.arange(16) < n, np.arange(16), -1)[None]
            _, pool = _forward(params, jnp.asarray(padded), jnp.asarray(positions), cfg,
                               cache=pool.with_tables(jnp.asarray(np.pad([blocks], ((0, 0),
                                                                                    (0, 4))))))
            pool = pool.with_tables(None)
    builder = FlatBatchBuilder(4, 8)
    flat = [builder.add(blocks, seq[n:], n) for seq, n, blocks in zip(seqs, cached, tables)]
    b = builder.build([i for f in flat for i in f], pow_buckets(8, 64), pow_buckets(1, 64))
    assert len(b.tokens) == 16 and b.num_tokens == 1 + 7 + 5  # padded to the token bucket
    logits, _ = jax.jit(ragged_forward, static_argnames=("config", "dtype"))(
        params, pool, *map(jnp.asarray, (b.tokens, b.positions, b.seq_index, b.tables,
                                         b.logits_index)), config=cfg)
    tol = {"float32": 1e-4, "int8": 0.3}[kv_dtype]  # int8: the KV codes' rounding
    row = 0
    for seq, n in zip(seqs, cached):
        want, _ = _forward(full, jnp.asarray([seq]), jnp.arange(len(seq))[None], cfg)
        for p in range(n, len(seq)):
            np.testing.assert_allclose(logits[row], want[0, p], atol=tol)
            row += 1


def test_warmup_compiles_every_step_shape_and_changes_nothing(params):
    engine = EngineCore(params, CFG, None, EngineConfig(block_size=4, num_blocks=100,
                                                        max_num_seqs=4,
                                                        max_num_batched_tokens=20,
                                                        step_backend="xla"))
    assert engine.buckets() == [(t, r) for t in (8, 16, 32) for r in (1, 2, 4, 8)]
    pool = [np.asarray(a[1:]) for a in engine.model.pool.k]
    calls = []
    total = 12 + 4 + 2  # passes, the sampler per row bucket, copy sizes 4 and 8
    assert engine.warmup(lambda done, n: calls.append((done, n))) == total
    assert calls == [(i + 1, total) for i in range(total)]
    assert all((np.asarray(a[1:]) == b).all() for a, b in zip(engine.model.pool.k, pool))
    assert engine.blocks.num_free == engine.blocks.num_usable and not engine.has_unfinished()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
    shared = _prompts(16, 1)[0] * 2  # n > 1 forks copy its last partial block
    _run(engine, _prompts(15, 5) + [shared],
         [SamplingParams(temperature=t, max_tokens=m, top_p=p, top_k=k, logprobs=lp)
          for t, m, p, k, lp in zip([0, 1.0, 0, 0.7, 0], [3, 9, 1, 12, 6], [1, 0.9, 1, 0.8, 1],
                                    [0, 0, 0, 5, 0], [None, 2, 0, None, 8])]
         + [SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=7, seed=1)])
    assert compiles == []


def test_parallel_samples_share_the_prompt_blocks(params):
    prompt = [(7 * i) % CFG.vocab_size for i in range(37)]  # ends inside a block
    engine = EngineCore(params, CFG, None, EngineConfig(block_size=8, num_blocks=64))
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=11, logprobs=2)
    engine.add_request("a", prompt, sp)
    engine.step()  # prefill and the first 4 samples
    tables = [s.table.blocks for s in engine.requests["a"].seqs]
    assert len(tables) == 4 and all(t[:-1] == tables[0][:-1] for t in tables)
    used = engine.blocks.num_usable - engine.blocks.num_free
    assert used == len(tables[0])  # one copy of the prompt, however many samples
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    engine.blocks.check_no_leak()
    assert engine.blocks.stats.copies >= 3  # each sample copied the shared partial block
    texts = [tuple(o.token_ids) for o in final.outputs]
    assert len(set(texts)) > 1 and all(len(t) == 10 for t in texts)
    assert all(len(o.logprobs) == 10 and len(o.logprobs[0]["top"]) == 2 for o in final.outputs)
    again = _run(EngineCore(params, CFG, None, EngineConfig(block_size=8, num_blocks=64)),
                 [prompt], [sp])[0]
    assert [tuple(o.token_ids) for o in again.outputs] == texts  # seeded: reproducible


def test_stop_token_min_tokens_and_abort(params):
    prompt = _prompts(8, 1)[0]
    free_run = greedy_reference(params, prompt, 20)
    stop = free_run[4]
    first = free_run.index(stop)
    engine = EngineCore(params, CFG, None, EngineConfig(block_size=4, num_blocks=64))
    out = _run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=20,
                                                 stop_token_ids=[stop])])[0].outputs[0]
    assert out.token_ids == free_run[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    out = _run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 1,
                                                 stop_token_ids=[stop])])[0].outputs[0]
    assert len(out.token_ids) > first + 1
    engine.add_request("x", prompt, SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("y", prompt[:3], SamplingParams(temperature=0, max_tokens=50))
    for _ in range(3):
        engine.step()
    final = engine.abort_request("x")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.abort_request("x") is None
    engine.abort_request("y")
    assert not engine.has_unfinished()
    engine.blocks.check_no_leak()


@pytest.mark.parametrize("prompt,kw,error", [
    ([], {}, PromptError), ([5] * 128, {}, PromptError), ([97], {}, PromptError),
    ([1, 2], {"temperature": -1}, SamplingError), ([1, 2], {"max_tokens": 10**6}, PromptError),
])
def test_bad_requests_change_nothing(params, prompt, kw, error):
    engine = EngineCore(params, CFG, None, EngineConfig(block_size=4, num_blocks=8))
    with pytest.raises(error):
        engine.add_request("r", prompt, SamplingParams(**kw))
    assert not engine.has_unfinished() and not engine.requests
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("r", [1, 2])


@pytest.fixture(scope="module")
def smollm_llm():
    # scanned layers: the same paged forward, compiled in a fraction of the unrolled time
    return LLM("smollm2-135m", block_size=16, kv_memory_mb=64, max_num_batched_tokens=64,
               unroll_layers=False)


def test_smollm2_engine_greedy_matches_generate_and_stops_on_strings(smollm_llm):
    llm = smollm_llm
    tok, model = llm.model.tokenizer, llm.model
    prompts = ["The capital of France is", "Once upon a time,",
               "To be, or not to be, that is the question: Whether 'tis nobler in the mind"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    outs = llm.generate(prompts, greedy)
    for prompt, out in zip(prompts, outs):
        ref = list(generate(model.params, model.config, tok.encode(prompt), 24,
                            stop_ids=tok.stop_ids))
        assert out.outputs[0].token_ids == ref, prompt
        assert out.outputs[0].text == tok.decode([t for t in ref if t not in tok.stop_ids])
    text = outs[0].outputs[0].text
    stop = text.strip()[3:6]  # a string the greedy continuation contains
    cut = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=24,
                                                  stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    llm.engine.blocks.check_no_leak()


def test_int8_kv_cache_engine_equals_dense_int8_decoding(params):
    """int8 KV blocks (per-token-per-head scales, hpllm.quantized.quantize_kv) give
    the tokens of the dense int8 cache of `generate` (the quality of int8 against float32 is
    tested on SmolLM2 in tests/test_quantize.py), and the same memory holds ~3.8x the tokens
    of float32 (1.9x bfloat16)."""
    from hpllm.infer.paged_model import num_blocks_for
    from hpllm.model.kv_cache import kv_bytes_per_token

    prompts = _prompts(9, 4)
    engine = EngineCore(params, CFG, None, EngineConfig(block_size=4, num_blocks=100,
                                                        kv_dtype="int8",
                                                        max_num_batched_tokens=16))
    assert all(a.dtype == jnp.int8 for a in engine.model.pool.k)  # one array per layer
    outs = _run(engine, prompts, [SamplingParams(temperature=0, max_tokens=12)] * len(prompts))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == list(generate(params, CFG, prompt, 12,
                                                         kv_dtype="int8"))
    c = ModelConfig(n_layers=30, dim=576, n_heads=9, n_kv_heads=3)  # SmolLM2-135M's KV shape
    assert kv_bytes_per_token(c, "float32") / kv_bytes_per_token(c, "int8") > 3.7
    assert kv_bytes_per_token(c, "bfloat16") / kv_bytes_per_token(c, "int8") > 1.85
    budget = dict(block_size=16, kv_memory_mb=64)
    assert num_blocks_for(c, EngineConfig(**budget, kv_dtype="int8")) > 1.85 * num_blocks_for(
        c, EngineConfig(**budget, kv_dtype="bfloat16"))
