"""Scale on paper (issue 8, item 4): the mesh and per-device memory a DFlash training config implies.

    python scripts/scale_on_paper.py            # markdown table: v5p-128 pod and 8xH100 node, Qwen3-8B and 70B

Per-device bytes of the persistent training state on a ``("data", "fsdp", "tensor")`` mesh of sizes ``(D, F, Tn)``,
by the rules table of ``dflash_jax.sharding`` (``embed`` -> fsdp; ``vocab``/``mlp``/``q_heads``/``kv_heads``/
``fused`` -> tensor; norms replicated; a dimension that its mesh axis does not divide stays whole):

    sh(n, k)  = n / k if k divides n, else n                 (k = F for embed, Tn for the tensor axes, 1 for norms)
    layer(m)  = sh(H,F)*[sh(NH*HD,Tn) + 2*sh(KVH*HD,Tn) + 3*sh(I,Tn)] + sh(NH*HD,Tn)*sh(H,F) + 2*H + 2*HD*qk
    target    = b_t * [(1 + untied) * sh(V,Tn)*sh(H,F) + L_used * layer(target dims) + H * norm_used]
    draft     = sh(T*H,Tn)*sh(H,F) + 2*H + L_d * layer(draft dims)          (elements)
    state     = 4*draft (fp32 master) + 8*draft (Adam mu, nu fp32) + 16 (step, skipped, 2 optax counts; int32)
    grads     = 4*draft                                                   (fp32, live inside the step)

``b_t`` = bytes per target parameter (2 for bf16). ``L_used`` = the target layers the step runs: all ``L_t`` with KD
(the teacher needs the final hidden state), else ``max(target_layer_ids) + 1`` (XLA drops the unused layers' inputs);
``norm_used`` likewise. The compiled step's per-device argument bytes are exactly ``target + state + batch + key``;
tests/test_scale_on_paper.py checks that against ``compiled.memory_analysis()`` on 8 simulated CPU devices.

Activations (an estimate, not checked: bf16 compute, no rematerialisation, per-device batch ``b``, Q = N*bs):

    draft     = L_d * (2*b*[4*Q*H + Q*(2*NH*HD + 2*KVH*HD)/Tn + 2*S*KVH*HD/Tn + 3*Q*I/Tn] + 4*b*NH/Tn*Q*(S+bs))
    loss      = 3 * 4*b*min(64, N)*bs*sh(V,Tn)                (fp32 logits, teacher logits, softmax of one chunk)
    target    = 2*b*S*T*H + 2*b*S*(2*H + (NH+2*KVH)*HD/Tn + 3*I/Tn) + 4*b*NH/Tn*S^2     (taps + one layer, fp32 scores)

The plan picks, among meshes with ``Tn <= 8``, the one with the largest data axis whose total fits 90 % of HBM
(ties: more fsdp, less tensor): data parallelism needs no collectives in the forward/backward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dflash_jax.blocks import build_target_layer_ids
from dflash_jax.models.draft import DraftConfig
from dflash_jax.models.target import TargetConfig

GIB = 2**30
COUNTERS_BYTES = 16  # TrainState.step, .skipped_updates, adam count, schedule count: int32 scalars
FIT_FRACTION = 0.9

QWEN3_8B = TargetConfig(
    arch="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1e6,
    qk_norm=True,
)
LLAMA_70B = TargetConfig(
    arch="llama",
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=5e5,
)
TARGETS = {"Qwen3-8B": QWEN3_8B, "70B (Llama-3.1-70B dims)": LLAMA_70B}
# name: (JAX devices, HBM GiB per device). v5p-128 = 128 TensorCores = 64 megacore chips of 95 GB HBM2e.
PLATFORMS = {"v5p-128 pod": (64, 95e9 / GIB), "8xH100 node": (8, 79.6)}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MeshShape.{name} must be an integer >= 1, got {v!r}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor


def sh(n: int, k: int) -> int:
    """Per-device extent of a dimension of size ``n`` over ``k`` devices (whole when ``k`` does not divide it)."""
    return n // k if n % k == 0 else n


def layer_elems(h: int, nh: int, kvh: int, hd: int, i: int, qk_norm: bool, m: MeshShape) -> int:
    """Per-device parameter elements of one decoder layer (attention + SwiGLU + 2 norms, + q/k norms)."""
    f, t = m.fsdp, m.tensor
    return (
        sh(h, f) * (sh(nh * hd, t) + 2 * sh(kvh * hd, t) + 3 * sh(i, t))
        + sh(nh * hd, t) * sh(h, f)
        + 2 * h
        + (2 * hd if qk_norm else 0)
    )


def target_elems(tc: TargetConfig, m: MeshShape, layer_ids, kd: bool) -> int:
    """Per-device elements of the target parameters the step reads (see the module docstring)."""
    used = tc.num_layers if kd else max(layer_ids) + 1
    norm = kd or (tc.num_layers - 1) in layer_ids
    vocab = (1 if tc.tie_word_embeddings else 2) * sh(tc.vocab_size, m.tensor) * sh(tc.hidden_size, m.fsdp)
    layer = layer_elems(
        tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim, tc.intermediate_size, tc.qk_norm, m
    )
    return vocab + used * layer + (tc.hidden_size if norm else 0)


def draft_elems(dc: DraftConfig, m: MeshShape) -> int:
    """Per-device elements of the draft parameters (``fc``, ``hidden_norm``, layers, ``norm``)."""
    h = dc.hidden_size
    return (
        sh(dc.num_features * h, m.tensor) * sh(h, m.fsdp)
        + 2 * h
        + dc.num_layers
        * layer_elems(h, dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim, dc.intermediate_size, True, m)
    )


def state_bytes(
    tc: TargetConfig, dc: DraftConfig, m: MeshShape, *, kd: bool = True, target_bytes: int = 2
) -> dict[str, int]:
    """Per-device bytes: ``target`` params, ``draft_master`` (fp32), ``adam`` (mu + nu fp32), ``counters``,
    ``grads`` (fp32, transient) and ``persistent`` = target + draft_master + adam + counters."""
    d = draft_elems(dc, m)
    out = dict(
        target=target_bytes * target_elems(tc, m, dc.target_layer_ids, kd),
        draft_master=4 * d,
        adam=8 * d,
        counters=COUNTERS_BYTES,
        grads=4 * d,
    )
    out["persistent"] = out["target"] + out["draft_master"] + out["adam"] + out["counters"]
    return out


def activation_bytes(
    tc: TargetConfig, dc: DraftConfig, m: MeshShape, *, seq: int, anchors: int, batch: int = 1, chunk_blocks: int = 64
) -> int:
    """Estimated per-device activation bytes of one step (module docstring formula; bf16, no remat)."""
    b, s, t, bs = batch, seq, m.tensor, dc.block_size
    q = anchors * bs
    h, nh, kvh, hd, i = (
        dc.hidden_size,
        dc.num_attention_heads,
        dc.num_key_value_heads,
        dc.head_dim,
        dc.intermediate_size,
    )
    draft = dc.num_layers * (
        2 * b * (4 * q * h + q * (2 * nh * hd + 2 * kvh * hd) // t + 2 * s * kvh * hd // t + 3 * q * i // t)
        + 4 * b * nh // t * q * (s + bs)
    )
    loss = 3 * 4 * b * min(chunk_blocks, anchors) * bs * sh(tc.vocab_size, t)
    th, tnh, tkvh, thd, ti = (
        tc.hidden_size,
        tc.num_attention_heads,
        tc.num_key_value_heads,
        tc.head_dim,
        tc.intermediate_size,
    )
    target = (
        2 * b * s * dc.num_features * th
        + 2 * b * s * (2 * th + (tnh + 2 * tkvh) * thd // t + 3 * ti // t)
        + 4 * b * tnh // t * s * s
    )
    return draft + loss + target


def draft_config_for(tc: TargetConfig, num_layers: int = 5, block_size: int = 16) -> DraftConfig:
    """The issue's draft: ``num_layers`` layers with the target's head / intermediate dims."""
    return DraftConfig(
        hidden_size=tc.hidden_size,
        num_layers=num_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim,
        intermediate_size=tc.intermediate_size,
        vocab_size=tc.vocab_size,
        num_target_layers=tc.num_layers,
        target_layer_ids=tuple(build_target_layer_ids(tc.num_layers, num_layers)),
        block_size=block_size,
        mask_token_id=0,
        rope_theta=1e6,
    )


def meshes(n_devices: int, max_tensor: int = 8) -> list[MeshShape]:
    """All ``(D, F, Tn)`` with ``D*F*Tn = n_devices`` and ``Tn <= max_tensor``."""
    out = []
    for t in range(1, min(max_tensor, n_devices) + 1):
        if n_devices % t:
            continue
        for f in range(1, n_devices // t + 1):
            if (n_devices // t) % f == 0:
                out.append(MeshShape(n_devices // t // f, f, t))
    return out


def plan(tc: TargetConfig, n_devices: int, hbm_gib: float, *, seq: int = 3072, anchors: int = 512) -> dict:
    """The chosen mesh and its per-device memory (GiB) for ``tc`` on ``n_devices`` of ``hbm_gib`` each."""
    dc = draft_config_for(tc)
    best = None
    for m in meshes(n_devices):
        st = state_bytes(tc, dc, m)
        act = activation_bytes(tc, dc, m, seq=seq, anchors=anchors)
        total = st["persistent"] + st["grads"] + act
        row = dict(
            mesh=m, total=total / GIB, activations=act / GIB, **{k: v / GIB for k, v in st.items() if k != "counters"}
        )
        key = (total <= FIT_FRACTION * hbm_gib * GIB, m.data, m.fsdp, -m.tensor)
        if best is None or key > best[0]:
            best = (key, row)
    best[1]["fits"] = best[0][0]
    return best[1]


def table(seq: int = 3072, anchors: int = 512) -> list[str]:
    """Markdown rows of the plan for every platform x target."""
    lines = [
        "| platform | target | draft params | mesh (data, fsdp, tensor) | global batch | target params | "
        "draft fp32 master | Adam mu+nu | grads | activations (est.) | total / device | HBM / device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pname, (n, hbm) in PLATFORMS.items():
        for tname, tc in TARGETS.items():
            r = plan(tc, n, hbm, seq=seq, anchors=anchors)
            m = r["mesh"]
            n_draft = draft_elems(draft_config_for(tc), MeshShape(1, 1, 1))
            lines.append(
                f"| {pname} ({n} devices) | {tname} | {n_draft / 1e9:.2f} B | "
                f"({m.data}, {m.fsdp}, {m.tensor}) | {m.data * m.fsdp} | {r['target']:.1f} GiB | {r['draft_master']:.1f} GiB | "
                f"{r['adam']:.1f} GiB | {r['grads']:.1f} GiB | {r['activations']:.1f} GiB | "
                f"**{r['total']:.1f} GiB**{'' if r['fits'] else ' (does not fit)'} | {hbm:.1f} GiB |"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=3072)
    p.add_argument("--anchors", type=int, default=512)
    args = p.parse_args(argv)
    print(
        f"seq {args.seq}, {args.anchors} anchors x block 16, 5-layer draft with the target's dims, KD on, "
        f"per-device batch 1, bf16 target + compute, fp32 master + Adam"
    )
    print("\n".join(table(args.seq, args.anchors)))


if __name__ == "__main__":
    main()
