"""Hash routing (Hash Layers, Roller et al. 2021): tables and the :class:`HashRouter`.

Each token goes to expert(s) chosen by a fixed function of token ids (or positions), never of
hidden states: no router parameters, no balancing loss, no capacity (every token is
processed, ``keep_TK`` is all True, combine weight 1).

The table is the registered int64 buffer ``table`` (canonical name ``moe.router.table``),
shape ``[N, K]``: N = number of hashes (MultiHash; 1 otherwise), K = the key space:
vocabulary size V for id-keyed variants, ``max_position_embeddings`` for ``position``.
``table[m, key]`` is the expert of hash m. It is saved in every state_dict; loading
overwrites it and NEVER rebuilds it (build with ``build_table=False`` to construct an empty
placeholder when the counts file / embedding checkpoint is not at hand).

Variant rules (key -> expert):
- random: one seeded uniform draw per id.
- balanced: ids sorted by unigram count of the TRAINING split (desc, ties by id) each go to the
  expert with the smallest running total (ties: lowest index); never-seen ids are dealt
  round-robin. (ParlAI issue #3735: balanced tables were built offline from training-data
  unigram frequencies; tools/count_tokens.py counts the train split only.)
- bigram: ``(table[cur] + (P * table[prev]) % E) % E`` with table[v] = v % E and prime P, i.e.
  ParlAI's ``input[t] % B + (prime * input[t-1]) % B`` (P * (prev % E) = P * prev mod E).
- previous: random table applied to the previous id. oracle_future: random table applied to
  the NEXT id (leaks the label; guarded by ``allow_oracle``).
- position: ``t % E`` (a control).
- clustered: k-means (E clusters) over a checkpoint's embedding rows; cluster = expert.
- dispersed: k-means with about V/E clusters; each cluster's members (by id) are dealt
  round-robin over experts with one counter running across clusters.

MultiHash (N > 1): hash 0 is the plain rule above; every hash m >= 1 must induce a DIFFERENT
partition of the keys (relabelling the experts of hash 0, ``perm_m[table_0]``, induces the same
one, so N hashes would act as one). Hash m >= 1 applies the same rule with seed ``seed + m``
to a seeded variation the rule leaves free:
- random / previous / oracle_future: a fresh draw.
- balanced: ids visited in count order with a seeded shuffle inside each block of E
  consecutive count ranks (ids of neighbouring rank count as ties); each id still goes to the
  least-loaded expert, so the greedy keeps its balance (tests/moe/test_hashing.py measures both).
- bigram, position: the rule applied to seeded relabelled keys, ``sigma_m(key) % E`` (a
  permutation sigma_m of the vocabulary / positions): each hash is as balanced over keys as
  hash 0.
- clustered: residual k-means: hash m clusters what is left of each row after subtracting the
  centroids of hashes 0..m-1, so it splits the clusters of the earlier hashes instead of
  re-finding them (different k-means seeds on the same rows mostly re-find the same clusters).
- dispersed: the same V/E clusters, dealt in a seeded order of clusters and of members.
The fraction of key pairs that collide in all N hashes is then ~1/E^N for random and far below
1/E for the deterministic variants (measured in tests/moe/test_hashing.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megamoe.errors import UserError
from megamoe.model.config import HashConfig
from megamoe.moe.router import RouterOutput
from megamoe.utils import progress


@dataclass
class RoutingContext:
    """Token-level side information, same leading shape as the layer input x[..., D].
    prev_token_ids at position 0 holds a BOS/pad id (the decoder decides which)."""

    token_ids: torch.Tensor | None = None
    prev_token_ids: torch.Tensor | None = None
    next_token_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def random_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_experts, (vocab_size,), generator=g, dtype=torch.int64)


def _block_shuffled(order: np.ndarray, block: int, seed: int) -> np.ndarray:
    """``order`` with a seeded shuffle inside each run of ``block`` consecutive entries."""
    rng = np.random.default_rng(seed)
    out = order.copy()
    for s in range(0, len(out), block):
        rng.shuffle(out[s:s + block])
    return out


def balanced_table(counts_V: np.ndarray | torch.Tensor, num_experts: int,
                   shuffle_seed: int | None = None) -> torch.Tensor:
    """Greedy least-loaded assignment in count order; ``shuffle_seed`` (MultiHash hashes m >= 1)
    shuffles the visiting order inside each block of E consecutive count ranks."""
    counts = np.asarray(counts_V, dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # count desc, then id asc
    if shuffle_seed is not None:
        order = _block_shuffled(order, num_experts, shuffle_seed)
    table = np.empty(len(counts), dtype=np.int64)
    heap = [(0, e) for e in range(num_experts)]
    unseen = 0
    for v in order:
        c = int(counts[v])
        if c == 0:
            table[v] = unseen % num_experts
            unseen += 1
            continue
        total, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (total + c, e))
    return torch.from_numpy(table)


def _modulo_table(num_keys: int, num_experts: int, relabel_seed: int | None) -> torch.Tensor:
    """``key % E``, or ``sigma(key) % E`` for a seeded permutation sigma of the keys."""
    keys = torch.arange(num_keys, dtype=torch.int64)
    if relabel_seed is not None:
        keys = torch.randperm(num_keys, generator=torch.Generator().manual_seed(relabel_seed))
    return keys % num_experts


def bigram_table(vocab_size: int, num_experts: int, relabel_seed: int | None = None) -> torch.Tensor:
    return _modulo_table(vocab_size, num_experts, relabel_seed)


def position_table(max_positions: int, num_experts: int, relabel_seed: int | None = None) -> torch.Tensor:
    return _modulo_table(max_positions, num_experts, relabel_seed)


def kmeans(x_VD: torch.Tensor, k: int, iters: int = 25, seed: int = 0, chunk: int = 8192) -> torch.Tensor:
    """Lloyd's k-means in torch (k-means++ seeding). Returns labels [V]. Written here because
    sklearn is not a dependency and the job is 30 lines; empty clusters are re-seeded from the
    farthest points."""
    x = x_VD.float()
    V = x.shape[0]
    if k > V:
        raise UserError(f"k-means: {k} clusters for only {V} embedding rows")
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(0, V, (1,), generator=g)]
    d2 = torch.cdist(x, centers).squeeze(1).square()
    for _ in range(1, k):  # k-means++
        idx = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=g)
        centers = torch.cat([centers, x[idx]])
        d2 = torch.minimum(d2, (x - x[idx]).square().sum(1))
    labels = torch.zeros(V, dtype=torch.int64)
    for _ in progress(range(iters), desc="k-means", leave=False):
        dist_min = torch.empty(V)
        for s in range(0, V, chunk):
            d = torch.cdist(x[s:s + chunk], centers)
            dist_min[s:s + chunk], labels[s:s + chunk] = d.min(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        centers = sums / counts.clamp(min=1).unsqueeze(1).float()
        if len(empty):
            far = torch.topk(dist_min, len(empty)).indices
            centers[empty] = x[far]
    return labels


def clustered_table(embed_VD: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    return kmeans(embed_VD, num_experts, seed=seed)


def clustered_tables(embed_VD: torch.Tensor, num_experts: int, num_hashes: int, seed: int) -> torch.Tensor:
    """[N, V]: hash 0 = k-means of the rows; hash m >= 1 = k-means of the residual after the
    centroids of hashes 0..m-1 (residual vector quantisation)."""
    res_VD = embed_VD.float().clone()
    tables = []
    for m in range(num_hashes):
        labels_V = kmeans(res_VD, num_experts, seed=seed + m)
        tables.append(labels_V)
        counts_E = torch.bincount(labels_V, minlength=num_experts).clamp(min=1).unsqueeze(1).float()
        centroids_ED = torch.zeros(num_experts, res_VD.shape[1]).index_add_(0, labels_V, res_VD) / counts_E
        res_VD = res_VD - centroids_ED[labels_V]
    return torch.stack(tables)


def deal_round_robin(labels_V: torch.Tensor, num_experts: int, shuffle_seed: int | None = None) -> torch.Tensor:
    """Members of each cluster dealt over experts with one counter running across clusters, in
    cluster-then-id order, or (``shuffle_seed``) in a seeded order of clusters and of members."""
    V = labels_V.shape[0]
    rank_V = torch.arange(V)
    cluster_rank = labels_V
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        rank_V = torch.randperm(V, generator=g)
        num_clusters = int(labels_V.max()) + 1
        cluster_rank = torch.randperm(num_clusters, generator=g)[labels_V]
    order = torch.argsort(cluster_rank * V + rank_V)
    table = torch.empty(V, dtype=torch.int64)
    table[order] = torch.arange(V) % num_experts
    return table


def dispersed_table(embed_VD: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    return deal_round_robin(dispersed_clusters(embed_VD, num_experts, seed), num_experts)


def dispersed_clusters(embed_VD: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    return kmeans(embed_VD, max(1, round(embed_VD.shape[0] / num_experts)), seed=seed)


def read_npy(path: Path, field: str) -> np.ndarray:
    """A numeric ``.npy`` array (never pickled objects), or one error line naming the setting."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("no .npy header")
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{field}={str(path)!r} is not a readable numeric .npy array ({e})") from None


