"""Two small real audio-text sets built offline, for bench/clap_pretrain_bench.py:

- **Sonic Pi's samples** (Debian's sonic-pi-samples, /usr/share/sonic-pi/samples: 165 one-shots and loops
  of a music-education program, made by nobody on this project): 133 of them in 10 categories read off
  their names (`SONIC_PI_CATEGORIES`), with a fixed split by clip into training and test clips.
- **Hydrogen's drum kits** (Debian's hydrogen-drumkits, /usr/share/hydrogen/data/drumkits: 14 kits of
  recorded drums and percussion, 759 samples with their velocity layers), each sample captioned by its
  instrument's name in the kit's drumkit.xml ("a snare rimshot, from a drum kit.").
- **Synthesized sounds**: clips that `sox` synthesizes from a handful of generators (sine, square, sawtooth,
  triangle, plucked string, white, pink and brown noise), pitches, envelopes, pitch sweeps, repetitions and
  effects, each captioned by what it is made of ("a short low falling sine tone, with echo.").

Every clip is written as 16 kHz mono WAV, at least 1 s long: a shorter sample is followed by silence (a
one-shot as a sample player plays it), so that the training pipeline, which repeats a clip shorter than
its window, does not turn a single hit into a rhythm. Everything is written once under the given folder
and reused (rebuilt when its parameters change).
"""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import soundfile

SONIC_PI = Path("/usr/share/sonic-pi/samples")
DRUM_KITS = Path("/usr/share/hydrogen/data/drumkits")
RATE = 16000
MIN_SECONDS = 1.0
# class name (with its article: the prompts say it) -> the sample-name prefixes it takes. Sonic Pi names
# every sample by kind (bd_ = bass drum, sn_ = snare, ambi_ = ambient, ...) and often by instrument
# (drum_tom_hi_hard, elec_hollow_kick): the classes follow the instrument where a name gives it, the kind
# otherwise. Left out (32 clips): guit_ (4), vinyl_ (4), misc_ (3), perc_ (10, a mix of bells, snaps, a
# door, impacts), mehackit_phone (4), glitch_perc (5), drum_cowbell, drum_roll: too few of a kind.
SONIC_PI_CATEGORIES = {
    "a kick drum": ["bd_", "drum_heavy_kick", "drum_bass_", "elec_hollow_kick", "elec_soft_kick"],
    "a snare drum": ["sn_", "drum_snare_", "elec_snare", "elec_filt_snare", "elec_hi_snare", "elec_lo_snare",
                     "elec_mid_snare"],
    "a cymbal": ["drum_cymbal_", "drum_splash_", "elec_cymbal"],
    "a tom drum": ["drum_tom_", "elec_fuzz_tom"],
    "a tabla": ["tabla_"],
    "a synth bass": ["bass_", "glitch_bass_"],
    "an ambient pad": ["ambi_"],
    "a music loop": ["loop_"],
    "an electronic blip": ["elec_beep", "elec_blip", "elec_blup", "elec_bong", "elec_chime", "elec_ping",
                           "elec_plip", "elec_pop", "elec_tick", "elec_twip", "elec_bell", "elec_triangle",
                           "elec_twang", "elec_flip", "elec_wood"],
    "a robot voice": ["mehackit_robot", "glitch_robot"],
}  # fmt: skip
# the captions' phrasings; zero-shot prompts use the same ones (a text tower trained from scratch knows only
# its captions' words)
SONIC_PI_CAPTIONS = ["the sound of {}.", "a sample of {}.", "{}, recorded.", "this is {}."]
TEST_SHARE = 1 / 3  # of each category's clips, rounded: 45 test clips, 88 training clips

# the synthesized corpus: caption word -> sox synth type
SYNTH_SOURCES = {"sine tone": "sine", "square tone": "square", "sawtooth tone": "sawtooth",
                 "triangle tone": "triangle", "plucked string": "pluck", "white noise": "whitenoise",
                 "pink noise": "pinknoise", "brown noise": "brownnoise"}  # fmt: skip
SYNTH_PITCHES = {"low": (40.0, 160.0), "middle": (200.0, 700.0), "high": (900.0, 4000.0)}
SYNTH_SHAPES = ("short", "long", "swelling")
SYNTH_MOTIONS = ("steady", "rising", "falling")
SYNTH_EFFECTS = {"": [], "with reverb": ["reverb", "60"], "with echo": ["echo", "0.8", "0.7", "120", "0.5"],
                 "distorted": ["overdrive", "20"], "wobbling": ["tremolo", "7", "80"]}  # fmt: skip
SYNTH_CAPTIONS = ["{}.", "the sound of {}.", "{}, synthesized."]


