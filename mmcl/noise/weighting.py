"""The weighting: per-pair weights in [floor, 1] from a streaming estimate of which pairs are mismatched.

`NoiseWeighting` is what the trainer holds: one `weigh` per optimizer step, `after_update` after each
applied update, and one state for checkpoints. It gets each step's signal from the noise.method's class
(mmcl.noise.methods) and turns it into weights with `PairWeighter`.

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
noise, early training) they split the losses the wrong way.
Weights start uniform (noise.warmup_steps: the model must learn before its losses mean anything), then blend
in over noise.ramp_steps, and never go below noise.floor, so weighting cannot collapse training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmcl.losses.distributed import gather_no_grad
from mmcl.noise.config import NoiseConfig
from mmcl.noise.local_fdr import LocalFdr
from mmcl.noise.methods import METHODS, LossFn, Method, Outputs, alignment_scores
from mmcl.noise.metrics import auroc, detection_metrics, plot_weights
from mmcl.noise.mixture import OnlineMixture


class NoiseWeighting:
    """noise.method for one training run: the method's signal, the weights made from it, their metrics, and
    the state a checkpoint keeps. With method none, `weigh` returns (None, None) and nothing is estimated."""

    def __init__(self, cfg: NoiseConfig, model: nn.Module, loss: LossFn) -> None:
        """`model`: the unwrapped model being trained (the teacher starts as a copy of it); `loss`: the
        training loss without weights (LossFn)."""
        self.cfg = cfg
        self.method: Method | None = METHODS[cfg.method](cfg, model, loss) if cfg.method != "none" else None
        self.pair_weighter = PairWeighter(cfg)

    def weigh(
        self, step: int, batches: list[dict], outputs: Outputs
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
        """(per-pair weights, soft targets or None) for the pairs of `batches`, or (None, None) when off.
        `outputs`: the model's forward outputs for those pairs; they are detached here, as the estimate must
        not be trained through. Every rank calls it (the estimate is fitted on every rank's signal)."""
        if self.method is None:
            return None, None
        outputs = {name: None if value is None else value.detach() for name, value in outputs.items()}
        signal = self.method.signal(batches, outputs)
        values, pvalues = signal.values, signal.pvalues
        global_values = gather_no_grad(values.float())  # every rank's, so every rank fits the same estimate
        global_pvalues = None if pvalues is None else gather_no_grad(pvalues)
        weights = self.pair_weighter.weights(step, values.float(), global_values, pvalues, global_pvalues)
        if self.cfg.combine_scores:
            weights = weights * score_weights(batches, self.cfg.score_range).to(weights)
            weights = weights.clamp(min=self.cfg.floor)
        noisy = [b["noisy"] for b in batches]
        truth = None if any(n is None for n in noisy) else torch.cat(noisy)
        self.pair_weighter.record(weights, values, truth)
        return weights.to(outputs["media_features"].device), signal.soft_targets

    def to(self, device: torch.device) -> None:
        if self.method is not None:
            self.method.to(device)

    def after_update(self, model: nn.Module) -> None:
        """After each applied optimizer step (the teacher's EMA)."""
        if self.method is not None:
            self.method.after_update(model)

    @property
    def recent_weights(self) -> np.ndarray:
        return self.pair_weighter.recent_weights

    def metrics(self) -> dict[str, float]:
        return self.pair_weighter.metrics()

    def histograms(self) -> dict[str, np.ndarray]:
        return {"noise/weights": self.recent_weights} if len(self.recent_weights) else {}

    def plot(self, path: Path, step: int) -> None:
        """The recent weights, clean vs noisy pairs where the shards carry the truth (nothing before any)."""
        if len(self.recent_weights):
            noisy = self.pair_weighter.recent_noisy if self.pair_weighter.has_truth else None
            plot_weights(
                self.recent_weights, noisy, path, title=f"pair weights at step {step} ({self.cfg.method})"
            )

    def state_dict(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able state, tensors): a checkpoint's `extra` (state.json) and `extra_tensors`
        (extra.safetensors, the teacher's weights)."""
        tensors = self.method.tensors() if self.method is not None else {}
        return {"noise": self.pair_weighter.state_dict()}, tensors

    def load_state_dict(self, extra: dict, tensors: dict[str, Tensor]) -> None:
        if "noise" in extra:
            self.pair_weighter.load_state_dict(extra["noise"])
        if self.method is not None and tensors:
            self.method.load_tensors(tensors)


def score_weights(batches: list[dict], score_range: tuple[float, float]) -> Tensor:
    """The batches' precomputed alignment scores mapped linearly onto weights 0..1 by `score_range`."""
    low, high = score_range
    scores = alignment_scores(batches, "noise.combine_scores")
    return ((scores.double() - low) / (high - low)).clamp(0.0, 1.0)


class PairWeighter:
    """Turns each batch's noise signal (higher = more likely mismatched) into per-pair weights."""

    def __init__(self, cfg: NoiseConfig) -> None:
        self.cfg = cfg
        uses_mixture = cfg.method in ("loss_mixture", "teacher") or (
            cfg.method == "alignment_score" and cfg.score_range is None
        )
        self.estimator: OnlineMixture | LocalFdr | None = None
        # the mixture methods' gate, and loss_mixture's start: a small set seen many times is memorized,
        # mismatched pairs included, long before the losses form two modes; the in-batch null tells the pairs
        # apart earlier (hard weights: the soft 1 - lfdr leaves memorized mismatched pairs ~0.4, and training
        # on them blurs the modes still more)
        self.null_test = LocalFdr(cfg.window) if cfg.method in ("loss_mixture", "teacher") else None
        if cfg.method == "local_fdr":
            self.estimator = LocalFdr(cfg.window)
        elif uses_mixture:
            self.estimator = OnlineMixture(cfg.window, cfg.mixture)
        self.recent_weights = np.zeros(0)
        self.recent_signal = np.zeros(0)
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
                raise ValueError(
                    f"noise.method {self.cfg.method} needs the pairs' in-batch p-values (null_pvalues)"
                )
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
        # the mixture's once it has two modes and the null test lets it weight, else the null test's
        if estimators:
            result["noise_rate_estimate"] = estimators[0].noise_rate
        if isinstance(self.estimator, OnlineMixture) and self.estimator.params is not None:
            result["noise_separation"] = float(self.estimator.params["separation"])
        fdr = next((e for e in estimators if isinstance(e, LocalFdr)), None)
        if fdr is not None:  # local_fdr's, or the mixture methods' null test
            result["noise_evidence_z"] = fdr.params["evidence_z"]
            result["noise_implied_auroc"] = fdr.params["implied_auroc"]
            result["noise_implied_auroc_low"] = fdr.params["implied_auroc_low"]
        if self.has_truth:
            result.update(
                {
                    f"noise_{k}": v
                    for k, v in detection_metrics(self.recent_weights, self.recent_noisy).items()
                }
            )
            known = np.isfinite(self.recent_signal)  # a diverged step's losses are not ranked
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
        """Restore `state_dict()`; an estimator the checkpoint's method did not have starts afresh."""
        if self.estimator is not None and state["estimator"] is not None:
            self.estimator.load_state_dict(state["estimator"])
        if self.null_test is not None and state["null_test"] is not None:
            self.null_test.load_state_dict(state["null_test"])
        self.recent_weights = np.asarray(state["recent_weights"], dtype=np.float64)
        self.recent_signal = np.asarray(state["recent_signal"], dtype=np.float64)
        self.recent_noisy = np.asarray(state["recent_noisy"], dtype=bool)
        self.has_truth = bool(state["has_truth"])
