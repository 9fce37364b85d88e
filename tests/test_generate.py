"""Batched KV-cache generation (dflash_jax/generate.py): equals cache-free greedy decoding row by row, whatever
the batch, bucket or mesh; per-row stops; reproducible sampling; one compile per length bucket."""

import jax
import numpy as np
import pytest

from decode_oracle import greedy_reference
from dflash_jax import generate, sharding
from dflash_jax.models.target import TargetConfig
from dflash_jax.models.target_io import random_target

CFG = TargetConfig(
    arch="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_bias=True,
)


@pytest.fixture(scope="module")
def target():
    return random_target(CFG, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (3, 9, 17, 6)]


def test_batched_rows_equal_cache_free_greedy(target, prompts):
    gen = generate.Generator(target.model)
    batched = gen(prompts, 12).tokens
    for p, row in zip(prompts, batched):
        ref = greedy_reference(target.model, p, 12)
        assert row.tolist() == ref
        assert gen([p], 12).tokens[0].tolist() == ref  # alone, in a smaller prompt bucket
    # per-row stops: an EOS that row 0 emits at step 4 stops it there (kept); limits cut other rows
    eos = int(batched[0][4])
    first = int(np.flatnonzero(batched[0] == eos)[0])
    out = gen(prompts, [12, 5, 12, 1], eos_token_ids=(eos,)).tokens
    assert out[0].tolist() == batched[0][: first + 1].tolist()
    for i, limit in ((1, 5), (2, 12), (3, 1)):
        hits = np.flatnonzero(batched[i][:limit] == eos)
        cut = hits[0] + 1 if hits.size else limit
        assert out[i].tolist() == batched[i][:cut].tolist()


def test_rows_sharded_over_data_axis_equal_unsharded(target, prompts):
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.shape["data"] == jax.device_count() == 8
    gen = generate.Generator(target.model, mesh=mesh)
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(gen.state))
    got = gen(prompts[:3], 10).tokens  # 3 rows padded to 8, one per device
    want = generate.Generator(target.model)(prompts[:3], 10).tokens
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_sampling_reproducible_per_row(target, prompts):
    gen = generate.Generator(target.model)
    keys = generate.row_keys(7, [10, 11, 12, 13], [0, 1, 0, 1])
    kw = dict(temperature=1.0, top_p=0.9)
    a = gen(prompts, 16, keys=keys, **kw).tokens
    b = gen(prompts, 16, keys=keys, **kw).tokens
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    alone = gen([prompts[2]], 16, keys=keys[2:3], **kw).tokens[0]  # a row's draws do not depend on its batch
    assert alone.tolist() == a[2].tolist()
    other = gen(prompts, 16, keys=generate.row_keys(8, [10, 11, 12, 13], [0, 1, 0, 1]), **kw).tokens
    assert any(x.tolist() != y.tolist() for x, y in zip(a, other))
    greedy = gen(prompts, 16).tokens
    assert any(x.tolist() != y.tolist() for x, y in zip(a, greedy))


def test_top_p_keeps_the_smallest_nucleus():
    z = np.log(np.array([0.05, 0.5, 0.15, 0.3], np.float32))
    for top_p, kept in ((0.5, [1]), (0.7, [1, 3]), (0.8, [1, 3]), (0.81, [1, 2, 3]), (1.0, [0, 1, 2, 3])):
        got = np.asarray(generate.top_p_logits(z, top_p))
        assert np.flatnonzero(np.isfinite(got)).tolist() == kept, top_p
    draws = jax.vmap(lambda k: generate.sample_logits(z, k, 1.0, 0.7))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)  # renormalised over the nucleus


def test_greedy_generate_compiles_once_per_bucket(target, prompts):
    """generate.greedy_generate (public API) reuses one executable for prompt lengths and token counts that share
    their power-of-two buckets."""
    generate.greedy_generate(target, prompts[0], 5)  # 3 tokens -> bucket 8, 5 new -> capacity 8
    before = len(generate._COMPILED)
    for n, new in ((5, 6), (8, 7), (2, 8)):
        p = np.arange(n, dtype=np.int32) + 1
        assert generate.greedy_generate(target, p, new) == greedy_reference(target.model, p, new)
    assert len(generate._COMPILED) == before
