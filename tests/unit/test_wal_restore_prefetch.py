"""The restore's WAL spool: the prefetcher and the real ``restore_command`` (run by /bin/sh as PostgreSQL 15
runs it) against a folder of WAL files standing in for the repository.

What must hold: every planned file reaches PostgreSQL whole; a file that cannot be fetched makes the command exit
above 125 (recovery aborts) and never 1 (which PostgreSQL takes for the end of the WAL and promotes); while
following a server the spool stays bounded and a segment asked for again after eviction comes back.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kybdr_agent.wal.fetch_plan import SpoolFile
from kybdr_agent.wal.names import Segment, TimelineHistoryFile
from kybdr_agent.wal.prefetch import Prefetcher, PrefetchError
from kybdr_agent.wal.recovery import EXIT_FETCH_FAILED, FAILED_SUFFIX, PENDING_SUFFIX, restore_command
from tests.unit.test_wal_recovery import pg15_substitute

SIZE = 1 << 20


def _segments(count: int, first: int = 2) -> list[SpoolFile]:
    return [SpoolFile(s, s.name) for s in (Segment(1, n, SIZE) for n in range(first, first + count))]


HISTORY = SpoolFile(TimelineHistoryFile(2), TimelineHistoryFile(2).name)


class FolderArchive:
    """WAL files in a folder; ``fetch`` copies one atomically, failing for the names in ``broken``."""

    def __init__(self, root: Path, files: list[SpoolFile]) -> None:
        self.root = root
        self.broken: dict[str, int] = {}  # name -> failures left (a large number: always)
        self.fetches: list[str] = []
        self.gate: anyio.Event | None = None
        root.mkdir()
        for file in files:
            (root / file.spool_name).write_bytes(f"content of {file.spool_name}".encode() * 10)

    async def fetch(self, file: SpoolFile, dest: Path) -> None:
        self.fetches.append(file.spool_name)
        if self.gate is not None:
            await self.gate.wait()
        left = self.broken.get(file.spool_name, 0)
        if left:
            self.broken[file.spool_name] = left - 1
            raise RuntimeError(f"sha256 of {file.spool_name} does not match its record")
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes((self.root / file.spool_name).read_bytes())
        os.replace(tmp, dest)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    return tmp_path / "spool"


def _ask(spool: Path, tmp_path: Path, name: str, wait_seconds: int = 5) -> tuple[int, bytes, str]:
    """PostgreSQL asking restore_command for ``name``: exit status, the bytes it got, what it logged."""
    command = pg15_substitute(restore_command(str(spool), wait_seconds=wait_seconds), "RECOVERYXLOG", name)
    work = tmp_path / "pg_wal"
    work.mkdir(exist_ok=True)
    (work / "RECOVERYXLOG").unlink(missing_ok=True)
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=work, capture_output=True, text=True, check=False)
    got = work / "RECOVERYXLOG"
    return proc.returncode, got.read_bytes() if got.exists() else b"", proc.stderr


def _contents(archive: FolderArchive, name: str) -> bytes:
    return (archive.root / name).read_bytes()


def test_everything_is_fetched_before_the_command_returns(tmp_path: Path, spool: Path) -> None:
    segments = _segments(6)
    archive = FolderArchive(tmp_path / "archive", [HISTORY, *segments])
    prefetcher = Prefetcher(spool, [HISTORY], segments, archive.fetch, concurrency=3)
    prefetcher.prepare()
    assert sorted(p.name for p in spool.iterdir()) == sorted(
        f.spool_name + PENDING_SUFFIX for f in [HISTORY, *segments]
    )
    stats = anyio.run(lambda: prefetcher.run(follow=False))
    assert stats.fetched == 7
    assert prefetcher.complete
    assert not list(spool.glob("*" + PENDING_SUFFIX))
    for file in [HISTORY, *segments]:
        code, got, _ = _ask(spool, tmp_path, file.spool_name)
        assert (code, got) == (0, _contents(archive, file.spool_name))
    assert _ask(spool, tmp_path, "000000010000000000000042")[0] == 1  # not planned: the end of the WAL
    assert _ask(spool, tmp_path, "00000003.history")[0] == 1


def test_a_spool_that_is_not_empty_is_refused(tmp_path: Path, spool: Path) -> None:
    spool.mkdir()
    (spool / "leftover").write_text("x")
    with pytest.raises(PrefetchError, match="not empty"):
        Prefetcher(spool, [], _segments(1), FolderArchive(tmp_path / "a", []).fetch).prepare()


def test_transient_failures_are_retried(tmp_path: Path, spool: Path) -> None:
    segments = _segments(3)
    archive = FolderArchive(tmp_path / "archive", segments)
    archive.broken[segments[1].spool_name] = 2
    prefetcher = Prefetcher(spool, [], segments, archive.fetch, retry_delay=0.01)
    prefetcher.prepare()
    anyio.run(lambda: prefetcher.run(follow=False))
    assert archive.fetches.count(segments[1].spool_name) == 3
    assert prefetcher.complete


def test_a_file_that_never_fetches_aborts_recovery_and_never_reads_as_the_end(tmp_path: Path, spool: Path) -> None:
    segments = _segments(8)
    archive = FolderArchive(tmp_path / "archive", segments)
    bad = segments[2].spool_name
    archive.broken[bad] = 1000
    prefetcher = Prefetcher(spool, [], segments, archive.fetch, concurrency=1, attempts=2, retry_delay=0.01)
    prefetcher.prepare()
    with pytest.raises(PrefetchError, match=f"{bad} could not be fetched.*does not match"):
        anyio.run(lambda: prefetcher.run(follow=False))
    code, _, logged = _ask(spool, tmp_path, bad)
    assert code == EXIT_FETCH_FAILED > 125
    assert "does not match its record" in logged
    # What was never fetched is still pending; once the restore gives up it must fail too, not look absent.
    later = segments[5].spool_name
    assert (spool / (later + PENDING_SUFFIX)).exists()
    prefetcher.abandon("the base backup did not verify")
    code, _, logged = _ask(spool, tmp_path, later)
    assert code == EXIT_FETCH_FAILED
    assert "abandoned before" in logged
    assert (spool / (bad + FAILED_SUFFIX)).read_text().count("does not match") == 1  # the first reason is kept
    assert _ask(spool, tmp_path, segments[0].spool_name)[0] == 0  # fetched before the failure: still served


def test_the_command_waits_for_a_file_being_fetched(tmp_path: Path, spool: Path) -> None:
    segments = _segments(2)
    archive = FolderArchive(tmp_path / "archive", segments)
    prefetcher = Prefetcher(spool, [], segments, archive.fetch)
    prefetcher.prepare()

    async def main() -> tuple[int, bytes, str]:
        archive.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: prefetcher.run(follow=True))
            await anyio.sleep(0.3)

            async def release() -> None:
                await anyio.sleep(0.5)
                assert archive.gate is not None
                archive.gate.set()

            tg.start_soon(release)
            result = await anyio.to_thread.run_sync(_ask, spool, tmp_path, segments[1].spool_name)
            tg.cancel_scope.cancel()
        return result

    code, got, _ = anyio.run(main)
    assert (code, got) == (0, _contents(archive, segments[1].spool_name))


def test_following_a_server_keeps_the_spool_bounded_and_refetches_what_it_asks_again(
    tmp_path: Path, spool: Path
) -> None:
    segments = _segments(20)
    archive = FolderArchive(tmp_path / "archive", [HISTORY, *segments])
    prefetcher = Prefetcher(
        spool, [HISTORY], segments, archive.fetch, lookahead=3, keep_behind=1, poll_seconds=0.02, concurrency=2
    )
    prefetcher.prepare()

    def on_disk() -> set[str]:
        return {p.name for p in spool.iterdir() if "." not in p.name or p.name.endswith(".history")}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: prefetcher.run(follow=True))
            await anyio.sleep(0.3)
            # Nothing asked yet: the history and the first lookahead segments only.
            assert on_disk() == {HISTORY.spool_name, *(s.spool_name for s in segments[:3])}
            for index, file in enumerate(segments):
                code, got, _ = await anyio.to_thread.run_sync(_ask, spool, tmp_path, file.spool_name)
                assert (code, got) == (0, _contents(archive, file.spool_name)), file.spool_name
                await anyio.sleep(0.05)
                held = {n for n in on_disk() if n != HISTORY.spool_name}
                assert len(held) <= 3 + 1 + 1 + 2, (index, sorted(held))  # lookahead, current, behind, slack
            await anyio.sleep(0.1)
            assert segments[0].spool_name not in on_disk()  # evicted
            # A server restarting its recovery asks for an evicted segment again: it comes back.
            code, got, _ = await anyio.to_thread.run_sync(_ask, spool, tmp_path, segments[0].spool_name)
            assert (code, got) == (0, _contents(archive, segments[0].spool_name))
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert prefetcher.stats.evicted >= 15
    assert prefetcher.stats.refetched >= 1
    assert HISTORY.spool_name in on_disk()  # histories are never evicted
