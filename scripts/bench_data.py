"""Data path at scale: prepare (1 and 2 workers), store size, train start-up and peak RSS of the data path, the
token store against the in-memory pipeline (``pipeline.build_iterator``) on the same synthetic files, the
loader's throughput against the qwen3-8b recipe step's consumption, and the store's format (memory-mapped ``.npy``)
against ArrayRecord on the same examples (size on disk, random-access reads).

    python scripts/bench_data.py [--sizes 2000,20000,200000] [--workers 1,2] [--old-cap-mb 12000] [--out DIR]

The synthetic file: the embedded ShareGPT conversations replicated with varied text (a counter in every turn),
SmolLM2 tokenizer and template, seq_len 3072, packing (configs/smollm2-135m.yaml otherwise). Start-up = from
nothing built to the first batch in hand (the target's weights are not read: the data path only), in a fresh
process each; RSS = that process's peak resident set minus its peak after the imports. The in-memory pipeline is
stopped when its RSS passes ``--old-cap-mb`` (the machine would swap or kill it): its row then reads ``> CAP
after S s``. The qwen3-8b step consumes ``data.batch_size * data.seq_len`` tokens (32 x 3072).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

OVERRIDES = [
    "target.path=smollm2",
    "data.seq_len=3072",
    "data.packing=true",
    "data.max_conversations=null",
    "data.batch_size=32",
]


def synthetic_file(path: str, n: int) -> str:
    """``n`` conversations as OpenAI JSONL: the ShareGPT ones in turn, copy ``c`` with `` #c`` in every turn."""
    from dflash_jax.data import readers

    base = [c for c in readers.read_conversations(readers.SHAREGPT_PACKAGE) if not isinstance(c, readers.Skip)]
    with open(path, "w") as f:
        for i in range(n):
            conv = base[i % len(base)]
            f.write(json.dumps({"messages": [{"role": r, "content": f"{t} #{i}"} for r, t in conv]}) + "\n")
    return path


def _config(path: str, extra: list[str]):
    from dflash_jax import config as config_lib

    return config_lib.load_config("smollm2-135m", [*OVERRIDES, f"data.path={path}", *extra])


def _renderer(config):
    from dflash_jax.train import run

    return run.assemble(config, only=lambda name: False)[1]


