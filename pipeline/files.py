"""Writing outputs so that an interrupted run never leaves a half-written file or folder behind, a folder is
replaced only when gptpipe wrote it, two runs never write one folder at once, a symlinked folder is written
through its link, and a full disk is one message; and a written folder's checksum list checked on reading."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError
from pipeline.layout import ExportDir, PreparedDir, TokensDir

# Written into every folder a stage builds: only a folder holding it (or an older gptpipe's signature file)
# is ever replaced, so a mistyped out_dir pointing at the corpus or at data/ is refused, not deleted.
MARKER = ".gptpipe-output"
# Folders of earlier gptpipe versions, written before the marker: one of these signature files and nothing but
# names such a folder holds (a meta.json beside someone's thesis.tex is not ours).
SIGNATURES = (PreparedDir("").manifest.name, TokensDir("").meta.name, ExportDir("").info.name)
OUTPUT_NAMES = re.compile(
    r"(manifest\.json|meta\.json|gptpipe\.json|(train|val)(\.jsonl|\.bin|-\d{5}\.bin)|plan\.bin|tokenizer|gptpipe_tokenizer|config\.json"
    r"|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|tokenizer(_config)?\.json"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model|chat_template\.jinja)"
)

# Errors a user fixes on the machine (space, quota, permissions), not bugs.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
                errno.EFBIG: "file too large for this file system or limit"}


def absent(path: str | Path, folder: bool = False) -> str:
    """Why path is not the file (or folder) expected, as words after its name: "not found" only when nothing is there."""
    path = Path(path)
    if not path.exists():
        return "not found"
    if folder:
        return "is a file, not a folder"
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file (a FIFO, socket or device)"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file beside path, then rename it over path (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def building_dir(out_dir: str | Path, key: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside out_dir; on success it replaces out_dir, on failure it goes.

    key names the param that chose out_dir: an existing out_dir that gptpipe did not write is refused with it.
    """
    out_dir = through_link(Path(out_dir), key)
    check_replaceable(out_dir, key)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, key):
        check_replaceable(out_dir, key)  # again, now that no other run can be replacing it
        for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)  # of a run that was killed; the name is ours
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
        try:
            (tmp / MARKER).write_text(f"written by gptpipe as {key}; replaced whole on the next run\n")
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_dir(tmp, out_dir)


@contextmanager
def resumable_dir(out_dir: str | Path, key: str) -> Iterator[Path]:
    """building_dir for long work that can pick up where it stopped: the folder is .<name>.partial beside out_dir,
    the same on every run, and it stays when the work fails or is killed. The caller decides what in it to keep."""
    out_dir = through_link(Path(out_dir), key)
    check_replaceable(out_dir, key)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, key):
        check_replaceable(out_dir, key)  # again, now that no other run can be replacing it
        work = out_dir.with_name(f".{out_dir.name}.partial")
        work.mkdir(exist_ok=True)
        (work / MARKER).write_text(f"written by gptpipe as {key}; replaced whole on the next run\n")
        yield work
        swap_dir(work, out_dir)


def through_link(out_dir: Path, key: str) -> Path:
    """The folder to build: out_dir, or where it links to when it is a symlink (data/tokens -> /big/disk/tokens),
    so the output lands on the disk the link chose and the link stays. A link whose target's folder is missing
    (a disk not mounted) is refused rather than replaced by a folder on the wrong disk."""
    if not out_dir.is_symlink():
        return out_dir
    stray = out_dir.with_name(f".{out_dir.name}.old")
    if stray.is_symlink():
        stray.unlink()  # the link itself, moved aside by an older gptpipe that replaced links by folders
    target = Path(os.path.realpath(out_dir))
    if not target.parent.is_dir():
        raise UserError(f"{key}: {out_dir} is a link to {target}, whose folder {target.parent} does not exist (a disk not"
                        " mounted?); mount it, or point the link elsewhere")
    return target


