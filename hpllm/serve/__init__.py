"""OpenAI-compatible HTTP serving: protocol types (protocol.py), the app and its routes
(api.py), Prometheus metrics (metrics.py) and the load generator of `hpllm bench serve`
(bench.py)."""