DRUM_CAPTIONS = ["a {}, from a drum kit.", "the sound of a {}.", "a drum kit's {}."]
# spellings in the kits' instrument names -> one word each
DRUM_WORDS = {"hh": "hi-hat", "hi hat": "hi-hat", "hihat": "hi-hat", "(?<!hi-)hat": "hi-hat",
              "chh": "closed hi-hat", "ohh": "open hi-hat", "bassdrum": "bass drum", "bd": "bass drum",
              "sn": "snare", "cl": "closed", "op": "open", "pd": "pedal", "opened": "open",
              "flac|wav|inch": ""}  # fmt: skip


def _done(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / ".complete").read_text()) == params
    except (OSError, ValueError):
        return False


def _sox(args: list[str]) -> None:
    if shutil.which("sox") is None:
        raise SystemExit("sox not found: apt-get install sox")
    subprocess.run(["sox", *map(str, args)], check=True, capture_output=True)


def category_of(stem: str) -> str | None:
    """The SONIC_PI_CATEGORIES class of a sample name, None when it is left out."""
    found = [name for name, prefixes in SONIC_PI_CATEGORIES.items() if stem.startswith(tuple(prefixes))]
    assert len(found) <= 1, (stem, found)
    return found[0] if found else None


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _as_clip(source: Path, out: Path) -> None:
    """`source` as 16 kHz mono WAV, followed by silence up to MIN_SECONDS."""
    seconds = soundfile.info(str(source)).duration
    _sox([source, "-r", RATE, "-c", 1, "-b", 16, out, "pad", 0, f"{max(0.0, MIN_SECONDS - seconds):.4f}"])


def build_sonic_pi(root: Path, seed: int = 0) -> dict:
    """The Sonic Pi set: `train.csv` (each training clip once per caption phrasing), the test clips as
    class folders `test/<class>/`, and the prompts file; returns their paths and the counts."""
    root = Path(root)
    params = {"categories": SONIC_PI_CATEGORIES, "captions": SONIC_PI_CAPTIONS, "seed": seed,
              "test_share": TEST_SHARE, "min_seconds": MIN_SECONDS}  # fmt: skip
    if not _done(root, params):
        if not SONIC_PI.is_dir():
            raise SystemExit(f"{SONIC_PI} not found: apt-get install sonic-pi-samples")
        shutil.rmtree(root, ignore_errors=True)
        (root / "clips").mkdir(parents=True)
        by_class: dict[str, list[str]] = {}
        for path in sorted(SONIC_PI.glob("*.flac")):
            if (label := category_of(path.stem)) is not None:
                by_class.setdefault(label, []).append(path.stem)
        rng = random.Random(seed)
        rows, split = [], {}
        for label, stems in by_class.items():
            rng.shuffle(stems)
            test = round(len(stems) * TEST_SHARE)
            split[label] = {"test": sorted(stems[:test]), "train": sorted(stems[test:])}
            for stem in stems:
                _as_clip(SONIC_PI / f"{stem}.flac", root / "clips" / f"{stem}.wav")
            for stem in split[label]["test"]:
                folder = root / "test" / label.replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(root / "clips" / f"{stem}.wav", folder / f"{stem}.wav")
            rows += [{"path": f"clips/{stem}.wav", "caption": caption.format(label), "label": label}
                     for stem in split[label]["train"] for caption in SONIC_PI_CAPTIONS]  # fmt: skip
        _write_manifest(root / "train.csv", rows)
        (root / "prompts.txt").write_text("".join(f"{c}\n" for c in SONIC_PI_CAPTIONS))
        (root / "split.json").write_text(json.dumps(split, indent=1))
        (root / ".complete").write_text(json.dumps(params))
    split = json.loads((root / "split.json").read_text())
    captions = [c.format(label) for label in split for c in SONIC_PI_CAPTIONS]
    return {"train": root / "train.csv", "test": root / "test", "templates": root / "prompts.txt",
            "split": split, "captions": captions}  # fmt: skip


