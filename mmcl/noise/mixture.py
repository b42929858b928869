"""An online two-component mixture over a sliding window of recent per-sample losses.

Clean pairs are learned quickly and end up with small losses; mismatched pairs cannot be fitted and keep
large ones. A mixture with a low-loss and a high-loss component, refitted every few steps on the most
recent losses (so the fit follows the drifting loss scale), gives each new loss the posterior probability
of the low-loss component: that is the pair's weight (NCR's idea, made streaming: no epochs, no per-sample
table). When the window shows no second mode (Ashman's D < 2, e.g. on clean data), every weight is 1;
once two modes were found, a refit must fall below D = 1.5 to switch weighting off again, so the weights do
not flicker between fits near the threshold.
"""

from __future__ import annotations

import math

import numpy as np

from mmcl.noise.window import MIN_FIT_VALUES, ValueWindow

SEPARATION = 2.0  # Ashman's D above which two modes count as separated
KEEP_SEPARATION = 1.5  # once separated, the D a refit must keep to stay in use
EM_ITERATIONS = 30
EPS = 1e-6


class OnlineMixture:
    """Two-component mixture ("gaussian" on the values, or "beta" on min-max scaled values) over a window."""

    def __init__(self, window: int, kind: str = "gaussian") -> None:
        self.kind = kind
        self.window = ValueWindow(window)
        self.params: dict | None = None  # None until the first successful fit, or when not separated

    def add(self, values: np.ndarray) -> None:
        self.window.add(values)

    def values(self) -> np.ndarray:
        return self.window.values()

    # ------------------------------------------------------------ fit
    def fit(self) -> dict | None:
        """Refit on the window; returns the parameters (None when there is too little data or one mode)."""
        data = self.values()
        if len(data) < MIN_FIT_VALUES:
            self.params = None
            return None
        params = _fit_gaussian(data) if self.kind == "gaussian" else _fit_beta(data)
        mean0, mean1, var0, var1 = params["mean"][0], params["mean"][1], params["var"][0], params["var"][1]
        params["separation"] = math.sqrt(2.0) * abs(mean1 - mean0) / math.sqrt(var0 + var1 + EPS)
        threshold = KEEP_SEPARATION if self.params is not None else SEPARATION
        self.params = params if params["separation"] >= threshold and min(params["weight"]) > 0.01 else None
        return params

    def clean_probability(self, values: np.ndarray) -> np.ndarray:
        """Posterior of the low-loss component for each value (all ones without a separated fit)."""
        values = np.asarray(values, dtype=np.float64)
        if self.params is None:
            return np.ones_like(values)
        p = self.params
        if p["kind"] == "beta":
            scaled = np.clip((values - p["low"]) / (p["high"] - p["low"] + EPS), EPS, 1 - EPS)
            log_like = np.stack(
                [_beta_logpdf(scaled, a, b) for a, b in zip(p["alpha"], p["beta"], strict=True)]
            )
        else:
            log_like = np.stack(
                [_normal_logpdf(values, m, v) for m, v in zip(p["mean"], p["var"], strict=True)]
            )
        log_post = log_like + np.log(np.asarray(p["weight"])[:, None] + EPS)
        log_post -= log_post.max(axis=0, keepdims=True)
        post = np.exp(log_post)
        clean = post[0] / post.sum(axis=0)
        # beyond the clean mean a loss is never "less clean" (the tails of two Gaussians can cross back)
        return np.where(values <= p["mean_raw"][0], 1.0, clean)

    # ------------------------------------------------------------ checkpoint
    @property
    def noise_rate(self) -> float | None:
        """The weight of the high-loss component (None without a separated fit)."""
        return None if self.params is None else float(self.params["weight"][1])

    def state_dict(self) -> dict:
        return {**self.window.state_dict(), "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
        self.params = state["params"]


def _normal_logpdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def _beta_logpdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return (
        (a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )


def _responsibilities(log_like: np.ndarray, weight: np.ndarray) -> np.ndarray:
    log_post = log_like + np.log(weight[:, None] + EPS)
    log_post -= log_post.max(axis=0, keepdims=True)
    post = np.exp(log_post)
    return post / post.sum(axis=0, keepdims=True)


def _fit_gaussian(data: np.ndarray) -> dict:
    mean = np.quantile(data, [0.25, 0.75])
    var = np.full(2, data.var() / 4 + EPS)
    weight = np.array([0.5, 0.5])
    for _ in range(EM_ITERATIONS):
        resp = _responsibilities(
            np.stack([_normal_logpdf(data, m, v) for m, v in zip(mean, var, strict=True)]), weight
        )
        total = resp.sum(axis=1) + EPS
        weight = total / total.sum()
        mean = (resp @ data) / total
        var = np.array([(resp[k] @ (data - mean[k]) ** 2) / total[k] for k in range(2)]) + EPS
    order = np.argsort(mean)
    return {
        "kind": "gaussian",
        "mean": mean[order].tolist(),
        "mean_raw": mean[order].tolist(),
        "var": var[order].tolist(),
        "weight": weight[order].tolist(),
    }


def _fit_beta(data: np.ndarray) -> dict:
    """Beta mixture on min-max scaled values, fitted by EM with weighted moments (Arazo et al., 2019)."""
    low, high = float(np.quantile(data, 0.001)), float(np.quantile(data, 0.999))
    scaled = np.clip((data - low) / (high - low + EPS), 1e-4, 1 - 1e-4)
    alpha, beta = np.array([1.0, 2.0]), np.array([2.0, 1.0])
    weight = np.array([0.5, 0.5])
    for _ in range(EM_ITERATIONS):
        log_like = np.stack([_beta_logpdf(scaled, a, b) for a, b in zip(alpha, beta, strict=True)])
        resp = _responsibilities(log_like, weight)
        total = resp.sum(axis=1) + EPS
        weight = total / total.sum()
        for k in range(2):
            m = resp[k] @ scaled / total[k]
            v = resp[k] @ (scaled - m) ** 2 / total[k] + EPS
            common = max(m * (1 - m) / v - 1, EPS)
            alpha[k], beta[k] = max(m * common, EPS), max((1 - m) * common, EPS)
    mean = alpha / (alpha + beta)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    order = np.argsort(mean)
    return {
        "kind": "beta",
        "alpha": alpha[order].tolist(),
        "beta": beta[order].tolist(),
        "mean": mean[order].tolist(),
        "mean_raw": (low + mean[order] * (high - low)).tolist(),
        "var": var[order].tolist(),
        "weight": weight[order].tolist(),
        "low": low,
        "high": high,
    }
