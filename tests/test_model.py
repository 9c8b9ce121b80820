"""Model-correctness tests: the JAX decoder against an independent float64 NumPy reference.

The reference (tests/reference_model.py) is written from the Llama specification, not from
hpllm/model: explicit loops over rows and heads, index-causal masking within a segment (the
JAX code masks by position value), per-head K/V selection by index arithmetic. Inputs are
packed rows of 2-3 documents whose positions restart at 0 at each document start, which is
the regime in which the two masking rules must agree. (RoPE is shift-invariant, so rotating
by sequence index instead of position is invisible there; the KV-cache tests, which decode
single tokens at absolute positions, are what pin RoPE to the position values.)

Tolerances
----------
* float32 vs float64: we report max|jax - ref| / max|ref| (error relative to the logit
  scale). float32 has unit roundoff 6e-8; every logit is the end of a chain of a few dozen
  length-<=48 dot products, softmaxes and norms, so honest float32 error is ~1e-7..1e-6 of the
  logit scale. We require < 1e-5: an order of magnitude of headroom, while any semantic
  mistake (RoPE pairing, GQA head mapping, mask off-by-one, norm eps placement, tie
  transpose, ...) moves logits by 1e-3..1 of their scale.
* bfloat16 compute: unit roundoff 2^-9 = 2e-3, and parameters and activations are rounded
  at every matmul and residual add. With peaked attention over 3 layers this is not small:
  merely rounding the *parameters* to bf16 (exact float64 arithmetic otherwise) already
  moves the worst logit by up to ~5% of the logit scale, and the full bf16 forward pass
  shows max errors of 2.5-9.6% and mean errors of 0.4-0.7% (28 seeds/configs). We require
  max < 20% and mean < 1.5% of the logit scale; semantic bugs give errors of order 100%.
* Parameters are drawn with init_std = 0.3 (not the 0.02 default) and random norm weights,
  so attention is peaked rather than near-uniform: with tiny scores a RoPE or masking bug
  would move the logits by too little to see.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import ModelConfig
from hpllm.model.kv_cache import DenseKVCache
from hpllm.model.transformer import count_params, forward, init_params, param_axes, param_shapes
from hpllm.train.step import UNROLL_LAYERS, training_logits
from numerics import rel_err

_spec = importlib.util.spec_from_file_location(
    "hpllm_tests_reference_model", pathlib.Path(__file__).with_name("reference_model.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

F32_TOL = 1e-5
BF16_MAX_TOL = 0.2
BF16_MEAN_TOL = 1.5e-2

_fwd = jax.jit(forward, static_argnames=("config", "dtype"))


def remat_logits(params, tokens, positions, cfg, segment_ids, remat="none", dtype=jnp.float32):
    """The model in training form, with per-layer remat."""
    return training_logits(params, tokens, positions, cfg, segment_ids=segment_ids, dtype=dtype,
                           remat=remat)[0]


# --------------------------------------------------------------------------- helpers

def make_config(**kw) -> ModelConfig:
    base = dict(vocab_size=37, dim=48, n_layers=1, n_heads=6, n_kv_heads=6, ffn_dim=0,
                max_seq_len=16, pos_embedding="rope", tie_embeddings=True, init_std=0.3)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random parameters in init_params' layout (tree, shapes, dtypes from
    jax.eval_shape(init_params), which costs no compilation): matrices ~ N(0, init_std),
    norm weights ~ 1 + 0.4 N(0, 1) so that they are not all ones. (init_params' own values
    are checked in test_init_params_values.)"""
    rng = np.random.default_rng(seed + 1000)
    abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))

    def fill(path, leaf):
        assert leaf.dtype == jnp.float32
        if "norm" in jax.tree_util.keystr(path):
            w = 1.0 + 0.4 * rng.standard_normal(leaf.shape)
        else:
            w = cfg.init_std * rng.standard_normal(leaf.shape)
        return jnp.asarray(w, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def packed_batch(rng, cfg: ModelConfig, batch: int, seq: int, segments: bool = True):
    """tokens, positions, segment_ids (B, S) int32. Each row holds 2-3 documents (fewer when
    seq is short); positions restart at 0 at every document start; segment ids are distinct
    non-zero labels (not necessarily increasing)."""
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, seq))
    positions = np.zeros((batch, seq), np.int64)
    seg = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        n_docs = min(seq, int(rng.integers(2, 4))) if segments else 1
        cuts = np.sort(rng.choice(np.arange(1, seq), size=n_docs - 1, replace=False)) \
            if n_docs > 1 else np.array([], np.int64)
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), seq]
        labels = rng.permutation(np.arange(1, 10))[:n_docs]
        for s, e, lab in zip(starts, ends, labels):
            positions[b, s:e] = np.arange(e - s)
            seg[b, s:e] = lab
    return (jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
            jnp.asarray(seg, jnp.int32))


