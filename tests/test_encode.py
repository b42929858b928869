"""encode_image / encode_audio / check_captions on real bytes made here with Pillow, numpy and soundfile."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import soundfile as sf
from PIL import ExifTags, Image

from shards_tools.config import AudioOptions, ImageOptions
from shards_tools.encode import EncodedMedia, check_captions, encode_audio, encode_image
from shards_tools.items import ItemError

# ---------------------------------------------------------------- helpers


def photo(width: int, height: int) -> Image.Image:
    """A smooth colour image (gradients and a soft blob), so resampled outputs can be compared."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(-(((x - width * 0.3) / (width * 0.2)) ** 2 + ((y - height * 0.6) / (height * 0.25)) ** 2))
    rgb = np.stack([x / width * 255, y / height * 255, blob * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def to_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def reason(call, *args) -> str:
    with pytest.raises(ItemError) as caught:
        call(*args)
    return caught.value.reason


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = value
    return exif.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb by its header alone)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("source_format", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("keep-ratio-largest", (100, 75)),
        ("shortest-side", (133, 100)),
        ("center-crop", (100, 100)),
        ("none", (400, 300)),
    ],
)
def test_resize_modes_give_their_sizes(source_format, mode, size):
    data = to_bytes(photo(400, 300), source_format)
    result = encode_image(data, ImageOptions(image_size=100, resize_mode=mode))
    assert result.extension == "jpg"
    assert decode(result.data).size == size
    assert result.meta == {"width": size[0], "height": size[1], "original_width": 400, "original_height": 300}


def test_upscales_like_img2dataset():
    result = encode_image(to_bytes(photo(40, 30), "PNG"), ImageOptions(image_size=80))
    assert decode(result.data).size == (80, 60)


@pytest.mark.parametrize("mode", ["keep-ratio-largest", "center-crop"])
def test_reduced_jpeg_decode_matches_full_decode_and_resize(mode):
    """The draft (DCT-scaled) decode and the crop box must land on the same picture a plain resize gives."""
    source = photo(800, 600)
    options = ImageOptions(image_size=100, resize_mode=mode, image_format="png")
    result = decode(encode_image(to_bytes(source, "JPEG", quality=95), options).data)
    box = (100, 0, 700, 600) if mode == "center-crop" else None
    expected = source.resize(result.size, Image.Resampling.LANCZOS, box=box)
    diff = np.abs(np.asarray(result, np.int16) - np.asarray(expected, np.int16))
    assert diff.mean() < 2


@pytest.mark.parametrize("image_size", [None, 60])
def test_exif_orientation_is_applied(image_size):
    # Stored 240x160, left half red, right half blue; orientation 6 shows it turned 90 degrees clockwise,
    # so the stored left half becomes the top of a 160x240 upright picture.
    stored = np.zeros((160, 240, 3), np.uint8)
    stored[:, :120] = (255, 0, 0)
    stored[:, 120:] = (0, 0, 255)
    data = to_bytes(Image.fromarray(stored), "JPEG", exif=exif_orientation(6))
    result = encode_image(data, ImageOptions(image_size=image_size, image_format="png"))
    pixels = np.asarray(decode(result.data))
    height, width = pixels.shape[:2]
    assert (width, height) == ((160, 240) if image_size is None else (40, 60))
    assert (result.meta["original_width"], result.meta["original_height"]) == (160, 240)
    assert pixels[height // 4, width // 2, 0] > 200 and pixels[height // 4, width // 2, 2] < 50
    assert pixels[3 * height // 4, width // 2, 2] > 200 and pixels[3 * height // 4, width // 2, 0] < 50


def test_rgba_is_composited_on_white():
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 20:] = (0, 0, 255, 255)  # opaque blue
    result = encode_image(to_bytes(Image.fromarray(rgba), "PNG"), ImageOptions(image_format="png"))
    out = decode(result.data)
    assert out.mode == "RGB"
    assert out.getpixel((5, 10)) == (255, 255, 255)
    assert out.getpixel((30, 10)) == (0, 0, 255)


def test_palette_gif_with_transparency():
    img = Image.new("P", (30, 30), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0, 0, 0] * 254)
    img.paste(1, (15, 0, 30, 30))
    result = encode_image(to_bytes(img, "GIF", transparency=0), ImageOptions(image_format="png"))
    out = decode(result.data)
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((25, 5)) == (0, 200, 0)


