"""Structured outputs: constrained decoding through llguidance.

A request's `StructuredOutput` (JSON object, JSON schema, regex, choice or a grammar) is
compiled once per (tokenizer, constraint) into an llguidance matcher and cached
(`compile_grammar`); each sampled sequence gets its own `Matcher` (a cheap copy of the
compiled one, sharing its lazily built lexer states). Before each
sampling call the engine asks the sequences' matchers for a packed bitmask of allowed tokens
(`fill_masks`: one int32 per 32 token ids, bit i of word w = token 32w + i, llguidance's
layout); the jitted sampler unpacks it and sends forbidden logits to -inf. A sequence ends
("stop") when its grammar is complete: it can accept nothing but the end of the text.

JSON whitespace is bounded as llama.cpp's schema grammars bound it (one space, or a newline
and up to 20 spaces/tabs of indent, between tokens): unbounded whitespace lets a weak model
pad forever and never finish the object.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import llguidance as llg
import llguidance.numpy as llnp
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"


class StructuredError(ValueError):
    """A constraint that cannot be used (invalid schema, unsupported feature, a grammar that
    does not compile); the message names the problem."""


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. spec: "" for json_object; the schema as JSON text for
    json_schema; the regex; a JSON list of strings for choice; for grammar, a Lark grammar in
    llguidance's dialect (a `start:` rule; `%json {schema}` may stand inside rules) or GBNF
    (llama.cpp's, `root ::= ...`), which is converted to Lark. strict=False lets a
    JSON schema use keywords llguidance does not implement (they are then not enforced)."""
    kind: str
    spec: str = ""
    strict: bool = True


def grammar_source(so: StructuredOutput) -> str:
    """The llguidance grammar of a constraint; StructuredError when it is malformed (a
    grammar that parses but does not compile is caught by `compile_grammar`)."""
    if so.kind not in KINDS:
        raise StructuredError(f"unknown structured output kind {so.kind!r} (one of "
                              f"{', '.join(KINDS)})")
    if not isinstance(so.spec, str):
        raise StructuredError(f"{so.kind}: the specification must be text")
    options = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not so.strict}
    if so.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options)
    if so.kind == "json_schema":
        try:
            schema = json.loads(so.spec)
        except json.JSONDecodeError as e:
            raise StructuredError(f"json_schema: the schema is not valid JSON: {e}") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise StructuredError("json_schema: the schema must be a JSON object")
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if so.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except json.JSONDecodeError:
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise StructuredError("choice: must be a non-empty list of non-empty strings")
        return llg.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices))
    if not so.spec.strip():
        raise StructuredError("grammar: the grammar is empty")
    try:  # a grammar with a `start:` rule is Lark; else GBNF (`root ::= ...`), converted
        return llg.LLMatcher.grammar_from_lark(any_to_lark(so.spec))
    except Exception as e:  # noqa: BLE001 - the converter raises its own kinds
        raise StructuredError(f"grammar: {e}") from None


class _Vocabulary:
    """hpllm's tokenizer as llguidance's TokenizerWrapper protocol sees it: every token's
    bytes (special tokens spelled out, and named special so text never matches them) and an
    encoder of text."""
    is_tokenizer_wrapper = True

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.special_ids)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(special)
        self.tokens = [tokenizer.hf.id_to_token(i).encode() if i in special else b
                       for i, b in enumerate(tokenizer.token_bytes)]
        self.tokens += [b""] * (vocab_size - len(self.tokens))  # ids the tokenizer lacks
        self._encode = tokenizer.encode

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, bos=False)


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer, vocab_size: int) -> llg.LLTokenizer:
    """The llguidance tokenizer of an hpllm tokenizer, for a model of `vocab_size` logits
    (ends of text: the tokenizer's end-of-turn ids). Building it takes ~0.5 s: cached."""
    if len(tokenizer.token_bytes) > vocab_size:
        raise StructuredError(f"the tokenizer has {len(tokenizer.token_bytes)} tokens, more "
                              f"than the model's {vocab_size} logits")
    ends = sorted(tokenizer.stop_ids) or [tokenizer.eos_id]
    return llg.LLTokenizer(_Vocabulary(tokenizer, vocab_size), n_vocab=vocab_size,
                           eos_token=ends)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, ll: llg.LLMatcher):
        self.ll = ll

    def fork(self) -> "Matcher":
        return Matcher(self.ll.deep_copy())

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the grammar does not allow it (the matcher is
        then in its error state and the sequence must end)."""
        return self.ll.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing but an end of text can follow) or failed."""
        return self.ll.is_stopped()

    @property
    def error(self) -> str:
        return self.ll.get_error()

    def allowed(self, vocab_size: int) -> np.ndarray:
        """(vocab_size,) bool: the tokens the grammar allows next."""
        return unpack(fill_masks([self], 1, vocab_size), vocab_size)[0]


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled constraint: `matcher()` gives a fresh sequence's matcher."""
    template: llg.LLMatcher

    def matcher(self) -> Matcher:
        return Matcher(self.template.deep_copy())


@functools.lru_cache(maxsize=256)
def compile_grammar(tokenizer, so: StructuredOutput, vocab_size: int) -> Grammar:
    """The constraint compiled for this tokenizer; StructuredError naming the problem when it
    cannot be (raised before any request state changes). Cached per (tokenizer, constraint)."""
    if tokenizer is None or not hasattr(tokenizer, "token_bytes"):
        raise StructuredError("structured outputs need the model's tokenizer")
    source = grammar_source(so)
    try:
        ll = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size), source, log_level=0)
    except (ValueError, RuntimeError) as e:
        raise StructuredError(f"{so.kind}: {e}") from None
    if ll.is_error():
        raise StructuredError(f"{so.kind}: {_summary(ll.get_error())}")
    return Grammar(ll)


def _summary(message: str) -> str:
    lines = [x for x in message.strip().splitlines() if x.strip()]
    return " ".join(lines[:3]) if lines else "the grammar does not compile"


def fill_masks(matchers: list, rows: int, vocab_size: int) -> np.ndarray:
    """(rows, ceil(vocab_size / 32)) int32 packed masks of allowed tokens: row i from
    matchers[i], all ones where matchers[i] is None and for rows past len(matchers). A matcher
    that has failed allows only the end of text. One row takes ~0.02-0.05 ms once the lexer
    states it meets are built (they are shared by every matcher of a grammar), so the rows
    are filled one after another: llguidance's thread pool only competed with XLA for the
    cores here."""
    masks = llnp.allocate_token_bitmask(rows, vocab_size)
    first: dict[int, int] = {}  # a matcher listed twice (n > 1 forks) is computed once
    for i, m in enumerate(matchers):
        if m is None:
            continue
        if id(m) in first:
            masks[i] = masks[first[id(m)]]
        else:
            first[id(m)] = i
            llnp.fill_next_token_bitmask(m.ll, masks, i)
    return masks


def unpack(masks: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """(rows, words) packed int32 masks -> (rows, vocab_size) bool (a reference for the
    sampler's unpacking, and for tests)."""
    bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little").astype(bool)
    return bits if vocab_size is None else bits[:, :vocab_size]
