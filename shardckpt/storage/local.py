"""Local disks (and anything mounted like one: NFS, Lustre): a direct ``os`` implementation with
real fsync of files and directories, ``pread``/``preadv``, exclusive create and atomic rename.
Symlinks resolving outside the root are refused.

Permissions (local disks). By default files and directories are created as ``open()`` and
``mkdir()`` create them, i.e. ``0o666`` / ``0o777`` less the process umask, except that the
world-write bit is always dropped: nothing shardckpt creates is world-writable, whatever the
umask. With ``file_mode`` (e.g. ``0o640``) every file gets exactly that mode, whatever the umask,
and every directory the same bits plus search (``x``) where read is granted and ``rwx`` for the
owner (``0o640`` -> ``0o750``, ``0o600`` -> ``0o700``). A world-writable ``file_mode`` is refused.
Object stores have no POSIX modes: ``file_mode`` is ignored there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import uuid

from ..errors import StorageError
from .base import Location, Sink, check_relpath
from .localsink import _LocalSink, drop_world_write
from .localsink import fsync_enabled as _fsync_enabled
from .records import claim_path


def check_file_mode(file_mode: int | None) -> int | None:
    """Validate a ``file_mode`` option: None, or an int in ``[0, 0o777]`` without ``o+w``."""
    if file_mode is None:
        return None
    if type(file_mode) is not int or not 0 <= file_mode <= 0o777:
        raise ValueError(f"file_mode must be None or an int in [0, 0o777] (e.g. 0o640), "
                         f"got {file_mode!r}")
    if file_mode & 0o002:
        raise ValueError(f"file_mode {file_mode:#o} is world-writable: shardckpt never creates "
                         f"world-writable files")
    return file_mode


def dir_mode_for(file_mode: int) -> int:
    """The directory mode that goes with ``file_mode``: the same bits, ``x`` wherever ``r`` is
    granted, and always ``rwx`` for the owner (who has to create and remove files in it)."""
    return 0o700 | file_mode | ((file_mode & 0o444) >> 2)


def _set_dir_mode(path: str, mode: int | None) -> None:
    """Give a directory we just created its mode (through an fd: never follows a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        if mode is None:  # best effort for the default, as in drop_world_write
            return
        raise
    try:
        if mode is None:
            drop_world_write(fd)
        else:  # keep a set-group-ID bit inherited from the parent (shared project folders)
            os.fchmod(fd, mode | (os.fstat(fd).st_mode & stat.S_ISGID))
    finally:
        os.close(fd)


def _has_link(root: str, relpath: str) -> bool:
    """Whether a component of ``relpath`` (plain: no ``..``) below ``root`` is a symlink, up
    to the first that does not exist: without one, the path cannot leave the root, and the
    full ``realpath`` (an ``lstat`` per component of the whole path, in Python) is not needed."""
    path = root
    for part in relpath.split("/"):
        path = os.path.join(path, part)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return True
        except (FileNotFoundError, NotADirectoryError):
            return False
    return False


class LocalLocation(Location):
    is_local = True

    def __init__(self, url: str, file_mode: int | None = None) -> None:
        self.url = url
        path = url[len("file://"):] if url.startswith("file://") else url
        self.root = os.path.abspath(os.path.expanduser(path))
        self.file_mode = check_file_mode(file_mode)
        self.dir_mode = None if file_mode is None else dir_mode_for(file_mode)

    def _path(self, relpath: str, *, must_exist: bool = False) -> str:
        if relpath == "":
            return self.root
        full = os.path.join(self.root, check_relpath(relpath))
        if _has_link(self.root, relpath):  # only then can it resolve outside the root
            real_root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise StorageError(f"{self.display}/{relpath}: resolves outside the checkpoint "
                                   f"root (symlink?)")
        return full

    def _wrap(self, op: str, relpath: str, exc: OSError) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        return self._err(op, relpath, exc)

    def makedirs(self, reldir: str) -> None:
        """``mkdir -p``; each directory created here (the root included) gets its mode."""
        try:
            path = self._path(reldir)
            missing = []
            while not os.path.isdir(path):
                missing.append(path)
                parent = os.path.dirname(path)
                if parent == path:
                    break
                path = parent
            for path in reversed(missing):
                try:
                    os.mkdir(path, 0o777 if self.dir_mode is None else self.dir_mode)
                except FileExistsError:
                    if not os.path.isdir(path):
                        raise
                    continue  # made meanwhile by someone else (another rank): theirs to set
                _set_dir_mode(path, self.dir_mode)
        except OSError as exc:
            raise self._wrap("mkdir", reldir, exc) from exc

    def open_sink(self, relpath: str) -> Sink:
        try:
            return _LocalSink(self._path(relpath), self.file_mode)
        except OSError as exc:
            raise self._wrap("create", relpath, exc) from exc

    def write_atomic(self, relpath: str, data: bytes) -> None:
        final = self._path(relpath)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            sink = _LocalSink(tmp, self.file_mode)  # os.replace keeps its mode
            try:
                sink.write(data)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
            os.replace(tmp, final)
            self.fsync_dir(posixpath.dirname(relpath))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._wrap("atomic write", relpath, exc) from exc

    def write_exclusive(self, relpath: str, data: bytes) -> None:
        """Claim, write, let go: an ``O_EXCL`` create of the claim file of ``relpath`` under
        ``.shardckpt/claims/`` (exactly one writer creates it; the others get
        ``FileExistsError``), then, if ``relpath`` is still absent, :meth:`write_atomic` (temp
        file, fsync, ``rename``: atomic for readers, durable), then the claim is removed. A
        claim left by a writer that died holding it is cleared by the next save of the step
        (``storage.writers.clear_claim``, under that save's lease)."""
        claim = claim_path(relpath)
        self.makedirs(posixpath.dirname(claim))
        try:
            fd = os.open(self._path(claim), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o666 if self.file_mode is None else self.file_mode)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "claimed by another writer",
                                  f"{self.display}/{relpath}") from None
        except OSError as exc:
            raise self._wrap("exclusive create", claim, exc) from exc
        os.close(fd)
        try:
            if self.size(relpath) is not None:  # committed already (the claim came after)
                raise FileExistsError(errno.EEXIST, "exists", f"{self.display}/{relpath}")
            self.write_atomic(relpath, data)
        finally:
            with contextlib.suppress(OSError, StorageError):
                self.remove(claim)

    def fsync_dir(self, reldir: str) -> None:
        if not _fsync_enabled():
            return
        try:
            fd = os.open(self._path(reldir), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("fsync directory", reldir or ".", exc) from exc

    def remove(self, relpath: str) -> None:
        try:
            os.unlink(self._path(relpath))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._wrap("remove", relpath, exc) from exc

    def remove_tree(self, reldir: str) -> None:
        top = self._path(reldir)
        try:
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:
                    os.unlink(os.path.join(dirpath, name))
                for name in dirnames:
                    path = os.path.join(dirpath, name)
                    (os.unlink if os.path.islink(path) else os.rmdir)(path)
            os.rmdir(top)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._wrap("remove tree", reldir, exc) from exc

    def move_tree(self, src: str, dst: str) -> None:
        """One ``rename``: atomic, and never over an existing ``dst``."""
        source, target = self._path(src, must_exist=True), self._path(dst)
        try:
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "exists", target)
            os.rename(source, target)
        except OSError as exc:
            raise self._wrap("move", src, exc) from exc
        self.fsync_dir(posixpath.dirname(dst))

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(relpath, must_exist=True), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                return _pread_all(fd, offset, length)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("read", relpath, exc) from exc

    def read_into(self, relpath: str, offset: int, out: memoryview) -> int:
        """Read straight into ``out`` (no intermediate bytes); returns bytes read."""
        try:
            fd = os.open(self._path(relpath, must_exist=True), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                done = 0
                while done < len(out):
                    n = os.preadv(fd, [out[done:]], offset + done)
                    if n == 0:
                        break
                    done += n
                return done
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("read", relpath, exc) from exc

    def read_file(self, relpath: str, limit: int) -> bytes:
        size = self.size(relpath)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        if size > limit:
            raise StorageError(f"{self.display}/{relpath}: {size} bytes exceeds the limit {limit}")
        return self.read_range(relpath, 0, size)

    def size(self, relpath: str) -> int | None:
        try:
            st = os.stat(self._path(relpath, must_exist=True), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._wrap("stat", relpath, exc) from exc
        return st.st_size

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def listdir(self, reldir: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(reldir)))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._wrap("list", reldir or ".", exc) from exc

    def modified_time(self, relpath: str) -> float | None:
        try:
            return os.stat(self._path(relpath), follow_symlinks=False).st_mtime
        except (OSError, ValueError, StorageError):
            return None

    def put_record(self, relpath: str, data: bytes) -> None:
        """Temp file and rename, no fsync; the mode as for any file (never world-writable)."""
        final = self._path(relpath)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            mode = self.file_mode
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
            with open(fd, "wb") as fh:
                if mode is None:
                    drop_world_write(fd)
                else:
                    os.fchmod(fd, mode)
                fh.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._err("write", relpath, exc) from exc


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
