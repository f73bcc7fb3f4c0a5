"""EgoSchema's videos as users have them: found in folders or zips, streamed out of the zips
(resumable, zip-slip refused, broken members named), linked when already extracted, and
the zips removed once every video is verified."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pipeline.egoschema_tables import (
    _MAX_JSON_BYTES,
    _listing,
)

if TYPE_CHECKING:
    from pipeline.egoschema_import import ImportReport




# ----------------------------------------------------------------------------------------
# Scanning the source


@dataclass
class _Scan:
    parquet: list[Path] = field(default_factory=list)
    json: list[Path] = field(default_factory=list)
    zips: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)


def _scan(source: Path, exclude: Path | None) -> _Scan:
    """Every candidate file under `source`, sorted; hidden entries (the hub cache's .cache/,
    our own .partial files) and `exclude` (a target inside the source) are skipped.
    Symlinked folders are followed (a videos folder often is one), each real folder once."""
    found = _Scan()
    seen = {os.path.realpath(source)}
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            real = os.path.realpath(here / name)
            if name.startswith(".") or real in seen or (exclude and Path(real) == exclude):
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or not path.is_file():  # hidden, or a broken link
                continue
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                found.parquet.append(path)
            elif suffix == ".json" and path.stat().st_size <= _MAX_JSON_BYTES:
                found.json.append(path)
            elif suffix == ".zip":
                found.zips.append(path)
            elif suffix == ".mp4":
                found.videos.append(path)
    return found


def _unsafe_member(name: str) -> bool:
    """A zip member path that would land outside the folder it is extracted to."""
    posix = name.replace("\\", "/")
    return (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix) is not None
        or ".." in posix.split("/")
        or "\x00" in posix
    )


@dataclass(frozen=True)
class _Member:
    zip_path: Path
    info: zipfile.ZipInfo


# ----------------------------------------------------------------------------------------
# Writing


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers never see a half-written file


def _place(src: Path, dst: Path, link: bool) -> str:
    """Put `src` at `dst` (atomically): hard link, else symlink, else copy. Returns which."""
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.unlink(missing_ok=True)
    how = "copied"
    if link:
        try:
            os.link(src, tmp)
            how = "linked"
        except OSError:  # another file system, or links not allowed
            try:
                os.symlink(src.resolve(), tmp)
                how = "linked"
            except OSError:
                pass
    if how == "copied":
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return how


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


_BROKEN_MEMBER_ERRORS = (
    zipfile.BadZipFile,  # bad CRC-32, bad local header
    zlib.error,  # corrupt deflate stream
    EOFError,  # truncated member
    RuntimeError,  # encrypted member
    NotImplementedError,  # unsupported compression
)


def _extract(
    plan: list[tuple[str, _Member]], videos_dir: Path, progress: bool, report: ImportReport
) -> None:
    """Stream each member into a temporary file, then rename it into place."""

    total = sum(m.info.file_size for _, m in plan)

    by_zip: dict[Path, list[tuple[str, _Member]]] = {}
    for q_uid, member in plan:
        by_zip.setdefault(member.zip_path, []).append((q_uid, member))
    with tqdm(total=total, unit="B", unit_scale=True, desc="extracting videos",
              disable=not progress) as bar:
        for zip_path, members in by_zip.items():
            bar.set_postfix_str(zip_path.name)
            with zipfile.ZipFile(zip_path) as archive:
                for q_uid, member in members:
                    info = member.info
                    final = videos_dir / f"{q_uid}.mp4"
                    tmp = videos_dir / f".{q_uid}.mp4.partial"
                    try:
                        with archive.open(info) as src, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        size = tmp.stat().st_size
                        if size != info.file_size:
                            raise EOFError(f"wrote {size} bytes, expected {info.file_size}")
                        os.replace(tmp, final)
                        report.videos_extracted += 1
                    except _BROKEN_MEMBER_ERRORS as exc:
                        report.problems.append(
                            f"{zip_path.name}: broken member {info.filename!r} ({exc}); skipped"
                        )
                    finally:
                        tmp.unlink(missing_ok=True)
                    bar.update(info.file_size)


def _remove_zips(
    video_zips: list[Path], members: dict[str, _Member], videos_dir: Path, report: ImportReport
) -> None:
    """Delete the zips only when every question's video is present and, where a zip holds
    it, has that member's size."""
    if not video_zips:
        report.zips_kept_reason = "no video zips in the source"
        return
    if report.videos_missing:
        n = len(report.videos_missing)
        report.zips_kept_reason = (
            f"{n:,} video{'s' if n != 1 else ''} of the questions "
            f"{'are' if n != 1 else 'is'} missing"
        )
        return
    differ = [
        q for q, m in members.items()
        if (videos_dir / f"{q}.mp4").stat().st_size != m.info.file_size
    ]
    if differ:
        report.zips_kept_reason = (
            f"{len(differ):,} videos differ in size from their zip member: " + _listing(differ)
        )
        return
    for zip_path in video_zips:
        # In a hub cache the zip is a symlink to a blob: remove the blob too, to free the room.
        real = zip_path.resolve()
        zip_path.unlink()
        if real != zip_path.absolute() and real.is_file():
            real.unlink()
        report.zips_removed.append(zip_path)


