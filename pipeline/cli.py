"""The command-line entry point: `mmser <command>` (also `python -m pipeline <command>`).

    mmser demo                          the whole pipeline on the bundled demo dataset
    mmser videoqa --dataset egoschema --captioner mmser
    mmser decode --dataset demo         sample frames only (decord on Ray), print counts
    mmser cache build PATH... | ls | export OUT.parquet | gc
    mmser captioners                    registered captioners, real-size parameter counts
    mmser compare RUN_DIR...            one table from several runs, like the paper's
    mmser report RUN_DIR                rebuild a run's HTML report (frames, captions, answers)
    mmser serve-reader                  start the reader's vLLM server by hand
    mmser train --stage align|caption|refine    train MM-SeR (train: section of the config)
    mmser perturb OUT.jsonl             pseudo-initial captions of train.data.train (rules or LLM)
    mmser caption IMAGE_OR_VIDEO...     print the coarse and refined captions of a few files
    mmser world build OUT               a synthetic world's data and stage-0 components
    mmser config                        print the resolved config

Every command takes `--config FILE` and any number of `--set key.sub=value` overrides.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import KNOWN_ERRORS, PipelineError

log = logging.getLogger("mmser")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config file (default: config.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set sampling.fps=0.5 (repeatable)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_config(args).to_dict(), sort_keys=False))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """Load a dataset, decode and sample every video, print per-video counts and timings."""
    from pipeline.datasets import load_dataset
    from pipeline.decode import DecodeFailure, decode_videos

    config = _config(args)
    dataset = load_dataset(args.dataset, config.datasets)
    videos = list(dataset.videos.values())
    print(f"dataset {dataset.name}: {len(dataset.questions)} questions, {len(videos)} videos "
          f"({len(dataset.missing_videos)} missing) in {dataset.root}")
    start = time.perf_counter()
    rows, failures = [], []
    for result in decode_videos(videos, config.sampling, config.ray):
        if isinstance(result, DecodeFailure):
            failures.append(result)
        else:
            rows.append(result)
    wall = time.perf_counter() - start
    print(f"\n{'video':<24}{'frames':>8}{'duration s':>12}{'decode s':>10}")
    for r in sorted(rows, key=lambda r: r.video_id):
        print(f"{r.video_id:<24}{len(r):>8}{r.duration:>12.1f}{r.decode_seconds:>10.2f}")
    for f in failures:
        print(f"{f.video_id:<24}  FAILED: {f.reason}")
    total = sum(len(r) for r in rows)
    print(f"\n{total} frames from {len(rows)} videos in {wall:.1f} s wall-clock "
          f"({total / wall:.1f} frames/s); {len(failures)} failed")
    return 0 if rows or not videos else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the demo dataset, train its captioner and build a tiny reader once, then
    run videoqa on them (pipeline/demo.py)."""
    from pipeline.demo import run_demo

    return run_demo(args.config, list(args.overrides))


def cmd_videoqa(args: argparse.Namespace) -> int:
    from pipeline.run import run_videoqa

    config = _config(args)
    run_videoqa(config, args.dataset, args.captioner, run_dir=args.run_dir, new=args.new)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from pipeline.cache import CaptionCache

    config = _config(args)
    cache = CaptionCache(config.cache.dir, fingerprint_mode=config.cache.fingerprint)
    if args.cache_command == "build":
        from pipeline.captioning import caption_videos_cached
        from pipeline.datasets import find_videos

        videos = find_videos(*args.paths)
        print(f"{len(videos)} videos under {', '.join(args.paths)}")
        outcome = caption_videos_cached(videos, config, args.captioner)
        stats = outcome.stats
        print(f"{stats.cache_hits} already cached, {stats.captioned_videos} captioned "
              f"({stats.captioned_frames} frames) in {stats.wall_seconds:.1f} s, "
              f"{len(outcome.failures)} failed")
        for failure in outcome.failures:
            print(f"  FAILED {failure.video_id} ({failure.stage}): {failure.reason}")
        return 0 if len(outcome.failures) < len(videos) or not videos else 1
    if args.cache_command == "ls":
        table = cache.ls()
        if table.empty:
            print(f"{cache.root}: empty")
        else:
            import pandas as pd

            with pd.option_context("display.max_rows", None, "display.width", 200):
                print(table.to_string(index=False))
        return 0
    if args.cache_command == "export":
        rows = cache.export(args.out)
        print(f"wrote {rows} rows to {args.out}")
        return 0
    if args.cache_command == "gc":
        keep = [{"name": name} for name in args.keep_captioner] or None
        report = cache.gc(dry_run=args.dry_run, keep_captioners=keep)
        print(report.summary())
        return 0
    raise AssertionError(args.cache_command)


