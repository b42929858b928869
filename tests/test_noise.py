"""Noise-aware pair weighting: the mixture, the metrics, the weighter, and a real run with injected noise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from media_files import make_shapes_manifest
from processes import REPO, accelerate_launch, run_mmcl
from sklearn.metrics import roc_auc_score

from mmcl.config import load_train_config
from mmcl.errors import UsageError
from mmcl.losses import contrastive_loss
from mmcl.models import ModelConfig, build_model
from mmcl.noise.config import NoiseConfig
from mmcl.noise.local_fdr import GATE_Z, MIN_BEST_CLEAN, MIN_IMPLIED_AUROC, LocalFdr, decreasing, null_pvalues
from mmcl.noise.metrics import auroc, detection_metrics
from mmcl.noise.mixture import OnlineMixture
from mmcl.noise.teacher import MomentumTeacher
from mmcl.noise.weighting import PairWeighter
from shards_tools.config import build_config
from shards_tools.run import run_sharding


def synthetic_losses(n: int, noisy_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < noisy_fraction
    losses = np.where(noisy, rng.normal(4.0, 0.5, n), rng.gamma(4.0, 0.25, n))  # clean: mean 1.0, skewed
    return losses, noisy


@pytest.mark.parametrize("kind", ["gaussian", "beta"])
def test_mixture_recovers_known_components(kind: str) -> None:
    losses, noisy = synthetic_losses(4000, 0.3)
    mixture = OnlineMixture(window=4096, kind=kind)
    mixture.add(losses)
    params = mixture.fit()
    assert params is not None and mixture.params is not None
    assert abs(params["weight"][1] - noisy.mean()) < 0.05
    if kind == "gaussian":
        assert abs(params["mean"][0] - 1.0) < 0.15 and abs(params["mean"][1] - 4.0) < 0.15
    clean_prob = mixture.clean_probability(losses)
    assert clean_prob[~noisy].mean() > 0.9 and clean_prob[noisy].mean() < 0.1
    assert auroc(1 - clean_prob, noisy) > 0.99


def test_mixture_leaves_unimodal_losses_alone() -> None:
    losses, _ = synthetic_losses(3000, 0.0)
    mixture = OnlineMixture(window=4096)
    mixture.add(losses)
    mixture.fit()
    assert mixture.params is None
    assert np.all(mixture.clean_probability(losses) == 1.0)


def test_mixture_window_follows_the_stream_and_round_trips() -> None:
    mixture = OnlineMixture(window=1000)
    mixture.add(np.full(800, 9.0))
    mixture.add(100.0 + np.arange(500, dtype=float))
    values = mixture.values()
    assert len(values) == 1000 and (values == 9.0).sum() == 500 and mixture.window.count == 1300
    copy = OnlineMixture(window=1000)
    copy.load_state_dict(json.loads(json.dumps(mixture.state_dict())))
    copy.add(np.array([1.0, 2.0]))
    mixture.add(np.array([1.0, 2.0]))
    assert np.array_equal(copy.values(), mixture.values())


def _features(n: int, noisy_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Media and text embeddings of n pairs from 32 classes; a noisy pair's text is of another class."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(32, 32, generator=gen), dim=1)
    classes = torch.randint(0, 32, (n,), generator=gen)
    noisy = torch.rand(n, generator=gen) < noisy_fraction
    text_classes = torch.where(noisy, (classes + torch.randint(1, 32, (n,), generator=gen)) % 32, classes)
    media = torch.nn.functional.normalize(centres[classes] + 0.1 * torch.randn(n, 32, generator=gen), dim=1)
    text = torch.nn.functional.normalize(
        centres[text_classes] + 0.1 * torch.randn(n, 32, generator=gen), dim=1
    )
    return media, text, noisy.numpy()


def test_null_pvalues_rank_each_loss_among_the_mismatched_pairs() -> None:
    media, text, noisy = _features(64, 0.5)
    scale = torch.tensor(10.0)
    pvalues = null_pvalues(media, text, scale)
    logits = scale * media @ text.T
    # brute force: the loss (media i, text j) would have as a pair, both softmaxes over the batch
    pair_loss = (-logits.log_softmax(dim=1) - logits.log_softmax(dim=0)) / 2
    assert torch.allclose(
        pair_loss.diagonal(), contrastive_loss(media, text, scale)["per_sample_loss"], atol=1e-5
    )
    off = pair_loss[~torch.eye(64, dtype=torch.bool)]
    expected = torch.tensor(
        [(off <= pair_loss[i, i]).float().mean().item() for i in range(64)], dtype=torch.float64
    )
    assert torch.allclose(pvalues, expected, atol=1e-6)
    assert pvalues[torch.tensor(~noisy)].mean() < 0.15 < 0.35 < pvalues[torch.tensor(noisy)].mean()
    with pytest.raises(ValueError, match="at least 2 pairs"):
        null_pvalues(media[:1], text[:1], scale)


def test_decreasing_is_the_least_squares_antitonic_fit() -> None:
    from sklearn.isotonic import IsotonicRegression

    values = np.random.default_rng(3).gamma(2.0, 1.0, 50)
    expected = IsotonicRegression(increasing=False).fit_transform(np.arange(50), values)
    assert np.allclose(decreasing(values), expected)


@pytest.mark.parametrize("noise_rate", [0.0, 0.2, 0.5, 0.8])
def test_local_fdr_estimates_the_noise_rate_and_finds_the_noisy_pairs(noise_rate: float) -> None:
    media, text, noisy = _features(4096, noise_rate, seed=int(10 * noise_rate))
    pvalues = torch.cat([null_pvalues(media[i : i + 64], text[i : i + 64], 10.0) for i in range(0, 4096, 64)])
    fdr = LocalFdr(window=4096)
    fdr.add(pvalues.numpy())
    fdr.fit()
    assert abs(fdr.noise_rate - noise_rate) < 0.05
    clean_probability = fdr.clean_probability(pvalues.numpy())
    if noise_rate == 0:
        # clean data: (almost) nothing is down-weighted, no gate needed
        assert clean_probability.mean() > 0.97
    else:
        assert auroc(1 - clean_probability, noisy) > 0.95
        assert clean_probability[~noisy].mean() > 0.8 and clean_probability[noisy].mean() < 0.35


def test_local_fdr_weights_only_while_the_window_shows_matched_pairs() -> None:
    """An untrained model's p-values are uniform (pi0 ~1): 1 - lfdr would favour the pairs it happens to agree
    with, so weights stay uniform until the window shows significantly more low p-values than chance."""

    def window_pvalues(media: torch.Tensor, text: torch.Tensor) -> np.ndarray:
        return torch.cat(
            [null_pvalues(media[i : i + 64], text[i : i + 64], 10.0) for i in range(0, 2048, 64)]
        ).numpy()

    gen = torch.Generator().manual_seed(5)
    untrained = [torch.nn.functional.normalize(torch.randn(2048, 32, generator=gen), dim=1) for _ in range(2)]
    learned_media, learned_text, noisy = _features(2048, 0.8, seed=6)
    fdr = LocalFdr(window=2048)
    for features, gate_open in [
        (untrained, False),
        ((learned_media, learned_text), True),
        (untrained, False),
    ]:
        pvalues = window_pvalues(*features)
        fdr.add(pvalues)
        params = fdr.fit()
        assert params["gate_open"] is gate_open, params["evidence_z"]
        weights = fdr.clean_probability(pvalues)
        if gate_open:
            assert params["evidence_z"] > 10 and abs(params["pi0"] - noisy.mean()) < 0.1
            assert auroc(1 - weights, noisy) > 0.95
        else:
            assert params["pi0"] > 0.9 and np.all(weights == 1.0)


def test_local_fdr_waits_until_it_can_pick_matched_pairs_out() -> None:
    """A model that has barely started learning at 80% noise: the count of low p-values shows matched pairs
    (evidence z > 3), but their p-values lean only slightly low, so no pair is more likely matched than
    mismatched. Weighting would train on the few pairs the model happens to agree with; weights stay uniform
    until the matched pairs stand out."""
    rng = np.random.default_rng(8)
    n = 65536
    noisy = rng.random(n) < 0.9
    barely_learned = np.where(noisy, rng.random(n), rng.beta(0.7, 1.0, n))
    fdr = LocalFdr(window=n)
    fdr.add(barely_learned)
    params = fdr.fit()
    assert params["evidence_z"] > 3 and 1 - params["lfdr"][0] < 0.5
    # truly 1 - 0.7 / 1.7 = 0.59; the fit is optimistic
    assert 0.5 < params["implied_auroc"] < MIN_IMPLIED_AUROC
    assert not params["gate_open"] and np.all(fdr.clean_probability(barely_learned) == 1.0)
    learned = np.where(noisy, rng.random(n), rng.beta(0.5, 20.0, n))
    fdr.add(learned)
    params = fdr.fit()
    assert params["gate_open"] and params["implied_auroc"] > 0.95
    assert auroc(1 - fdr.clean_probability(learned), noisy) > 0.95


def test_local_fdr_waits_while_only_a_few_matched_pairs_stand_out() -> None:
    """The count shows matched pairs and the lowest p-values are mostly theirs (1 - lfdr >= 0.5), but most
    matched pairs sit among the mismatched ones (true AUROC 0.81): only the implied AUROC keeps the gate
    shut, until the matched pairs' p-values as a whole fall low."""
    rng = np.random.default_rng(9)
    n = 65536
    kind = rng.random(n)
    noisy, standing_out = kind < 0.8, (kind >= 0.8) & (kind < 0.85)
    fdr = LocalFdr(window=n)
    for spread, gate_open in [(0.5, False), (0.1, True)]:
        pvalues = np.where(noisy, rng.random(n), rng.random(n) * np.where(standing_out, 0.02, spread))
        fdr.add(pvalues)
        params = fdr.fit()
        assert params["evidence_z"] > 3 and 1 - params["lfdr"][0] > 0.5
        assert (params["implied_auroc"] >= MIN_IMPLIED_AUROC) is gate_open
        # matched p-values uniform on their spread: the fit reads the true AUROC
        assert abs(params["implied_auroc"] - roc_auc_score(noisy, pvalues)) < 0.02
        assert params["gate_open"] is gate_open
        assert bool(np.all(fdr.clean_probability(pvalues) == 1.0)) is not gate_open


