"""Hash routing: each variant's rule, MultiHash = the block construction of methods.md,
tables survive save/load unchanged and are never rebuilt, balanced load on the real corpus."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ConfigError
from megamoe.errors import UserError
from megamoe.model.config import HashConfig, MoEConfig
from megamoe.moe import hashing
from megamoe.moe.hashing import RoutingContext
from megamoe.moe.layer import MoELayer
from tests.moe.helpers import D, E, V, model_cfg, write_counts

REPO = Path(__file__).resolve().parents[2]


def _layer(variant, tmp_path=None, **kw):
    if variant == "balanced" and "counts_file" not in kw:
        kw["counts_file"] = write_counts(tmp_path / "c.counts.npy")
    return MoELayer(model_cfg(), MoEConfig(num_experts=E, hash_layers=[0], hash=HashConfig(variant=variant, **kw)), 0)


def _ctx():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids[:, :-1]], 1)
    nxt = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)
    pos = torch.arange(12).expand(2, 12)
    return RoutingContext(token_ids=ids, prev_token_ids=prev, next_token_ids=nxt, positions=pos)


def test_balanced_rule_by_hand():
    counts = np.array([5, 9, 0, 3, 3, 1])
    # sorted: id1(9)->e0, id0(5)->e1, id3(3)->e1 (5<9), id4(3)->e1? no: totals e0=9, e1=8 -> e1 -> 11; then
    # id5(1) -> e0 (9<11); unseen id2 round-robin -> e0
    assert hashing.balanced_table(counts, 2).tolist() == [1, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("variant", ["random", "balanced", "bigram", "previous", "position", "oracle_future"])
def test_variant_rules(variant, tmp_path):
    kw = {"allow_oracle": True} if variant == "oracle_future" else {}
    layer = _layer(variant, tmp_path, **kw)
    ctx = _ctx()
    out = layer.router(torch.zeros(24, D), ctx)
    table = layer.router.table[0]
    ids, prev, nxt, pos = (t.reshape(-1) for t in (ctx.token_ids, ctx.prev_token_ids, ctx.next_token_ids, ctx.positions))
    want = {
        "random": lambda: table[ids], "balanced": lambda: table[ids], "previous": lambda: table[prev],
        "oracle_future": lambda: table[nxt], "position": lambda: pos % E,
        "bigram": lambda: (ids % E + (7919 * prev) % E) % E,
    }[variant]()
    assert torch.equal(out.expert_ids_TK[:, 0], want)
    assert out.keep_TK.all() and torch.equal(out.weights_TK, torch.ones(24, 1))
    assert out.lb_loss == 0 and out.probs_TE is None
    if variant == "random":
        assert torch.equal(table, hashing.random_table(V, E, 1234))
    if variant == "balanced":
        assert torch.equal(table, hashing.balanced_table(np.load(tmp_path / "c.counts.npy"), E))


def test_clustered_and_dispersed():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 10
    emb = centers.repeat_interleave(12, 0) + 0.01 * torch.randn(48, 8, generator=g)  # 4 tight groups of 12
    clustered = hashing.clustered_table(emb, 4, seed=0)
    for grp in range(4):  # each group lands on one expert, groups on different experts
        assert clustered[grp * 12:(grp + 1) * 12].unique().numel() == 1
    assert clustered.unique().numel() == 4
    dispersed = hashing.dispersed_table(emb, 4, seed=0)  # V/E = 12 clusters
    assert torch.bincount(dispersed, minlength=4).tolist() == [12] * 4
    for grp in range(4):  # members of a tight group are spread over all experts
        assert dispersed[grp * 12:(grp + 1) * 12].unique().numel() == 4


def test_oracle_needs_flag_and_missing_inputs_fail():
    with pytest.raises(ConfigError, match="allow_oracle"):
        HashConfig(variant="oracle_future")
    with pytest.raises(ConfigError, match="counts_file"):
        HashConfig(variant="balanced")
    with pytest.raises(UserError, match="counts_file"):
        _layer("balanced", counts_file="/nonexistent/x.counts.npy")
    with pytest.raises(ValueError, match="prev_token_ids"):
        _layer("previous").router(torch.zeros(3, D), RoutingContext(token_ids=torch.zeros(3, dtype=torch.long)))


def test_multihash_equals_block_construction():
    torch.manual_seed(0)
    n = 2
    layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, hash_layers=[0],
                                            hash=HashConfig(variant="random", num_hashes=n)), 0)
    ctx = _ctx()
    x = torch.randn(2, 12, D)
    y, _ = layer(x, ctx)
    table, ex = layer.router.table, layer.experts
    assert table.shape == (n, V) and not torch.equal(table[0], table[1])
    b = ex.ffn // n
    full = ex.gather_full("")  # canonical per-expert [out, in] weights
    want = []
    for xt, t in zip(x.reshape(-1, D), ctx.token_ids.reshape(-1)):
        hs, w2 = [], []
        for m in range(n):  # block m of the FFN comes from the expert of hash m
            w = {p: full[f"{int(table[m, t])}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            rows = slice(m * b, (m + 1) * b)
            hs.append(F.silu(w["gate_proj"][rows] @ xt) * (w["up_proj"][rows] @ xt))
            w2.append(w["down_proj"][:, rows])
        want.append(torch.cat(w2, 1) @ torch.cat(hs))
    torch.testing.assert_close(y.reshape(-1, D), torch.stack(want), atol=1e-6, rtol=1e-5)


def test_table_survives_save_load_and_is_not_rebuilt(tmp_path):
    layer = _layer("balanced", tmp_path)
    table = layer.router.table.clone()
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    assert "router.table" in layer.state_dict()
    # a layer built WITHOUT tables (no counts file needed) gets the saved table on load
    blank = MoELayer(model_cfg(), MoEConfig(num_experts=E, hash_layers=[0],
                                            hash=HashConfig(variant="balanced", counts_file="/gone/c.npy")),
                     0, build_tables=False)
    assert not torch.equal(blank.router.table, table)
    blank.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(blank.router.table, table)
    # a layer built from DIFFERENT counts keeps the loaded table, not its own rebuild
    np.save(tmp_path / "other.counts.npy", np.arange(V, dtype=np.int64)[::-1].copy())
    other = _layer("balanced", tmp_path, counts_file=str(tmp_path / "other.counts.npy"))
    assert not torch.equal(other.router.table, table)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(other.router.table, table)
    ctx = _ctx()
    assert torch.equal(other.router(torch.zeros(24, D), ctx).expert_ids_TK, layer.router(torch.zeros(24, D), ctx).expert_ids_TK)


COUNTS = REPO / "data" / "corpus_text_document.counts.npy"


def _corpus_tokens():
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(REPO / "data" / "corpus_text_document"))
    return np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)


@pytest.mark.skipif(not COUNTS.is_file() or not (REPO / "data" / "corpus_text_document.idx").is_file(),
                    reason="needs the corpus from `make data` (data/corpus_text_document.{bin,idx,counts.npy})")
def test_balanced_hash_load_on_corpus():
    counts = np.load(COUNTS)
    tokens = _corpus_tokens()
    V = max(len(counts), int(tokens.max()) + 1)
    counts = np.pad(counts, (0, V - len(counts)))
    for E_ in (16, 64):
        bal = hashing.balanced_table(counts, E_).numpy()
        rnd = hashing.random_table(V, E_, 1234).numpy()
        load_b = np.bincount(bal[tokens], minlength=E_)
        load_r = np.bincount(rnd[tokens], minlength=E_)
        ratio_b, ratio_r = load_b.max() / load_b.mean(), load_r.max() / load_r.mean()
        # No id->expert table can beat E * (share of the most frequent id): that id's tokens
        # all go to one expert. On the corpus (vocab 8000) the top id is ~4.9% of tokens, so
        # at E=64 the bound is ~3.16 and the 1.05 goal is unreachable by any table; we hold
        # balanced to 1.05 where the bound allows it and to the bound (+0.1%) where it doesn't.
        bound = E_ * counts.max() / counts.sum()
        print(f"E={E_}: max/mean expert load over {len(tokens):,} tokens: balanced {ratio_b:.4f}, "
              f"random {ratio_r:.4f}, lower bound for any table {bound:.4f}")
        assert ratio_b <= max(1.05, 1.001 * bound), (E_, ratio_b, bound)
        assert ratio_b < ratio_r
        if E_ == 16:
            assert ratio_b <= 1.05


def test_build_hash_table_tool_and_table_file(tmp_path):
    import importlib.util

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("bht", REPO / "tools" / "build_hash_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    save_file({"embed.weight": torch.randn(V, 8, generator=torch.Generator().manual_seed(0))}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "t.npy"
    with pytest.raises(SystemExit) as e:
        tool.main(["--variant", "dispersed", "--checkpoint", str(tmp_path / "m.safetensors"),
                   "--num-experts", str(E), "--output", str(out)])
    assert e.value.code == 0
    table = np.load(out)
    assert table.shape == (1, V) and np.bincount(table[0], minlength=E).max() - np.bincount(table[0], minlength=E).min() <= 1
    layer = _layer("dispersed", table_file=str(out))  # no checkpoint needed once the table exists
    assert torch.equal(layer.router.table, torch.from_numpy(table))
    with pytest.raises(UserError, match="table_file"):
        _layer("random", table_file=str(out), num_hashes=2)  # shape mismatch names the field


def test_foreign_or_pickled_hash_files_give_one_line_naming_the_setting(tmp_path):
    """A counts / table file that is not a numeric .npy (text, a pickled object array) and an
    embedding checkpoint that is not safetensors each stop with a UserError naming the file, not
    numpy's or safetensors' traceback; a pickled array is never unpickled."""
    from megamoe.moe.hash_moe import load_tid2eid_file
    from megamoe.moe.hashing import load_counts, load_embedding, load_table_file

    text = tmp_path / "notes.txt"
    text.write_text("not an array\n")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (text, pickled):
        with pytest.raises(UserError, match=rf"moe\.hash\.counts_file=.*{bad.name}.*not a readable numeric \.npy"):
            load_counts(bad, V)
        with pytest.raises(UserError, match=rf"moe\.hash\.table_file=.*{bad.name}.*not a readable numeric"):
            load_table_file(bad, 1, E, V)
        with pytest.raises(UserError, match=rf"moe\.hash_moe\.table_file=.*{bad.name}"):
            load_tid2eid_file(bad, V, E, 2)
    with pytest.raises(UserError, match="notes.txt"):
        load_embedding(text)


# ---- MultiHash: the N hashes must partition the keys differently -------------------------

BIG_V, BIG_E = 4096, 8


def _all_hash_collision(cells_KN: torch.Tensor) -> float:
    """Fraction of pairs of distinct keys that share an expert in every one of the N hashes."""
    _, c = torch.unique(cells_KN, dim=0, return_counts=True)
    k = cells_KN.shape[0]
    return float((c * (c - 1)).sum()) / (k * (k - 1))


def _multihash_cells(variant: str, n: int, tmp_path) -> torch.Tensor:
    """[keys, N] expert of each hash for the variant's key space (sampled (cur, prev) pairs for
    bigram, every id / position otherwise), routed through HashRouter itself."""
    g = torch.Generator().manual_seed(5)
    kw = {}
    if variant == "balanced":
        counts = np.random.default_rng(0).zipf(1.2, BIG_V).astype(np.int64) % 100_000
        counts[-50:] = 0
        np.save(tmp_path / "big.counts.npy", counts)
        kw["counts_file"] = str(tmp_path / "big.counts.npy")
    if variant in ("clustered", "dispersed"):  # structured rows: 64 blobs in 16 dims
        from safetensors.torch import save_file

        centers = torch.randn(64, 16, generator=g) * 3
        emb = centers[torch.randint(0, 64, (BIG_V,), generator=g)] + torch.randn(BIG_V, 16, generator=g)
        save_file({"embed.weight": emb}, str(tmp_path / "emb.safetensors"))
        kw["embedding_checkpoint"] = str(tmp_path / "emb.safetensors")
    if variant == "oracle_future":
        kw["allow_oracle"] = True
    cfg = HashConfig(variant=variant, num_hashes=n, **kw)
    router = hashing.HashRouter(cfg, BIG_E, BIG_V, max_positions=BIG_V)
    keys = torch.arange(BIG_V)
    if variant == "bigram":
        cur, prev = torch.randint(0, BIG_V, (2, 4000), generator=g)
        ctx = RoutingContext(token_ids=cur, prev_token_ids=prev)
    else:
        ctx = RoutingContext(token_ids=keys, prev_token_ids=keys, next_token_ids=keys, positions=keys)
    return router(torch.zeros(ctx.token_ids.numel(), 1), ctx).expert_ids_TK


@pytest.mark.parametrize("variant,n", [("random", 2), ("random", 4), ("previous", 2), ("oracle_future", 2),
                                       ("balanced", 2), ("balanced", 4), ("bigram", 2), ("position", 2),
                                       ("clustered", 2), ("dispersed", 2)])
def test_multihash_hashes_partition_differently(variant, n, tmp_path):
    """Today's relabelling of hash 0 (``perm_m[table_0]``) makes every pair that collides in hash
    0 collide in all N hashes: the all-N collision rate then equals hash 0's (>= ~1/E). Random
    hashes give ~1/E^N; the deterministic variants must be far below 1/E (here < 1/(4E))."""
    cells = _multihash_cells(variant, n, tmp_path)
    one, all_n = _all_hash_collision(cells[:, :1]), _all_hash_collision(cells)
    print(f"{variant} N={n} E={BIG_E}: pairs colliding in hash 0 {one:.5f}, in all {n} hashes {all_n:.6f} "
          f"(1/E={1 / BIG_E:.5f}, 1/E^N={BIG_E ** -n:.6f})")
    assert one >= 0.9 / BIG_E  # the bar below means something: one hash collides at ~1/E
    if variant in ("random", "previous", "oracle_future"):
        assert abs(all_n * BIG_E ** n - 1) < 0.2, all_n
    else:
        assert all_n < 0.25 / BIG_E, all_n
    if variant in ("balanced", "position", "bigram", "dispersed"):  # variation keeps each hash's property
        for m in range(n):
            load = torch.bincount(cells[:, m], minlength=BIG_E).float()
            if variant == "balanced":
                counts = torch.from_numpy(np.load(tmp_path / "big.counts.npy")).double()
                load = torch.zeros(BIG_E, dtype=torch.float64).index_add_(0, cells[:, m], counts)
            assert load.max() / load.mean() < 1.02 if variant != "bigram" else load.max() / load.mean() < 1.15


def test_multihash_hash0_is_the_plain_rule(tmp_path):
    """Hash 0 of a MultiHash table is exactly the single-hash table (for every variant whose plain
    rule is seeded the same way)."""
    for variant in ("balanced", "bigram", "position", "dispersed", "clustered"):
        one = _multihash_cells(variant, 1, tmp_path)
        two = _multihash_cells(variant, 2, tmp_path)
        assert torch.equal(one[:, 0], two[:, 0]), variant


def test_dispersed_multihash_keeps_groups_apart():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 10
    emb = centers.repeat_interleave(12, 0) + 0.01 * torch.randn(48, 8, generator=g)
    labels = hashing.dispersed_clusters(emb, 4, seed=0)
    for seed in (None, 1, 2):
        table = hashing.deal_round_robin(labels, 4, seed)
        assert torch.bincount(table, minlength=4).tolist() == [12] * 4
        for grp in range(4):
            assert table[grp * 12:(grp + 1) * 12].unique().numel() == 4


def test_count_tokens_counts_the_training_split_only(tmp_path, capsys):
    """Balanced tables must come from training-data counts: the sequences megatron-core puts in
    valid/test (the tail of the file, by its rounding) are not counted."""
    import importlib.util

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "d_text_document")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    seqs = [np.arange(1 + i, 6 + i, dtype=np.int32) % 7 for i in range(8)] + [np.full(4, 9, np.int32)] * 2
    for s in seqs:  # 8 train sequences over ids 0..6, then 2 valid sequences of id 9
        builder.add_item(torch.from_numpy(s))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    spec = importlib.util.spec_from_file_location("ct", REPO / "tools" / "count_tokens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main(["--data-prefix", prefix, "--vocab-size", "12", "--split", "80,20,0"])
    assert e.value.code == 0
    counts = np.load(f"{prefix}.counts.npy")
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(seqs[:8]), minlength=12))
    assert counts[9] == 0 and "sequences 0..8 of 10" in capsys.readouterr().out
