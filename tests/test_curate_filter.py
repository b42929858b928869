"""`mmcl shard filter` and `mmcl shard dedup` on real shards written by the sharder, with made-up score
sidecars (`shards_tools.scores.write_sidecar`): exactly the right pairs are kept, removed.jsonl says why,
the output passes `mmcl shard verify`, is byte-reproducible and trains; bad arguments are one-line errors;
dedup finds planted near-duplicates, and its blocked walk equals the plain greedy definition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from media_files import COLOURS, make_image
from processes import run_mmcl

from shards_tools.config import build_config
from shards_tools.dedup import EmbeddingRows, find_duplicates, greedy_walk
from shards_tools.filter import Rule, filter_shards
from shards_tools.manifest import load_manifest
from shards_tools.run import run_sharding
from shards_tools.scores import write_sidecar
from shards_tools.tar_stream import iter_samples

PAIRS, SHARD_SIZE, CLASSES = 40, 10, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 labelled images (4 classes, interleaved) in 4 shards of 10, by the project's sharder."""
    root = tmp_path_factory.mktemp("curate")
    rows = []
    for i in range(PAIRS):
        colour = COLOURS[i % CLASSES]
        make_image(root / "in" / f"{i:03d}.png", colour, size=(24, 24), seed=i)
        rows.append(f"{i:03d}.png,a photo of a {colour} square,{colour}\n")
    (root / "in" / "m.csv").write_text("path,caption,label\n" + "".join(rows))
    config = {
        "input": {"modality": "image", "path": root / "in" / "m.csv", "label_column": "label"},
        "output": root / "shards",
        "shard_size": SHARD_SIZE,
        "workers": 1,
    }
    run_sharding(build_config(config), progress=False)
    return root / "shards"


def shard_samples(folder: Path) -> dict[str, list[dict]]:
    """Each listed shard's samples in order: key and label_index (from its .json)."""
    out = {}
    for shard in load_manifest(folder)["shards"]:
        samples = iter_samples(str(folder / shard["name"]), handler=lambda err: False)
        out[shard["name"]] = [
            {"key": s["__key__"], "label_index": json.loads(s["json"])["label_index"]} for s in samples
        ]
    return out


def made_up_score(g: int) -> float:
    """Pair g's score: every value in 0, 0.05, ..., 0.95 twice (ties), in a scrambled order."""
    return ((g * 7) % 20) / 20


def write_scores(
    shards: Path, folder: Path, *, drop: tuple[str, ...] = (), score=made_up_score, **extra
) -> dict:
    """A sidecar per shard (rows in shard order, `drop` keys left out: not scored); returns key -> row."""
    rows_by_key = {}
    g = 0
    for name, samples in shard_samples(shards).items():
        rows = []
        for sample in samples:
            value = score(g)
            row = {"key": sample["key"], "score": value, "p_value": round(1 - value, 4), "weight": value / 2}
            row.update({"label_index": sample["label_index"], **extra})
            rows_by_key[sample["key"]] = {**row, "shard": name, "g": g}
            if sample["key"] not in drop:
                rows.append(row)
            g += 1
        write_sidecar(folder, name, rows)
    return rows_by_key


def output_keys(folder: Path) -> dict[str, list[str]]:
    return {name: [s["key"] for s in samples] for name, samples in shard_samples(folder).items()}


def removed_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "removed.jsonl").read_text().splitlines()]


def expected_keys(rows: dict, keep) -> dict[str, list[str]]:
    """The input's keys per shard (in order) for which keep(row) holds; shards left empty are absent."""
    out: dict[str, list[str]] = {}
    for row in sorted(rows.values(), key=lambda r: r["g"]):
        if keep(row):
            out.setdefault(row["shard"], []).append(row["key"])
    return out


def assert_verified(folder: Path) -> None:
    result = run_mmcl("shard", "verify", folder)
    assert result.stdout.strip().endswith(": OK"), result.stdout


# ------------------------------------------------------------------------------------------ filter


