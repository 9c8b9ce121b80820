"""OpenAI-compatible HTTP serving: protocol types (protocol.py), the app and its runner
(api.py), the routes (routes.py), their shared state and checks (state.py), server-sent
events (streaming.py), Prometheus metrics (metrics.py) and the load generator of
`hpllm bench serve` (bench.py)."""
