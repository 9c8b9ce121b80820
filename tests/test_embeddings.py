"""/v1/embeddings through the real `openai` client against a real server: each embedding
equals the mean over its tokens of the final-normed hidden state of a float64 NumPy Llama
(tests/llama_numpy.py, written from the published conventions), L2-normalised; batching and
padding change nothing; base64 decodes to the float vectors; bad input is a 400 naming it.

The model is test_serve's random tiny Llama with SmolLM2's tokenizer (one server per module).
"""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from hpllm.infer.embeddings import Embedder, EmbeddingError
from llama_numpy import llama_logits
from numerics import rel_err
from test_serve import NAME, model, model_dir, running_server  # noqa: F401 (fixtures)

# ids of odd lengths (1, 7, 23, 40) drawn from the vocabulary: padding to 16/32/64 is needed
RNG = np.random.default_rng(7)
IDS = [RNG.integers(0, 49152, n).tolist() for n in (1, 7, 23, 40)]


@pytest.fixture(scope="module")
def srv(model):  # noqa: F811
    with running_server(model) as s:
        yield s


@pytest.fixture(scope="module")
def reference(model_dir):  # noqa: F811
    """The embedding of token ids by the float64 reference, one input at a time."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    dim = tensors["model.norm.weight"].shape[0]
    # an identity "output projection" makes the reference return the final-normed states
    get = {**tensors, "lm_head.weight": np.eye(dim)}.__getitem__

    def embed(ids):
        hidden = llama_logits(get, n_layers=2, n_heads=4, n_kv_heads=2, eps=1e-5,
                              theta=10000.0, tokens=ids, tied=False)
        mean = hidden.mean(axis=0)
        return mean / np.linalg.norm(mean)

    return embed


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def test_embeddings_equal_the_reference(srv, reference):
    # the client's default asks for base64 and decodes it; a batch of ids of odd lengths
    r = srv.client.embeddings.create(model=NAME, input=IDS)
    got = _vectors(r)
    assert got.shape == (len(IDS), 64) and r.model == NAME
    for ids, vector in zip(IDS, got, strict=True):
        assert rel_err(vector, reference(ids)) < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, IDS))


def test_batching_and_formats_change_nothing(srv, model):  # noqa: F811
    batch = _vectors(srv.client.embeddings.create(model=NAME, input=IDS,
                                                  encoding_format="float"))
    for ids, vector in zip(IDS, batch, strict=True):
        alone = _vectors(srv.client.embeddings.create(model=NAME, input=ids,
                                                      encoding_format="float"))[0]
        np.testing.assert_allclose(alone, vector, rtol=0, atol=2e-6)
    # base64 is the same float32 values, little-endian, exactly
    raw = httpx.post(f"{srv.url}/v1/embeddings", timeout=120,
                     json={"input": IDS, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in raw["data"]])
    assert np.array_equal(decoded, batch.astype(np.float32))
    # text is embedded as its tokens; dimensions equal to the model's is accepted
    text = "The quick brown fox"
    ids = model.tokenizer.encode(text)
    by_text = srv.client.embeddings.create(model=NAME, input=[text], dimensions=64,
                                           user="someone")
    by_ids = srv.client.embeddings.create(model=NAME, input=[ids])
    assert np.array_equal(_vectors(by_text), _vectors(by_ids))
    assert by_text.usage.prompt_tokens == len(ids)


def test_padding_and_batch_splits_change_nothing(srv):
    """Passes of several lengths and row counts (a small token budget forces the splits):
    every input's embedding is the one it has alone."""
    # the server's parameters (layers unstacked, as the engine keeps them): most pass shapes
    # are then compiled already
    embedder = Embedder(srv.core.model.params, srv.core.config, max_len=64,
                        max_batch_tokens=64)
    inputs = IDS + [IDS[1][:3], IDS[3][:33]]
    passes = embedder.batches([len(x) for x in inputs])
    assert len(passes) > 1 and sorted(i for _, rows in passes for i in rows) == list(
        range(len(inputs)))
    assert all(len(rows) * width <= 64 for width, rows in passes)
    together = embedder(inputs)
    for ids, vector in zip(inputs, together, strict=True):
        np.testing.assert_allclose(embedder([ids])[0], vector, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)
    with pytest.raises(EmbeddingError, match="at most 64"):
        embedder([[1] * 65])


@pytest.mark.slow  # ~13 s: compiles the engine's generation passes
def test_embeddings_run_beside_generation(srv):
    """Embeddings (on their own thread) and completions (on the engine's) at once give what
    each gives alone."""
    def completion():
        return srv.client.completions.create(model=NAME, prompt="Once upon a time",
                                             max_tokens=12, temperature=0).choices[0].text

    def embedding():
        return _vectors(srv.client.embeddings.create(model=NAME, input=IDS))

    text, vectors = completion(), embedding()
    with ThreadPoolExecutor(6) as pool:
        texts = [pool.submit(completion) for _ in range(3)]
        embeddings = [pool.submit(embedding) for _ in range(3)]
        assert all(t.result() == text for t in texts)
        assert all(np.array_equal(e.result(), vectors) for e in embeddings)


@pytest.mark.parametrize("body,param,needle", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "input 1 is empty"),
    ({"input": [[1, 2], []]}, "input", "input 1 is empty"),
    ({"input": [5, 10**8]}, "input", "10000000"),
    ({"input": [1] * 513}, "input", "at most 512"),
    ({"input": "hello " * 600}, "input", "512"),
    ({"input": "x", "dimensions": 32}, "dimensions", "64"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": 5}, "input", ""),
    ({"input": [True]}, "input", ""),
])
def test_bad_embedding_requests_are_400s_naming_the_field(srv, body, param, needle):
    r = httpx.post(f"{srv.url}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    assert httpx.post(f"{srv.url}/v1/embeddings", json={"input": "still fine"},
                      timeout=60).status_code == 200


def test_unknown_model_is_404(srv):
    r = httpx.post(f"{srv.url}/v1/embeddings", json={"input": "x", "model": "ada-002"},
                   timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
