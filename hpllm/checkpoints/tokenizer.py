"""Tokenizers of pretrained models: rebuilt from GGUF vocab + merges as an HF `tokenizers`
byte-level BPE, or read from an HF directory's tokenizer.json; chat templates with jinja2;
incremental detokenization for streaming.

The pre-tokenizer (how text is split before BPE) is not in the GGUF vocabulary: llama.cpp
names it in `tokenizer.ggml.pre` and keeps the regexes in its code. `_PRE_TOKENIZERS` maps
the names we support to the equivalent HF pre-tokenizer.
"""

from __future__ import annotations

import codecs
import functools
import json
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from hpllm.checkpoints import ModelError

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
# Tokens that end a turn or a text in common chat formats (llama.cpp's end-of-generation set
# is found the same way: by these names, besides the declared EOS).
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
               "<end_of_turn>", "</s>")


def _byte_level_pre(digits_apart: bool):
    parts = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if digits_apart:  # llama.cpp's "\p{N}" split before the GPT-2 regex: one token per digit
        parts.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(parts)


# tokenizer.ggml.pre -> HF pre-tokenizer (llama.cpp llama-vocab.cpp groups these names by regex)
# (only SmolLM's is checked against llama.cpp, in bench/llamacpp_parity.py)
_PRE_TOKENIZERS = {
    "gpt-2": lambda: _byte_level_pre(False),
    "smollm": lambda: _byte_level_pre(True), "starcoder": lambda: _byte_level_pre(True),
    "refact": lambda: _byte_level_pre(True),
}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the others are shifted to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


class TextTokenizer:
    """A pretrained model's tokenizer: encode/decode, the bytes of each token (for bits per
    byte and streaming), special and end-of-turn ids, and the chat template."""

    def __init__(self, hf: Tokenizer, *, bos_id=None, eos_id=None, add_bos=False,
                 chat_template=None):
        self.hf, self.bos_id, self.eos_id, self.add_bos = hf, bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.vocab_size = hf.get_vocab_size()
        added = hf.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        ends = {hf.token_to_id(t) for t in _END_TOKENS} | {eos_id}
        self.stop_ids = frozenset(i for i in ends if i is not None)
        byte_of = _byte_decoder()
        pieces = [hf.id_to_token(i) or "" for i in range(self.vocab_size)]
        # Special tokens print nothing; a byte-level token spells one byte per character.
        self.token_bytes = [b"" if i in self.special_ids else bytes(byte_of[c] for c in p)
                            if all(c in byte_of for c in p) else p.encode()
                            for i, p in enumerate(pieces)]

    def token_id(self, text: str):
        return self.hf.token_to_id(text)

    def encode(self, text: str, *, special: bool = False, bos: bool | None = None) -> list[int]:
        """Token ids of `text`. special=True parses spelled-out special tokens (chat
        templates); otherwise "<|im_end|>" in user text is plain text. bos=None follows the
        model's add_bos flag."""
        self.hf.encode_special_tokens = not special
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation, rendered as HF transformers does (jinja2 in a
        sandbox, trim_blocks and lstrip_blocks). `tools`: OpenAI-style function definitions,
        handed to templates that read a `tools` variable (see `template_takes_tools`)."""
        if not self.chat_template:
            raise ModelError("this model has no chat template")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.hf.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.hf.id_to_token(self.eos_id) if self.eos_id is not None else "")

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` variable (HF's convention for
        templates that know function calling)."""
        return bool(self.chat_template) and "tools" in _template_variables(self.chat_template)


class StreamDecoder:
    """Token ids in, printable text out: bytes go through an incremental UTF-8 decoder, so a
    character split across tokens is printed once, whole, when its last byte arrives. Invalid
    bytes print as U+FFFD; a character left incomplete at the end (generation stopped inside
    it) prints nothing."""

    def __init__(self, tokenizer: TextTokenizer):
        self.token_bytes = tokenizer.token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes[token_id])

    def flush(self) -> str:
        self.utf8.reset()  # drop the bytes of an unfinished character
        return ""


@functools.cache
def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ModelError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelError(f"chat template does not parse: {e}") from None


@functools.cache
def _template_variables(source: str) -> frozenset[str]:
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ast = ImmutableSandboxedEnvironment().parse(source)
    except jinja2.TemplateError:
        return frozenset()  # rendering reports the error
    return frozenset(jinja2.meta.find_undeclared_variables(ast))


def tokenizer_from_gguf(metadata: dict, name: str = "GGUF") -> TextTokenizer:
    """The byte-level BPE of a GGUF file's tokenizer.ggml.* metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{name}: unsupported tokenizer model {kind!r} (supported: gpt2, "
                         "i.e. byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ModelError(f"{name}: unsupported pre-tokenizer {pre!r} (supported: "
                         f"{', '.join(_PRE_TOKENIZERS)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              ignore_merges=False))
    hf.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types) if k == _CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return TextTokenizer(hf, bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
                         eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
                         add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
                         chat_template=metadata.get("tokenizer.chat_template"))


def tokenizer_from_hf_dir(path) -> TextTokenizer:
    """tokenizer.json (+ tokenizer_config.json for BOS/EOS and the chat template)."""
    folder = pathlib.Path(path)
    try:
        hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the Rust side raises plain Exception
        raise ModelError(f"cannot load {folder / 'tokenizer.json'}: {e}") from None
    if "ByteLevel" not in json.dumps(json.loads(hf.to_str()).get("decoder")):
        # SentencePiece-style vocabularies (▁ for spaces, <0x0A> byte fallback) spell bytes
        # differently; streaming and bits per byte rely on the byte-level alphabet.
        raise ModelError(f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers are "
                         "supported")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def token_of(key):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return hf.token_to_id(value) if value else None

    return TextTokenizer(hf, bos_id=token_of("bos_token"), eos_id=token_of("eos_token"),
                         add_bos=bool(cfg.get("add_bos_token", False)),
                         chat_template=cfg.get("chat_template"))
