import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from hpllm.config import make_config
from hpllm.infer.generate import generate
from hpllm.infer.speculative.accept import accept_reject, filtered_probs
from hpllm.infer.speculative.control import CostModelGamma, SpeculativeStats
from hpllm.infer.speculative.proposers import DraftError, NgramDraft
from hpllm.infer.speculative.single_stream import model_draft, self_draft, speculative_generate
from hpllm.model.transformer import forward, init_params


def _random_dists(key, rows, vocab, sharpness=2.0, zero_some=True):
    logits = sharpness * jax.random.normal(key, (rows, vocab))
    if zero_some:  # tokens one side cannot produce: exercises p = 0 and q = 0 entries
        logits = logits.at[0, 0].set(-jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def test_accept_reject_first_token_is_distributed_as_p_exactly():
    # Integrate the pure function over all its random inputs: the draft token x ~ q (exact
    # weights) and both uniforms on a midpoint grid (error O(1/n) per cell).
    vocab, n = 5, 400
    p = _random_dists(jax.random.key(0), 2, vocab)
    q = _random_dists(jax.random.key(1), 1, vocab)
    q = q.at[0, 3].set(0.0)
    q = q / q.sum()
    grid = (jnp.arange(n) + 0.5) / n
    ua, un = [g.ravel() for g in jnp.meshgrid(grid, grid)]

    def outcome(x):
        draft = jnp.asarray([x], jnp.int32)
        nacc, tok = jax.vmap(lambda a, b: accept_reject(p, q, draft, a[None], b))(ua, un)
        first = jnp.where(nacc > 0, x, tok)
        return jnp.zeros(vocab).at[first].add(1.0 / ua.size)

    dist = sum(float(q[0, x]) * outcome(x) for x in range(vocab))
    np.testing.assert_allclose(np.asarray(dist), np.asarray(p[0]), atol=4.0 / n)


@pytest.mark.parametrize("padded", [False, True])
def test_accept_reject_every_emitted_position_is_distributed_as_p(padded):
    # Context-independent p rows: the token emitted at step j (when the call gets that far) is
    # p[j]-distributed. Many sampled calls, chi-square per position. padded: a random number
    # of the g drafts are real (n_proposed), as for batch rows with shorter proposals.
    vocab, g, samples = 6, 3, 30000
    p = _random_dists(jax.random.key(2), g + 1, vocab)
    q = _random_dists(jax.random.key(3), g, vocab, sharpness=1.0, zero_some=False)

    def one(key):
        kd, ka, kn, kp = jax.random.split(key, 4)
        draft = jax.vmap(jax.random.categorical)(jax.random.split(kd, g), jnp.log(q))
        n_prop = jax.random.randint(kp, (), 0, g + 1) if padded else None
        nacc, tok = accept_reject(p, q, draft.astype(jnp.int32), jax.random.uniform(ka, (g,)),
                                  jax.random.uniform(kn), n_prop)
        emitted = jnp.where(jnp.arange(g + 1) < nacc, jnp.append(draft, 0), -1)
        return emitted.at[nacc].set(tok), nacc <= (g if n_prop is None else n_prop)

    out, within = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(100), samples))
    out = np.asarray(out)
    assert np.asarray(within).all()  # padding drafts are never accepted
    for j in range(g + 1):
        col = out[:, j][out[:, j] >= 0]
        assert col.size > 900
        counts = np.bincount(col, minlength=vocab)
        expected = np.asarray(p[j], np.float64) * col.size
        assert counts[expected == 0].sum() == 0  # never a token p forbids
        keep = expected > 0
        chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert scipy_stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, (j, counts, expected)


def test_accept_reject_greedy_keeps_the_matching_prefix():
    vocab = 7
    target = jnp.asarray([3, 1, 4, 1])
    p = jax.nn.one_hot(target, vocab)
    for draft in ([3, 1, 4], [3, 2, 4], [0, 1, 4]):
        q = jax.nn.one_hot(jnp.asarray(draft), vocab)
        n, tok = accept_reject(p, q, jnp.asarray(draft), jnp.full((3,), 0.999), jnp.float32(0.5))
        expect = next((i for i in range(3) if draft[i] != int(target[i])), 3)
        assert int(n) == expect and int(tok) == int(target[expect])


def test_filtered_probs_applies_temperature_top_k_top_p():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5, -1.0]])
    assert np.asarray(filtered_probs(logits, 0.0)).tolist() == [[0, 1, 0, 0, 0]]
    probs = np.asarray(filtered_probs(logits, 0.5, top_k=2))[0]
    ref = np.exp(np.asarray([3.0, 2.5]) / 0.5)
    np.testing.assert_allclose(probs[[1, 3]], ref / ref.sum(), rtol=1e-6)
    assert probs[[0, 2, 4]].sum() == 0
    # softmax = [.028, .553, .075, .335, .010]: top-p 0.5 keeps token 1, 0.9 keeps 1, 3, 2
    assert np.asarray(filtered_probs(logits, 1.0, top_p=0.5)).tolist() == [[0, 1, 0, 0, 0]]
    probs = np.asarray(filtered_probs(logits, 1.0, top_p=0.9))[0]
    ref = np.exp(np.asarray([3.0, 1.0, 2.5]))
    np.testing.assert_allclose(probs[[1, 2, 3]], ref / ref.sum(), rtol=1e-6)


