"""`mmcl shard score` on real shards through the real CLI: scores equal the model's cosine similarity, a
killed run resumes to identical sidecars, parts add up, a run's own weights export, and training reads the
sidecars as it reads .json alignment scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from fault_training import build_train_shards
from processes import REPO, kill9, run_mmcl, run_mmcl_on, wait_until
from safetensors.torch import save_file

from mmcl.data import DataConfig, build_train_stream
from mmcl.data.pipeline import keyed_samples
from mmcl.data.text import captions_of, read_meta
from mmcl.eval.datasets import MediaDecoder
from mmcl.eval.loading import load_eval_model
from mmcl.noise.local_fdr import null_pvalues
from shards_tools.scores import embeddings_path, read_sidecar, scored_shards, sidecar_path, write_sidecar

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "mmcl-micro-vit"


@pytest.fixture(scope="module")
def noisy_shards(tmp_path_factory) -> Path:
    """64 images in 8 shards, half of the captions swapped (`--noise-rate 0.5`: "noisy" in each .json)."""
    return build_train_shards(
        tmp_path_factory.mktemp("score"), 64, 8, size=(36, 36), noise_rate=0.5, labels=True
    )


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A micro open_clip model's random weights, so the CLI and this test load the very same model."""
    open_clip.add_model_config(REPO / "configs" / "models" / f"{MODEL}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    path = tmp_path_factory.mktemp("weights") / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def score(shards: Path, output: Path, weights: Path, *flags: str, check: bool = True):
    return run_mmcl(
        "shard", "score", shards, "--open-clip", MODEL, "--pretrained", weights, "--output", output,
        "--batch-size", "8", "--quiet", *flags, check=check,
    )  # fmt: skip


def sidecars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_scores_are_the_models_cosine_similarity(noisy_shards, weights_file, tmp_path) -> None:
    out = score(noisy_shards, tmp_path / "s", weights_file, "--p-values", "--embeddings", "--workers", "2")
    assert "scored 64 pairs in 8 shard(s)" in out.stdout
    model = load_eval_model(open_clip_name=MODEL, pretrained=str(weights_file))
    decode = MediaDecoder.for_model(model)
    shard = sorted(noisy_shards.glob("*.tar"))[3]
    samples = list(keyed_samples([str(shard)], lambda e: False))
    media = torch.stack([decode(s["jpg"], s["__key__"]) for s in samples])
    captions = [captions_of(s, read_meta(s))[0] for s in samples]
    with torch.no_grad():
        m = model.encode_media(media, normalize=True)
        t = model.encode_text(model.tokenizer(captions), normalize=True)
        p = null_pvalues(m, t, model.logit_params()[0].exp(), gather=False)
    rows = list(read_sidecar(sidecar_path(tmp_path / "s", shard.name)))
    assert [r["key"] for r in rows] == [s["__key__"] for s in samples]
    assert np.allclose([r["score"] for r in rows], (m * t).sum(-1).numpy(), atol=1e-5)
    assert np.allclose([r["p_value"] for r in rows], p.numpy(), atol=1e-6)
    assert [r["noisy"] for r in rows] == [read_meta(s)["noisy"] for s in samples]
    stored = np.load(embeddings_path(tmp_path / "s", shard.name))
    assert stored.shape == (8, 2, m.shape[1]) and stored.dtype == np.float16
    assert np.allclose(stored[:, 0], m.numpy(), atol=2e-3) and np.allclose(stored[:, 1], t.numpy(), atol=2e-3)
    summary = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert summary["samples"] == 64 and "noisy_auroc" in summary["fields"]["score"]


def test_a_killed_score_run_resumes_to_identical_output(noisy_shards, weights_file, tmp_path) -> None:
    score(noisy_shards, tmp_path / "whole", weights_file, "--embeddings", "--workers", "0")
    command = [sys.executable, "-m", "mmcl", "shard", "score", str(noisy_shards), "--open-clip", MODEL]
    command += ["--pretrained", str(weights_file), "--output", str(tmp_path / "killed"), "--batch-size", "8"]
    command += ["--embeddings", "--workers", "0", "--quiet"]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    wait_until(lambda: bool(scored_shards(tmp_path / "killed")), "the first sidecar", proc)
    kill9(proc, whole_group=True)
    done = len(scored_shards(tmp_path / "killed"))
    again = score(noisy_shards, tmp_path / "killed", weights_file, "--embeddings", "--workers", "0")
    assert f"({done} done before" in again.stdout
    assert sidecars(tmp_path / "killed") == sidecars(tmp_path / "whole")


def test_parts_add_up_to_the_whole(noisy_shards, weights_file, tmp_path) -> None:
    score(noisy_shards, tmp_path / "whole", weights_file, "--workers", "0")
    for part in ("0/3", "1/3", "2/3"):
        score(noisy_shards, tmp_path / "parts", weights_file, "--workers", "0", "--part", part)
    assert sidecars(tmp_path / "parts") == sidecars(tmp_path / "whole")


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "exactly one of --checkpoint"),
        (["--open-clip", MODEL, "--hf-clap", "x"], "exactly one of --checkpoint"),
        (["--open-clip", MODEL, "--part", "3/3"], "--part 3/3"),
        (["--from-run", "nowhere"], "no nowhere/sample_keys"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(noisy_shards, tmp_path, flags, message) -> None:
    result = run_mmcl("shard", "score", noisy_shards, "--output", tmp_path / "s", *flags, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("mmcl shard score: error:") == 1 and message in result.stderr


def train_config(path: Path, shards: Path, output: Path, **sections) -> Path:
    config = {
        "run": {"output_dir": str(output), "seed": 0},
        "model": {"modality": "image", "open_clip_name": MODEL},
        "data": {"sources": [{"urls": str(shards)}], "batch_size": 8, "workers": 1, "shuffle_buffer": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 10, "log_every": 5, "checkpoint_every": 5, "log_sample_keys": True},
        "noise": {"method": "loss_mixture", "warmup_steps": 2, "ramp_steps": 2, "refit_every": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_runs_own_weights_export_as_sidecars(noisy_shards, tmp_path) -> None:
    config = train_config(tmp_path / "c.yaml", noisy_shards, tmp_path / "run")
    run_mmcl("train", "--config", config, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = {}
    for line in (tmp_path / "run" / "sample_keys" / "rank-0.jsonl").read_text().splitlines():
        row = json.loads(line)
        for (_, key), weight in zip(row["samples"], row["weights"], strict=True):
            last[key] = (weight, row["step"])
    out = run_mmcl("shard", "score", noisy_shards, "--from-run", tmp_path / "run", "--output", tmp_path / "s")
    assert f"scored {len(last)} pairs" in out.stdout
    rows = {r["key"]: r for r in (row for path in sorted((tmp_path / "s").glob("*.jsonl"))
                                  for row in read_sidecar(path))}  # fmt: skip
    assert {k: (r["weight"], r["step"]) for k, r in rows.items()} == last
    assert all(isinstance(r["noisy"], bool) for r in rows.values())
    # as at the checkpoint of step 5: only what the first 5 steps saw
    run_mmcl("shard", "score", noisy_shards, "--from-run", tmp_path / "run", "--until-step", "5",
             "--output", tmp_path / "s5")  # fmt: skip
    early = {r["key"]: r for path in sorted((tmp_path / "s5").glob("*.jsonl")) for r in read_sidecar(path)}
    assert early and all(r["step"] <= 5 for r in early.values()) and len(early) <= 5 * 8


def test_sidecar_scores_reach_the_batches_like_json_scores(noisy_shards, tmp_path) -> None:
    """The same scores, once in sidecars and once as each sample's .json alignment_score, give the same
    alignment_score tensors in the training batches (what noise.method alignment_score weighs)."""
    rng = np.random.default_rng(0)
    with_json = tmp_path / "with_json"
    with_json.mkdir()
    for shard in sorted(noisy_shards.glob("*.tar")):
        rows = [{"key": s["__key__"], "score": round(float(rng.uniform(-1, 1)), 6)}
                for s in keyed_samples([str(shard)], lambda e: False)]  # fmt: skip
        write_sidecar(tmp_path / "s", shard.name, rows)
        by_key = {r["key"]: r["score"] for r in rows}
        write_json_scores(shard, with_json / shard.name, by_key)
    for name in ("manifest.json", "sizes.json"):
        shutil.copy(noisy_shards / name, with_json / name)

    def batches(source: dict) -> list[dict]:
        cfg = DataConfig(sources=[source], batch_size=8, workers=0, shuffle_buffer=8, seed=3)
        stream = build_train_stream(
            cfg, modality="image", media_transform=lambda image: torch.zeros(3, 4, 4),
            tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        )  # fmt: skip
        return [b for _, b in zip(range(8), stream, strict=False)]

    from_sidecars = batches({"urls": str(noisy_shards), "scores": str(tmp_path / "s")})
    from_json = batches({"urls": str(with_json)})
    for a, b in zip(from_sidecars, from_json, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["alignment_score"], b["alignment_score"])
    assert not torch.isnan(torch.cat([b["alignment_score"] for b in from_sidecars])).any()


def write_json_scores(source: Path, target: Path, scores: dict[str, float]) -> None:
    """A copy of a shard with each sample's score written into its .json as alignment_score."""
    from shards_tools.writer import sample_bytes, tar_end

    body = b""
    for sample in keyed_samples([str(source)], lambda e: False):
        meta = json.loads(sample["json"])
        meta["alignment_score"] = scores[sample["__key__"]]
        sample["json"] = json.dumps(meta).encode("utf-8")
        body += sample_bytes({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    target.write_bytes(body + tar_end(len(body)))


def test_a_missing_scores_folder_is_named(noisy_shards, tmp_path) -> None:
    config = train_config(tmp_path / "c.yaml", noisy_shards, tmp_path / "run")
    result = run_mmcl(
        "train", "--config", config, f"data.sources=[{{urls: {noisy_shards}, scores: {tmp_path / 'none'}}}]",
        "--check", check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "data.sources[0].scores" in result.stderr


def test_audio_pairs_are_scored_alike(tmp_path) -> None:
    """Audio-text pairs, scored by a (tiny, random) transformers CLAP model: the same cosine similarities as
    the model gives in-process."""
    from test_hf_clap import tiny_clap, tone_shards

    shards = tone_shards(tmp_path)
    tiny_clap(tmp_path / "clap", fusion=False, seed=0)
    out = run_mmcl(
        "shard", "score", shards, "--hf-clap", tmp_path / "clap", "--output", tmp_path / "s",
        "--workers", "0", "--quiet",
    )  # fmt: skip
    assert "scored 24 pairs in 3 shard(s)" in out.stdout
    model = load_eval_model(hf_clap=str(tmp_path / "clap"))
    decode = MediaDecoder.for_model(model)
    shard = sorted(shards.glob("*.tar"))[1]
    samples = list(keyed_samples([str(shard)], lambda e: False))
    ext = next(e for e in ("flac", "wav") if e in samples[0])
    with torch.no_grad():
        audio = model.encode_media(
            torch.stack([decode(s[ext], s["__key__"]) for s in samples]), normalize=True
        )
        text = model.encode_text(model.tokenizer([captions_of(s, read_meta(s))[0] for s in samples]))
    rows = list(read_sidecar(sidecar_path(tmp_path / "s", shard.name)))
    assert np.allclose([r["score"] for r in rows], (audio * text).sum(-1).numpy(), atol=1e-5)


def test_combined_weights_are_the_estimate_times_the_mapped_scores(noisy_shards, tmp_path) -> None:
    """noise.combine_scores: from the first step (local_fdr still uniform in its warm-up), each pair's weight
    is its sidecar score mapped through score_range; here the truth itself (clean 1, swapped 0)."""
    for shard in sorted(noisy_shards.glob("*.tar")):
        rows = [{"key": s["__key__"], "score": 0.0 if read_meta(s)["noisy"] else 1.0}
                for s in keyed_samples([str(shard)], lambda e: False)]  # fmt: skip
        write_sidecar(tmp_path / "s", shard.name, rows)
    config = train_config(
        tmp_path / "c.yaml", noisy_shards, tmp_path / "run", train={"steps": 3, "checkpoint_every": 3},
        noise={"method": "local_fdr", "combine_scores": True, "score_range": [0.2, 0.8], "warmup_steps": 100},
    )  # fmt: skip
    sources = f"data.sources=[{{urls: {noisy_shards}, scores: {tmp_path / 's'}}}]"
    run_mmcl("train", "--config", config, sources, env={**os.environ, "OMP_NUM_THREADS": "1"})
    truth = {
        s["__key__"]: read_meta(s)["noisy"]
        for s in keyed_samples(sorted(map(str, noisy_shards.glob("*.tar"))), lambda e: False)
    }
    logged = [
        json.loads(line)
        for line in (tmp_path / "run" / "sample_keys" / "rank-0.jsonl").read_text().splitlines()
    ]
    pairs = [
        (truth[key], weight)
        for row in logged
        for (_, key), weight in zip(row["samples"], row["weights"], strict=True)
    ]
    assert (
        len(pairs) == 3 * 8
        and {w for noisy, w in pairs if noisy} == {0.0}
        and {w for noisy, w in pairs if not noisy} == {1.0}
    )


def test_two_processes_under_accelerate_split_the_shards(noisy_shards, weights_file, tmp_path) -> None:
    score(noisy_shards, tmp_path / "one", weights_file, "--workers", "0")
    result = run_mmcl_on(
        2, "shard", "score", noisy_shards, "--open-clip", MODEL, "--pretrained", weights_file,
        "--output", tmp_path / "two", "--batch-size", "8", "--workers", "0", "--quiet",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.stdout.count("scored 32 pairs in 4 shard(s)") == 2
    one, two = sidecars(tmp_path / "one"), sidecars(tmp_path / "two")
    assert {k: v for k, v in one.items() if k != "scores.json"} == {
        k: v for k, v in two.items() if k != "scores.json"
    }
