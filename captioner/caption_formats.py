"""Caption datasets in their released layouts -> samples (an image and its references).

Formats, and where each fact about them comes from
--------------------------------------------------
llava   LLaVA / ShareGPT4V conversation JSON: a list of items {"id", "image", "conversations":
        [{"from": "human"|"gpt", "value"}, ...]}, the first human turn holding "<image>"
        (haotian-liu/LLaVA docs/Finetune_Custom_Data.md). Items without "image" are
        text-only conversations (ShareGPT4V's LazySupervisedDataset branches on
        `'image' in sources[0]` and feeds them a blank image, InternLM/InternLM-XComposer
        projects/ShareGPT4V/share4v/train/train.py). "image" is relative to the trainer's
        --image_folder, which is joined in front of it (same train.py); ShareGPT4V's paths look
        like "coco/train2017/000000000009.jpg" and its scripts pass `--image_folder data` while
        the JSON files live in data/sharegpt4v/ (projects/ShareGPT4V/docs/Data.md and
        scripts/sharegpt4v/slurm_pretrain_7b.sh), so for ShareGPT4V set image_root to that
        `data` folder: the default (the JSON's own folder) is wrong for it. The caption is the
        first "gpt" turn ("assistant" is accepted too, for converted files). A ".jsonl" file
        holds one item per line. Other keys of an item go to `extra`; a "split" key is
        honoured when `DataSource.split` is set (items without one are kept).
coco    (a) The official captions file (captions_train2017.json): {"info", "licenses",
        "images": [{"id", "file_name", "coco_url", "height", "width", ...}], "annotations":
        [{"image_id", "id", "caption"}]}, about five annotations per image (printed in
        karpathy/neuraltalk2 coco/coco_preprocess.ipynb, which also groups them by image_id
        as done here). Image path: image_root / file_name. It has no splits.
        (b) Karpathy's split file dataset_coco.json: {"dataset", "images": [{"filepath",
        "filename", "imgid", "cocoid", "split", "sentids", "sentences": [{"raw", "tokens",
        "imgid", "sentid"}]}]} (Delphboy/coco-captions-extended coco.py; the keys read by
        ruotianluo/ImageCaptioning.pytorch scripts/prepro_labels.py, which also builds the
        image path as images_root / filepath / filename). Splits: train, restval, val, test.
        The caption is "raw" (" ".join(tokens) when it is missing). Detected by the
        "annotations" key: present means (a). An image entry without "filepath" or "cocoid"
        loads too (path image_root / filename, id from the path).
dci     Meta's Densely Captioned Images, facebookresearch/DCI: one JSON per image with
        "image" (file name relative to the photos folder), "short_caption", "extra_caption",
        "mask_data" {key: {"label", "caption", "mask_quality", "bounds", "outer_mask"
        (base64), ...}}, "mask_keys", and in the released "complete" files also "summaries"
        and "negatives" (README.md "Data > Full"; dataset/densely_captioned_images/dataset/
        dense_image.py). The dataset's loader reads <data>/densely_captioned_images/complete/
        *.json and opens images from <data>/densely_captioned_images/photos/ (dataset/
        config.py: DATASET_COMPLETE_PATH, DATASET_PHOTO_PATH; an "annotations" folder sits
        there too); the images are SA-1B's sa_000138.tar, extracted into photos/ (README.md).
        So image_root defaults to a "photos" folder beside the annotations folder when there
        is one, else the annotations folder itself. The sample id is the JSON's file name
        without ".json" (the dataset's own entry key).
        Caption choice: short_caption + "\\n" + extra_caption, the dataset's own "extended
        caption" (dense_image.py get_extended_caption). Why: it is the human-written
        description of the whole image (the standard caption, then layout, relations and
        regions no submask covers): the detailed whole-image caption DCI is wanted for. The
        "summaries" are LLaMA-2 rewrites capped at CLIP's 77 tokens (reproduction/
        crowdsourcing/prepare/collate_data.py ensure_size), losing the detail DCI is used
        for, and exist only in the "complete" files; the full description with every mask
        caption appended (get_formatted_complete_description) averages over a thousand words
        (the DCI paper's abstract, arXiv 2312.08578), far past any caption budget of
        OPT-125M. The base summaries are kept in extra["summaries"] and the short caption in
        extra["short_caption"] for callers that want them; mask data is not carried (large
        base64 masks).
folder  Any folder, searched recursively, of images (.jpg .jpeg .png .webp .bmp) each with a
        same-named .txt beside it (photo.jpg + photo.txt). The whole stripped text of the .txt
        is ONE caption: blank lines are not taken as separators, because long detailed
        captions have paragraphs of their own. An image without its .txt is skipped with the
        reason; a .txt without an image is ignored. The sample id is the image's path
        relative to the folder.

Ids: the item's own id where the data has one (llava "id", coco image id / cocoid, DCI entry
key), else derived from the image path. Within one source a repeated id gets "#2", "#3", ...
in file order; across sources `load_caption_sources` prefixes a colliding id with the index of
its source ("1:000000000009"), the first source to use an id keeping it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.caption_records import (
    _ASSISTANT_ROLES,
    _LLAVA_OWN_KEYS,
    EMPTY_CAPTION,
    IMAGE_EXTENSIONS,
    NO_IMAGE_FIELD,
    CaptionSample,
    DataSource,
    Entry,
    SkippedItem,
)
from captioner.errors import DatasetError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- file helpers


def _file_text(path: Path) -> tuple[str, str | None]:
    """The text of `path`, or ("", why it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return "", "file not found"
    except IsADirectoryError:
        return "", "is a folder, expected a file"
    except UnicodeDecodeError as exc:
        return "", f"not UTF-8 text: {exc}"
    except OSError as exc:
        return "", f"unreadable: {exc.strerror or exc}"


def _json_problem(path: Path) -> tuple[Any, str | None]:
    """The parsed JSON of `path`, or (None, why it cannot be read)."""
    text, problem = _file_text(path)
    if problem is not None:
        return None, problem
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"


def _read_json(path: Path) -> Any:
    data, problem = _json_problem(path)
    if problem is not None:
        raise DatasetError(f"{path}: {problem}")
    return data


@dataclass(frozen=True)
class _BadLine:
    message: str


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(label, item) per non-blank line; an unparsable line's item is a _BadLine. A file
    where no line parses is not JSON Lines at all: DatasetError."""
    text, problem = _file_text(path)
    if problem is not None:
        raise DatasetError(f"{path}: {problem}")
    items: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            items.append((f"line {number}", _BadLine(f"column {exc.colno}: {exc.msg}")))
    if items and all(isinstance(item, _BadLine) for _, item in items):
        raise DatasetError(f"{path}: not JSON Lines: no line is a JSON value")
    return items


def _root(source: DataSource, default: Path) -> Path:
    return Path(source.image_root).expanduser() if source.image_root else default


def _abs(root: Path, relative: str) -> str:
    return os.path.abspath(os.path.join(root, os.path.expanduser(relative)))


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _type(value: Any) -> str:
    return type(value).__name__


# ------------------------------------------------------------------------------- llava


def _parse_llava(source: DataSource, path: Path) -> list[Entry]:
    if path.suffix.lower() == ".jsonl":
        labelled = _read_jsonl(path)
    else:
        data = _read_json(path)
        if not isinstance(data, list):
            raise DatasetError(
                f"{path}: expected a JSON list of conversation items, got {_type(data)}"
            )
        labelled = [(f"item {i}", item) for i, item in enumerate(data)]
    root = _root(source, path.parent)
    entries = [_llava_entry(item, label, root, str(path), source.split) for label, item in labelled]
    return [e for e in entries if e is not None]


def _llava_entry(
    item: Any, label: str, root: Path, src: str, want_split: str | None
) -> Entry | None:
    """One item as a sample or a skip; None when the split filter leaves it out."""
    if isinstance(item, _BadLine):
        return SkippedItem(src, label, f"malformed JSON: {item.message}")
    if not isinstance(item, dict):
        return SkippedItem(src, label, f"not an object: got {_type(item)}")
    has_id = item.get("id") not in (None, "")
    label = str(item["id"]) if has_id else label
    split = None if item.get("split") is None else str(item["split"])
    if want_split is not None and split is not None and split != want_split:
        return None
    image = item.get("image")
    if image is None:
        return SkippedItem(src, label, NO_IMAGE_FIELD)
    if not isinstance(image, str) or not image.strip():
        return SkippedItem(src, label, f"bad image field: expected one path, got {image!r:.80}")
    caption, problem = _first_assistant_turn(item.get("conversations"))
    if problem is not None:
        return SkippedItem(src, label, problem)
    extra = {k: v for k, v in item.items() if k not in _LLAVA_OWN_KEYS}
    sample_id = label if has_id else image
    return CaptionSample(sample_id, _abs(root, image), (caption,), src, split, extra)


def _first_assistant_turn(conversations: Any) -> tuple[str, str | None]:
    """The first gpt turn's text, or ("", why there is none)."""
    if not isinstance(conversations, list):
        return "", f"no conversations: got {_type(conversations)}"
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in _ASSISTANT_ROLES:
            text = _text(turn.get("value"))
            return (text, None) if text else ("", f"{EMPTY_CAPTION}: first gpt turn")
    return "", "no gpt turn"


# -------------------------------------------------------------------------------- coco


def _parse_coco(source: DataSource, path: Path) -> list[Entry]:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else _type(data)
        raise DatasetError(
            f"{path}: expected a COCO captions file (an object with an 'images' list), got {got}"
        )
    root = _root(source, path.parent)
    if "annotations" in data:
        if source.split is not None:
            raise ValueError(
                f"split: {path} is an official COCO captions file, which has no splits; set "
                f"split to null (got {source.split!r}) or use Karpathy's dataset_coco.json"
            )
        return _coco_official(data, root, path)
    return _coco_karpathy(data, root, str(path), source.split)


def _coco_official(data: dict[str, Any], root: Path, path: Path) -> list[Entry]:
    src = str(path)
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise DatasetError(f"{path}: 'annotations' must be a list, got {_type(annotations)}")
    entries: list[Entry] = []
    by_image: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int | str):
            entries.append(SkippedItem(src, f"annotation {i}", "bad annotation: no image_id"))
            continue
        by_image.setdefault(ann["image_id"], []).append(_text(ann.get("caption")))
    known: set[Any] = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int | str):
            entries.append(SkippedItem(src, f"image {i}", "bad image entry: no id"))
            continue
        known.add(image["id"])
        entries.append(_coco_official_entry(image, by_image.get(image["id"], []), root, src))
    for image_id, captions in by_image.items():
        if image_id not in known:
            reason = f"unknown image id: {len(captions)} caption(s) for an id not in 'images'"
            entries.append(SkippedItem(src, str(image_id), reason))
    return entries


