"""The caption-evaluation view: each image with its references, the coarse and refined
captions with refinement's edits marked, and per-image scores with their change.

    mmser report runs/captions-<data>-mmser-<time>         (rebuilds RUN/report.html)

`eval_captions_view` (called by `mmser eval-captions`) and `learn_view` (by `make
bench-learn`) write RUN/caption_view.json, then `build_caption_view` renders report.html
(report-2.html, ... at 200 images a page) with JPEG thumbnails under RUN/thumbs/. Rows sort
by any score's change (refined minus coarse) with a click on its header (this page's rows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.caption_diff import diff_html, word_diff
from pipeline.html_page import esc, filters, page
from pipeline.thumbnails import THUMB_WIDTH, safe_folder

VIEW_FILE = "caption_view.json"
PER_PAGE = 200


@dataclass
class CaptionItem:
    id: str
    image: str
    references: list[str]
    coarse: str | None
    refined: str | None
    scores: dict[str, float] = field(default_factory=dict)  # the refined caption's
    coarse_scores: dict[str, float] = field(default_factory=dict)  # same metrics, coarse
    error: str | None = None


def save_caption_view(folder: Path, title: str, items: Sequence[CaptionItem], note: str
                      ) -> list[Path]:
    data = {"title": title, "note": note, "items": [asdict(i) for i in items]}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / VIEW_FILE).write_text(json.dumps(data, ensure_ascii=False))
    return build_caption_view(folder)


def eval_captions_view(run_dir: Path, title: str, samples: Sequence[Any],
                       rows: Mapping[str, Any], failed: Mapping[str, str],
                       scores: Any, metrics: Any) -> list[Path]:
    """eval-captions' view; the coarse captions are scored with the run's own metrics so
    each image shows what refinement changed in its score."""
    from captioner.caption_metrics import score_captions

    refs = {s.id: list(s.captions) for s in samples}
    coarse = {i: r.coarse for i, r in rows.items() if r.coarse is not None}
    coarse_scores: dict[str, dict[str, float]] = {}
    note = "scores: the run's metrics; coarse captions scored with the same metrics"
    if coarse:
        try:
            coarse_scores = score_captions(coarse, {i: refs[i] for i in coarse}, metrics).per_item
        except Exception as exc:  # the view stands without the change in score
            note = f"the coarse captions could not be scored ({exc})"
    items = []
    for s in samples:
        row = rows.get(s.id)
        items.append(CaptionItem(
            id=s.id, image=s.image, references=refs[s.id],
            coarse=row.coarse if row else None, refined=row.prediction if row else None,
            scores=dict(scores.per_item.get(s.id, {})) if scores and row else {},
            coarse_scores=dict(coarse_scores.get(s.id, {})), error=failed.get(s.id)))
    known = {s.id for s in samples}
    items += [CaptionItem(id=key, image="", references=[], coarse=None, refined=None,
                          error=why) for key, why in failed.items() if key not in known]
    return save_caption_view(run_dir, title, items, note)


def learn_view(out: Path, world_root: Path, record: Mapping[str, Any], seed: int
               ) -> list[Path]:
    """bench-learn's view of one seed's MM-SeR on the learn world's test images (`record`:
    that seed's eval.json): exact match and slot accuracy against the one canonical
    caption, coarse and refined."""
    from captioner.train_data import DataSource, load_caption_source
    from pipeline.world import LEARN_WORLD, parse_caption

    spec = LEARN_WORLD
    test_samples = load_caption_source(DataSource("llava", str(Path(world_root) / "test.json"))
                                       ).samples

    def scored(text: str | None, truth: str) -> dict[str, float]:
        want, got = parse_caption(truth, spec) or {}, parse_caption(text or "", spec) or {}
        slots = sum(got.get(k) == v for k, v in want.items()) / max(len(want), 1)
        return {"exact": float(text == truth), "slot_accuracy": slots}

    items = [CaptionItem(id=s.id, image=s.image, references=[truth], coarse=coarse,
                         refined=refined, scores=scored(refined, truth),
                         coarse_scores=scored(coarse, truth))
             for s, truth, coarse, refined in zip(test_samples, record["truth"],
                                                  record["coarse"], record["refined"],
                                                  strict=True)]
    note = (f"seed {seed}'s tiny MM-SeR on the synthetic world: learnability of the "
            "mechanism, not caption quality on real images")
    return save_caption_view(out, f"bench-learn, seed {seed}", items, note)


# --- rendering --------------------------------------------------------------------------


def _thumb(folder: Path, item: dict[str, Any]) -> tuple[str | None, str | None]:
    """(relative thumbnail path, why there is none); made once, reused by rebuilds."""
    from PIL import Image

    rel = f"thumbs/{safe_folder(item['id'])}.jpg"
    target = folder / rel
    if target.exists():
        return rel, None
    try:
        with Image.open(item["image"]) as image:
            image = image.convert("RGB")
            height = max(1, round(image.height * THUMB_WIDTH / image.width))
            target.parent.mkdir(parents=True, exist_ok=True)
            image.resize((THUMB_WIDTH, height)).save(target, "JPEG", quality=80)
    except Exception as exc:  # an unreadable image is this row's reason
        return None, f"image unreadable: {exc}"
    return rel, None


def _score_cells(item: dict[str, Any], keys: list[str]) -> str:
    cells = []
    for key in keys:
        new, old = item["scores"].get(key), item["coarse_scores"].get(key)
        delta = new - old if new is not None and old is not None else None
        shown = "-" if new is None else f"{new:.3f}"
        if delta is not None:
            shown += f" ({delta:+.3f})"
        value = "" if delta is None else f"{delta:.6f}"
        cells.append(f'<td data-value="{value}">{esc(shown)}</td>')
    return "".join(cells)


def _row(folder: Path, item: dict[str, Any], keys: list[str]) -> str:
    rel, why = _thumb(folder, item) if item.get("image") else (None, "no image loaded")
    image = f'<img src="{esc(rel)}" alt="{esc(item["id"])}"/>' if rel else \
        f'<span class="reason">{esc(why)}</span>'
    refs = "".join(f"<li>{esc(r)}</li>" for r in item["references"])
    coarse, refined = item.get("coarse"), item.get("refined")
    changed = coarse is not None and refined is not None and word_diff(coarse, refined).changed
    if item.get("error"):
        text = f'<span class="reason">failed: {esc(item["error"])}</span>'
    elif coarse is not None and refined is not None:
        old, new = diff_html(coarse, refined)
        text = f'<div class="coarse">coarse: {old}</div><div class="refined">refined: {new}</div>'
    else:
        text = f'<div class="refined">{esc(refined or "")}</div>'
    classes = ["item"] + (["changed"] if changed else []) + (["failed"] if item.get("error")
                                                            else [])
    return (f'<tr class="{" ".join(classes)}"><td>{image}<br/>{esc(item["id"])}</td>'
            f"<td><ul>{refs}</ul></td><td>{text}</td>{_score_cells(item, keys)}</tr>")


def build_caption_view(folder: str | Path, per_page: int = PER_PAGE) -> list[Path]:
    folder = Path(folder)
    data = json.loads((folder / VIEW_FILE).read_text())
    items = data["items"]
    keys = sorted({k for i in items for k in i["scores"]})
    pages = [items[i:i + per_page] for i in range(0, len(items), per_page)] or [[]]
    names = ["report.html"] + [f"report-{i + 1}.html" for i in range(1, len(pages))]
    changed = sum(1 for i in items if i.get("coarse") is not None and i.get("refined")
                  is not None and word_diff(i["coarse"], i["refined"]).changed)
    failed = sum(1 for i in items if i.get("error"))
    head = "".join(f'<th data-sort="1">{esc(k)} (change)</th>' for k in keys)
    paths = []
    for index, chunk in enumerate(pages):
        nav = "" if len(names) < 2 else "<nav>" + " ".join(
            f"<b>page {i + 1}</b>" if i == index else f'<a href="{n}">page {i + 1}</a>'
            for i, n in enumerate(names)) + "</nav>"
        rows = "".join(_row(folder, item, keys) for item in chunk)
        body = (f"<h1>{esc(data['title'])}</h1>{nav}<section class=\"card summary\">"
                f"<p>{len(items)} images, {changed} changed by refinement, {failed} failed. "
                f"Click a score's header to sort by its change (refined minus coarse).</p>"
                f'<p class="note">{esc(data["note"])}</p></section>'
                + filters([("only-changed", "only images refinement changed"),
                           ("only-failures", "only failures")])
                + f"<table><thead><tr><th>image</th><th>references</th><th>coarse / refined"
                  f"</th>{head}</tr></thead><tbody>{rows}</tbody></table>{nav}")
        path = folder / names[index]
        path.write_text(page(data["title"], body), encoding="utf-8")
        paths.append(path)
    return paths
