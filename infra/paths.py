"""What a command may read and where it may write, checked before anything is loaded or written.

    input file ──file_problem──▶ None, or why it is not a readable regular file (missing, a symbolic link loop, a
                                 folder, a FIFO or device)
    output file / folder ──check_output_file / check_output_folder──▶ refused in one line when it would replace an
                                 existing file (without --overwrite), land on a file a training run wrote, stand where
                                 a folder is, carry a name over the file system's limit, or sit in a folder nobody
                                 can write to
    temporary_name ──▶ a writer-unique name beside the target, within the same name limit

Paths are compared resolved (symbolic links and `..` followed), so no spelling of a run's own files gets past.
Nothing here writes: a refused command leaves the disk as it was.
"""
import errno
import json
import os
import secrets
import stat
from pathlib import Path

from infra.errors import UserError

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems alike
# What a training run writes in its folder (checkpoint.py, train.py, evaluate.py's final test). Evaluations of
# a run go to RUN/eval/, captions anywhere but here.
RUN_OWNED = ("checkpoints", "logs", "samples", "config.json", "run.lock")


def file_problem(path) -> str | None:
    """Why `path` is not a readable regular file, or None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop (the link leads back to itself)"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        if error.errno == errno.EACCES:
            return "permission denied"
        return "no such file or folder"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        return "a device or socket, not a regular file"
    return None


def temporary_name(path: Path) -> Path:
    """A temporary file beside `path`, unique to this writer (pid + random), whose name stays within NAME_MAX bytes:
    a long target name is shortened (on a character boundary) rather than the temporary one refused."""
    path = Path(path)
    suffix = f".{os.getpid()}-{secrets.token_hex(4)}.tmp"
    stem = f".{path.name}".encode()[:NAME_MAX - len(suffix)].decode("utf-8", errors="ignore")
    return path.with_name(stem + suffix)


def named(path, flag: str) -> str:
    """How a message names an output: the flag that gave it, then the path."""
    return f"{flag} {path}" if flag else str(path)


def check_name_lengths(path: Path, flag: str) -> None:
    for part in Path(path).parts:
        if len(part.encode()) > NAME_MAX:
            raise UserError(f"{named(path, flag)}: the name {part[:40]}... is {len(part.encode())} bytes, over the "
                            f"file system's {NAME_MAX}; choose a shorter name")


def run_folders_above(path: Path) -> list[Path]:
    """The training run folders that hold `path` (resolved): folders with a run.lock, or with checkpoints/ beside
    config.json or logs/."""
    found = []
    for folder in [path, *path.parents]:
        if (folder / "run.lock").is_file() or (folder / "checkpoints").is_dir() and (
                (folder / "config.json").is_file() or (folder / "logs").is_dir()):
            found.append(folder)
    return found


def refuse_run_files(target, flag: str, runs=()) -> None:
    """Refuse `target` when it is a training run's folder or lies in one of its own files: checkpoints/, logs/,
    samples/, config.json, run.lock of `runs` (the run of the checkpoint being used) or of any run folder above it."""
    resolved = Path(target).resolve()
    for run in [Path(r).resolve() for r in runs] + run_folders_above(resolved):
        if resolved == run or resolved.is_relative_to(run) and resolved.relative_to(run).parts[0] in RUN_OWNED:
            owned = run / resolved.relative_to(run).parts[0] if resolved != run else run
            raise UserError(f"{named(target, flag)}: {owned} belongs to the training run in {run}, which this command "
                            f"never overwrites; write elsewhere (evaluate.py: leave out --output-dir for RUN/eval/)")


def check_writable_folder(folder: Path, flag: str) -> None:
    """The folder a file will be written into is a folder (or can be made one) that this user can write to."""
    existing = Path(folder)
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{named(folder, flag)}: {existing} is a file (or a broken link), where a folder is needed")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{named(folder, flag)}: cannot write in {existing} (permission denied or a read-only file "
                        f"system); choose a writable folder")


def check_output_file(path, *, overwrite: bool, flag: str = "--output", runs=(), hint: str = "") -> Path:
    """An output file this command may write: refused (before anything is loaded) when it exists and `overwrite` is
    off, is a folder or not a regular file, belongs to a training run, has an over-long name, or its folder is not
    writable. `hint` adds another way out to the "exists" message (caption.py: --resume)."""
    path = Path(path)
    check_name_lengths(path, flag)
    refuse_run_files(path, flag, runs)
    if path.is_dir():
        raise UserError(f"{named(path, flag)} is a folder; give a file name (e.g. {path / 'out.jsonl'})")
    if path.exists() or path.is_symlink():
        if problem := file_problem(path):
            raise UserError(f"{named(path, flag)}: {problem}; give a regular file name")
        if not overwrite:
            raise UserError(f"{named(path, flag)} exists; add --overwrite to replace it{hint}, or choose another name")
    check_writable_folder(path.parent, flag)
    return path


def check_output_folder(path, *, overwrite: bool, flag: str = "--output", runs=()) -> Path:
    """An output folder: refused when it is a file, belongs to a training run, holds files and `overwrite` is off,
    has an over-long name, or cannot be created."""
    path = Path(path)
    check_name_lengths(path, flag)
    refuse_run_files(path, flag, runs)
    if path.exists() and not path.is_dir():
        raise UserError(f"{named(path, flag)} is a file; give a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{named(path, flag)} exists and is not empty; add --overwrite to replace it, or choose "
                        f"another folder")
    check_writable_folder(path if path.is_dir() else path.parent, flag)
    return path


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file cannot be whole (a header past the end, a header that does not parse, tensors the
    file is too short for), from its header alone; None when its size matches what the header describes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header (truncated)"
        header_bytes = int.from_bytes(head, "little")
        if 8 + header_bytes > size:
            return f"truncated: its header claims {header_bytes} bytes, the file holds {size - 8} after it"
        try:
            header = json.loads(f.read(header_bytes))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "its header is not a safetensors header (damaged, or another kind of file)"
    if 8 + header_bytes + end != size:
        return f"truncated or damaged: {size} bytes, its header describes {8 + header_bytes + end}"
    return None


def check_snapshot_files(folder, flag: str) -> None:
    """Every *.safetensors file of a model folder whole, checked from the headers before any weight is read."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise UserError(f"{file}: {problem}; copy or download it again ({flag} {folder})")
