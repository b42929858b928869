"""A fixed-size window of the most recent values of a stream (a ring buffer), for the online estimators."""

from __future__ import annotations

import numpy as np

MIN_FIT_VALUES = 256  # fewer values in the window than this: an estimator does not fit yet


class ValueWindow:
    """The last `size` finite values added (oldest dropped first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer = np.zeros(size, dtype=np.float64)
        self.count = 0  # values seen in total; the buffer holds the last min(count, size)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)][-self.size :]
        start = self.count % self.size
        end = start + len(values)
        if end <= self.size:
            self.buffer[start:end] = values
        else:
            split = self.size - start
            self.buffer[start:] = values[:split]
            self.buffer[: end - self.size] = values[split:]
        self.count += len(values)

    def values(self) -> np.ndarray:
        return self.buffer[: min(self.count, self.size)].copy()

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.tolist(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = np.asarray(state["buffer"], dtype=np.float64)
        self.count = int(state["count"])
