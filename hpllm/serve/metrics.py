"""Prometheus metrics of one server, named after vLLM's (with an `hpllm:` prefix).

Each app has its own CollectorRegistry (two servers in one process never share counts).
Engine-wide state (running/waiting requests, KV usage, prefix cache and token counters) is
read at scrape time from the AsyncEngine's latest stats snapshot, so it is current even when
no step has run since (an abort, for instance). Per-request latencies are observed when a
request finishes, by a step listener on the engine thread (prometheus-client is thread-safe).

Compilations are seen through jax.monitoring: JAX records BACKEND_COMPILE_EVENT for every
executable it builds, loaded from the persistent cache or compiled, on the thread that
needed it. `hpllm_compilations_after_ready_total` counts those after the engine was ready
(where="engine" on its thread, which should stay 0 for the life of the server; "other" for
the rest of the process: embeddings, prompt scoring); `hpllm:jax_cache_total` counts the
process's persistent-cache lookups by result (a miss is an entry compiled and written).
"""

from __future__ import annotations

import logging
import threading
import weakref

import jax
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_log = logging.getLogger("hpllm.serve")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class _EngineCollector:
    """Gauges and counters taken from the engine's stats at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.stats
        labels = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"hpllm:{name}", doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"hpllm:{name}", doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s["running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                    s["kv_usage"])
        yield gauge("kv_cache_free_blocks", "KV cache blocks free or evictable.",
                    s["free_blocks"])
        yield gauge("kv_cache_num_blocks", "Usable KV cache blocks.", s["num_blocks"])
        yield gauge("num_requests_pending", "Requests the server holds (queued, running or "
                    "being added).", self.engine.num_pending)
        yield counter("prefix_cache_queries", "Prompt blocks looked up in the prefix cache.",
                      s["prefix_queries"])
        yield counter("prefix_cache_hits", "Prompt blocks found in the prefix cache.",
                      s["prefix_hits"])
        yield counter("prompt_tokens", "Prompt tokens received.", s["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", s["generation_tokens"])
        yield counter("num_preemptions", "Sequences preempted for lack of KV blocks.",
                      s["preemptions"])
        yield counter("engine_steps", "Engine steps run.", s["steps"])
        yield counter("engine_step_tokens", "Tokens the steps scheduled (decodes, drafts, "
                      "prefill chunks).", s["batched_tokens"])
        yield counter("engine_step_padded_tokens", "Tokens the steps' passes ran, padding "
                      "to the compiled token buckets included.", s["padded_tokens"])
        yield counter("engine_step_seconds", "Seconds spent in engine steps.",
                      s["step_seconds"])
        lookups = CounterMetricFamily("hpllm:jax_cache", "Persistent compilation cache "
                                      "lookups of this process, by result (miss: compiled "
                                      "and written).", labels=["model_name", "result"])
        for result, count in JAX_CACHE.items():
            lookups.add_metric([self.model_name, result], count)
        yield lookups
        if "spec_proposed" in s:  # vLLM's spec_decode_* counters
            yield counter("spec_decode_num_draft_tokens", "Draft tokens scored by the target.",
                          s["spec_proposed"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                          s["spec_accepted"])


# the event names of the installed jax (jax/_src/dispatch.py, compiler.py, compilation_cache.py)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
_watchers: weakref.WeakSet = weakref.WeakSet()  # the live ServerMetrics
# persistent-cache lookups of this process since this module was imported (before the
# weights load): "miss" = compiled and written
JAX_CACHE = {"hit": 0, "miss": 0}


def _on_duration(event: str, duration: float, fun_name: str = "?", **_) -> None:
    if event == BACKEND_COMPILE_EVENT:
        for w in list(_watchers):
            w.on_compile(fun_name, duration)


def _on_event(event: str, **_) -> None:
    if event in (CACHE_HIT_EVENT, CACHE_MISS_EVENT):
        JAX_CACHE["hit" if event == CACHE_HIT_EVENT else "miss"] += 1


# once per process (there is one JAX), dispatching to every live ServerMetrics
jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.engine = engine
        self.registry.register(_EngineCollector(engine, model_name))
        self.compilations = Counter(
            "hpllm_compilations_after_ready", "Executables JAX built (compiled or loaded from "
            "the persistent cache) after the engine was ready, by thread: engine (a step met "
            "a shape warm-up did not cover) or other.", ["model_name", "where"],
            registry=self.registry)
        self.after_ready = {"engine": 0, "other": 0}  # the same counts, for /stats
        for where in self.after_ready:  # exported as 0 from the start
            self.compilations.labels(model_name, where)
        _watchers.add(self)

        def histogram(name, doc):
            return Histogram(f"hpllm:{name}", doc, ["model_name"], registry=self.registry,
                             buckets=_LATENCY_BUCKETS).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        self.success = Counter("hpllm:request_success", "Requests finished, by reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.errors = Counter("hpllm:request_errors", "Requests answered with an error, by "
                              "HTTP status.", ["model_name", "status"], registry=self.registry)

    def on_step(self, core, outputs) -> None:
        """A step listener (engine thread): record the requests that just finished."""
        for out in outputs:
            if out.finished:
                try:
                    self.observe_finished(out)
                except Exception:  # noqa: BLE001 - metrics must never stop the engine
                    pass

    def observe_finished(self, out) -> None:
        m = out.metrics
        if m.first_token is not None:
            self.ttft.observe(m.first_token - m.arrival)
        if m.first_scheduled is not None:
            self.queue.observe(m.first_scheduled - m.arrival)
        end = m.finished or m.last_token
        if end is not None:
            self.e2e.observe(end - m.arrival)
        if len(out.outputs) == 1:  # with n > 1 the samples' token times interleave
            times = m.token_times
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.success.labels(self.model_name, reason or "unknown").inc()

    def on_compile(self, name: str, seconds: float) -> None:
        """A jax.monitoring listener (on the compiling thread); names the first few in the
        log, since each is a shape the warm-up missed or work outside the engine."""
        if self.engine.ready.is_set():
            where = ("engine" if threading.get_ident() == self.engine.thread_id else "other")
            self.after_ready[where] += 1
            self.compilations.labels(self.model_name, where).inc()
            if sum(self.after_ready.values()) <= 20:
                _log.warning("compiled %s after ready (%s thread, %.2f s)", name, where,
                             seconds)

    def count_error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
