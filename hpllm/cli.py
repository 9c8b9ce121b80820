"""`hpllm` command line: parse, call the library, print. Nothing here a Python user lacks."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from hpllm.config import (DEFAULT_PRESET, PRESETS, ConfigError, EngineConfig, ServerConfig,
                          add_options, from_options, make_config, option_dest)

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
    import json

    import jax

    from hpllm.perf import hardware

    if extra:
        raise ConfigError(f"hpllm hw takes no overrides, got {' '.join(extra)}")
    if jax.devices()[0].platform != "cpu":  # an accelerator: its datasheet figures
        chip = hardware.current_chip()
        print(f"{chip.name}: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in
                                           chip.peak_flops.items())
              + f", memory {chip.hbm_bandwidth / 1e9:.0f} GB/s ({chip.source})")
        out = {"chip": chip.name, "peak_flops": chip.peak_flops,
               "read_bandwidth": chip.hbm_bandwidth, "source": chip.source}
    else:
        # --decoder --force: only the decoder's figures again (the rest from the cache)
        again = args.refresh or (args.force and not args.decoder)
        out = hardware.cpu_figures(refresh=again, force=args.force)
        if args.decoder:  # measured on its own: only when asked, or a prediction needs it
            out["decoder"] = hardware.decoder_figures(refresh=True, force=args.force)
        load = out["load_average"]
        print(f"CPU ({hardware.cpu_name()}), {out['cores']} cores: "
              f"measured {out['measured_at']} at load {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
              + (" (busy: figures read low)" if out["busy"] else "")
              + ("" if out["cached"] else ", not cached"))
        print("  matmul peak (jitted 2048^3): " + ", ".join(
            f"{d} {out[d] / 1e12:.3f} T{'OP' if d == 'int8' else 'FLOP'}/s"
            for d in hardware.MATMUL_DTYPES))
        if out.get("bfloat16_kernel"):  # what bf16 training's projections run on (MFU's peak)
            print(f"  bf16 matmul kernel (AVX512-BF16, 2048^3): "
                  f"{out['bfloat16_kernel'] / 1e12:.3f} TFLOP/s")
        print(f"  memory ({out['probe']}): read {out['read_bandwidth'] / 1e9:.1f} GB/s, "
              f"copy {out['copy_bandwidth'] / 1e9:.1f} GB/s (read + write)")
        print(f"  XLA runtime: mat-vec chain {out['matvec_bandwidth'] / 1e9:.1f} GB/s of "
              f"weights + {out.get('matvec_dot_s', 0) * 1e6:.1f} us per dot; "
              f"{out['op_overhead_s'] * 1e6:.2f} us per op, "
              f"{out['call_overhead_s'] * 1e6:.0f} us per call")
        if out.get("int8_matvec_bandwidth"):
            print(f"  int8 kernel: mat-vec chain {out['int8_matvec_bandwidth'] / 1e9:.1f} GB/s "
                  f"of codes + scales + {out['int8_matvec_dot_s'] * 1e6:.1f} us per call")
        for kind, rates in out.get("batched_flops", {}).items():
            if rates:
                print(f"  {kind} dot chain at rows " + ", ".join(
                    f"{m}: {r / 1e9:.0f}" for m, r in rates.items()) + " GFLOP/s")
        dec = out.get("decoder") or {}
        if dec:  # the fused decoder kernel: what generate() and the engine run on CPU
            stale = not hardware.decoder_fresh(dec)
            print("  decoder kernel: weights " + ", ".join(
                f"{f} {r / 1e9:.1f} GB/s" for f, r in dec["stream_bandwidth"].items())
                + "; per layer " + ", ".join(f"{m}: {s * 1e6:.1f}" for m, s in
                                             dec["layer_s"].items())
                + " us, per call " + ", ".join(f"{m}: {s * 1e6:.0f}" for m, s in
                                               dec["call_s"].items())
                + f" us (tokens: value), at load {dec['load_average'][0]:.2f}"
                + ("; stale: measured on other kernel sources (`hpllm hw --decoder`)"
                   if stale else ""))
        out["peak_flops"] = {d: out[d] for d in hardware.MATMUL_DTYPES}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def cmd_roofline(args, extra) -> int:
    import json

    from hpllm.perf import roofline
    from hpllm.perf.hardware import CHIPS, current_chip

    config = make_config(args.preset, extra)
    if args.quant and args.quant not in roofline.QUANT_ROW_BYTES:
        raise ConfigError(f"the roofline counts --quant {' or '.join(roofline.QUANT_ROW_BYTES)}"
                          f" weights, not {args.quant}")
    if args.quant and args.workload in ("train", "all"):
        raise ConfigError("--quant is for the prefill, decode and engine workloads")
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
                         repeats=args.repeats, quant=args.quant, backend=args.backend)
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


def cmd_cost_train(args, extra) -> int:
    from hpllm.perf import cost

    if extra:
        raise ConfigError(f"hpllm cost takes no overrides, got {' '.join(extra)}")
    chip = cost.chip(args.chip)
    if args.gpu_hours and (args.params or args.tokens):
        raise ConfigError("give --gpu-hours, or --params and --tokens, not both")
    if args.gpu_hours:
        hours = args.gpu_hours
    elif args.params and args.tokens:
        hours = cost.gpu_hours_for(args.params, args.tokens, chip, args.mfu)
        print(f"6·P·T = {cost.training_flops(args.params, args.tokens):.3g} FLOPs at "
              f"{args.mfu:.0%} MFU of {chip.name}'s {chip.peak('bfloat16') / 1e12:.0f} "
              "TFLOP/s (bf16 dense)")
    else:
        raise ConfigError("give --gpu-hours H, or --params P and --tokens T")
    watts = cost.chip_watts(chip, args.watts)
    print(f"{cost.train_cost(hours, watts, args.pue, args.grid)} ({chip.name} at {watts:.0f} "
          f"W, PUE {args.pue:g}, {args.grid:g} kgCO2e/kWh)")
    return 0


def cmd_cost_serve(args, extra) -> int:
    from hpllm.perf import cost

    if extra:
        raise ConfigError(f"hpllm cost takes no overrides, got {' '.join(extra)}")
    if args.model not in cost.MODELS:
        raise ConfigError(f"unknown --model {args.model!r}; known: {', '.join(cost.MODELS)}")
    model = cost.MODELS[args.model]
    params = args.params or model.params
    if args.price:
        if args.gpus < 1:
            raise ConfigError("--price needs --gpus (GPUs the price buys)")
        name, price, gpus, chip = "the instance", args.price, args.gpus, cost.chip(args.chip)
    else:
        inst = cost.instance(args.instance)
        name, price, gpus = inst.name, inst.dollars_per_hour, inst.gpus
        chip = cost.chip(args.chip or inst.chip)
    kv_dtype = args.kv_dtype or args.dtype
    weights = cost.weight_bytes(params, args.dtype)
    kv = cost.kv_bytes(model, args.context, kv_dtype)
    memory = gpus * chip.hbm_bytes
    print(f"{args.model} ({model.source}): weights {weights / 1e9:.1f} GB in {args.dtype}; "
          f"KV cache {kv / 1e6:.1f} MB per {args.context:,}-token sequence ({kv_dtype})")
    if args.model in cost.COURSE_KV_2048 and args.context == 2048:
        print(f"  note: {cost.COURSE_KV_NOTE}")
    room = (memory - weights) / kv
    print(f"{name}: {gpus} x {chip.name}, {memory / 1e9:.0f} GB, ${price:.4f}/h: "
          + (f"room for {room:,.0f} such sequences beside the weights" if room >= 1 else
             f"the weights do not fit ({weights / memory:.1f}x its memory)"))
    if args.tokens_per_s:
        rate, how = args.tokens_per_s, "given"
    else:
        rate = cost.decode_tokens_per_s(params, weights / params, chip, gpus, args.batch, kv,
                                        args.dtype)
        how = (f"roofline: batch {args.batch} at context {args.context:,}, weights and KV "
               f"read once per step over {gpus} x {chip.hbm_bandwidth / 1e9:.0f} GB/s, "
               "inter-GPU traffic left out")
    print(f"{rate:,.0f} output tokens/s ({how}): "
          f"${cost.dollars_per_million_tokens(price, rate):.2f} per million output tokens")
    return 0


def _cost_parsers(sub) -> None:
    from hpllm.perf.cost import GRID_KG_PER_KWH, INSTANCES, MODELS, PUE

    p = sub.add_parser("cost", help="what training (GPU-hours, MWh, tCO2e) and serving "
                                    "($ per million tokens) cost")
    cost = p.add_subparsers(dest="cost_command", required=True)
    p = cost.add_parser("train", help="energy and emissions from GPU-hours or 6·P·T FLOPs")
    p.add_argument("--gpu-hours", type=float, default=0.0)
    p.add_argument("--params", type=float, default=0.0, help="parameters (e.g. 6.7e9)")
    p.add_argument("--tokens", type=float, default=0.0, help="training tokens (e.g. 1e12)")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOP utilisation (0-1)")
    p.add_argument("--chip", default="a100", help="chip table key (a100, h100, tpu-v4, ...)")
    p.add_argument("--watts", type=float, default=0.0, help="power per GPU (default: TDP)")
    p.add_argument("--pue", type=float, default=PUE, help="data-centre PUE")
    p.add_argument("--grid", type=float, default=GRID_KG_PER_KWH,
                   help="grid carbon intensity, kgCO2e/kWh")
    p.set_defaults(fn=cmd_cost_train)
    p = cost.add_parser("serve", help="$ per million output tokens, and the memory it needs")
    p.add_argument("--model", default="falcon-7b", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--params", type=float, default=0.0, help="override the parameter count")
    p.add_argument("--instance", default="g5.12xlarge", help=f"one of {', '.join(INSTANCES)}")
    p.add_argument("--price", type=float, default=0.0, help="$/hour instead of --instance")
    p.add_argument("--gpus", type=int, default=0, help="GPUs the --price buys")
    p.add_argument("--chip", default="", help="chip table key (default: the instance's)")
    p.add_argument("--tokens-per-s", type=float, default=0.0,
                   help="measured output throughput (default: predict it)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype (float32, bfloat16, "
                                                       "int8, int4)")
    p.add_argument("--kv-dtype", default="", help="KV cache dtype (default: --dtype)")
    p.set_defaults(fn=cmd_cost_serve)


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
    """generate/chat: the SamplingParams and the EngineConfig (kv_dtype and, for generate,
    the speculative fields) of the options; errors before anything is loaded."""
    from hpllm.infer.sampling import SamplingParams

    s = from_options(SamplingParams, args)
    if s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and "
                          "--max-tokens >= 1")
    return s, from_options(EngineConfig, args).validate()


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

    sampling, spec = _sampling(args)
    if not args.prompt:
        raise ConfigError("--prompt is empty")
    model = _load(args)
    stats = Stats()
    if spec.speculative:  # hpllm.infer.speculative: same output distribution, fewer passes
        from hpllm.infer.speculative.single_stream import make_draft, stream_speculative_text

        draft = make_draft(spec.speculative, model, spec.draft_layers)  # errors before output
        pieces = stream_speculative_text(model, args.prompt, sampling, draft,
                                         spec.num_speculative_tokens, spec.speculative_adaptive,
                                         stats=stats)
    else:
        pieces = complete(model, args.prompt, sampling, stats, spec.kv_dtype)
    print(args.prompt, end="", flush=True)
    _stream(pieces, stats)
    return 0


def cmd_distill(args, extra) -> int:
    from hpllm.compress.distill import distill

    distill(args.model, minutes=args.minutes, dim=args.dim, n_layers=args.layers)
    return 0


def cmd_chat(args, extra) -> int:
    from hpllm.infer.text import ChatSession, Stats

    sampling, engine = _sampling(args)
    model = _load(args)
    session = ChatSession(model, sampling, kv_dtype=engine.kv_dtype)
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
    from hpllm.infer.perplexity import evaluate_texts
    from hpllm.train.data import shakespeare_validation_texts

    model = _load(args)
    result = evaluate_texts(model, shakespeare_validation_texts(), args.tokens, args.window,
                            progress=sys.stderr.isatty())
    print(f"Shakespeare validation: {result['tokens']} tokens ({result['bytes']} bytes, windows "
          f"of {result['window']}): perplexity {result['perplexity']:.3f}, "
          f"{result['nll_per_token']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte "
          f"({result['tokens_per_second']:.0f} tok/s)")
    return 0


def cmd_quantize(args, extra) -> int:
    from hpllm.checkpoints.quantized_checkpoint import save_quantized
    from hpllm.compress.quantize import param_bytes

    model = _load(args)
    save_quantized(args.out, model.config, model.params, model.tokenizer, args.quant,
                   group_size=args.group_size, threshold=args.threshold, source=str(model.path))
    print(f"wrote {args.out}: {args.quant} weights, {param_bytes(model.params) / 2**20:.1f} MiB "
          f"(load it with any model command; no --quant needed)")
    return 0


def _quant_args(p, required: bool = False) -> None:
    from hpllm.quantized import DEFAULT_GROUP_SIZE, DEFAULT_THRESHOLD, SCHEMES

    p.add_argument("--quant", choices=SCHEMES, required=required, default=None if required
                   else "", help="quantize the weights on load (default: as stored)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="int4: inputs per scale group")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="llm.int8: activation magnitude above which a feature is an outlier")


USAGE_OPTIONS = "options also take --key=value and --key-with-dashes value spellings"
# generate/chat: the SamplingParams fields the single stream applies, with their own defaults
SAMPLING_DEFAULTS = {
    "generate": dict(max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0),
    "chat": dict(max_tokens=256, temperature=0.7, top_k=0, top_p=0.9, seed=0)}
SAMPLING_HELP = {"max_tokens": "tokens to generate at most", "top_p": "nucleus sampling: keep "
                 "the most likely tokens up to this probability", "seed": "of the draws"}
SPECULATIVE_OPTIONS = ("speculative", "num_speculative_tokens", "speculative_adaptive",
                       "draft_layers")

MODEL_COMMANDS = ("pull", "generate", "chat", "eval-ppl", "quantize", "serve", "bench",
                  "distill")


def _model_parsers(sub) -> None:
    """pull / generate / chat / eval-ppl: each takes a model (registry name, .gguf or HF dir)."""
    model_help = "registry name (smollm2-135m), a .gguf file or a Hugging Face directory"
    p = sub.add_parser("pull", help="download a registry model into the cache")
    p.add_argument("model", help="registry name, e.g. smollm2-135m")
    p.set_defaults(fn=cmd_pull)
    from hpllm.infer.sampling import SamplingParams  # the sampling options (start-up time)

    for name, fn, text in [("generate", cmd_generate, "stream a continuation of --prompt"),
                           ("chat", cmd_chat, "multi-turn chat, one user message per stdin line")]:
        p = sub.add_parser(name, help=text, epilog=USAGE_OPTIONS)
        p.add_argument("model", help=model_help)
        if name == "generate":
            p.add_argument("--prompt", required=True)
        else:
            p.add_argument("--system", default="", help="system message (default: the "
                                                        "template's own)")
        defaults = SAMPLING_DEFAULTS[name]
        add_options(p, SamplingParams, defaults, only=tuple(defaults), helps=SAMPLING_HELP)
        add_options(p, EngineConfig, only=("kv_dtype", *(SPECULATIVE_OPTIONS if name ==
                                                         "generate" else ())),
                    aliases={"kv_dtype": ("--kv-cache",), "num_speculative_tokens": ("--gamma",)})
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
    engine = from_options(EngineConfig, args).validate()
    server = from_options(ServerConfig, args).validate()
    from hpllm.serve.api import serve  # FastAPI and the engine: only once the flags are good

    return serve(args.model, engine_config=engine, **dataclasses.asdict(server),
                 quant=args.quant, group_size=args.group_size, threshold=args.threshold)


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
            or args.burstiness <= 0 or args.warmup_prompts < 0:
        raise ConfigError("need --num-prompts >= 1, --concurrency >= 0, --request-rate > 0, "
                          "--burstiness > 0, --warmup-prompts >= 0")
    summary = bench_serve(args.base_url, args.num_prompts, args.concurrency,
                          args.request_rate, args.burstiness,
                          span(args.prompt_len, "--prompt-len"),
                          span(args.output_len, "--output-len"), args.seed, args.model,
                          args.tokenizer or None, warmup_prompts=args.warmup_prompts)
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
    print(f"{summary['config']['model']} at {args.base_url}: {args.num_prompts} prompts, "
          f"rate {rate}, concurrency {args.concurrency or 'unlimited'}")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    leaked = (summary["server"] or {}).get("kv_blocks_leaked", 0)
    return 0 if summary["errors"] == 0 and leaked == 0 else 1


def _serve_parsers(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, "
                                     "streaming, /metrics)", epilog=USAGE_OPTIONS)
    p.add_argument("model", help="registry name (smollm2-135m), a .gguf file or a Hugging Face "
                                 "directory")
    add_options(p, ServerConfig)
    add_options(p, EngineConfig, aliases={"kv_memory_mb": ("--kv-memory",)})
    p.add_argument("--no-prefix-caching", dest=option_dest(EngineConfig, "enable_prefix_caching"),
                   action="store_const", const="false", default=argparse.SUPPRESS,
                   help="the same as --enable_prefix_caching=false")
    _quant_args(p)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("bench", help="benchmarks; `hpllm bench serve` loads a running server")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("serve", help="load a running OpenAI-compatible server with "
                                       "Shakespeare prompts; TTFT, TPOT, ITL, throughput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="", help="model id and tokenizer (default: the "
                                               "server's model, read from /v1/models)")
    p.add_argument("--tokenizer", default="", help="registry name, .gguf or HF directory to "
                                                   "tokenize prompts with (default: --model)")
    p.add_argument("--warmup-prompts", type=int, default=8,
                   help="requests of other lengths sent first and not measured")
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
            p.add_argument("--force", action="store_true",
                           help="measure again and cache it even on a busy machine")
            p.add_argument("--decoder", action="store_true",
                           help="measure only the fused decoder kernel's figures again "
                                "(after the kernel changed)")
            p.add_argument("--json", default="", help="write the figures (bytes/s, FLOP/s, "
                                                      "load average) here")
        p.set_defaults(fn=fn)
    p = sub.add_parser("roofline", help="predict a workload's step time from the roofline "
                                        "(and --measure it)", epilog=USAGE_OVERRIDES)
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--workload", choices=("train", "prefill", "decode", "engine", "all"),
                   default="train", help="engine: the paged engine's batched decode step "
                                         "(--batch rows)")
    p.add_argument("--batch", type=int, default=0, help="default: batch_size (train), 1")
    _quant_args(p)
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (train, "
                                                           "prefill); default seq_len")
    p.add_argument("--context", type=int, default=0, help="KV length for decode; default "
                                                          "max_seq_len")
    p.add_argument("--mesh", default="", help="e.g. data=2,fsdp=4,tensor=2 (default 1 device)")
    p.add_argument("--chip", default="", help="a table chip (tpu-v4, h100, ...) instead of "
                                              "this machine")
    p.add_argument("--measure", action="store_true", help="also run it and compare")
    p.add_argument("--backend", choices=("auto", "kernel", "xla"), default="auto",
                   help="decode/engine: the fused CPU decoder kernel or XLA's program "
                        "(auto: what generate() and the engine choose)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="write the prediction (and measurement) here")
    p.add_argument("--plot", default="", help="write a roofline chart PNG here")
    p.set_defaults(fn=cmd_roofline)
    _cost_parsers(sub)
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
        print(f"hpllm: error: unrecognized arguments: {' '.join(extra)} (see hpllm "
              f"{args.command} --help)", file=sys.stderr)
        return 2
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
