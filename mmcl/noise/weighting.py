"""PairWeighter: per-pair weights in [floor, 1] from a streaming estimate of which pairs are mismatched.

Estimators (noise.method), none of which needs epochs, a full pass or an external model:
  local_fdr        each pair's loss against the batch's own mismatched (off-diagonal) pairs -> p-value ->
                   window -> noise rate and local false discovery rate -> P(clean) (no fitted noise mode)
  loss_mixture     the student's own per-pair losses -> online two-component mixture -> P(clean); until the
                   window's losses show two modes, local_fdr's test on the same pairs keeps (1 - lfdr >= 0.5)
                   or drops each one, so weighting starts as soon as the batches show matched pairs
  teacher          the same mixture on a momentum teacher's per-pair losses (+ optional soft targets)
  alignment_score  a precomputed per-pair score from the shards' .json ("alignment_score", higher = better
                   match, from any existing model), mapped linearly by noise.score_range or by the mixture
loss_mixture and teacher weight only while local_fdr's gate on the same model's in-batch p-values is open (the
null test): a mixture always finds two components, and where the model cannot yet tell matched pairs (high
noise, early training) they split the losses the wrong way (at 80% noise on 6,000 images the teacher weighted
from step 360 on a fit that read the noise as 0.17, detection AUROC 0.72, and lost 6 points of top-1 to off).
Weights start uniform (noise.warmup_steps: the model must learn before its losses mean anything), then blend
in over noise.ramp_steps, and never go below noise.floor, so weighting cannot collapse training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmcl.noise.config import NoiseConfig
from mmcl.noise.local_fdr import LocalFdr
from mmcl.noise.metrics import auroc, detection_metrics
from mmcl.noise.mixture import OnlineMixture


class PairWeighter:
    """Turns each batch's noise signal (higher = more likely mismatched) into per-pair weights."""

    def __init__(self, cfg: NoiseConfig) -> None:
        self.cfg = cfg
        uses_mixture = cfg.method in ("loss_mixture", "teacher") or (
            cfg.method == "alignment_score" and cfg.score_range is None
        )
        self.estimator: OnlineMixture | LocalFdr | None = None
        # the mixture methods' gate, and loss_mixture's start: a small set seen many times is memorized, mismatched
        # pairs included, long before the losses form two modes; the in-batch null tells the pairs apart earlier
        # (hard weights: the soft 1 - lfdr leaves memorized mismatched pairs ~0.4, and training on them blurs the
        # modes still more)
        self.null_test = LocalFdr(cfg.window) if cfg.method in ("loss_mixture", "teacher") else None
        if cfg.method == "local_fdr":
            self.estimator = LocalFdr(cfg.window)
        elif uses_mixture:
            self.estimator = OnlineMixture(cfg.window, cfg.mixture)
        self.recent_weights = np.zeros(0)
        self.recent_signal = np.zeros(0)  # nan where not recorded (a checkpoint from before it was kept)
        self.recent_noisy = np.zeros(0, dtype=bool)
        self.has_truth = False

    @property
    def active(self) -> bool:
        return self.cfg.method != "none"

    def ramp(self, step: int) -> float:
        """0 during warm-up, then linearly to 1 over ramp_steps."""
        if step < self.cfg.warmup_steps:
            return 0.0
        if self.cfg.ramp_steps == 0:
            return 1.0
        return min(1.0, (step - self.cfg.warmup_steps + 1) / self.cfg.ramp_steps)

    def weights(
        self,
        step: int,
        signal: Tensor,
        global_signal: Tensor,
        pvalues: Tensor | None = None,
        global_pvalues: Tensor | None = None,
    ) -> Tensor:
        """Weights for this rank's pairs; `global_signal` (every rank's, identical on all ranks) updates the
        estimate, so all ranks keep the same state. loss_mixture and teacher also take the pairs' in-batch
        p-values (`null_pvalues`, from the model whose losses are the signal) for their gate."""
        gate_open, start = True, None
        if self.null_test is not None:
            if pvalues is None or global_pvalues is None:
                raise ValueError(f"noise.method {self.cfg.method} needs the pairs' in-batch p-values (null_pvalues)")
            gate_open = self.null_test.gate_open
            if self.cfg.method == "loss_mixture" and gate_open and self.estimator.params is None:
                # read before this batch's add/refit below: the weights come from the state of earlier batches
                start = self.null_test.clean_probability(pvalues.detach().double().cpu().numpy()) >= 0.5
            self.null_test.add(global_pvalues.detach().double().cpu().numpy())
            if step % self.cfg.refit_every == 0:
                self.null_test.fit()
        local = signal.detach().double().cpu().numpy()
        if self.cfg.method == "alignment_score" and self.cfg.score_range is not None:
            low, high = self.cfg.score_range
            estimate = np.clip((-local - low) / (high - low), 0.0, 1.0)  # signal is -score
        else:
            if not gate_open:
                estimate = np.ones_like(local)
            elif start is not None:  # no two loss modes (yet)
                estimate = start.astype(np.float64)
            else:
                estimate = self.estimator.clean_probability(local)
            self.estimator.add(global_signal.detach().double().cpu().numpy())
            if step % self.cfg.refit_every == 0:
                self.estimator.fit()
        blended = 1.0 - self.ramp(step) * (1.0 - estimate)
        return torch.as_tensor(np.maximum(blended, self.cfg.floor), dtype=signal.dtype, device=signal.device)

    def record(self, weights: Tensor, signal: Tensor, noisy: Tensor | None) -> None:
        """Keep the last `window` weights and signals (and ground-truth flags when the shards have them) for
        metrics."""
        def keep_last(recent: np.ndarray, values: np.ndarray) -> np.ndarray:
            return np.concatenate([recent, values])[-self.cfg.window :]

        w = weights.detach().double().cpu().numpy()
        self.recent_weights = keep_last(self.recent_weights, w)
        self.recent_signal = keep_last(self.recent_signal, signal.detach().double().cpu().numpy())
        flags = np.zeros(len(w), dtype=bool) if noisy is None else noisy.detach().cpu().numpy().astype(bool)
        self.has_truth = self.has_truth or noisy is not None
        self.recent_noisy = keep_last(self.recent_noisy, flags)

    def metrics(self) -> dict[str, float]:
        """Mean weight and, with ground truth, detection AUROC / precision / recall over the recent window,
        and the AUROC of the signal itself (`noise_signal_auroc`: how well the estimator's input ranks the
        pairs, gate open or shut; the weights' AUROC is 0.5 while they are uniform and mixes both states in a
        window where the gate switched)."""
        if not len(self.recent_weights):
            return {}
        result = {"noise_mean_weight": float(self.recent_weights.mean())}
        gate_shut = self.null_test is not None and not self.null_test.gate_open
        order = (self.null_test, self.estimator) if gate_shut else (self.estimator, self.null_test)
        estimators = [e for e in order if e is not None and e.noise_rate is not None]
        if estimators:  # the mixture's once it has two modes and the null test lets it weight, else the null test's
            result["noise_rate_estimate"] = estimators[0].noise_rate
        if isinstance(self.estimator, OnlineMixture) and self.estimator.params is not None:
            result["noise_separation"] = float(self.estimator.params["separation"])
        fdr = next((e for e in estimators if isinstance(e, LocalFdr)), None)
        if fdr is not None:  # local_fdr's, or the mixture methods' null test
            result["noise_evidence_z"] = fdr.params["evidence_z"]
            result["noise_implied_auroc"] = fdr.params["implied_auroc"]
            result["noise_implied_auroc_low"] = fdr.params["implied_auroc_low"]
        if self.has_truth:
            result.update({f"noise_{k}": v for k, v in detection_metrics(self.recent_weights, self.recent_noisy).items()})
            known = np.isfinite(self.recent_signal)
            result["noise_signal_auroc"] = auroc(self.recent_signal[known], self.recent_noisy[known])
        return result

    def state_dict(self) -> dict:
        return {
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "null_test": self.null_test.state_dict() if self.null_test is not None else None,
            "recent_weights": self.recent_weights.tolist(),
            "recent_signal": self.recent_signal.tolist(),
            "recent_noisy": self.recent_noisy.tolist(),
            "has_truth": self.has_truth,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.estimator is not None and state.get("estimator") is not None:
            self.estimator.load_state_dict(state["estimator"])
        null_test = state.get("null_test", state.get("starter"))  # "starter": saved before the teacher had one
        if self.null_test is not None and null_test is not None:
            self.null_test.load_state_dict(null_test)
        self.recent_weights = np.asarray(state["recent_weights"], dtype=np.float64)
        self.recent_signal = np.asarray(state.get("recent_signal", [np.nan] * len(self.recent_weights)), dtype=np.float64)
        self.recent_noisy = np.asarray(state["recent_noisy"], dtype=bool)
        self.has_truth = bool(state["has_truth"])
