"""Checked HDF5 reading and atomic HDF5 writing shared by every detector's file layout.

Detectors differ in their keys and widths (ZDC: ``ecal``/``hcal``; CaloChallenge:
``showers``), but the failure modes of a user's file are the same everywhere: missing,
not HDF5, truncated, a key absent or a link that leads nowhere, a group or a string where
a float array belongs, a declared shape far beyond what the file stores, corrupt
compressed chunks, NaN, negative energies, rows that do not line up. Checking them here
once gives every reader the same one-line :class:`~calotune.errors.UserError` naming the
file, the key, the rule and the fix, instead of a numpy or h5py traceback (or an attempt
to allocate hundreds of GiB) three calls later inside a training loop.

Writing has its own failure modes: the output may be one of the inputs, the disk may
fill up, a file-size limit may be hit, the writer may be killed. Every write goes to a
hidden temporary in the target folder that is renamed over the target only when it is
complete, so the target is never half-written; temporaries of writers that died are
removed by the next write into the folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from calotune.errors import UserError

log = logging.getLogger(__name__)

#: The attribute value types an HDF5 attribute written by calotune may hold.
AttrValue = str | int | float

#: What h5py raises for a file it cannot make sense of (no common base class exists).
H5_ERRORS: tuple[type[BaseException], ...] = (OSError, KeyError, RuntimeError, ValueError, TypeError)

#: Deflate cannot shrink data more than ~1032:1, so a dataset declaring more than this
#: many bytes per stored byte has chunks that were never written: its "data" would be
#: fill values conjured from nothing (and an allocation the file cannot back).
MAX_COMPRESSION_RATIO = 1100
#: Declared sizes below this are never refused for lack of storage (cheap to read).
_STORAGE_SLACK = 1 << 20
#: HDF5 decompresses whole chunks; a chunk this large would need that much memory at once.
MAX_CHUNK_BYTES = 1 << 30
#: Rows are read in blocks of about this many bytes, so memory beyond the result stays bounded.
READ_BLOCK_BYTES = 16 << 20
#: Attributes calotune does not interpret are skipped above this size, never read.
MAX_ATTR_BYTES = 64 << 10


# --------------------------------------------------------------------------- messages


def error_cause(exc: BaseException) -> str:
    """The OS-level cause of an I/O error in a few words ("No space left on device").

    h5py folds the C errno into a long multi-line message ("... errno = 28, error
    message = 'No space left on device' ..."); users need the last part only.
    """
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        match = re.search(r"errno = (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _write_hint(exc: BaseException) -> str:
    """What to do about a failed write, by cause."""
    cause = error_cause(exc)
    if "ENOSPC" in cause or "EDQUOT" in cause:
        return "free disk space or write to another folder"
    if "EFBIG" in cause:
        return (
            "the file-size limit (ulimit -f) or the filesystem's maximum file size was reached; "
            "write fewer events or elsewhere"
        )
    if "EACCES" in cause or "EPERM" in cause or "EROFS" in cause:
        return "choose a folder you can write to"
    return "check the disk and the folder, then run again"


def write_error(path: Path | str, exc: BaseException) -> UserError:
    """The one-line UserError for a write of ``path`` that failed with ``exc``."""
    return UserError(f"{path}: cannot write ({error_cause(exc)}); nothing was written; {_write_hint(exc)}")


def _from_h5py(tb: TracebackType | None) -> bool:
    """Whether an exception was raised inside h5py (and so is about the file, not a bug)."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "h5py" in Path(last.tb_frame.f_code.co_filename).parts


def _gib(nbytes: float) -> str:
    """A byte count for messages, in the unit that keeps it readable."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{int(nbytes)} bytes"


# --------------------------------------------------------------------------- resources


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit.

    A container's memory limit is invisible in /proc/meminfo, and exceeding it is an
    OOM kill rather than a MemoryError, so both are consulted.
    """
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(int(limit) - used, 0))
    if not candidates:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    with contextlib.suppress(OSError, ValueError):
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            candidates.append(soft)
    return min(candidates) if candidates else 1 << 62


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse up front to allocate ``nbytes`` that this machine cannot give.

    ``what`` completes "<what> needs N GiB"; ``fix`` says how to ask for less.
    """
    free = available_memory()
    if nbytes > free:
        raise UserError(f"{what} needs {_gib(nbytes)} of memory but only {_gib(free)} is available; {fix}")


def check_free_space(path: Path | str, nbytes: int, what: str, fix: str) -> None:
    """Refuse up front to write ``nbytes`` into ``path``'s folder when the disk lacks them."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folder is created later, on this filesystem
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise UserError(f"{path}: cannot check the free space of {folder} ({error_cause(exc)})") from None
    if nbytes > free:
        raise UserError(
            f"{what}: the output needs up to {_gib(nbytes)} but {folder} has only {_gib(free)} free; {fix}"
        )