def test_min_score_keeps_exactly_the_pairs_at_or_above_it(shards: Path, tmp_path: Path) -> None:
    unscored = shard_samples(shards)["shard-000001.tar"][3]["key"]
    rows = write_scores(shards, tmp_path / "scores", drop=(unscored,))
    out = tmp_path / "out"
    result = run_mmcl("shard", "filter", shards, "--scores", tmp_path / "scores", "--output", out,
                      "--min-score", "0.5", "--quiet")  # fmt: skip
    keep = {k for k, r in rows.items() if r["score"] >= 0.5 and k != unscored}
    assert output_keys(out) == expected_keys(rows, lambda r: r["key"] in keep)
    assert len(keep) == 19  # 0.5 .. 0.95 twice each, less the unscored one (0.5 itself is kept)
    removed = removed_rows(out)
    assert [r["key"] for r in removed] == [
        r["key"] for r in sorted(rows.values(), key=lambda r: r["g"]) if r["key"] not in keep
    ]
    for row in removed:
        if row["key"] == unscored:
            assert row == {"key": unscored, "shard": "shard-000001.tar", "reason": "no_score", "value": None}
        else:
            assert row["reason"] == "below_min_score" and row["value"] == rows[row["key"]]["score"] < 0.5
            assert row["shard"] == rows[row["key"]]["shard"]
    manifest = load_manifest(out)
    source = load_manifest(shards)
    assert {k: manifest[k] for k in ("modality", "prefix", "class_names", "options")} == {
        k: source[k] for k in ("modality", "prefix", "class_names", "options")
    }
    assert manifest["totals"]["samples"] == 19
    assert manifest["totals"]["skipped"] == source["totals"]["skipped"] + 21
    assert manifest["totals"]["items"] == manifest["totals"]["samples"] + manifest["totals"]["skipped"]
    assert manifest["errors_by_reason"] == {"below_min_score": 20, "no_score": 1}
    assert manifest["filtered"] == {
        "from": str(shards),
        "scores": str(tmp_path / "scores"),
        "rule": {"field": "score", "min_score": 0.5},
        "kept": 19,
        "removed": 21,
        "removed_by_reason": {"below_min_score": 20, "no_score": 1},
        "empty_shards": [],
    }
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["count"] for s in manifest["shards"]}
    assert "kept 19 of 40 pairs" in result.stdout
    assert_verified(out)


def test_keep_fraction_keeps_ceil_f_n_ties_to_the_earlier_pair(shards: Path, tmp_path: Path) -> None:
    rows = write_scores(shards, tmp_path / "scores")
    ranked = sorted(rows.values(), key=lambda r: (-r["score"], r["g"]))
    # ceil(0.275 x 40) = 11 (in floating point 0.275 * 40 is 11.000000000000002): the 11th pair has a twin
    # score 0.7, and the earlier of the two is kept
    assert ranked[10]["score"] == ranked[11]["score"] == 0.7
    keep = {r["key"] for r in ranked[:11]}
    for field in ("score", "p_value", "weight"):  # p_value = 1 - score: lower is better
        out = tmp_path / f"out-{field}"
        filter_shards(shards, tmp_path / "scores", out, Rule(field, keep_fraction=0.275))
        assert output_keys(out) == expected_keys(rows, lambda r: r["key"] in keep), field
        assert {r["reason"] for r in removed_rows(out)} == {"below_keep_fraction"}
    out = tmp_path / "out-p"
    filter_shards(shards, tmp_path / "scores", out, Rule("p_value", min_score=0.3))  # p <= 0.3: score >= 0.7
    assert output_keys(out) == expected_keys(rows, lambda r: r["score"] >= 0.7)
    assert load_manifest(out)["filtered"]["rule"] == {"field": "p_value", "max_p_value": 0.3}


