"""Parity with llama.cpp (llama-cpp-python, built from source; not a dependency) on the real
SmolLM2 GGUF. Slow: run with `python -m pytest -m slow tests/test_llamacpp_parity.py`."""

import importlib.util
import pathlib

import pytest

from hpllm.checkpoints.registry import load_model
from hpllm.train.data import shakespeare_validation_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = pathlib.Path(__file__).parents[1] / "bench" / "llamacpp_parity.py"
    spec = importlib.util.spec_from_file_location("llamacpp_parity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load_model("smollm2-135m", progress=False)
    llm = llama_cpp.Llama(str(model.path), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    return bench, model, llm


def test_token_ids_equal_llama_cpp(setup):
    bench, model, llm = setup
    chunks = [t[:2000] for t in shakespeare_validation_texts()[:5]]
    same, mismatches = bench.tokenizer_parity(model, llm, bench.TEXTS + chunks)
    assert same == len(bench.TEXTS) + len(chunks), "\n".join(mismatches)


def test_next_token_logits_agree_with_llama_cpp(setup):
    bench, model, llm = setup
    text = shakespeare_validation_texts()[2]
    tokens = llm.tokenize(text[5000:9000].encode(), add_bos=False, special=False)[:256]
    r = bench.logits_parity(model, llm, tokens)
    assert r["positions"] == 256
    assert r["top1"] >= 0.95 and r["cos_min"] >= 0.99, r
