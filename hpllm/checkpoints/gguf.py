"""GGUF model files (llama.cpp's format): metadata -> ModelConfig, tensors -> our parameters.

The header is parsed here with `struct` straight from a memory map: `gguf.GGUFReader` builds
a NumPy memmap view for every one of the ~100k vocabulary and merge strings, which took 8 s
of a 12 s load of SmolLM2-135M. The `gguf` package still supplies the format's constants and
the dequantization of every block type (F32/F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0, K-quants, ...).

Layout facts this loader relies on:
- a 2-D tensor of ggml shape [ne0, ne1] is ne1 rows of ne0 contiguous values, i.e. the
  (out, in) matrix of an HF linear layer;
- llama.cpp's converter permutes the rows of Q and K inside each head from HF's rotate-half
  RoPE layout to the interleaved one (pairs (2i, 2i+1)); `unpermute_qk` undoes it so our
  rotate-half RoPE sees HF's layout again.
"""

from __future__ import annotations

import mmap
import pathlib
import struct
import time
from dataclasses import dataclass

import numpy as np

from hpllm.checkpoints import ModelError
from hpllm.checkpoints.hf import checked_config, params_from_hf_tensors
from hpllm.config import ModelConfig

_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # GGUFValueType -> struct code (little-endian)
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: (ne1, ne0) for a matrix
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: pathlib.Path
    metadata: dict
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Sequential little-endian reads from a buffer, with a clear error past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def read(self, code: str):
        size = struct.calcsize("<" + code)
        if self.pos + size > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header")
        value = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.read("Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.read("I"), self.read("Q")
            if etype in _SCALARS:  # one NumPy read instead of `count` struct calls
                dtype = np.dtype("<" + _SCALARS[etype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise ModelError(f"{self.path}: truncated GGUF header")
                arr = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(count)]
        raise ModelError(f"{self.path}: unknown GGUF value type {vtype} (corrupt file?)")


def read_gguf(path) -> GGUFFile:
    """Metadata and tensor directory of a GGUF file (the data stays on disk)."""
    import gguf

    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ModelError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if buf[:4] != _MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version, n_tensors, n_kv = cur.read("I"), cur.read("Q"), cur.read("Q")
    if version not in (2, 3):
        raise ModelError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.read("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.read("Q") for _ in range(cur.read("I"))]
        infos.append((name, tuple(reversed(dims)), cur.read("I"), cur.read("Q")))
    align = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, shape, qtype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: tensor {name} has unknown type {qtype}") from None
        nbytes = int(np.prod(shape)) // block * type_size
        info = TensorInfo(name, shape, qtype, data_start + offset, nbytes)
        if info.offset + nbytes > len(buf):
            raise ModelError(f"{path} is truncated: tensor {name} ends at byte "
                             f"{info.offset + nbytes}, the file has {len(buf)}")
        tensors[name] = info
    return GGUFFile(path, metadata, tensors)


def read_tensor(file: GGUFFile, name: str) -> np.ndarray:
    """One tensor, dequantized to float32, in NumPy order (rows, row length)."""
    import gguf

    info = file.tensors[name]
    qtype = gguf.GGMLQuantizationType(info.qtype)
    with open(file.path, "rb") as f:
        f.seek(info.offset)
        raw = np.frombuffer(f.read(info.nbytes), np.uint8)
    row_bytes = info.nbytes // int(np.prod(info.shape[:-1]))
    try:
        w = gguf.quants.dequantize(raw.reshape(*info.shape[:-1], row_bytes), qtype)
    except NotImplementedError:
        raise ModelError(f"{file.path}: tensor {name} has type {qtype.name}, which the gguf "
                         "package cannot dequantize") from None
    return np.asarray(w, np.float32).reshape(info.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate-half) rows -> GGUF (interleaved) rows, per head, as llama.cpp's converter
    does: within a head, row (half h, index i) moves to row 2 i + h."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_qk: GGUF interleaved rows back to HF's rotate-half rows."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    m = file.metadata
    arch = m.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{file.path.name}: unsupported architecture {arch!r} (supported: llama)")

    def key(name, default=None):
        value = m.get(f"llama.{name}", default)
        if value is None:
            raise ModelError(f"{file.path.name}: metadata llama.{name} missing")
        return value

    if m.get("llama.rope.scaling.type", "none") not in ("none", "linear") or \
            m.get("llama.rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise ModelError(f"{file.path.name}: unsupported RoPE scaling "
                         f"{m.get('llama.rope.scaling.type')}")
    n_heads = key("attention.head_count")
    embed = file.tensors.get("token_embd.weight")
    vocab = m.get("llama.vocab_size") or (embed.shape[0] if embed else 0)
    # partial RoPE (rotary dims < head dim) is not something our decoder does
    return checked_config(dict(
        vocab_size=vocab, dim=key("embedding_length"), n_layers=key("block_count"),
        n_heads=n_heads, n_kv_heads=key("attention.head_count_kv", n_heads),
        ffn_dim=key("feed_forward_length"), max_seq_len=key("context_length"),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in file.tensors),
        m.get("llama.rope.dimension_count"), file.path.name)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_TO_GGUF = {v: k for k, v in _GGUF_TO_HF.items()}


def _gguf_name(hf_name: str) -> str:
    """HF tensor name -> GGUF tensor name (the inverse of llama.cpp's tensor map for llama)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{layer}.{_HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def load_gguf(path, progress: bool = True) -> tuple[ModelConfig, dict, GGUFFile, float]:
    """(config, float32 numpy params, the parsed file, seconds taken) of a llama GGUF."""
    from tqdm import tqdm

    start = time.perf_counter()
    file = read_gguf(path)
    config = config_from_gguf(file)
    if any(n.endswith(".bias") for n in file.tensors):
        raise ModelError(f"{file.path.name}: unsupported: attention/MLP biases")

    def get(hf_name):
        name = _gguf_name(hf_name)
        if name not in file.tensors:
            raise ModelError(f"{file.path.name}: tensor {name} missing")
        w = read_tensor(file, name)
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.n_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.n_kv_heads)
        return w

    with tqdm(total=config.n_layers, desc=f"loading {file.path.name}", unit="layer",
              disable=not progress, leave=False) as bar:
        params = params_from_hf_tensors(get, config, bar)
    return config, params, file, time.perf_counter() - start
