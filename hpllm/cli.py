"""`hpllm` command line: parse, call the library, print. Nothing here a Python user lacks."""

from __future__ import annotations

import argparse
import sys

import yaml

from hpllm.config import DEFAULT_PRESET, PRESETS, ConfigError, make_config

USAGE_OVERRIDES = ("overrides: --key=value for any config field (e.g. --n_layers=6 --lr=1e-3); "
                   "see `hpllm config` for the keys and their values")


def cmd_train(args, extra) -> int:
    config = make_config(args.preset, extra + (["--resume=true"] if args.resume else []))
    from hpllm.train.loop import train  # heavy imports only once the config is known good

    train(config)
    return 0


def cmd_config(args, extra) -> int:
    config = make_config(args.preset, extra)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def cmd_hw(args, extra) -> int:
    from hpllm.perf.hardware import current_chip, measured_cpu

    if extra:
        raise ConfigError(f"hpllm hw takes no overrides, got {' '.join(extra)}")
    chip = measured_cpu(refresh=True) if args.refresh else current_chip()
    print(f"{chip.name}: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in
                                       chip.peak_flops.items())
          + f", memory {chip.hbm_bandwidth / 1e9:.1f} GB/s ({chip.source})")
    return 0


def cmd_roofline(args, extra) -> int:
    import json

    from hpllm.perf import roofline
    from hpllm.perf.hardware import CHIPS, current_chip

    config = make_config(args.preset, extra)
    if args.chip and args.chip not in CHIPS:
        raise ConfigError(f"unknown chip {args.chip!r}; known: {', '.join(CHIPS)}")
    chip = CHIPS[args.chip] if args.chip else current_chip()
    kinds = ("train", "prefill", "decode") if args.workload == "all" else (args.workload,)
    try:
        mesh = roofline.MeshShape(**{k: int(v) for k, v in
                                     (part.split("=") for part in args.mesh.split(",") if part)})
        workloads = [roofline.Workload(
            kind, args.batch or (config.train.batch_size if kind == "train" else 1),
            args.seq_len or config.train.seq_len, args.context or config.model.max_seq_len)
            for kind in kinds]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad workload or --mesh (want e.g. data=2,fsdp=4,tensor=1): {e}")
    if args.measure and (args.chip or mesh.devices > 1):
        raise ConfigError("--measure runs on this machine's one device: drop --chip/--mesh")
    from hpllm.perf.measure import compare

    reports = []
    for workload in workloads:
        report = compare(config, workload, chip, mesh, measure=args.measure,
                         repeats=args.repeats)
        print(report["text"] + "\n")
        reports.append(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r["json"] for r in reports] if len(reports) > 1 else reports[0]["json"],
                      f, indent=1)
    if args.plot:
        roofline.plot([r["prediction"] for r in reports], args.plot,
                      [r["json"].get("measured_s") for r in reports])
        print(f"roofline chart: {args.plot}")
    return 0


def _load(args):
    from hpllm.checkpoints.registry import load_model

    model = load_model(args.model, progress=sys.stderr.isatty())
    n_params = sum(x.size for x in __import__("jax").tree.leaves(model.params))
    print(f"loaded {model.path.name}: {n_params / 1e6:.1f}M parameters, {model.config.n_layers} "
          f"layers, context {model.config.max_seq_len}, in {model.load_seconds:.1f} s",
          file=sys.stderr)
    return model


def _sampling(args):
    from hpllm.infer.text import Sampling

    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and "
                          "--max-tokens >= 1")
    return Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)


def _stream(pieces, stats) -> None:
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.tokens} generated, "
          f"{stats.decode_tokens_per_second:.1f} tok/s decode]", file=sys.stderr)


def cmd_pull(args, extra) -> int:
    from hpllm.checkpoints.registry import pull

    print(pull(args.model))
    return 0


def cmd_generate(args, extra) -> int:
    from hpllm.infer.text import Stats, complete

    sampling = _sampling(args)
    if not args.prompt:
        raise ConfigError("--prompt is empty")
    model = _load(args)
    stats = Stats()
    print(args.prompt, end="", flush=True)
    _stream(complete(model, args.prompt, sampling, stats), stats)
    return 0


def cmd_chat(args, extra) -> int:
    from hpllm.infer.text import ChatSession, Stats

    sampling = _sampling(args)
    model = _load(args)
    session = ChatSession(model, sampling)
    if args.system:
        session.messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        if not line.strip():
            continue
        stats = Stats()
        _stream(session.say(line.rstrip("\n"), stats), stats)


