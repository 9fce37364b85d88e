"""Generation throughput of the target: batched rows vs one prompt at a time, side by side in one run.

    python scripts/bench_generate.py                       # SmolLM2-135M-Instruct (GGUF, fp32), CPU
    python scripts/bench_generate.py --prompts 32 --batch-sizes 1,8,32 --max-new-tokens 128

The prompts are the first ``--prompts`` ShareGPT conversations cut before their first assistant turn, rendered
with the target's chat template (what ``dflash-jax regenerate`` feeds it), at most ``--max-prompt-len`` tokens.
Every batch size decodes the same prompts greedily with :class:`dflash_jax.generate.Generator` (the loop of
``regenerate``, eval and ``generate.greedy_generate``), stopping at the template's end of turn; tokens/s counts
generated tokens only (rows that stopped early do not count while they wait) over the compiled runs' wall time
(compiles excluded: every shape runs once before it is timed); "decoding" excludes the prefill (timed apart:
the same batches with a one-token limit) and its first token. Prompts are sorted by length, so a batch's prompt
bucket (its longest prompt's, a power of two) wastes little; one at a time, each prompt has its own bucket. The
outputs of every batch size are checked equal to batch size 1's, token for token.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np

from dflash_jax import config as config_lib
from dflash_jax import generate
from dflash_jax import regenerate as regen
from dflash_jax.data import chat, pipeline, readers
from dflash_jax.train import run as run_lib


def load_prompts(renderer: chat.ChatRenderer, n: int, max_len: int) -> list[np.ndarray]:
    """Token ids of the first ``n`` ShareGPT prompts of at most ``max_len`` tokens."""
    out = []
    for conv in readers.read_conversations("sharegpt"):
        prefix = None if isinstance(conv, readers.Skip) else pipeline.prompt_of(conv)
        if prefix is not None:
            ids = renderer.render_prompt(prefix)
            if 0 < ids.size <= max_len:
                out.append(ids)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} ShareGPT prompts of <= {max_len} tokens")


def run(
    gen: generate.Generator, prompts: list[np.ndarray], batch: int, max_new: int, stop: tuple[int, ...]
) -> tuple[list[np.ndarray], float, float]:
    """Greedy outputs of all prompts in batches of ``batch`` (the last one padded with one-token rows; prompt
    bucket = the batch's longest prompt's), the seconds of the compiled runs and the seconds of their prefill
    alone (the same batches with a one-token limit). Every shape runs once untimed first (compile)."""
    outs, secs, prefill = [], 0.0, 0.0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        pad = batch - len(chunk)
        rows = chunk + [np.zeros((1,), np.int32)] * pad
        kw = dict(
            eos_token_ids=stop,
            prompt_bucket=generate.bucket_length(max(p.size for p in chunk)),
            capacity=generate.bucket_length(max_new),
        )
        for limit in (1, max_new):
            limits = [limit] * len(chunk) + [1] * pad
            gen(rows, limits, **kw)  # compile (cached per shape) and warm up
            res = gen(rows, limits, **kw)
            if limit == 1:
                prefill += res.seconds
        outs += res.tokens[: len(chunk)]
        secs += res.seconds
    return outs, secs, prefill


def step_scaling(gen: generate.Generator, vocab: int, sizes: list[int], cache_lens: list[int]) -> None:
    """Print the decode-step time per batch size and cache length (prompt bucket and capacity half of it each):
    32-token random prompts, step = (time of 33 tokens - time of 1) / 32 (no EOS), best of 2 runs after a compile
    run."""
    rng = np.random.default_rng(0)
    for cache_len in cache_lens:
        for b in sizes:
            prompts = [rng.integers(0, vocab, 32).astype(np.int32) for _ in range(b)]
            kw = dict(prompt_bucket=cache_len // 2, capacity=cache_len // 2)
            secs = {}
            for limit in (1, 33):
                gen(prompts, limit, **kw)
                secs[limit] = min(gen(prompts, limit, **kw).seconds for _ in range(2))
            step = (secs[33] - secs[1]) / 32
            print(
                f"cache {cache_len:4d} slots, batch {b:3d}: decode step {1000 * step:.0f} ms, {b / step:.1f} tokens/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2", help="target.path (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=16, help="number of prompts (default %(default)s)")
    ap.add_argument(
        "--batch-sizes", default="1,16", help="comma-separated batch sizes; 1 = one at a time (default %(default)s)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default %(default)s)")
    ap.add_argument("--max-prompt-len", type=int, default=256, help="longest prompt (default %(default)s)")
    ap.add_argument(
        "--step-scaling",
        default="",
        metavar="CACHE_LENS",
        help="instead: decode-step time for every --batch-sizes entry at these comma-separated KV-cache lengths "
        "(even, >= 128: half prompt bucket, half new-token capacity; random prompts, no EOS), e.g. 128,512",
    )
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    target = run_lib.build_target(config_lib.TargetSection(path=args.target))
    renderer = chat.ChatRenderer.from_target(target)
    stop = regen.stop_token_ids(target, renderer)
    prompts = load_prompts(renderer, args.prompts, args.max_prompt_len)
    prompts.sort(key=len)  # batches of similar lengths (smaller prompt buckets)
    gen = generate.Generator(target.model)
    c = target.config
    print(
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"device: {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} cpu cores"
    )
    print(f"target: {args.target} ({c.arch}, L={c.num_layers}, H={c.hidden_size}, V={c.vocab_size}), float32")
    print(
        f"prompts: {len(prompts)} ShareGPT prompts, {min(p.size for p in prompts)}-{max(p.size for p in prompts)} "
        f"tokens, greedy, <= {args.max_new_tokens} new tokens, stop ids {list(stop)}"
    )
    if args.step_scaling:
        step_scaling(gen, c.vocab_size, sizes, [int(x) for x in args.step_scaling.split(",")])
        return
    results = {}
    for b in sizes:
        outs, secs, prefill = run(gen, prompts, b, args.max_new_tokens, stop)
        n = sum(o.size for o in outs)
        results[b] = (outs, n / secs, (n - len(outs)) / (secs - prefill))
        same = all(np.array_equal(x, y) for x, y in zip(outs, results[sizes[0]][0]))
        print(
            f"batch {b:3d}: {n} tokens in {secs:.2f} s (prefill {prefill:.2f} s) -> {n / secs:.1f} tokens/s "
            f"end to end, {results[b][2]:.1f} tokens/s decoding; outputs equal to batch {sizes[0]}: {same}"
        )
    for b in sizes[1:]:
        print(
            f"speedup batch {b} vs batch {sizes[0]}: {results[b][1] / results[sizes[0]][1]:.2f}x end to end, "
            f"{results[b][2] / results[sizes[0]][2]:.2f}x decoding"
        )


if __name__ == "__main__":
    main()
