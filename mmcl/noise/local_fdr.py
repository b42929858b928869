"""P(mismatched | a pair's loss) against the in-batch null: the local false discovery rate.

A mismatched pair is media and a caption that do not belong together, which is exactly what every
off-diagonal entry of a batch's similarity matrix is. So at every step the batch itself shows how the
losses of mismatched pairs are distributed under the current model (an empirical null), with no
component to fit. Each pair's p-value is the fraction of the batch's off-diagonal pair losses at or below
its own: uniform on [0, 1] for a mismatched pair, near 0 for a matched one. Measured against its own
step's null, p-values from different steps are comparable, so a window of them does not drift as the
loss falls.

On a window of recent p-values, Storey's estimate gives the noise rate pi0 = P(p > lambda) / (1 - lambda)
and a decreasing density g of the p-values (a histogram made monotone by pool-adjacent-violators,
Grenander's estimator) gives the local false discovery rate lfdr(p) = pi0 / g(p) (Efron's two-groups
model). A pair's weight is 1 - lfdr(p). On clean data pi0 is ~0 and every weight ~1; and since no
second loss mode is needed, it also works at high noise, where a two-component mixture finds none.

Weighting needs evidence that the window holds matched pairs at all. A model that has not learned yet
gives uniform p-values (pi0 ~1), and 1 - lfdr would then favour whichever pairs it happens to agree with,
mostly mismatched ones at high noise, and lock that in. So a fit only weights when the count of p-values
<= lambda exceeds what all-mismatched pairs give (a binomial(n, lambda)) by GATE_Z standard deviations,
and when the fit finds pairs more likely matched than not (1 - lfdr >= MIN_BEST_CLEAN at the smallest
p-values); every fit checks both again, so weighting stops if the evidence fades.

Before the first weighting the fit must also rank the pairs well enough by its own estimate, and surely so:
the estimate (implied_auroc) and its 5th percentile over bootstrap resamples of the window
(implied_auroc_low) must both reach MIN_IMPLIED_AUROC. A model that has barely started to learn shows
matched pairs in the count before it can pick them out, and weighting then trains on the few pairs it
happens to agree with, most of them mismatched. The lower bound is needed because at high noise few pairs
show as matched: the estimate rests on a small excess over the null and swings from fit to fit.

Once passed, the ranking test is latched (`ranking_shown`): a model that ranks well keeps doing so as it
trains, but at high noise the estimate reads that ranking low and dips under the bar now and then; each dip
would shut the gate for some steps, and switching between the weighted and the plain loss in bursts trains
worse than weighting throughout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmcl.losses.distributed import gather_no_grad
from mmcl.noise.window import MIN_FIT_VALUES, ValueWindow

BINS = 50
BIN_CENTRES = (np.arange(BINS) + 0.5) / BINS  # lfdr is fitted per bin and read between these
STOREY_LAMBDA = 0.5
GATE_Z = 3.0  # matched pairs must show as this many standard deviations above the all-mismatched count
MIN_BEST_CLEAN = 0.5  # and the pairs with the lowest p-values must be more likely matched than not
# and the fit must rank matched above mismatched pairs this well (estimate and bound)
MIN_IMPLIED_AUROC = 0.85
BOOTSTRAP_RESAMPLES = 200  # of the window's histogram, for implied_auroc_low (~10 ms per refit)
BOOTSTRAP_PERCENTILE = 5.0


@torch.no_grad()
def null_pvalues(
    media_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, gather: bool = True
) -> Tensor:
    """For each of this rank's pairs, the fraction of this rank's mismatched (off-diagonal) media-text
    combinations whose symmetric contrastive loss is at or below the pair's own.

    The loss of combination (media i, text j) is what the pair would have had in the batch:
    (-log softmax over all texts of media i at j  -log softmax over all media of text j at i) / 2, both
    softmaxes over the global batch; on the diagonal it is the CLIP loss's per-sample loss. Features are
    L2-normalized ``[B, D]``; needs B >= 2 (B (B - 1) null values). `gather` False: this process's batch
    alone (a scorer whose processes read different shards).
    """
    batch = media_features.shape[0]
    if batch < 2:
        raise ValueError(
            "null_pvalues needs at least 2 pairs per process (the off-diagonal pairs are the null)"
        )
    media, text = media_features.float(), text_features.float()
    all_media, all_text = (gather_no_grad(media), gather_no_grad(text)) if gather else (media, text)
    media_lse = torch.logsumexp(logit_scale * media @ all_text.T, dim=1)
    text_lse = torch.logsumexp(logit_scale * text @ all_media.T, dim=1)
    losses = (media_lse[:, None] + text_lse[None, :]) / 2 - logit_scale * media @ text.T
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=losses.device)
    null = losses[off_diagonal].sort().values
    return torch.searchsorted(null, losses.diagonal().contiguous(), right=True).double() / null.numel()


class LocalFdr:
    """Storey's pi0 and a monotone lfdr(p), refitted on a window of recent p-values."""

    def __init__(self, window: int) -> None:
        self.window = ValueWindow(window)
        # {"pi0", "evidence_z", "implied_auroc", "implied_auroc_low", "gate_open", "lfdr": [BINS floats]} once
        # fitted
        self.params: dict | None = None
        self.ranking_shown = False  # the ranking test has passed at an open fit: later fits skip it (latched)

    def add(self, pvalues: np.ndarray) -> None:
        self.window.add(pvalues)

    def fit(self) -> dict | None:
        """Refit on the window (None while it holds fewer than MIN_FIT_VALUES p-values)."""
        data = self.window.values()
        if len(data) < MIN_FIT_VALUES:
            self.params = None
            return None
        n = len(data)
        below = float((data <= STOREY_LAMBDA).sum())
        pi0 = storey_pi0(n - below, n)
        evidence_z = (below - n * STOREY_LAMBDA) / np.sqrt(n * STOREY_LAMBDA * (1.0 - STOREY_LAMBDA))
        counts, _ = np.histogram(np.clip(data, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))
        density = decreasing(counts * BINS / n)
        lfdr = np.minimum(1.0, pi0 / np.maximum(density, 1e-12))
        ranking, ranking_low = implied_auroc(density, pi0), implied_auroc_lower_bound(counts)
        shows_matched = bool(evidence_z >= GATE_Z and 1.0 - lfdr[0] >= MIN_BEST_CLEAN)
        self.ranking_shown = self.ranking_shown or (
            shows_matched and bool(min(ranking, ranking_low) >= MIN_IMPLIED_AUROC)
        )
        gate_open = shows_matched and self.ranking_shown
        self.params = {
            "pi0": pi0,
            "evidence_z": float(evidence_z),
            "implied_auroc": ranking,
            "implied_auroc_low": ranking_low,
            "gate_open": bool(gate_open),
            "lfdr": lfdr.tolist(),
        }
        return self.params

    def clean_probability(self, pvalues: np.ndarray) -> np.ndarray:
        """The weights: `fitted_clean_probability`, but all ones before the first fit and while the gate is
        shut."""
        pvalues = np.asarray(pvalues, dtype=np.float64)
        if not self.gate_open:
            return np.ones_like(pvalues)
        return self.fitted_clean_probability(pvalues)

    def fitted_clean_probability(self, pvalues: np.ndarray) -> np.ndarray:
        """1 - lfdr(p) of the last fit, interpolated between bin centres, whether or not the gate lets it
        weight (for diagnostics; needs a fit)."""
        return 1.0 - np.interp(np.asarray(pvalues, dtype=np.float64), BIN_CENTRES, self.params["lfdr"])

    @property
    def gate_open(self) -> bool:
        """Whether the last fit found the evidence of matched pairs that weighting needs."""
        return self.params is not None and self.params["gate_open"]

    @property
    def noise_rate(self) -> float | None:
        return None if self.params is None else self.params["pi0"]

    def state_dict(self) -> dict:
        return {**self.window.state_dict(), "params": self.params, "ranking_shown": self.ranking_shown}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
        self.params = state["params"]
        self.ranking_shown = bool(
            state.get("ranking_shown", self.params is not None and self.params.get("gate_open"))
        )
        if self.params is not None and "implied_auroc_low" not in self.params:
            self.fit()  # saved by an older gate: refit the window