def cmd_eval_ppl(args, extra) -> int:
    from hpllm.infer.perplexity import evaluate_texts, shakespeare_validation_texts

    model = _load(args)
    result = evaluate_texts(model, shakespeare_validation_texts(), args.tokens, args.window,
                            progress=sys.stderr.isatty())
    print(f"Shakespeare validation: {result['tokens']} tokens ({result['bytes']} bytes, windows "
          f"of {result['window']}): perplexity {result['perplexity']:.3f}, "
          f"{result['nll_per_token']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte "
          f"({result['tokens_per_second']:.0f} tok/s)")
    return 0


MODEL_COMMANDS = ("pull", "generate", "chat", "eval-ppl")


def _model_parsers(sub) -> None:
    """pull / generate / chat / eval-ppl: each takes a model (registry name, .gguf or HF dir)."""
    model_help = "registry name (smollm2-135m), a .gguf file or a Hugging Face directory"
    p = sub.add_parser("pull", help="download a registry model into the cache")
    p.add_argument("model", help="registry name, e.g. smollm2-135m")
    p.set_defaults(fn=cmd_pull)
    for name, fn, text in [("generate", cmd_generate, "stream a continuation of --prompt"),
                           ("chat", cmd_chat, "multi-turn chat, one user message per stdin line")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help=model_help)
        if name == "generate":
            p.add_argument("--prompt", required=True)
        else:
            p.add_argument("--system", default="", help="system message (default: the "
                                                        "template's own)")
        p.add_argument("--max-tokens", type=int, default=128 if name == "generate" else 256)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
        p.add_argument("--top-p", type=float, default=1.0 if name == "generate" else 0.9)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)
    p = sub.add_parser("eval-ppl", help="perplexity and bits/byte on the Shakespeare "
                                        "validation split")
    p.add_argument("model", help=model_help)
    p.add_argument("--tokens", type=int, default=16384,
                   help="evaluate the first N predicted tokens (0 = the whole split)")
    p.add_argument("--window", type=int, default=512, help="tokens per context window")
    p.set_defaults(fn=cmd_eval_ppl)


def cmd_profile(args, extra) -> int:
    config = make_config(args.preset, extra)
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    from hpllm.perf.profile import describe, profile

    summary = profile(config, steps=args.steps, out_dir=args.out, synthetic=args.synthetic,
                      log=lambda line: print(line, file=sys.stderr))
    print(describe(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpllm", description="LLM training and inference on JAX",
                                     epilog=USAGE_OVERRIDES)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in [("train", cmd_train, "train a model (default: Shakespeare preset)"),
                           ("config", cmd_config, "print the resolved configuration as YAML"),
                           ("hw", cmd_hw, "this machine's peak FLOP/s and bandwidth")]:
        p = sub.add_parser(name, help=text, epilog=USAGE_OVERRIDES)
        p.add_argument("--preset", default=DEFAULT_PRESET,
                       help=f"built-in ({', '.join(PRESETS)}) or a .yaml file; "
                            f"default {DEFAULT_PRESET}")
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest complete checkpoint in out_dir")
        if name == "hw":
            p.add_argument("--refresh", action="store_true",
                           help="measure again (do it on an idle machine) instead of the cache")
        p.set_defaults(fn=fn)
    p = sub.add_parser("roofline", help="predict a workload's step time from the roofline "
                                        "(and --measure it)", epilog=USAGE_OVERRIDES)
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--workload", choices=("train", "prefill", "decode", "all"),
                   default="train")
    p.add_argument("--batch", type=int, default=0, help="default: batch_size (train), 1")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (train, "
                                                           "prefill); default seq_len")
    p.add_argument("--context", type=int, default=0, help="KV length for decode; default "
                                                          "max_seq_len")
    p.add_argument("--mesh", default="", help="e.g. data=2,fsdp=4,tensor=2 (default 1 device)")
    p.add_argument("--chip", default="", help="a table chip (tpu-v4, h100, ...) instead of "
                                              "this machine")
    p.add_argument("--measure", action="store_true", help="also run it and compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="write the prediction (and measurement) here")
    p.add_argument("--plot", default="", help="write a roofline chart PNG here")
    p.set_defaults(fn=cmd_roofline)
    _model_parsers(sub)
    p = sub.add_parser("profile", help="trace training steps; time, FLOP/s and bandwidth by "
                                       "op category", epilog=USAGE_OVERRIDES)
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
    p.add_argument("--out", default="runs/profile", help="trace folder (TensorBoard logdir)")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of the corpus")
    p.set_defaults(fn=cmd_profile)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in MODEL_COMMANDS:  # the others take --key=value overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from hpllm.checkpoints import ModelError
    from hpllm.infer.generate import PromptError
    from hpllm.train.data import DataError

    errors = (ConfigError, DataError, ModelError, PromptError)
    if args.command not in MODEL_COMMANDS:
        from hpllm.checkpoints.orbax_io import CheckpointError  # imports Orbax: only if needed

        errors += (CheckpointError,)
    try:
        return args.fn(args, extra)
    except errors as e:
        print(f"hpllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
