"""`mmcl shard dedup`: remove near-duplicate pairs, SemDeDup-style, from the embeddings `mmcl shard score
--embeddings` kept beside a shard set (`NAME.emb.npy`, float16 [rows, 2, dim]: media, text; row i is line i
of `NAME.scores.jsonl`), and write the rest as a new shard set (`shards_tools.filter.write_subset`).

How (`find_duplicates`), in bounded memory whatever the number of pairs:

1. k-means (spherical: cosine) on a seeded sample of at most `sample_size` (100k) rows: random initial
   centroids drawn from the sample by `seed`, then Lloyd iterations until no assignment changes or
   `iterations` (20). K defaults to round(sqrt(n)): comparing a row with its cluster costs ~n/K dot
   products and assigning it ~K, so sqrt(n) balances the two (1,000 clusters of ~1,000 rows for 1M pairs).
2. Every row is assigned to its nearest centroid (its home cluster) in chunks, reading the `.npy` files
   through `np.load(..., mmap_mode="r")`. A row whose second-nearest centroid is within `margin` (cosine)
   of its nearest is also a member of that second cluster, so that near-duplicates on either side of a
   cluster boundary still meet (`margin=0` is plain SemDeDup: on 200k isotropic random embeddings it misses
   6.5 % of planted near-copies, 0.02 0.6 %; on 1M clustered ones, 0.02 misses 0.6 %: bench/dedup_bench.py).
3. Clusters are processed one at a time, in index order: only that cluster's rows are loaded and
   L2-normalised. Its home rows are walked in the set's order (shard order, then position: the sidecars'
   order): a row is a duplicate if its cosine similarity to a row already kept (earlier in the walk, or a
   member kept in an earlier cluster) is >= `threshold`, and then names the most similar one; otherwise it
   is kept. Then its members whose home cluster comes later are compared with its kept rows, and those
   within `threshold` are removed now (so the member of the later cluster is the one that goes). Kept
   rows are never removed afterwards: every duplicate names a kept row. Similarities are computed in
   blocks (`BLOCK` rows x `BLOCK` kept rows at a time: 16 MB), so a 10k-row cluster never needs more than a
   few tens of MB; a cluster's cost grows with its size times its kept rows. This per-cluster exact search
   is where FAISS (an IVF index with nprobe > 1 instead of steps 2-3's second cluster, or a GPU flat index
   per cluster) would plug in for billions of pairs; it is not a dependency here.

The result depends only on the embeddings and the options (seed included), never on timing: the same
inputs remove the same pairs. Pairs without a sidecar row or embedding cannot be compared and are removed
with reason `no_score`, as `mmcl shard filter` does (the scorer could not read them either).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards_tools.errors import UsageError
from shards_tools.scores import embeddings_path, read_sidecar, sidecar_path
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS, ReadOptions

EMBEDDINGS = ("media", "text", "both")
DEFAULT_SAMPLE = 100_000  # rows the k-means is fitted on (a 512-d float32 sample: 200 MB)
DEFAULT_ITERATIONS = 20
DEFAULT_MARGIN = 0.02  # see step 2 of the module docstring; 0 gives plain SemDeDup
CHUNK = 16_384  # rows read, normalised and assigned at a time
BLOCK = 2_048  # rows compared at a time (new rows x kept rows)
UNDECIDED, KEPT, REMOVED = 0, 1, 2


def default_clusters(n: int) -> int:
    """K when --clusters is not given: round(sqrt(n)) (see the module docstring), at least 1."""
    return max(1, round(math.sqrt(n)))


def unit_rows(block: np.ndarray, embedding: str = "media") -> np.ndarray:
    """[rows, 2, dim] embeddings -> float32 [rows, d] unit vectors: the media (0) or text (1) half, or
    `both` (each half normalised, concatenated, normalised again: the mean of the two cosines)."""
    block = np.asarray(block)
    if embedding == "both":
        vectors = np.concatenate([_normalise(block[:, 0]), _normalise(block[:, 1])], axis=1)
    else:
        vectors = block[:, 0 if embedding == "media" else 1]
    return _normalise(vectors)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # a zero row stays zero: similar to nothing


class EmbeddingRows:
    """Several [rows, 2, dim] arrays (one per shard, usually memory-mapped) read as one sequence of unit
    vectors, in order; `names` name the arrays in messages."""

    def __init__(self, parts: Sequence[np.ndarray], embedding: str = "media", names: Sequence[str] = ()):
        if embedding not in EMBEDDINGS:
            raise UsageError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
        self.parts = list(parts)
        self.names = list(names) or [f"embeddings {i}" for i in range(len(self.parts))]
        self.embedding = embedding
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def _checked(self, block: np.ndarray, part: int, start: int) -> np.ndarray:
        vectors = unit_rows(block, self.embedding)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise UsageError(
                f"{self.names[part]}: row {start + int(np.flatnonzero(bad)[0])} holds non-finite numbers "
                "(NaN or inf); re-run `mmcl shard score --embeddings`"
            )
        return vectors

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The unit vectors of global rows `rows` (sorted ascending), read part by part."""
        rows = np.asarray(rows, dtype=np.int64)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        bounds = np.searchsorted(part_of, np.arange(len(self.parts) + 1))
        pieces = []
        for part in np.flatnonzero(np.diff(bounds)):
            local = rows[bounds[part] : bounds[part + 1]] - self.offsets[part]
            pieces.append(self._checked(self.parts[part][local], int(part), int(local[0])))
        if not pieces:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(pieces)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, unit vectors) of consecutive rows, at most `size` at a time."""
        for part, array in enumerate(self.parts):
            for start in range(0, len(array), size):
                yield (
                    int(self.offsets[part]) + start,
                    self._checked(array[start : start + size], part, start),
                )

    @property
    def dim(self) -> int:
        width = self.parts[0].shape[2] if self.parts else 0
        return 2 * width if self.embedding == "both" else width


def _nearest(x: np.ndarray, centroids: np.ndarray, size: int = CHUNK) -> np.ndarray:
    """Index of each row's most similar centroid, computed `size` rows at a time."""
    return np.concatenate(
        [np.argmax(x[i : i + size] @ centroids.T, axis=1) for i in range(0, len(x), size)]
        or [np.zeros(0, dtype=np.int64)]
    )


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = DEFAULT_ITERATIONS) -> np.ndarray:
    """Spherical k-means of unit rows `x`: [k, d] unit centroids. Seeded random initial centroids (distinct
    rows of `x`), Lloyd iterations until no assignment changes or `iterations`; an emptied cluster is
    re-seeded with the row farthest from its centroid, so all k stay in use."""
    k = max(1, min(k, len(x)))
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    assign: np.ndarray | None = None
    for _ in range(iterations):
        new = _nearest(x, centroids)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            fit = np.einsum("ij,ij->i", x, centroids[assign])
            sums[empty] = x[np.argsort(fit, kind="stable")[: len(empty)]]
        centroids = _normalise(sums)
    return centroids