def implied_auroc(density: np.ndarray, pi0: float) -> float:
    """How well the p-values tell matched from mismatched pairs by the two-groups fit itself, no labels
    (`density` per bin, BINS of them):
    P(a matched pair's p < a mismatched pair's) = 1 - E[p | matched] for a uniform null, with the matched
    pairs' density (density - pi0)+ per bin. 0.5 when the fit finds no matched pairs. Optimistic when the
    matched pairs' p-values spread out (Storey's pi0 counts their upper part as null)."""
    matched = np.maximum(density - pi0, 0.0)
    if matched.sum() <= 0:
        return 0.5
    return float(1.0 - (matched * BIN_CENTRES).sum() / matched.sum())


def storey_pi0(above: float, n: int) -> float:
    """Storey's noise-rate estimate from the count of the window's n p-values above STOREY_LAMBDA."""
    return min(1.0, above / n / (1.0 - STOREY_LAMBDA))


def implied_auroc_lower_bound(counts: np.ndarray) -> float:
    """The BOOTSTRAP_PERCENTILE-th percentile of implied_auroc over multinomial resamples of the window's
    histogram `counts` (BINS bins on [0, 1]; pi0 and the monotone density refitted on each): how low the
    window's own sampling noise could put the fit's ranking. Seeded, so a window always gives the same bound
    (exact resume)."""
    n = int(counts.sum())
    resamples = np.random.default_rng(0).multinomial(n, counts / n, size=BOOTSTRAP_RESAMPLES)
    values = []
    for resample in resamples:
        pi0 = storey_pi0(float(resample[int(STOREY_LAMBDA * BINS) :].sum()), n)  # the bins above lambda
        values.append(implied_auroc(decreasing(resample * BINS / n), pi0))
    return float(np.percentile(values, BOOTSTRAP_PERCENTILE))


def decreasing(values: np.ndarray) -> np.ndarray:
    """The non-increasing sequence closest to `values` in least squares (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [mean, size]
    for value in np.asarray(values, dtype=np.float64):
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean, size = blocks.pop()
            blocks[-1][0] = (blocks[-1][0] * blocks[-1][1] + mean * size) / (blocks[-1][1] + size)
            blocks[-1][1] += size
    return np.concatenate([np.full(int(size), mean) for mean, size in blocks])