def test_local_fdr_ranking_test_latches_once_passed() -> None:
    """Once an open fit has shown a good ranking, later fits skip the ranking test: a trained model's ranking
    does not fall back, but the fit's estimate of it swings (at 80% noise it read 0.82-0.92 where the weights
    ranked at 0.93-0.96), and each swing under the bar shut the gate for a few steps. The evidence of matched
    pairs is still checked at every fit; the latch is kept in the state (exact resume)."""
    rng = np.random.default_rng(9)
    n = 65536
    kind = rng.random(n)
    noisy, standing_out = kind < 0.8, (kind >= 0.8) & (kind < 0.85)

    def window(spread: float) -> np.ndarray:
        return np.where(noisy, rng.random(n), rng.random(n) * np.where(standing_out, 0.02, spread))

    fdr = LocalFdr(window=n)
    steps = [
        (window(0.5), False),
        (window(0.1), True),
        (window(0.5), True),
        (rng.random(n), False),
        (window(0.5), True),
    ]
    for pvalues, gate_open in steps:
        fdr.add(pvalues)
        params = fdr.fit()
        assert params["gate_open"] is gate_open
        if params["evidence_z"] > GATE_Z:
            assert (params["implied_auroc"] >= MIN_IMPLIED_AUROC) is (pvalues is steps[1][0])
    restored = LocalFdr(window=n)
    restored.load_state_dict(json.loads(json.dumps(fdr.state_dict())))
    restored.add(window(0.5))
    assert restored.fit()["gate_open"]
    fresh = LocalFdr(window=n)
    fresh.add(window(0.5))
    assert not fresh.fit()["gate_open"]


