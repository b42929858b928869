"""Noise-aware pair weighting: estimate, while streaming, which pairs are mismatched and down-weight them.

config.py     NoiseConfig (the `noise:` section)
weighting.py  NoiseWeighting, what the trainer holds (one `weigh` per step, one state for checkpoints),
              and PairWeighter (signal -> estimate -> weights, with warm-up, ramp and floor)
methods.py    the noise.method registry: what each method measures per pair (local_fdr, loss_mixture,
              teacher, alignment_score)
mixture.py    an online two-component mixture over a window of recent per-sample losses
local_fdr.py  p-values against the in-batch null (the off-diagonal pairs) and the local false discovery rate
window.py     the ring buffer of recent signals the estimates are fitted on
teacher.py    the momentum (EMA) teacher
metrics.py    detection metrics (AUROC, precision/recall) and the clean-vs-noisy weight plot
"""
