"""Atomic file writes: nothing half-written is ever read.

Every output (shards, NIfTI volumes, manifests, configs, checkpoints' side
files) is written to a temporary file in the *same directory* as the target and
then renamed onto it with ``os.replace``. A rename within one filesystem is
atomic, so a reader -- or a job restarted after a crash or preemption -- sees
either the old file, the complete new file, or no file, never a truncated one.
Resumable pipelines can therefore treat "target exists" as "target is done".

Temporary names start with ``.`` (hidden from globs such as ``*.nii.gz``) and
carry the pid plus a random token, so concurrent writers never collide:

* ``atomic_write_bytes`` / ``atomic_write_text``: ``.<name>.<pid>.<rand>.tmp``
* ``atomic_path`` (for libraries that want a filename): ``.tmp-<pid>-<rand>-<name>``,
  which keeps the target's suffixes (``.nii.gz``, ``.h5``, ``.zip``) because
  libraries like nibabel choose the format from the file name.

Leftover temporaries (from a killed process) match ``.*.tmp`` or ``.tmp-*``
and are safe to delete.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _token() -> str:
    return f"{os.getpid()}.{secrets.token_hex(4)}"


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not supported everywhere (e.g. Windows), so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_token()}.tmp")
    # O_EXCL: never clobber another writer's temp; 0o666 lets the umask decide permissions
    # (mkstemp would force 0600, which breaks shared cluster outputs).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    For writers that need a filename (``nibabel.save``, ``h5py.File``, ``zipfile``)::

        with atomic_path(out / "sa.nii.gz") as tmp:
            nib.save(img, tmp)

    The temp name ends with the target's name, so suffix-sniffing libraries see the
    right extension. On an exception the temp file is removed and the target is untouched.
    A directory (e.g. a zarr store) also works, as long as the target does not exist yet.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{_token().replace('.', '-')}-{path.name}")
    try:
        yield tmp
        if not tmp.is_dir():
            # The library closed its handle; flush its data to disk before publishing the name.
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
