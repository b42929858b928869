"""Tests for mmcl.losses: parity with open_clip, pair weighting, soft targets, and a real 2-process gloo
run."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from processes import HANG_GUARD_S
from torch import Tensor, nn

from mmcl.losses import (
    LossOutput,
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    rank_and_world_size,
    sigmoid_loss,
)

TIGHT = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def _pairs(
    batch: int = 8, dim: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Normalized media/text embeddings where text i is a noisy copy of media i (leaf tensors)."""
    gen = torch.Generator().manual_seed(seed)
    media = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(media + 0.8 * torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    return media.requires_grad_(), text.requires_grad_()


def _scale(value: float, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def _grads(loss: Tensor, *leaves: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, leaves)


def _per_pair_ce(media: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """Unweighted symmetric InfoNCE of each pair, written out directly."""
    logits = scale * media @ text.T
    labels = torch.arange(media.shape[0])
    return (
        F.cross_entropy(logits, labels, reduction="none")
        + F.cross_entropy(logits.T, labels, reduction="none")
    ) / 2


# --- parity with open_clip (uniform weights) --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("weights", ["none", "ones", "constant"])
@pytest.mark.parametrize("bias", [None, -3.0])
def test_contrastive_matches_open_clip(dtype: torch.dtype, weights: str, bias: float | None) -> None:
    media, text = _pairs(dtype=dtype)
    scale = _scale(1 / 0.07, dtype)
    w = {"none": None, "ones": torch.ones(8, dtype=dtype), "constant": torch.full((8,), 0.3, dtype=dtype)}[
        weights
    ]
    ours = contrastive_loss(media, text, scale, w, logit_bias=bias)["loss"]
    ref = ClipLoss()(media, text, scale, logit_bias=bias)
    torch.testing.assert_close(ours, ref, **TIGHT[dtype])
    for got, want in zip(_grads(ours, media, text, scale), _grads(ref, media, text, scale), strict=True):
        torch.testing.assert_close(got, want, **TIGHT[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("weights", ["none", "ones"])
def test_sigmoid_matches_open_clip(dtype: torch.dtype, weights: str) -> None:
    media, text = _pairs(dtype=dtype)
    scale, bias = _scale(10.0, dtype), _scale(-10.0, dtype)
    w = None if weights == "none" else torch.ones(8, dtype=dtype)
    ours = sigmoid_loss(media, text, scale, bias, w)["loss"]
    ref = SigLipLoss()(media, text, scale, bias)
    torch.testing.assert_close(ours, ref, **TIGHT[dtype])
    for got, want in zip(
        _grads(ours, media, text, scale, bias), _grads(ref, media, text, scale, bias), strict=True
    ):
        torch.testing.assert_close(got, want, **TIGHT[dtype])


def test_output_contract() -> None:
    media, text = _pairs()
    scale = _scale(14.0)
    siglip_logits = scale * media @ text.T - 5.0
    for out, per_pair, logits in [
        (contrastive_loss(media, text, scale), _per_pair_ce(media, text, scale), scale * media @ text.T),
        (sigmoid_loss(media, text, scale, -5.0), -F.logsigmoid(siglip_logits.diagonal()), siglip_logits),
    ]:
        assert set(out) == set(LossOutput.__annotations__)
        assert out["loss"].ndim == 0 and out["loss"].requires_grad
        assert out["per_sample_loss"].shape == (8,) and not out["per_sample_loss"].requires_grad
        torch.testing.assert_close(out["per_sample_loss"], per_pair.detach())
        assert not out["logits_per_media"].requires_grad
        torch.testing.assert_close(out["logits_per_media"], logits.detach())


def test_per_sample_loss_ignores_weights() -> None:
    media, text = _pairs()
    plain = contrastive_loss(media, text, 14.0)["per_sample_loss"]
    weighted = contrastive_loss(media, text, 14.0, torch.linspace(0, 1, 8, dtype=torch.float64))[
        "per_sample_loss"
    ]
    torch.testing.assert_close(weighted, plain)


# --- pair weights -----------------------------------------------------------------------------------


def test_weighted_loss_is_normalized_weighted_mean() -> None:
    media, text = _pairs()
    scale = _scale(14.0)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.0, 1.0], dtype=torch.float64)
    ours = contrastive_loss(media, text, scale, w)["loss"]
    ref = (w * _per_pair_ce(media, text, scale)).sum() / w.sum()
    torch.testing.assert_close(ours, ref, **TIGHT[torch.float64])
    for got, want in zip(_grads(ours, media, text, scale), _grads(ref, media, text, scale), strict=True):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])


@pytest.mark.parametrize("factor", [1e-3, 0.5, 7.0])
def test_scaling_all_weights_changes_nothing(factor: float) -> None:
    media, text = _pairs()
    scale = _scale(14.0)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.9, 0.0, 1.0], dtype=torch.float64)
    base = contrastive_loss(media, text, scale, w)["loss"]
    scaled = contrastive_loss(media, text, scale, factor * w)["loss"]
    torch.testing.assert_close(scaled, base, **TIGHT[torch.float64])
    for got, want in zip(_grads(scaled, media, text, scale), _grads(base, media, text, scale), strict=True):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])