@pytest.fixture(scope="module")
def model():
    config = make_config("tiny", ["--vocab_size=97", "--max_seq_len=64", "--seq_len=64",
                                  "--n_layers=3"]).model
    params = init_params(config, jax.random.key(3))
    params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)
    return config, params


def _drafts(config, params):
    small = make_config("tiny", ["--vocab_size=97", "--max_seq_len=64", "--seq_len=64",
                                 "--dim=32", "--n_layers=1", "--n_heads=2",
                                 "--n_kv_heads=1"]).model
    student = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p,
                           init_params(small, jax.random.key(9)))
    return {"self-1": self_draft(params, config, 1), "self-2": self_draft(params, config, 2),
            "ngram": NgramDraft(config.vocab_size),
            "draft": model_draft(student, small, config)}


@pytest.mark.parametrize("gamma,adaptive,cpu_kernel", [
    (3, False, True), (2, True, True), pytest.param(1, False, False, marks=pytest.mark.slow),
    pytest.param(3, False, False, marks=pytest.mark.slow),
    pytest.param(2, "heuristic", None, marks=pytest.mark.slow)])
def test_greedy_speculative_equals_greedy_target(model, gamma, adaptive, cpu_kernel):
    # cpu_kernel=True: target and model drafts through the fused CPU decoder (a verify pass is
    # one kernel step of gamma + 1 rows; rejected drafts' K/V are overwritten later), False:
    # XLA with dense caches. Plain greedy decoding runs through the kernel either way.
    config, params = model
    # a repeating prompt gives the n-gram draft matches to propose
    prompt = [5, 17, 42, 8, 61, 5, 17, 42, 3, 9, 5, 17]
    want = list(generate(params, config, prompt, 32, cpu_kernel=True))
    assert len(set(want)) > 3
    drafts = _drafts(config, params)
    if adaptive is True:  # the cost model's choices: the deep and the cheap draft suffice
        drafts = {k: drafts[k] for k in ("ngram", "draft")}
    for name, draft in drafts.items():
        st = SpeculativeStats()
        got = list(speculative_generate(params, config, prompt, 32, draft, gamma=gamma,
                                        adaptive=adaptive, max_gamma=5, stats=st,
                                        cpu_kernel=cpu_kernel))
        assert got == want, name
        assert st.generated == len(want) and st.rounds < len(want)
        assert st.proposed >= st.accepted
        if name != "ngram":
            assert draft.on_kernel == bool(cpu_kernel), name


def test_speculative_stops_at_stop_ids_and_context_end(model):
    config, params = model
    prompt = [1, 2, 3, 1, 2]
    full = list(generate(params, config, prompt, 200))
    assert len(full) == config.max_seq_len - len(prompt)
    draft = NgramDraft(config.vocab_size)
    assert list(speculative_generate(params, config, prompt, 200, draft, gamma=4)) == full
    stop = full[6]
    first = full.index(stop)
    got = list(speculative_generate(params, config, prompt, 200, self_draft(params, config, 1),
                                    gamma=4, stop_ids=(stop,)))
    assert got == full[:first + 1]


def test_bad_arguments_raise_clear_errors(model):
    config, params = model
    with pytest.raises(DraftError, match="draft_layers"):
        self_draft(params, config, 3)
    with pytest.raises(DraftError, match="vocabulary"):
        model_draft(params, config, make_config("tiny").model)
    with pytest.raises(ValueError, match="gamma"):
        next(speculative_generate(params, config, [1, 2], 4, NgramDraft(97), gamma=0))
    with pytest.raises(ValueError, match="non-empty"):
        next(speculative_generate(params, config, [], 4, NgramDraft(97)))


def test_cost_model_gamma_follows_the_measured_costs():
    def settle(verify, draft_s, accept):
        """The controller after 30 rounds with verify(g) seconds per pass, draft_s per draft
        token, and acceptance `accept` (a callable: accepted count of a g-token proposal)."""
        c = CostModelGamma(2, 6)
        for _ in range(30):
            g = c.gamma
            c.measured(g, g * draft_s, verify(g))
            c.update(accept(g), g)
        return c

    always = lambda g: g
    # a memory-bound pass (5% per extra row) and a free draft that is always right: deep
    assert settle(lambda g: 1 + 0.05 * g, 0.0, always).gamma == 6
    # the same pass with a draft that costs as much as the target: never worth a second draft
    assert settle(lambda g: 1 + 0.05 * g, 1.0, always).gamma == 1
    # a pass that costs g + 1 decode steps cannot pay for drafts rejected half the time
    half = settle(lambda g: 1.0 + g, 0.0, lambda g: 0)
    assert half.gamma == 1 and half.alpha < 0.1
    # alpha ~ 0.5 and a cheap wide pass: a few drafts, fewer than for a perfect draft
    c = settle(lambda g: 1 + 0.05 * g, 0.02, lambda g: min(g, 1))
    assert 0.3 < c.alpha < 0.7 and 1 < c.gamma < 6
    v0, v1 = c.verify_line()
    assert v0 == pytest.approx(1.0, rel=1e-6) and v1 == pytest.approx(0.05, rel=1e-5)


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    d = NgramDraft(50, max_ngram=3)
    assert d.lookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert d.lookup([4, 5, 6, 4], 5) == [5, 6, 4]  # falls back to a 1-gram
    assert d.lookup([1, 2, 3], 3) == []


