"""Where hpllm keeps what it fetches or measures once: $HPLLM_CACHE, else ~/.cache/hpllm."""

import os
import pathlib


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HPLLM_CACHE") or "~/.cache/hpllm").expanduser()
