"""Where qrecover writes: output folders it can prove are its own, swapped in atomically.

Every folder qrecover builds holds a marker (MARKER) listing the files it wrote. `--overwrite`
replaces only such a folder, and only when nothing was added to it since (besides the reports
qrecover itself writes into its folders), so a user's file, model or input is never deleted. An
output that is, contains or lies inside an input of the same command is refused outright.
A full or read-only disk becomes a QRecoverError naming the path and, where known, the space needed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from safetensors import SafetensorError

from .errors import QRecoverError
from .utils import atomic_write_json

MARKER = ".qrecover-output.json"
# Reports that qrecover writes later into a folder it built (eval/fidelity/zero-shot results).
LATER_REPORTS = ("eval_*.json", "fidelity_*.json")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _listing(names, limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an unchanged qrecover output folder."""
    if not target.is_dir() or target.is_symlink():
        raise QRecoverError(f"--overwrite replaces only folders qrecover wrote; {target} is a file: move it or choose another --out")
    marker = target / MARKER
    if not marker.is_file():
        found = _listing(sorted(p.name for p in target.iterdir())) or "nothing"
        raise QRecoverError(
            f"--overwrite replaces only folders qrecover wrote, and {target} is not one (it has no {MARKER}; "
            f"it holds {found}): move it away or choose another --out"
        )
    own = json.loads(marker.read_text()).get("files")
    if own is None:
        return  # a folder that grows over runs (a recipe's or a comparison's): all of it is qrecover's
    foreign = [f for f in _files(target) if f not in own and f != MARKER and not any(fnmatch(f, p) for p in LATER_REPORTS)]
    if foreign:
        raise QRecoverError(
            f"{target} is a qrecover output, but replacing it would also delete files qrecover did not write "
            f"there: {_listing(foreign)}; move them out, then rerun"
        )


def check_output(out, inputs=(), overwrite: bool = False) -> Path:
    """Validate an output folder before any work starts; returns it. inputs: paths the command reads."""
    given = str(out)
    if not given.strip() or Path(given).name in ("", ".", ".."):
        raise QRecoverError(f"--out {given!r} names no new folder: give the folder to create, e.g. --out runs/model-w4")
    target = Path(given).expanduser().absolute()
    real = target.resolve()
    for spec in inputs:
        if spec is None or not Path(str(spec)).expanduser().exists():
            continue  # a hub id or an alias, not a path
        source = Path(str(spec)).expanduser().resolve()
        relation = "is" if real == source else "lies inside" if source in real.parents else "contains" if real in source.parents else None
        if relation:
            raise QRecoverError(f"--out {given} {relation} the input {spec}: writing there would destroy it; choose another --out")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise QRecoverError(f"output path {given} exists; choose another or pass --overwrite")
        check_replaceable(target)
    _writable_parent(target)
    return target


def _writable_parent(target: Path) -> None:
    """The folder that will hold target, or its nearest existing ancestor, must take new entries.
    Nothing is created here: a command refused later leaves no folder behind."""
    existing = next(folder for folder in target.parents if folder.exists())
    if not existing.is_dir():
        raise QRecoverError(f"cannot create the folder {target.parent} for {target.name}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QRecoverError(f"cannot write into {existing} (read-only, or no permission); choose an --out in a writable folder")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GB"


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


@contextmanager
def disk_errors(path, needed_bytes: int | None = None):
    """Turn a full or read-only disk met while writing `path` into an error that names it."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        code = getattr(e, "errno", None)
        if code == errno.ENOSPC or "No space left" in str(e):
            free = _free_bytes(Path(path))
            need = f"it needs about {_size(needed_bytes)}, " if needed_bytes else ""
            have = f"{_size(free)} are free" if free is not None else "the free space is unknown"
            raise QRecoverError(
                f"no space left on the disk while writing {path} ({need}{have}): free some space and rerun "
                "the same command; finished work resumes"
            ) from e
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise QRecoverError(f"cannot write {getattr(e, 'filename', None) or path}: {e.strerror}; choose a writable location") from e
        raise


def mark(folder: Path, kind: str, files: list[str] | None) -> None:
    """Record that qrecover built `folder`; files None: a folder that grows over runs (recipe, compare)."""
    atomic_write_json(folder / MARKER, {"kind": kind, "files": files})


def claim(folder, kind: str) -> Path:
    """Use `folder` for a run that adds to it over time: refused when it is someone else's non-empty folder."""
    folder = Path(folder).expanduser().absolute()
    if not folder.exists():
        check_output(folder)
    elif not folder.is_dir():
        raise QRecoverError(f"{folder} is a file, not a folder: choose another output folder")
    elif not (folder / MARKER).is_file() and any(folder.iterdir()):
        names = _listing(sorted(p.name for p in folder.iterdir()))
        raise QRecoverError(f"{folder} holds files qrecover did not write ({names}): choose another or an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        mark(folder, kind, None)
    return folder


def atomic_dir(target, build, overwrite: bool = False, kind: str = "checkpoint", needed_bytes: int | None = None) -> Path:
    """Build a folder in a hidden folder beside `target`, mark it, then rename it into place, so
    nobody ever sees half of it; an existing target is replaced only under check_replaceable.
    build(tmp_dir) writes the content."""
    target = check_output(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with disk_errors(target, needed_bytes):
            build(tmp)
            mark(tmp, kind, _files(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_report(path, result: dict) -> None:
    """Write a JSON report whose result the caller has already shown; a failure says so."""
    try:
        with disk_errors(path):
            atomic_write_json(path, result)
    except QRecoverError as e:
        raise QRecoverError(f"{e} (the result above was computed but not saved)") from e
    except OSError as e:
        raise QRecoverError(f"could not write the report {path}: {e.strerror} (the result above was computed but not saved)") from e
