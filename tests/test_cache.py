"""The offline caption cache: keys, round trips, atomic and concurrent writes, tables, gc.

Real files and real processes throughout: a writer process killed with SIGKILL, two
multiprocessing writers racing on the same keys, Parquet read back with pandas.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from captioner.fingerprint import (
    FULL_HASH_MAX_BYTES,
    SAMPLE_CHUNK_BYTES,
    sample_offsets,
)
from pipeline.cache import (
    CacheError,
    CacheRecord,
    CaptionCache,
    cache_key,
    video_fingerprint,
)
from pipeline.config import SamplingSettings
from pipeline.records import FrameCaption, Transcript
from pipeline.synth import write_video

REPO_ROOT = Path(__file__).resolve().parent.parent
MMSER = {
    "name": "mmser",
    "checkpoint": "sha256:0123abcd",
    "generation": {"prompt": "Describe the image in detail.", "max_new_tokens": 60},
    "refine_steps": 1,
}
SIMPLE = {**MMSER, "name": "simple", "refine_steps": 0}


def captions(n: int, text: str = "a person cuts an onion") -> list[FrameCaption]:
    return [
        FrameCaption(float(i), f"{text} {i}", coarse_caption=f"coarse {i}", refine_passes=1)
        for i in range(n)
    ]


def make_record(
    video: Path | str,
    fingerprint: str | None = None,
    identity: dict = MMSER,
    sampling: SamplingSettings | dict | None = None,
    n: int = 3,
    video_id: str = "vid",
) -> CacheRecord:
    return CacheRecord.create(
        fingerprint=fingerprint or video_fingerprint(video),
        video_id=video_id,
        path=video,
        duration=float(n),
        captions=captions(n),
        sampling=sampling or SamplingSettings(),
        captioner=identity,
        timings={"decode_seconds": 0.25, "caption_seconds": 1.5},
    )


@pytest.fixture(scope="session")
def real_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame H.264 clip (64 x 48), written once."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(12)]
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=4.0)


def byte_video(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def record_files(cache: CaptionCache) -> list[Path]:
    return sorted(cache.records_dir.glob("*/*.json"))


def temp_files(cache: CaptionCache) -> list[Path]:
    return sorted(cache.records_dir.glob("*/.*.tmp"))


# --- round trip and keys ------------------------------------------------------------------


def test_put_get_round_trip(tmp_path: Path, real_video: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    record = make_record(real_video, n=5)
    assert cache.get(record.key) is None and not cache.contains(record.key)

    path = cache.put(record)
    assert path == tmp_path / "cache" / "records" / record.key[:2] / f"{record.key}.json"
    got = cache.get(record.key)
    assert got == record and cache.contains(record.key)
    assert got.paths == [str(real_video)]
    assert got.versions["python"] and "torch" in got.versions and "transformers" in got.versions
    assert got.timings == {"decode_seconds": 0.25, "caption_seconds": 1.5}
    assert got.sampling["fps"] == 1 and got.captioner["name"] == "mmser"

    transcript = got.to_transcript("q_uid_7")
    assert isinstance(transcript, Transcript)
    assert transcript.video_id == "q_uid_7" and transcript.duration == 5.0
    assert [c.timestamp for c in transcript.captions] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert transcript.captions[2] == FrameCaption(2.0, "a person cuts an onion 2", "coarse 2", 1)
    assert got.to_transcript().video_id == "vid"


def test_record_keeps_captions_in_time_order_and_tags(tmp_path: Path) -> None:
    video = byte_video(tmp_path / "v.mp4")
    # numpy scalars, as the decoder's timestamps come, are stored as plain numbers.
    shuffled = [
        FrameCaption(np.float32(2.5), "c", refine_passes=np.int64(2), tags=("dog", "ball")),
        FrameCaption(np.float64(0.5), "a"),
    ]
    record = CacheRecord.create(
        fingerprint=video_fingerprint(video), video_id="v", path=video, duration=3.0,
        captions=shuffled, sampling=SamplingSettings(), captioner=MMSER,
    )  # fmt: skip
    cache = CaptionCache(tmp_path / "cache")
    cache.put(record)
    got = cache.get(record.key)
    assert [c.timestamp for c in got.captions] == [0.5, 2.5]
    assert got.captions[1].tags == ("dog", "ball") and got.captions[1].refine_passes == 2


def test_renamed_and_moved_video_hits(tmp_path: Path, real_video: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    video = tmp_path / "archive" / "clip.mp4"
    video.parent.mkdir()
    video.write_bytes(real_video.read_bytes())
    sampling = SamplingSettings()
    record = make_record(video, sampling=sampling)
    cache.put(record)

    moved = tmp_path / "elsewhere" / "deeper" / "renamed.mkv"
    moved.parent.mkdir(parents=True)
    os.rename(video, moved)
    key = cache.key_for(moved, sampling, MMSER)
    assert key == record.key
    assert cache.get(key).captions == record.captions

    # The moved copy's path is remembered (gc then keeps the record), once.
    assert cache.add_path(key, moved) is True
    assert cache.add_path(key, moved) is False
    assert cache.get(key).paths == [str(video), str(moved)]
    assert cache.ls()["path"].tolist() == [str(moved)]  # the latest known location


def test_edited_video_misses(tmp_path: Path, real_video: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    video = tmp_path / "clip.mp4"
    data = bytearray(real_video.read_bytes())
    video.write_bytes(data)
    cache.put(make_record(video))
    keys = {cache.key_for(video, SamplingSettings(), MMSER)}

    data[len(data) // 2] ^= 0x01  # one bit in the middle, same size
    video.write_bytes(data)
    keys.add(cache.key_for(video, SamplingSettings(), MMSER))
    video.write_bytes(bytes(data) + b"\0")  # one byte appended
    keys.add(cache.key_for(video, SamplingSettings(), MMSER))
    assert len(keys) == 3
    assert [cache.get(k) is None for k in sorted(keys)].count(True) == 2


def test_large_file_sampled_fingerprint_and_its_blind_spot(tmp_path: Path) -> None:
    """Above FULL_HASH_MAX_BYTES only sampled chunks are read: an edit inside a chunk (and any
    size change) is seen, a same-size edit between chunks is not; `full` mode sees both."""
    size = FULL_HASH_MAX_BYTES + 3 * 1024 * 1024 + 7
    video = tmp_path / "big.mp4"
    with open(video, "wb") as fh:  # sparse: fast to make
        fh.truncate(size)
    offsets = sample_offsets(size)
    assert offsets[0] == 0 and offsets[-1] + SAMPLE_CHUNK_BYTES == size

    def poke(offset: int) -> None:
        with open(video, "r+b") as fh:
            fh.seek(offset)
            fh.write(b"\x01")

    base_sampled, base_full = video_fingerprint(video), video_fingerprint(video, "full")
    assert base_sampled.startswith("b2s1-") and base_full.startswith("b2f1-")
    gap = offsets[10] + SAMPLE_CHUNK_BYTES + 1  # between chunk 10 and chunk 11
    assert gap < offsets[11]
    poke(gap)
    assert video_fingerprint(video) == base_sampled  # the documented trade-off
    assert video_fingerprint(video, "full") != base_full
    poke(offsets[20] + 5)
    assert video_fingerprint(video) != base_sampled
    with open(video, "ab") as fh:
        fh.write(b"x")
    assert len({base_sampled, video_fingerprint(video)}) == 2


def test_sampling_and_captioner_identity_change_the_key() -> None:
    fp = "b2s1-" + "ab" * 20
    base = cache_key(fp, SamplingSettings(), MMSER)
    differ = [
        cache_key("b2s1-" + "cd" * 20, SamplingSettings(), MMSER),
        cache_key(fp, SamplingSettings(fps=0.5), MMSER),
        cache_key(fp, SamplingSettings(policy="uniform"), MMSER),
        cache_key(fp, SamplingSettings(resize=None), MMSER),
        cache_key(fp, SamplingSettings(), SIMPLE),
        cache_key(fp, SamplingSettings(), {**MMSER, "checkpoint": "sha256:ffff"}),
        cache_key(
            fp, SamplingSettings(), {**MMSER, "generation": {**MMSER["generation"], "num_beams": 3}}
        ),
    ]
    assert len({base, *differ}) == len(differ) + 1
    # Settings that cannot change the frames, and equal values spelled differently, hit.
    same = [
        cache_key(fp, SamplingSettings(decode_timeout_s=5.0, num_threads=4), MMSER),
        cache_key(fp, {**SamplingSettings().__dict__, "fps": 1, "resize": (336, 336)}, MMSER),
        cache_key(fp, SamplingSettings(), dict(reversed(list(MMSER.items())))),
    ]
    assert set(same) == {base}
    with pytest.raises(CacheError, match="captioner identity"):
        cache_key(fp, SamplingSettings(), {"checkpoint": "x"})
    with pytest.raises(CacheError, match="captioner.checkpoint"):
        cache_key(fp, SamplingSettings(), {"name": "mmser", "checkpoint": Path("/x")})


def test_different_sampling_or_captioner_misses(tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    video = byte_video(tmp_path / "v.mp4")
    record = make_record(video)
    cache.put(record)
    assert cache.get(cache.key_for(video, SamplingSettings(), MMSER)) == record
    assert cache.get(cache.key_for(video, SamplingSettings(fps=2.0), MMSER)) is None
    assert cache.get(cache.key_for(video, SamplingSettings(), SIMPLE)) is None


def test_put_refuses_a_record_whose_key_does_not_match(tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    record = make_record(byte_video(tmp_path / "v.mp4"))
    record.captioner = SIMPLE  # key no longer matches the contents
    with pytest.raises(CacheError, match="does not match"):
        cache.put(record)
    with pytest.raises(CacheError, match="64 lowercase hex"):
        cache.get("../../etc/passwd")
    assert record_files(cache) == []


# --- corrupt records ------------------------------------------------------------------------


def test_corrupt_record_is_a_miss_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CaptionCache(tmp_path / "cache")
    records = [make_record(byte_video(tmp_path / f"v{i}.mp4", seed=i)) for i in range(4)]
    paths = [cache.put(r) for r in records]
    good = paths[0].read_text()
    paths[0].write_text(good[: len(good) // 2])  # truncated
    paths[1].write_bytes(b"\xff\xfe not json")  # garbage
    data = json.loads(paths[2].read_text())
    data["captions"][0]["caption"] = 7  # wrong type
    paths[2].write_text(json.dumps(data))
    # A valid record of another key under this key's name (e.g. a botched manual copy).
    paths[3].write_text(good)

    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        for record in records:
            assert cache.get(record.key) is None
            assert not cache.contains(record.key)
        assert list(cache.iter_records()) == []
    for path in paths:
        assert str(path) in caplog.text
    assert "treated as a miss" in caplog.text

    cache.put(records[0])  # a fresh put repairs it
    assert cache.get(records[0].key) == records[0]


# --- atomic and concurrent writes -----------------------------------------------------------

# Writes ~1 MB records in a loop until killed.
_LOOP_WRITER = textwrap.dedent(
    """
    import sys
    from pipeline.cache import CacheRecord, CaptionCache
    from pipeline.records import FrameCaption

    cache = CaptionCache(sys.argv[1])
    round_id = sys.argv[2]
    caps = [FrameCaption(float(t), "x" * 300, "y" * 300, 1) for t in range(1500)]
    identity = {"name": "mmser", "checkpoint": "c"}
    for i in range(100000):
        record = CacheRecord.create(
            fingerprint=f"b2s1-{round_id}-{i}", video_id=f"v{i}", path=f"/videos/{i}.mp4",
            duration=1500.0, captions=caps, sampling={"fps": 1.0}, captioner=identity,
        )
        cache.put(record)
        if i == 0:
            print("ready", flush=True)
    """
)


def _wait_for_new_temp(cache: CaptionCache, known: set[Path], timeout_s: float) -> bool:
    """Poll until a temp file not in `known` exists: a write is then in progress."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(temp_files(cache)) - known:
            return True
    return False