@dataclass
class Duplicates:
    """What `find_duplicates` decided for every global row: `of` is -1 for a kept (or unused) row, else the
    kept row it duplicates, with their cosine `similarity`."""

    of: np.ndarray
    similarity: np.ndarray
    clusters: int
    stats: dict = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return int((self.of >= 0).sum())


def find_duplicates(
    rows: EmbeddingRows,
    threshold: float,
    *,
    clusters: int | None = None,
    seed: int = 0,
    use: np.ndarray | None = None,
    margin: float = DEFAULT_MARGIN,
    sample_size: int = DEFAULT_SAMPLE,
    iterations: int = DEFAULT_ITERATIONS,
    progress: bool = False,
) -> Duplicates:
    """Decide which rows are near-duplicates (cosine >= `threshold`) of a row kept before them (see the
    module docstring). `use`: a boolean mask of the rows to consider (others are neither kept nor removed:
    rows of keys that are not in the shards, say)."""
    from tqdm import tqdm

    started = time.perf_counter()
    n = rows.n
    use = np.ones(n, dtype=bool) if use is None else np.asarray(use, dtype=bool)
    used = np.flatnonzero(use)
    of = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n, dtype=np.float32)
    if len(used) == 0:
        return Duplicates(of, similarity, 0, {})
    k = clusters if clusters is not None else default_clusters(len(used))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(used, size=min(len(used), sample_size), replace=False))
    k = max(1, min(k, len(sample)))
    centroids = kmeans(rows.take(sample), k, seed=seed, iterations=iterations)
    del sample
    fitted = time.perf_counter()

    home = np.full(n, -1, dtype=np.int32)
    second = np.full(n, -1, dtype=np.int32)
    for start, x in rows.chunks():
        sims = x @ centroids.T
        stop = start + len(x)
        if k == 1:
            home[start:stop] = 0
            continue
        top = np.argpartition(-sims, 1, axis=1)[:, :2]
        best = np.take_along_axis(sims, top, axis=1)
        swap = best[:, 1] > best[:, 0]
        top[swap] = top[swap][:, ::-1]
        best[swap] = best[swap][:, ::-1]
        home[start:stop] = top[:, 0]
        if margin > 0:
            second[start:stop] = np.where(best[:, 0] - best[:, 1] <= margin, top[:, 1], -1)
    home[~use] = -1
    second[~use] = -1
    assigned = time.perf_counter()

    # every (cluster, row) membership, grouped by cluster, rows in walk order within a cluster
    extra = np.flatnonzero(second >= 0)
    member_rows = np.concatenate([used, extra])
    member_cluster = np.concatenate([home[used], second[extra]])
    order = np.lexsort((member_rows, member_cluster))
    member_rows, member_cluster = member_rows[order], member_cluster[order]
    bounds = np.searchsorted(member_cluster, np.arange(k + 1))
    del order, member_cluster, second

    # a row is decided in its home cluster, or removed earlier as the duplicate of a row kept in an earlier
    # cluster it is also a member of; kept rows stay kept, so every `of` names a kept row
    status = np.zeros(n, dtype=np.int8)
    largest = 0
    for c in tqdm(range(k), desc="dedup", unit="cluster", disable=not progress, dynamic_ncols=True):
        members = member_rows[bounds[c] : bounds[c + 1]]
        members = members[status[members] != REMOVED]
        if len(members) == 0:
            continue
        largest = max(largest, len(members))
        at_home = home[members] == c
        refs = ~at_home & (status[members] == KEPT)  # members from clusters already done
        later = ~at_home & (status[members] == UNDECIDED)  # members whose home cluster comes later
        vectors = rows.take(members)
        found_of, found_sim = greedy_walk(vectors[refs], vectors[at_home], threshold)
        new = members[at_home]
        pool = np.concatenate([members[refs], new])
        dup = found_of >= 0
        of[new[dup]] = pool[found_of[dup]]
        similarity[new[dup]] = found_sim[dup]
        status[new] = np.where(dup, REMOVED, KEPT)
        if later.any():
            kept = np.concatenate([np.flatnonzero(refs), np.flatnonzero(at_home)[~dup]])
            at, value = best_match(vectors[later], vectors[kept])
            hit = value >= threshold
            early = members[later][hit]
            of[early] = members[kept[at[hit]]]
            similarity[early] = value[hit]
            status[early] = REMOVED
    done = time.perf_counter()
    stats = {
        "rows": len(used),
        "clusters": k,
        "sample": int(min(len(used), sample_size)),
        "boundary_rows": int(len(extra)),
        "largest_cluster": int(largest),
        "removed": int((of >= 0).sum()),
        "seconds": {
            "kmeans": round(fitted - started, 3),
            "assign": round(assigned - fitted, 3),
            "clusters": round(done - assigned, 3),
        },
    }
    return Duplicates(of, similarity, k, stats)


