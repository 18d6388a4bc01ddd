"""A repository in a local folder: the development default, the tests' workhorse, and NFS-style mounts.

Every object is written to a temp file in its final directory, fsynced, renamed into place and the
directory fsynced, so a crash or a kill at any moment leaves either the old state or the complete object —
never a file that looks complete but is not. Blocking file calls run in worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final

import anyio

from kybdr_agent.errors import NotFound, StoreError
from kybdr_agent.storage.base import BlobWriter, IncompleteUpload, ObjectInfo, UploadResult

TEMP_MARKER: Final = ".kybdr-tmp-"


WRITEBACK_STEP: Final = 8 << 20
_SYNC_FILE_RANGE_WRITE: Final = 2


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(2): start writeback of a range without waiting for it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, length: int) -> None:
        func(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only costs fsync time later

    return start_writeback


_start_writeback = _load_sync_file_range()


class _FileWriter:
    """Appends in a worker thread and starts writeback every 8 MiB, so the final fsync finds little to do
    and the dump's pages never pile up dirty in the page cache."""

    def __init__(self, fh: IO[bytes], result: UploadResult) -> None:
        self._fh = fh
        self._result = result
        self._flushed_to = 0

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:  # an unbuffered write may be partial
            written = self._fh.write(view)
            view = view[written or 0 :]
        end = self._result.size + len(data)
        if _start_writeback is not None and end - self._flushed_to >= WRITEBACK_STEP:
            _start_writeback(self._fh.fileno(), self._flushed_to, end - self._flushed_to)
            self._flushed_to = end

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await anyio.to_thread.run_sync(self._write, data)
        except OSError as exc:
            raise StoreError(f"writing {self._fh.name} failed: {exc.strerror}") from exc
        self._result.size += len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a folder: the lock the conditional writes of one folder take.

    The folder itself is locked rather than a lock file beside the object, because every file in a
    repository is an object to ``list_objects`` (and a temp-marked one would be swept by ``abort_incomplete``
    while held). Blocks until the lock is free; conditional writes are small, so it is never held long."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _etag(data: bytes) -> str:
    """A folder object's etag: the SHA-256 of its content (the same content always has the same etag,
    which is all compare-and-swap needs: a writer that read it can tell whether it changed since)."""
    return hashlib.sha256(data).hexdigest()