def _coco_official_entry(image: dict[str, Any], captions: list[str], root: Path, src: str) -> Entry:
    image_id = str(image["id"])
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return SkippedItem(src, image_id, "bad image entry: no file_name")
    kept = tuple(c for c in captions if c)
    if not kept:
        return SkippedItem(src, image_id, EMPTY_CAPTION if captions else "no captions")
    return CaptionSample(image_id, _abs(root, file_name), kept, src)


def _coco_karpathy(
    data: dict[str, Any], root: Path, src: str, want_split: str | None
) -> list[Entry]:
    entries: list[Entry] = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            entries.append(SkippedItem(src, f"image {i}", f"bad image entry: got {_type(image)}"))
            continue
        split = image.get("split")
        if want_split is not None and split != want_split:
            continue
        entries.append(_karpathy_entry(image, i, root, src))
    return entries


def _karpathy_entry(image: dict[str, Any], index: int, root: Path, src: str) -> Entry:
    filename = image.get("filename")
    label = str(image["cocoid"]) if image.get("cocoid") is not None else f"image {index}"
    if not isinstance(filename, str) or not filename:
        return SkippedItem(src, label, "bad image entry: no filename")
    relative = os.path.join(_text(image.get("filepath")), filename)
    sentences = image.get("sentences")
    sentences = sentences if isinstance(sentences, list) else []
    captions = tuple(c for c in map(_sentence_text, sentences) if c)
    if not captions:
        return SkippedItem(src, label, EMPTY_CAPTION if sentences else "no captions")
    sample_id = label if image.get("cocoid") is not None else relative
    split = None if image.get("split") is None else str(image["split"])
    return CaptionSample(sample_id, _abs(root, relative), captions, src, split)


