"""Audio loader cost at CLAP's settings: clips/s per core, FLAC shards of 10 s clips at 48 kHz.

    .venv/bin/python bench/audio_loader_bench.py                  # 200 clips, 3 repeats
    .venv/bin/python bench/audio_loader_bench.py --clips 400 --repeat 5

The sides run in one DataLoader worker process (bench/worker_timing.py: torch at 1 thread, torch's worker
info set, glibc keeping freed memory as mmcl's loader workers do), after a warm-up pass each, taking turns in
every round; each figure is clips/s on that one core, the median over the rounds. The sides, each over the
same shards:

  bare decode      soundfile decodes every clip whole; the floor any loader pays
  bare + mel       the same, then HTSAT's log-mel (transformers' ClapFeatureExtractor defaults: 48 kHz,
                   n_fft 1024, hop 480, 64 mels) clip by clip, float32 torch
  mmcl stream      mmcl's training stream (capped tar reading, the 10 s window decoded, crop, tokenizing)
                   with data.sample_rate 48000 and data.clip_seconds 10: what a loader worker does per clip,
                   each batch of 64 handed over as a worker sends it (1.9 MB of float32 a clip) and given
                   back as the trainer gives it back after its step; "not given back": every batch in a
                   fresh shared-memory segment (mmcl.data.batch_buffers)
  tower features   mmcl's CLAP feature module (mmcl/models/hf_audio.py ClapFeatures) on batches of 64
                   waveforms, float64 as on CPU/CUDA and float32: what an `hf` CLAP tower computes per clip
                   inside the model step, on the model's device

The clips are synthetic (tones, a sweep and noise, 16-bit mono), written as mmcl shards in --work-dir
(default bench/out/audio_loader/, git-ignored). Results: a table on stdout and WORK_DIR/results.json.

    .venv/bin/python bench/audio_loader_bench.py --train-steps 60    # + data wait in a micro training run

--train-steps N then trains N steps of a micro model on the same shards with `mmcl train` in a child process
(the machine's cores, data.workers 2, batch 32): an `hf` audio tower that is a tiny random ClapModel with
transformers' default (HTSAT's) feature extractor, 48 kHz and 10 s windows (tests/hf_models.py), and the
micro open_clip text tower. It reports the data-wait share of step time (`data_wait_fraction` in
metrics.jsonl, time-weighted over the log windows after the first) and clips/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from worker_timing import drain, in_worker  # noqa: E402

from mmcl.data import DataConfig, build_train_stream  # noqa: E402
from shards_tools.writer import sample_bytes, tar_end  # noqa: E402

RATE, SECONDS, PER_SHARD, BATCH = 48_000, 10.0, 50, 64


def clip(seed: int) -> bytes:
    """A 10 s, 48 kHz, 16-bit mono FLAC: two tones, a sweep and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * SECONDS)) / RATE
    f0, f1 = rng.uniform(80, 2000, size=2)
    wave = 0.2 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * (f1 + 300 * t) * t)
    wave += 0.05 * rng.standard_normal(t.shape)
    out = io.BytesIO()
    soundfile.write(out, wave.astype(np.float32), RATE, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def build_shards(folder: Path, clips: int) -> list[bytes]:
    """Write the shards once (reused when the folder holds them); returns every clip's FLAC bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    flacs = [clip(i) for i in range(clips)]
    for start in range(0, clips, PER_SHARD):
        body = b"".join(
            sample_bytes({"__key__": f"{i:06d}", "flac": flacs[i], "txt": f"sound number {i}".encode()})
            for i in range(start, min(start + PER_SHARD, clips))
        )
        (folder / f"shard-{start // PER_SHARD:06d}.tar").write_bytes(body + tar_end(len(body)))
    return flacs


def extractor():
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor()  # HTSAT's settings; no download (the constructor's defaults)


def bare_decode(flacs: list[bytes]) -> None:
    for data in flacs:
        soundfile.read(io.BytesIO(data), dtype="float32")


def bare_mel(flacs: list[bytes]) -> Callable[[], None]:
    """soundfile decode + the log-mel, one clip at a time (float32 torch, the extractor's filters)."""
    ext = extractor()
    filters = torch.as_tensor(ext.mel_filters_slaney, dtype=torch.float32)
    window = torch.hann_window(ext.fft_window_size)

    def run() -> None:
        for data in flacs:
            wave = torch.from_numpy(soundfile.read(io.BytesIO(data), dtype="float32")[0])
            spec = torch.stft(wave, ext.fft_window_size, ext.hop_length, window=window, return_complex=True)
            (10 * (spec.abs().pow(2).T @ filters).clamp(min=1e-10).log10()).sum()

    return run


def mmcl_stream(shards: Path, clips: int, give_back: bool = True) -> Callable[[], None]:
    cfg = DataConfig(
        sources=[{"urls": str(shards)}], batch_size=BATCH, workers=1, shuffle_buffer=0,
        sample_rate=RATE, clip_seconds=SECONDS,
    )  # fmt: skip

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 8, dtype=torch.long)

    def run() -> None:
        stream = build_train_stream(cfg, modality="audio", media_transform=None, tokenizer=tokenizer)
        drain(stream, clips // BATCH, give_back)

    return run


def tower_features(flacs: list[bytes], dtype: torch.dtype) -> Callable[[], None]:
    """mmcl's ClapFeatures on batches of BATCH waveforms (float64 is what it uses on CPU and CUDA)."""
    from mmcl.models.hf_audio import ClapFeatures

    features = ClapFeatures(extractor(), fusion=False)
    waves = torch.stack([torch.from_numpy(soundfile.read(io.BytesIO(d), dtype="float32")[0]) for d in flacs])
    batches = [waves[i : i + BATCH] for i in range(0, len(waves) - BATCH + 1, BATCH)]

    def run() -> None:
        for batch in batches:
            if dtype == torch.float64:
                features(batch)
            else:
                _float32_features(features, batch)

    return run


def _float32_features(features, batch: torch.Tensor) -> torch.Tensor:
    """The same computation in float32 (what the module does on devices without float64)."""
    window, filters = features.window.float(), features.filters.float()
    spec = torch.stft(features.pad(batch), features.n_fft, features.hop, window=window, return_complex=True)
    return 10 * (spec.abs().pow(2).transpose(1, 2) @ filters).clamp(min=1e-10).log10()


def train_data_wait(work: Path, steps: int) -> dict:
    """A micro `mmcl train` run on the shards (tiny CLAP audio tower at HTSAT's settings, 2 loader
    workers): the data-wait share of step time after the first log window, and clips/s."""
    import hf_models

    folder = work / "tiny-clap"
    if not (folder / "model.safetensors").exists():
        hf_models.tiny_clap(folder, ["a tone", "a sweep", "sound number one"])
    run_dir = work / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "run": {"output_dir": str(run_dir), "seed": 0},
        "model": {"modality": "audio", "open_clip_name": "mmcl-micro-vit",
                  "audio": {"tower": "hf", "hf_model": str(folder)}},
        "data": {"sources": [{"urls": str(work / "shards")}], "batch_size": 32, "workers": 2,
                 "shuffle_buffer": 100},
        "optim": {"warmup_steps": steps // 10},
        "train": {"steps": steps, "log_every": 10, "checkpoint_every": steps, "resume": "never"},
    }  # fmt: skip
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # mmcl's own choice: the cores minus the loader workers
    subprocess.run([sys.executable, "-m", "mmcl", "train", "--config", work / "train.yaml"], cwd=REPO,
                   env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "data_wait_fraction" in r][1:]
    seconds = [10 * 32 / r["samples_per_s"] for r in windows]
    waited = sum(r["data_wait_fraction"] * t for r, t in zip(windows, seconds, strict=True))
    return {"steps": steps, "batch_size": 32, "workers": 2, "steady_windows": len(windows),
            "data_wait_fraction": waited / sum(seconds), "clips_per_s": 10 * 32 * len(windows) / sum(seconds),
            "max_window_data_wait_fraction": max(r["data_wait_fraction"] for r in windows)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clips", type=int, default=200, help="10 s clips in the shards (a multiple of 64 is timed)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--train-steps", type=int, default=0, help="then a micro training run of this many steps (data wait)"
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "audio_loader")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    flacs = build_shards(args.work_dir / "shards", args.clips)
    streamed = args.clips // BATCH * BATCH
    sides = {
        "bare decode": (lambda: bare_decode(flacs), len(flacs)),
        "bare + mel": (bare_mel(flacs), len(flacs)),
        "mmcl stream": (mmcl_stream(args.work_dir / "shards", args.clips), streamed),
        "mmcl stream, not given back": (mmcl_stream(args.work_dir / "shards", args.clips, False), streamed),
        "tower features, float64": (tower_features(flacs, torch.float64), streamed),
        "tower features, float32": (tower_features(flacs, torch.float32), streamed),
    }
    results = in_worker(sides, args.repeat)
    print(f"{args.clips} clips of {SECONDS:g} s at {RATE} Hz, one core, median of {args.repeat} (best)")
    for name, r in results.items():
        print(f"  {name:<28} {r['median']:8.1f} clips/s ({r['best']:.1f})")
    out = {"clips": args.clips, "results": results}
    if args.train_steps:
        out["training"] = train_data_wait(args.work_dir, args.train_steps)
        t = out["training"]
        print(
            f"micro training, {t['steps']} steps: data wait {100 * t['data_wait_fraction']:.1f} % of step "
            "time "
            f"(worst window {100 * t['max_window_data_wait_fraction']:.1f} %), {t['clips_per_s']:.1f} clips/s"
        )
    (args.work_dir / "results.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
