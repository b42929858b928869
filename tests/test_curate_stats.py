"""`mmcl shard stats --scores`: the scores of a shard set against the sharder's noise flags.

Real shards from the project's sharder with --noise-rate (each sample's .json says whether it is noisy), and
sidecars written with made-up scores the test controls, so every reported number can be counted by hand.
One run goes through the installed command in a subprocess (every `mmcl` start imports torch: seconds), the
others through the same entry point in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fault_training import build_train_shards
from PIL import Image
from processes import run_mmcl

from mmcl.cli import main
from shards_tools.manifest import load_manifest
from shards_tools.scores import sidecar_path, write_sidecar
from shards_tools.shard_format import parse_json_object
from shards_tools.tar_stream import iter_samples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNSCORED = 2  # the last samples of the last shard get no row


@pytest.fixture(scope="module")
def noisy_shards(tmp_path_factory) -> Path:
    """48 pictures in 4 shards, half of the pairs given another pair's caption (recorded as noisy)."""
    return build_train_shards(tmp_path_factory.mktemp("stats_scores"), 48, 12, size=(16, 16), noise_rate=0.5)


def shard_truth(shards: Path) -> dict[str, list[tuple[str, bool]]]:
    """Shard name -> (key, noisy) of each sample, read back from the shards' .json members."""
    truth = {}
    for shard in load_manifest(shards)["shards"]:
        samples = iter_samples(str(shards / shard["name"]), handler=lambda err: False, extensions=["json"])
        truth[shard["name"]] = [
            (s["__key__"], parse_json_object(s["json"])["noisy"] is True) for s in samples
        ]
    return truth


def made_up_score(index: int, noisy: bool) -> float:
    """Noisy pairs score low and clean ones high, except every fifth of each (so the AUROC is below 1)."""
    if noisy:
        return 0.9 - index * 0.001 if index % 5 == 0 else 0.1 + index * 0.001
    return 0.2 + index * 0.001 if index % 5 == 1 else 0.7 + index * 0.001


