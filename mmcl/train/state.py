"""TrainState: everything besides the weights and optimizer that a step-exact resume needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    """Saved with every checkpoint (state.json) and restored before the first resumed step.

    data: the data stream's DataProgress.state_dict() (mmcl.data.progress): every rank's reader positions and
      the ledger of consumed samples, so the stream continues where it stopped on any number of processes.
    """

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # non-finite losses whose update was skipped
    bad_samples: int = 0  # undecodable samples the loaders dropped (all ranks)
    data: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        return cls(**values)
