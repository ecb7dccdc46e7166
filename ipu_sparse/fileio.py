"""Atomic file and directory writes, and content hashes.

Every output of the package goes through a temporary file or directory next to its target
that is renamed into place only on success, so a failed or interrupted write never leaves
a half-written file. The lowest module of the package: it imports nothing of ours but
``errors``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator

from .errors import UserError

if TYPE_CHECKING:  # annotations only: torch is not needed to import this module
    import torch


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path, what: str = "file"):
    """The JSON value in ``path``; ``UserError`` naming the file if it is unreadable, not UTF-8 or not JSON."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON in {what} ({exc})") from None


def read_json_object(path, what: str = "file") -> dict:
    """``read_json`` that also requires a JSON object at the top."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UserError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists (pass --overwrite to replace it)")


def user_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(target) -> None:
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` left next to ``target`` by a writer that was
    killed (its PID is gone); a live writer's temporaries are left alone."""
    target = Path(target)
    parent = target.parent
    if not target.name or not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for p in parent.glob(f".{glob_escape(target.name)}.{kind}-*"):
            pid = p.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
                continue  # ours, or a writer still running
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output_path(path, overwrite: bool = False, directory: bool = True) -> Path:
    """Refuse, before any work, an output ``path`` that cannot be written: an empty name (``.``,
    ``/``), the working directory or one of its parents, an existing path without ``overwrite``,
    a directory where a file is wanted (or the reverse), a parent that is a file, or a directory
    this process cannot create files in. Returns ``path``; creates nothing."""
    p = Path(path)
    name = Path(os.path.abspath(str(p))).name
    if not name or p.name in ("", ".", ".."):
        raise UserError(f"{path}: not a usable output path (give a new name inside a directory)")
    resolved = Path(os.path.realpath(str(p)))
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"{path}: is the working directory or one of its parents; give a new name")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise UserError(f"{path}: already exists (pass --overwrite to replace it)")
        if not directory and p.is_dir():
            raise UserError(f"{path}: is a directory; give a file name")
    parent = Path(os.path.abspath(str(p))).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{path}: cannot be created: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=str(parent), prefix=".ipu-sparse-probe-")
    except OSError as exc:
        raise UserError(f"{path}: cannot write in {parent} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def _apply_umask(directory: Path, mask: int) -> None:
    """Give ``directory`` and everything in it the modes a plain ``mkdir``/``open`` would have."""
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextmanager
def _parents_created(parent: Path) -> Iterator[None]:
    """Create ``parent`` (and its missing ancestors); remove the ones created here if the body fails."""
    missing = []
    d = parent
    while not d.exists():
        missing.append(d)
        d = d.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{parent}: cannot create directory ({exc.strerror or exc})") from None
    try:
        yield
    except BaseException:
        for d in missing:
            try:
                d.rmdir()
            except OSError:
                break
        raise


@contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` only on success.

    The temporary is named ``.OUT.tmp-PID-*`` so that a later write to ``out`` can remove it if
    this process is killed; the result gets the user's umask (not the temporary's 0700).
    """
    out = Path(out)
    _refuse_existing(out, overwrite)
    if not out.name or out.name in (".", ".."):
        raise UserError(f"{out}: not a usable output path (give a new name inside a directory)")
    with _parents_created(out.parent):
        clean_stale_temporaries(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=str(out.parent)))
        except OSError as exc:
            raise UserError(f"{out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
        try:
            mask = user_umask()
            yield tmp
            _apply_umask(tmp, mask)  # some writers (safetensors) create their files 0600
            if out.exists() or out.is_symlink():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                _remove(old)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_file(path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path next to ``path`` for any writer (``torch.save``, ``savefig``,
    a GGUF writer); rename it to ``path`` only on success. Refuse an existing ``path`` unless
    ``overwrite``, and a directory always. The file gets the user's umask."""
    path = Path(path)
    _refuse_existing(path, overwrite)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    with _parents_created(path.parent):
        clean_stale_temporaries(path)
        try:
            fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.tmp-{os.getpid()}-")
        except OSError as exc:
            raise UserError(f"{path}: cannot write in {path.parent} ({exc.strerror or exc})") from None
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~user_umask())
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see a
    partial file); refuse an existing ``path`` unless ``overwrite``."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename, so readers never
    see a partial file; refuse an existing ``path`` unless ``overwrite``."""
    with atomic_file(path, overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return Path(path)


def read_safetensors(path) -> Dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file (no pickle); ``UserError`` naming the file if it is
    corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
