"""Parity with HF transformers (PyTorch, float32; not dependencies of hpllm) loading the same
SmolLM2 GGUF. Slow: run with `python -m pytest -m slow tests/test_hf_transformers_parity.py`."""

import importlib.util
import pathlib

import pytest

from hpllm.checkpoints.registry import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
    path = pathlib.Path(__file__).parents[1] / "bench" / "hf_parity.py"
    spec = importlib.util.spec_from_file_location("hf_parity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load_model("smollm2-135m", progress=False)
    return bench, model, bench.load_hf(model.path)


def test_logits_agree_with_transformers(setup):
    bench, model, hf = setup
    r = bench.logits_parity(model, hf, bench.text_tokens(model, 256))
    assert r["positions"] == 256
    assert r["max_rel"] <= 1e-3, r
    assert r["top1"] == 1.0, r


def test_greedy_64_tokens_identical_to_transformers(setup):
    bench, model, hf = setup
    g = bench.greedy_parity(model, hf, 64)
    assert g["ours"] == g["theirs"], (g["same"], g["text"])
    assert g["text"].startswith(" Paris")
