"""`hpllm` command line: parse, call the library, print. Nothing here a Python user lacks."""

from __future__ import annotations

import argparse
import sys

import yaml

from hpllm.config import DEFAULT_PRESET, PRESETS, ConfigError, make_config

USAGE_OVERRIDES = ("overrides: --key=value for any config field (e.g. --n_layers=6 --lr=1e-3); "
                   "see `hpllm config` for the keys and their values")


def _mesh_args(args) -> list[str]:
    return [f"--mesh={args.mesh}"] if getattr(args, "mesh", None) else []


def cmd_train(args, extra) -> int:
    config = make_config(args.preset, extra + _mesh_args(args)
                         + (["--resume=true"] if args.resume else []))
    from hpllm.parallel import distributed

    # Before any JAX computation: joins the other processes (flags or HPLLM_* environment).
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from hpllm.train.loop import train  # heavy imports only once the config is known good

    train(config)
    return 0


def cmd_config(args, extra) -> int:
    config = make_config(args.preset, extra + _mesh_args(args))
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

    from hpllm.compress.quantize import param_bytes

    model = load_model(args.model, progress=sys.stderr.isatty(), quant=args.quant,
                       group_size=args.group_size, threshold=args.threshold)
    n_params = sum(x.size for x in __import__("jax").tree.leaves(model.params))
    weights = (f"{model.quant} weights, {param_bytes(model.params) / 2**20:.0f} MiB"
               if model.quant else f"{n_params / 1e6:.1f}M parameters")
    print(f"loaded {model.path.name}: {weights}, {model.config.n_layers} "
          f"layers, context {model.config.max_seq_len}, in {model.load_seconds:.1f} s",
          file=sys.stderr)
    return model


def _sampling(args):
    from hpllm.infer.text import Sampling

    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and "
                          "--max-tokens >= 1")
    return Sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                    None if args.kv_cache == "float" else args.kv_cache)


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
    if args.speculative:  # hpllm.infer.speculative: same output distribution, fewer passes
        from hpllm.infer.drafts import make_draft, stream_speculative_text

        make_draft(args.speculative, model, args.draft_layers)  # bad draft: error before output
        pieces = stream_speculative_text(model, args.prompt, sampling, args.speculative,
                                         args.gamma, args.draft_layers, stats=stats)
    else:
        pieces = complete(model, args.prompt, sampling, stats)
    print(args.prompt, end="", flush=True)
    _stream(pieces, stats)
    return 0


def cmd_distill(args, extra) -> int:
    from hpllm.compress.distill import distill

    distill(args.model, minutes=args.minutes, dim=args.dim, n_layers=args.layers)
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


def cmd_quantize(args, extra) -> int:
    from hpllm.compress.quantize import param_bytes, save_quantized

    model = _load(args)
    save_quantized(args.out, model.config, model.params, model.tokenizer, args.quant,
                   group_size=args.group_size, threshold=args.threshold, source=str(model.path))
    print(f"wrote {args.out}: {args.quant} weights, {param_bytes(model.params) / 2**20:.1f} MiB "
          f"(load it with any model command; no --quant needed)")
    return 0


def _quant_args(p, required: bool = False) -> None:
    from hpllm.compress.quantize import DEFAULT_GROUP_SIZE, DEFAULT_THRESHOLD, SCHEMES

    p.add_argument("--quant", choices=SCHEMES, required=required, default=None if required
                   else "", help="quantize the weights on load (default: as stored)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="int4: inputs per scale group")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="llm.int8: activation magnitude above which a feature is an outlier")


MODEL_COMMANDS = ("pull", "generate", "chat", "eval-ppl", "quantize", "serve", "bench",
                  "distill")


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
            p.add_argument("--speculative", choices=("draft", "self", "ngram"), default="",
                           help="speculative decoding with a distilled draft (`hpllm distill`), "
                                "the model's own first layers, or prompt n-gram lookup")
            p.add_argument("--gamma", type=int, default=4, help="draft tokens per target pass "
                           "(initial; adapted to the acceptance)")
            p.add_argument("--draft-layers", type=int, default=0,
                           help="--speculative self: layers in the draft (0 = a third)")
        else:
            p.add_argument("--system", default="", help="system message (default: the "
                                                        "template's own)")
        p.add_argument("--max-tokens", type=int, default=128 if name == "generate" else 256)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7,
                       help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
        p.add_argument("--top-p", type=float, default=1.0 if name == "generate" else 0.9)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                       help="KV cache precision (int8: per-token-per-head scales)")
        _quant_args(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("distill", help="train a small draft model for --speculative draft "
                                        "(KL to the model's logits on Shakespeare)")
    p.add_argument("model", nargs="?", default="smollm2-135m", help=model_help)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=2)
    p.set_defaults(fn=cmd_distill)
    p = sub.add_parser("eval-ppl", help="perplexity and bits/byte on the Shakespeare "
                                        "validation split")
    p.add_argument("model", help=model_help)
    p.add_argument("--tokens", type=int, default=16384,
                   help="evaluate the first N predicted tokens (0 = the whole split)")
    p.add_argument("--window", type=int, default=512, help="tokens per context window")
    _quant_args(p)
    p.set_defaults(fn=cmd_eval_ppl)
    p = sub.add_parser("quantize", help="save a quantized copy of a model (a directory)")
    p.add_argument("model", help=model_help)
    p.add_argument("out", help="output directory")
    _quant_args(p, required=True)
    p.set_defaults(fn=cmd_quantize)


