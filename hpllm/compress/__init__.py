"""Model compression: weight quantization and the int8 KV cache (quantize.py), pruning
(prune.py)."""