def test_writer_killed_mid_write_leaves_no_corrupt_record(tmp_path: Path) -> None:
    """SIGKILL a looping writer the moment one of its writes is seen in progress."""
    cache = CaptionCache(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed_mid_write = 0
    for round_id in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _LOOP_WRITER, str(cache.root), str(round_id)],
            stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready"
            known = set(temp_files(cache))
            _wait_for_new_temp(cache, known, timeout_s=10.0)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        killed_mid_write += bool(set(temp_files(cache)) - known)
    # The kill landed between a temp file's creation and its rename (it stays behind).
    assert killed_mid_write >= 1

    files = record_files(cache)
    assert len(files) >= 4  # every round finished at least one record
    for path in files:  # every record file is whole: it parses and its key checks out
        record = CacheRecord.from_dict(json.loads(path.read_text()), where=str(path))
        assert record.key == path.stem and record.frames == 1500
    assert len(list(cache.iter_records())) == len(files)

    # The killed writers' temp files are gc's to remove; records stay.
    leftovers = temp_files(cache)
    report = cache.gc(temp_max_age_s=0, missing_videos=False)
    assert report.temp_files == leftovers and report.corrupt == []
    assert temp_files(cache) == [] and record_files(cache) == files


# Writes 3 small records, then dies *inside* the write of a big one: past RLIMIT_FSIZE the
# kernel sends SIGXFSZ, whose default action kills the process after a partial write.
_FSIZE_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    from pipeline.cache import CacheRecord, CaptionCache
    from pipeline.records import FrameCaption

    cache = CaptionCache(sys.argv[1])

    def record(i, n, text):
        return CacheRecord.create(
            fingerprint=f"b2s1-fsize-{i}", video_id=f"v{i}", path=f"/videos/{i}.mp4",
            duration=float(n), captions=[FrameCaption(float(t), text) for t in range(n)],
            sampling={"fps": 1.0}, captioner={"name": "mmser", "checkpoint": "c"},
        )

    for i in range(3):
        cache.put(record(i, 5, "small"))
    big = record(3, 2000, "z" * 500)
    print(big.key, flush=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    cache.put(big)
    print("not reached", flush=True)
    """
)


def test_writer_dying_inside_a_write_leaves_no_half_record(tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_WRITER, str(cache.root)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    big_key = proc.stdout.split()[0]
    assert "not reached" not in proc.stdout

    assert len(list(cache.iter_records())) == 3  # the records written before are whole
    for path in record_files(cache):
        CacheRecord.from_dict(json.loads(path.read_text()), where=str(path))
    assert cache.get(big_key) is None  # the interrupted record is a plain miss
    (partial,) = temp_files(cache)  # the half-written bytes went to a temp file only
    assert partial.stat().st_size == 65536 and partial.name.startswith(f".{big_key}.")
    assert cache.gc(temp_max_age_s=0).temp_files == [partial]
    assert temp_files(cache) == []


def _race_writer(root: str, writer: str, shared: int, own: int, barrier) -> None:
    """One of two writer processes: the shared keys (same order: they collide) and its own."""
    cache = CaptionCache(root)
    identity = {"name": "mmser", "checkpoint": "c"}
    jobs = []
    for i in range(max(shared, own)):
        if i < shared:
            jobs.append((f"b2s1-shared-{i}", f"shared{i}"))
        if i < own:
            jobs.append((f"b2s1-{writer}-{i}", f"{writer}{i}"))
    caps = [FrameCaption(float(t), f"by {writer} " * 40) for t in range(1000)]  # ~0.5 MB
    barrier.wait()
    for _ in range(3):  # rewrite every key a few times to widen the race
        for fingerprint, video_id in jobs:
            cache.put(CacheRecord.create(
                fingerprint=fingerprint, video_id=video_id, path=f"/videos/{video_id}.mp4",
                duration=1000.0, captions=caps, sampling={"fps": 1.0}, captioner=identity,
            ))  # fmt: skip


def test_two_writer_processes_leave_only_valid_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "cache")
    shared, own = 8, 6
    identity = {"name": "mmser", "checkpoint": "c"}
    shared_keys = [cache_key(f"b2s1-shared-{i}", {"fps": 1.0}, identity) for i in range(shared)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=_race_writer, args=(root, w, shared, own, barrier)) for w in "AB"
    ]
    for p in procs:
        p.start()
    cache = CaptionCache(root)
    # Read the contested keys while both write: a reader sees a whole record or none.
    hits = 0
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        barrier.wait(timeout=60)
        while any(p.is_alive() for p in procs):
            hits += sum(cache.get(k) is not None for k in shared_keys)
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert "corrupt" not in caplog.text and "cannot read" not in caplog.text
    assert hits > 0

    files = record_files(cache)
    assert len(files) == shared + 2 * own
    records = [CacheRecord.from_dict(json.loads(f.read_text()), where=str(f)) for f in files]
    by_id = {r.video_id: r for r in records}
    assert set(by_id) == {f"shared{i}" for i in range(shared)} | {
        f"{w}{i}" for w in "AB" for i in range(own)
    }
    for record in records:
        writers = {c.caption.split()[1] for c in record.captions}
        assert len(writers) == 1  # one writer's whole record, never a mix
        if not record.video_id.startswith("shared"):
            assert writers == {record.video_id[0]}  # own keys never clobbered
    assert temp_files(cache) == []


# --- tables and gc --------------------------------------------------------------------------


def test_ls_and_export(tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    assert list(cache.ls().columns) == [
        "key", "video_id", "path", "captioner", "frames", "duration", "created",
    ]  # fmt: skip
    assert len(cache.ls()) == 0
    assert cache.export(tmp_path / "empty.parquet") == 0
    assert len(pd.read_parquet(tmp_path / "empty.parquet")) == 0

    a = make_record(byte_video(tmp_path / "a.mp4", seed=1), n=3, video_id="a")
    b = make_record(byte_video(tmp_path / "b.mp4", seed=2), n=2, video_id="b")
    a_simple = make_record(tmp_path / "a.mp4", identity=SIMPLE, n=4, video_id="a")
    for r in (a, b, a_simple):
        cache.put(r)

    table = cache.ls()
    assert len(table) == 3
    rows = {(r.video_id, r.captioner): r for r in table.itertuples()}
    assert rows[("a", "mmser")].frames == 3 and rows[("a", "simple")].frames == 4
    assert rows[("b", "mmser")].path == str(tmp_path / "b.mp4")
    assert rows[("b", "mmser")].duration == 2.0
    assert str(table["created"].dt.tz) == "UTC"

    out = tmp_path / "out" / "captions.parquet"
    assert cache.export(out) == 9
    frames = pd.read_parquet(out)
    assert len(frames) == 9
    for col in ("key", "video_id", "path", "captioner", "timestamp", "caption", "coarse_caption"):
        assert col in frames.columns
    a_rows = frames[frames["key"] == a.key].sort_values("frame")
    assert a_rows["timestamp"].tolist() == [0.0, 1.0, 2.0]
    assert a_rows["caption"].tolist() == [c.caption for c in a.captions]
    assert a_rows["coarse_caption"].tolist() == ["coarse 0", "coarse 1", "coarse 2"]
    assert set(a_rows["captioner"]) == {"mmser"}
    assert json.loads(a_rows["captioner_identity"].iloc[0])["checkpoint"] == MMSER["checkpoint"]
    assert frames.groupby("captioner").size().to_dict() == {"mmser": 5, "simple": 4}
    assert [p.name for p in out.parent.iterdir()] == ["captions.parquet"]  # no temp left


def test_gc_dry_run_then_real(tmp_path: Path) -> None:
    cache = CaptionCache(tmp_path / "cache")
    kept = make_record(byte_video(tmp_path / "kept.mp4", seed=1), video_id="kept")
    gone_video = byte_video(tmp_path / "gone.mp4", seed=2)
    gone = make_record(gone_video, video_id="gone")
    other = make_record(byte_video(tmp_path / "other.mp4", seed=3), identity=SIMPLE)
    broken = make_record(byte_video(tmp_path / "broken.mp4", seed=4), video_id="broken")
    paths = {r.video_id if r is not other else "other": cache.put(r)
             for r in (kept, gone, other, broken)}  # fmt: skip
    paths["broken"].write_text("{")
    gone_video.unlink()
    old_temp = paths["kept"].parent / f".{kept.key}.dead.tmp"
    old_temp.write_text('{"half": ')
    os.utime(old_temp, (time.time() - 3600, time.time() - 3600))
    fresh_temp = paths["kept"].parent / f".{kept.key}.live.tmp"  # a writer in progress
    fresh_temp.write_text("{")
    before = sorted(p for p in cache.records_dir.rglob("*") if p.is_file())

    dry = cache.gc(keep_captioners=[{"name": "mmser"}], dry_run=True)
    assert dry.dry_run
    assert dry.missing_video == [paths["gone"]]
    assert dry.other_captioner == [paths["other"]]
    assert dry.corrupt == [paths["broken"]]
    assert dry.temp_files == [old_temp]
    assert "would remove 1 records of missing videos" in dry.summary()
    assert sorted(p for p in cache.records_dir.rglob("*") if p.is_file()) == before

    real = cache.gc(keep_captioners=[{"name": "mmser"}])
    assert sorted(real.removed) == sorted(dry.removed)
    left = sorted(p for p in cache.records_dir.rglob("*") if p.is_file())
    assert left == sorted([paths["kept"], fresh_temp])
    assert [r.video_id for r in cache.iter_records()] == ["kept"]

    # A full identity keeps only that exact captioner; missing_videos=False keeps the rest.
    cache.put(other)
    report = cache.gc(keep_captioners=[SIMPLE], missing_videos=False)
    assert report.other_captioner == [paths["kept"]]
    assert [r.captioner_name for r in cache.iter_records()] == ["simple"]