def _sentence_text(sentence: Any) -> str:
    if not isinstance(sentence, dict):
        return ""
    raw = _text(sentence.get("raw"))
    tokens = sentence.get("tokens")
    if not raw and isinstance(tokens, list):
        raw = " ".join(str(t) for t in tokens).strip()
    return raw


# --------------------------------------------------------------------------------- dci


def _parse_dci(source: DataSource, path: Path) -> list[Entry]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.is_file())
        if not files:
            raise DatasetError(f"{path}: no DCI annotation files (*.json) in this folder")
        folder = path
    elif path.exists():
        files, folder = [path], path.parent
    else:
        raise DatasetError(f"{path}: not found (expected a DCI annotations folder or file)")
    photos = folder.parent / "photos"
    root = _root(source, photos if photos.is_dir() else folder)
    return [_dci_entry(f, root, single=files == [path]) for f in files]


def _dci_entry(path: Path, root: Path, single: bool) -> Entry:
    """One annotation file as a sample; in a folder a bad file is skipped, alone it raises."""
    src, label = str(path), path.stem
    data, problem = _json_problem(path)
    if problem is None and not isinstance(data, dict):
        problem = f"expected a DCI annotation object, got {_type(data)}"
    if problem is not None:
        if single:
            raise DatasetError(f"{path}: {problem}")
        return SkippedItem(src, label, f"bad annotation file: {problem}")
    image = data.get("image")
    if not isinstance(image, str) or not image.strip():
        return SkippedItem(src, label, "no image field")
    short, extra_caption = _text(data.get("short_caption")), _text(data.get("extra_caption"))
    caption = "\n".join(t for t in (short, extra_caption) if t)
    if not caption:
        return SkippedItem(src, label, f"{EMPTY_CAPTION}: no short_caption or extra_caption")
    extra: dict[str, Any] = {"short_caption": short}
    summaries = _dci_base_summaries(data.get("summaries"))
    if summaries:
        extra["summaries"] = summaries
    return CaptionSample(label, _abs(root, image), (caption,), src, None, extra)