@pytest.fixture(scope="module")
def scored(noisy_shards: Path, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A scores folder for the shards (score, p_value = 1 - score, and the noisy flag) and its rows."""
    folder = tmp_path_factory.mktemp("scores")
    truth = shard_truth(noisy_shards)
    all_rows, index = [], 0
    names = sorted(truth)
    for name in names:
        rows = []
        for key, noisy in truth[name]:
            score = round(made_up_score(index, noisy), 6)
            rows.append({"key": key, "score": score, "p_value": round(1 - score, 6), "noisy": noisy})
            index += 1
        if name == names[-1]:
            rows = rows[:-UNSCORED]
        write_sidecar(folder, name, rows)
        all_rows += rows
    return folder, all_rows


def brute_force_auroc(noisy_values: list[float], clean_values: list[float]) -> float:
    """P(a noisy pair scores below a clean one), ties counted half: the AUROC, pair by pair."""
    wins = sum((n < c) + 0.5 * (n == c) for n in noisy_values for c in clean_values)
    return wins / (len(noisy_values) * len(clean_values))


def stats_json(*args: object, capsys) -> dict:
    assert main(["shard", "stats", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_noisy_shards_are_half_noisy(noisy_shards: Path) -> None:
    flags = [noisy for samples in shard_truth(noisy_shards).values() for _, noisy in samples]
    assert len(flags) == 48 and 10 < sum(flags) < 38  # both classes are there to detect


def test_scores_report_through_the_command(noisy_shards: Path, scored, tmp_path: Path) -> None:
    folder, rows = scored
    plot = tmp_path / "plots" / "cc.png"
    result = run_mmcl(
        "shard", "stats", noisy_shards, "--scores", folder, "--threshold", 0.5, "--json", "--plot", plot
    )
    report = json.loads(result.stdout)  # the plot paths go to stderr: stdout is the JSON alone
    assert report["samples"] == 48 and "scores" in report
    scores = report["scores"]
    assert (scores["pairs"], scores["scored"], scores["without_score"]) == (48, 48 - UNSCORED, UNSCORED)
    assert scores["field"] == "score" and scores["duplicate_rows"] == 0

    values = [r["score"] for r in rows]
    noisy = [r["score"] for r in rows if r["noisy"]]
    clean = [r["score"] for r in rows if not r["noisy"]]
    truth = scores["truth"]
    assert (truth["noisy"], truth["clean"]) == (len(noisy), len(clean))
    assert truth["auroc"] == pytest.approx(brute_force_auroc(noisy, clean), abs=1e-6)
    assert 0.5 < truth["auroc"] < 1.0
    assert sum(truth["histogram_noisy"]["counts"]) == len(noisy)
    assert sum(truth["histogram_clean"]["counts"]) == len(clean)
    assert sum(scores["histogram"]["counts"]) == len(values)
    assert scores["quantiles"]["min"] == min(values) and scores["quantiles"]["max"] == max(values)
    assert scores["quantiles"]["median"] == pytest.approx(float(np.median(values)), abs=1e-6)
    assert scores["mean"] == pytest.approx(float(np.mean(values)), abs=1e-6)

    flagged = [r for r in rows if r["score"] < 0.5]
    hits = sum(r["noisy"] for r in flagged)
    cut = scores["at_threshold"]
    assert (cut["threshold"], cut["flagged"], cut["true_positives"]) == (0.5, len(flagged), hits)
    assert cut["precision"] == pytest.approx(hits / len(flagged), abs=1e-6)
    assert cut["recall"] == pytest.approx(hits / len(noisy), abs=1e-6)
    assert cut["kept_fraction"] == pytest.approx(1 - len(flagged) / len(values), abs=1e-6)
    assert truth["at_clean_fraction"] is None  # a --threshold was given

    assert (
        f"plot: {plot}" in result.stderr
        and f"scores plot: {plot.with_name('cc.scores.png')}" in result.stderr
    )
    for path in (plot, plot.with_name("cc.scores.png")):
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()


def test_console_report_and_the_clean_share_cut(noisy_shards: Path, scored, capsys) -> None:
    folder, rows = scored
    assert main(["shard", "stats", str(noisy_shards), "--scores", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "modality      image" in out  # the shard report comes first, as without --scores
    assert f"scored        {48 - UNSCORED} of 48 pairs ({UNSCORED} without a score)" in out
    assert "AUROC" in out and "clean share" in out

    report = stats_json(noisy_shards, "--scores", folder, capsys=capsys)["scores"]
    cut = report["truth"]["at_clean_fraction"]
    clean = sum(not r["noisy"] for r in rows)
    assert cut["keep_fraction"] == pytest.approx(clean / len(rows), abs=1e-6)
    # the threshold is the clean-th best score: flagging below it keeps exactly the clean count (no ties)
    best = sorted((r["score"] for r in rows), reverse=True)
    assert cut["threshold"] == best[clean - 1]
    assert len(rows) - cut["flagged"] == clean
    hits = sum(r["noisy"] for r in rows if r["score"] < cut["threshold"])
    assert cut["true_positives"] == hits and cut["precision"] == cut["recall"]


def test_p_value_flags_the_high_values(noisy_shards: Path, scored, capsys) -> None:
    folder, rows = scored
    report = stats_json(
        noisy_shards, "--scores", folder, "--field", "p_value", "--threshold", 0.5, capsys=capsys
    )["scores"]
    score_report = stats_json(noisy_shards, "--scores", folder, capsys=capsys)["scores"]
    assert report["field"] == "p_value" and report["truth"]["noisy_if"] == "high"
    # p_value = 1 - score: the same ranking read the other way round
    assert report["truth"]["auroc"] == pytest.approx(score_report["truth"]["auroc"], abs=1e-6)
    flagged = [r for r in rows if r["p_value"] > 0.5]
    assert report["at_threshold"]["flagged"] == len(flagged)
    assert report["at_threshold"]["true_positives"] == sum(r["noisy"] for r in flagged)


def test_without_ground_truth_one_histogram(noisy_shards: Path, scored, tmp_path: Path, capsys) -> None:
    _, rows = scored
    folder = tmp_path / "scores"
    truth = shard_truth(noisy_shards)
    for name in sorted(truth)[:2]:  # two shards scored, two not
        keys = {key for key, _ in truth[name]}
        write_sidecar(
            folder, name, [{"key": r["key"], "weight": r["score"]} for r in rows if r["key"] in keys]
        )
    plot = tmp_path / "stats.png"
    args = ["shard", "stats", str(noisy_shards), "--scores", str(folder), "--field", "weight"]
    assert main([*args, "--threshold", "0.5", "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)["scores"]
    assert (report["scored"], report["without_score"], report["shards_without_sidecar"]) == (24, 24, 2)
    assert report["truth"] is None and "precision" not in report["at_threshold"]
    assert (tmp_path / "stats.scores.png").read_bytes()[:8] == PNG_MAGIC


def test_a_malformed_sidecar_row_is_one_message(noisy_shards: Path, scored, tmp_path: Path) -> None:
    folder, _ = scored
    bad = tmp_path / "bad"
    bad.mkdir()
    name = sorted(shard_truth(noisy_shards))[1]
    lines = sidecar_path(folder, name).read_text().splitlines()
    lines[3] = '{"key": "x", "score": "high"}'
    sidecar_path(bad, name).write_text("\n".join(lines) + "\n")
    result = run_mmcl("shard", "stats", noisy_shards, "--scores", bad, check=False)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert err[0].startswith("mmcl shard stats: error: ") and f"{name}.scores.jsonl, line 4: score" in err[0]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--threshold", "0.5"], "--threshold only applies with --scores"),
        (["--field", "weight"], "--field only applies with --scores"),
        (["--field", "p_value", "--threshold", "0.1"], "--field and --threshold only apply with --scores"),
        (["--scores", "{missing}"], "not a folder"),
        (["--scores", "{empty}"], "has no sidecar for any shard"),
        (["--scores", "{scores}", "--field", "weight"], "has a 'weight' (the rows hold: p_value, score)"),
        (["--scores", "{scores}", "--threshold", "nan"], "--threshold must be a finite number"),
        (["--scores", "{huge}"], "is not a number within +-1e+06"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(
    noisy_shards: Path, scored, tmp_path: Path, capsys, args: list[str], named: str
) -> None:
    (tmp_path / "empty").mkdir()
    name = load_manifest(noisy_shards)["shards"][0]["name"]
    write_sidecar(tmp_path / "huge", name, [{"key": "a", "score": -1e308}, {"key": "b", "score": 1e308}])
    paths = {"missing": tmp_path / "missing", "scores": scored[0]}
    paths |= {"empty": tmp_path / "empty", "huge": tmp_path / "huge"}
    argv = ["shard", "stats", str(noisy_shards), *(a.format(**paths) for a in args)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmcl shard stats: error: ") and named in err[0], err
    assert captured.out == ""  # refused before anything is reported
