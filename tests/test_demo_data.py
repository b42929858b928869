"""The demo's data builders rebuild a cached folder when asked for another size, instead of reusing it."""

from __future__ import annotations

import shutil

import pytest

from mmcl.eval.templates import load_templates
from pipelines.demo_data import (
    AUDIO_CAPTIONS,
    AUDIO_TEST_VOICES,
    EXTRA_TRAIN_VOICES,
    FASHION_DIR,
    HELD_OUT_VOICES,
    TRAIN_VOICES,
    WORDS,
    build_fashion_mnist,
    build_held_out_speech,
    build_spoken_words,
    write_caption_prompts,
)


def rows(csv_path) -> int:
    return sum(1 for _ in open(csv_path)) - 1


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="needs dataset-fashion-mnist"
)
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
    assert rows(build_spoken_words(tmp_path / "sw", 1)) == 80
    assert rows(build_spoken_words(tmp_path / "sw", 2)) == 160


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_spoken_words_by_other_voices(tmp_path):
    assert not set(EXTRA_TRAIN_VOICES) & {*TRAIN_VOICES, *HELD_OUT_VOICES}
    assert not set(AUDIO_TEST_VOICES) & {*TRAIN_VOICES, *EXTRA_TRAIN_VOICES}  # the test's voices are unheard
    voices = ["en+m1", EXTRA_TRAIN_VOICES[0], EXTRA_TRAIN_VOICES[-1]]
    train = build_spoken_words(tmp_path / "sw", 1, voices=voices)
    assert rows(train) == 30
    speakers = {path.name.split("-")[1] for path in (tmp_path / "sw" / "train").iterdir()}
    assert speakers == {voice.replace("+", "_") for voice in voices}
    assert rows(build_spoken_words(tmp_path / "sw", 1)) == 80  # the default voices again: rebuilt


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_held_out_speech_has_every_word_by_every_voice_and_setting(tmp_path):
    test = build_held_out_speech(tmp_path / "test", ["en+m2", "en-029+f1"], [(140, 40)])
    assert sorted(p.name for p in test.iterdir() if p.is_dir()) == sorted(WORDS)
    assert sorted(p.name for p in (test / "seven").iterdir()) == ["en-029_f1-0.wav", "en_m2-0.wav"]
    marker = (test / ".complete").stat().st_mtime_ns
    build_held_out_speech(tmp_path / "test", ["en+m2", "en-029+f1"], [(140, 40)])  # same set: reused
    assert (test / ".complete").stat().st_mtime_ns == marker
    build_held_out_speech(tmp_path / "test", ["en+m2"], [(140, 40), (175, 60)])  # another set: rebuilt
    assert sorted(p.name for p in (test / "seven").iterdir()) == ["en_m2-0.wav", "en_m2-1.wav"]


def test_caption_prompts_file_is_a_templates_file_of_the_captions(tmp_path):
    path = write_caption_prompts(tmp_path / "data" / "prompts.txt")
    assert load_templates(str(path), "audio") == AUDIO_CAPTIONS