def _exact_sequence_probs(config, params, prompt, n_new, sampling):
    """The target's probability of every continuation of length n_new (V ** n_new), each
    factor from one full forward of the sequence (no cache): the slow, obvious reference."""
    vocab = config.vocab_size
    seqs = np.asarray(list(itertools.product(range(vocab), repeat=n_new)), np.int32)
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    positions = jnp.arange(full.shape[1])[None]
    logits = forward(params, jnp.asarray(full), jnp.broadcast_to(positions, full.shape),
                     config)[0]
    probs = np.asarray(filtered_probs(logits, **sampling), np.float64)
    out = np.ones(len(seqs))
    for j in range(n_new):
        out *= probs[np.arange(len(seqs)), len(prompt) - 1 + j, seqs[:, j]]
    return out


def six_token_model():
    """A 6-token vocabulary, so that all 216 three-token continuations can be enumerated
    exactly; weights scaled up so its distributions are far from uniform."""
    config = make_config("tiny", ["--vocab_size=6", "--max_seq_len=16", "--seq_len=16",
                                  "--n_layers=2", "--dim=32", "--n_heads=2",
                                  "--n_kv_heads=1"]).model
    return config, jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p,
                                init_params(config, jax.random.key(11)))


@pytest.mark.parametrize("draft_name,sampling,samples", [
    ("self-1", dict(temperature=1.0), 800),
    pytest.param("ngram", dict(temperature=0.8, top_k=4), 1500, marks=pytest.mark.slow),
    pytest.param("draft", dict(temperature=1.0, top_p=0.9), 1500, marks=pytest.mark.slow),
])
def test_speculative_sampling_is_distributed_as_target_sampling(draft_name, sampling, samples):
    config, params = six_token_model()
    small = make_config("tiny", ["--vocab_size=6", "--max_seq_len=16", "--seq_len=16",
                                 "--dim=16", "--n_layers=1", "--n_heads=1",
                                 "--n_kv_heads=1"]).model
    student = jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p,
                           init_params(small, jax.random.key(12)))
    draft = {"self-1": self_draft(params, config, 1), "ngram": NgramDraft(6, max_ngram=2),
             "draft": model_draft(student, small, config)}[draft_name]
    prompt = [1, 4, 2, 1, 4]
    n_new = 3
    exact = _exact_sequence_probs(config, params, prompt, n_new, sampling)
    counts = np.zeros(6 ** n_new)
    st = SpeculativeStats()
    for seed in range(samples):
        out = list(speculative_generate(params, config, prompt, n_new, draft, gamma=2,
                                        seed=seed, stats=st, **sampling))
        counts[np.ravel_multi_index(out, (6,) * n_new)] += 1
    assert st.accepted > 0 and st.accepted < st.proposed  # both branches ran
    assert chi_square_p(counts, exact) > 1e-3


def chi_square_p(counts, exact) -> float:
    """p-value of observed counts against exact probabilities; a count in a zero-probability
    cell fails at once. Rare cells are pooled into one so that (nearly) every expected count
    is >= 5."""
    assert counts[exact == 0].sum() == 0
    expected = exact * counts.sum()
    rare = expected < 5
    pooled_e = np.append(expected[~rare], expected[rare].sum())
    pooled_c = np.append(counts[~rare], counts[rare].sum())
    keep = pooled_e > 0
    chi2 = ((pooled_c[keep] - pooled_e[keep]) ** 2 / pooled_e[keep]).sum()
    return scipy_stats.chi2.sf(chi2, keep.sum() - 1)


@pytest.mark.slow
def test_greedy_speculative_equals_greedy_target_on_smollm2():
    from hpllm.checkpoints.registry import load_model

    m = load_model("smollm2-135m", progress=False)
    prompt = m.tokenizer.encode("To be, or not to be, that is the question: whether 'tis "
                                "nobler in the mind to suffer, to be, or not to be")
    want = list(generate(m.params, m.config, prompt, 32))
    for draft in (NgramDraft(m.config.vocab_size), self_draft(m.params, m.config, 10)):
        got = list(speculative_generate(m.params, m.config, prompt, 32, draft, gamma=3))
        assert got == want, draft.name