def _rss_mb() -> float:
    """The current resident set (``/proc/self/statm``), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stop_above(cap_mb: float, base_mb: float, t0: float) -> None:
    """Print the capped measurement and end the process once its RSS exceeds ``base_mb + cap_mb``."""
    while _rss_mb() - base_mb <= cap_mb:
        time.sleep(0.5)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_mb": _rss_mb() - base_mb, "capped": True}), flush=True)
    os._exit(0)


def child(mode: str, path: str, store: str, arg: int) -> dict:
    """One measurement in this process: ``prepare`` (``arg`` workers) / ``start`` (store) / ``old`` (in-memory,
    stopped above ``arg`` MB) / ``throughput`` / ``formats`` (``arg`` examples)."""
    from dflash_jax.data import loader, pipeline
    from dflash_jax.data import store as store_lib

    config = _config(path, [f"data.prepare_workers={arg if mode == 'prepare' else 1}"])
    renderer = _renderer(config)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out: dict = {}
    if mode == "prepare":
        store_lib.prepare(config.data, renderer, store)
    elif mode == "old":
        threading.Thread(target=_stop_above, args=(arg, base_rss / 1024, t0), daemon=True).start()
        pipeline.build_iterator(config.data, renderer).next()
    elif mode == "formats":
        out = formats(store, arg)
    else:
        it = loader.build_loader(config.data, renderer, store)
        it.next()
        if mode == "throughput":
            t1, tokens, n = time.perf_counter(), 0, 200
            for _ in range(n):
                batch, _ = it.next()
                tokens += int((batch["segment_ids"] > 0).sum())
            out["tokens_per_s"] = tokens / (time.perf_counter() - t1)
            out["batch_tokens"] = int(batch["input_ids"].size)
        it.close()
    out["seconds"] = time.perf_counter() - t0
    out["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return out


def formats(store: str, n: int) -> dict:
    """The store's first ``n`` examples read in one random order from the store and from ArrayRecord files of the
    same examples (one record each: the int32 tokens then the uint8 mask; ``group_size:1``, grain's random-access
    setting, with its default compression and uncompressed): MB on disk, write seconds, examples and tokens per
    second, each read decoded to the arrays the loader yields."""
    import grain
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from dflash_jax.data import store as store_lib

    st = store_lib.TokenStore(store)
    n = min(n, len(st))
    order = [int(i) for i in np.random.default_rng(0).permutation(n)]
    tokens = int(st.lengths[:n].sum())

    def reads(get) -> dict:
        t = time.perf_counter()
        for i in order:
            get(i)
        dt = time.perf_counter() - t
        return {"examples_per_s": n / dt, "tokens_per_s": tokens / dt}

    out = {"examples": n, "npy": {"mb": 5 * tokens / 2**20, **reads(st.__getitem__)}}

    def decode(record: bytes):
        length = len(record) // 5
        ids = np.frombuffer(record, np.int32, length)
        return ids, np.frombuffer(record, np.uint8, offset=4 * length).astype(np.float32)

    for name, options in (("array_record", "group_size:1"), ("array_record_uncompressed", "group_size:1,uncompressed")):
        file = os.path.join(os.path.dirname(store), f"{name}.array_record")
        t = time.perf_counter()
        writer = ArrayRecordWriter(file, options)
        for i in range(n):
            ids, mask = st[i]
            writer.write(ids.tobytes() + mask.astype(np.uint8).tobytes())
        writer.close()
        write_s = time.perf_counter() - t
        source = grain.sources.ArrayRecordDataSource([file])
        out[name] = {"mb": os.path.getsize(file) / 2**20, "write_s": write_s, **reads(lambda i: decode(source[i]))}
        os.remove(file)
    return out


def _measure(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000,200000")
    ap.add_argument("--workers", default="1,2", help="worker counts to prepare each size with (comma-separated)")
    ap.add_argument("--old-cap-mb", type=int, default=12000, help="stop the in-memory pipeline above this RSS")
    ap.add_argument("--format-examples", type=int, default=20000, help="examples the format comparison reads")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path, store, arg = args.child
        print(json.dumps(child(mode, path, store, int(arg))))
        return
    import grain
    import jax

    import dflash_jax

    work = args.out or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, jax {jax.__version__}, grain {grain.__version__}, "
        f"dflash_jax {dflash_jax.__version__}; seq_len 3072, packing, SmolLM2 tokenizer"
    )
    workers = [w.strip() for w in args.workers.split(",")]
    print(
        "conversations | "
        + " | ".join(f"prepare {w} worker{'s' * (w != '1')} s" for w in workers)
        + " | store MB | start-up store s | RSS store MB | start-up in-memory s | RSS in-memory MB"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        src = synthetic_file(os.path.join(work, f"conv{n}.jsonl"), n)
        prep = [_measure("prepare", src, os.path.join(work, f"store{n}_{w}"), w)["seconds"] for w in workers]
        store = os.path.join(work, f"store{n}_{workers[0]}")
        start = _measure("start", src, store, "1")
        old = _measure("old", src, store, str(args.old_cap_mb))
        old_cells = (
            f"> {old['rss_mb']:.0f} MB after {old['seconds']:.1f} s (stopped) | > {args.old_cap_mb}"
            if old.get("capped")
            else f"{old['seconds']:.1f} | {old['rss_mb']:.0f}"
        )
        print(
            f"{n} | {' | '.join(f'{t:.1f}' for t in prep)} | {_size_mb(store):.1f} | {start['seconds']:.2f} | "
            f"{start['rss_mb']:.0f} | {old_cells}",
            flush=True,
        )
    tp = _measure("throughput", src, store, "1")
    need = 32 * 3072
    print(
        f"loader: {tp['tokens_per_s']:.3g} real tokens/s (batch {tp['batch_tokens']} tokens); the qwen3-8b step "
        f"consumes {need} tokens: the loader keeps up with any step slower than {need / tp['tokens_per_s']:.3f} s"
    )
    fm = _measure("formats", src, store, str(args.format_examples))
    print(f"format ({fm['examples']} examples, one random order) | MB on disk | write s | examples/s | tokens/s")
    for name in ("npy", "array_record", "array_record_uncompressed"):
        r = fm[name]
        write = f"{r['write_s']:.1f}" if "write_s" in r else "(prepare)"
        print(f"{name} | {r['mb']:.1f} | {write} | {r['examples_per_s']:.3g} | {r['tokens_per_s']:.3g}")


if __name__ == "__main__":
    main()
