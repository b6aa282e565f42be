"""Files in and out, checked where they enter and leave (issue 17, classes 3 and 5).

In: only regular files are read, and no more than a size cap (``/dev/zero`` read past 8 GiB,
a named pipe hung). Out: the destination is checked before the work, by creating (and
removing) a temporary file or folder where the result will go, so a read-only place, ``/proc``
or a directory named ``x.png`` fails in a second rather than after a run; the result is
written to a temporary name in the same folder and renamed (os.replace) over the target, so
a full disk leaves no truncated file. Files get the mode the umask allows (mkstemp's are 0600).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from vramplan.errors import VramplanError
from vramplan.limits import MAX_JSON_DEPTH

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def read_regular(path: str | Path, limit: int, flag: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else is a VramplanError."""
    shown = str(path)
    try:
        st = os.stat(path)  # stat, not open: opening a named pipe blocks until a writer comes
    except FileNotFoundError:
        raise VramplanError(f"no such file {shown!r}", flag) from None
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL
        raise VramplanError(f"cannot read {shown!r}: {_why(e) if isinstance(e, OSError) else e}", flag) from None
    kind = next((k for test, k in _KINDS if test(st.st_mode)), None)
    if kind is not None or not stat.S_ISREG(st.st_mode):
        raise VramplanError(f"{shown!r} is {kind or 'not a regular file'}; give a regular file", flag)
    if st.st_size > limit:
        raise VramplanError(f"{shown!r} is {st.st_size:,} bytes, above the limit of {limit:,}", flag)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a file that grew since stat
    except OSError as e:
        raise VramplanError(f"cannot read {shown!r}: {_why(e)}", flag) from None
    if len(data) > limit:
        raise VramplanError(f"{shown!r} is more than {limit:,} bytes", flag)
    return data


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, shown: str, flag: str) -> object:
    """Strict JSON (no NaN/Infinity), nested at most MAX_JSON_DEPTH deep."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise VramplanError(f"{shown!r} is nested deeper than {MAX_JSON_DEPTH} levels", flag) from None
    except UnicodeDecodeError as e:
        raise VramplanError(f"{shown!r} is not UTF-8 text ({e.reason} at byte {e.start})", flag) from None
    except ValueError as e:
        raise VramplanError(f"{shown!r} is not valid JSON ({e})", flag) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise VramplanError(f"{shown!r} is nested deeper than {MAX_JSON_DEPTH} levels", flag)
    return value


# ---------------------------------------------------------------- out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | Path, flag: str) -> Path:
    """The file ``path`` can be written: not a directory, in an existing folder where a file
    can be created. Checked by creating and removing a temporary file there."""
    out = Path(path)
    if out.is_dir() or str(path).endswith(("/", os.sep)):
        raise VramplanError(f"{str(path)!r} is a directory; give a file name", flag)
    if out.exists() and not out.is_file():
        raise VramplanError(f"{str(out)!r} exists and is not a regular file", flag)
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise VramplanError(f"cannot write {str(out)!r}: {str(parent)!r} {what}", flag)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}-", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise VramplanError(f"cannot write in {str(parent)!r}: {_why(e)}", flag) from None
    return out


def write_file(path: str | Path, write: Callable[[str], None] | bytes, flag: str) -> Path:
    """Write ``path`` through a temporary file in its folder, renamed over it when complete.
    ``write`` is the bytes, or a function that writes the file at the path it is given."""
    out = check_output_file(path, flag)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-", suffix=out.suffix)
    try:
        if isinstance(write, bytes):
            with os.fdopen(fd, "wb") as f:
                f.write(write)
        else:
            os.close(fd)
            write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise VramplanError(f"cannot write {str(out)!r}: {_why(e)}", flag) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def check_output_folder(path: str | Path, flag: str) -> Path:
    """The folder ``path`` can be created: it does not exist (or is an empty directory) and its
    parent (created if missing) takes a new folder. Checked before the work it will hold."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise VramplanError(f"{str(out)!r} exists and is not a directory; give a new folder", flag)
    if out.is_dir() and any(out.iterdir()):
        raise VramplanError(f"{str(out)!r} exists and is not empty; give a new folder", flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=".probe"))
    except OSError as e:
        raise VramplanError(f"cannot create a folder in {str(out.parent)!r}: {_why(e)}", flag) from None
    return out


def write_folder(path: str | Path, files: dict[str, bytes], flag: str) -> Path:
    """Write ``files`` {name: bytes} into a temporary folder beside ``path``, renamed to it last:
    the folder appears complete or not at all."""
    out = check_output_folder(path, flag)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            os.chmod(tmp / name, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out)  # replaces an empty directory on POSIX
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VramplanError(f"cannot write {str(out)!r}: {_why(e)}", flag) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
