"""Safe file I/O for the whole package: atomic writes that honour the umask, and guarded reads.

Every file imprompt writes (PNGs, adapters, checkpoints, reports, caches) goes through
:func:`atomic_write` or :func:`atomic_dir`: the data is written to a temporary name in the target
folder, flushed, given the permissions a plain ``open()`` would have given it (``0o666`` / ``0o777``
minus the umask; ``mkstemp`` alone would leave 0600), and renamed over the target. A reader, or a
run killed at any instant, sees the old file or the new one, never half of one.

Reads of user-supplied data go through :func:`read_regular_file`, which refuses FIFOs, devices and
sockets (a FIFO named ``x.png`` would block forever; a symlink to ``/dev/zero`` would exhaust memory)
and files over a size cap.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# Generous for images and small models; callers reading checkpoints pass their own cap.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once. Not thread-safe in theory,
    # but the value written back is the value read, so concurrent readers see the same umask.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give a new file / folder under the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _temporary_name(path: Path) -> Path:
    # A leading dot and a .tmp suffix: hidden from globs such as *.png, and recognisable as debris.
    # The writer's process id in the name lets remove_debris tell a dead writer's leftovers from a
    # file another live process (a second run into the same folder) is writing right now.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears whole at the end, or not at all.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the target is
    left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path for libraries that insist on writing to a file name themselves
    (``safetensors.save_file``, ``PIL.Image.save``); renamed over ``path`` when the block ends.

    ``exclusive``: never replace an existing ``path``; raise FileExistsError instead (a hard link
    is created atomically or not at all, so two writers racing for one name cannot both win).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``path`` that replaces ``path`` (if any) when the block ends.

    The old folder is moved aside and removed only after the new one is in place, so an interrupted
    run leaves either the old folder or the new one (plus a ``.name.*.tmp`` folder to clean up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    old = None
    try:
        yield staging
        os.chmod(staging, default_mode(directory=True))
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.{os.getpid()}.", suffix=".tmp"))
            os.replace(path, old / path.name)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_debris(folder: str | os.PathLike, name: str = "*") -> int:
    """Remove temporary files and folders that a killed writer left in ``folder`` (``.NAME.PID.*.tmp``);
    returns the count. Leftovers of processes still alive (this one included: another thread may be
    writing) are kept, so two runs writing into one folder never delete each other's files."""
    count = 0
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rsplit(".", 2)[-2]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        count += 1
    return count


class UnsafeFileError(ValueError):
    """A path that is not a regular file, or too large to read."""


def check_regular_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file") -> int:
    """Raise unless ``path`` (after following links) is a regular file of at most ``max_bytes``;
    returns its size. ``stat`` never opens the file, so a FIFO cannot block here."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UnsafeFileError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise UnsafeFileError(f"cannot read {what} {str(path)!r}: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UnsafeFileError(f"{what} {str(path)!r} is a directory; give a file")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{what} {str(path)!r} is not a regular file (a FIFO, device or socket); give a file")
    if info.st_size > max_bytes:
        raise UnsafeFileError(
            f"{what} {str(path)!r} is {info.st_size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit"
        )
    return info.st_size


def read_regular_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see :func:`check_regular_file`)."""
    check_regular_file(path, max_bytes, what)
    # O_NONBLOCK: should the file have been swapped for a FIFO since the check, open does not block.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafeFileError(f"{what} {str(path)!r} is not a regular file; give a file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{what} {str(path)!r} is over the {max_bytes / 2**20:.0f} MiB limit")
    return data


class PickleRefusedError(ValueError):
    """A pickle file that is empty, truncated, or holds more than tensors (refused, never executed)."""


def load_torch_weights(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` only: plain containers of tensors and numbers load,
    anything that would run code is refused. Errors name the file and say what to do instead.

    Nothing in imprompt loads a pickle any other way (a test greps the package for it).
    """
    import pickle

    import torch

    path = Path(path)
    size = check_regular_file(path, max_bytes=64 * 2**30, what=what)
    if size == 0:
        raise PickleRefusedError(f"{what} {path.name} is empty (0 bytes); re-create or re-download it")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that
        # on. Keep only what names the object the file wanted to build ("Unsupported global: GLOBAL
        # os.system ..."), without torch's terminal escape codes.
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. Please use|\n|$)", str(err))
        detail = re.sub(r"\x1b\[[0-9;]*m", "", found.group(1)).strip()[:200] if found else "objects other than tensors"
        raise PickleRefusedError(
            f"{what} {path.name} holds more than tensors and was refused without running it ({detail}); "
            "use a .safetensors file, or re-save the weights as a plain dict of tensors"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise PickleRefusedError(
            f"cannot read {what} {path.name}: truncated or not a torch file ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no detail'}); re-create or re-download it"
        ) from None


def check_writable_folder(folder: str | os.PathLike, flag: str = "--output") -> None:
    """Raise unless files can be written in ``folder`` (or in the folder that would be made there).

    Checked before any long work starts, so a typo does not cost a generation, an evaluation or a
    training run. Nothing is created here.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UnsafeFileError(f"{flag} {str(folder)!r} is a file; give a folder")
    existing = folder
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    if not existing.is_dir():
        raise UnsafeFileError(f"{flag} {str(folder)!r} cannot be made: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnsafeFileError(f"{flag} {str(folder)!r}: no permission to write in {str(existing)!r}; choose another folder")
