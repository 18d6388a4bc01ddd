"""Streamed, safe extraction of a base backup's tar into an empty directory.

A physical restore writes a repository object into a directory PostgreSQL will then run from, as whoever runs
the command — often root. The tar is authenticated frame by frame before a byte of it reaches here, but a
repository is still not a place to trust with paths: a stolen data key, a bug in a producer, or a tar made by
something else must not be able to write outside the directory. So this reads only what PostgreSQL's own tar
writer produces (``tarCreateHeader`` in ``src/port/tar.c``: ustar headers, names under 100 bytes, regular
files, directories and — with tablespaces — symbolic links in ``pg_tblspc``) and refuses everything else:

* a name that is absolute, has an empty, ``.`` or ``..`` component, or is not UTF-8;
* hard links (PostgreSQL never writes them), device files, FIFOs, pax or GNU extension headers;
* a symbolic link whose target is absolute or climbs out of the directory, and every link in ``pg_tblspc``
  (a tablespace's files are not in this tar: restoring one is not supported yet, and refusing says so rather
  than leaving a link to wherever the source kept it);
* a second entry of a name already written, and bytes after the end-of-archive marker that are not zeros;
* an archive that ends without the two zero blocks that close every tar (a truncated stream).

**No path is ever followed.** Every directory on the way is opened relative to its parent with ``O_NOFOLLOW``
and every file created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so an entry cannot reach through a link made
by an earlier entry, nor overwrite anything. Modes keep at most group read (PostgreSQL accepts 0700 or 0750
data directories); owner and times are not restored: the files belong to whoever runs the restore.

Memory is one partial 512-byte header: data goes straight from the chunk handed in to the file. ``feed`` does
blocking file I/O; the caller runs it in a worker thread. Syncing is ``sync_tree``'s job, once, at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kybdr_agent.errors import IntegrityError

BLOCK: Final = 512
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR: Final = (b"0", b"\0")
_DIRECTORY: Final = b"5"
_SYMLINK: Final = b"2"
_NAMED_TYPES: Final = {
    b"1": "a hard link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
}
_TABLESPACES: Final = "pg_tblspc"
_SHOWN: Final = 120
SYNC_WORKERS: Final = 8


class UnsafeArchive(IntegrityError):
    """The tar holds something a base backup of PostgreSQL does not, or a path that would leave the directory."""


@dataclass
class ExtractStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0


def _shown(name: str) -> str:
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "…")


def _field(header: bytes, start: int, size: int) -> bytes:
    raw = header[start : start + size]
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _octal(header: bytes, start: int, size: int, what: str) -> int:
    raw = header[start : start + size]
    if raw and raw[0] & 0x80:  # base-256, which tar.c's print_tar_number uses past 8 GiB
        return int.from_bytes(raw, "big") & ~(0x80 << (8 * (size - 1)))
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise UnsafeArchive(f"the tar header's {what} field is not a number") from None


def _check_checksum(header: bytes) -> None:
    recorded = _octal(header, 148, 8, "checksum")
    blanked = header[:148] + b" " * 8 + header[156:]
    if recorded != sum(blanked):
        raise UnsafeArchive("a tar header does not match its checksum: the stream is not a tar or is damaged")


def _member_name(header: bytes) -> str:
    raw = _field(header, 0, 100)
    if header[257:262] == b"ustar":
        prefix = _field(header, 345, 155)
        if prefix:
            raw = prefix + b"/" + raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeArchive(f"a tar entry's name is not UTF-8: {raw[:_SHOWN]!r}") from None


def split_member(name: str) -> tuple[str, ...]:
    """The path components of an entry's name, refusing any name that could leave the directory.

    One leading ``./`` is accepted: pg_basebackup itself adds ``./pg_wal/archive_status/`` this way when it
    writes a tar without WAL (``-X none``)."""
    trimmed = name[:-1] if name.endswith("/") else name
    trimmed = trimmed.removeprefix("./")
    parts = tuple(trimmed.split("/"))
    if not trimmed or trimmed.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchive(f"the tar entry {_shown(name)} is not a plain relative path")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in trimmed):
        raise UnsafeArchive(f"the tar entry {_shown(name)} has a control character in its name")
    return parts


def check_symlink(parts: tuple[str, ...], target: str) -> None:
    """A link stays inside the directory: relative, and never above the top once resolved lexically."""
    if parts[0] == _TABLESPACES:
        raise UnsafeArchive(
            f"the backup has a tablespace ({'/'.join(parts)} -> {_shown(target)}): restoring tablespaces is not "
            "supported yet"
        )
    if not target or target.startswith("/") or "\0" in target:
        raise UnsafeArchive(f"the symbolic link {_shown('/'.join(parts))} points outside the directory")
    resolved = posixpath.normpath(posixpath.join(*parts[:-1], target) if len(parts) > 1 else target)
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise UnsafeArchive(f"the symbolic link {_shown('/'.join(parts))} points outside the directory")


class TarExtractor:
    """Feed it the tar's bytes in any chunking; ``finish`` says whether a whole archive arrived."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stats = ExtractStats()
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._pending = bytearray()  # an incomplete header
        self._file_fd: int | None = None
        self._file_name = ""
        self._remaining = 0  # data bytes of the current entry still to come
        self._padding = 0  # zero bytes after them, up to the next block
        self._zero_blocks = 0
        self._ended = False
        self._parent: tuple[tuple[str, ...], int] | None = None  # the last parent directory opened

    # --- the byte stream ---------------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                view = self._write_data(view)
            elif self._padding:
                take = min(self._padding, len(view))
                self._padding -= take
                view = view[take:]
            elif self._ended:
                if any(view):
                    raise UnsafeArchive("the tar has data after its end-of-archive marker")
                return
            else:
                take = min(BLOCK - len(self._pending), len(view))
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) == BLOCK:
                    header, self._pending = bytes(self._pending), bytearray()
                    self._header(header)

    def finish(self) -> ExtractStats:
        """Check the archive ended properly and release every descriptor."""
        try:
            if self._remaining or self._file_fd is not None:
                raise UnsafeArchive(f"the tar ends in the middle of {_shown(self._file_name)}: the stream is truncated")
            if not self._ended:
                raise UnsafeArchive("the tar ends without its end-of-archive marker: the stream is truncated")
            return self.stats
        finally:
            self.close()

    def close(self) -> None:
        """Release descriptors (idempotent); what was written stays for the caller to remove."""
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        self._drop_parent()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # --- entries ------------------------------------------------------------------------------------------

    def _header(self, header: bytes) -> None:
        if not any(header):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._ended = True
            return
        if self._zero_blocks:
            raise UnsafeArchive("the tar has an entry after an end-of-archive block")
        _check_checksum(header)
        if header[257:262] != b"ustar":
            raise UnsafeArchive("the stream is not a ustar archive (PostgreSQL's base backups are)")
        name = _member_name(header)
        kind = header[156:157]
        if kind not in (*_REGULAR, _DIRECTORY, _SYMLINK):
            what = _NAMED_TYPES.get(kind, f"an entry of type {kind!r}")
            raise UnsafeArchive(f"the tar entry {_shown(name)} is {what}, which a PostgreSQL base backup never holds")
        size = _octal(header, 124, 12, "size")
        mode = _octal(header, 100, 8, "mode")
        parts = split_member(name)
        if kind in _REGULAR:
            self._start_file(parts, mode, size)
            return
        if size:
            raise UnsafeArchive(f"the tar entry {_shown(name)} has data but is not a regular file")
        if kind == _DIRECTORY:
            self._make_directory(parts, mode)
        else:
            self._make_symlink(parts, _field(header, 157, 100))

    def _start_file(self, parts: tuple[str, ...], mode: int, size: int) -> None:
        parent = self._open_parent(parts[:-1])
        self._file_name = "/".join(parts)
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            raise UnsafeArchive(f"the tar has {_shown(self._file_name)} twice") from None
        except OSError as exc:
            raise self._cannot(exc) from None
        os.fchmod(fd, (mode & 0o640) | 0o600)
        self.stats.files += 1
        self._file_fd, self._remaining = fd, size
        self._padding = -size % BLOCK
        if not size:
            self._close_file()

    def _write_data(self, view: memoryview) -> memoryview:
        assert self._file_fd is not None
        chunk = view[: self._remaining]
        done = 0
        while done < len(chunk):
            done += os.write(self._file_fd, chunk[done:])
        self._remaining -= len(chunk)
        self.stats.bytes += len(chunk)
        if not self._remaining:
            self._close_file()
        return view[len(chunk) :]

    def _close_file(self) -> None:
        if self._file_fd is not None:
            fd, self._file_fd = self._file_fd, None
            os.close(fd)

    def _make_directory(self, parts: tuple[str, ...], mode: int) -> None:
        parent = self._open_parent(parts[:-1])
        perms = (mode & 0o750) | 0o700
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        except FileExistsError:
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                raise UnsafeArchive(f"the tar has {_shown('/'.join(parts))} twice") from None
        except OSError as exc:
            raise self._cannot(exc) from None
        else:
            self.stats.directories += 1
        os.chmod(parts[-1], perms, dir_fd=parent, follow_symlinks=False)

    def _make_symlink(self, parts: tuple[str, ...], raw_target: bytes) -> None:
        try:
            target = raw_target.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeArchive(f"the symbolic link {_shown('/'.join(parts))} has a target that is not UTF-8") from None
        check_symlink(parts, target)
        parent = self._open_parent(parts[:-1])
        try:
            os.symlink(target, parts[-1], dir_fd=parent)
        except FileExistsError:
            raise UnsafeArchive(f"the tar has {_shown('/'.join(parts))} twice") from None
        self.stats.symlinks += 1

    # --- directories, never through a link ----------------------------------------------------------------

    def _open_parent(self, parts: tuple[str, ...]) -> int:
        if not parts:
            return self._root_fd
        if self._parent is not None and self._parent[0] == parts:
            return self._parent[1]
        self._drop_parent()
        fd = os.dup(self._root_fd)
        try:
            for index, part in enumerate(parts):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:  # tolerated: a tar need not list every directory before its files
                    os.mkdir(part, 0o700, dir_fd=fd)
                    self.stats.directories += 1
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    where = "/".join(parts[: index + 1])
                    raise UnsafeArchive(
                        f"the tar entry under {_shown(where)} would go through something that is not a directory "
                        f"({exc.strerror})"
                    ) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self._parent = (parts, fd)
        return fd

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _cannot(self, exc: OSError) -> OSError:
        return OSError(exc.errno, f"cannot write {self._file_name or 'an entry'} into {self.root}: {exc.strerror}")


def sync_tree(root: Path, *, workers: int = SYNC_WORKERS) -> None:
    """fsync every file and directory under ``root``, then ``root``'s parent (its own entry).

    PostgreSQL syncs the data directory itself when it starts from a base backup (``SyncDataDirectory``: the
    control file says "in production"), but a crash between this restore saying "done" and that start would
    leave files that look complete and are not. pg_basebackup syncs for the same reason. In parallel: one fsync
    after another waits for a journal commit each (4.8 s for a fresh cluster's 1,300 files on this host's ext4),
    eight at a time share them (0.2 s)."""
    files: list[str] = []
    directories: list[str] = []
    for directory, dirnames, filenames in os.walk(root):
        directories.append(directory)
        files.extend(os.path.join(directory, name) for name in filenames)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_fsync_file, files))
        list(pool.map(lambda d: sync_directory(Path(d)), directories))
    sync_directory(root.parent)


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: nothing of its own to sync
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; nothing to do then
            os.fsync(fd)
    finally:
        os.close(fd)
