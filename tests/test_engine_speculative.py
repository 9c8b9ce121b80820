"""Speculative decoding inside the paged, continuously batched engine (hpllm.infer.speculative):
greedy output equals plain greedy decoding, sampled output is distributed as the target's,
and the block pool, preemption, forks and stop conditions still hold."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import CFG, _last_logits, _prompts, _run, greedy_reference
from test_speculative import _exact_sequence_probs, chi_square_p, six_token_model

from hpllm.config import ConfigError, EngineConfig, ModelConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.sampling import SamplingParams
from hpllm.model.transformer import init_params


# One pool shape (and one small one for preemption) across the module's tests, so that their
# engines share compiled passes.
POOL = dict(block_size=4, num_blocks=300)
SMALL_POOL = dict(block_size=4, num_blocks=30, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def assert_greedy_equal(params, prompt, got, want):
    """Token-for-token equality, except that a first difference is allowed where the
    reference's two candidates are tied to float32 rounding (the engine scores a draft row
    in a wider pass than the reference; the sums round differently). Nothing after it is
    compared."""
    diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diff is None:
        assert len(got) == len(want)
        return
    tokens = list(prompt) + want[:diff]
    padded = jnp.asarray([tokens + [0] * (CFG.max_seq_len - len(tokens))], jnp.int32)
    logits = np.asarray(_last_logits(params, padded, len(tokens)))
    gap = abs(logits[want[diff]] - logits[got[diff]])
    assert gap < 1e-4, f"token {diff}: {got[diff]} instead of {want[diff]} (logit gap {gap})"


@pytest.mark.parametrize("name,engine_config", [
    ("ngram", EngineConfig(**POOL, speculative="ngram")),
    pytest.param("ngram fixed gamma 2", EngineConfig(**POOL, speculative="ngram",
                                                     num_speculative_tokens=2,
                                                     speculative_adaptive=False),
                 marks=pytest.mark.slow),  # the default set keeps adaptive n-gram and self
    ("self", EngineConfig(**POOL, speculative="self", draft_layers=1, num_speculative_tokens=3)),
    pytest.param("ngram preemption", EngineConfig(**SMALL_POOL, speculative="ngram"),
                 marks=pytest.mark.slow),
    ("self preemption", EngineConfig(**SMALL_POOL, speculative="self", draft_layers=1)),
])
def test_greedy_speculative_engine_equals_greedy_decoding(params, name, engine_config):
    prompts = _prompts(len(name), 5)
    max_tokens = [int(n) for n in np.random.default_rng(2).integers(20, 64, len(prompts))]
    engine = EngineCore(params, CFG, None, engine_config)
    outs = _run(engine, prompts, [SamplingParams(temperature=0, max_tokens=m)
                                  for m in max_tokens])
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert_greedy_equal(params, prompt, out.outputs[0].token_ids,
                            greedy_reference(params, prompt, m))
    stats = engine.stats()
    assert stats["generation_tokens"] == sum(max_tokens)
    # drafts were scored and some accepted (random models fall into cycles n-grams catch)
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    # every accepted draft saved a target pass: fewer decode rows than tokens
    assert stats["spec_rounds"] > 0
    if "preemption" in name:
        assert stats["preemptions"] > 0


DRAFT_CFG = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                        max_seq_len=128, init_std=0.2)


@pytest.mark.parametrize("name,engine_config,shared", [
    ("draft", EngineConfig(**POOL, speculative="draft", max_num_seqs=3), 13),
    pytest.param("draft preemption", EngineConfig(**SMALL_POOL, speculative="draft"), 0,
                 marks=pytest.mark.slow),
])
def test_greedy_draft_model_speculation_equals_greedy_decoding(params, name, engine_config,
                                                               shared):
    # A separate draft with its own pool: it catches up on prompts (and on prefix-cache hits
    # and preempted sequences) before proposing. The draft is the target's own weights cut
    # to one layer, so it agrees often enough for accepted runs.
    draft_params = {**params, "layers": jax.tree.map(lambda a: a[:1], params["layers"])}
    draft_config = dataclasses.replace(CFG, n_layers=1)
    prompts = _prompts(len(name), 5, shared)
    engine = EngineCore(params, CFG, None, engine_config, draft=(draft_params, draft_config))
    outs = _run(engine, prompts, [SamplingParams(temperature=0, max_tokens=40)] * len(prompts))
    for prompt, out in zip(prompts, outs):
        assert_greedy_equal(params, prompt, out.outputs[0].token_ids,
                            greedy_reference(params, prompt, 40))
    stats = engine.stats()
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    if shared:
        assert stats["prefix_hits"] > 0
    else:
        assert stats["preemptions"] > 0


def test_int8_kv_self_speculation_equals_the_int8_engine(params):
    prompts = _prompts(3, 4)
    sp = [SamplingParams(temperature=0, max_tokens=40)] * len(prompts)
    plain = _run(EngineCore(params, CFG, None, EngineConfig(**POOL, kv_dtype="int8")),
                 prompts, sp)
    spec = _run(EngineCore(params, CFG, None, EngineConfig(
        **POOL, kv_dtype="int8", speculative="self", draft_layers=1)), prompts, sp)
    for a, b in zip(plain, spec):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids


def test_stop_inside_an_accepted_run_and_mixed_requests(params):
    # A cyclic prompt the n-gram draft continues exactly, so several drafts are accepted per
    # step; the stop token sits in the middle of such a run and must end the output there.
    prompt = _prompts(8, 1)[0]
    free_run = greedy_reference(params, prompt, 40)
    cyclic = prompt + free_run  # the continuation is in the context: the n-gram finds it
    after = greedy_reference(params, cyclic, 30)
    stop = after[7]
    first = after.index(stop)
    engine = EngineCore(params, CFG, None, EngineConfig(**POOL, speculative="ngram"))
    penalised = SamplingParams(temperature=0.7, max_tokens=12, seed=5, repetition_penalty=1.3)
    with_logprobs = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    outs = _run(engine, [cyclic, prompt, prompt],
                [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop]),
                 penalised, with_logprobs])
    out = outs[0].outputs[0]
    assert out.token_ids == after[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # requests that cannot speculate decode normally in the same batch, unchanged
    plain = _run(EngineCore(params, CFG, None, EngineConfig(**POOL)),
                 [prompt, prompt], [penalised, with_logprobs])
    assert outs[1].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == plain[1].outputs[0].token_ids
    assert [d["token_id"] for d in outs[2].outputs[0].logprobs] == outs[2].outputs[0].token_ids


def test_seeded_speculative_samples_do_not_depend_on_the_batch(params):
    prompt = _prompts(5, 1)[0]
    sp = SamplingParams(temperature=0.9, top_k=20, max_tokens=16, seed=3)
    config = EngineConfig(**POOL, speculative="self", draft_layers=1)
    alone = _run(EngineCore(params, CFG, None, config), [prompt], [sp])[0]
    crowd = _run(EngineCore(params, CFG, None, config), _prompts(6, 3) + [prompt],
                 [SamplingParams(temperature=1.0, max_tokens=9)] * 3 + [sp])[3]
    assert alone.outputs[0].token_ids == crowd.outputs[0].token_ids


def test_parallel_samples_with_speculation_copy_shared_blocks(params):
    prompt = [(7 * i) % CFG.vocab_size for i in range(37)]  # ends inside a block of 4
    engine = EngineCore(params, CFG, None, EngineConfig(**POOL, speculative="self",
                                                        draft_layers=1))
    out = _run(engine, [prompt], [SamplingParams(n=4, temperature=1.0, max_tokens=20,
                                                 seed=11)])[0]
    assert engine.blocks.stats.copies >= 3  # each sample copied the shared partial block
    assert all(len(o.token_ids) == 20 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.stats()["spec_proposed"] > 0


@pytest.mark.parametrize("method,sampling,samples", [
    ("self", dict(temperature=1.0), 1000),
    pytest.param("ngram", dict(temperature=0.8, top_k=4), 1500, marks=pytest.mark.slow),
])
def test_speculative_engine_samples_are_distributed_as_the_target(method, sampling, samples):
    config, params = six_token_model()
    prompt = [1, 4, 2, 1, 4]
    n_new = 3
    exact = _exact_sequence_probs(config, params, prompt, n_new, sampling)
    engine = EngineCore(params, config, None, EngineConfig(
        block_size=4, num_blocks=600, max_num_seqs=128, max_num_batched_tokens=1024,
        speculative=method, draft_layers=1, num_speculative_tokens=2))
    sp = [SamplingParams(max_tokens=n_new, seed=seed, **sampling) for seed in range(samples)]
    outs = _run(engine, [prompt] * samples, sp)
    counts = np.zeros(6 ** n_new)
    for out in outs:
        counts[np.ravel_multi_index(out.outputs[0].token_ids, (6,) * n_new)] += 1
    stats = engine.stats()
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]  # both branches ran
    assert chi_square_p(counts, exact) > 1e-3


def test_bad_speculative_configs_raise_clear_errors(params):
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineCore(params, CFG, None, EngineConfig(speculative="medusa"))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineCore(params, CFG, None, EngineConfig(speculative="ngram", num_speculative_tokens=0))
    with pytest.raises(ConfigError, match="draft_layers"):
        EngineCore(params, CFG, None, EngineConfig(speculative="self", draft_layers=2))
    with pytest.raises(ConfigError, match="vocabulary"):
        small = dataclasses.replace(CFG, vocab_size=50, n_layers=1)
        EngineCore(params, CFG, None, EngineConfig(speculative="draft"),
                   draft=(init_params(small, jax.random.key(1)), small))
    with pytest.raises(ConfigError, match="unroll_layers"):
        EngineCore(params, CFG, None, EngineConfig(speculative="self", unroll_layers=False))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "self"])
def test_smollm2_speculative_engine_equals_generate(method):
    from hpllm.infer.generate import generate
    from hpllm.infer.llm import LLM

    llm = LLM("smollm2-135m", block_size=16, kv_memory_mb=64, max_num_batched_tokens=64,
              speculative=method, draft_layers=10)
    tok, model = llm.model.tokenizer, llm.model
    prompts = ["To be, or not to be, that is the question: Whether 'tis nobler in the mind "
               "to suffer, to be, or not to be", "Once upon a time,"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    for prompt, out in zip(prompts, outs):
        ref = list(generate(model.params, model.config, tok.encode(prompt), 32,
                            stop_ids=tok.stop_ids))
        assert out.outputs[0].token_ids == ref, prompt
    assert llm.engine.stats()["spec_proposed"] > 0
    llm.engine.blocks.check_no_leak()
