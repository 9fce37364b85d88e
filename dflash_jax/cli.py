"""``dflash-jax``: train, evaluate, export and import DFlash drafters, dump offline features, regenerate training
data with the target, run benchmarks.

Every subcommand explains its options with ``--help``. Errors in the user's input (config, paths, run
directories) print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_MISMATCH = 3  # eval --check-lossless found a speculative output that differs from plain decoding
EXIT_DIVERGED = 4  # train stopped: train.max_consecutive_skips consecutive non-finite updates
EXIT_NO_OUTPUT = 5  # regenerate / dump-features produced 0 rows (the reasons and the fix are printed)
EXIT_INTERRUPTED = 130  # train stopped by Ctrl-C after saving a checkpoint (128 + SIGINT)
EXIT_SIGNAL_BASE = 128  # train stopped by a train.stop_signals signal after saving a checkpoint: 128 + its number

log = logging.getLogger("dflash_jax")

_SET_HELP = (
    "override one config key, e.g. --set train.steps=50 --set mesh.shape=[2,2,2] "
    "(value parsed as YAML; repeatable; unknown keys are errors)"
)


# Flags that are thin aliases of config keys, per command: the flag's argparse dest -> the key it sets (after every
# --set, through the same validation as the YAML).
EVAL_ALIASES = {
    "num_prompts": "eval.num_prompts",
    "max_new_tokens": "eval.max_new_tokens",
    "temperature": "eval.temperature",
    "prompt_len": "eval.prompt_len",
    "seed": "eval.seed",
}
REGENERATE_ALIASES = {
    "max_new_tokens": "regenerate.max_new_tokens",
    "temperature": "regenerate.temperature",
    "top_p": "regenerate.top_p",
    "seed": "regenerate.seed",
    "batch_size": "regenerate.batch_size",
    "max_prompt_len": "regenerate.max_prompt_len",
    "num_conversations": "regenerate.num_conversations",
}
FEATURES_ALIASES = {
    "out": "train.features_dir",
    "max_rows": "features.max_rows",
    "dtype": "features.dtype",
    "shard_size": "features.shard_size",
    "forward_batch": "features.forward_batch",
}


def _alias_help(key: str, text: str = "") -> str:
    return f"{text + '; ' if text else ''}sets {key} (default from the config)"


def _add_config_args(parser: argparse.ArgumentParser, config_help: str, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)


def _load_config(path: str | None, args: argparse.Namespace, aliases: dict[str, str]):
    """The validated config of ``path`` (None: the defaults) with ``args.overrides`` and then every alias flag
    given applied as ``--set KEY=VALUE``; a validation error about a key a flag set names the flag too."""
    from dflash_jax import config as config_lib

    flags = {key: dest for dest, key in aliases.items() if getattr(args, dest) is not None}
    sets = [*args.overrides, *(f"{key}={json.dumps(getattr(args, dest))}" for key, dest in flags.items())]
    try:
        return config_lib.from_dict({}, sets) if path is None else config_lib.load_config(path, sets)
    except ValueError as e:
        named = [f"--{dest.replace('_', '-')}" for key, dest in flags.items() if key in str(e)]
        if named:
            raise ValueError(f"{e} (set by {', '.join(named)})") from None
        raise


def _scripts_dir() -> str:
    """``dflash_jax/scripts``: symlinks to the repository's ``scripts/bench_*.py``, the files themselves in a wheel
    (docs/design.md, "Shipped files")."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def _bench_names() -> list[str]:
    d = _scripts_dir()
    if not os.path.isdir(d):
        return []
    return sorted(f[len("bench_") : -3] for f in os.listdir(d) if f.startswith("bench_") and f.endswith(".py"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dflash-jax`` (one subparser per command)."""
    fmt = argparse.HelpFormatter
    p = argparse.ArgumentParser(
        prog="dflash-jax",
        formatter_class=fmt,
        description="JAX/Flax NNX trainer for DFlash speculative-decoding drafters with the D-PACE loss.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (including Orbax/absl messages)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train a drafter (progress bar, metrics, checkpoints, plots, export)",
        description="Train a drafter. Writes RUN_DIR/{config.yaml, draft_config.json, heldout.jsonl, "
        "metrics.jsonl, checkpoints/, export/, plots/} (and tb/ when TensorBoard is installed). "
        "Ctrl-C saves a checkpoint and exits with status 130 (Ctrl-C again aborts at once); SIGTERM / SIGUSR1 "
        "(train.stop_signals) likewise, exiting with 128 + the signal number (143 / 138); continue "
        "with --resume. Exits with status 4 if training diverges (train.max_consecutive_skips).",
    )
    t.add_argument(
        "--config",
        help="YAML config file or shipped config name (tiny, smollm2-135m, qwen3-8b); "
        "optional with --resume (default: RUN_DIR/config.yaml)",
    )
    t.add_argument(
        "--run-dir", required=True, help="run directory (must be empty or absent unless --resume or --overwrite)"
    )
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    g = t.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in RUN_DIR (the metrics equal an uninterrupted run's)",
    )
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in RUN_DIR and start over")
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (log lines only; also the case "
        "when stderr is not a terminal, e.g. redirected to a log file)",
    )

    e = sub.add_parser(
        "eval",
        formatter_class=fmt,
        help="speculative-decoding evaluation (tau, speedup, lossless check)",
        description="Speculative decoding with the drafter against its target on held-out prompts. "
        "Prints ONE JSON object last (tau, speedup, num_prompts, per-position acceptance, ...) and "
        "writes OUT/eval.json + OUT/acceptance_histogram.png. Exits with status 3 if "
        "--check-lossless finds a mismatch. Settings come from the config's eval section; "
        "--num-prompts/--max-new-tokens/--temperature/--prompt-len set its keys.",
    )
    _add_config_args(
        e,
        "YAML config or shipped config name whose eval section is used (default: the run's "
        "RUN/config.yaml; the built-in defaults for an export directory)",
        required=False,
    )
    e.add_argument(
        "--draft",
        required=True,
        help="a training run directory (uses RUN/export, else its latest "
        "checkpoint) or an exported drafter directory (config.json + model.safetensors)",
    )
    e.add_argument(
        "--target",
        help="target: HF checkpoint dir, .gguf file or 'smollm2' (default: the run's "
        "target.path; required for a bare export directory)",
    )
    e.add_argument(
        "--prompts",
        help="chat file (ShareGPT/OpenAI JSON or JSONL; user-only rows are fine), a plain "
        "text file with one prompt per line, or 'sharegpt'; each conversation is cut before its first "
        "assistant turn (default: RUN/heldout.jsonl, or 'sharegpt' for an export)",
    )
    e.add_argument(
        "--num-prompts",
        type=int,
        help="number of prompts; sets eval.num_prompts (default: all of a --prompts FILE, else eval.num_prompts)",
    )
    e.add_argument("--max-new-tokens", type=int, help=_alias_help("eval.max_new_tokens", "tokens generated per prompt"))
    e.add_argument(
        "--temperature", type=float, help=_alias_help("eval.temperature", "0 = greedy, > 0 = speculative sampling")
    )
    e.add_argument(
        "--prompt-len",
        type=int,
        help=_alias_help("eval.prompt_len", "keep the last N tokens of longer prompts, counted and warned"),
    )
    e.add_argument(
        "--check-lossless",
        action="store_true",
        help="greedy only: compare every output with plain target decoding; exit 3 on a mismatch",
    )
    e.add_argument("--seed", type=int, help=_alias_help("eval.seed", "sampling seed (temperature > 0)"))
    e.add_argument("--out", help="report directory (default: DRAFT/eval)")

    x = sub.add_parser(
        "export",
        formatter_class=fmt,
        help="export a run's checkpoint for vLLM / SGLang / z-lab",
        description="Write config.json + model.safetensors (z-lab / ModelOpt / vLLM / SGLang layout) "
        "from a training run's checkpoint.",
    )
    x.add_argument("--run-dir", required=True, help="training run directory")
    x.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty or a previous export (replaced "
        "atomically); never the run directory or a directory holding other files",
    )
    x.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    x.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="weight dtype of the export (default %(default)s)",
    )

    i = sub.add_parser(
        "import",
        formatter_class=fmt,
        help="read and check a z-lab / ModelOpt / dflash-jax drafter",
        description="Load an exported drafter (z-lab, ModelOpt or dflash-jax config.json + "
        "model.safetensors), validate it, print its config as JSON and optionally re-write it in "
        "the dflash-jax layout. Warm-start training from it with draft.init.",
    )
    i.add_argument("src", help="directory with config.json + model.safetensors")
    i.add_argument(
        "--out", help="re-export here (normalised config.json, chosen dtype): a new, empty or previous export directory"
    )
    i.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="weight dtype of the re-export (default %(default)s)",
    )

    pr = sub.add_parser(
        "prepare",
        formatter_class=fmt,
        help="render and tokenise data.path once into a token store (train with --set data.path=OUT)",
        description="Render and tokenise the configured data (data.path: JSON/JSONL, Parquet, a Hugging Face "
        "datasets directory) once with the target's tokenizer and chat template into a memory-mapped token store "
        "OUT (parts + manifest.json with the settings, counters and source hashes; target weights are not read). "
        "Atomic and resumable: re-running after a kill prepares only the missing parts. On several processes "
        "(jax.distributed) each prepares its share of the parts. Prints ONE JSON summary last.",
    )
    pr.add_argument("--config", required=True, help="YAML config file or shipped config name")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    pr.add_argument("--out", required=True, help="store directory (data.path of the training run)")
    pr.add_argument("--workers", type=int, help="worker processes per process (alias of data.prepare_workers)")

    d = sub.add_parser(
        "dump-features",
        formatter_class=fmt,
        help="write target features for train.mode: offline",
        description="Run the target over the configured data and write its tap hidden states (and "
        "the final hidden state when loss.kd) as safetensors shards + index.json. Resumable: "
        "re-running continues a partial dump. Then train with --set train.mode=offline "
        "--set train.features_dir=DIR.",
    )
    _add_config_args(d, "YAML config file or shipped config name (its features section holds the settings)")
    d.add_argument("--out", help=_alias_help("train.features_dir", "feature directory"))
    d.add_argument("--max-rows", type=int, help=_alias_help("features.max_rows", "rows to dump"))
    d.add_argument("--dtype", help=_alias_help("features.dtype", "storage dtype, bfloat16 or float32"))
    d.add_argument("--shard-size", type=int, help=_alias_help("features.shard_size", "rows per safetensors shard"))
    d.add_argument("--forward-batch", type=int, help=_alias_help("features.forward_batch", "rows per target forward"))
    d.add_argument("--no-resume", action="store_true", help="fail instead of continuing an existing dump")

    r = sub.add_parser(
        "regenerate",
        formatter_class=fmt,
        help="replace the data's assistant turns by the target's own answers (target-aligned training data)",
        description="Keep the user turns of every conversation of data.path and regenerate each "
        "assistant turn with the target (turn by turn, its chat template and stop tokens), batched "
        "with a KV cache on the configured mesh. Writes OpenAI-format JSONL with provenance per row; "
        "train on it with --set data.path=OUT. Prints ONE JSON summary last (rows, skips by reason, "
        "tokens/s). Atomic: OUT appears when finished; an interrupted run continues with --resume. Exits with "
        "status 5, printing the skip counts and what to raise, when no row was written (no OUT then).",
    )
    _add_config_args(r, "YAML config file or shipped config name (its target, data and regenerate sections are used)")
    r.add_argument("--out", required=True, help="output JSONL (must not exist; OUT.partial while running)")
    r.add_argument(
        "--max-new-tokens", type=int, help=_alias_help("regenerate.max_new_tokens", "token limit of one answer")
    )
    r.add_argument(
        "--temperature", type=float, help=_alias_help("regenerate.temperature", "0 = greedy, > 0 = sampling")
    )
    r.add_argument("--top-p", type=float, help=_alias_help("regenerate.top_p", "nucleus sampling mass"))
    r.add_argument("--seed", type=int, help=_alias_help("regenerate.seed", "sampling seed"))
    r.add_argument(
        "--num-conversations",
        type=int,
        help=_alias_help("regenerate.num_conversations", "regenerate the first N usable conversations"),
    )
    r.add_argument(
        "--batch-size", type=int, help=_alias_help("regenerate.batch_size", "conversations generated together")
    )
    r.add_argument(
        "--max-prompt-len", type=int, help=_alias_help("regenerate.max_prompt_len", "longest prompt in tokens")
    )
    r.add_argument("--resume", action="store_true", help="continue OUT.partial after its last complete row")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "compile",
        formatter_class=fmt,
        help="compile the train step at the config's shapes without "
        "weights: per-device memory and FLOPs, or TPU/CUDA lowering",
        description="Build the whole train step from abstract shapes (no weights loaded) on the "
        "configured mesh and compile it: --platform cpu prints per-device argument/output/temp/code "
        "bytes, FLOPs and compile time; tpu or cuda lowers it with jax.export for that platform "
        "(no accelerator needed). Target dimensions: --target-config, target.path's config.json, "
        "or target.random.",
    )
    c.add_argument("--config", required=True, help="YAML config file or shipped config name")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    c.add_argument(
        "--platform",
        default="cpu",
        choices=["cpu", "tpu", "cuda"],
        help="cpu: compile and report memory / FLOPs; tpu, cuda: lower with jax.export (default %(default)s)",
    )
    c.add_argument("--target-config", help="an HF config.json (or its directory) giving the target's dimensions")
    c.add_argument(
        "--devices", type=int, help="simulate this many CPU devices (must be the first JAX use in the process)"
    )

    b = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="run a benchmark script (scripts/bench_NAME.py)",
        description="Run scripts/bench_NAME.py with the remaining arguments "
        f"(available: {', '.join(_bench_names()) or 'none found'}). "
        "Try: dflash-jax bench NAME --help.",
    )
    b.add_argument("name", nargs="?", help="benchmark name; omit to list them")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        logging.getLogger("absl").setLevel(logging.WARNING)
        # "Unable to initialize backend 'tpu': ... libtpu.so" on every command of a machine without a TPU
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from dflash_jax import config as config_lib
    from dflash_jax import sharding
    from dflash_jax.train import loop, rundir

    sharding.maybe_initialize_distributed()
    path = args.config
    if path is None:
        if not args.resume:
            raise ValueError("train: --config is required (it may be omitted only with --resume)")
        path = os.path.join(args.run_dir, rundir.CONFIG_FILE)
    config = config_lib.load_config(path, args.overrides)
    try:
        result = loop.train(
            config, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except loop.DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    records = [r for r in rundir.read_metrics(result.run_dir) if r.get("loss") is not None]
    summary = {
        "run_dir": result.run_dir,
        "step": result.step,
        "interrupted": result.interrupted,
        "stop_signal": signal.Signals(result.stop_signal).name if result.stop_signal else None,
        "export": result.export_dir,
        "plots": list(result.plots),
    }
    if records:
        summary.update(
            first_simulated_tau=records[0]["simulated_tau"],
            simulated_tau=records[-1]["simulated_tau"],
            first_loss=records[0]["loss"],
            loss=records[-1]["loss"],
        )
    _print_json(summary)
    if not result.interrupted:
        return 0
    return EXIT_SIGNAL_BASE + result.stop_signal if result.stop_signal else EXIT_INTERRUPTED


def _eval_draft(draft_dir: str, target_arg: str | None):
    """``(config or None, draft_cfg, params, target section, run dir or None)`` for ``eval --draft``."""
    from dflash_jax import config as config_lib
    from dflash_jax import export as export_lib
    from dflash_jax.train import run, rundir

    if rundir.is_run_dir(draft_dir):
        config, _ = run.load_run(draft_dir)
        export_dir = os.path.join(draft_dir, rundir.EXPORT_DIR)
        if os.path.isdir(export_dir):
            draft_cfg, params = export_lib.import_draft(export_dir)
        else:
            log.info("%s has no export/; evaluating its latest checkpoint", draft_dir)
            _, draft_cfg, params, _ = run.restore_params(draft_dir)
        section = (
            config.target
            if target_arg is None
            else config_lib.TargetSection(path=target_arg, dtype=config.target.dtype)
        )
        return config, draft_cfg, params, section, draft_dir
    if not os.path.isfile(os.path.join(draft_dir, "config.json")):
        raise ValueError(
            f"--draft {draft_dir!r} is neither a run directory ({rundir.CONFIG_FILE}) nor an exported "
            "drafter (config.json + model.safetensors)"
        )
    if target_arg is None:
        raise ValueError("--target is required when --draft is an export directory (not a run directory)")
    draft_cfg, params = export_lib.import_draft(draft_dir)
    return None, draft_cfg, params, config_lib.TargetSection(path=target_arg), None


def _eval_prompt_conversations(path: str, n: int | None) -> list:
    """The first ``n`` (None = all) prompt conversations of ``path`` (:func:`~dflash_jax.data.readers.read_prompts`;
    ``sharegpt``: the package's conversations), each cut before its first assistant turn; read before any model
    loads, so a bad file fails in seconds."""
    from dflash_jax.data import pipeline, readers

    if path != readers.SHAREGPT_PACKAGE and not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} is not a file")
    items = readers.read_conversations(path) if path == readers.SHAREGPT_PACKAGE else readers.read_prompts(path)
    out, skipped = [], []
    for item in items:
        prefix = None if isinstance(item, readers.Skip) else pipeline.prompt_of(item)
        if prefix is None:
            skipped.append(str(item) if isinstance(item, readers.Skip) else "no user turn before an assistant turn")
            continue
        out.append(prefix)
        if n is not None and len(out) >= 4 * n:  # spare ones for prompts the template rejects
            break
    if skipped:
        log.warning("--prompts %s: skipped %d records (first: %s)", path, len(skipped), skipped[0])
    if not out:
        raise ValueError(
            f"--prompts {path!r} holds no usable prompt (a chat record with a user turn, or a line of "
            f"plain text){': ' + skipped[0] if skipped else ''}"
        )
    return out


def _run_mesh(config):
    """The mesh a saved run trained on (the target loads straight onto it, as in training) when this machine has
    its device count; otherwise None (the default device), with a warning."""
    if config is None:
        return None
    import jax

    from dflash_jax import sharding

    try:
        sharding.resolve_mesh_shape(config.mesh.shape, jax.device_count())
    except ValueError as e:
        log.warning("%s: the target loads whole on the default device", e)
        return None
    return sharding.make_mesh(config.mesh.shape)


def cmd_eval(args: argparse.Namespace) -> int:
    from dflash_jax.data import chat, readers
    from dflash_jax.eval.report import write_report
    from dflash_jax.train import run, rundir

    is_run = rundir.is_run_dir(args.draft)
    prompts_path = args.prompts or (os.path.join(args.draft, rundir.HELDOUT_FILE) if is_run else "sharegpt")
    if not args.prompts and is_run and os.path.isfile(prompts_path) and os.path.getsize(prompts_path) == 0:
        raise ValueError(f"{prompts_path} holds no prompts (the run had data.heldout=0); pass --prompts FILE")
    path = args.config or (os.path.join(args.draft, rundir.CONFIG_FILE) if is_run else None)
    # --prompts FILE: the whole file unless --num-prompts; the held-out set and 'sharegpt': eval.num_prompts.
    own_file = args.prompts is not None and args.prompts != readers.SHAREGPT_PACKAGE
    if own_file:  # the prompts are not the held-out set: eval.num_prompts is not bounded by data.heldout
        args.overrides = [*args.overrides, "data.heldout=0"]
    ev = _load_config(path, args, EVAL_ALIASES).eval
    whole = own_file and args.num_prompts is None
    num = None if whole else ev.num_prompts
    conversations = _eval_prompt_conversations(prompts_path, num)
    out = args.out or os.path.join(args.draft, "eval")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a directory")

    config, draft_cfg, params, target_section, run_dir = _eval_draft(args.draft, args.target)
    target = run.build_target(target_section, _run_mesh(config))
    renderer = chat.ChatRenderer.from_target(target, config.data.chat_template if config else None)
    prompts = run.eval_prompts(renderer, conversations, num)
    if not prompts:
        raise ValueError(f"--prompts {prompts_path!r}: the chat template rendered none of its prompts")
    result = run.run_eval(
        target,
        draft_cfg,
        params,
        prompts,
        ev,
        seed=ev.seed,
        check_lossless=args.check_lossless,
        eos_token_ids=chat.stop_token_ids(target, renderer),
    )
    paths = write_report(result, out)
    summary = {k: v for k, v in result.items() if k != "per_prompt"}
    summary.update(report=paths["json"], prompts=prompts_path)
    _print_json(summary)
    if result["lossless"] is False:
        print(
            f"error: speculative output differs from plain decoding for prompts {result['mismatches']}", file=sys.stderr
        )
        return EXIT_MISMATCH
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import contextlib

    from dflash_jax import export as export_lib
    from dflash_jax import paths
    from dflash_jax.train import run

    into_run = paths.is_within(args.out, args.run_dir)
    with paths.DirLock(args.run_dir) if into_run else contextlib.nullcontext():  # one writer per run directory
        _, draft_cfg, params, step = run.restore_params(args.run_dir, args.step)
        out = export_lib.export_draft(draft_cfg, params, args.out, dtype=args.dtype, protect=[args.run_dir])
    _print_json(
        {
            "export": str(out),
            "step": step,
            "dtype": args.dtype,
            "config": export_lib.config_to_json(draft_cfg, args.dtype),
        }
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from dflash_jax import export as export_lib

    draft_cfg, params = export_lib.import_draft(args.src)
    n = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    summary = {"src": args.src, "num_params": n, "config": export_lib.config_to_json(draft_cfg, args.dtype)}
    if args.out:
        summary["export"] = str(export_lib.export_draft(draft_cfg, params, args.out, dtype=args.dtype))
    _print_json(summary)
    return 0


def cmd_dump_features(args: argparse.Namespace) -> int:
    from dflash_jax import paths
    from dflash_jax.data import pipeline
    from dflash_jax.train import features, run

    config = _load_config(args.config, args, FEATURES_ALIASES)
    fe, out = config.features, config.train.features_dir
    if not out:
        raise ValueError("dump-features: give --out or set train.features_dir")
    target, renderer, draft_cfg = run.assemble(config)
    with paths.DirLock(out):  # one writer per feature directory
        index = features.dump_features(
            target,
            pipeline.build_iterator(config.data, renderer),
            out,
            draft_cfg.target_layer_ids,
            with_teacher_hidden=config.loss.kd,
            shard_size=fe.shard_size,
            resume=not args.no_resume,
            dtype=fe.dtype,
            max_rows=fe.max_rows if fe.max_rows is not None else config.train.steps * config.data.batch_size,
            forward_batch=fe.forward_batch,
        )
    _print_json(
        {"features_dir": out, **{k: v for k, v in index.items() if k != "shards"}, "num_shards": len(index["shards"])}
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import jax

    from dflash_jax import config as config_lib
    from dflash_jax import sharding
    from dflash_jax.data import store
    from dflash_jax.train import run

    sharding.maybe_initialize_distributed()
    overrides = list(args.overrides) + ([f"data.prepare_workers={args.workers}"] if args.workers is not None else [])
    config = config_lib.load_config(args.config, overrides)
    _, renderer, _ = run.assemble(config, only=lambda name: False)  # the tokenizer and template; no weights read
    store.prepare(config.data, renderer, args.out, process_index=jax.process_index(), process_count=jax.process_count())
    sharding.barrier("dflash_jax:data_store_prepared")
    manifest = store.read_manifest(args.out)
    _print_json({"store": args.out, **manifest["totals"], "parts": len(manifest["parts"])})
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import jax

    if args.devices is not None:
        jax.config.update("jax_num_cpu_devices", int(args.devices))
    from dflash_jax import config as config_lib
    from dflash_jax.train import aot

    config = config_lib.load_config(args.config, args.overrides)
    _print_json(aot.compile_report(config, platform=args.platform, config_json=args.target_config))
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    from flax import nnx

    from dflash_jax import regenerate as regen
    from dflash_jax import sharding
    from dflash_jax.data import chat
    from dflash_jax.train import run

    config = _load_config(args.config, args, REGENERATE_ALIASES)
    data = config.data
    num = config.regenerate.num_conversations
    if num is None and data.max_conversations is not None:
        num = data.max_conversations + data.heldout
    sampling = regen.Sampling.of(config)
    regen.check_output(args.out, args.resume)
    if data.path != "sharegpt" and not os.path.isfile(data.path):
        raise ValueError(f"data.path {data.path!r} is not a file")
    mesh = sharding.make_mesh(config.mesh.shape)
    target = run.build_target(config.target, mesh)  # placed once, onto the shardings the generator uses
    renderer = chat.ChatRenderer.from_target(target, data.chat_template)
    with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        summary = regen.regenerate(
            target,
            renderer,
            data.path,
            args.out,
            sampling,
            fmt=data.format,
            num_conversations=num,
            resume=args.resume,
            mesh=mesh,
            progress=not args.no_progress,
        )
    _print_json(summary)
    if not summary["rows"]:
        print(f"error: {regen.no_rows_message(summary, sampling)}", file=sys.stderr)
        return EXIT_NO_OUTPUT
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    names = _bench_names()
    if not args.name:
        print("available benchmarks: " + ", ".join(names))
        return 0
    if args.name not in names:
        raise ValueError(f"bench: unknown benchmark {args.name!r} (available: {', '.join(names) or 'none'})")
    path = os.path.realpath(os.path.join(_scripts_dir(), f"bench_{args.name}.py"))
    argv, sys_path = sys.argv, list(sys.path)
    sys.argv = [path, *args.args]
    sys.path.insert(0, os.path.dirname(path))  # as `python path`: the scripts import each other (bench_target)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv, sys.path[:] = argv, sys_path
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "import": cmd_import,
    "prepare": cmd_prepare,
    "dump-features": cmd_dump_features,
    "compile": cmd_compile,
    "regenerate": cmd_regenerate,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dflash-jax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
