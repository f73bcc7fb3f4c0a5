"""Atomic file writes for the cache: a temp file beside the target, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.cache.keys import _TEMP_SUFFIX


def _atomic_write(final: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_name)` fills a temp file beside `final`, which then replaces `final`.

    Same folder as the final name: os.replace is only atomic within one file system. The
    temp name is dot-prefixed with `_TEMP_SUFFIX`, invisible to readers and removed by gc.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=_TEMP_SUFFIX,
                                    dir=final.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; other users may share the cache
        os.replace(tmp_name, final)
    except BaseException:
        # Includes KeyboardInterrupt: never leave our own temp file behind when we can.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable across a power cut (a kill is covered without it).
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