def test_per_class_keeps_ceil_f_n_c_of_each_class(shards: Path, tmp_path: Path) -> None:
    unscored = shard_samples(shards)["shard-000000.tar"][0]["key"]  # class of pair 0: 9 scored pairs left
    rows = write_scores(shards, tmp_path / "scores", drop=(unscored,))
    out = tmp_path / "out"
    filter_shards(shards, tmp_path / "scores", out, Rule(keep_fraction=0.5, per_class=True))
    keep = set()
    for label in range(CLASSES):
        members = sorted(
            (r for r in rows.values() if r["label_index"] == label and r["key"] != unscored),
            key=lambda r: (-r["score"], r["g"]),
        )
        assert len(members) in (9, 10)
        keep |= {r["key"] for r in members[: math.ceil(len(members) / 2)]}
    assert len(keep) == 20  # 5 of each class: ceil(4.5) = 5 for the class with 9
    assert output_keys(out) == expected_keys(rows, lambda r: r["key"] in keep)
    reasons = {r["key"]: r["reason"] for r in removed_rows(out)}
    assert reasons.pop(unscored) == "no_score" and set(reasons.values()) == {"below_keep_fraction"}


def test_output_is_reproducible_verifies_and_trains_without_its_emptied_shard(
    shards: Path, tmp_path: Path
) -> None:
    from mmcl.data import DataConfig, build_train_stream

    # every pair of shard 1 scores 0: that shard ends up empty and is not written
    rows = write_scores(shards, tmp_path / "scores", score=lambda g: 0.0 if g // SHARD_SIZE == 1 else 1.0)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run_mmcl("shard", "filter", shards, "--scores", tmp_path / "scores", "--output", out,
                 "--min-score", "0.5", "--quiet")  # fmt: skip
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == ["manifest.json", "removed.jsonl", "shard-000000.tar", "shard-000002.tar",
                     "shard-000003.tar", "sizes.json"]  # fmt: skip
    assert sorted(p.name for p in outs[1].iterdir()) == files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    manifest = load_manifest(outs[0])
    assert manifest["filtered"]["empty_shards"] == ["shard-000001.tar"]
    assert_verified(outs[0])
    # the input is untouched (verify checks every shard's sha256 against its manifest)
    assert_verified(shards)

    kept = {k for k, r in rows.items() if r["score"] >= 0.5}
    cfg = DataConfig(sources=[{"urls": str(outs[0])}], batch_size=6, workers=0, shuffle_buffer=8, seed=1)
    stream = build_train_stream(
        cfg, modality="image", media_transform=lambda image: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
    )  # fmt: skip
    seen = [key for _, batch in zip(range(len(kept) // 6), stream, strict=False) for key in batch["keys"]]
    assert sorted(seen) == sorted(kept)  # one epoch: every kept pair once


def test_rerun_replaces_a_previous_output(shards: Path, tmp_path: Path) -> None:
    write_scores(shards, tmp_path / "scores", score=lambda g: 0.0 if g // SHARD_SIZE == 3 else 1.0)
    out = tmp_path / "out"
    filter_shards(shards, tmp_path / "scores", out, Rule(min_score=-1.0))
    assert (out / "shard-000003.tar").exists()
    filter_shards(shards, tmp_path / "scores", out, Rule(min_score=0.5))
    assert not (out / "shard-000003.tar").exists()  # emptied now: the previous run's file is gone
    assert_verified(out)


def test_pairs_over_max_bytes_are_removed_as_too_large(shards: Path, tmp_path: Path) -> None:
    from shards_tools.tar_stream import ReadOptions

    rows = write_scores(shards, tmp_path / "scores")
    sizes = {}
    for name in load_manifest(shards)["shards"]:
        for sample in iter_samples(str(shards / name["name"]), handler=lambda err: False):
            sizes[sample["__key__"]] = len(sample["jpg"])
    cap = sorted(sizes.values())[len(sizes) // 2]  # about half the images are larger
    out = tmp_path / "out"
    rule = Rule(keep_fraction=0.5)
    filter_shards(shards, tmp_path / "scores", out, rule, options=ReadOptions(max_member_bytes=cap))
    readable = sorted(
        (r for r in rows.values() if sizes[r["key"]] <= cap), key=lambda r: (-r["score"], r["g"])
    )
    keep = {r["key"] for r in readable[: math.ceil(len(readable) / 2)]}  # the best half of the readable ones
    assert output_keys(out) == expected_keys(rows, lambda r: r["key"] in keep)
    reasons = {r["key"]: r["reason"] for r in removed_rows(out)}
    assert {k for k, reason in reasons.items() if reason == "too_large"} == {
        k for k in sizes if sizes[k] > cap
    }
    assert_verified(out)


def bad_scores(shards: Path, folder: Path) -> Path:
    write_scores(shards, folder)
    path = folder / "shard-000002.tar.scores.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = '{"key": "000000024", "score": "high"}'
    path.write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("both", ["--min-score", "0.5", "--keep-fraction", "0.5"], "give exactly one of --min-score"),
        ("neither", [], "give exactly one of --min-score"),
        ("zero", ["--keep-fraction", "0"], "--keep-fraction must be in (0, 1], got 0.0"),
        ("above one", ["--keep-fraction", "1.5"], "--keep-fraction must be in (0, 1], got 1.5"),
        ("per-class min", ["--min-score", "0.5", "--per-class"], "--per-class applies only with"),
        ("bad row", ["--min-score", "0.5"], "shard-000002.tar.scores.jsonl, line 5: score 'high' is not"),
        ("no label", ["--keep-fraction", "0.5", "--per-class"], "--per-class: the sidecar row of"),
        ("inside", ["--min-score", "0.5"], "is the shard set"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    shards: Path, tmp_path: Path, case: str, flags: list, message: str
) -> None:
    scores = tmp_path / "scores"
    if case == "bad row":
        bad_scores(shards, scores)
    elif case == "no label":
        write_scores(shards, scores, label_index=None)
    else:
        write_scores(shards, scores)
    out = shards / "filtered" if case == "inside" else tmp_path / "out"
    before = sorted(p.name for p in shards.iterdir())
    result = run_mmcl("shard", "filter", shards, "--scores", scores, "--output", out, *flags, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]  # (not the progress bars)
    assert len(lines) == 1 and lines[0].startswith("mmcl shard filter: error: "), result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert not out.exists() and sorted(p.name for p in shards.iterdir()) == before


# ------------------------------------------------------------------------------------------ dedup


def planted(n: int, dim: int, copies: dict[int, int], seed: int, noise: float = 0.1) -> np.ndarray:
    """[n, 2, dim] embeddings: random rows, except row t = row copies[t] plus noise (cosine ~0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    for target, source in copies.items():
        jitter = rng.standard_normal((2, dim)).astype(np.float32)
        x[target] = x[source] + noise * jitter / np.linalg.norm(jitter, axis=1, keepdims=True)
    return x.astype(np.float16)


def test_dedup_removes_the_planted_near_duplicates(shards: Path, tmp_path: Path) -> None:
    samples = [s for name, ss in shard_samples(shards).items() for s in ss]
    keys = [s["key"] for s in samples]
    copies = {3: 0, 15: 7, 22: 21, 31: 9, 36: 35, 39: 0}  # later pairs copy earlier ones (across shards too)
    embeddings = planted(PAIRS, 32, copies, seed=5)
    unscored = keys[12]
    for i, name in enumerate(load_manifest(shards)["shards"]):
        lines = range(i * SHARD_SIZE, (i + 1) * SHARD_SIZE)
        rows = [{"key": keys[g], "score": 0.5} for g in lines if keys[g] != unscored]
        emb = np.stack([embeddings[g] for g in lines if keys[g] != unscored])
        write_sidecar(tmp_path / "scores", name["name"], rows, emb)
    out = tmp_path / "out"
    result = run_mmcl("shard", "dedup", shards, "--scores", tmp_path / "scores", "--output", out,
                      "--threshold", "0.95", "--quiet")  # fmt: skip
    removed = removed_rows(out)
    assert {r["key"]: r.get("of") for r in removed} == {
        **{keys[t]: keys[s] for t, s in copies.items()},
        unscored: None,
    }
    for row in removed:
        if row["reason"] == "duplicate":
            assert 0.95 <= row["value"] <= 1.0
    gone = {keys[t] for t in copies} | {unscored}
    assert [k for ks in output_keys(out).values() for k in ks] == [k for k in keys if k not in gone]
    assert load_manifest(out)["filtered"]["removed_by_reason"] == {"duplicate": 6, "no_score": 1}
    assert "kept 33 of 40 pairs" in result.stdout
    assert_verified(out)

    dry = tmp_path / "dry"
    flags = ["--threshold", "0.95", "--embedding", "both", "--clusters", "1", "--dry-run", "--quiet"]
    run_mmcl("shard", "dedup", shards, "--scores", tmp_path / "scores", "--output", dry, *flags)
    assert sorted(p.name for p in dry.iterdir()) == ["removed.jsonl"]
    assert [(r["key"], r["reason"], r.get("of")) for r in removed_rows(dry)] == [
        (r["key"], r["reason"], r.get("of")) for r in removed
    ]


def naive_greedy(x: np.ndarray, threshold: float) -> list[int]:
    """The definition: walk the rows; a row is a duplicate of the most similar earlier kept row with cosine
    >= threshold (-1: kept)."""
    kept: list[int] = []
    of = []
    for i, row in enumerate(x):
        sims = [float(x[j] @ row) for j in kept]
        best = int(np.argmax(sims)) if sims else -1
        if sims and sims[best] >= threshold:
            of.append(kept[best])
        else:
            of.append(-1)
            kept.append(i)
    return of


def test_blocked_walk_equals_the_plain_greedy_definition() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 16))
    # groups of near-copies at varying distances: chains where a row is close to a removed one
    x = np.concatenate([base + s * rng.standard_normal((60, 16)) for s in (0.0, 0.15, 0.3, 0.45)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)[rng.permutation(240)]
    for threshold in (0.9, 0.95):
        expected = naive_greedy(x, threshold)
        assert any(e >= 0 for e in expected)
        for block in (7, 64, 4096):  # across blocks, within a block, one block
            of, sim = greedy_walk(x[:0], x, threshold, block=block)
            assert of.tolist() == expected
            dup = of >= 0
            assert np.allclose(sim[dup], np.einsum("ij,ij->i", x[dup], x[of[dup]]), atol=1e-6)


@pytest.mark.parametrize("margin", [0.0, 0.02])
def test_dedup_core_recall_and_no_false_drops(margin: float) -> None:
    """3,000 random pairs in 6 files, 150 of them near-copies (cosine ~0.99) of others: every copy is found
    and nothing else is removed, with the default number of clusters (55)."""
    n, rng = 3000, np.random.default_rng(1)
    targets = rng.choice(n, 150, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(n), targets), 150, replace=False)
    copies = {int(t): int(s) for t, s in zip(targets, sources, strict=True)}
    x = planted(n, 64, copies, seed=2)
    parts = [x[i : i + 500] for i in range(0, n, 500)]
    result = find_duplicates(EmbeddingRows(parts), 0.95, seed=0, margin=margin)
    assert result.clusters == 55
    removed = set(np.flatnonzero(result.of >= 0).tolist())
    pairs = {frozenset(p) for p in copies.items()}
    # one of each planted pair goes (the later one in the walk), and nothing else
    assert removed == {max(p) for p in pairs}
    assert all(frozenset((r, int(result.of[r]))) in pairs for r in removed)


def test_dedup_survives_a_cluster_emptied_through_the_margin() -> None:
    """Every row of one cluster decided in its neighbour (the margin search): nothing is left to walk."""
    from shards_tools.dedup import EmbeddingRows, find_duplicates

    x = np.array([[-1.031, -0.1263, 0.5435], [-2.807, -0.448, 0.592], [-3.941, -0.9224, 0.34]], np.float16)
    found = find_duplicates(EmbeddingRows([np.stack([x, x], 1)]), 0.9, clusters=2, seed=0, margin=0.3)
    assert found.of.tolist() == [-1, 0, 0]