def synth_clip(rng: random.Random) -> tuple[list[str], str]:
    """One synthesized sound: the sox effects chain after `-n OUT` and its caption."""
    source = rng.choice(list(SYNTH_SOURCES))
    pitch = rng.choice(list(SYNTH_PITCHES))
    shape = rng.choice(SYNTH_SHAPES)
    repeats = rng.choice([1, 1, rng.randint(2, 6)])
    shape = "short" if repeats > 1 else shape
    tonal = not source.endswith("noise")
    motion = (
        rng.choice(SYNTH_MOTIONS) if tonal and source != "plucked string" else "steady"
    )  # sox sweeps those
    effect = rng.choice(list(SYNTH_EFFECTS))
    seconds = {
        "short": rng.uniform(0.05, 0.3),
        "long": rng.uniform(0.6, 1.0),
        "swelling": rng.uniform(0.5, 1.0),
    }
    length = min(seconds[shape], 0.9 / repeats)
    low, high = SYNTH_PITCHES[pitch]
    freq = low * (high / low) ** rng.random()
    sweep = {"steady": f"{freq:.1f}", "rising": f"{freq:.1f}-{freq * rng.uniform(1.5, 3):.1f}",
             "falling": f"{freq:.1f}-{freq / rng.uniform(1.5, 3):.1f}"}[motion]  # fmt: skip
    chain = ["synth", f"{length:.3f}", SYNTH_SOURCES[source], *([sweep] if tonal else [])]
    if not tonal:  # noise: its pitch is the band it is filtered to
        chain += ["sinc", f"{low * 2:.0f}-{min(high * 2, RATE / 2 - 200):.0f}"]
    chain += {"short": ["fade", "l", "0.002", f"{length:.3f}", f"{length * 0.9:.3f}"],
              "long": ["fade", "q", "0.01", f"{length:.3f}", "0.05"],
              "swelling": ["fade", "q", f"{length * 0.8:.3f}", f"{length:.3f}", "0.05"]}[shape]  # fmt: skip
    chain += ["vol", f"{rng.uniform(0.3, 0.9):.2f}"]
    if repeats > 1:
        chain += ["pad", "0", f"{1 / repeats - length:.3f}", "repeat", str(repeats - 1)]
    chain += [*SYNTH_EFFECTS[effect], "pad", "0", "1", "trim", "0", f"{MIN_SECONDS}"]
    what = f"{shape} {pitch} " + ("" if motion == "steady" else f"{motion} ") + source
    what = f"{'an' if what[0] in 'aeiou' else 'a'} {what}" + (", repeated" if repeats > 1 else "")
    what += f", {effect}" if effect else ""
    return chain, rng.choice(SYNTH_CAPTIONS).format(what)


def build_synth_sounds(root: Path, count: int, seed: int = 0) -> dict:
    """`count` synthesized clips with their captions (`train.csv`); returns its path and the captions."""
    root = Path(root)
    params = {"count": count, "seed": seed, "rate": RATE}
    if not _done(root, params):
        shutil.rmtree(root, ignore_errors=True)
        (root / "clips").mkdir(parents=True)
        rng, rows = random.Random(seed), []
        for i in range(count):
            chain, caption = synth_clip(rng)
            _sox(["-n", "-r", RATE, "-c", 1, "-b", 16, root / "clips" / f"{i:05d}.wav", *chain])
            rows.append({"path": f"clips/{i:05d}.wav", "caption": caption})
        _write_manifest(root / "train.csv", rows)
        (root / ".complete").write_text(json.dumps(params))
    with open(root / "train.csv", newline="") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]
    return {"train": root / "train.csv", "captions": captions}


def drum_name(name: str) -> str | None:
    """A kit's instrument name as a caption's words ("c#3 - hi-hat closed" -> "hi-hat closed",
    'Kick (Tama Superstar 22")' -> "kick"); None for a name that says nothing (empty, a number)."""
    name = re.sub(r"\(.*?\)", " ", name.lower())
    name = re.sub(r"^[a-g]#?\d\s*-\s*", "", name)  # a note prefix
    name = re.sub(r"[^a-z -]+|\b(?:varibreaks|pearl|sabian|paiste)\b", " ", name)
    words = " ".join(name.replace("-", " - ").split()).replace(" - ", "-").strip("- ")
    for spelling, word in DRUM_WORDS.items():
        words = re.sub(rf"\b(?:{spelling})\b", word, words)
    words = " ".join(words.split())
    return words if re.search(r"[a-z]{3}", words) and "sample" not in words else None


def build_drum_kits(root: Path) -> dict:
    """Hydrogen's drum-kit samples (every velocity layer) as clips, each once per DRUM_CAPTIONS phrasing
    (`train.csv`); returns its path and the captions."""
    root = Path(root)
    params = {"captions": DRUM_CAPTIONS, "words": DRUM_WORDS, "min_seconds": MIN_SECONDS}
    if not _done(root, params):
        if not DRUM_KITS.is_dir():
            raise SystemExit(f"{DRUM_KITS} not found: apt-get install hydrogen-drumkits")
        shutil.rmtree(root, ignore_errors=True)
        (root / "clips").mkdir(parents=True)
        rows = []
        for kit_file in sorted(DRUM_KITS.glob("*/drumkit.xml")):
            for instrument in ElementTree.parse(kit_file).getroot().iter():
                if not instrument.tag.endswith("instrument"):
                    continue
                name = next((e.text or "" for e in instrument if e.tag.endswith("name")), "")
                if (words := drum_name(name)) is None:
                    continue
                for layer in instrument.iter():
                    if not layer.tag.endswith("filename") or not layer.text:
                        continue
                    source = kit_file.parent / layer.text
                    if not source.is_file():
                        continue
                    clip = f"clips/{len(rows) // len(DRUM_CAPTIONS):05d}.wav"
                    _as_clip(source, root / clip)
                    rows += [{"path": clip, "caption": c.format(words)} for c in DRUM_CAPTIONS]
        _write_manifest(root / "train.csv", rows)
        (root / ".complete").write_text(json.dumps(params))
    with open(root / "train.csv", newline="") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]
    return {"train": root / "train.csv", "captions": captions}
