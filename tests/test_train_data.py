"""Caption training data: every format read from real files in its released layout (built here
with PIL and json), bad items skipped with their reasons, whole-source errors, and the torch
Dataset through a real DataLoader worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from captioner.train_data import (
    CaptionSample,
    DataSource,
    ImageCaptionDataset,
    drop_failed,
    load_caption_source,
    load_caption_sources,
)
from pipeline.errors import DatasetError


def _image(path: Path, size: tuple[int, int] = (24, 32), seed: int = 0) -> Path:
    """A real image file (PNG or JPEG by suffix) of `size` = (height, width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _conv(caption: str, question: str = "<image>\nDescribe this image in detail.") -> list:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]


def _by_id(loaded) -> dict[str, CaptionSample]:
    return {s.id: s for s in loaded.samples}


def _reasons(loaded) -> dict[str, str]:
    return {s.item: s.reason for s in loaded.skipped}


# ------------------------------------------------------------------------------- llava


@pytest.fixture
def sharegpt4v(tmp_path: Path) -> Path:
    """ShareGPT4V's layout: data/sharegpt4v/<file>.json, image paths relative to data/."""
    data = tmp_path / "data"
    _image(data / "coco/train2017/000000000009.jpg")
    _image(data / "sam/images/sa_1.jpg", size=(20, 20), seed=1)
    _truncate(_image(data / "coco/train2017/000000000025.png", seed=2))
    _image(data / "coco/train2017/000000000030.jpg", seed=3)
    items = [
        {
            "id": "000000000009",
            "image": "coco/train2017/000000000009.jpg",
            "conversations": _conv("  A plate of food on a table.  ")
            + [{"from": "human", "value": "And?"}, {"from": "gpt", "value": "Later turn."}],
        },
        {"id": "text-only", "conversations": _conv("No image here.", "Hello")},
        {
            "id": "sa_1",
            "image": "sam/images/sa_1.jpg",
            "conversations": _conv("A street at night."),
            "slots": {"colour": "red", "count": 3},
        },
        {"id": "missing", "image": "coco/train2017/nope.jpg", "conversations": _conv("x")},
        {"id": "corrupt", "image": "coco/train2017/000000000025.png", "conversations": _conv("y")},
        {"id": "blank", "image": "coco/train2017/000000000030.jpg", "conversations": _conv(" ")},
        {
            "id": "no-gpt",
            "image": "coco/train2017/000000000030.jpg",
            "conversations": [{"from": "human", "value": "<image>"}],
        },
    ]
    return _write_json(data / "sharegpt4v" / "sharegpt4v_cap.json", items)


def test_llava_items_load_with_first_gpt_turn_and_extra_fields(sharegpt4v: Path):
    root = sharegpt4v.parent.parent
    loaded = load_caption_source(DataSource("llava", str(sharegpt4v), image_root=str(root)))
    samples = _by_id(loaded)
    assert list(samples) == ["000000000009", "sa_1"]
    first = samples["000000000009"]
    assert first.captions == ("A plate of food on a table.",)
    assert first.image == str(root / "coco/train2017/000000000009.jpg")
    assert first.source == str(sharegpt4v)
    assert first.extra == {}
    assert samples["sa_1"].extra == {"slots": {"colour": "red", "count": 3}}


def test_llava_bad_items_are_skipped_with_their_reasons(sharegpt4v: Path):
    root = sharegpt4v.parent.parent
    loaded = load_caption_source(DataSource("llava", str(sharegpt4v), image_root=str(root)))
    reasons = _reasons(loaded)
    assert reasons["text-only"] == "no image field (text-only conversation)"
    assert reasons["missing"] == f"image not found: {root / 'coco/train2017/nope.jpg'}"
    assert reasons["corrupt"].startswith("image unreadable: ")
    assert "000000000025.png" in reasons["corrupt"]
    assert reasons["blank"].startswith("empty caption")
    assert reasons["no-gpt"] == "no gpt turn"
    assert len(loaded.skipped) == 5


def test_llava_image_root_defaults_to_the_files_own_folder(sharegpt4v: Path):
    # ShareGPT4V's paths are relative to data/, not data/sharegpt4v/: nothing is found.
    loaded = load_caption_source(DataSource("llava", str(sharegpt4v)))
    assert loaded.samples == []
    missing = [s.reason for s in loaded.skipped if s.reason.startswith("image not found")]
    assert str(sharegpt4v.parent / "coco/train2017/000000000009.jpg") in missing[0]