def test_cmyk_jpeg_becomes_rgb():
    data = to_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    out = decode(encode_image(data, ImageOptions(image_format="png")).data)
    assert out.mode == "RGB"
    red, green, blue = out.getpixel((16, 16))
    assert red > 240 and green < 15 and blue < 15


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    data = to_bytes(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(decode(encode_image(data, ImageOptions(image_format="png")).data))
    assert out.shape == (8, 64, 3)
    np.testing.assert_allclose(out[0, :, 0], ramp[0] / 256, atol=1)


def test_webp_and_png_outputs():
    data = to_bytes(photo(64, 48), "PNG")
    for fmt, pillow_name in [("webp", "WEBP"), ("png", "PNG")]:
        result = encode_image(data, ImageOptions(image_size=32, image_format=fmt, quality=80))
        assert result.extension == fmt
        out = decode(result.data)
        assert (out.format, out.size) == (pillow_name, (32, 24))


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_output_is_deterministic_and_carries_no_metadata(fmt):
    data = to_bytes(photo(120, 90), "JPEG", exif=exif_orientation(1), comment=b"from a camera")
    options = ImageOptions(image_size=64, image_format=fmt)
    first, second = encode_image(data, options), encode_image(data, options)
    assert first == second
    out = decode(first.data)
    assert not out.getexif() and "comment" not in out.info and "icc_profile" not in out.info


def test_jpeg_of_the_right_size_passes_through_unchanged():
    data = to_bytes(photo(64, 48), "JPEG", quality=70)
    assert encode_image(data, ImageOptions(quality=95)).data == data
    assert encode_image(data, ImageOptions(image_size=64)).data == data
    # Anything that has to change is re-encoded: a resize, another format, a rotation.
    assert encode_image(data, ImageOptions(image_size=32)).data != data
    assert encode_image(data, ImageOptions(image_format="png")).extension == "png"
    rotated = to_bytes(photo(64, 48), "JPEG", exif=exif_orientation(8))
    assert decode(encode_image(rotated, ImageOptions()).data).size == (48, 64)


@pytest.mark.parametrize("image_size", [None, 100])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_decode_errors(fmt, image_size):
    data = to_bytes(photo(400, 300), fmt)
    with pytest.raises(ItemError) as caught:
        encode_image(data[: len(data) // 2], ImageOptions(image_size=image_size))
    assert caught.value.reason == "decode_error"
    assert "truncated" in caught.value.detail or "broken" in caught.value.detail


def test_non_images_and_empty_bytes():
    assert reason(encode_image, np.random.default_rng(0).bytes(3000), ImageOptions()) == "decode_error"
    assert reason(encode_image, b"<html>not found</html>", ImageOptions()) == "decode_error"
    assert reason(encode_image, b"", ImageOptions()) == "empty_file"


def test_eps_is_not_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ItemError) as caught:
        encode_image(eps, ImageOptions())
    assert caught.value.reason == "decode_error" and "cannot identify" in caught.value.detail


@pytest.mark.parametrize("warning_action", ["error", "ignore"])
def test_decompression_bomb_between_one_and_two_times_the_limit(monkeypatch, warning_action):
    """Pillow only warns in this range; whatever the warning filters, the item is a bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = to_bytes(photo(40, 30), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action, Image.DecompressionBombWarning)
        assert reason(encode_image, data, ImageOptions()) == "decompression_bomb"


def test_decompression_bomb_by_header():
    assert reason(encode_image, png_header_only(100_000, 100_000), ImageOptions()) == "decompression_bomb"


def test_min_size():
    data = to_bytes(photo(60, 40), "PNG")
    assert reason(encode_image, data, ImageOptions(min_size=41)) == "too_small"
    assert encode_image(data, ImageOptions(min_size=40)).meta["width"] == 60


# ---------------------------------------------------------------- audio


def tone(seconds: float, rate: int, amplitudes=(0.5, 0.3), freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([a * np.sin(2 * np.pi * freq * t) for a in amplitudes], axis=1).astype(np.float32)


def audio_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def read(data: bytes) -> tuple[np.ndarray, sf.SoundFile]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype="float32", always_2d=True), f


def test_stereo_wav_to_mono_16k_flac():
    data = audio_bytes(tone(1.0, 44100), 44100, "WAV")
    result = encode_audio(data, AudioOptions(sample_rate=16000, mono=True))
    assert result.extension == "flac"
    assert result.meta == {
        "sample_rate": 16000,
        "duration": 1.0,
        "channels": 1,
        "original_sample_rate": 44100,
        "original_duration": 1.0,
    }
    samples, info = read(result.data)
    assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", 16000)
    assert samples.shape == (16000, 1)
    expected = tone(1.0, 16000, amplitudes=(0.4,))  # the mean of the two channels
    np.testing.assert_allclose(samples[100:-100], expected[100:-100], atol=2e-3)


def test_keeps_channels_and_rate_and_writes_wav():
    data = audio_bytes(tone(0.5, 22050), 22050, "FLAC")
    result = encode_audio(data, AudioOptions(mono=False, audio_format="wav"))
    samples, info = read(result.data)
    assert (result.extension, info.format, info.samplerate) == ("wav", "WAV", 22050)
    np.testing.assert_allclose(samples, tone(0.5, 22050), atol=1e-4)


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_24"), ("WAV", "FLOAT"), ("WAV", "PCM_16")])
def test_bit_depth_follows_the_source(fmt, subtype):
    result = encode_audio(audio_bytes(tone(0.2, 16000), 16000, fmt, subtype), AudioOptions())
    assert read(result.data)[1].subtype == ("PCM_16" if subtype == "PCM_16" else "PCM_24")


@pytest.mark.parametrize(("fmt", "subtype"), [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_lossy_inputs(fmt, subtype):
    data = audio_bytes(tone(1.0, 44100), 44100, fmt, subtype)
    result = encode_audio(data, AudioOptions(sample_rate=16000))
    samples, _ = read(result.data)
    assert result.meta["original_duration"] == pytest.approx(1.0, abs=0.01)
    assert len(samples) == pytest.approx(16000, abs=200)
    assert np.abs(samples).max() == pytest.approx(0.4, abs=0.05)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"), ("WAV", "PCM_16")]
)
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_audio_is_a_decode_error(fmt, subtype, keep):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (44100, 2)).astype(np.float32)
    data = audio_bytes(noise, 44100, fmt, subtype)
    assert reason(encode_audio, data[: int(len(data) * keep)], AudioOptions()) == "decode_error"


def test_flac_cut_at_a_frame_boundary_is_a_decode_error():
    """No lost sync to report here; libsndfile still fails ("Internal psf_fseek() failed")."""
    noise = np.random.default_rng(1).uniform(-0.5, 0.5, (44100, 1)).astype(np.float32)
    data = audio_bytes(noise, 44100, "FLAC", "PCM_16")
    frame_starts = [i for i in range(100, len(data) - 1) if data[i : i + 2] == b"\xff\xf8"]
    cut = frame_starts[len(frame_starts) // 2]
    with pytest.raises(ItemError) as caught:
        encode_audio(data[:cut], AudioOptions())
    assert caught.value.reason == "decode_error"


@pytest.mark.parametrize("sample_rate", [None, 16000])
def test_max_seconds_keeps_the_start_without_fading_the_cut(sample_rate):
    data = audio_bytes(tone(3.0, 44100), 44100, "WAV")
    result = encode_audio(data, AudioOptions(sample_rate=sample_rate, max_seconds=1.25))
    rate = sample_rate or 44100
    samples, _ = read(result.data)
    assert result.meta["duration"] == 1.25 and result.meta["original_duration"] == 3.0
    assert len(samples) == round(1.25 * rate)
    np.testing.assert_allclose(samples[-50:], tone(1.25, rate, amplitudes=(0.4,))[-50:], atol=2e-3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_are_decode_errors(bad):
    samples = tone(0.1, 16000)
    samples[100, 1] = bad
    assert reason(encode_audio, audio_bytes(samples, 16000, "WAV", "FLOAT"), AudioOptions()) == "decode_error"


def test_loud_samples_are_clipped_not_wrapped():
    samples = np.full((1000, 1), 1.5, np.float32)
    samples[500:] = -1.5
    result = encode_audio(audio_bytes(samples, 16000, "WAV", "FLOAT"), AudioOptions(audio_format="wav"))
    out, _ = read(result.data)
    assert out[:500].min() > 0.999 and out[500:].max() < -0.999


def test_empty_silent_and_garbage_audio():
    assert reason(encode_audio, b"", AudioOptions()) == "empty_file"
    no_frames = audio_bytes(np.zeros((0, 1), np.float32), 16000, "WAV")
    assert reason(encode_audio, no_frames, AudioOptions()) == "decode_error"
    with pytest.raises(ItemError) as caught:
        encode_audio(np.random.default_rng(0).bytes(4000), AudioOptions())
    assert caught.value.reason == "decode_error"
    assert "0x" not in caught.value.detail  # no object address: error logs are deterministic
    assert reason(encode_audio, to_bytes(photo(20, 20), "PNG"), AudioOptions()) == "decode_error"


@pytest.mark.parametrize("audio_format", ["flac", "wav"])
def test_audio_output_is_deterministic(audio_format):
    data = audio_bytes(tone(0.5, 44100), 44100, "WAV")
    options = AudioOptions(sample_rate=16000, audio_format=audio_format)
    first = encode_audio(data, options)
    assert isinstance(first, EncodedMedia) and first == encode_audio(data, options)


# ---------------------------------------------------------------- captions


def test_captions_are_stripped_and_empty_ones_dropped():
    assert check_captions(["  a cat ", "", "   ", "\tdog\n", "café ☕"]) == ["a cat", "dog", "café ☕"]


@pytest.mark.parametrize("captions", [[], [""], [" \n\t", "  "]])
def test_no_caption_left_is_empty_caption(captions):
    assert reason(check_captions, captions) == "empty_caption"


def test_undecodable_caption_bytes_are_caption_not_utf8():
    bad = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")
    assert reason(check_captions, ["a fine caption", bad]) == "caption_not_utf8"
