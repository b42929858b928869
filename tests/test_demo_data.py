"""The demo's data builders rebuild a cached folder when asked for another size, instead of reusing it."""

from __future__ import annotations

import shutil

import pytest

from pipelines.demo_data import FASHION_DIR, build_fashion_mnist, build_spoken_words


def rows(csv_path) -> int:
    return sum(1 for _ in open(csv_path)) - 1


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_is_rebuilt_for_another_size(tmp_path):
    first = build_fashion_mnist(tmp_path / "fm", 40, 2)
    assert rows(first["train"]) == 40
    marker = (tmp_path / "fm" / ".complete").stat().st_mtime_ns
    assert rows(build_fashion_mnist(tmp_path / "fm", 40, 2)["train"]) == 40  # same size: reused
    assert (tmp_path / "fm" / ".complete").stat().st_mtime_ns == marker
    assert rows(build_fashion_mnist(tmp_path / "fm", 70, 2)["train"]) == 70
    assert sum(1 for _ in (tmp_path / "fm" / "test").rglob("*.png")) == 20


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_spoken_words_are_rebuilt_for_another_repeat_count(tmp_path):
    assert rows(build_spoken_words(tmp_path / "sw", 1)["train"]) == 80
    assert rows(build_spoken_words(tmp_path / "sw", 2)["train"]) == 160