def test_llava_jsonl_one_item_per_line_and_split_key(tmp_path: Path):
    _image(tmp_path / "img/a.png")
    _image(tmp_path / "img/b.png", seed=1)
    lines = [
        json.dumps(
            {"id": "a", "image": "img/a.png", "conversations": _conv("A."), "split": "train"}
        ),
        "",
        json.dumps({"id": "b", "image": "img/b.png", "conversations": _conv("B."), "split": "val"}),
        "{not json",
        json.dumps({"image": "img/b.png", "conversations": _conv("No id, no split.")}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")

    everything = load_caption_source(DataSource("llava", str(path)))
    assert [s.id for s in everything.samples] == ["a", "b", "img/b.png"]
    assert [s.split for s in everything.samples] == ["train", "val", None]
    assert _reasons(everything)["line 4"].startswith("malformed JSON: ")

    train = load_caption_source(DataSource("llava", str(path), split="train"))
    assert [s.id for s in train.samples] == ["a", "img/b.png"]  # items without a split stay


def test_jsonl_where_no_line_parses_is_a_dataset_error(tmp_path: Path):
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([{"id": "a"}], indent=2))
    with pytest.raises(DatasetError, match="pretty.jsonl: not JSON Lines"):
        load_caption_source(DataSource("llava", str(path)))


def test_repeated_ids_within_a_source_get_numbered(tmp_path: Path):
    _image(tmp_path / "a.png")
    items = [{"id": "x", "image": "a.png", "conversations": _conv(c)} for c in ("1", "2", "3")]
    loaded = load_caption_source(DataSource("llava", str(_write_json(tmp_path / "d.json", items))))
    assert [s.id for s in loaded.samples] == ["x", "x#2", "x#3"]
    assert [s.captions[0] for s in loaded.samples] == ["1", "2", "3"]


# -------------------------------------------------------------------------------- coco


def test_coco_official_captions_are_grouped_per_image(tmp_path: Path):
    images = tmp_path / "coco" / "train2017"
    _image(images / "000000000009.jpg")
    _image(images / "000000000025.jpg", seed=1)
    _image(images / "000000000030.jpg", seed=2)
    data = {
        "info": {"description": "COCO 2017 Dataset"},
        "licenses": [],
        "images": [
            {"license": 3, "file_name": "000000000009.jpg", "height": 24, "width": 32, "id": 9},
            {"license": 3, "file_name": "000000000025.jpg", "height": 24, "width": 32, "id": 25},
            {"license": 3, "file_name": "000000000030.jpg", "height": 24, "width": 32, "id": 30},
        ],
        "annotations": [
            {"image_id": 9, "id": 1, "caption": "A plate of food. "},
            {"image_id": 25, "id": 2, "caption": "A giraffe eating."},
            {"image_id": 9, "id": 3, "caption": "Broccoli and meat on a plate."},
            {"image_id": 30, "id": 4, "caption": "   "},
            {"image_id": 9, "id": 5, "caption": ""},
            {"image_id": 77, "id": 6, "caption": "An image that is not listed."},
        ],
    }
    path = _write_json(tmp_path / "coco/annotations/captions_train2017.json", data)
    loaded = load_caption_source(DataSource("coco", str(path), image_root=str(images)))
    samples = _by_id(loaded)
    assert samples["9"].captions == ("A plate of food.", "Broccoli and meat on a plate.")
    assert samples["9"].image == str(images / "000000000009.jpg")
    assert samples["25"].captions == ("A giraffe eating.",)
    assert samples["9"].split is None
    reasons = _reasons(loaded)
    assert reasons["30"] == "empty caption"
    assert reasons["77"].startswith("unknown image id")


def test_coco_official_file_with_a_split_is_an_error_naming_split(tmp_path: Path):
    path = _write_json(tmp_path / "captions.json", {"images": [], "annotations": []})
    with pytest.raises(ValueError, match="split: .*captions.json.* no splits"):
        load_caption_source(DataSource("coco", str(path), split="train"))


@pytest.fixture
def karpathy(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    _image(root / "train2014/COCO_train2014_000000000009.jpg")
    _image(root / "val2014/COCO_val2014_000000000042.jpg", seed=1)
    _image(root / "val2014/COCO_val2014_000000000073.jpg", seed=2)
    _image(root / "val2014/COCO_val2014_000000000074.jpg", seed=3)

    def entry(filepath, filename, cocoid, split, raws):
        sentences = [{"tokens": r.lower().strip(".").split(), "raw": r, "imgid": 0} for r in raws]
        return {
            "filepath": filepath,
            "filename": filename,
            "imgid": cocoid,
            "cocoid": cocoid,
            "split": split,
            "sentids": list(range(len(raws))),
            "sentences": sentences,
        }

    images = [
        entry("train2014", "COCO_train2014_000000000009.jpg", 9, "train", ["A plate.", "Food."]),
        entry("val2014", "COCO_val2014_000000000042.jpg", 42, "restval", ["A dog.", "A pup."]),
        entry("val2014", "COCO_val2014_000000000073.jpg", 73, "test", ["A bike."]),
        entry("val2014", "COCO_val2014_000000000074.jpg", 74, "train", [""]),
    ]
    images[2]["sentences"].append({"tokens": ["a", "red", "bike"], "imgid": 73})  # no "raw"
    return _write_json(root / "dataset_coco.json", {"dataset": "coco", "images": images})


def test_karpathy_split_file_paths_ids_and_all_references(karpathy: Path):
    root = karpathy.parent
    loaded = load_caption_source(DataSource("coco", str(karpathy)))  # root: the file's folder
    samples = _by_id(loaded)
    assert list(samples) == ["9", "42", "73"]
    assert samples["9"].image == str(root / "train2014/COCO_train2014_000000000009.jpg")
    assert samples["9"].captions == ("A plate.", "Food.")
    assert samples["73"].captions == ("A bike.", "a red bike")
    assert [s.split for s in loaded.samples] == ["train", "restval", "test"]
    assert _reasons(loaded)["74"] == "empty caption"


def test_karpathy_split_filter(karpathy: Path):
    train = load_caption_source(DataSource("coco", str(karpathy), split="train"))
    assert [s.id for s in train.samples] == ["9"]
    assert [s.item for s in train.skipped] == ["74"]  # other splits are filtered, not skipped
    restval = load_caption_source(DataSource("coco", str(karpathy), split="restval"))
    assert [s.id for s in restval.samples] == ["42"]


# --------------------------------------------------------------------------------- dci


def _dci_annotation(image: str, short: str, extra: str, summaries: Any = None) -> dict:
    mask = {
        "idx": 0,
        "outer_mask": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+"
        "kcQAAAABJRU5ErkJggg==",  # base64 PNG, as in the release
        "mask_quality": 0,
        "label": "a tree",
        "caption": "A tall green tree on the left.",
        "parent": -1,
        "requirements": [],
        "bounds": {"topLeft": {"x": 0, "y": 0}, "bottomRight": {"x": 10, "y": 12}},
        "area": 120,
    }
    data = {
        "image": image,
        "short_caption": short,
        "extra_caption": extra,
        "mask_data": {"0": mask},
        "mask_keys": ["0"],
    }
    if summaries is not None:
        data["summaries"] = summaries
        data["negatives"] = {"base": {"swaps": ["a wrong caption"], "layout": [], "basic": []}}
    return data


@pytest.fixture
def dci(tmp_path: Path) -> Path:
    """DCI's layout: densely_captioned_images/{complete,photos}/ (dataset/config.py)."""
    base = tmp_path / "densely_captioned_images"
    _image(base / "photos/sa_1543301.jpg", size=(30, 40))
    _image(base / "photos/sa_1543302.jpg", seed=1)
    complete = base / "complete"
    _write_json(
        complete / "sa_1543301.json",
        _dci_annotation(
            "sa_1543301.jpg",
            "A water pump in front of old buildings.",
            "The pump is rusty. Three buildings stand behind it.",
            {"base": ["A rusty water pump before three buildings."], "0": ["A tree."]},
        ),
    )
    _write_json(complete / "sa_1543302.json", _dci_annotation("sa_1543302.jpg", "", ""))
    _write_json(complete / "sa_1543303.json", _dci_annotation("sa_1543303.jpg", "Gone.", ""))
    (complete / "sa_1543304.json").write_text("{truncated")
    (complete / "notes.txt").write_text("not an annotation")
    return complete


def test_dci_folder_uses_extended_caption_and_photos_folder(dci: Path):
    loaded = load_caption_source(DataSource("dci", str(dci)))
    assert [s.id for s in loaded.samples] == ["sa_1543301"]
    sample = loaded.samples[0]
    assert sample.captions == (
        "A water pump in front of old buildings.\n"
        "The pump is rusty. Three buildings stand behind it.",
    )
    assert sample.image == str(dci.parent / "photos" / "sa_1543301.jpg")
    assert sample.source == str(dci / "sa_1543301.json")
    assert sample.extra == {
        "short_caption": "A water pump in front of old buildings.",
        "summaries": ["A rusty water pump before three buildings."],
    }
    reasons = _reasons(loaded)
    assert reasons["sa_1543302"].startswith("empty caption")
    assert reasons["sa_1543303"].startswith("image not found")
    assert reasons["sa_1543304"].startswith("bad annotation file: malformed JSON")


def test_dci_single_file_and_its_errors(dci: Path, tmp_path: Path):
    one = load_caption_source(DataSource("dci", str(dci / "sa_1543301.json")))
    assert [s.id for s in one.samples] == ["sa_1543301"]
    with pytest.raises(DatasetError, match="sa_1543304.json: malformed JSON"):
        load_caption_source(DataSource("dci", str(dci / "sa_1543304.json")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no DCI annotation files"):
        load_caption_source(DataSource("dci", str(tmp_path / "empty")))


def test_dci_without_a_photos_folder_reads_images_beside_the_annotations(tmp_path: Path):
    _image(tmp_path / "ann/x.png")
    _write_json(tmp_path / "ann/x.json", _dci_annotation("x.png", "Short.", "Longer."))
    loaded = load_caption_source(DataSource("dci", str(tmp_path / "ann")))
    assert loaded.samples[0].image == str(tmp_path / "ann/x.png")
    assert loaded.samples[0].captions == ("Short.\nLonger.",)
    assert "summaries" not in loaded.samples[0].extra


# ------------------------------------------------------------------------------ folder


def test_folder_of_images_with_txt_captions(tmp_path: Path):
    root = tmp_path / "frames"
    _image(root / "a.jpg")
    (root / "a.txt").write_text("  A kitchen.\n\nA person cooks.\n")
    _image(root / "sub/b.png", seed=1)
    (root / "sub/b.txt").write_text("\ufeffA garden.")
    _image(root / "sub/no_caption.webp", seed=2)
    _image(root / "blank.bmp", seed=3)
    (root / "blank.txt").write_text("\n  \n")
    _truncate(_image(root / "broken.png", seed=4))
    (root / "broken.txt").write_text("Broken.")
    (root / "orphan.txt").write_text("A caption without an image.")
    _image(root / ".hidden/c.jpg")

    loaded = load_caption_source(DataSource("folder", str(root)))
    samples = _by_id(loaded)
    assert list(samples) == ["a.jpg", "sub/b.png"]
    assert samples["a.jpg"].captions == ("A kitchen.\n\nA person cooks.",)  # one caption
    assert samples["sub/b.png"].captions == ("A garden.",)
    assert samples["sub/b.png"].image == str(root / "sub/b.png")
    assert samples["sub/b.png"].source == str(root / "sub/b.txt")
    reasons = _reasons(loaded)
    assert reasons["sub/no_caption.webp"] == f"no caption file: {root / 'sub/no_caption.txt'}"
    assert reasons["blank.bmp"].startswith("empty caption")
    assert reasons["broken.png"].startswith("image unreadable")
    assert len(loaded.skipped) == 3


def test_verify_images_false_only_checks_existence(tmp_path: Path):
    _truncate(_image(tmp_path / "broken.png"))
    (tmp_path / "broken.txt").write_text("Broken.")
    (tmp_path / "gone.txt").write_text("Gone.")
    loaded = load_caption_source(DataSource("folder", str(tmp_path)), verify_images=False)
    assert [s.id for s in loaded.samples] == ["broken.png"]


# ------------------------------------------------------------------- errors and summary


@pytest.mark.parametrize(
    ("fmt", "name", "content", "message"),
    [
        ("llava", "missing.json", None, "missing.json: file not found"),
        ("llava", "bad.json", "[{oops", "bad.json: malformed JSON at line 1"),
        ("llava", "dict.json", {"items": []}, "dict.json: expected a JSON list"),
        ("coco", "missing.json", None, "missing.json: file not found"),
        ("coco", "bad.json", "", "bad.json: malformed JSON"),
        ("coco", "list.json", [1, 2], "list.json: expected a COCO captions file"),
        ("coco", "noimages.json", {"annotations": []}, "noimages.json: expected a COCO"),
        ("folder", "nowhere", None, "nowhere: folder not found"),
        ("dci", "nowhere", None, "nowhere: not found"),
    ],
)
def test_unusable_source_raises_dataset_error_naming_the_file(
    tmp_path: Path, fmt: str, name: str, content: Any, message: str
):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        _write_json(path, content)
    with pytest.raises(DatasetError, match=message) as info:
        load_caption_source(DataSource(fmt, str(path)))
    assert str(tmp_path) in str(info.value)


def test_folder_format_given_a_file_is_a_dataset_error(tmp_path: Path):
    path = _image(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="one.png: not a folder"):
        load_caption_source(DataSource("folder", str(path)))


def test_summary_counts_samples_captions_and_skips_by_kind(karpathy: Path, sharegpt4v: Path):
    coco = load_caption_source(DataSource("coco", str(karpathy)))
    assert coco.summary() == f"coco {karpathy}: 3 samples (6 captions), 1 skipped: 1 empty caption"
    llava = load_caption_source(
        DataSource("llava", str(sharegpt4v), image_root=str(sharegpt4v.parent.parent))
    )
    assert llava.summary() == (
        f"llava {sharegpt4v}: 2 samples (2 captions), 5 skipped: 1 empty caption, "
        "1 image not found, 1 image unreadable, 1 no gpt turn, "
        "1 no image field (text-only conversation)"
    )
    both = load_caption_sources(
        [DataSource("coco", str(karpathy)), DataSource("coco", str(karpathy), split="test")]
    )
    lines = both.summary().splitlines()
    assert lines[0] == "2 sources: 4 samples (8 captions), 1 skipped: 1 empty caption"
    assert lines[2] == f"  coco {karpathy}: 1 samples (2 captions), 0 skipped"


def test_sources_are_concatenated_and_colliding_ids_prefixed(karpathy: Path, tmp_path: Path):
    _image(tmp_path / "x.png")
    items = [{"id": "9", "image": "x.png", "conversations": _conv("Also nine.")}]
    llava = _write_json(tmp_path / "l.json", items)
    loaded = load_caption_sources(
        [DataSource("coco", str(karpathy)), DataSource("llava", str(llava))]
    )
    assert [s.id for s in loaded.samples] == ["9", "42", "73", "1:9"]
    assert loaded.samples[-1].captions == ("Also nine.",)
    assert len({s.id for s in loaded.samples}) == len(loaded.samples)


def test_limit_keeps_the_first_valid_samples(karpathy: Path):
    loaded = load_caption_source(DataSource("coco", str(karpathy), limit=2))
    assert [s.id for s in loaded.samples] == ["9", "42"]


def test_many_images_are_checked_in_order(tmp_path: Path):
    _image(tmp_path / "a.png", size=(4, 4))
    items = [
        {"id": str(i), "image": "a.png" if i % 7 else "gone.png", "conversations": _conv(f"{i}")}
        for i in range(1200)
    ]
    loaded = load_caption_source(DataSource("llava", str(_write_json(tmp_path / "d.json", items))))
    assert [s.id for s in loaded.samples] == [str(i) for i in range(1200) if i % 7]
    assert [s.item for s in loaded.skipped] == [str(i) for i in range(0, 1200, 7)]


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (DataSource("webdataset", "x"), "format"),
        (DataSource("llava", ""), "path"),
        (DataSource("llava", "x", image_root=""), "image_root"),
        (DataSource("llava", "x", limit=0), "limit"),
        (DataSource("llava", "x", limit=True), "limit"),
        (DataSource("coco", "x", split="training"), "split"),
        (DataSource("dci", "x", split="train"), "split"),
        (DataSource("folder", "x", split="val"), "split"),
    ],
)
def test_data_source_validate_names_the_field(source: DataSource, field: str):
    with pytest.raises(ValueError, match=f"^{field}: "):
        source.validate()


def test_data_source_validate_accepts_good_values():
    DataSource("coco", "x.json", split="restval", limit=10).validate()
    DataSource("llava", "x.json", split="anything").validate()
    DataSource("folder", "frames", image_root="ignored").validate()


def test_caption_sample_equality_ignores_extra():
    a = CaptionSample("1", "/x.png", ("A.",), "/d.json", extra={"slots": [1]})
    b = CaptionSample("1", "/x.png", ("A.",), "/d.json", extra={"slots": [2]})
    assert a == b and hash(a) == hash(b)


# ----------------------------------------------------------------------- torch dataset


def _collate(batch: list) -> dict:
    items = drop_failed(batch)
    return {
        "ids": [item["id"] for item in items],
        "images": [item["image"] for item in items],
        "captions": [item["caption"] for item in items],
        "index": [item["index"] for item in items],
    }


@pytest.fixture
def samples(tmp_path: Path) -> list[CaptionSample]:
    a = _image(tmp_path / "a.png", size=(24, 32))
    b = _image(tmp_path / "b.jpg", size=(16, 20), seed=1)
    Image.new("L", (9, 7), 128).save(tmp_path / "gray.png")
    return [
        CaptionSample("a", str(a), ("A one.", "A two.", "A three."), "s", extra={"k": 1}),
        CaptionSample("b", str(b), ("B one.",), "s"),
        CaptionSample("gray", str(tmp_path / "gray.png"), ("Gray.", "Grey."), "s"),
    ]


def test_expand_captions_gives_one_item_per_reference(samples):
    expanded = ImageCaptionDataset(samples, expand_captions=True)
    assert len(expanded) == 6
    assert [expanded[i]["caption"] for i in range(6)] == [
        "A one.", "A two.", "A three.", "B one.", "Gray.", "Grey.",
    ]  # fmt: skip
    first_only = ImageCaptionDataset(samples, expand_captions=False)
    assert len(first_only) == 3
    assert [first_only[i]["caption"] for i in range(3)] == ["A one.", "B one.", "Gray."]
    assert len(ImageCaptionDataset([])) == 0
    with pytest.raises(IndexError):
        first_only[3]


def test_items_are_rgb_uint8_arrays_with_transform(samples):
    dataset = ImageCaptionDataset(samples, transform=lambda image: image.shape[:2])
    item = dataset[4]
    assert item["id"] == "gray" and item["index"] == 4 and item["extra"] == {}
    assert item["image"].shape == (7, 9, 3) and item["image"].dtype == np.uint8
    assert (item["image"] == 128).all()
    assert item["pixel_values"] == (7, 9)
    assert dataset[0]["extra"] == {"k": 1}


def test_dataloader_worker_decodes_and_drops_images_corrupted_after_loading(samples, caplog):
    dataset = ImageCaptionDataset(samples, expand_captions=False)
    Path(samples[1].image).write_bytes(b"overwritten after loading")

    assert dataset[1] is None
    assert samples[1].image in caplog.text and "cannot identify image file" in caplog.text

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=_collate)
    (batch,) = list(loader)
    assert batch["ids"] == ["a", "gray"]
    assert batch["index"] == [0, 2]
    assert [image.shape for image in batch["images"]] == [(24, 32, 3), (7, 9, 3)]
    assert all(image.dtype == np.uint8 for image in batch["images"])
    assert batch["captions"] == ["A one.", "Gray."]


def test_truncated_jpeg_passes_the_header_check_but_not_decoding(tmp_path: Path):
    _truncate(_image(tmp_path / "t.jpg", size=(64, 64)))
    (tmp_path / "t.txt").write_text("Truncated.")
    loaded = load_caption_source(DataSource("folder", str(tmp_path)))
    assert [s.id for s in loaded.samples] == ["t.jpg"]  # verify() reads the header only
    assert ImageCaptionDataset(loaded.samples)[0] is None