def jax_loss(params, tokens, positions, segment_ids, targets, mask, cfg, remat="none",
             dtype=jnp.float32):
    logits = remat_logits(params, tokens, positions, cfg, segment_ids, remat, dtype)
    lsm = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lsm, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


_loss_and_grad = jax.jit(jax.value_and_grad(jax_loss),
                         static_argnames=("cfg", "remat", "dtype"))


# ------------------------------------------------------- forward vs the NumPy reference

# Not a full Cartesian product (compile time); every listed axis value appears, in
# combinations: vocab 37/101, seq 1/7/13, batch 1/3, GQA ratio 1/2/3/6(MQA), tied/untied,
# rope/learned, ffn_dim odd 45 or automatic, 1/3 layers, two head counts, three rope thetas,
# two norm_eps (0.05 is comparable to mean(x^2), so where eps enters the norm is visible).
FORWARD_CASES = [
    dict(vocab_size=37, seq=7, batch=3, n_heads=6, n_kv_heads=6, tie_embeddings=True,
         pos_embedding="rope", ffn_dim=45, n_layers=1),
    dict(vocab_size=101, seq=13, batch=1, n_heads=6, n_kv_heads=3, tie_embeddings=False,
         pos_embedding="rope", ffn_dim=0, n_layers=3, norm_eps=0.05),
    dict(vocab_size=37, seq=13, batch=3, n_heads=6, n_kv_heads=2, tie_embeddings=True,
         pos_embedding="learned", ffn_dim=45, n_layers=3),
    dict(vocab_size=101, seq=1, batch=3, n_heads=6, n_kv_heads=1, tie_embeddings=False,
         pos_embedding="rope", ffn_dim=45, n_layers=1),
    dict(vocab_size=101, seq=7, batch=1, n_heads=6, n_kv_heads=1, tie_embeddings=True,
         pos_embedding="learned", ffn_dim=45, n_layers=3, norm_eps=0.05),
    dict(vocab_size=37, seq=1, batch=1, n_heads=6, n_kv_heads=2, tie_embeddings=False,
         pos_embedding="learned", ffn_dim=0, n_layers=1),
    dict(vocab_size=101, seq=13, batch=3, n_heads=6, n_kv_heads=2, tie_embeddings=False,
         pos_embedding="rope", ffn_dim=45, n_layers=3, rope_theta=50.0),
    dict(vocab_size=37, seq=7, batch=3, n_heads=6, n_kv_heads=3, tie_embeddings=False,
         pos_embedding="learned", ffn_dim=45, n_layers=1),
    dict(vocab_size=37, seq=13, batch=3, n_heads=4, n_kv_heads=2, dim=32, tie_embeddings=True,
         pos_embedding="rope", ffn_dim=45, n_layers=1, rope_theta=100.0, norm_eps=0.05),
    # segment_ids=None: one causal document per row, positions 0..S-1.
    dict(vocab_size=101, seq=13, batch=3, n_heads=6, n_kv_heads=3, tie_embeddings=True,
         pos_embedding="rope", ffn_dim=45, n_layers=1, segments=False),
]