def cmd_captioners(args: argparse.Namespace) -> int:
    from captioner.base import parameter_counts, registered_captioners

    config = _config(args)
    print(f"{'captioner':<10} {'parameters (real size)':>24}  components")
    for name in registered_captioners():
        try:
            counts = parameter_counts(config.captioner, name)
        except Exception as exc:  # one broken module must not hide the others
            print(f"{name:<10} {'unavailable':>24}  {exc}")
            continue
        total = counts.get("total", sum(counts.values()))
        parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items() if k != "total")
        print(f"{name:<10} {total / 1e6:>22.1f}M  {parts}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import compare_runs

    print(compare_runs(_config(args), args.runs, args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report_html import rebuild_report

    for path in rebuild_report(_config(args), args.run):
        print(path)
    return 0


def cmd_serve_reader(args: argparse.Namespace) -> int:
    from qa.server import serve_forever

    serve_forever(_config(args).reader)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import describe, run_training

    result = run_training(_config(args), args.stage)
    print(describe(result))
    return 0


def cmd_perturb(args: argparse.Namespace) -> int:
    import dataclasses

    from captioner.train_data import load_caption_sources
    from pipeline.perturb import perturb_captions

    config = _config(args)
    settings = config.train.perturb
    if args.source:
        settings = dataclasses.replace(settings, source=args.source)
    if not config.train.data.train:
        raise PipelineError("train.data.train is empty: name the captions to perturb there")
    loaded = load_caption_sources(config.train.data.train, config.train.data.verify_images)
    print(loaded.summary())
    items = [
        (sample.id if len(sample.captions) == 1 else f"{sample.id}~{k}", caption)
        for sample in loaded.samples for k, caption in enumerate(sample.captions)
    ][: args.limit]
    report = perturb_captions(items, Path(args.out), settings, seed=config.train.seed,
                              reader=config.reader)
    print(report.summary())
    print(f"use them in training: --set train.pairs.perturbations={args.out}")
    return 0


_VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov"}


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption a few images or videos' sampled frames and print coarse and refined text."""
    import numpy as np
    from PIL import Image

    from captioner.base import build_captioner
    from pipeline.frames import sample_video

    config = _config(args)
    name = args.captioner or config.captioner.name
    options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    captioner = build_captioner(config.captioner, name, **options)
    failed = 0
    for path in map(Path, args.paths):
        try:
            if path.suffix.lower() in _VIDEO_SUFFIXES:
                sampled = sample_video(path, path.stem, config.sampling)
                frames, labels = list(sampled.frames), [f"{t:.1f}s" for t in sampled.timestamps]
            else:
                with Image.open(path) as image:
                    frames, labels = [np.asarray(image.convert("RGB"))], [""]
        except Exception as exc:  # one unreadable file never stops the others
            print(f"{path}: FAILED: {exc}")
            failed += 1
            continue
        for i in range(0, len(frames), config.captioner.batch_size):
            batch = captioner.caption_batch(frames[i : i + config.captioner.batch_size])
            for label, result in zip(labels[i:], batch.results, strict=False):
                where = f"{path}" + (f" @ {label}" if label else "")
                if result.coarse_caption is not None:
                    print(f"{where}\n  coarse:  {result.coarse_caption}\n"
                          f"  refined: {result.caption} ({result.refine_passes} pass"
                          f"{'es' if result.refine_passes != 1 else ''})")
                else:
                    print(f"{where}\n  caption: {result.caption}")
    return 0 if failed < len(args.paths) else 1


def cmd_eval_captions(args: argparse.Namespace) -> int:
    from captioner.train_data import DataSource
    from pipeline.eval_captions import evaluate_captions

    config = _config(args)
    if args.data:
        config.eval_captions.data = [
            DataSource(args.format, args.data, args.image_root, args.split, args.limit)
        ]
    run = evaluate_captions(config, captioner=args.captioner, checkpoint=args.checkpoint,
                            predictions=args.predictions, out=args.out,
                            judge=True if args.judge else None)
    print(f"run folder: {run.run_dir} (metrics.json, per_image.jsonl)")
    print(run.table)
    return 0 if run.scores is not None else 1


def cmd_data(args: argparse.Namespace) -> int:
    """`data ls`, or import a dataset into its configured folder."""
    config = _config(args)
    if args.what == "ls":
        return _data_ls(config)
    settings = config.datasets.get(args.what)
    if settings is None or settings.format != "egoschema":
        known = [n for n, d in config.datasets.items() if d.format == "egoschema"]
        raise PipelineError(f"data {args.what}: not an EgoSchema-format dataset in config.yaml "
                            f"(those are: {', '.join(known) or 'none'})")
    if not args.source:
        raise PipelineError(f"data {args.what}: name the copy to import with --from SRC")
    from pipeline.egoschema_import import import_egoschema

    report = import_egoschema(Path(args.source), Path(settings.root),
                              remove_zips=args.remove_zips, link=not args.copy)
    print(report.summary())
    if report.ok:
        print(f"now: make videoqa DATASET={args.what}")
    return 0 if report.ok else 1


def _data_ls(config: Config) -> int:
    from pipeline.datasets import find_videos, load_dataset

    print(f"{'dataset':<12} {'format':<10} {'questions':>9} {'subset':>6} {'videos':>7} "
          f"{'missing':>7}  root")
    for name, settings in config.datasets.items():
        root = Path(settings.root)
        if settings.format == "folder":
            count = len(find_videos(root)) if root.is_dir() else 0
            print(f"{name:<12} {'folder':<10} {'-':>9} {'-':>6} {count:>7} {'-':>7}  {root}")
            continue
        if not (root / "questions.json").exists():
            print(f"{name:<12} {'egoschema':<10} {'-':>9} {'-':>6} {'-':>7} {'-':>7}  {root} "
                  "(not imported: mmser data " + name + " --from SRC)")
            continue
        try:
            data = load_dataset(name, {name: settings})
        except KNOWN_ERRORS as exc:
            print(f"{name:<12} {'egoschema':<10} unreadable: {exc}")
            continue
        subset = sum(1 for q in data.questions if q.answer is not None)
        print(f"{name:<12} {'egoschema':<10} {len(data.questions):>9} {subset:>6} "
              f"{len(data.videos):>7} {len(data.missing_videos):>7}  {root}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from pipeline.world import WORLDS, build_world

    splits = {"train": args.train, "val": args.val, "test": args.test}
    world = build_world(args.out, WORLDS[args.preset], splits, seed=args.seed,
                        vision_steps=args.vision_steps, text_steps=args.text_steps,
                        components=not args.no_components)
    print(f"world {args.preset} in {world.root}: " + ", ".join(
        f"{k} {v}" for k, v in splits.items()) + " images")
    if not args.no_components:
        print(f"stage-0 components (standing in for pretrained CLIP / OPT): "
              f"{world.vision_model}, {world.language_model}")
        print(f"  validation: {world.stand_in}")
        print("train on it: mmser train --stage align "
              f"--set train.vision_model={world.vision_model} "
              f"--set train.language_model={world.language_model} "
              f"--set 'train.data.train=[{{format: llava, path: {world.root}/train.json}}]' "
              f"--set 'train.data.eval=[{{format: llava, path: {world.root}/val.json}}]' "
              f"--set train.perturb.word_lists={world.root}/word_lists.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmser", description="Long-video question answering with the MM-SeR captioner.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _add_common(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("decode", help="sample frames of a dataset's videos and print counts")
    _add_common(p)
    p.add_argument("--dataset", default="demo", help="a name in config.yaml or a folder")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("videoqa", help="answer a dataset's questions end to end")
    _add_common(p)
    p.add_argument("--dataset", default="egoschema", help="a name in config.yaml or a folder")
    p.add_argument("--captioner", default=None, help="simple | mmser | llava15 | tag2text")
    p.add_argument("--run-dir", default=None, help="write to (or resume) this folder")
    p.add_argument("--new", action="store_true", help="start a new run, do not resume")
    p.set_defaults(func=cmd_videoqa)

    p = sub.add_parser("cache", help="the offline caption cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    q = cache_sub.add_parser("build", help="caption every video under PATHs into the cache")
    _add_common(q)
    q.add_argument("paths", nargs="+", help="video files or folders (mp4/mkv/webm/avi/mov)")
    q.add_argument("--captioner", default=None, help="default: captioner.name")
    q = cache_sub.add_parser("ls", help="list cached videos")
    _add_common(q)
    q = cache_sub.add_parser("export", help="export all captions to Parquet (one row a frame)")
    _add_common(q)
    q.add_argument("out", help="the .parquet file to write")
    q = cache_sub.add_parser("gc", help="drop records of deleted videos and stale temp files")
    _add_common(q)
    q.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    q.add_argument("--keep-captioner", action="append", default=[], metavar="NAME",
                   help="also drop records of every other captioner (repeatable)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("captioners", help="registered captioners with real-size parameters")
    _add_common(p)
    p.set_defaults(func=cmd_captioners)

    p = sub.add_parser("compare", help="one table from several runs (same dataset)")
    _add_common(p)
    p.add_argument("runs", nargs="+", help="run folders (runs/<dataset>-<captioner>-<time>)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="(re)build a run folder's HTML report (report.html)")
    _add_common(p)
    p.add_argument("run", help="a videoqa, eval-captions or bench-learn run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve-reader", help="start the reader's vLLM server and wait")
    _add_common(p)
    p.set_defaults(func=cmd_serve_reader)

    p = sub.add_parser("train", help="train one MM-SeR stage (the config's train: section)")
    _add_common(p)
    p.add_argument("--stage", choices=("align", "caption", "refine"), default=None,
                   help="default: train.stage")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("perturb", help="pseudo-initial captions of train.data.train to a JSONL")
    _add_common(p)
    p.add_argument("out", help="the JSONL to write (resumed when it exists)")
    p.add_argument("--source", choices=("rules", "llm"), default=None,
                   help="default: train.perturb.source (llm: the reader server)")
    p.add_argument("--limit", type=int, default=None, help="only the first N captions")
    p.set_defaults(func=cmd_perturb)

    p = sub.add_parser("caption", help="caption images or videos' sampled frames, print them")
    _add_common(p)
    p.add_argument("paths", nargs="+", help="image files (png, jpg, ...) or videos")
    p.add_argument("--captioner", default=None, help="default: captioner.name")
    p.add_argument("--checkpoint", default=None, help="the captioner's checkpoint folder")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("eval-captions", help="caption a test split (or read predictions) and "
                       "score it: BLEU, ROUGE-L, CIDEr, METEOR, BERTScore, an LLM judge")
    _add_common(p)
    p.add_argument("--data", default=None,
                   help="the dataset file or folder (default: eval_captions.data)")
    p.add_argument("--format", choices=("llava", "coco", "dci", "folder"), default="llava",
                   help="--data's layout (default llava)")
    p.add_argument("--split", default=None, help="--data's split (coco: Karpathy's test)")
    p.add_argument("--image-root", default=None, help="folder --data's image paths start at")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--captioner", default=None, help="default: captioner.name")
    p.add_argument("--checkpoint", default=None, help="the captioner's checkpoint folder")
    p.add_argument("--predictions", default=None,
                   help="score this predictions file instead of captioning")
    p.add_argument("--out", default=None, help="the run folder (an existing one resumes)")
    p.add_argument("--judge", action="store_true",
                   help="also ask the reader LLM to judge each caption (eval_captions.judge)")
    p.set_defaults(func=cmd_eval_captions)

    p = sub.add_parser("data", help="import EgoSchema into its configured folder, or list "
                       "the datasets (data ls)")
    _add_common(p)
    p.add_argument("what", help="'ls', or the dataset to import into (egoschema)")
    p.add_argument("--from", dest="source", default=None,
                   help="a copy of the hub dataset (parquet + video zips), of the official "
                   "repository, or a folder of videos with questions.json beside it")
    p.add_argument("--remove-zips", action="store_true",
                   help="delete the video zips once every video is extracted and verified")
    p.add_argument("--copy", action="store_true",
                   help="copy already-extracted videos instead of linking them")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("world", help="synthetic worlds for training evidence and the demo")
    world_sub = p.add_subparsers(dest="world_command", required=True)
    q = world_sub.add_parser("build", help="write a world's images and captions (+ stage 0)")
    _add_common(q)
    q.add_argument("out", help="the folder to write")
    q.add_argument("--preset", choices=("learn", "demo"), default="learn")
    q.add_argument("--train", type=int, default=4000, help="training images")
    q.add_argument("--val", type=int, default=300, help="validation images")
    q.add_argument("--test", type=int, default=1000, help="test images")
    q.add_argument("--seed", type=int, default=0, help="the stage-0 models' seed")
    q.add_argument("--vision-steps", type=int, default=400, help="stage-0 vision steps")
    q.add_argument("--text-steps", type=int, default=200, help="stage-0 language steps")
    q.add_argument("--no-components", action="store_true", help="only the data, no stage 0")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("demo", help="run the pipeline on the bundled synthetic demo dataset")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
