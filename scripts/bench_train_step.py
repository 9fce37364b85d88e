"""Throughput of the full compiled train step (online target forward + draft fwd/bwd + chunked D-PACE loss + AdamW).

    python scripts/bench_train_step.py                         # CPU shape (default), float32
    python scripts/bench_train_step.py --compare-reference     # + the reference (modelopt 0.47.0, torch) same shapes
    python scripts/bench_train_step.py --shape gpu --dtype bfloat16 --mesh 1,1,1   # the performance issue's shapes

Prints steps/s, draft tokens/s (B*N*bs per second), MFU and peak memory; with ``--compare-reference`` it then times
the reference's training forward/backward + clip + torch AdamW step (HFDFlashModel, same shapes, same target and
draft weights, same injected anchors; fp32 on CPU) and prints ``ratio_vs_reference=<ref_time/our_time>`` last.

FLOPs per step (multiply-add = 2; "model FLOPs": rematerialisation not counted; Q = N*bs, T = #taps):
    target  = 2*B*S*P_tgt + 4*B*S^2*NH_t*HD_t*L_t                      (online only; bench_target.prefill_flops)
    draft   = 2*B*S*T*H*H + L_d*(2*B*S*H*2*KVH*HD + 2*B*Q*H*(2*NH*HD + 2*KVH*HD) + 2*B*Q*3*H*I + 4*B*Q*(S+bs)*NH*HD)
    lm_head = 2*B*Q*H*V
    F = target + 3*draft + 2*lm_head (+ lm_head for the KD teacher)     (backward = 2x forward; lm_head is frozen)
MFU = F / time / peak (nominal bf16 peak for H100/H200, else a measured matmul; see bench_target.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_target import NOMINAL_PEAK_TFLOPS, measured_matmul_tflops, prefill_flops  # noqa: E402
from dflash_jax import blocks  # noqa: E402
from dflash_jax.models import layers  # noqa: E402
from dflash_jax.models.draft import DFlashDraft, DraftConfig  # noqa: E402
from dflash_jax.models.target import TargetConfig, make_target_model, resolve_dtype  # noqa: E402
from dflash_jax.train import optim, sharding  # noqa: E402
from dflash_jax.train import step as st  # noqa: E402

SHAPES = {
    # CPU: a small Qwen3-like target (6 layers) and 2-layer draft; seconds per step on 2 cores.
    "cpu": dict(batch=2, seq=256, block=8, anchors=16, vocab=4096, hidden=256, heads=4, kv_heads=2, head_dim=64,
                intermediate=768, target_layers=6, draft_layers=2),
    # GPU (performance issue): Qwen3-8B-like target, 5-layer draft, recipe seq/anchors.
    "gpu": dict(batch=1, seq=4096, block=16, anchors=512, vocab=151936, hidden=4096, heads=32, kv_heads=8,
                head_dim=128, intermediate=12288, target_layers=36, draft_layers=5),
}


def train_flops(tc: TargetConfig, dc: DraftConfig, b: int, s: int, n: int, kd: bool) -> float:
    """The module docstring's formula."""
    bs, h, q = dc.block_size, dc.hidden_size, n * dc.block_size
    target = prefill_flops(tc, b, s) - 2 * b * tc.hidden_size * tc.vocab_size  # no logits in the step
    nh, kvh, hd, i = dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim, dc.intermediate_size
    per_layer = (2 * b * s * h * 2 * kvh * hd + 2 * b * q * h * (2 * nh * hd + 2 * kvh * hd) + 2 * b * q * 3 * h * i
                 + 4 * b * q * (s + bs) * nh * hd)
    draft = 2 * b * s * dc.num_features * h * h + dc.num_layers * per_layer
    lm_head = 2 * b * q * h * dc.vocab_size
    return target + 3 * draft + (3 if kd else 2) * lm_head