# --------------------------------------------------------------------------- outputs


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file: same inode (hard links, symlinks) or same real path."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(
    path: Path | str,
    flag: str,
    inputs: Mapping[str, Path | str | None] | None = None,
    *,
    create_parents: bool = False,
) -> None:
    """Refuse an output path before any work is done, naming ``flag``.

    Refused: a folder, a device or other special file (renaming over /dev/null would
    replace it), a missing (unless ``create_parents``) or unwritable parent folder, and any path that is one of
    ``inputs`` (label -> path) under another spelling, a symlink or a hard link: writing
    there would destroy the input the command is reading.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if path.is_dir():
        raise UserError(f"{where} is a folder; give a file name inside it, e.g. {flag} {path / 'out.h5'}")
    if path.exists() and not path.is_file():
        raise UserError(f"{where} exists and is not a regular file; choose a file name")
    parent = path.absolute().parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent  # the first folder that exists must let us create the rest
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a folder"
        raise UserError(f"{where}: folder {parent} {what}; create it first (mkdir -p {parent}) or fix the path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{where}: cannot write into folder {parent} (permission denied); choose a writable place")
    for label, source in (inputs or {}).items():
        if source is not None and same_file(path, source):
            raise UserError(
                f"{where} is the same file as {label} {source}; writing it would destroy that input; "
                "choose another output file"
            )


def check_output_folder(path: Path | str, flag: str, inputs: Mapping[str, Path | str | None] | None = None) -> None:
    """Like :func:`check_output` for an output folder (created later if missing)."""
    path = Path(path)
    for label, source in (inputs or {}).items():
        if source is not None and same_file(path, source):
            raise UserError(f"{flag} {path} is the same path as {label} {source}; choose another folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder; choose a folder name")


# --------------------------------------------------------------------------- temporaries

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.calotune-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})\.tmp$")
#: the format before the host was recorded; removed only when old and its pid is dead here.
_LEGACY_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")
_LEGACY_MIN_AGE_S = 3600.0


def temporary_path(path: Path) -> Path:
    """The hidden temporary a write of ``path`` goes through.

    Host + pid say who wrote it, so a later write can tell a dead writer's leftover from
    a live one's file (also on a folder shared between nodes); the token keeps two
    writers of one name in one process apart. Not mkstemp, whose 0600 mode would survive
    the rename and hide a shared cache file from other users.
    """
    return path.with_name(f".{path.name}.calotune-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def _pid_alive(pid: int, written_at: float) -> bool:
    """Whether ``pid`` may still be the process that last wrote a file at ``written_at``.

    A zombie is dead; a live process that started after the file was last written is a
    reused pid, not the writer. When in doubt the answer is "alive": deleting a live
    writer's file is worse than keeping a dead one's.
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False
    boot = _boot_time()
    if boot is not None:
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > written_at + 2.0:
            return False
    return True


