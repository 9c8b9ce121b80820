"""The SmolLM2 tokenizer rebuilt from its GGUF vocabulary and merges (parity of ids with
llama.cpp is checked in tests/test_llamacpp_parity.py, marked slow)."""

import pytest

from hpllm.checkpoints.gguf import read_gguf
from hpllm.checkpoints.registry import pull
from hpllm.checkpoints.tokenizer import tokenizer_from_gguf

TEXTS = ["Hello, world!", "  leading spaces\tand\ttabs\n\n\nnewlines   ", "3.14159 + 2,718 = 5.86",
         "naïve café — “quotes” ‘single’", "日本語のテキスト、中文、한국어", "emoji 🦙🔥👍🏽",
         "def f(x):\n    return x ** 2  # square\n", "<|im_end|> is just text here", ""]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf(read_gguf(pull("smollm2-135m")).metadata)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_known_ids_digits_and_specials(tok):
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert len(tok.encode("12345")) == 5  # SmolLM's pre-tokenizer: one token per digit
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", special=True)[0] == 1
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", special=True)[-1] == 2
    plain = tok.encode("<|im_end|>")
    assert 2 not in plain and len(plain) > 1  # user text never smuggles in a control token
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert {0, 2} <= tok.stop_ids and 1 not in tok.stop_ids
    assert tok.decode([1, 504, 2]) == "The"  # special tokens print nothing


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    two = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello."},
                                   {"role": "user", "content": "Bye"}], add_generation_prompt=False)
    assert two.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert two.endswith("<|im_start|>user\nBye<|im_end|>\n")


def test_stream_decoder_prints_multibyte_characters_whole(tok):
    text = "a🦙b日本語é"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "" in pieces[:-1]  # some token ended inside a character: nothing printed for it
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