def _dci_base_summaries(summaries: Any) -> list[str]:
    """The whole-image ("base") summaries: a list in DCI's README, a plain string as
    collate_data.py writes them; both are read."""
    base = summaries.get("base") if isinstance(summaries, dict) else None
    items = [base] if isinstance(base, str) else base if isinstance(base, list) else []
    return [t for t in map(_text, items) if t]


# ------------------------------------------------------------------------------ folder


def _parse_folder(source: DataSource, path: Path) -> list[Entry]:
    if not path.is_dir():
        reason = "not a folder" if path.exists() else "folder not found"
        raise DatasetError(f"{path}: {reason} (the folder format needs a folder of images)")
    images = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p.relative_to(path)) and p.is_file()
    )
    return [_folder_entry(image, path) for image in images]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _folder_entry(image: Path, folder: Path) -> Entry:
    label = image.relative_to(folder).as_posix()
    caption_file = image.with_suffix(".txt")
    if not caption_file.is_file():
        return SkippedItem(str(image), label, f"no caption file: {caption_file}")
    try:
        caption = caption_file.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return SkippedItem(str(caption_file), label, f"caption unreadable: {exc}")
    if not caption:
        return SkippedItem(str(caption_file), label, f"{EMPTY_CAPTION}: {caption_file}")
    return CaptionSample(label, os.path.abspath(image), (caption,), str(caption_file))


PARSERS: dict[str, Callable[[DataSource, Path], list[Entry]]] = {
    "llava": _parse_llava,
    "coco": _parse_coco,
    "dci": _parse_dci,
    "folder": _parse_folder,
}


