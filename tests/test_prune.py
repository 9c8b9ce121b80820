"""Magnitude and 2:4 pruning, and the masked recovery fine-tune."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.compress import prune as pr
from hpllm.quantized import _to_nk
from hpllm.config import make_config
from hpllm.model.transformer import init_params
from hpllm.train.data import random_batch


@pytest.fixture(scope="module")
def tiny():
    config = make_config("tiny", ["--vocab_size=97", "--n_layers=2", "--dim=48", "--ffn_dim=80",
                                  "--max_seq_len=16", "--seq_len=16", "--batch_size=4",
                                  "--lr=1e-3", "--warmup_steps=0", "--compute_dtype=float32"])
    return config, init_params(config.model, jax.random.key(0))


def test_magnitude_pruning_removes_the_smallest_entries_per_layer(tiny):
    _, params = tiny
    pruned, masks = pr.prune(params, "magnitude", 0.3)
    assert masks["embed"] is None and masks["layers"]["attn_norm"] is None
    for name in ("wq", "wo", "w_down"):
        w, p = np.asarray(params["layers"][name]), np.asarray(pruned["layers"][name])
        for i in range(w.shape[0]):  # each stacked layer on its own
            a, b = np.abs(w[i]).ravel(), p[i].ravel()
            zero = b == 0
            assert abs(zero.mean() - 0.3) < 1.0 / a.size + 1e-9
            assert a[zero].max() <= a[~zero].min()  # nothing kept is smaller than a pruned one
            np.testing.assert_array_equal(b[~zero], w[i].ravel()[~zero])
    assert abs(pr.sparsity_of(pruned, masks) - 0.3) < 0.01
    np.testing.assert_array_equal(np.asarray(pruned["embed"]), np.asarray(params["embed"]))


def test_two_four_keeps_the_two_largest_of_every_four_inputs(tiny):
    _, params = tiny
    pruned, masks = pr.prune(params, "2:4")
    for name, in_axes, trailing in [("wq", (0,), 3), ("wo", (0, 1), 3), ("w_down", (0,), 2)]:
        w = params["layers"][name]
        shape = w.shape[-trailing:]
        kept = np.asarray(_to_nk(pruned["layers"][name], shape, in_axes))
        orig = np.abs(np.asarray(_to_nk(w, shape, in_axes)))
        g_kept = kept.reshape(*kept.shape[:-1], -1, 4)
        g_orig = orig.reshape(*orig.shape[:-1], -1, 4)
        assert np.all((g_kept != 0).sum(-1) == 2)
        top2 = np.sort(g_orig, axis=-1)[..., 2:]
        np.testing.assert_allclose(np.sort(np.abs(g_kept), axis=-1)[..., 2:], top2)
    assert pr.sparsity_of(pruned, masks) == pytest.approx(0.5)


def test_bad_pruning_requests_are_refused(tiny):
    _, params = tiny
    with pytest.raises(pr.PruneError, match="sparsity"):
        pr.prune(params, "magnitude", 1.0)
    with pytest.raises(pr.PruneError, match="unknown pruning method"):
        pr.prune(params, "random")
    with pytest.raises(pr.PruneError, match="divisible by 4"):
        pr.two_four_masks({"layers": {"w_up": jnp.ones((1, 6, 8))}})


def test_recovery_fine_tune_lowers_the_loss_and_keeps_the_zeros(tiny):
    config, params = tiny
    pruned, masks = pr.prune(params, "magnitude", 0.5)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config, seed=1).items()}
    recovered, losses = pr.recover(pruned, masks, config, iter([batch] * 6), steps=6)
    assert len(losses) == 6 and losses[-1] < losses[0]
    for name in ("wq", "w_gate"):
        r, m = np.asarray(recovered["layers"][name]), np.asarray(masks["layers"][name])
        assert np.all(r[m == 0] == 0)
        assert not np.allclose(r, np.asarray(pruned["layers"][name]))  # it did train