def _case_id(c):
    return (f"V{c['vocab_size']}-S{c['seq']}-B{c['batch']}-H{c['n_heads']}K{c['n_kv_heads']}"
            f"-{'tied' if c['tie_embeddings'] else 'untied'}-{c['pos_embedding']}"
            f"-F{c['ffn_dim']}-L{c['n_layers']}" + ("" if c.get("segments", True) else "-noseg"))


@pytest.mark.parametrize("index,case", list(enumerate(FORWARD_CASES)),
                         ids=[_case_id(c) for c in FORWARD_CASES])
def test_forward_matches_numpy_reference(index, case):
    case = dict(case)
    seq, batch = case.pop("seq"), case.pop("batch")
    segments = case.pop("segments", True)
    cfg = make_config(**case)
    seed = 100 + index
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    tokens, positions, seg = packed_batch(rng, cfg, batch, seq, segments)
    if segments:
        logits, cache = _fwd(params, tokens, positions, cfg, segment_ids=seg)
        expected = ref.forward(ref.to_numpy64(params), tokens, positions, cfg, np.asarray(seg))
    else:
        logits, cache = _fwd(params, tokens, positions, cfg)
        expected = ref.forward(ref.to_numpy64(params), tokens, positions, cfg)
    assert cache is None
    assert logits.shape == (batch, seq, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    err = rel_err(logits, expected)
    print(f"forward f32 vs reference: rel err {err:.2e}")
    assert err < F32_TOL, f"float32 logits vs float64 reference: relative error {err:.3e}"


def test_segments_are_isolated():
    """Property check independent of the reference: a document's logits do not depend on the
    document packed before it in the same row."""
    cfg = make_config(vocab_size=37, n_heads=6, n_kv_heads=2, n_layers=2, ffn_dim=45)
    params = random_params(cfg, 7)
    rng = np.random.default_rng(7)
    doc_a = rng.integers(0, 37, size=5)
    doc_b = rng.integers(0, 37, size=6)
    other_a = rng.integers(0, 37, size=5)
    rows = np.stack([np.concatenate([doc_a, doc_b]), np.concatenate([other_a, doc_b])])
    positions = np.tile(np.concatenate([np.arange(5), np.arange(6)]), (2, 1))
    seg = np.tile(np.array([1] * 5 + [2] * 6), (2, 1))
    logits, _ = _fwd(params, jnp.asarray(rows, jnp.int32), jnp.asarray(positions, jnp.int32),
                     cfg, segment_ids=jnp.asarray(seg, jnp.int32))
    logits = np.asarray(logits)
    alone, _ = _fwd(params, jnp.asarray(doc_b[None], jnp.int32),
                    jnp.asarray(np.arange(6)[None], jnp.int32), cfg)
    alone = np.asarray(alone)[0]
    assert rel_err(logits[0, 5:], alone) < F32_TOL
    assert rel_err(logits[1, 5:], alone) < F32_TOL
    # and the first documents do differ (so the comparison above is not vacuous)
    assert rel_err(logits[0, :5], logits[1, :5]) > 1e-2


# ------------------------------------------------------------------- bfloat16 compute

# Same configs and shapes as two FORWARD_CASES, so the float32 comparison forward pass
# reuses a compiled program.
BF16_CASES = [FORWARD_CASES[6], FORWARD_CASES[2]]


@pytest.mark.parametrize("index,case", list(enumerate(BF16_CASES)),
                         ids=[_case_id(c) for c in BF16_CASES])
def test_bf16_forward_matches_reference(index, case):
    case = dict(case)
    seq, batch = case.pop("seq"), case.pop("batch")
    cfg = make_config(**case)
    seed = 200 + index
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    tokens, positions, seg = packed_batch(rng, cfg, batch, seq)
    logits, _ = _fwd(params, tokens, positions, cfg, segment_ids=seg, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32  # documented: logits in float32 whatever the dtype
    expected = ref.forward(ref.to_numpy64(params), tokens, positions, cfg, np.asarray(seg))
    got = np.asarray(logits, np.float64)
    scale = np.max(np.abs(expected))
    max_err = np.max(np.abs(got - expected)) / scale
    mean_err = np.mean(np.abs(got - expected)) / scale
    print(f"bf16 vs reference: max rel err {max_err:.2e}, mean rel err {mean_err:.2e}")
    assert max_err < BF16_MAX_TOL, f"bf16 max relative error {max_err:.3e}"
    assert mean_err < BF16_MEAN_TOL, f"bf16 mean relative error {mean_err:.3e}"
    # The compute dtype is honoured: bf16 logits are measurably not the float32 ones.
    f32, _ = _fwd(params, tokens, positions, cfg, segment_ids=seg)
    assert rel_err(got, f32) > 1e-5


# ---------------------------------------------------------------------------- remat

def _remat_policies(jaxpr) -> list:
    """The policy of every remat/checkpoint equation in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name:
            found.append(eqn.params.get("policy"))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else [value]):
                if hasattr(sub, "eqns"):
                    found += _remat_policies(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found += _remat_policies(sub.jaxpr)
    return found


def _loss_with_logits(params, tokens, positions, segment_ids, targets, mask, cfg, remat):
    logits = remat_logits(params, tokens, positions, cfg, segment_ids, remat)
    lsm = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lsm, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask), logits


_loss_grad_logits = jax.jit(jax.value_and_grad(_loss_with_logits, has_aux=True),
                            static_argnames=("cfg", "remat"))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_logits_and_gradients(remat):
    """Remat changes what is stored, never the math: logits to 1e-5 of their scale and
    gradients to 2e-5 of each leaf's scale (observed <= 1.2e-6 and <= 3.3e-6: only the float32
    operation order XLA picks differs). And the requested policy really is applied (else
    this comparison would pass vacuously)."""
    cfg = make_config(vocab_size=37, n_heads=6, n_kv_heads=2, n_layers=3, ffn_dim=45,
                      tie_embeddings=False)
    seed = 300 + (remat == "dots")
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    tokens, positions, seg = packed_batch(rng, cfg, 3, 11)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(3, 11)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 11)) < 0.7, jnp.float32)

    expected_policy = {"full": jax.checkpoint_policies.nothing_saveable,
                       "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    for mode in ("none", remat):
        jaxpr = jax.make_jaxpr(lambda p: remat_logits(p, tokens, positions, cfg, seg,
                                                      mode))(params)
        found = _remat_policies(jaxpr.jaxpr)
        if mode == "none":
            assert found == []
        else:
            # one remat per layer body: the scan's one, or each unrolled layer's (training
            # unrolls models of up to UNROLL_LAYERS layers)
            layers = cfg.n_layers if cfg.n_layers <= UNROLL_LAYERS else 1
            assert found == [expected_policy[mode]] * layers, found

    (base_loss, base_logits), base_grads = _loss_grad_logits(
        params, tokens, positions, seg, targets, mask, cfg=cfg, remat="none")
    (loss, logits), grads = _loss_grad_logits(
        params, tokens, positions, seg, targets, mask, cfg=cfg, remat=remat)
    print(f"remat={remat} logits rel err {rel_err(logits, base_logits):.2e}")
    assert rel_err(logits, base_logits) < 1e-5
    assert abs(float(loss) - float(base_loss)) <= 1e-5 * abs(float(base_loss))
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    worst = 0.0
    for (path, gb), g in zip(jax.tree_util.tree_leaves_with_path(base_grads),
                             jax.tree.leaves(grads)):
        assert float(jnp.max(jnp.abs(gb))) > 0, jax.tree_util.keystr(path)
        err = rel_err(g, gb)
        worst = max(worst, err)
        assert err < 2e-5, f"{jax.tree_util.keystr(path)}: remat={remat} grad rel err {err:.3e}"
    print(f"remat={remat} worst grad rel err (vs leaf scale) {worst:.2e}")


# ------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("pos_embedding,n_kv_heads,chunk", [("rope", 2, 1), ("learned", 1, 3)])
def test_kv_cache_prefill_then_decode(pos_embedding, n_kv_heads, chunk):
    cfg = make_config(vocab_size=101, n_heads=6, n_kv_heads=n_kv_heads, n_layers=2,
                      ffn_dim=45, pos_embedding=pos_embedding, tie_embeddings=False)
    seed = 400 + n_kv_heads + 10 * chunk
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    batch, total, prompt, cache_len = 2, 12, 5, 16  # cache longer than the text: empty slots
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, total)), jnp.int32)
    positions = jnp.tile(jnp.arange(total, dtype=jnp.int32), (batch, 1))

    full, _ = _fwd(params, tokens, positions, cfg)
    expected = ref.forward(ref.to_numpy64(params), tokens, positions, cfg)
    assert rel_err(full, expected) < F32_TOL

    cache = DenseKVCache.create(cfg, batch, cache_len)
    assert cache.k.shape == (cfg.n_layers, batch, cache_len, n_kv_heads, cfg.head_dim)
    got = []
    logits, cache = _fwd(params, tokens[:, :prompt], positions[:, :prompt], cfg, cache=cache)
    got.append(logits)
    for t in range(prompt, total, chunk):
        logits, cache = _fwd(params, tokens[:, t:t + chunk], positions[:, t:t + chunk], cfg,
                             cache=cache)
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert got.shape == full.shape
    err = rel_err(got, full)
    print(f"cached decode vs full forward: rel err {err:.2e}")
    assert err < F32_TOL, f"cached decode vs full forward: relative error {err:.3e}"
    assert rel_err(got, expected) < F32_TOL
    # slots past the text were never written
    assert float(jnp.max(jnp.abs(cache.k[:, :, total:]))) == 0.0


def test_kv_cache_rows_at_different_positions():
    """Two rows with prompts of different lengths share one cache; the short row is padded
    in the prefill (junk keys written at slots it has not reached yet) and each decode step
    feeds the two rows at different positions."""
    # the config and cache shape of test_kv_cache_prefill_then_decode[rope-2-1]: shared
    # compiled programs
    cfg = make_config(vocab_size=101, n_heads=6, n_kv_heads=2, n_layers=2, ffn_dim=45,
                      tie_embeddings=False)
    seed = 450
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    total, cache_len = 12, 16
    prompt_lens = [7, 3]
    seqs = rng.integers(0, cfg.vocab_size, size=(2, total))
    full, _ = _fwd(params, jnp.asarray(seqs, jnp.int32),
                   jnp.tile(jnp.arange(total, dtype=jnp.int32), (2, 1)), cfg)
    full = np.asarray(full)

    width = max(prompt_lens)
    pre_tokens = seqs[:, :width].copy()
    pre_tokens[1, prompt_lens[1]:] = rng.integers(0, cfg.vocab_size, width - prompt_lens[1])
    pre_pos = np.tile(np.arange(width), (2, 1))
    cache = DenseKVCache.create(cfg, 2, cache_len)
    logits, cache = _fwd(params, jnp.asarray(pre_tokens, jnp.int32),
                         jnp.asarray(pre_pos, jnp.int32), cfg, cache=cache)
    logits = np.asarray(logits)
    for r, n in enumerate(prompt_lens):
        assert rel_err(logits[r, :n], full[r, :n]) < F32_TOL

    worst = 0.0
    steps = total - prompt_lens[0]
    for i in range(steps):  # row 0 decodes positions 7..11 while row 1 decodes 3..7
        step_pos = np.array([[prompt_lens[0] + i], [prompt_lens[1] + i]])
        step_tok = np.take_along_axis(seqs, step_pos, axis=1)
        logits, cache = _fwd(params, jnp.asarray(step_tok, jnp.int32),
                             jnp.asarray(step_pos, jnp.int32), cfg, cache=cache)
        logits = np.asarray(logits)
        for r in range(2):
            worst = max(worst, rel_err(logits[r, 0], full[r, int(step_pos[r, 0])]))
    print(f"ragged cached decode vs full forward: rel err {worst:.2e}")
    assert worst < F32_TOL, f"ragged cached decode: relative error {worst:.3e}"


# ------------------------------------------------------------------- gradient check

GRAD_CONFIGS = {
    "rope-untied": dict(vocab_size=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=7,
                        pos_embedding="rope", tie_embeddings=False, max_seq_len=8,
                        rope_theta=30.0),
    "learned-tied": dict(vocab_size=11, dim=12, n_layers=2, n_heads=3, n_kv_heads=1,
                         ffn_dim=5, pos_embedding="learned", tie_embeddings=True,
                         max_seq_len=8),
}


class _Float64Numpy:
    """Stands in for `jax.numpy` inside hpllm.model's modules: identical, except that the
    float32 the model hard-codes (norm statistics, RoPE angles, attention and logit
    accumulation) is float64."""
    float32 = jnp.float64

    def __getattr__(self, name):
        return getattr(jnp, name)


def _float64_loss_and_grad(monkeypatch, params, *args, cfg):
    """jax.value_and_grad of the loss with float64 parameters, float64 compute, and the
    model's float32 constants widened to float64 (see _Float64Numpy), under jax_enable_x64
    for this call only. Asserts that the result really is float64 end to end."""
    import hpllm.kernels.masking as masking_mod
    import hpllm.model.attention as attention_mod
    import hpllm.model.layers as layers_mod
    import hpllm.model.transformer as transformer_mod
    with monkeypatch.context() as mp, jax.enable_x64(True):
        for mod in (attention_mod, layers_mod, masking_mod, transformer_mod):
            mp.setattr(mod, "jnp", _Float64Numpy())
        p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), params)
        args = [jnp.asarray(np.asarray(a)) for a in args]
        fn = jax.jit(jax.value_and_grad(jax_loss), static_argnames=("cfg", "dtype"))
        loss, grads = fn(p64, *args, cfg=cfg, dtype=jnp.float64)
        # the loss is computed from the logits in their own dtype: float64 here means the
        # logits were float64
        assert loss.dtype == jnp.float64, "the float64 patch no longer reaches the model"
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
        return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradient_matches_finite_differences_of_reference(name, monkeypatch):
    """jax.grad of the masked mean cross-entropy vs central finite differences of the float64
    NumPy reference, for random entries (>= 6) of every parameter leaf.

    Central differences with h = 1e-5 in float64 are accurate to ~h^2 |f'''| + 1e-16 / h,
    i.e. ~1e-10 absolute, so the comparison measures the JAX gradient's own error.

    * float64: the model hard-codes float32 in its norms, RoPE and attention accumulation
      (even for dtype=float64 inputs; its logits are documented float32), so a genuinely
      float64 JAX gradient needs those constants widened (_Float64Numpy). Per entry,
      |g - fd| / max(|fd|, 1e-6 max|g|) < 1e-4 (observed ~1e-8; the floor only guards exact
      zeros, e.g. embedding rows of tokens absent from the batch).
    * float32 (the real code path, as trained): per entry |g - fd| / max|g over the leaf|
      < 1e-4. Observed 5e-7 to 1.2e-5; the larger value on a sample whose gradient is
      ill-conditioned (perturbing the float64 parameters by one float32 ulp moves the float64
      gradient by 1e-5 of its scale too). A per-entry relative test would be wrong in
      float32: entries that are small differences of large terms legitimately lose digits
      (observed up to 1.4e-4 relative on entries 1e-2 of their leaf's scale).
    """
    cfg = make_config(init_std=0.4, **GRAD_CONFIGS[name])
    seed = 500 + list(GRAD_CONFIGS).index(name)
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed)
    tokens, positions, seg = packed_batch(rng, cfg, 2, 7)
    targets = rng.integers(0, cfg.vocab_size, size=(2, 7))
    mask = (rng.random((2, 7)) < 0.75).astype(np.float64)
    mask[0, 0] = 1.0

    loss64, g64 = _float64_loss_and_grad(monkeypatch, params, tokens, positions, seg,
                                         targets, mask, cfg=cfg)
    loss32, g32 = _loss_and_grad(params, tokens, positions, seg, jnp.asarray(targets),
                                 jnp.asarray(mask, jnp.float32), cfg=cfg)
    p64 = ref.to_numpy64(params)
    seg_np = np.asarray(seg)

    def ref_loss(p):
        return ref.masked_mean_xent(ref.forward(p, tokens, positions, cfg, seg_np),
                                    targets, mask)

    base = ref_loss(p64)
    assert abs(loss64 - base) < 1e-12 * abs(base)
    assert abs(float(loss32) - base) < 1e-5 * abs(base)

    floor = 1e-6 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g64))
    h = 1e-5
    worst64 = worst32 = (0.0, "")
    checked = 0
    for (path, g), g_32 in zip(jax.tree_util.tree_leaves_with_path(g64),
                               jax.tree.leaves(g32)):
        keys = [k.key for k in path]
        leaf = p64
        for k in keys:
            leaf = leaf[k]
        g_32 = np.asarray(g_32, np.float64)
        leaf_scale = float(np.max(np.abs(g)))
        assert leaf_scale > 0, f"{keys}: gradient identically zero"
        flat_idx = rng.choice(leaf.size, size=min(6, leaf.size), replace=False)
        if keys == ["embed"]:
            # make sure some sampled embedding rows belong to tokens in the batch
            used = np.asarray(tokens).ravel()[:3]
            flat_idx = np.concatenate([flat_idx, used * cfg.dim + rng.integers(0, cfg.dim, 3)])
        for fi in flat_idx:
            idx = np.unravel_index(int(fi), leaf.shape)
            orig = leaf[idx]
            leaf[idx] = orig + h
            up = ref_loss(p64)
            leaf[idx] = orig - h
            down = ref_loss(p64)
            leaf[idx] = orig
            fd = (up - down) / (2 * h)
            where = f"{'/'.join(keys)}{[int(i) for i in idx]}"
            err64 = abs(g[idx] - fd) / max(abs(fd), floor)
            err32 = abs(g_32[idx] - fd) / leaf_scale
            checked += 1
            if err64 >= worst64[0]:
                worst64 = (err64, f"{where}: jax {g[idx]:.9e} fd {fd:.9e}")
            if err32 >= worst32[0]:
                worst32 = (err32, f"{where}: jax {g_32[idx]:.6e} fd {fd:.6e}")
    assert checked >= 6 * len(jax.tree.leaves(g64)) - 10
    print(f"gradient vs finite differences ({checked} entries): float64 worst rel err "
          f"{worst64[0]:.2e} at {worst64[1]}; float32 worst err/leaf-scale {worst32[0]:.2e} "
          f"at {worst32[1]}")
    assert worst64[0] < 1e-4, f"float64 gradient: rel err {worst64[0]:.3e} at {worst64[1]}"
    assert worst32[0] < 1e-4, f"float32 gradient: err {worst32[0]:.3e} at {worst32[1]}"


# ---------------------------------------------------- parameter bookkeeping functions

BOOKKEEPING_CONFIGS = [
    dict(vocab_size=37, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=45,
         pos_embedding="rope", tie_embeddings=True),
    dict(vocab_size=101, dim=48, n_layers=1, n_heads=6, n_kv_heads=1, ffn_dim=0,
         pos_embedding="learned", tie_embeddings=False, max_seq_len=13),
    dict(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=0,
         pos_embedding="learned", tie_embeddings=True, max_seq_len=9),
    dict(vocab_size=101, dim=36, n_layers=2, n_heads=6, n_kv_heads=3, ffn_dim=45,
         pos_embedding="rope", tie_embeddings=False),
]


@pytest.mark.parametrize("kw", BOOKKEEPING_CONFIGS, ids=range(len(BOOKKEEPING_CONFIGS)))
def test_count_params_and_shapes(kw):
    cfg = make_config(**kw)
    # abstract evaluation: the real init_params code path, shapes and dtypes, no compile
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(params)
    total = sum(int(np.prod(x.shape)) for x in leaves)
    assert count_params(cfg) == total
    # embedding=False drops the token (and position) tables, keeps the output projection
    tables = cfg.vocab_size * cfg.dim + (cfg.max_seq_len * cfg.dim
                                         if cfg.pos_embedding == "learned" else 0)
    out_proj = cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0
    assert count_params(cfg, embedding=False) == total - tables + out_proj
    # the documented layout
    L, D, H, K, F = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    Dh = D // H
    assert params["layers"]["wq"].shape == (L, D, H, Dh)
    assert params["layers"]["wk"].shape == (L, D, K, Dh)
    assert params["layers"]["wo"].shape == (L, H, Dh, D)
    assert params["layers"]["w_gate"].shape == (L, D, F)
    assert params["layers"]["w_down"].shape == (L, F, D)
    if kw["ffn_dim"]:
        assert F == kw["ffn_dim"]
    assert ("unembed" in params) == (not cfg.tie_embeddings)
    assert ("pos_embed" in params) == (cfg.pos_embedding == "learned")
    assert all(x.dtype == jnp.float32 for x in leaves)
    shapes = param_shapes(cfg)
    assert jax.tree.map(lambda x: tuple(x.shape), params) == jax.tree.map(
        tuple, shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("kw", BOOKKEEPING_CONFIGS, ids=range(len(BOOKKEEPING_CONFIGS)))
def test_param_axes_match_params(kw):
    cfg = make_config(**kw)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(1))
    axes = param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    sizes: dict[str, set] = {}
    for (path, names), leaf in zip(
            jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_axes),
            jax.tree.leaves(params)):
        assert len(names) == leaf.ndim, jax.tree_util.keystr(path)
        assert all(isinstance(n, str) for n in names)
        for n, size in zip(names, leaf.shape):
            sizes.setdefault(n, set()).add(size)
    # a logical axis name means one thing: the same length in every parameter
    for n, s in sizes.items():
        assert len(s) == 1, f"axis {n!r} has several sizes {s}"
    expect = {"vocab": cfg.vocab_size, "embed": cfg.dim, "layers": cfg.n_layers,
              "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "mlp": cfg.hidden_dim}
    for n, size in expect.items():
        assert sizes[n] == {size}, n


def test_init_params_values():
    """Unit norm weights; N(0, init_std) matrices, with the residual-output projections (wo,
    w_down) scaled by 1/sqrt(2 n_layers); every leaf its own draw; deterministic in the key."""
    cfg = make_config(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=45,
                      pos_embedding="learned", tie_embeddings=False, max_seq_len=16,
                      init_std=0.05)
    init = jax.jit(init_params, static_argnums=0)
    params = init(cfg, jax.random.PRNGKey(3))
    again = init(cfg, jax.random.PRNGKey(3))
    other = init(cfg, jax.random.PRNGKey(4))
    residual = 1.0 / np.sqrt(2 * cfg.n_layers)
    draws = []
    for (path, leaf), leaf2, leaf3 in zip(jax.tree_util.tree_leaves_with_path(params),
                                          jax.tree.leaves(again), jax.tree.leaves(other)):
        name = jax.tree_util.keystr(path)
        x = np.asarray(leaf, np.float64)
        assert leaf.dtype == jnp.float32, name
        assert np.array_equal(x, np.asarray(leaf2)), f"{name}: not deterministic in the key"
        if "norm" in name:
            assert np.all(x == 1.0), name
            continue
        assert not np.array_equal(x, np.asarray(leaf3)), f"{name}: ignores the key"
        std = cfg.init_std * (residual if ("wo" in name or "w_down" in name) else 1.0)
        # >= 5760 samples per leaf: the sample std is within ~2% (1 sigma) of the truth
        assert abs(x.std() / std - 1.0) < 0.1, f"{name}: std {x.std():.4g}, expected {std:.4g}"
        assert abs(x.mean()) < 0.1 * std, name
        draws.append(x.ravel()[:256])
    # no two leaves share a draw (e.g. one key reused for wk and wv)
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            n = min(len(draws[i]), len(draws[j]))
            corr = np.corrcoef(draws[i][:n], draws[j][:n])[0, 1]
            assert abs(corr) < 0.5, (i, j, corr)