def remove_stale_temporaries(folder: Path | str) -> list[Path]:
    """Delete temporaries left in ``folder`` by writers on this host that are gone.

    A SIGKILLed or OOM-killed writer cannot clean up after itself; without this its
    hidden ``.name.calotune-HOST-PID-TOKEN.tmp`` would stay for good. Files of live
    writers and of other hosts are never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        match = _TMP_RE.match(entry.name)
        legacy = None if match else _LEGACY_TMP_RE.match(entry.name)
        if match is None and legacy is None:
            continue
        if match is not None and match["host"] != _HOST:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int((match or legacy)["pid"])  # type: ignore[index]
        if legacy is not None and now - mtime < _LEGACY_MIN_AGE_S:
            continue
        if _pid_alive(pid, mtime):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.debug("cannot remove stale temporary %s: %s", entry.path, exc)
            continue
        log.info("removed %s, left behind by writer %d that is no longer running", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


def _fsync(path: Path) -> None:
    """Flush a finished temporary to disk before the rename makes it visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(path: Path) -> Path:
    """Create the folder, sweep dead writers' temporaries, and name this write's temporary."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    remove_stale_temporaries(path.parent)
    return temporary_path(path)


class _GuardedIO:
    """The file object HDF5 writes through: an OS write error is recorded, never shown to HDF5.

    HDF5 does not survive a failed write: after ENOSPC or EFBIG its caches stay dirty,
    every later flush fails again (h5py prints a traceback from each deallocator) and
    closing the file can crash the process. Handing h5py this object instead of a path
    (its "fileobj" driver) keeps HDF5's view of the world consistent: once a write fails,
    the error is kept, later writes go nowhere, and reads of what was lost read zeros.
    The writer checks :attr:`error` after each step and discards the temporary.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w+b", buffering=0)  # closed in close()
        self._pos = 0
        self._size = 0
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        if self.error is None:
            try:
                self._file.seek(self._pos)
                got = self._file.readinto(view) or 0
            except OSError as exc:
                self.error = exc
                got = 0
        view[got:] = b"\0" * (len(view) - got)  # beyond what was stored: zeros, like HDF5 expects
        n = min(len(view), max(self._size - self._pos, 0))
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        size = max(self._size - self._pos, 0) if size is None or size < 0 else size
        buffer = bytearray(size)
        n = self.readinto(buffer)
        return bytes(buffer[:n])

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                self._file.seek(self._pos)
                done = 0
                while done < len(view):
                    written = self._file.write(view[done:])
                    if not written:
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    done += written
            except OSError as exc:
                self.error = exc
        self._pos += len(view)
        self._size = max(self._size, self._pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._file.truncate(size)
            except OSError as exc:
                self.error = exc
        self._size = size
        return size

    def flush(self) -> None:
        return None  # unbuffered: nothing held here

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    def check(self, path: Path) -> None:
        """Raise the recorded write error as the UserError for ``path``."""
        if self.error is not None:
            raise write_error(path, self.error)


def _open_write(tmp: Path) -> tuple[h5py.File, _GuardedIO]:
    guard = _GuardedIO(tmp)
    try:
        return h5py.File(guard, "w"), guard
    except BaseException:
        guard.close()
        raise


def _discard(file: h5py.File | None, guard: _GuardedIO | None, tmp: Path) -> None:
    """Close a failed write's file (its errors are secondary) and remove the temporary."""
    if file is not None:
        with contextlib.suppress(Exception):
            file.close()
    if guard is not None:
        guard.close()
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _finish(file: h5py.File, guard: _GuardedIO, tmp: Path, path: Path) -> None:
    """Close, check for a recorded write error, make durable and publish ``tmp`` as ``path``."""
    file.close()
    guard.check(path)
    os.fsync(guard._file.fileno())
    guard.close()
    os.replace(tmp, path)


def _write_attrs(file: h5py.File, attrs: Mapping[str, AttrValue] | None) -> None:
    for key, value in (attrs or {}).items():
        file.attrs[key] = value


def atomic_write(
    path: Path | str,
    datasets: Mapping[str, np.ndarray],
    attrs: Mapping[str, AttrValue] | None = None,
    *,
    compression_level: int = 4,
) -> None:
    """Write gzip-compressed datasets and attributes to ``path`` all-or-nothing.

    The data goes to a hidden temporary file in the same folder, then ``os.replace``
    renames it over ``path``: rename is atomic on one filesystem, so a crash, a Ctrl-C, a
    full disk or two workers writing the same cache file never leave a half-written HDF5
    that a later read would trip over. A failed write (ENOSPC, EFBIG, ...) is one
    :class:`UserError` naming ``path`` and the cause, with the temporary removed.
    """
    path = Path(path)
    tmp = _prepare(path)
    file: h5py.File | None = None
    guard: _GuardedIO | None = None
    try:
        file, guard = _open_write(tmp)
        for key, value in datasets.items():
            file.create_dataset(key, data=value, compression="gzip", compression_opts=compression_level)
            guard.check(path)
        _write_attrs(file, attrs)
        _finish(file, guard, tmp, path)
    except UserError:
        _discard(file, guard, tmp)
        raise
    except (OSError, RuntimeError) as exc:
        _discard(file, guard, tmp)
        raise write_error(path, guard.error if guard is not None and guard.error else exc) from None
    except BaseException:
        _discard(file, guard, tmp)
        raise
    log.debug("wrote %s", path)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a text file all-or-nothing (temporary + rename), like :func:`atomic_write`."""
    path = Path(path)
    tmp = _prepare(path)
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(None, None, tmp)
        raise write_error(path, exc) from None
    except BaseException:
        _discard(None, None, tmp)
        raise


class StreamWriter:
    """Append row blocks to resizable, chunked, gzip datasets; publish ``path`` at the end.

    ``with StreamWriter(path, attrs) as w: w.append({"key": (B, width) array, ...})``.
    Memory is bounded by one block, however many rows are written. The datasets are
    created on the first append with that block's keys, dtypes and widths, and grow
    along the first axis; the file appears under ``path`` only when the ``with`` block
    ends without an exception (the same all-or-nothing rule as :func:`atomic_write`).
    """

    def __init__(
        self,
        path: Path | str,
        attrs: Mapping[str, AttrValue] | None = None,
        *,
        compression_level: int = 4,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self.compression_level = compression_level
        self.chunk_bytes = chunk_bytes
        self.rows = 0
        self._tmp: Path | None = None
        self._file: h5py.File | None = None
        self._guard: _GuardedIO | None = None

    def __enter__(self) -> StreamWriter:
        self._tmp = _prepare(self.path)
        try:
            self._file, self._guard = _open_write(self._tmp)
            _write_attrs(self._file, self.attrs)
            self._guard.check(self.path)
        except (OSError, RuntimeError, UserError) as exc:
            self._raise(exc)
        return self

    def _raise(self, exc: BaseException) -> None:
        """Discard the temporary and raise the write error (the recorded OS cause first)."""
        guard = self._guard
        self._fail()
        if isinstance(exc, UserError):
            raise exc
        raise write_error(self.path, guard.error if guard is not None and guard.error else exc) from None

    def append(self, datasets: Mapping[str, np.ndarray]) -> None:
        """Append one block; every dataset must have the same number of rows."""
        if self._file is None or self._guard is None:
            raise RuntimeError("StreamWriter.append outside its with block")
        rows = {len(v) for v in datasets.values()}
        if len(rows) != 1:
            raise ValueError(f"StreamWriter.append: datasets disagree on the number of rows: {sorted(rows)}")
        n = rows.pop()
        try:
            for key, value in datasets.items():
                value = np.asarray(value)
                dataset = self._dataset(key, value)
                if dataset.shape[1:] != value.shape[1:] or dataset.shape[0] != self.rows:
                    raise ValueError(
                        f"StreamWriter.append: {key!r} block {value.shape} does not extend {dataset.shape}"
                    )
                dataset.resize(self.rows + n, axis=0)
                dataset[self.rows :] = value
            self._guard.check(self.path)  # stop at the first failed write, not after the last batch
        except (OSError, RuntimeError, UserError) as exc:
            self._raise(exc)
        self.rows += n

    def _dataset(self, key: str, value: np.ndarray) -> h5py.Dataset:
        """``key``'s growable dataset, created on first use with chunks of ~chunk_bytes."""
        if key not in self._file:
            row_bytes = max(int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize, 1)
            chunk_rows = max(1, min(self.chunk_bytes // row_bytes, 1 << 16))
            self._file.create_dataset(
                key, shape=(0, *value.shape[1:]), maxshape=(None, *value.shape[1:]), dtype=value.dtype,
                chunks=(chunk_rows, *value.shape[1:]), compression="gzip",
                compression_opts=self.compression_level,
            )
        return self._file[key]

    def extend(self, datasets: Mapping[str, np.ndarray]) -> None:
        """Like :meth:`append`, but every dataset grows by its own row count.

        For ragged layouts (point clouds: ``hits`` grows by hits, ``offsets`` by events).
        :attr:`rows` is not changed: the caller counts its events. Do not mix with
        :meth:`append` on the same datasets.
        """
        if self._file is None or self._guard is None:
            raise RuntimeError("StreamWriter.extend outside its with block")
        try:
            for key, value in datasets.items():
                value = np.asarray(value)
                dataset = self._dataset(key, value)
                if dataset.shape[1:] != value.shape[1:]:
                    raise ValueError(f"StreamWriter.extend: {key!r} block {value.shape} cannot extend {dataset.shape}")
                start = dataset.shape[0]
                if len(value):
                    dataset.resize(start + len(value), axis=0)
                    dataset[start:] = value
            self._guard.check(self.path)
        except (OSError, RuntimeError, UserError) as exc:
            self._raise(exc)

    def _fail(self) -> None:
        if self._tmp is not None:
            _discard(self._file, self._guard, self._tmp)
        self._file = self._guard = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._fail()
            return
        assert self._file is not None and self._guard is not None and self._tmp is not None
        try:
            _finish(self._file, self._guard, self._tmp, self.path)
            self._file = self._guard = None
        except (OSError, RuntimeError, UserError) as exc:
            self._raise(exc)
        except BaseException:
            self._fail()
            raise
        log.debug("wrote %d rows to %s", self.rows, self.path)


# --------------------------------------------------------------------------- reading


class CheckedFile(h5py.File):
    """An h5py file whose context turns any h5py error raised inside it into a UserError.

    The readers check everything they can foresee, with precise messages; this is the
    safety net for what h5py still raises on a damaged file (a corrupt object header,
    a B-tree pointing past the end) so that it still ends as one line naming the file.
    Errors raised by calotune's own code pass through unchanged: they are bugs.
    """

    checked_path: Path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            super().__exit__(exc_type, exc, tb)
        if exc is not None and not isinstance(exc, UserError) and isinstance(exc, H5_ERRORS) and _from_h5py(tb):
            raise UserError(
                f"{self.checked_path}: cannot be read ({error_cause(exc)}); the file is corrupt or truncated; "
                "re-copy or re-write it"
            ) from None


def open_checked(path: Path | str) -> CheckedFile:
    """Open ``path`` read-only, turning "no such file", "not HDF5" and "truncated" into UserError.

    h5py's own errors ("unable to synchronously open file (file signature not found)")
    do not tell a user which of their flags to change; these messages do.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: file not found (looked in {path.absolute().parent}); "
            "check the path, or create it with `python -m calotune.data synth`"
        )
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an HDF5 file; pass the .h5 file inside it")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except H5_ERRORS as exc:
        raise UserError(f"{path}: cannot be read ({error_cause(exc)})") from None
    if not is_hdf5:
        raise UserError(
            f"{path}: not an HDF5 file (no HDF5 signature); pass a file written with h5py in the documented layout"
        )
    try:
        file = CheckedFile(path, "r")
    except H5_ERRORS as exc:
        raise UserError(
            f"{path}: cannot be opened as HDF5 ({error_cause(exc)}); is it truncated? re-copy or re-write it"
        ) from None
    file.checked_path = path
    return file


def _link(file: h5py.File, key: str, path: Path | str) -> h5py.HardLink | h5py.SoftLink | h5py.ExternalLink | None:
    try:
        return file.get(key, getlink=True)
    except H5_ERRORS as exc:
        raise UserError(f"{path}: key {key!r} cannot be read ({error_cause(exc)}); the file is corrupt") from None


def require_keys(file: h5py.File, path: Path | str, expected: Iterable[str], layout: str) -> None:
    """Refuse a file that lacks any of ``expected``, listing what it needs and what it has.

    ``layout`` names the layout in the message (e.g. "a zdc file"). A link that exists but
    leads nowhere is not "missing": :func:`get_dataset` says where it points.
    """
    expected = list(expected)
    missing = [k for k in expected if _link(file, k, path) is None]
    if missing:
        try:
            found = ", ".join(sorted(file.keys())) or "nothing"
        except H5_ERRORS:
            found = "unreadable"
        raise UserError(
            f"{path}: key {missing[0]!r} is missing; {layout} needs the datasets "
            f"{', '.join(expected)} (found: {found}); write the file in that layout or pass "
            "the right --detector"
        )


def get_dataset(file: h5py.File, key: str, path: Path | str) -> h5py.Dataset:
    """``file[key]`` as a dataset whose data lives in this file, or a UserError saying why not.

    External links, external raw storage and virtual datasets are refused: they read
    other files (which may be missing, or not the user's to hand over), and a missing
    source silently reads as fill values.
    """
    where = f"{path}: key {key!r}"
    link = _link(file, key, path)
    if link is None:
        raise UserError(f"{where} is missing; write the file in the documented layout")
    if isinstance(link, h5py.ExternalLink):
        raise UserError(
            f"{where} is an external link to {link.filename}:{link.path}; calotune reads only data stored "
            "in the file itself; copy the dataset in (h5copy) or pass the file that holds it"
        )
    try:
        obj = file[key]
    except H5_ERRORS as exc:
        if isinstance(link, h5py.SoftLink):
            raise UserError(
                f"{where} is a soft link to {link.path!r}, which does not exist; store the dataset under {key!r}"
            ) from None
        raise UserError(f"{where} cannot be read ({error_cause(exc)}); the file is corrupt") from None
    if isinstance(obj, h5py.Group):
        raise UserError(f"{where} is an HDF5 group, not a dataset; store the (N, width) array itself under {key!r}")
    if not isinstance(obj, h5py.Dataset):
        raise UserError(f"{where} is a {type(obj).__name__}, not a dataset; store the (N, width) array under {key!r}")
    try:
        virtual = obj.is_virtual
        external = obj.id.get_create_plist().get_external_count() > 0
    except H5_ERRORS as exc:
        raise UserError(f"{where} has an unreadable header ({error_cause(exc)}); the file is corrupt") from None
    if virtual or external:
        kind = "a virtual dataset" if virtual else "stored in external raw files"
        raise UserError(f"{where} is {kind}; calotune reads only data stored in the file itself; copy the data in")
    return obj


def check_dataset(
    file: h5py.File,
    key: str,
    path: Path | str,
    *,
    width: int,
    layout: str | Callable[[int], str],
    n_events: int | None = None,
    events_key: str | None = None,
    unit: str = "cells",
) -> tuple[h5py.Dataset, tuple[int, int]]:
    """Check everything about ``file[key]`` short of its values; return it and its (N, width).

    Refused: not a float dataset (strings, integers, compounds, objects), not 2-D,
    the wrong width or row count, no rows, chunks too large to decompress, and a declared
    size that the file cannot hold (far beyond its stored bytes).
    """
    where = f"{path}: key {key!r}"
    obj = get_dataset(file, key, path)
    try:
        dtype, raw_shape = obj.dtype, obj.shape
        chunks = obj.chunks
    except H5_ERRORS as exc:
        raise UserError(f"{where} has a type or shape h5py cannot read ({error_cause(exc)}); store float32") from None
    if raw_shape is None:
        raise UserError(f"{where} is empty (no dataspace); store a (N, {width}) float array")
    if dtype.kind != "f":
        what = f"compound dtype with fields {', '.join(dtype.names)}" if dtype.names else f"dtype {dtype}"
        raise UserError(
            f"{where} has {what} but must be floating point (float32 or float64); write it with .astype('float32')"
        )
    shape = raw_shape
    if len(shape) == 1 and width == 1:
        shape = (shape[0], 1)
    if len(shape) != 2:
        raise UserError(
            f"{where} has shape {raw_shape} but must be 2-D (N, {width}); "
            "flatten each event in the documented cell order"
        )
    if shape[1] != width:
        text = layout(shape[1]) if callable(layout) else layout
        raise UserError(
            f"{where} has {shape[1]} {unit} per event but {text}; pass the matching geometry or the right file"
        )
    if n_events is not None and shape[0] != n_events:
        other = f" but {events_key!r} has {n_events}" if events_key else f" but expected {n_events}"
        raise UserError(f"{where} has {shape[0]} events{other}; every dataset needs one row per event")
    if shape[0] == 0:
        raise UserError(f"{where} has 0 events; a sample needs at least one")
    if chunks is not None:
        chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise UserError(
                f"{where} has chunks of {_gib(chunk_bytes)} (shape {chunks}); reading one would need that much "
                f"memory at once; rewrite it with chunks under {_gib(MAX_CHUNK_BYTES)} (h5py picks sane ones)"
            )
    declared = int(np.prod(raw_shape, dtype=np.int64)) * dtype.itemsize
    try:
        stored = obj.id.get_storage_size()
    except H5_ERRORS as exc:
        raise UserError(f"{where} has an unreadable storage layout ({error_cause(exc)}); the file is corrupt") from None
    if declared > MAX_COMPRESSION_RATIO * stored + _STORAGE_SLACK:
        raise UserError(
            f"{where} declares shape {raw_shape} ({_gib(declared)}) but the file stores only {stored} bytes of it; "
            "the dataset was never fully written or the file is damaged; re-write it"
        )
    return obj, (int(shape[0]), int(shape[1]))


def _block_rows(obj: h5py.Dataset, width: int) -> int:
    """Rows per read: about READ_BLOCK_BYTES, whole chunks so none is decompressed twice."""
    rows = max(1, READ_BLOCK_BYTES // max(width * obj.dtype.itemsize, 1))
    if obj.chunks:
        per_chunk = obj.chunks[0]
        rows = max(per_chunk, rows // per_chunk * per_chunk)
    return rows


class _ValueCheck:
    """Accumulates non-finite and out-of-range counts over blocks, remembering the first."""

    def __init__(self, minimum: float | None, strict: bool) -> None:
        self.minimum, self.strict = minimum, strict
        self.nonfinite, self.first_nonfinite = 0, None
        self.out_of_range, self.first_out = 0, None

    def add(self, block: np.ndarray, offset: int) -> None:
        bad = ~np.isfinite(block)
        count = int(bad.sum())
        if count:
            if self.first_nonfinite is None:
                event, col = np.argwhere(bad)[0]
                self.first_nonfinite = (offset + int(event), int(col))
            self.nonfinite += count
        if self.minimum is None:
            return
        with np.errstate(invalid="ignore"):
            bad = block <= self.minimum if self.strict else block < self.minimum
        count = int(bad.sum())
        if count:
            if self.first_out is None:
                event, col = np.argwhere(bad)[0]
                self.first_out = (offset + int(event), int(col), float(block[event, col]))
            self.out_of_range += count

    def raise_if_bad(self, where: str) -> None:
        if self.nonfinite:
            event, col = self.first_nonfinite  # type: ignore[misc]
            raise UserError(
                f"{where} has {self.nonfinite} NaN/Inf values, the first at event {event}, "
                f"column {col}; fix or drop those events"
            )
        if self.out_of_range:
            event, col, value = self.first_out  # type: ignore[misc]
            minimum = self.minimum
            assert minimum is not None
            if self.strict:
                what, fix = f"values <= {minimum:g}", f"every value must be > {minimum:g} MeV; drop those events"
            else:
                what = "negative values" if minimum == 0 else f"values < {minimum:g}"
                fix = f"energies must be >= {minimum:g} MeV; clip them when writing"
            raise UserError(
                f"{where} has {self.out_of_range} {what}, the first {value:g} at event {event}, column {col}; {fix}"
            )


def read_dataset(
    file: h5py.File,
    key: str,
    path: Path | str,
    *,
    width: int,
    layout: str | Callable[[int], str],
    n_events: int | None = None,
    events_key: str | None = None,
    minimum: float | None = 0.0,
    strict: bool = False,
    unit: str = "cells",
    max_rows: int | None = None,
    keep_dtype: bool = False,
) -> np.ndarray:
    """Read ``file[key]`` as a float32 (N, width) array after checking everything about it.

    Args:
        width: the number of values per event the detector's geometry implies.
        layout: what the geometry says, completing "... but <layout>", e.g.
            "the zdc geometry has 3600 (10 x 10 x 36)"; a callable gets the file's width.
        n_events, events_key: the row count the other datasets have and the key it came
            from, so a mismatch names both.
        minimum, strict: every value must be >= minimum (> minimum when ``strict``);
            None skips the check (angles may be negative).
        unit: what one column is called in messages ("cells", "values").
        max_rows: read only the first rows (the checks on the declared shape still
            cover the whole dataset).
        keep_dtype: keep a float64 dataset in float64 instead of casting to float32. The
            CaloChallenge evaluation sums layer energies and takes the log10 of the
            maximum in the file's dtype (arXiv 2410.21611, its ``evaluate.py``); a float32
            cast moves events across a histogram's top bin edge, so its numbers differ.

    A (N,) dataset is accepted where width is 1, because several public files store
    per-event conditions flat. The rows are read in blocks into one float32 array, so
    memory is the result plus one block; a result larger than the available memory is
    refused before anything is allocated, and a corrupt chunk is a UserError naming the
    rows it holds.
    """
    where = f"{path}: key {key!r}"
    obj, (rows, _) = check_dataset(
        file, key, path, width=width, layout=layout, n_events=n_events, events_key=events_key, unit=unit
    )
    if max_rows is not None:
        rows = min(rows, max(int(max_rows), 0))
    block = min(_block_rows(obj, width), max(rows, 1))
    dtype = np.dtype(np.float64) if keep_dtype and obj.dtype == np.float64 else np.dtype(np.float32)
    check_memory(
        rows * width * dtype.itemsize + block * width * (obj.dtype.itemsize + 5),
        f"{where}: reading {rows} x {width} values",
        "use a machine with more memory or fewer events (evaluate: --max-events)",
    )
    out = np.empty((rows, width), dtype)
    checker = _ValueCheck(minimum, strict)
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        try:
            part = obj[lo:hi]
        except H5_ERRORS as exc:
            raise UserError(
                f"{where}: events {lo}-{hi - 1} cannot be read ({error_cause(exc)}); the file is corrupt or "
                "truncated; re-copy or re-write it"
            ) from None
        out[lo:hi] = np.asarray(part).reshape(hi - lo, width)
        checker.add(out[lo:hi], lo)
    checker.raise_if_bad(where)
    return out


def _attr_problem(file: h5py.File, name: str) -> tuple[str | None, AttrValue | None]:
    """(why the attribute is unusable or None, its value as a plain scalar)."""
    try:
        attr_id = h5py.h5a.open(file.id, name.encode())
        size = attr_id.get_storage_size()
    except H5_ERRORS as exc:
        return f"cannot be read ({error_cause(exc)})", None
    if size > MAX_ATTR_BYTES:
        return f"is {size} bytes (more than {MAX_ATTR_BYTES})", None
    try:
        value = file.attrs[name]
    except H5_ERRORS as exc:
        return f"cannot be read ({error_cause(exc)})", None
    if isinstance(value, np.ndarray) and value.shape in ((), (1,)):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and len(value) > MAX_ATTR_BYTES:
        return f"is a string of {len(value)} characters (more than {MAX_ATTR_BYTES})", None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return None, value
    return f"is not a single string or number (got {type(value).__name__})", None


def read_attrs(
    file: h5py.File, path: Path | str | None = None, interpreted: Iterable[str] = ("detector", "geometry")
) -> dict[str, AttrValue]:
    """File attributes as plain Python scalars (h5py hands back numpy scalars and bytes).

    Attributes that calotune interprets (``interpreted``) must be readable scalars of
    sane size, or the file is refused naming the attribute; any other odd attribute
    (an array, a compound, a huge blob, one h5py cannot decode) is skipped with a
    warning, because it is provenance calotune never uses.
    """
    where = path if path is not None else file.filename
    interpreted = set(interpreted)
    try:
        names = list(file.attrs.keys())
    except H5_ERRORS as exc:
        raise UserError(
            f"{where}: the file's attributes cannot be read ({error_cause(exc)}); the file is corrupt"
        ) from None
    out: dict[str, AttrValue] = {}
    for name in names:
        problem, value = _attr_problem(file, name)
        if problem is None:
            assert value is not None
            out[name] = value
        elif name in interpreted:
            raise UserError(
                f"{where}: attribute {name!r} {problem}; it must be a short string; fix it or delete it "
                f"(h5py: del f.attrs[{name!r}])"
            )
        else:
            log.warning("%s: ignoring attribute %r, which %s", where, name, problem)
    return out


# --------------------------------------------------------------------------- ragged data



def read_offsets(
    file: h5py.File,
    key: str,
    path: Path | str,
    *,
    n_events: int,
    events_key: str,
    n_items: int,
    items_key: str,
    max_events: int | None = None,
    max_per_event: int | None = None,
) -> np.ndarray:
    """Read a CSR offsets dataset (N + 1,) int64 and check it against the data it indexes.

    Refused, naming the file and key: not an integer dataset, not 1-D (or (N + 1, 1)),
    not N + 1 entries for the N rows of ``events_key``, a first entry other than 0,
    decreasing entries, a last entry other than the ``n_items`` rows of ``items_key``, and
    (with ``max_per_event``) an event with more items than that, which would make every
    padded batch that holds it that large. Only the first ``max_events`` + 1 entries are
    returned (all entries are checked, block by block, so memory stays bounded).
    """
    where = f"{path}: key {key!r}"
    obj = get_dataset(file, key, path)
    try:
        dtype, shape, chunks = obj.dtype, obj.shape, obj.chunks
    except H5_ERRORS as exc:
        raise UserError(f"{where} has a type or shape h5py cannot read ({error_cause(exc)}); store int64") from None
    if shape is None or dtype.kind not in "iu":
        raise UserError(f"{where} has dtype {dtype} but must be an integer array (int64) of event offsets")
    if len(shape) == 2 and shape[1] == 1:
        shape = (shape[0],)
    if len(shape) != 1:
        raise UserError(f"{where} has shape {obj.shape} but must be 1-D (N + 1,) event offsets")
    if shape[0] != n_events + 1:
        raise UserError(
            f"{where} has {shape[0]} entries but {events_key!r} has {n_events} events; offsets need N + 1 entries"
        )
    if chunks is not None and int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize > MAX_CHUNK_BYTES:
        raise UserError(f"{where} has chunks over {_gib(MAX_CHUNK_BYTES)}; rewrite it with smaller chunks")
    declared = int(shape[0]) * dtype.itemsize
    try:
        stored = obj.id.get_storage_size()
    except H5_ERRORS as exc:
        raise UserError(f"{where} has an unreadable storage layout ({error_cause(exc)}); the file is corrupt") from None
    if declared > MAX_COMPRESSION_RATIO * stored + _STORAGE_SLACK:
        raise UserError(
            f"{where} declares {shape[0]} entries but the file stores only {stored} bytes of them; re-write it"
        )
    keep = shape[0] if max_events is None else min(shape[0], max(int(max_events), 0) + 1)
    check_memory(keep * 8 + READ_BLOCK_BYTES, f"{where}: reading {keep} offsets", "read fewer events")
    out = np.empty(keep, np.int64)
    block = max(1, READ_BLOCK_BYTES // 8)
    previous = 0
    for lo in range(0, shape[0], block):
        hi = min(shape[0], lo + block)
        try:
            part = np.asarray(obj[lo:hi]).reshape(-1).astype(np.int64)
        except (*H5_ERRORS, OverflowError) as exc:
            raise UserError(
                f"{where}: entries {lo}-{hi - 1} cannot be read ({error_cause(exc)}); the file is corrupt"
            ) from None
        if lo == 0 and part[0] != 0:
            raise UserError(f"{where} starts at {part[0]} but must start at 0")
        # steps[j] = offsets[lo + j] - offsets[lo + j - 1]: the item count of event lo + j - 1
        steps = np.diff(np.concatenate([[previous], part]))
        if (steps < 0).any():
            i = lo + int(np.argmax(steps < 0))
            raise UserError(
                f"{where} decreases at entry {i}; offsets must be non-decreasing (event i's items "
                f"are rows offsets[i]:offsets[i + 1] of {items_key!r})"
            )
        if max_per_event is not None and steps.max(initial=0) > max_per_event:
            j = int(np.argmax(steps > max_per_event))
            raise UserError(
                f"{where}: event {lo + j - 1} has {int(steps[j])} items, more than the limit of "
                f"{max_per_event}; split or subsample that event"
            )
        previous = int(part[-1])
        if lo < keep:
            out[lo : min(hi, keep)] = part[: min(hi, keep) - lo]
    if previous != n_items:
        raise UserError(
            f"{where} ends at {previous} but {items_key!r} has {n_items} rows; the last offset must equal it"
        )
    return out