def _unreadable_folder(exc: OSError) -> None:
    """A folder the walk cannot open would otherwise read as empty ("no backups"); one removed while we walk
    (a concurrent cleanup) is simply gone."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


class LocalStore:
    kind = "file"

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def describe(self) -> str:
        return f"file://{self._root}"

    async def space(self) -> tuple[int, int] | None:
        """Free and total bytes of the folder's filesystem (for the "repository running low" alert), or
        None when the folder does not exist yet: free space an unprivileged writer can use, not root's."""

        def measure() -> tuple[int, int] | None:
            try:
                fs = os.statvfs(self._root)
            except FileNotFoundError:
                return None
            return fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize

        return await anyio.to_thread.run_sync(measure)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"refusing unsafe object key {key!r}")
        return self._root.joinpath(*parts)

    def _temp_for(self, path: Path) -> Path:
        return path.with_name(f"{TEMP_MARKER}{path.name}.{secrets.token_hex(6)}")

    @asynccontextmanager
    async def open_upload(self, key: str, *, size_hint: int | None, result: UploadResult) -> AsyncIterator[BlobWriter]:
        path = self._path(key)
        temp = self._temp_for(path)
        try:
            await anyio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
            fh = await anyio.to_thread.run_sync(lambda: open(temp, "xb", buffering=0))  # noqa: SIM115
        except OSError as exc:
            raise StoreError(f"cannot create {temp}: {exc.strerror}") from exc
        committed = False
        try:
            yield _FileWriter(fh, result)
            try:
                await anyio.to_thread.run_sync(self._commit, fh, temp, path)
            except OSError as exc:
                raise StoreError(f"writing {path} failed: {exc.strerror}") from exc
            committed = True
        finally:
            if not committed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._discard, fh, temp)

    @staticmethod
    def _commit(fh: IO[bytes], temp: Path, path: Path) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(temp, path)
        _fsync_dir(path.parent)

    def _discard(self, fh: IO[bytes], temp: Path) -> None:
        fh.close()
        self._remove(temp)

    async def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        temp = self._temp_for(path)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(temp, "xb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(temp, path)
                _fsync_dir(path.parent)
            finally:
                if temp.exists():
                    self._remove(temp)  # a failed write (a full disk) leaves no temp file or empty folder

        try:
            await anyio.to_thread.run_sync(write)
        except OSError as exc:
            raise StoreError(f"writing {path} failed: {exc.strerror}") from exc

    async def get_bytes(self, key: str, *, max_size: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as fh:
                data = fh.read(max_size + 1)
            if len(data) > max_size:
                raise StoreError(f"{path} is larger than {max_size} bytes")
            return data

        try:
            return await anyio.to_thread.run_sync(read)
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror}") from exc

    def _write_temp(self, path: Path, data: bytes) -> Path:
        """``data`` in a fsynced temp file beside ``path`` (not yet visible under its key)."""
        temp = self._temp_for(path)
        try:
            with open(temp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

    @staticmethod
    def _read_bounded(path: Path, max_size: int) -> bytes:
        with open(path, "rb") as fh:
            data = fh.read(max_size + 1)
        if len(data) > max_size:
            raise StoreError(f"{path} is larger than {max_size} bytes")
        return data

    async def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if absent: the complete, fsynced content is hard-linked into place.

        ``link(2)`` fails with EEXIST when the name exists, atomically, whoever else writes (even a plain
        ``put_bytes``); and the object appears complete or not at all, which an ``O_EXCL`` create of the
        final name followed by writes would not give a reader. On a filesystem without hard links the check
        and the rename happen under the folder's lock instead, which excludes the other conditional writes.
        """
        path = self._path(key)

        def create() -> str | None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked_dir(path.parent):
                temp = self._write_temp(path, data)
                try:
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        return None
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                            raise
                        if path.exists():  # no hard links here: the folder lock makes check-then-rename safe
                            return None
                        os.replace(temp, path)
                finally:
                    temp.unlink(missing_ok=True)
                _fsync_dir(path.parent)
            return _etag(data)

        try:
            return await anyio.to_thread.run_sync(create)
        except OSError as exc:
            raise StoreError(f"creating {path} failed: {exc.strerror}") from exc

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace ``key`` only if its content still hashes to ``etag``: compare and rename under the
        folder's lock, so two conditional writers never both succeed against the same version."""
        path = self._path(key)

        def swap() -> str | None:
            if not path.parent.is_dir():
                return None
            with _locked_dir(path.parent):
                try:
                    with open(path, "rb") as fh:
                        current = _etag(fh.read())
                except FileNotFoundError:
                    return None
                if current != etag:
                    return None
                temp = self._write_temp(path, data)
                try:
                    os.replace(temp, path)
                finally:
                    temp.unlink(missing_ok=True)
                _fsync_dir(path.parent)
            return _etag(data)

        try:
            return await anyio.to_thread.run_sync(swap)
        except OSError as exc:
            raise StoreError(f"replacing {path} failed: {exc.strerror}") from exc

    async def get_with_etag(self, key: str, *, max_size: int) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            data = await anyio.to_thread.run_sync(self._read_bounded, path, max_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror}") from exc
        return data, _etag(data)

    async def read(self, key: str, *, start: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await anyio.to_thread.run_sync(lambda: open(path, "rb"))  # noqa: SIM115
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror}") from exc
        try:
            if start:
                fh.seek(start)
            while chunk := await anyio.to_thread.run_sync(fh.read, chunk_size):
                yield chunk
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror}") from exc
        finally:
            fh.close()

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = await anyio.to_thread.run_sync(path.stat)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {path}: {exc.strerror}") from exc
        return ObjectInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            if not self._root.exists():
                return found
            for dirpath, dirnames, filenames in os.walk(self._root, onerror=_unreadable_folder):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.startswith(TEMP_MARKER):
                        continue
                    full = Path(dirpath, name)
                    rel = full.relative_to(self._root).as_posix()
                    if rel.startswith(prefix):
                        try:
                            st = full.stat()
                        except FileNotFoundError:
                            continue  # renamed or deleted by a concurrent job while we walked
                        found.append(ObjectInfo(rel, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
            return found

        try:
            items = await anyio.to_thread.run_sync(walk)
        except OSError as exc:
            raise StoreError(f"listing {self._root} failed: {exc.strerror}") from exc
        for item in items:
            yield item

    def _remove(self, path: Path) -> None:
        """Unlink ``path`` and every folder above it that this leaves empty: a folder repository keeps no
        empty backup folders behind, as an S3 prefix would not."""
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self._root:
            try:
                parent.rmdir()
            except OSError as exc:
                # ENOENT: a concurrent delete got there first, so carry on upwards.
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    break
                if exc.errno != errno.ENOENT:
                    raise
            parent = parent.parent

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await anyio.to_thread.run_sync(self._remove, path)
        except OSError as exc:
            raise StoreError(f"deleting {path} failed: {exc.strerror}") from exc

    async def incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        """Temp files a killed agent left behind (the folder equivalent of open multipart uploads)."""

        def walk() -> list[IncompleteUpload]:
            found: list[IncompleteUpload] = []
            if not self._root.exists():
                return found
            for dirpath, _dirs, filenames in os.walk(self._root):
                for name in filenames:
                    if name.startswith(TEMP_MARKER):
                        full = Path(dirpath, name)
                        rel = full.relative_to(self._root).as_posix()
                        if rel.startswith(prefix):
                            try:
                                mtime = datetime.fromtimestamp(full.stat().st_mtime, UTC)
                            except FileNotFoundError:
                                continue  # its upload just committed or aborted
                            found.append(IncompleteUpload(key=rel, upload_id=name, initiated=mtime))
            return found

        try:
            return await anyio.to_thread.run_sync(walk)
        except OSError as exc:
            raise StoreError(f"listing {self._root} failed: {exc.strerror}") from exc

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        path = self._path(upload.key)
        if not path.name.startswith(TEMP_MARKER):
            raise StoreError(f"refusing to remove {upload.key}: not a temp file")
        try:
            await anyio.to_thread.run_sync(self._remove, path)
        except OSError as exc:
            raise StoreError(f"removing {path} failed: {exc.strerror}") from exc

    async def aclose(self) -> None:
        return None