def test_local_fdr_waits_while_its_ranking_rests_on_few_pairs() -> None:
    """80% noise in a window of 2,048 pairs (the bench's), the model half-way: 7% of the pairs stand out, the
    other matched pairs spread among the mismatched ones (true AUROC ~0.74). The fit's implied AUROC rests on
    the few that stand out and swings from window to window over the bar, which let the gate open and shut in
    bursts (on 30,000 images at 80% that lost 4.8 points to off); its bootstrap lower bound stays under it.
    At 50% noise with the matched pairs learned the bound passes in every window."""
    n, windows = 2048, 30

    def fit(seed: int, noise: float, standing_out: float, spread: float) -> dict:
        rng = np.random.default_rng(seed)
        kind = rng.random(n)
        scale = np.where(kind < noise + standing_out, 0.03, spread)
        pvalues = np.where(kind < noise, rng.random(n), rng.random(n) * scale)
        fdr = LocalFdr(window=n)
        fdr.add(pvalues)
        return fdr.fit()

    high_noise = [fit(seed, 0.8, 0.07, 0.8) for seed in range(windows)]
    estimate_passes = [
        p["evidence_z"] >= GATE_Z
        and 1 - p["lfdr"][0] >= MIN_BEST_CLEAN
        and p["implied_auroc"] >= MIN_IMPLIED_AUROC
        for p in high_noise
    ]
    assert sum(estimate_passes) >= 10  # what the gate on the estimate did: open in a third of the windows
    assert sum(p["gate_open"] for p in high_noise) <= 2
    assert all(p["implied_auroc_low"] <= p["implied_auroc"] for p in high_noise)
    assert all(fit(seed, 0.5, 0.0, 0.2)["gate_open"] for seed in range(windows))


