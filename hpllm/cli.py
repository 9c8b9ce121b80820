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
    args, extra = parser.parse_known_args(argv)
    from hpllm.checkpoints.orbax_io import CheckpointError
    from hpllm.train.data import DataError

    try:
        return args.fn(args, extra)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"hpllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