def cmd_serve(args, extra) -> int:
    from hpllm.infer.engine import EngineConfig
    from hpllm.serve.api import serve

    ec = EngineConfig(block_size=args.block_size, kv_memory_mb=args.kv_memory,
                      max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=args.max_model_len, dtype=args.dtype,
                      kv_dtype=args.kv_dtype, enable_prefix_caching=not args.no_prefix_caching,
                      speculative=args.speculative,
                      num_speculative_tokens=args.num_speculative_tokens,
                      draft_layers=args.draft_layers)
    try:
        ec.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 < args.port < 65536 or args.max_pending < 1 or args.drain_timeout < 0:
        raise ConfigError("need 0 < --port < 65536, --max-pending >= 1, --drain-timeout >= 0")
    return serve(args.model, args.host, args.port, ec, args.served_model_name,
                 args.max_pending, args.drain_timeout, quant=args.quant,
                 group_size=args.group_size, threshold=args.threshold)


def cmd_bench_serve(args, extra) -> int:
    import json
    import math

    from hpllm.serve.bench import bench_serve, format_summary

    def span(text, name):
        try:
            lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text),) * 2
        except ValueError:
            raise ConfigError(f"{name} wants N or LO:HI, got {text!r}") from None
        if not 1 <= lo <= hi:
            raise ConfigError(f"{name} wants 1 <= LO <= HI, got {text!r}")
        return lo, hi

    if args.num_prompts < 1 or args.concurrency < 0 or args.request_rate <= 0 \
            or args.burstiness <= 0:
        raise ConfigError("need --num-prompts >= 1, --concurrency >= 0, --request-rate > 0, "
                          "--burstiness > 0")
    summary = bench_serve(args.base_url, args.num_prompts, args.concurrency,
                          args.request_rate, args.burstiness,
                          span(args.prompt_len, "--prompt-len"),
                          span(args.output_len, "--output-len"), args.seed, args.model)
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(f"{summary['config']['model']} at {args.base_url}: {args.num_prompts} prompts, "
          f"rate {rate}, concurrency {args.concurrency or 'unlimited'}")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["errors"] == 0 else 1


def _serve_parsers(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, "
                                     "streaming, /metrics)")
    p.add_argument("model", help="registry name (smollm2-135m), a .gguf file or a Hugging Face "
                                 "directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="", help="the model id clients use "
                                                           "(default: MODEL as given)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running sequences per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="tokens per engine step (decodes + prefill chunks)")
    p.add_argument("--kv-memory", type=float, default=256.0, help="KV cache pool size, MiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=0, help="0 = the model's context")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--speculative", choices=("ngram", "self", "draft"), default="",
                   help="speculative decoding for the running batch: prompt-lookup drafts, "
                        "the model's first layers, or the `hpllm distill` draft (same outputs "
                        "in distribution)")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="--speculative: draft tokens per sequence and step (adapts from here)")
    p.add_argument("--draft-layers", type=int, default=0,
                   help="--speculative self: layers in the draft (0 = a third)")
    p.add_argument("--max-pending", type=int, default=256,
                   help="requests held at once (queued + running); more get HTTP 503")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM/SIGINT")
    _quant_args(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("bench", help="benchmarks; `hpllm bench serve` loads a running server")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("serve", help="load a running OpenAI-compatible server with "
                                       "Shakespeare prompts; TTFT, TPOT, ITL, throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="", help="model id and tokenizer (default: the "
                                               "server's model, read from /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight at most "
                                                              "(0 = no limit)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrivals per second (Poisson); inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1 = Poisson, < 1 burstier)")
    p.add_argument("--prompt-len", default="32:256", help="prompt tokens, N or LO:HI")
    p.add_argument("--output-len", default="16:128", help="output tokens, N or LO:HI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the summary (and per-request) here")
    p.set_defaults(fn=cmd_bench_serve)


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
            p.add_argument("--coordinator-address", default=None,
                           help="host:port of process 0, for a multi-process run "
                                "(or HPLLM_COORDINATOR_ADDRESS)")
            p.add_argument("--num-processes", type=int, default=None,
                           help="processes in the run (or HPLLM_NUM_PROCESSES)")
            p.add_argument("--process-id", type=int, default=None,
                           help="this process's index (or HPLLM_PROCESS_ID)")
        if name in ("train", "config"):
            p.add_argument("--mesh", default="",
                           help="devices per mesh axis, e.g. data=2,fsdp=2,tensor=2 (axes: "
                                "data, stage, fsdp, expert, tensor; one may be -1 = the rest)")
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
    _serve_parsers(sub)
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