def test_local_fdr_is_uniform_until_fitted_and_round_trips() -> None:
    fdr = LocalFdr(window=512)
    fdr.add(np.random.default_rng(0).random(100))
    assert fdr.fit() is None and fdr.noise_rate is None
    assert np.all(fdr.clean_probability(np.array([0.0, 0.5, 1.0])) == 1.0)
    fdr.add(np.random.default_rng(1).random(400))
    fdr.fit()
    copy = LocalFdr(window=512)
    copy.load_state_dict(json.loads(json.dumps(fdr.state_dict())))
    probe = np.linspace(0, 1, 11)
    assert np.array_equal(copy.clean_probability(probe), fdr.clean_probability(probe))
    before_the_gate = fdr.state_dict()  # a checkpoint written before the gate existed: refitted on load
    before_the_gate["params"] = {
        "pi0": before_the_gate["params"]["pi0"],
        "lfdr": before_the_gate["params"]["lfdr"],
    }
    copy.load_state_dict(before_the_gate)
    assert copy.params == fdr.params


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 300).astype(float)
    labels = rng.random(300) < 0.4
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    metrics = detection_metrics(np.array([0.1, 0.9, 0.2, 0.8]), np.array([True, False, False, False]))
    assert metrics["auroc"] == 1.0 and metrics["precision"] == 0.5 and metrics["recall"] == 1.0


def synthetic_pvalues(noisy: np.ndarray, seed: int = 0) -> np.ndarray:
    """In-batch p-values as `null_pvalues` gives them: uniform for mismatched pairs, near 0 for matched
    ones."""
    rng = np.random.default_rng(seed)
    return np.where(noisy, rng.random(len(noisy)), rng.beta(0.5, 20.0, len(noisy)))


def test_weighter_warmup_ramp_and_floor() -> None:
    weighter = PairWeighter(
        NoiseConfig(method="loss_mixture", warmup_steps=10, ramp_steps=4, floor=0.2, refit_every=1)
    )
    losses, noisy = synthetic_losses(512, 0.3)
    signal = torch.tensor(losses, dtype=torch.float32)
    pvalues = torch.tensor(synthetic_pvalues(noisy, seed=1), dtype=torch.float32)
    for step in range(10):  # warm-up: uniform weights while the mixture learns
        assert torch.all(weighter.weights(step, signal, signal, pvalues, pvalues) == 1.0)
    ramped = [weighter.weights(step, signal, signal, pvalues, pvalues) for step in range(10, 15)]
    noisy_means = [w[torch.tensor(noisy)].mean().item() for w in ramped]
    assert noisy_means == sorted(noisy_means, reverse=True)  # blends in over ramp_steps
    final = ramped[-1]
    assert final.min().item() >= 0.2 and final[torch.tensor(~noisy)].mean() > 0.9
    assert final[torch.tensor(noisy)].mean() < 0.3