def test_zero_weight_pair_is_still_a_negative() -> None:
    media, text = _pairs()
    scale = _scale(14.0)
    k = 3
    w = torch.ones(8, dtype=torch.float64)
    w[k] = 0.0
    ours = contrastive_loss(media, text, scale, w)["loss"]
    keep = torch.arange(8) != k
    without_k_term = _per_pair_ce(media, text, scale)[keep].mean()
    grads = _grads(ours, media, text)
    for got, want in zip(grads, _grads(without_k_term, media, text), strict=True):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])
    # Pair k's own (positive) term is gone, but as a negative of the other pairs it still gets gradient.
    assert grads[0][k].norm() > 1e-3 and grads[1][k].norm() > 1e-3


def test_down_weighting_shrinks_the_pair_gradient() -> None:
    media, text = _pairs()
    norms = []
    for weight in (1.0, 0.5, 0.1, 0.0):
        w = torch.ones(8, dtype=torch.float64)
        w[2] = weight
        (grad_media,) = _grads(contrastive_loss(media, text, 14.0, w)["loss"], media)
        norms.append(grad_media[2].norm().item())
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.5 * norms[0]


def test_all_zero_weights_give_zero_loss_not_nan() -> None:
    media, text = _pairs()
    out = contrastive_loss(media, text, 14.0, torch.zeros(8, dtype=torch.float64))
    assert out["loss"].item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _grads(out["loss"], media, text))


def test_sigmoid_weights_scale_only_positive_terms() -> None:
    media, text = _pairs()
    scale, bias = _scale(10.0), _scale(-10.0)
    k = 5
    w = torch.ones(8, dtype=torch.float64)
    w[k] = 0.0
    out = sigmoid_loss(media, text, scale, bias, w)
    logits = scale * media @ text.T + bias
    positive_k = -F.logsigmoid(logits[k, k])
    ref = SigLipLoss()(media, text, scale, bias) - positive_k / 8
    torch.testing.assert_close(out["loss"], ref, **TIGHT[torch.float64])
    grads = _grads(out["loss"], media, text)
    for got, want in zip(grads, _grads(ref, media, text), strict=True):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])
    assert grads[0][k].norm() > 1e-6 and grads[1][k].norm() > 1e-6
    torch.testing.assert_close(out["per_sample_loss"][k], positive_k.detach())


# --- negative learning on doubted pairs (unlearn_weight) -----------------------------------------------


def test_unlearn_adds_nothing_at_uniform_weights() -> None:
    media, text = _pairs()
    scale, bias = _scale(14.0), _scale(-10.0)
    ones = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(
        contrastive_loss(media, text, scale, ones, unlearn_weight=2.0)["loss"],
        contrastive_loss(media, text, scale)["loss"],
    )
    torch.testing.assert_close(
        sigmoid_loss(media, text, scale, bias, ones, unlearn_weight=2.0)["loss"],
        sigmoid_loss(media, text, scale, bias)["loss"],
    )


