"""The command-line entry point: `mmser <command>` (also `python -m pipeline <command>`).

    mmser demo                          the whole pipeline on the bundled demo dataset
    mmser videoqa --dataset egoschema --captioner mmser
    mmser decode --dataset demo         sample frames only (decord on Ray), print counts
    mmser cache build PATH... | ls | export OUT.parquet | gc
    mmser captioners                    registered captioners, real-size parameter counts
    mmser serve-reader                  start the reader's vLLM server by hand
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
from pipeline.errors import PipelineError

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
    from pipeline.demo_data import generate_demo_dataset

    config = _config(args)
    root = Path(config.datasets["demo"].root) if "demo" in config.datasets else Path("data/demo")
    t0 = time.perf_counter()
    generate_demo_dataset(root)
    print(f"demo dataset ready in {root} ({time.perf_counter() - t0:.1f} s)")
    args.dataset = "demo"
    return cmd_decode(args)


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
    try:
        return int(args.func(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