def test_loss_mixture_starts_from_the_in_batch_null_until_the_losses_show_two_modes() -> None:
    """Before the window's losses separate, loss_mixture keeps or drops each pair by local_fdr's test on its
    p-value (hard weights); once they separate, the mixture's posterior takes over. The null test's state is
    checkpointed with the mixture's."""
    cfg = NoiseConfig(method="loss_mixture", warmup_steps=0, ramp_steps=0, window=1024, refit_every=1)
    weighter = PairWeighter(cfg)
    rng = np.random.default_rng(3)
    noisy = rng.random(256) < 0.4
    pvalues = torch.tensor(synthetic_pvalues(noisy, seed=30), dtype=torch.float32)
    # the losses do not tell them apart yet
    one_mode = torch.tensor(rng.gamma(4.0, 0.25, 256), dtype=torch.float32)
    for step in range(4):
        weights = weighter.weights(step, one_mode, one_mode, pvalues, pvalues)
    assert weighter.estimator.params is None
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    assert weights[torch.tensor(~noisy)].mean() > 0.95 and weights[torch.tensor(noisy)].mean() < 0.3
    weighter.record(weights, one_mode, torch.tensor(noisy))
    assert abs(weighter.metrics()["noise_rate_estimate"] - 0.4) < 0.1  # the null test's, before the mixture's

    restored = PairWeighter(cfg)
    restored.load_state_dict(json.loads(json.dumps(weighter.state_dict())))
    assert restored.null_test.params == weighter.null_test.params

    losses, noisy = synthetic_losses(1024, 0.4, seed=4)
    two_modes = torch.tensor(losses, dtype=torch.float32)
    pvalues = torch.tensor(synthetic_pvalues(noisy, seed=5), dtype=torch.float32)
    for step in range(4, 8):
        weights = weighter.weights(step, two_modes, two_modes, pvalues, pvalues)
    assert weighter.estimator.params is not None
    assert ((weights > 0.01) & (weights < 0.99)).any()  # the mixture's soft posterior
    assert auroc(1 - weights.numpy(), noisy) > 0.95
    with pytest.raises(ValueError, match="loss_mixture needs the pairs' in-batch p-values"):
        weighter.weights(8, two_modes, two_modes)


@pytest.mark.parametrize("method", ["loss_mixture", "teacher"])
def test_mixture_methods_weight_only_while_the_in_batch_null_shows_matched_pairs(method: str) -> None:
    """Two loss modes are not enough: while the pairs' p-values are uniform (a model that cannot tell matched
    from mismatched pairs yet, or at 80% noise only a few it can), the mixture's split is not trusted and
    every weight stays 1; once the p-values show the matched pairs, the mixture weights, and stops again when
    the evidence fades."""
    cfg = NoiseConfig(method=method, warmup_steps=0, ramp_steps=0, window=1024, refit_every=1)
    weighter = PairWeighter(cfg)
    losses, noisy = synthetic_losses(1024, 0.4, seed=4)
    two_modes = torch.tensor(losses, dtype=torch.float32)
    uniform = torch.tensor(np.random.default_rng(5).random(1024), dtype=torch.float32)
    for step in range(4):
        weights = weighter.weights(step, two_modes, two_modes, uniform, uniform)
    assert weighter.estimator.params is not None  # the losses do show two modes
    assert torch.all(weights == 1.0)
    weighter.record(weights, two_modes, torch.tensor(noisy))
    shut = weighter.metrics()
    assert shut["noise_rate_estimate"] > 0.9  # the null test's (no matched pairs), not the mixture's
    # uniform weights; the losses do rank
    assert shut["noise_auroc"] == 0.5 and shut["noise_signal_auroc"] > 0.95

    informative = torch.tensor(synthetic_pvalues(noisy, seed=6), dtype=torch.float32)
    for step in range(4, 6):
        weights = weighter.weights(step, two_modes, two_modes, informative, informative)
    assert auroc(1 - weights.numpy(), noisy) > 0.95
    # the mixture's posterior, not the null test's hard start
    assert ((weights > 0.01) & (weights < 0.99)).any()
    weighter.record(weights, two_modes, torch.tensor(noisy))
    assert abs(weighter.metrics()["noise_rate_estimate"] - 0.4) < 0.1  # the mixture's

    for step in range(6, 8):
        weights = weighter.weights(step, two_modes, two_modes, uniform, uniform)
    assert torch.all(weights == 1.0)
    with pytest.raises(ValueError, match=f"{method} needs the pairs' in-batch p-values"):
        weighter.weights(8, two_modes, two_modes)


def test_noise_config_errors() -> None:
    with pytest.raises(ValueError, match="soft_target_alpha needs noise.method: teacher"):
        NoiseConfig(method="loss_mixture", soft_target_alpha=0.3)
    with pytest.raises(ValueError, match="unlearn_weight needs a noise.method"):
        NoiseConfig(unlearn_weight=1.0)
    with pytest.raises(UsageError, match="data.batch_size x train.accumulation_steps = 4 is too few"):
        load_train_config(
            REPO / "configs" / "image_text" / "micro.yaml", ["noise.method=local_fdr", "data.batch_size=4"]
        )