def test_unlearn_term_is_doubt_times_minus_log_one_minus_p() -> None:
    media, text = _pairs()
    scale = _scale(14.0)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 1.0, 1.0, 0.9], dtype=torch.float64)
    logits = scale * media @ text.T
    p_media, p_text = logits.softmax(dim=1).diagonal(), logits.T.softmax(dim=1).diagonal()
    expected = ((1 - w) * -(torch.log(1 - p_media) + torch.log(1 - p_text)) / 2).sum() / 8
    got = (
        contrastive_loss(media, text, scale, w, unlearn_weight=1.5)["loss"]
        - contrastive_loss(media, text, scale, w)["loss"]
    )
    torch.testing.assert_close(got, 1.5 * expected, **TIGHT[torch.float64])


def test_unlearn_pushes_a_doubted_pair_apart_as_far_as_it_is_matched() -> None:
    """A doubted pair the model matches (memorized) is pushed apart; one it never matched is left alone."""
    media, text = _pairs()
    scale = 14.0
    w = torch.ones(8, dtype=torch.float64)
    w[2] = w[5] = 0.0
    with torch.no_grad():  # pair 5: the model does not match it (its text is made another pair's)
        text[5] = text[6]
    (grad_with,) = _grads(contrastive_loss(media, text, scale, w, unlearn_weight=1.0)["loss"], media)
    (grad_without,) = _grads(contrastive_loss(media, text, scale, w)["loss"], media)
    extra = grad_with - grad_without
    # gradient descent moves media 2 against the extra gradient: its similarity to text 2 falls
    assert (extra[2] @ text[2]).item() > 1e-3
    assert extra[5].norm() < 0.1 * extra[2].norm()


def test_sigmoid_unlearn_adds_the_pair_as_a_negative() -> None:
    media, text = _pairs()
    scale, bias = _scale(10.0), _scale(-2.0)
    w = torch.ones(8, dtype=torch.float64)
    w[3] = 0.25
    logits = scale * media @ text.T + bias
    got = (
        sigmoid_loss(media, text, scale, bias, w, unlearn_weight=2.0)["loss"]
        - sigmoid_loss(media, text, scale, bias, w)["loss"]
    )
    torch.testing.assert_close(got, 2.0 * 0.75 * -F.logsigmoid(-logits[3, 3]) / 8, **TIGHT[torch.float64])


# --- soft targets -----------------------------------------------------------------------------------


def test_one_hot_soft_targets_equal_labels() -> None:
    media, text = _pairs()
    plain = contrastive_loss(media, text, 14.0)["loss"]
    soft = contrastive_loss(media, text, 14.0, soft_targets=torch.eye(8, dtype=torch.float64))["loss"]
    torch.testing.assert_close(soft, plain, **TIGHT[torch.float64])


def test_soft_targets_mix_teacher_distribution() -> None:
    media, text = _pairs()
    teacher_media, teacher_text = _pairs(seed=1)
    teacher = 14.0 * teacher_media.detach() @ teacher_text.detach().T
    eye = torch.eye(8, dtype=torch.float64)
    m2t = 0.6 * eye + 0.4 * teacher.softmax(dim=1)
    t2m = 0.6 * eye + 0.4 * teacher.T.softmax(dim=1)
    w = torch.linspace(0.2, 1.0, 8, dtype=torch.float64)
    logits = 14.0 * media @ text.T
    ce_m2t = -(m2t * logits.log_softmax(dim=1)).sum(dim=1)
    ce_t2m = -(t2m * logits.T.log_softmax(dim=1)).sum(dim=1)

    pair = contrastive_loss(media, text, 14.0, w, soft_targets=(m2t, t2m))
    torch.testing.assert_close(
        pair["loss"], (w * (ce_m2t + ce_t2m) / 2).sum() / w.sum(), **TIGHT[torch.float64]
    )
    same = contrastive_loss(media, text, 14.0, w, soft_targets=m2t)
    ce_same = -(m2t * logits.T.log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(
        same["loss"], (w * (ce_m2t + ce_same) / 2).sum() / w.sum(), **TIGHT[torch.float64]
    )


# --- input checks and the non-distributed gather ----------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: contrastive_loss(m, t[:4], 14.0),
        lambda m, t: contrastive_loss(m, t, 14.0, torch.ones(4)),
        lambda m, t: contrastive_loss(m, t, 14.0, soft_targets=torch.eye(4)),
        lambda m, t: contrastive_loss(m, t, 14.0, soft_targets=(torch.eye(8),)),
        lambda m, t: sigmoid_loss(m[0], t[0], 10.0, -10.0),
    ],
)
def test_bad_shapes_raise(call: Callable[[Tensor, Tensor], LossOutput]) -> None:
    media, text = _pairs()
    with pytest.raises(ValueError):
        call(media, text)


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert rank_and_world_size() == (0, 1)
    assert gather_with_grad(x) is x
    gathered = gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad


