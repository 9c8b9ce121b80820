"""Speculative decoding (Leviathan, Kalman & Matias 2023): a cheap draft proposes tokens, the
target scores them all in one pass, an accept/reject rule keeps a prefix, and every emitted
token is distributed exactly as the target's own sampling (greedy: identical tokens).

    accept.py         the accept/reject rule and the filtered distributions it compares
    control.py        adaptive draft length, acceptance statistics, who may speculate
    proposers.py      the drafts: n-gram prompt lookup, the target's first layers, a
                      distilled model (shared by both paths below)
    single_stream.py  one stream with a dense KV cache (`hpllm generate --speculative`)
    engine_steps.py   inside the paged, continuously batched engine (`hpllm serve`)
"""