def best_match(x: np.ndarray, pool: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """For each unit row of `x`, the index of its most similar row of `pool` and that cosine similarity
    (-1 and -inf for an empty pool), `block` x `block` similarities at a time."""
    best = np.full(len(x), -np.inf, dtype=np.float32)
    best_at = np.full(len(x), -1, dtype=np.int64)
    for b0 in range(0, len(x), block):
        part = x[b0 : b0 + block]
        rows = np.arange(len(part))
        for k0 in range(0, len(pool), block):
            s = part @ pool[k0 : k0 + block].T
            at = np.argmax(s, axis=1)
            value = s[rows, at]
            better = value > best[b0 : b0 + block]
            best[b0 : b0 + block][better] = value[better]
            best_at[b0 : b0 + block][better] = k0 + at[better]
    return best_at, best


def greedy_walk(
    kept: np.ndarray, new: np.ndarray, threshold: float, block: int = BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """Walk the unit rows `new` in order: a row is a duplicate if its cosine similarity to a row of `kept`
    or to an earlier kept row of `new` is >= threshold, else it is kept. Returns, per row of `new`, the
    index of the most similar such row in [kept, new] (-1: kept) and that similarity. Works `block` rows
    at a time, so at most block x block similarities exist at once."""
    n_ref, n_new = len(kept), len(new)
    if n_new == 0:  # a cluster whose own rows were all decided in another one (the margin)
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    dim = new.shape[1]
    pool = np.empty((n_ref + n_new, dim), dtype=np.float32)  # the kept rows, packed
    pool_index = np.empty(n_ref + n_new, dtype=np.int64)  # their index in [kept, new]
    pool[:n_ref], pool_index[:n_ref] = kept, np.arange(n_ref)
    size = n_ref
    of = np.full(n_new, -1, dtype=np.int64)
    sim = np.zeros(n_new, dtype=np.float32)
    for b0 in range(0, n_new, block):
        x = new[b0 : b0 + block]
        best_at, best = best_match(x, pool[:size], block)
        best_at = np.where(best_at >= 0, pool_index[np.maximum(best_at, 0)], -1)
        inside = x @ x.T
        close = np.tril(inside >= threshold, -1)  # only earlier rows of the block
        flagged = np.flatnonzero((best >= threshold) | close.any(axis=1))
        kept_here = np.ones(len(x), dtype=bool)
        kept_here[flagged] = False  # decided below, in order
        for i in flagged:
            earlier = np.flatnonzero(close[i, :i] & kept_here[:i])
            value, at = best[i], best_at[i]
            if len(earlier):
                j = earlier[np.argmax(inside[i, earlier])]
                if inside[i, j] > value:
                    value, at = inside[i, j], n_ref + b0 + j
            if value >= threshold:
                of[b0 + i], sim[b0 + i] = at, value
            else:
                kept_here[i] = True
        keep = np.flatnonzero(kept_here)
        pool[size : size + len(keep)] = x[keep]
        pool_index[size : size + len(keep)] = n_ref + b0 + keep
        size += len(keep)
    return of, sim


# ------------------------------------------------------------------------------------------ shard sets


@dataclass
class ScoredShard:
    """One shard's sidecar rows as dedup reads them: keys in line order, and its embeddings."""

    name: str
    keys: list[str]
    embeddings: np.ndarray


def load_embeddings(scores: Path, names: Sequence[str]) -> dict[str, ScoredShard]:
    """The sidecars and memory-mapped embeddings of the shards `names` that have both; UsageError for an
    embeddings file that does not match its sidecar, or for no embeddings at all."""
    found: dict[str, ScoredShard] = {}
    dims: set[int] = set()
    without = []
    for name in names:
        rows_path, emb_path = sidecar_path(scores, name), embeddings_path(scores, name)
        if not rows_path.is_file():
            continue
        if not emb_path.is_file():
            without.append(name)
            continue
        keys = [row["key"] for row in read_sidecar(rows_path)]
        try:
            array = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"{emb_path}: not a readable .npy file ({err})") from None
        if array.ndim != 3 or array.shape[1] != 2 or array.dtype not in (np.float16, np.float32):
            raise UsageError(f"{emb_path}: {array.dtype}{list(array.shape)}, expected float16 [rows, 2, dim]")
        if array.shape[0] != len(keys):
            raise UsageError(
                f"{emb_path}: {array.shape[0]} rows, but {rows_path.name} has {len(keys)}; "
                "re-run `mmcl shard score --embeddings`"
            )
        dims.add(int(array.shape[2]))
        found[name] = ScoredShard(name, keys, array)
    if len(dims) > 1:
        raise UsageError(
            f"{scores}: embeddings of different widths {sorted(dims)}: scored by different models?"
        )
    if not found:
        hint = f" ({len(without)} sidecars have none: score with --embeddings)" if without else ""
        raise UsageError(f"--scores {scores} holds no embeddings for any shard of this set{hint}")
    if without:
        raise UsageError(
            f"--scores {scores}: {len(without)} shards have sidecars without embeddings (such as "
            f"{embeddings_path(scores, without[0]).name}): re-score them with `mmcl shard score --embeddings`"
        )
    return found


def dedup_shards(
    shards: Path,
    scores: Path,
    output: Path,
    threshold: float,
    *,
    clusters: int | None = None,
    seed: int = 0,
    embedding: str = "media",
    margin: float = DEFAULT_MARGIN,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    progress: bool = False,
    dry_run: bool = False,
) -> dict:
    """`mmcl shard dedup`: find the near-duplicates among SHARDS' pairs from SCORES' embeddings and write
    the others to OUTPUT (or, `dry_run`, only OUTPUT/removed.jsonl). Returns a summary: the manifest's
    "filtered" entry plus "dedup" statistics (and "manifest" unless dry_run)."""
    from shards_tools import filter as subset

    if not 0.0 < threshold <= 1.0 or not math.isfinite(threshold):
        raise UsageError(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    if clusters is not None and clusters < 1:
        raise UsageError(f"--clusters must be at least 1, got {clusters}")
    if not 0.0 <= margin <= 2.0:
        raise UsageError(f"--margin is a cosine difference in [0, 2], got {margin}")
    if embedding not in EMBEDDINGS:
        raise UsageError(f"--embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    manifest, names = subset.input_shards(shards)
    subset.check_output(shards, output, names)
    if not Path(scores).is_dir():
        raise UsageError(
            f"--scores {scores}: not a folder (`mmcl shard score {shards} --embeddings` writes one)"
        )
    scored = load_embeddings(Path(scores), names)
    keys, refused = subset.shard_keys(shards, manifest, names, options, progress=progress)

    # a row is used if its key is in its shard and no later row repeats the key (the last row counts);
    # a pair without a used row cannot be compared: removed as `no_score`, as filter does
    removed: dict[tuple[str, str], dict] = dict(refused)
    order = [name for name in names if name in scored]
    used_parts = []
    for name, shard_keys in subset.usable(keys, refused).items():
        last = {key: line for line, key in enumerate(scored[name].keys)} if name in scored else {}
        lines = []
        for key in shard_keys:
            if key in last:
                lines.append(last.pop(key))
            else:
                removed[(name, key)] = {"reason": "no_score", "value": None}
        if name in scored:
            mask = np.zeros(len(scored[name].keys), dtype=bool)
            mask[np.asarray(lines, dtype=np.int64)] = True
            used_parts.append(mask)
    rows = EmbeddingRows(
        [scored[name].embeddings for name in order],
        embedding,
        [str(embeddings_path(scores, name)) for name in order],
    )
    use = np.concatenate(used_parts)
    if not use.any():
        raise UsageError(f"--scores {scores}: no sidecar row names a pair of {shards}: another set's scores?")
    result = find_duplicates(rows, threshold, clusters=clusters, seed=seed, use=use, margin=margin,
                             progress=progress)  # fmt: skip

    duplicates = np.flatnonzero(result.of >= 0)
    part_of = np.searchsorted(rows.offsets, duplicates, side="right") - 1
    of_part = np.searchsorted(rows.offsets, result.of[duplicates], side="right") - 1
    for row, part, other_part in zip(duplicates.tolist(), part_of.tolist(), of_part.tolist(), strict=True):
        name, of_name = order[part], order[other_part]
        line, of_line = row - int(rows.offsets[part]), int(result.of[row] - rows.offsets[other_part])
        removed[(name, scored[name].keys[line])] = {
            "reason": "duplicate",
            "value": round(float(result.similarity[row]), 6),
            "of": scored[of_name].keys[of_line],
            "of_shard": of_name,
        }
    rule = {
        "dedup": {
            "threshold": threshold,
            "embedding": embedding,
            "clusters": result.clusters,
            "seed": seed,
            "margin": margin,
        }
    }
    stats = {k: v for k, v in result.stats.items() if k != "seconds"}
    if dry_run:
        counts = subset.write_removed_only(shards, output, names, keys, removed)
        return {**counts, "rule": rule, "removed_by_reason": counts_by_reason(removed), "dedup": stats}
    written = subset.write_subset(shards, output, removed, scores=scores, rule=rule, options=options,
                                  progress=progress, manifest=manifest, names=names)  # fmt: skip
    return {**written["filtered"], "dedup": stats, "manifest": written}


def counts_by_reason(removed: Mapping[tuple[str, str], dict]) -> dict[str, int]:
    """How many pairs were removed for each reason, reasons sorted."""
    counts: dict[str, int] = {}
    for info in removed.values():
        counts[info["reason"]] = counts.get(info["reason"], 0) + 1
    return dict(sorted(counts.items()))