# --- two real processes over gloo --------------------------------------------------------------------

WORLD = 2
LOCAL = 4
GLOBAL = WORLD * LOCAL
# Per-rank weight sums differ (2.5 vs 2.05), so a rank-local normalization would be caught.
DIST_WEIGHTS = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25, 1.0, 0.8, 0.0], dtype=torch.float64)
# A fixed "teacher" similarity over the global batch: one-hot mixed with its softmax, per direction.
_TEACHER = torch.randn(GLOBAL, GLOBAL, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
DIST_TARGETS = (
    0.7 * torch.eye(GLOBAL, dtype=torch.float64) + 0.3 * _TEACHER.softmax(dim=1),
    0.7 * torch.eye(GLOBAL, dtype=torch.float64) + 0.3 * _TEACHER.T.softmax(dim=1),
)


class _Towers(nn.Module):
    """Two linear 'encoders' and a learned scale and bias: enough parameters to compare DDP gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.media = nn.Linear(6, 8)
        self.text = nn.Linear(5, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, media_in: Tensor, text_in: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        media = F.normalize(self.media(media_in), dim=-1)
        text = F.normalize(self.text(text_in), dim=-1)
        return media, text, self.logit_scale.exp(), self.logit_bias


LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, slice], LossOutput]
"""(media, text, scale, bias, rows of the global batch held here) -> output; weights/targets are sliced."""
DDP_LOSSES: dict[str, LossFn] = {
    "clip_global": lambda m, t, s, b, rows: contrastive_loss(m, t, s, DIST_WEIGHTS[rows], logit_bias=b),
    "clip_local": lambda m, t, s, b, rows: contrastive_loss(
        m, t, s, DIST_WEIGHTS[rows], logit_bias=b, local_loss=True
    ),
    "clip_global_soft": lambda m, t, s, b, rows: contrastive_loss(
        m, t, s, DIST_WEIGHTS[rows], logit_bias=b, soft_targets=(DIST_TARGETS[0][rows], DIST_TARGETS[1][rows])
    ),
    "clip_local_soft": lambda m, t, s, b, rows: contrastive_loss(
        m, t, s, DIST_WEIGHTS[rows], logit_bias=b, local_loss=True, soft_targets=DIST_TARGETS[0][rows]
    ),
    "siglip": lambda m, t, s, b, rows: sigmoid_loss(m, t, s, b, DIST_WEIGHTS[rows]),
    "clip_global_unlearn": lambda m, t, s, b, rows: contrastive_loss(
        m, t, s, DIST_WEIGHTS[rows], logit_bias=b, unlearn_weight=1.5
    ),
    "clip_local_unlearn": lambda m, t, s, b, rows: contrastive_loss(
        m, t, s, DIST_WEIGHTS[rows], logit_bias=b, local_loss=True, unlearn_weight=1.5
    ),
    "siglip_unlearn": lambda m, t, s, b, rows: sigmoid_loss(
        m, t, s, b, DIST_WEIGHTS[rows], unlearn_weight=1.5
    ),
}


def _towers_and_inputs() -> tuple[_Towers, Tensor, Tensor]:
    torch.manual_seed(0)
    model = _Towers().double()
    gen = torch.Generator().manual_seed(1)
    return (
        model,
        torch.randn(GLOBAL, 6, generator=gen, dtype=torch.float64),
        torch.randn(GLOBAL, 5, generator=gen, dtype=torch.float64),
    )


def _parity_on_rank(rank: int) -> dict[str, tuple[Tensor, ...]]:
    """This rank's loss and feature gradients from mmcl and from open_clip, on raw features."""
    media, text = _pairs(GLOBAL)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    scale, bias = torch.tensor(1 / 0.07, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    cases: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {}
    for local in (False, True):
        clip_loss = ClipLoss(local_loss=local, gather_with_grad=True, rank=rank, world_size=WORLD)
        cases[f"clip_local_loss={local}"] = (
            lambda m, t, local=local: contrastive_loss(m, t, scale, local_loss=local)["loss"],
            lambda m, t, clip_loss=clip_loss: clip_loss(m, t, scale),
        )
    siglip_loss = SigLipLoss(rank=rank, world_size=WORLD)
    cases["siglip"] = (
        lambda m, t: sigmoid_loss(m, t, scale, bias)["loss"],
        lambda m, t: siglip_loss(m, t, scale, bias),
    )
    results = {}
    for name, (ours_fn, ref_fn) in cases.items():
        values = []
        for fn in (ours_fn, ref_fn):
            m = media[rows].detach().clone().requires_grad_()
            t = text[rows].detach().clone().requires_grad_()
            loss = fn(m, t)
            loss.backward()
            values.append((loss.detach(), m.grad, t.grad))
        results[name] = (*values[0], *values[1])
    out = contrastive_loss(media[rows].detach(), text[rows].detach(), scale, local_loss=True)
    results["logits_per_media"] = (out["logits_per_media"], (scale * media[rows] @ text.T).detach())
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: open_clip parity on raw features, then a DDP step per loss; results go to a file."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback interface: no lookup of the machine's host name
    # the timeout only guards against a hang: the other rank may take minutes to start on a loaded machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=HANG_GUARD_S),
    )
    try:
        results: dict[str, object] = {"parity": _parity_on_rank(rank)}
        model, media_in, text_in = _towers_and_inputs()
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for name, loss_fn in DDP_LOSSES.items():
            model.zero_grad()
            out = loss_fn(*ddp(media_in[rows], text_in[rows]), rows)
            out["loss"].backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results[name] = (out["loss"].detach(), out["per_sample_loss"], grads)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run ``_worker`` on two real gloo processes once; return each rank's results."""
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", ["clip_local_loss=False", "clip_local_loss=True", "siglip"])
def test_two_processes_match_open_clip(two_ranks: list[dict], case: str) -> None:
    for results in two_ranks:
        ours_loss, ours_gm, ours_gt, ref_loss, ref_gm, ref_gt = results["parity"][case]
        torch.testing.assert_close(ours_loss, ref_loss, **TIGHT[torch.float64])
        torch.testing.assert_close(ours_gm, ref_gm, **TIGHT[torch.float64])
        torch.testing.assert_close(ours_gt, ref_gt, **TIGHT[torch.float64])


def test_two_processes_use_global_negatives(two_ranks: list[dict]) -> None:
    for results in two_ranks:
        logits, expected = results["parity"]["logits_per_media"]
        assert logits.shape == (LOCAL, GLOBAL)
        torch.testing.assert_close(logits, expected, **TIGHT[torch.float64])


@pytest.mark.parametrize("name", list(DDP_LOSSES))
def test_ddp_gradient_equals_single_process_gradient(two_ranks: list[dict], name: str) -> None:
    model, media_in, text_in = _towers_and_inputs()
    single = DDP_LOSSES[name](*model(media_in, text_in), slice(None))
    single["loss"].backward()
    rank_losses = torch.stack([results[name][0] for results in two_ranks])
    if name.startswith("clip_global"):  # every rank computes the global loss itself
        torch.testing.assert_close(rank_losses, single["loss"].detach().expand(WORLD), **TIGHT[torch.float64])
    else:  # each rank's loss is its share, scaled so their mean is the global loss
        torch.testing.assert_close(rank_losses.mean(), single["loss"].detach(), **TIGHT[torch.float64])
    per_sample = torch.cat([results[name][1] for results in two_ranks])
    torch.testing.assert_close(per_sample, single["per_sample_loss"], **TIGHT[torch.float64])
    for results in two_ranks:
        for param_name, param in model.named_parameters():
            torch.testing.assert_close(results[name][2][param_name], param.grad, **TIGHT[torch.float64])
