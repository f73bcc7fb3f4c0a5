"""A videoqa run's HTML report: what the captioner saw, what it wrote, what the reader chose.

    mmser report runs/egoschema-mmser-20261201-120000        (make report RUN=...)

Writes RUN/report.html (and report-2.html, ... at `per_page` videos a page, linked from
each other) and the thumbnails under RUN/thumbs/. Page one starts with the summary
(accuracy as metrics.json has it, answered and failed, wall-clock per stage, the captioner
and reader run, the loaded checkpoint's parameter count); then one section per video: a
strip of sampled frames with timestamp and caption (MM-SeR: coarse -> refined with the
changed words marked), every caption in a collapsed table, and one section per question
(options with probabilities, chosen and correct answer, the prompt, the raw reply, or the
failure with its stage and reason). Filters on each page: wrong answers, failures, frames
refinement changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.caption_diff import diff_html, word_diff
from pipeline.config import Config, RaySettings
from pipeline.html_page import OPTION_LETTERS, esc, filters, option_bars, page, stage_chart
from pipeline.report_data import RunData, load_run, save_report_data
from pipeline.thumbnails import (
    ThumbJob,
    ThumbResult,
    millis,
    pick_timestamps,
    safe_folder,
    thumbnails_for,
)

PER_PAGE = 50  # videos a page: a 500-video run opens as ten light pages
THUMBS_PER_VIDEO = 12  # evenly spread, plus every frame refinement changed


def write_html_report(folder: Path, config: Config, dataset: Any, transcripts: dict,
                      answers: list) -> list[Path]:
    """At the end of a run: keep what the report shows, then build it."""
    save_report_data(folder, config, dataset, transcripts, answers)
    return build_html_report(folder, config.ray)


def rebuild_report(config: Config, folder: str | Path) -> list[Path]:
    """`mmser report RUN`: a videoqa run's pages, or an eval-captions / bench-learn folder's
    caption view (pipeline/report_captions.py); thumbnails decoded once are reused."""
    from pipeline.report_captions import VIEW_FILE, build_caption_view

    if (Path(folder) / VIEW_FILE).exists():
        return build_caption_view(folder)
    return build_html_report(folder, config.ray)


def build_html_report(folder: str | Path, ray_settings: RaySettings,
                      per_page: int = PER_PAGE, thumbs_per_video: int = THUMBS_PER_VIDEO
                      ) -> list[Path]:
    """(Re)build the pages of a finished run folder; returns their paths, page one first.
    Thumbnails already in RUN/thumbs are reused, not decoded again."""
    run = load_run(folder)
    thumbs = _thumbnails(run, ray_settings, thumbs_per_video)
    videos = run.videos
    pages = [videos[i:i + per_page] for i in range(0, len(videos), per_page)] or [[]]
    names = [_page_name(i) for i in range(len(pages))]
    paths = []
    for index, chunk in enumerate(pages):
        body = _nav(names, index)
        if index == 0:
            body += _summary(run) + _index(run, {v["video_id"]: names[i] for i, chunk
                                                 in enumerate(pages) for v in chunk})
        body += filters([("only-wrong", "only wrong answers"), ("only-failures", "only failures"),
                         ("only-changed", "only frames refinement changed")])
        body += "".join(_video_section(run, v, thumbs.get(v["video_id"])) for v in chunk)
        body += _nav(names, index)
        path = run.folder / names[index]
        path.write_text(page(_title(run), body), encoding="utf-8")
        paths.append(path)
    for stale in run.folder.glob("report-*.html"):  # pages left by a larger earlier build
        if stale.name not in names:
            stale.unlink()
    return paths


def _page_name(index: int) -> str:
    return "report.html" if index == 0 else f"report-{index + 1}.html"


def _title(run: RunData) -> str:
    m = run.metrics
    return f"{m.get('dataset')} with {m.get('captioner')} + {m.get('reader')}"


def _nav(names: list[str], current: int) -> str:
    if len(names) < 2:
        return ""
    links = [f"<b>page {i + 1}</b>" if i == current else f'<a href="{esc(n)}">page {i + 1}</a>'
             for i, n in enumerate(names)]
    return f"<nav>{' '.join(links)}</nav>"


# --- thumbnails -------------------------------------------------------------------------


def _changed(caption: dict[str, Any]) -> bool:
    coarse = caption.get("coarse_caption")
    return coarse is not None and word_diff(coarse, caption["caption"]).changed


def _thumbnails(run: RunData, ray_settings: RaySettings, limit: int) -> dict[str, ThumbResult]:
    jobs = []
    for video in run.videos:
        captions = video["captions"]
        if not captions:
            continue  # a failed video has nothing captioned to show
        times = pick_timestamps([c["timestamp"] for c in captions],
                                [_changed(c) for c in captions], limit)
        jobs.append(ThumbJob(video["video_id"], video["path"], tuple(times),
                             str((run.folder / "thumbs" / safe_folder(video["video_id"]))
                                 .resolve())))
    return thumbnails_for(jobs, ray_settings)


# --- the summary ------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _summary(run: RunData) -> str:
    m = run.metrics
    acc = m.get("accuracy", {})
    timing = m.get("captioner_timing") or {}
    params = timing.get("parameters")
    section = (run.snapshot.get("captioner") or {}).get(m.get("captioner"), {})
    checkpoint = section.get("checkpoint") if isinstance(section, dict) else None
    wrong = sum(1 for a in run.answers.values() if _is_wrong(a))
    changed = sum(1 for v in run.videos for c in v["captions"] if _changed(c))
    frames = sum(len(v["captions"]) for v in run.videos)
    rows = [
        ("accuracy (strict)", _pct(acc.get("strict"))),
        ("accuracy (LLoVi-style: invalid counts 1/5)", _pct(acc.get("llovi"))),
        ("questions", m.get("questions")), ("answered", m.get("answered")),
        ("failed questions", m.get("failed_questions")), ("failed videos", m.get("failed_videos")),
        ("wrong answers (correct answer known)", wrong),
        ("captioner", m.get("captioner")),
        ("its checkpoint", checkpoint or "n/a"),
        ("parameters of the checkpoint loaded",
         f"{params / 1e6:.1f}M ({params:,}), from {timing.get('parameters_source', 'n/a')}"
         if params else "n/a"),
        ("reader", m.get("reader")),
        ("frames captioned / changed by refinement", f"{frames} / {changed}"),
    ]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return (f"<h1>{esc(_title(run))}</h1><section class=\"card summary\"><h2>Summary</h2>"
            f"<table>{table}</table><h3>Wall-clock per stage</h3>"
            f"{stage_chart(m.get('wall_clock_s', {}))}"
            f'<p class="note">Run folder {esc(run.folder)}. Accuracy of a random-weights '
            f"reader or captioner is chance level, not a quality figure.</p></section>")


def _index(run: RunData, page_of: dict[str, str]) -> str:
    """Every failure and wrong answer of the whole run, linked to its page: the filters
    work on one page, this list spans them all."""
    links = []
    for q in run.questions:
        answer = run.answers.get(q["q_uid"], {})
        if not (answer.get("error") or _is_wrong(answer)):
            continue
        why = f"failed: {answer['error']}" if answer.get("error") else "wrong answer"
        href = f"{page_of.get(q['video_id'], _page_name(0))}#q-{q['q_uid']}"
        links.append(f'<li><a href="{esc(href)}">{esc(q["q_uid"])}</a> {esc(why)}</li>')
    if not links:
        return ""
    return (f"<details class=\"card index\"><summary>{len(links)} failed or wrong "
            f"question(s), on every page</summary><ul>{''.join(links)}</ul></details>")


# --- one video --------------------------------------------------------------------------


def _caption_html(caption: dict[str, Any]) -> str:
    coarse = caption.get("coarse_caption")
    if coarse is None:
        return esc(caption["caption"])
    old, new = diff_html(coarse, caption["caption"])
    return (f'<div class="coarse">coarse: {old}</div><div class="refined">refined '
            f"({caption.get('refine_passes', 0)} pass(es)): {new}</div>")


def _strip(video: dict[str, Any], thumbs: ThumbResult | None) -> str:
    if thumbs is None:
        return ""
    if thumbs.error:
        return f'<p class="reason">frames could not be decoded for this report: ' \
               f"{esc(thumbs.error)}</p>"
    folder = f"thumbs/{safe_folder(video['video_id'])}"
    figures = []
    for caption in video["captions"]:
        name = thumbs.files.get(millis(caption["timestamp"]))
        if name is None:
            continue
        cls = ' class="changed"' if _changed(caption) else ""
        figures.append(
            f'<figure{cls}><img src="{esc(folder)}/{esc(name)}" loading="lazy" '
            f'alt="frame at {caption["timestamp"]:.2f} s"/><figcaption>'
            f"<b>{caption['timestamp']:.1f} s</b> {_caption_html(caption)}</figcaption></figure>")
    return f'<div class="strip">{"".join(figures)}</div>'


def _caption_table(video: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr class="frame{" changed" if _changed(c) else ""}"><td>{c["timestamp"]:.2f}</td>'
        f"<td>{_caption_html(c)}</td></tr>" for c in video["captions"])
    return (f"<details><summary>all {len(video['captions'])} captions</summary>"
            f"<table><thead><tr><th>s</th><th>caption</th></tr></thead><tbody>{rows}"
            f"</tbody></table></details>")


def _video_section(run: RunData, video: dict[str, Any], thumbs: ThumbResult | None) -> str:
    video_id = video["video_id"]
    failures = [f for f in run.failures if f.get("video_id") == video_id]
    questions = [q for q in run.questions if q["video_id"] == video_id]
    answers = [run.answers.get(q["q_uid"], {}) for q in questions]
    classes = ["card", "video"]
    if failures or any(a.get("error") for a in answers):
        classes += ["has-failure", "failed"]
    if any(_is_wrong(a) for a in answers):
        classes.append("has-wrong")
    if any(_changed(c) for c in video["captions"]):
        classes.append("has-changed")
    failed = "".join(f'<p class="reason">failed at {esc(f.get("stage"))}: '
                     f'{esc(f.get("reason"))}</p>' for f in failures)
    duration = f"{video['duration']:.1f} s" if video.get("duration") else "n/a"
    head = (f'<h2 id="v-{esc(safe_folder(video_id))}">video {esc(video_id)}</h2>'
            f'<p class="note">{esc(video["path"])} - {duration}, '
            f"{len(video['captions'])} frames captioned</p>")
    body = failed + _strip(video, thumbs) + (_caption_table(video) if video["captions"] else "")
    body += "".join(_question_section(run, q) for q in questions)
    return f'<section class="{" ".join(classes)}">{head}{body}</section>'


# --- one question -----------------------------------------------------------------------


def _is_wrong(answer: dict[str, Any]) -> bool:
    """Answered, the correct option known, and not chosen (invalid replies count wrong)."""
    return not answer.get("error") and answer.get("answer") is not None \
        and answer.get("prediction") != answer.get("answer")


def _question_section(run: RunData, question: dict[str, Any]) -> str:
    answer = run.answers.get(question["q_uid"], {})
    classes = ["question"] + (["failed"] if answer.get("error") else []) + \
        (["wrong"] if _is_wrong(answer) else [])
    chosen, correct = answer.get("prediction"), question.get("answer")
    if answer.get("error"):
        stage = "caption" if answer["error"].startswith("video failed") else "read"
        verdict = f'<p class="reason">failed ({stage} stage): {esc(answer["error"])}</p>'
    elif chosen is None:
        verdict = (f'<p class="wrong-mark">no answer read from the reply '
                   f"({esc(answer.get('invalid_reason') or 'invalid')})</p>")
    else:
        mark = "" if correct is None else (" - correct" if chosen == correct else
                                           f' - <span class="wrong-mark">wrong</span>, '
                                           f"correct: {OPTION_LETTERS[correct]}")
        verdict = f"<p>chosen: <b>{OPTION_LETTERS[chosen]}</b>{mark}</p>"
    prompt = "\n\n".join(run.prompts.get(question["q_uid"], []))
    details = ""
    if prompt:
        details += (f"<details><summary>the prompt the reader saw</summary>"
                    f'<p class="note">{esc(run.prompt_note)}</p><pre>{esc(prompt)}</pre>'
                    f"</details>")
    if answer and not answer.get("error"):
        details += f"<details><summary>raw reply</summary><pre>" \
                   f"{esc(answer.get('raw_output', ''))}</pre></details>"
    return (f'<section class="{" ".join(classes)}" id="q-{esc(question["q_uid"])}">'
            f"<h3>question {esc(question['q_uid'])}</h3><p>{esc(question['question'])}</p>"
            f"{option_bars(question['options'], answer.get('option_probs'), chosen, correct)}"
            f"{verdict}{details}</section>")
