"""Cache-free greedy decoding: the independent reference for the KV-cache decoding loops."""

from __future__ import annotations

import numpy as np
from flax import nnx


@nnx.jit
def _logits(model, input_ids):
    return model.logits(model(input_ids)[1])


def greedy_reference(model, prompt, max_new_tokens: int, stop_ids=(), length: int = 256) -> list[int]:
    """Greedy continuation of ``prompt`` by a ``TargetModel``: every step re-runs the full causal forward (no cache)
    on the sequence right-padded to ``length`` (causal attention: padding after the last real token cannot change
    its logits) and appends the argmax; stops after a token in ``stop_ids`` (kept)."""
    seq = [int(t) for t in prompt]
    out: list[int] = []
    while len(out) < max_new_tokens and not (out and out[-1] in stop_ids):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(seq)] = seq
        tok = int(np.argmax(np.asarray(_logits(model, padded))[0, len(seq) - 1]))
        out.append(tok)
        seq.append(tok)
    return out
