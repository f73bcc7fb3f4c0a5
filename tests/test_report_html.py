"""The videoqa run's HTML report, on a small real run: tiny MM-SeR (random weights) on Ray,
three synthetic videos of which one is corrupt, a tiny vLLM reader started once for the
module. The pages are parsed strictly (they are written as well-formed XML) and checked
against the run's own files and the cache."""

from __future__ import annotations

import difflib
import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from captioner.random_weights import build_tiny_checkpoint
from pipeline.cache import CaptionCache
from pipeline.cli import main as cli_main
from pipeline.config import RaySettings, load_config
from pipeline.demo_data import generate_demo_dataset
from pipeline.report_html import THUMBS_PER_VIDEO, build_html_report
from pipeline.run import run_videoqa
from qa.tiny import build_tiny_reader
from tests.reader_fixtures import free_port

VOID = {"meta", "img", "input", "br", "hr", "link"}


def small_run(base: Path, videos: int = 3, corrupt: str | None = "demo-001",
              ray: bool = True) -> Path:
    """A finished videoqa run folder built with the product's real components (tiny sizes);
    the managed reader starts and stops its own vLLM server."""
    models = {"mmser": build_tiny_checkpoint(base / "mmser-tiny", refine=True),
              "reader": build_tiny_reader(base / "reader-tiny")}
    data = generate_demo_dataset(base / "data", num_videos=videos, seconds=6.0, fps=5,
                                 width=160, height=120, seed=1)
    if corrupt:
        (data / "videos" / f"{corrupt}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 junk" * 10)
    overrides = [
        f"datasets.tiny.root={data}", "datasets.tiny.format=egoschema",
        f"cache.dir={base / 'cache'}", f"outputs.runs_dir={base / 'runs'}",
        "captioner.name=mmser", f"captioner.mmser.checkpoint={models['mmser']}",
        "captioner.batch_size=8", "captioner.generation.max_new_tokens=8",
        "sampling.resize=[64, 64]", f"ray.enabled={str(ray).lower()}",
        "ray.decode_workers=1", "ray.cpu_caption_actors=1",
        f"reader.model={models['reader']}", "reader.served_name=tiny-reader",
        "reader.mode=managed", f"reader.port={free_port()}", "reader.max_model_len=4096",
        "reader.extra_args=[--enforce-eager]", "reader.env={VLLM_CPU_KVCACHE_SPACE: '1'}",
        "reader.health_timeout_s=400", "reader.max_tokens=16", "reader.reserve_tokens=64",
        "reader.max_retries=1", "reader.retry_backoff_s=0.2",
    ]
    return run_videoqa(load_config(overrides=overrides), "tiny", "mmser")