@contextmanager
def folder_lock(folder: str | Path, key: str, inside: bool = False) -> Iterator[None]:
    """Hold the lock `.<name>.lock` beside folder (inside: `.gptpipe.lock` in it, for a folder that is never
    swapped whole and may sit on a mount whose parent is not writable) while this process writes it: a second
    gptpipe run on the same folder gets one message instead of a mixed output. The operating system releases
    the lock when a process ends, killed or not; the file is removed on release (a killed run's stays, harmless)."""
    folder = Path(folder)
    path = folder / ".gptpipe.lock" if inside else folder.with_name(f".{folder.name}.lock")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            reason = WRITE_ERRNOS.get(e.errno) or e.strerror or type(e).__name__
            raise UserError(f"{key}: cannot create the lock {path}: {reason}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{key}: {folder} is being written by another gptpipe run ({holder}); wait for it to end, or"
                            f" point {key} at another folder. (A lock goes with the process that held it: nothing to delete)") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # removed by the holder between our open and our lock: take the new file
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no other process can hold this file in between
        f.close()


def check_replaceable(out_dir: Path, key: str) -> None:
    """UserError unless out_dir is absent, empty, or a folder gptpipe wrote."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{key}: {out_dir} is a file, expected a folder")
    names = {p.name for p in out_dir.iterdir()}
    earlier_gptpipe = names & set(SIGNATURES) and all(OUTPUT_NAMES.fullmatch(name) for name in names)
    if names and MARKER not in names and not earlier_gptpipe:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"{key}: {out_dir} holds files gptpipe did not write ({shown}); it would be replaced whole."
                        f" Point {key} at a new folder (or empty this one yourself)")


def write_failure(e: BaseException, path: str | Path) -> UserError | None:
    """The one-line message for an error writing path that the user fixes (a full disk...), else None (a bug).

    torch's C++ writer reports a full disk as RuntimeError("... basic_ios::clear ...") and safetensors as its
    own error, with no errno: then the free space decides.
    """
    reason = WRITE_ERRNOS.get(getattr(e, "errno", None))
    if reason is None and not isinstance(e, OSError):
        text = str(e)
        if not any(s in text for s in ("basic_ios", "failed writing", "No space", "Disk quota", "unexpected pos")):
            return None
        reason = "no space left on the device" if free_bytes(path) < 64 << 20 else f"the write failed ({text.splitlines()[0][:120]})"
    if reason is None:
        return None
    return UserError(f"could not write {path}: {reason}")


def free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def swap_dir(new: Path, out_dir: Path) -> None:
    """Put folder new at out_dir; the old out_dir is moved aside first and removed only afterwards."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    remove(old)
    if out_dir.exists() or out_dir.is_symlink():
        os.replace(out_dir, old)
    os.replace(new, out_dir)
    remove(old)


def remove(path: Path) -> None:
    """A file, link or folder gone (a link itself, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def parse_json(text: str, where: str):
    """json.loads with one message naming where for malformed or absurdly nested input (a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise UserError(f"{where}: malformed JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to be data") from None


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(root: Path, listing: Path) -> None:
    """Write listing (inside root): the sha256 of every other file under root. Call it last: a folder without its
    listing is incomplete. The one writer of the checksum lists of step folders, exports and conversions."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != listing)
    write_json_atomic(listing, {str(p.relative_to(root)): sha256(p) for p in files})


def seal_problem(root: Path, listing: Path, unlisted: str = "*.pt", under: str | None = None) -> str | None:
    """Why the files under root do not match listing (seal's), naming the file; None when every file it lists is
    there with its sha256 and no file matching the pattern unlisted is missing from it. With under (a subfolder's
    name), only that subfolder is checked: a tokenizer reused from a checkpoint need not hash its weights. The one
    reader of seal's lists."""
    try:
        listed = json.loads(listing.read_text())
    except (ValueError, UnicodeDecodeError):
        listed = None
    except FileNotFoundError:
        return f"{listing.name} is missing"
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):  # a check, not an assert: -O keeps it
        return f"{listing.name} is not a checksum list"
    for name, digest in listed.items():
        if under is not None and Path(name).parts[:1] != (under,):
            continue
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # only files inside the folder
            return f"{name} is missing"
        if not path.is_file():
            return f"{name} {absent(path)}" if path.exists() else f"{name} is missing"
        try:
            if sha256(path) != digest:
                return f"{name} is corrupt (its sha256 differs from {listing.name})"
        except FileNotFoundError:  # removed while it was read
            return f"{name} is missing"
    known = set(listed) | {listing.name}
    for path in sorted((root / under if under else root).rglob(unlisted)):
        name = str(path.relative_to(root))
        if name not in known and not path.is_dir():
            return f"{name} is not in {listing.name}"
    return None