def test_teacher_normalizes_with_batch_statistics_as_the_student_trains() -> None:
    """The teacher's BatchNorms use the batch's statistics, not running ones gathered under the student's
    weights (which collapsed the teacher on a ResNet); a frozen tower's BatchNorms keep their fixed ones."""
    torch.manual_seed(0)
    student = build_model(ModelConfig(modality="image", open_clip_name="mmcl-micro-resnet")).train()
    media = torch.randn(8, 3, 32, 32) * 3 + 1  # far from the initial running statistics (0, 1)
    tokens = student.tokenizer([f"a photo of a {c} thing." for c in "abcdefgh"])
    with torch.no_grad():
        out = student(media, tokens)
    expected = contrastive_loss(out["media_features"], out["text_features"], out["logit_scale"])[
        "per_sample_loss"
    ]
    teacher = MomentumTeacher(student, momentum=0.99)
    judged = teacher.judge(media, tokens, soft_targets=False)["per_sample_loss"]
    torch.testing.assert_close(judged, expected)
    student.freeze("media")
    frozen_teacher = MomentumTeacher(student, momentum=0.99)
    norms = [m for m in frozen_teacher.model.clip.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


@pytest.fixture(scope="module")
def noisy_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("noisy")
    manifest = make_shapes_manifest(root / "in", 1024)
    out = root / "shards"
    config = build_config(
        {
            "input": {"modality": "image", "path": manifest},
            "output": out,
            "shard_size": 64,
            "workers": 2,
            "noise_rate": 0.4,
            "seed": 1,
            "shuffle": True,
        }
    )
    run_sharding(config, progress=False)
    return out


def noisy_run_config(path: Path, shards: Path, output: Path, method: str, steps: int = 200) -> Path:
    config = {
        "run": {"output_dir": str(output)},
        "model": {"open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(shards)}], "batch_size": 32, "workers": 1, "shuffle_buffer": 500},
        "optim": {"lr": 2e-3, "warmup_steps": 20},
        "noise": {"method": method, "warmup_steps": 60, "ramp_steps": 40, "window": 1024},
        "train": {"steps": steps, "log_every": 20, "checkpoint_every": 1000},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", ["local_fdr", "loss_mixture", "teacher"])
def test_weights_separate_clean_from_noisy_pairs_on_a_real_run(
    noisy_shards: Path, tmp_path: Path, method: str
) -> None:
    config = noisy_run_config(tmp_path / "c.yaml", noisy_shards, tmp_path / "run", method)
    run_mmcl("train", "--config", config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["noise_auroc"] > 0.8 and last["noise_signal_auroc"] > 0.8, last
    assert last["noise_mean_weight_clean"] > last["noise_mean_weight_noisy"] + 0.3, last
    assert all(r["noise_mean_weight"] == 1.0 for r in rows if r["step"] <= 60)  # warm-up is uniform
    assert (tmp_path / "run" / "noise_weights.png").exists()
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["extra"]["noise"]["estimator"]["params"] is not None
    if method == "local_fdr":  # the shards have 40% noisy pairs
        assert abs(last["noise_rate_estimate"] - 0.4) < 0.15, last
    if method == "teacher":
        assert next((tmp_path / "run" / "checkpoints").glob("step-*/extra.safetensors")).exists()


@pytest.mark.parametrize(
    ("method", "options"), [("local_fdr", []), ("loss_mixture", ["noise.unlearn_weight=1.0"])]
)
def test_weighting_runs_under_two_processes(
    noisy_shards: Path, tmp_path: Path, method: str, options: list[str]
) -> None:
    config = noisy_run_config(tmp_path / "c.yaml", noisy_shards, tmp_path / "run", method, steps=30)
    launch = [
        "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "-m",
        "mmcl",
        "train",
        "--config",
        str(config),
        "noise.warmup_steps=5",
        "noise.ramp_steps=5",
        "noise.window=256",
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = accelerate_launch(*launch, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["negatives"] == 63
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000030" / "state.json").read_text())
    assert state["extra"]["noise"]["estimator"]["count"] == 30 * 64  # every rank's signals feed one estimate