def load_counts(path: str | Path, vocab_size: int, field: str = "moe.hash.counts_file") -> np.ndarray:
    """Train-split unigram counts [V] (``field`` names the setting in errors; hash-MoE passes its own)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{field}={str(path)!r} does not exist; run tools/count_tokens.py "
                        f"on the training data first (it writes <data-prefix>.counts.npy)")
    counts = read_npy(path, field)
    if counts.ndim != 1 or counts.shape[0] > vocab_size:
        raise UserError(f"{field}={str(path)!r} holds shape {counts.shape}; expected [V] with "
                        f"V <= model.vocab_size={vocab_size} (counts of another tokenizer?)")
    out = np.zeros(vocab_size, dtype=np.int64)
    out[: counts.shape[0]] = counts
    return out


def load_embedding(path: str | Path) -> torch.Tensor:
    """``embed.weight`` from a safetensors file (a checkpoint's full state dict)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"moe.hash.embedding_checkpoint={str(path)!r} does not exist (a safetensors file "
                        f"holding 'embed.weight')")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "embed.weight" not in f.keys():
                raise UserError(f"{path} has no tensor 'embed.weight' (keys: {sorted(f.keys())[:5]}...)")
            return f.get_tensor("embed.weight")
    except SafetensorError as e:  # a damaged or foreign file
        raise UserError(f"{path} is not a readable safetensors file ({e}); pass a checkpoint's "
                        "model.safetensors") from None