def make_configs(shape: dict) -> tuple[TargetConfig, DraftConfig]:
    tc = TargetConfig(arch="qwen3", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_layers=shape["target_layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      head_dim=shape["head_dim"], rope_theta=1e4, qk_norm=True)
    ids = tuple(blocks.build_target_layer_ids(shape["target_layers"], shape["draft_layers"]))
    dc = DraftConfig(hidden_size=shape["hidden"], num_layers=shape["draft_layers"], num_attention_heads=shape["heads"],
                     num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                     intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
                     num_target_layers=shape["target_layers"], target_layer_ids=ids, block_size=shape["block"],
                     mask_token_id=0, rope_theta=1e4)
    return tc, dc


def make_batch(shape: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, full loss mask, and injected anchors (so the reference can get the very same ones)."""
    b, s, n, bs = shape["batch"], shape["seq"], shape["anchors"], shape["block"]
    rng = np.random.default_rng(seed)
    anchors = np.sort(np.stack([rng.choice(s - bs + 1, n, replace=False) for _ in range(b)]), axis=1)
    return dict(input_ids=rng.integers(1, shape["vocab"], (b, s)).astype(np.int32),
                loss_mask=np.ones((b, s), np.float32), segment_ids=np.ones((b, s), np.int32),
                positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)), anchors=anchors.astype(np.int32),
                keep=np.ones((b, n), bool))


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"peak_device_memory_gib={stats['peak_bytes_in_use'] / 2**30:.3f}"
    return f"peak_host_rss_gib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f}"


def time_ours(args, shape, target_model, draft_params):
    tc, dc = make_configs(shape)
    dtype = resolve_dtype(args.dtype)
    mesh = sharding.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    with layers.unsharded_init():
        draft = DFlashDraft(dc, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=dtype)
    if draft_params is not None:
        nnx.update(draft, draft_params)
    tx, sched = optim.make_optimizer(lr=6e-4, steps=1000, schedule="constant", clip_norm=1.0)
    _, state, shardings = st.init_train_state(draft, tx, mesh)
    cfg = st.StepConfig(block_size=dc.block_size, num_anchors=shape["anchors"], mask_token_id=0,
                        target_layer_ids=dc.target_layer_ids, kd=args.kd, chunk_blocks=args.chunk_blocks)
    step = st.TrainStep(draft=draft, state_shardings=shardings, target=target_model, tx=tx, schedule=sched, cfg=cfg,
                        mesh=mesh)
    batch = step.place_batch(make_batch(shape))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, m = step(state, batch, key)
    first_loss = float(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, key)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), first_loss, train_flops(tc, dc, shape["batch"], shape["seq"],
                                                                         shape["anchors"], args.kd)


def build_reference(shape, workdir):
    """HFDFlashModel on a tiny-config Qwen3 target (fp32), plus our target loaded from its checkpoint and the
    reference draft's weights in our layout, so both sides train the same weights."""
    import torch
    import transformers
    import modelopt.torch.speculative as mtsp

    from dflash_jax.export import from_torch_tensors
    from dflash_jax.models.target import load_target

    tc, dc = make_configs(shape)
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_hidden_layers=tc.num_layers,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim, vocab_size=tc.vocab_size, max_position_embeddings=max(4096, shape["seq"]),
        rope_theta=tc.rope_theta)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    arch = dict(num_hidden_layers=dc.num_layers, num_attention_heads=dc.num_attention_heads,
                num_key_value_heads=dc.num_key_value_heads, head_dim=dc.head_dim,
                intermediate_size=dc.intermediate_size, rope_theta=dc.rope_theta)
    mtsp.convert(model, [("dflash", {"dflash_block_size": dc.block_size, "dflash_use_torch_compile": False,
                                     "dflash_mask_token_id": 0, "dflash_architecture_config": arch,
                                     "dflash_num_anchors": shape["anchors"]})])
    model.train()
    model.save_pretrained(workdir)
    ours_target = load_target(workdir, dtype="float32").model
    tensors = {k: v.detach().float().numpy() for k, v in model.dflash_module.state_dict().items()
               if "rotary_emb" not in k}
    return model, ours_target, from_torch_tensors(dc, tensors)


def time_reference(model, shape, steps):
    import torch

    batch = make_batch(shape)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    anchors, keep = torch.as_tensor(batch["anchors"], dtype=torch.long), torch.as_tensor(batch["keep"])
    model._sample_anchor_positions = lambda seq_len, loss_mask, device: (anchors, keep)
    model.dflash_self_logit_distillation = False
    params = [p for p in model.dflash_module.parameters()]
    opt = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def one():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    first_loss = one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--dtype", default="float32", help="draft compute dtype (target params/compute too)")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (product = number of devices)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunk-blocks", type=int, default=64)
    p.add_argument("--kd", action="store_true", help="KD objective (teacher logits from the target)")
    p.add_argument("--compare-reference", action="store_true")
    args = p.parse_args(argv)
    if args.compare_reference and args.kd:
        p.error("--compare-reference times the CE objective; drop --kd")
    shape = SHAPES[args.shape]
    tc, dc = make_configs(shape)
    dev = jax.devices()[0]
    print(f"device={dev.platform}:{dev.device_kind} n_devices={jax.device_count()} cpu={platform.machine()} "
          f"x{os.cpu_count()} jax={jax.__version__} python={platform.python_version()}")
    print("shape=" + " ".join(f"{k}={v}" for k, v in shape.items()) + f" dtype={args.dtype} mesh={args.mesh}"
          f" kd={args.kd}")

    ref_model, draft_params = None, None
    with tempfile.TemporaryDirectory() as workdir:
        if args.compare_reference:
            ref_model, target_model, draft_params = build_reference(shape, workdir)
            if args.dtype != "float32":
                p.error("--compare-reference compares float32 on both sides")
        else:
            target_model = make_target_model(tc, seed=0, dtype=args.dtype)
        compile_s, step_s, loss, flops = time_ours(args, shape, target_model, draft_params)
    tokens = shape["batch"] * shape["anchors"] * shape["block"]
    kind = getattr(dev, "device_kind", "")
    peak = next((v for (k, d), v in NOMINAL_PEAK_TFLOPS.items() if k in kind and d == args.dtype), None)
    peak_src = "nominal"
    if peak is None:
        peak, peak_src = measured_matmul_tflops(resolve_dtype(args.dtype), 2048 if dev.platform == "cpu" else 8192), \
            "measured matmul"
    print(f"ours: compile+first_s={compile_s:.2f} step_s={step_s:.4f} steps_per_s={1 / step_s:.3f} "
          f"draft_tokens_per_s={tokens / step_s:.1f} loss={loss:.6f}")
    print(f"flops_per_step={flops / 1e12:.4f}T achieved_tflops={flops / step_s / 1e12:.3f} "
          f"mfu={100 * flops / step_s / 1e12 / peak:.1f}% of {peak:.2f} TFLOP/s ({peak_src}) {peak_memory()}")
    if ref_model is not None:
        ref_s, ref_loss = time_reference(ref_model, shape, args.steps)
        print(f"reference: step_s={ref_s:.4f} steps_per_s={1 / ref_s:.3f} draft_tokens_per_s={tokens / ref_s:.1f} "
              f"loss={ref_loss:.6f} (torch {__import__('torch').__version__}, threads "
              f"{__import__('torch').get_num_threads()})")
        print(f"loss_abs_diff={abs(ref_loss - loss):.2e}")
        print(f"ratio_vs_reference={ref_s / step_s:.3f}")


if __name__ == "__main__":
    main()
