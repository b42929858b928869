"""Readers: every input layout written in its exact public form in tmp_path, read back item by item."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from mmcl.errors import UsageError
from shards_tools.config import FetchOptions, InputSpec
from shards_tools.fetch import fetch_bytes
from shards_tools.readers import class_names, detect_format, read_items


def png(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (shade, 255 - shade, 0)).save(path)
    return path


def wav(path: Path, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(800) / 8000
    soundfile.write(path, 0.3 * np.sin(2 * np.pi * freq * t), 8000, format=path.suffix.lstrip(".").upper())
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def items(path: Path, modality: str = "image", **options) -> list:
    return list(read_items(InputSpec(modality=modality, path=path, **options)))


def reasons(found: list) -> list[str | None]:
    return [item.problem.reason if item.problem else None for item in found]


# --- manifests -------------------------------------------------------------------------------------


def test_csv_manifest_detects_columns_and_keeps_the_rest_as_meta(tmp_path):
    png(tmp_path / "img" / "a.png")
    manifest = write_csv(
        tmp_path / "pairs.csv",
        ["FilePath", "title", "width"],
        [["img/a.png", "  a red square ", 4], ["https://example.org/b.jpg", "a web image", 640]],
    )
    assert detect_format(manifest, "image") == "csv"
    found = items(manifest)
    assert [i.source for i in found] == [str(tmp_path / "img" / "a.png"), "https://example.org/b.jpg"]
    assert [i.captions for i in found] == [["a red square"], ["a web image"]]
    assert [i.meta for i in found] == [{"width": "4"}, {"width": "640"}]
    assert reasons(found) == [None, None]


def test_tsv_manifest_keeps_quotes_inside_captions(tmp_path):
    manifest = tmp_path / "cc3m.tsv"
    manifest.write_text(
        'caption\turl\na "quoted" word\thttp://127.0.0.1/1.jpg\nplain\thttp://127.0.0.1/2.jpg\n'
    )
    assert detect_format(manifest, "image") == "tsv"
    found = items(manifest)
    assert [i.captions for i in found] == [['a "quoted" word'], ["plain"]]
    assert [i.source for i in found] == ["http://127.0.0.1/1.jpg", "http://127.0.0.1/2.jpg"]


def test_headerless_tsv_says_to_add_a_header(tmp_path):
    manifest = tmp_path / "Train_GCC-training.tsv"
    manifest.write_text("a dog on grass\thttp://127.0.0.1/1.jpg\n")
    with pytest.raises(UsageError, match="add a header line"):
        items(manifest)


def test_jsonl_manifest_list_captions_and_bad_lines(tmp_path):
    manifest = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"audio": "clips/a.wav", "captions": ["a dog barks", " ", "barking"], "id": 7}),
        "",
        "{not json",
        json.dumps({"audio": "clips/b.flac", "captions": "rain"}),
        json.dumps([1, 2]),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    assert detect_format(manifest, "audio") == "jsonl"
    found = items(manifest, "audio")
    assert [i.source for i in found] == [
        str(tmp_path / "clips" / "a.wav"),
        f"{manifest}:3",
        str(tmp_path / "clips" / "b.flac"),
        f"{manifest}:5",
    ]
    assert found[0].captions == ["a dog barks", "barking"]
    assert found[0].meta == {"id": 7}
    assert found[2].captions == ["rain"]
    assert reasons(found) == [None, "decode_error", None, "decode_error"]


def test_parquet_manifest_streams_row_groups_in_order(tmp_path):
    rows = 2500
    table = pa.table(
        {
            "url": [f"https://example.org/{i}.jpg" for i in range(rows)],
            "captions": [[f"caption {i}", f"other {i}"] for i in range(rows)],
            "similarity": [i / rows for i in range(rows)],
            "seen": [datetime(2024, 1, 2, 3, 4, 5)] * rows,
            "thumbnail": [b"\x89PNG"] * rows,
        }
    )
    manifest = tmp_path / "part-0.parquet"
    pq.write_table(table, manifest, row_group_size=700)
    assert detect_format(manifest, "image") == "parquet"
    found = items(manifest)
    assert len(found) == rows
    assert [i.source for i in found[:2]] == ["https://example.org/0.jpg", "https://example.org/1.jpg"]
    assert found[-1].captions == [f"caption {rows - 1}", f"other {rows - 1}"]
    assert found[1].meta == {"similarity": 1 / rows, "seen": "2024-01-02 03:04:05"}  # bytes left out
    json.dumps(found[0].meta)


def test_parquet_with_binary_image_column_is_refused(tmp_path):
    manifest = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [b"\x89PNG"], "text": ["x"]}), manifest)
    with pytest.raises(UsageError, match="--url-column"):
        items(manifest)
    with pytest.raises(UsageError, match="binary"):
        items(manifest, url_column="image")


def test_configured_columns_several_captions_and_label(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv",
        ["img", "short", "long", "kind", "note"],
        [["a.png", "cat", "a cat on a mat", "cat", "x"], ["b.png", "dog", "", "dog", "y"]],
    )
    spec = InputSpec(
        modality="image",
        path=manifest,
        url_column="IMG",
        caption_columns=["short", "long"],
        label_column="kind",
    )
    found = list(read_items(spec))
    assert [i.captions for i in found] == [["cat", "a cat on a mat"], ["dog"]]
    assert [i.label for i in found] == ["cat", "dog"]
    assert [i.meta for i in found] == [{"note": "x"}, {"note": "y"}]
    assert class_names(spec) == ["cat", "dog"]


def test_label_column_without_captions_uses_templates(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], [["a.png", "golden_retriever"]])
    found = items(manifest, label_column="label", templates=["{label}", "a photo of a {label}."])
    assert found[0].captions == ["golden retriever", "a photo of a golden retriever."]
    assert found[0].label == "golden_retriever"


def test_numbered_caption_columns_give_several_captions(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["file", "caption_1", "caption_2"], [["a.wav", "one", "two"]])
    assert items(manifest, "audio")[0].captions == ["one", "two"]


def test_manifest_media_root(tmp_path):
    manifest = write_csv(
        tmp_path / "lists" / "m.csv", ["path", "caption"], [["a.png", "x"], ["../a.png", "y"]]
    )
    found = items(manifest, media_root=tmp_path / "media")
    assert [i.source for i in found] == [str(tmp_path / "media" / "a.png"), str(tmp_path / "a.png")]
    assert reasons(found) == [None, "path_escapes_root"]


def test_paths_escaping_the_manifest_folder(tmp_path):
    manifest = write_csv(
        tmp_path / "data" / "m.csv",
        ["path", "caption"],
        [["../secret.png", "a"], ["/etc/passwd", "b"], ["sub/../ok.png", "c"], ["sub/../../x.png", "d"]],
    )
    found = items(manifest)
    assert reasons(found) == ["path_escapes_root", "path_escapes_root", None, "path_escapes_root"]
    assert found[0].source == str(tmp_path / "secret.png")
    assert found[2].source == str(tmp_path / "data" / "ok.png")
    assert "--allow-outside-root" in found[0].problem.detail
    assert reasons(items(manifest, allow_outside_root=True)) == [None, None, None, None]


def test_url_schemes_other_than_http_are_unsupported(tmp_path):
    urls = [
        "http://127.0.0.1/a.jpg",
        "HTTPS://127.0.0.1/b.jpg",
        "file:///etc/passwd",
        "ftp://h/x.jpg",
        "pipe:curl x",
        "s3://bucket/key.jpg",
        "./odd:name.jpg",
    ]
    manifest = write_csv(tmp_path / "m.csv", ["url", "caption"], [[u, "c"] for u in urls])
    found = items(manifest)
    assert reasons(found) == [
        None,
        None,
        "unsupported_url",
        "unsupported_url",
        "unsupported_url",
        "unsupported_url",
        None,
    ]
    assert found[-1].source == str(tmp_path / "odd:name.jpg")


def test_empty_cells_become_problems(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["url", "caption"], [["", "orphan caption"], ["a.png", "   "]])
    found = items(manifest)
    assert reasons(found) == ["missing_file", "empty_caption"]
    assert found[0].source == f"{manifest}:2"


def test_non_utf8_caption_bytes_are_kept_as_surrogates(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,caption\na.png,caf\xe9 au lait\n")
    caption = items(manifest)[0].captions[0]
    assert caption == "caf\udce9 au lait"
    assert caption.encode("utf-8", "surrogateescape") == b"caf\xe9 au lait"


def test_missing_manifest(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        items(tmp_path / "nope.csv", format="csv")
    with pytest.raises(UsageError, match="nope.jsonl"):
        items(tmp_path / "nope.jsonl")


def test_unrecognised_columns_name_the_file_columns_and_flags(tmp_path):
    manifest = write_csv(tmp_path / "weird.csv", ["where", "words"], [["a.png", "x"]])
    with pytest.raises(UsageError) as err:
        items(manifest)
    message = str(err.value)
    assert str(manifest) in message
    assert "where, words" in message
    assert "--url-column" in message and "--caption-column" in message
    with pytest.raises(UsageError, match="--caption-column 'nope': no such column"):
        items(manifest, url_column="where", caption_columns=["nope"])
    assert items(manifest, url_column="where", caption_columns=["words"])[0].captions == ["x"]


# --- folders ---------------------------------------------------------------------------------------


def test_folder_of_images_with_txt_and_json_captions(tmp_path):
    root = tmp_path / "pairs"
    png(root / "a.png")
    (root / "a.txt").write_text("first caption\n\n  second caption  \n")
    png(root / "b.jpg")
    (root / "b.json").write_text(json.dumps({"caption": "from json", "url": "http://x/b.jpg", "key": "b"}))
    png(root / "c.png")  # no caption file
    png(root / "d.webp")
    (root / "d.txt").write_bytes(b"na\xefve bytes\n")
    png(root / "sub" / "e.PNG")
    (root / "sub" / "e.json").write_text(json.dumps({"captions": ["x", "y"]}))
    png(root / ".hidden.png")
    (root / "notes.md").write_text("not media")
    assert detect_format(root, "image") == "folder"
    found = items(root)
    assert [Path(i.source).relative_to(root).as_posix() for i in found] == [
        "a.png",
        "b.jpg",
        "c.png",
        "d.webp",
        "sub/e.PNG",
    ]
    assert found[0].captions == ["first caption", "second caption"]
    assert found[1].captions == ["from json"]
    assert found[1].meta == {"url": "http://x/b.jpg", "key": "b"}
    assert found[3].captions == ["na\udcefve bytes"]
    assert found[4].captions == ["x", "y"]
    assert reasons(found) == [None, None, "empty_caption", None, None]
    assert "c.txt" in found[2].problem.detail


def test_folder_of_audio_and_bad_caption_files(tmp_path):
    root = tmp_path / "sounds"
    wav(root / "rain.wav")
    (root / "rain.txt").write_text("rain on a roof")
    wav(root / "empty.flac")
    (root / "empty.txt").write_text("  \n")
    wav(root / "broken.ogg")
    (root / "broken.json").write_text("{oops")
    png(root / "ignored.png")
    (root / "ignored.txt").write_text("an image is not audio")
    assert detect_format(root, "audio") == "folder"
    found = items(root, "audio")
    assert [Path(i.source).name for i in found] == ["broken.ogg", "empty.flac", "rain.wav"]
    assert reasons(found) == ["empty_caption", "empty_caption", None]
    assert found[2].captions == ["rain on a roof"]


def test_class_folder_images(tmp_path):
    root = tmp_path / "train"
    png(root / "tabby_cat" / "2.png")
    png(root / "tabby_cat" / "1.jpg")
    png(root / "dog" / "nested" / "3.png")
    png(root / "dog" / "0.bmp")
    (root / "dog" / "readme.md").write_text("not media")
    (root / ".ipynb_checkpoints").mkdir()
    assert detect_format(root, "image") == "class-folder"
    spec = InputSpec(modality="image", path=root, templates=["a photo of a {label}.", "{label}"])
    found = list(read_items(spec))
    assert [Path(i.source).relative_to(root).as_posix() for i in found] == [
        "dog/0.bmp",
        "dog/nested/3.png",
        "tabby_cat/1.jpg",
        "tabby_cat/2.png",
    ]
    assert found[2].captions == ["a photo of a tabby cat.", "tabby cat"]
    assert [i.label for i in found] == ["dog", "dog", "tabby_cat", "tabby_cat"]
    assert [i.meta["label_index"] for i in found] == [0, 0, 1, 1]
    assert class_names(spec) == ["dog", "tabby_cat"]


def test_class_folder_audio_default_template(tmp_path):
    root = tmp_path / "speech"
    wav(root / "seven" / "a.wav")
    wav(root / "three" / "b.flac")
    assert detect_format(root, "audio") == "class-folder"
    found = items(root, "audio")
    assert [i.captions for i in found] == [["the sound of a seven."], ["the sound of a three."]]


def test_template_without_label_is_refused(tmp_path):
    png(tmp_path / "cls" / "a" / "1.png")
    with pytest.raises(UsageError, match="no {label}"):
        items(tmp_path / "cls", templates=["a photo"])


# --- COCO and Flickr30k ----------------------------------------------------------------------------


def coco_annotations(path: Path, split: str) -> dict:
    data = {
        "info": {"description": "COCO 2017 Dataset"},
        "licenses": [{"id": 1, "name": "x", "url": "http://x"}],
        "images": [
            {
                "license": 1,
                "file_name": "000000000139.jpg",
                "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
                "height": 3,
                "width": 4,
                "date_captured": "2013-11-21 01:34:01",
                "id": 139,
            },
            {"license": 1, "file_name": "000000000285.jpg", "height": 3, "width": 4, "id": 285},
            {"license": 1, "file_name": "000000000632.jpg", "height": 3, "width": 4, "id": 632},
        ],
        "annotations": [
            {"image_id": 285, "id": 1, "caption": "A big brown bear."},
            {"image_id": 139, "id": 2, "caption": "A room with chairs."},
            {"image_id": 285, "id": 3, "caption": "A bear sitting in the grass. "},
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    for image in data["images"]:
        png(path.parent.parent / split / image["file_name"])
    return data


def test_coco_captions(tmp_path):
    annotations = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    coco_annotations(annotations, "val2017")
    assert detect_format(annotations, "image") == "coco"
    found = items(annotations)
    images = tmp_path / "coco" / "val2017"
    assert [i.source for i in found] == [
        str(images / f) for f in ("000000000139.jpg", "000000000285.jpg", "000000000632.jpg")
    ]
    assert [i.captions for i in found] == [
        ["A room with chairs."],
        ["A big brown bear.", "A bear sitting in the grass."],
        [],
    ]
    assert [i.uid for i in found] == ["139", "285", "632"]
    assert reasons(found) == [None, None, "empty_caption"]
    assert found[0].meta["coco_url"].endswith("000000000139.jpg") and found[0].meta["id"] == 139


def test_coco_media_root_and_errors(tmp_path):
    annotations = tmp_path / "ann" / "my_captions.json"
    coco_annotations(annotations, "val2017")
    with pytest.raises(UsageError, match="--media-root"):
        items(annotations)
    found = items(annotations, media_root=tmp_path / "val2017")
    assert found[0].source == str(tmp_path / "val2017" / "000000000139.jpg")
    instances = tmp_path / "ann" / "instances_val2017.json"
    instances.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}],
            }
        )
    )
    with pytest.raises(UsageError, match="captions_<split>.json"):
        items(instances, format="coco", media_root=tmp_path)


def test_flickr30k_results_csv(tmp_path):
    folder = tmp_path / "flickr30k_images"
    results = folder / "results.csv"
    results.parent.mkdir(parents=True)
    results.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        '1000092795.jpg| 1| A man in a "Superman" costume, smiling .\n'
        "2199200615.jpg| 4   A dog runs across the grass .\n"
    )
    png(folder / "flickr30k_images" / "1000092795.jpg")
    png(folder / "flickr30k_images" / "2199200615.jpg")
    assert detect_format(results, "image") == "flickr30k"
    found = items(results)
    assert [i.source for i in found] == [
        str(folder / "flickr30k_images" / n) for n in ("1000092795.jpg", "2199200615.jpg")
    ]
    assert found[0].captions == [
        "Two young guys with shaggy hair look at their hands .",
        'A man in a "Superman" costume, smiling .',
    ]
    assert found[1].captions == ["A dog runs across the grass ."]
    assert [i.uid for i in found] == ["1000092795.jpg", "2199200615.jpg"]


def test_flickr30k_annotations_csv(tmp_path):
    caps = ["Two dogs play.", "Dogs run", "A pair of dogs", "Two puppies", "Dogs on grass"]
    annotations = write_csv(
        tmp_path / "flickr_annotations_30k.csv",
        ["raw", "sentids", "split", "filename", "img_id"],
        [
            [json.dumps(caps), "[0, 1, 2, 3, 4]", "train", "1000092795.jpg", "0"],
            [json.dumps(["One cat."]), "[5]", "test", "10002456.jpg", "1"],
        ],
    )
    png(tmp_path / "flickr30k-images" / "1000092795.jpg")
    assert detect_format(annotations, "image") == "flickr30k"
    found = items(annotations)
    assert found[0].source == str(tmp_path / "flickr30k-images" / "1000092795.jpg")
    assert found[0].captions == caps
    assert found[1].meta == {"sentids": "[5]", "split": "test", "img_id": "1"}


# --- audio datasets --------------------------------------------------------------------------------


def test_audiocaps_groups_clips_and_finds_each_naming(tmp_path):
    rows = [
        [91139, "r1nicOVtvkQ", 130, "A woman talks nearby as water pours"],
        [91140, "r1nicOVtvkQ", 130, "Water pours while a woman speaks"],
        [58146, "UDGBjjwyaqE", 20, "Birds chirp"],
        [11542, "-0RWZT-miFs", 420, "Bells ring"],
        [100, "Yid-at-start", 30, "A dog barks"],
        [200, "AudioSetStyle", 0, "Wind blows"],
        [300, "missingclip", 10, "Nothing here"],
    ]
    csv_path = write_csv(
        tmp_path / "dataset" / "val.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows
    )
    audio = tmp_path / "dataset" / "val"
    wav(audio / "r1nicOVtvkQ.wav")
    wav(audio / "YUDGBjjwyaqE.flac")
    wav(audio / "sub" / "11542.ogg")
    wav(audio / "Yid-at-start_30.wav")
    wav(audio / "Yid-at-start.wav")  # less specific than the start-time name above
    wav(audio / "YAudioSetStyle_0.000_10.000.wav")
    assert detect_format(csv_path, "audio") == "audiocaps"
    found = items(csv_path, "audio")
    assert [Path(i.source).relative_to(audio).as_posix() for i in found] == [
        "r1nicOVtvkQ.wav",
        "YUDGBjjwyaqE.flac",
        "sub/11542.ogg",
        "Yid-at-start_30.wav",
        "YAudioSetStyle_0.000_10.000.wav",
        "missingclip.wav",
    ]
    assert found[0].captions == ["A woman talks nearby as water pours", "Water pours while a woman speaks"]
    assert found[0].meta == {
        "youtube_id": "r1nicOVtvkQ",
        "start_time": "130",
        "audiocap_ids": ["91139", "91140"],
    }
    assert [i.uid for i in found][:2] == ["r1nicOVtvkQ_130", "UDGBjjwyaqE_20"]
    assert reasons(found) == [None, None, None, None, None, "missing_file"]
    assert "missingclip_10" in found[-1].problem.detail


def test_clotho_captions(tmp_path):
    header = ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
    csv_path = write_csv(
        tmp_path / "clotho_captions_evaluation.csv",
        header,
        [
            ["Santa Motor, Morning.wav", "a motor hums, then stops", "b", "c", "d", "e"],
            ["bird song.wav", "birds sing", "chirping", "tweets", "song", "morning birds"],
        ],
    )
    wav(tmp_path / "evaluation" / "Santa Motor, Morning.wav")
    assert detect_format(csv_path, "audio") == "clotho"
    found = items(csv_path, "audio")
    assert [i.source for i in found] == [
        str(tmp_path / "evaluation" / "Santa Motor, Morning.wav"),
        str(tmp_path / "evaluation" / "bird song.wav"),
    ]
    assert found[0].captions == ["a motor hums, then stops", "b", "c", "d", "e"]
    assert len(found[1].captions) == 5
    assert [i.uid for i in found] == ["Santa Motor, Morning.wav", "bird song.wav"]


def test_clotho_audio_one_level_up(tmp_path):
    csv_path = write_csv(
        tmp_path / "csvs" / "clotho_captions_development.csv", ["file_name", "caption_1"], [["a.wav", "x"]]
    )
    (tmp_path / "development").mkdir()
    assert items(csv_path, "audio")[0].source == str(tmp_path / "development" / "a.wav")


def test_esc50_items_folds_and_classes(tmp_path):
    root = tmp_path / "ESC-50-master"
    rows = [
        ["1-100032-A-0.wav", 1, 0, "dog", "True", 100032, "A"],
        ["1-100038-A-2.wav", 1, 2, "chirping_birds", "False", 100038, "A"],
        ["2-100648-A-1.wav", 2, 1, "car_horn", "False", 100648, "B"],
        ["5-9032-A-0.wav", 5, 0, "dog", "True", 9032, "A"],
    ]
    write_csv(
        root / "meta" / "esc50.csv",
        ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
        rows,
    )
    for row in rows:
        wav(root / "audio" / str(row[0]))
    assert detect_format(root, "audio") == "esc50"
    assert detect_format(root / "meta" / "esc50.csv", "audio") == "esc50"
    spec = InputSpec(modality="audio", path=root, folds=[1, 2])
    found = list(read_items(spec))
    assert [Path(i.source).name for i in found] == [
        "1-100032-A-0.wav",
        "1-100038-A-2.wav",
        "2-100648-A-1.wav",
    ]
    assert [i.label for i in found] == ["dog", "chirping_birds", "car_horn"]
    assert found[1].captions == ["the sound of a chirping birds."]
    assert found[1].meta == {
        "fold": 1,
        "target": 2,
        "esc10": False,
        "src_file": "100038",
        "take": "A",
        "label_index": 2,
    }
    assert found[0].meta["esc10"] is True
    assert class_names(spec) == ["dog", "car_horn", "chirping_birds"]
    assert [i.uid for i in found] == ["1-100032-A-0.wav", "1-100038-A-2.wav", "2-100648-A-1.wav"]
    assert len(items(root / "meta" / "esc50.csv", "audio")) == 4


def test_urbansound8k(tmp_path):
    root = tmp_path / "UrbanSound8K"
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    rows = [
        ["100032-3-0-0.wav", 100032, 0.0, 0.317551, 1, 5, 1, "dog_bark"],
        ["100263-2-0-117.wav", 100263, 58.5, 62.5, 1, 5, 0, "children_playing"],
        ["100648-1-0-0.wav", 100648, 4.5, 6.5, 2, 10, 1, "dog_bark"],
    ]
    write_csv(root / "metadata" / "UrbanSound8K.csv", header, rows)
    for row in rows:
        wav(root / "audio" / f"fold{row[5]}" / str(row[0]))
    assert detect_format(root, "audio") == "urbansound8k"
    assert detect_format(root / "metadata" / "UrbanSound8K.csv", "audio") == "urbansound8k"
    spec = InputSpec(modality="audio", path=root, folds=[5], templates=["{label}"])
    found = list(read_items(spec))
    assert [i.source for i in found] == [
        str(root / "audio" / "fold5" / "100032-3-0-0.wav"),
        str(root / "audio" / "fold5" / "100263-2-0-117.wav"),
    ]
    assert [i.captions for i in found] == [["dog bark"], ["children playing"]]
    assert found[0].meta == {
        "fold": 5,
        "classID": 1,
        "fsID": "100032",
        "start": "0.0",
        "end": "0.317551",
        "salience": "1",
        "label_index": 1,
    }
    assert class_names(spec) == ["children_playing", "dog_bark"]


# --- WebDataset / img2dataset shards ---------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def img2dataset_shard(path: Path, first_key: int, count: int) -> dict[str, bytes]:
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json per sample. Returns jpg bytes by key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = {}
    with tarfile.open(path, "w") as tar:
        for key in (f"{i:09d}" for i in range(first_key, first_key + count)):
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), (int(key) % 255, 0, 0)).save(buffer, format="JPEG")
            images[key] = buffer.getvalue()
            meta = {
                "url": f"http://example.org/{key}.jpg",
                "caption": f"json caption {key}",
                "key": key,
                "status": "success",
                "width": 4,
                "height": 4,
            }
            add_member(tar, f"{key}.jpg", images[key])
            add_member(tar, f"{key}.txt", f"caption {key}".encode())
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
    return images


def test_webdataset_single_tar_folder_and_brace_pattern(tmp_path):
    shards = tmp_path / "cc3m"
    first = img2dataset_shard(shards / "00000.tar", 0, 2)
    second = img2dataset_shard(shards / "00001.tar", 10000, 1)
    (shards / "00000.parquet").write_bytes(b"not read")
    for path, expected in [
        (shards / "00000.tar", 2),
        (shards, 3),
        (Path(f"{shards}/{{00000..00001}}.tar"), 3),
    ]:
        assert detect_format(path, "image") == "webdataset"
        assert len(items(path)) == expected
    found = items(shards)
    assert [i.source for i in found] == [
        f"{shards / '00000.tar'}#000000000.jpg",
        f"{shards / '00000.tar'}#000000001.jpg",
        f"{shards / '00001.tar'}#000010000.jpg",
    ]
    assert found[0].captions == ["caption 000000000"]
    assert found[0].meta["url"] == "http://example.org/000000000.jpg" and found[0].meta["status"] == "success"
    options = FetchOptions()
    assert [fetch_bytes(i.source, options) for i in found] == [*first.values(), *second.values()]


def test_webdataset_grouping_labels_and_bad_samples(tmp_path):
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "__meta__", b"{}")
        add_member(tar, "a/s1.seg.png", b"png bytes")
        add_member(tar, "a/s1.cls", b"7\n")
        add_member(tar, "a/s1.json", json.dumps({"text": "from json"}).encode())
        add_member(tar, "a/s2.txt", b"caption without image")
        add_member(tar, "s3.jpg", b"jpeg bytes")
        add_member(tar, "s3.txt", b"  \n")
        add_member(tar, "s4.wav", b"audio bytes")
        add_member(tar, "s4.txt", b"\xffbad bytes")
        add_member(tar, "noextension", b"ignored")
    found = items(shard)
    assert [i.source for i in found] == [
        f"{shard}#a/s1.seg.png",
        f"{shard}#a/s2",
        f"{shard}#s3.jpg",
        f"{shard}#s4",
    ]
    assert found[0].captions == ["from json"] and found[0].label == "7"
    assert reasons(found) == [None, "missing_file", "empty_caption", "missing_file"]
    audio = items(shard, "audio")
    assert audio[-1].source == f"{shard}#s4.wav" and audio[-1].captions == ["\udcffbad bytes"]


def test_webdataset_truncated_tar_keeps_what_it_holds(tmp_path):
    shard = tmp_path / "00000.tar"
    img2dataset_shard(shard, 0, 3)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    found = items(shard)  # cut inside the last sample's .json: its image and caption are still whole
    assert reasons(found) == [None, None, None, "decode_error"]
    assert found[2].captions == ["caption 000000002"] and found[2].meta == {}
    with pytest.raises(UsageError, match="no such shard"):
        items(Path(f"{tmp_path}/{{00000..00002}}.tar"))


# --- format detection ------------------------------------------------------------------------------


def test_detection_failures_name_the_path_and_the_formats(tmp_path):
    odd = tmp_path / "data.xml"
    odd.write_text("<x/>")
    with pytest.raises(UsageError) as err:
        detect_format(odd, "image")
    assert str(odd) in str(err.value) and "--format" in str(err.value) and "class-folder" in str(err.value)
    with pytest.raises(UsageError, match="does not exist"):
        detect_format(tmp_path / "missing", "image")
    not_coco = tmp_path / "list.json"
    not_coco.write_text(json.dumps([{"url": "a.png"}]))
    with pytest.raises(UsageError, match=".jsonl"):
        detect_format(not_coco, "image")
    bare = tmp_path / "bare"
    png(bare / "a.png")
    with pytest.raises(UsageError, match="without caption files"):
        detect_format(bare, "image")
    with pytest.raises(UsageError, match="no audio files"):
        detect_format(bare, "audio")