def load_table_file(path: str | Path, num_hashes: int, num_experts: int, keys: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"moe.hash.table_file={str(path)!r} does not exist; build it with tools/build_hash_table.py")
    table = torch.from_numpy(read_npy(path, "moe.hash.table_file").astype(np.int64))
    if table.dim() == 1:
        table = table.unsqueeze(0)
    if tuple(table.shape) != (num_hashes, keys) or table.min() < 0 or table.max() >= num_experts:
        raise UserError(f"moe.hash.table_file={str(path)!r} holds shape {tuple(table.shape)} with experts in "
                        f"[{int(table.min())}, {int(table.max())}]; this layer needs shape ({num_hashes}, {keys}) "
                        f"with experts in [0, {num_experts}) (moe.hash.num_hashes, vocabulary, moe.num_experts)")
    return table


def build_table(cfg: HashConfig, num_experts: int, vocab_size: int, max_positions: int,
                embed_VD: torch.Tensor | None = None, counts_V=None) -> torch.Tensor:
    """The [N, K] table for ``cfg`` (reads counts / embeddings from the configured files unless
    given)."""
    v, N = cfg.variant, cfg.num_hashes
    if cfg.table_file:
        return load_table_file(cfg.table_file, N, num_experts, max_positions if v == "position" else vocab_size)
    variation = [None] + [cfg.seed + m for m in range(1, N)]  # hash 0 is the plain rule
    if v in ("random", "previous", "oracle_future"):
        return torch.stack([random_table(vocab_size, num_experts, cfg.seed + m) for m in range(N)])
    if v == "balanced":
        counts = load_counts(cfg.counts_file, vocab_size) if counts_V is None else counts_V
        return torch.stack([balanced_table(counts, num_experts, s) for s in variation])
    if v == "bigram":
        return torch.stack([bigram_table(vocab_size, num_experts, s) for s in variation])
    if v == "position":
        return torch.stack([position_table(max_positions, num_experts, s) for s in variation])
    emb = load_embedding(cfg.embedding_checkpoint) if embed_VD is None else embed_VD
    if emb.shape[0] != vocab_size:
        raise UserError(f"embedding has {emb.shape[0]} rows but model.vocab_size={vocab_size}")
    if v == "clustered":
        return clustered_tables(emb, num_experts, N, cfg.seed)
    labels_V = dispersed_clusters(emb, num_experts, cfg.seed)
    return torch.stack([deal_round_robin(labels_V, num_experts, s) for s in variation])


class HashRouter(nn.Module):
    """Routes by ``table``; K of the output = number of hashes (MultiHash slot m = hash m)."""

    def __init__(self, cfg: HashConfig, num_experts: int, vocab_size: int, max_positions: int,
                 build: bool = True):
        super().__init__()
        self.cfg, self.num_experts = cfg, num_experts
        keys = max_positions if cfg.variant == "position" else vocab_size
        table = (build_table(cfg, num_experts, vocab_size, max_positions) if build
                 else torch.zeros(cfg.num_hashes, keys, dtype=torch.int64))
        self.register_buffer("table", table)

    def _keys(self, ctx: RoutingContext) -> torch.Tensor:
        need = {"random": "token_ids", "balanced": "token_ids", "clustered": "token_ids",
                "dispersed": "token_ids", "bigram": "token_ids", "previous": "prev_token_ids",
                "oracle_future": "next_token_ids", "position": "positions"}[self.cfg.variant]
        keys = getattr(ctx, need)
        if keys is None:
            raise ValueError(f"hash variant {self.cfg.variant!r} needs RoutingContext.{need}")
        return keys.reshape(-1)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        keys_T = self._keys(ctx)
        expert_ids_TK = self.table[:, keys_T].t()  # [T, N]
        if self.cfg.variant == "bigram":
            if ctx.prev_token_ids is None:
                raise ValueError("hash variant 'bigram' needs RoutingContext.prev_token_ids")
            prev_TK = self.table[:, ctx.prev_token_ids.reshape(-1)].t()  # hash m's relabelled prev % E
            expert_ids_TK = (expert_ids_TK + (self.cfg.bigram_prime * prev_TK) % self.num_experts) % self.num_experts
        zero = x_TD.new_zeros((), dtype=torch.float32)
        return RouterOutput(expert_ids_TK=expert_ids_TK.contiguous(),
                            weights_TK=torch.ones(expert_ids_TK.shape, dtype=torch.float32, device=x_TD.device),
                            keep_TK=torch.ones_like(expert_ids_TK, dtype=torch.bool),
                            lb_loss=zero, z_loss=zero, probs_TE=None, dropless=True)