class _Balanced(HTMLParser):
    """Python's own HTML parser, refusing any unbalanced or misnested tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(path: Path) -> ET.Element:
    text = path.read_text(encoding="utf-8")
    checker = _Balanced()
    checker.feed(text)
    checker.close()
    assert checker.stack == [], f"unclosed: {checker.stack}"
    return ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))  # strict: well-formed XML


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(tag) if cls in (e.get("class") or "").split()]


def text_of(element: ET.Element) -> str:
    return " ".join("".join(element.itertext()).split())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("report-run"))


def test_one_section_per_video_and_question_in_well_formed_html(run: Path):
    root = parse(run / "report.html")
    data = json.loads((run / "report_data.json").read_text())
    videos = by_class(root, "section", "video")
    questions = by_class(root, "section", "question")
    assert len(videos) == len(data["videos"]) == 3
    assert sorted(q.get("id") for q in questions) == sorted(
        f"q-{q['q_uid']}" for q in data["questions"])
    summary = text_of(by_class(root, "section", "summary")[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{100 * metrics['accuracy']['strict']:.1f}%" in summary
    assert f"{100 * metrics['accuracy']['llovi']:.1f}%" in summary
    # The loaded tiny checkpoint's own count, not the real model's ~482M.
    params = metrics["captioner_timing"]["parameters"]
    assert 1e5 < params < 1e7 and f"{params:,}" in summary
    assert "from safetensors headers of" in summary and "mmser-tiny" in summary
    assert len(list(root.iter("{http://www.w3.org/2000/svg}rect"))) == len(
        metrics["wall_clock_s"])
    # Answered questions: their option bars, the prompt and the raw reply.
    answers = {json.loads(x)["q_uid"]: json.loads(x)
               for x in (run / "predictions.jsonl").read_text().splitlines()}
    for section in questions:
        record = answers[section.get("id").removeprefix("q-")]
        if record["error"]:
            continue
        assert len(by_class(section, "span", "bar")) == 5
        summaries = [text_of(s) for s in section.iter("summary")]
        assert summaries == ["the prompt the reader saw", "raw reply"]
        prompt = text_of(section.findall("details")[0].find("pre"))
        assert " ".join(record["raw_output"].split()) in text_of(
            section.findall("details")[1])
        assert "Question" in prompt or "question" in prompt


def test_marked_words_are_the_word_diff_of_the_two_captions(run: Path):
    root = parse(run / "report.html")
    cache = CaptionCache(run.parent.parent / "cache")
    captions = [c for r in cache.iter_records() for c in r.captions]
    rows = [r for r in root.iter("tr") if "frame" in (r.get("class") or "")]
    assert len(rows) == len(captions) == 2 * 6  # two decodable videos, 6 s at 1 fps
    by_time: dict[str, list] = {}
    for c in captions:
        by_time.setdefault(f"{c.timestamp:.2f}", []).append(c)
    changed = 0
    for row in rows:
        cells = row.findall("td")
        coarse_div, refined_div = cells[1].findall("div")
        candidates = by_time[text_of(cells[0])]
        caption = next(c for c in candidates
                       if text_of(refined_div).endswith(" ".join(c.caption.split())))
        a, b = caption.coarse_caption.split(), caption.caption.split()
        ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
        removed = [w for op, i1, i2, _, _ in ops if op != "equal" for w in a[i1:i2]]
        added = [w for op, _, _, j1, j2 in ops if op != "equal" for w in b[j1:j2]]
        assert [w for d in coarse_div.iter("del") for w in text_of(d).split()] == removed
        assert [w for i in refined_div.iter("ins") for w in text_of(i).split()] == added
        assert ("changed" in row.get("class")) == bool(removed or added)
        changed += bool(removed or added)
    # Every changed frame has its thumbnail, plus at most THUMBS_PER_VIDEO others a video.
    figures = list(root.iter("figure"))
    assert len(by_class(root, "figure", "changed")) == changed
    assert len(figures) <= changed + 2 * THUMBS_PER_VIDEO


def test_thumbnails_are_small_jpegs_in_the_run_folder(run: Path):
    root = parse(run / "report.html")
    sources = [img.get("src") for img in root.iter("img")]
    assert sources
    for src in sources:
        assert src.startswith("thumbs/")
        with Image.open(run / src) as image:
            assert image.format == "JPEG" and image.width == 160


def test_corrupt_video_is_shown_with_its_stage_and_reason(run: Path):
    root = parse(run / "report.html")
    failure = json.loads((run / "failures.jsonl").read_text().splitlines()[0])
    assert failure["video_id"] == "demo-001"
    failed = [v for v in by_class(root, "section", "video") if "has-failure" in v.get("class")]
    assert len(failed) == 1 and "demo-001" in text_of(failed[0].find("h2"))
    shown = text_of(by_class(failed[0], "p", "reason")[0])
    assert shown == f"failed at {failure['stage']}: {' '.join(failure['reason'].split())}"
    question = by_class(failed[0], "section", "question")[0]
    assert "question not asked" in text_of(by_class(question, "p", "reason")[0])
    assert not list(failed[0].iter("img"))


def test_rebuild_by_cli_decodes_nothing_again_and_pages(run: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    thumbs = sorted((copy / "thumbs").rglob("*.jpg"))
    stamps = [p.stat().st_mtime_ns for p in thumbs]
    # The videos are gone: a rebuild that decoded again would show reasons instead.
    data = json.loads((copy / "report_data.json").read_text())
    for video in data["videos"]:
        video["path"] = str(tmp_path / "gone" / Path(video["path"]).name)
    (copy / "report_data.json").write_text(json.dumps(data))
    assert cli_main(["report", str(copy), "--set", "ray.enabled=false"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((copy / "thumbs").rglob("*.jpg"))] == stamps
    assert "could not be decoded" not in (copy / "report.html").read_text()
    # Paginated: one video a page, each page linking the others.
    pages = build_html_report(copy, RaySettings(enabled=False), per_page=1)
    assert [p.name for p in pages] == ["report.html", "report-2.html", "report-3.html"]
    for page in pages:
        root = parse(page)
        assert len(by_class(root, "section", "video")) == 1
        navigation = {a.get("href") for nav in root.iter("nav") for a in nav.iter("a")}
        assert navigation == {p.name for p in pages} - {page.name}
    # Page one lists every failed or wrong question, each linked to its own page's anchor.
    answers = [json.loads(x) for x in (copy / "predictions.jsonl").read_text().splitlines()]
    bad = {a["q_uid"] for a in answers
           if a["error"] or (a["answer"] is not None and a["prediction"] != a["answer"])}
    index = by_class(parse(pages[0]), "details", "index")
    links = {a.get("href") for a in index[0].iter("a")} if index else set()
    assert len(links) == len(bad) >= 1
    for href in links:
        name, anchor = href.split("#")
        assert anchor.removeprefix("q-") in bad
        assert len([e for e in parse(copy / name).iter() if e.get("id") == anchor]) == 1


def test_a_video_gone_at_report_time_shows_its_reason(run: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "thumbs")
    data = json.loads((copy / "report_data.json").read_text())
    gone = next(v for v in data["videos"] if v["captions"])
    gone["path"] = str(tmp_path / "moved.mp4")
    (copy / "report_data.json").write_text(json.dumps(data))
    build_html_report(copy, RaySettings(enabled=False))
    root = parse(copy / "report.html")
    section = next(v for v in by_class(root, "section", "video")
                   if gone["video_id"] in text_of(v.find("h2")))
    assert "no such file" in text_of(by_class(section, "p", "reason")[0])
    assert len(by_class(root, "section", "video")) == 3


def test_report_on_a_folder_that_is_not_a_run_names_what_is_missing(tmp_path: Path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.json").write_text("{}")
    assert cli_main(["report", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "half") in err
    assert "predictions.jsonl" in err and "report_data.json" in err
    assert "metrics.json" not in err.split("missing", 1)[1]


# --- the caption-evaluation view ----------------------------------------------------------

REFERENCES = {0: ["a red circle above a blue square"], 1: ["a dog sleeps on a mat", "a dog"],
              2: ["two green triangles"]}


def test_eval_captions_view_marks_edits_and_sorts_by_score_change(tiny_dir: Path,
                                                                  tmp_path: Path):
    import numpy as np

    images = []
    for i, sentences in REFERENCES.items():
        name = f"img{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
                        ).save(tmp_path / name)
        images.append({"filepath": "", "filename": name, "imgid": i, "cocoid": 100 + i,
                       "split": "test", "sentences": [{"raw": s, "tokens": s.split()}
                                                      for s in sentences]})
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    images.append({"filepath": "", "filename": "bad.jpg", "imgid": 9, "cocoid": 109,
                   "split": "test", "sentences": [{"raw": "x", "tokens": ["x"]}]})
    data = tmp_path / "dataset_coco.json"
    data.write_text(json.dumps({"dataset": "coco", "images": images}))
    out = tmp_path / "run"
    assert cli_main([
        "eval-captions", "--captioner", "mmser", "--out", str(out), "--data", str(data),
        "--format", "coco", "--split", "test", "--image-root", str(tmp_path),
        "--set", f"captioner.mmser.checkpoint={tiny_dir}",
        "--set", "captioner.generation.max_new_tokens=6", "--set", "captioner.device=cpu",
        "--set", "captioner.dtype=float32",
        "--set", "eval_captions.metrics.names=[bleu, rougeL, cider]"]) == 0
    root = parse(out / "report.html")
    per_image = {json.loads(x)["id"]: json.loads(x)
                 for x in (out / "per_image.jsonl").read_text().splitlines()}
    rows = by_class(root, "tr", "item")
    assert len(rows) == len(per_image) + 1  # the corrupt image too, with its reason
    assert "image" in text_of(by_class(root, "span", "reason")[0])
    sortable = [th for th in root.iter("th") if th.get("data-sort")]
    assert {text_of(th).split()[0] for th in sortable} == set(
        next(iter(per_image.values()))["scores"])
    for row in rows:
        cells = row.findall("td")
        record = per_image.get(text_of(cells[0]))
        if record is None:
            continue
        coarse_div, refined_div = cells[2].findall("div")
        removed, added = changed_words_of(record["coarse"], record["prediction"])
        assert [w for d in coarse_div.iter("del") for w in text_of(d).split()] == removed
        assert [w for i in refined_div.iter("ins") for w in text_of(i).split()] == added
        for cell in cells[3:]:  # each score's change: a number the sort can read
            float(cell.get("data-value"))
    # `mmser report` rebuilds the same view from the folder alone.
    before = (out / "report.html").read_text()
    assert cli_main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == before


def changed_words_of(coarse: str, refined: str) -> tuple[list[str], list[str]]:
    a, b = coarse.split(), refined.split()
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return ([w for op, i1, i2, _, _ in ops if op != "equal" for w in a[i1:i2]],
            [w for op, _, _, j1, j2 in ops if op != "equal" for w in b[j1:j2]])


def test_bench_learn_view_scores_coarse_and_refined_against_the_truth(tmp_path: Path):
    from captioner.train_data import DataSource, load_caption_source
    from pipeline.report_captions import learn_view
    from pipeline.world import LEARN_WORLD, build_world

    world = build_world(tmp_path / "world", LEARN_WORLD, {"train": 4, "val": 2, "test": 5},
                        components=False)
    test = load_caption_source(DataSource("llava", str(world.root / "test.json"))).samples
    truth = [s.captions[0] for s in test]
    # A seed's record as benchmarks/learn.py keeps it: coarse with one slot wrong where it
    # can be, refined back to the truth.
    coarse = [t.replace("red", "blue") if "red" in t else t.replace("small", "large", 1)
              for t in truth]
    record = {"truth": truth, "coarse": coarse, "refined": truth}
    (page,) = learn_view(tmp_path / "view", world.root, record, seed=0)
    rows = by_class(parse(page), "tr", "item")
    assert len(rows) == 5 and len(by_class(parse(page), "tr", "changed")) == sum(
        c != t for c, t in zip(coarse, truth, strict=True))
    for row, c, t in zip(rows, coarse, truth, strict=True):
        exact = row.findall("td")[3]  # columns sort by name: exact, slot_accuracy
        assert float(exact.get("data-value")) == float(c != t)  # 0 -> 1 where fixed
        assert text_of(exact).startswith("1.000")
        assert row.find("td").find("img") is not None
