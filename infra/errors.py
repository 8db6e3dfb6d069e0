"""One line for every error a user can fix, a traceback only for our own bugs.

Each command (train.py, evaluate.py, caption.py, export.py, metrics.py, data.py) runs its main inside
`user_errors()`. What the user can fix raises `UserError` with a message that names the file or flag and what to
do; the operating system's refusals (a full disk, a read-only folder, a folder where a file was expected, a file
that is not there) are the user's to fix too. Both become one `error:` line. Anything else, a ValueError or a
KeyError included, is a programming error and keeps its traceback.
"""
import errno
import os
import stat
import sys
from contextlib import contextmanager

OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose another folder) and run again",
    errno.EIO: "a write failed (input/output error): check the disk, then run again",
    errno.EDQUOT: "the disk quota is exhausted: free space (or choose another folder) and run again",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EISDIR: "this is a folder, a file was expected",
    errno.ENOTDIR: "a file stands where a folder was expected",
    errno.ENOENT: "no such file or folder",
    errno.ELOOP: "a symbolic link loop: the link points (through others) back at itself",
    errno.ENAMETOOLONG: "a name is too long for the file system (255 bytes a name): choose a shorter one",
    errno.EPIPE: "the reader of the output went away",
}


class UserError(ValueError):
    """Input the user can fix (a flag, a file, a folder, a checkpoint): its message names it and says what to do.
    A ValueError, so code that checks a value keeps catching it."""


def describe_os_error(error: OSError) -> str:
    where = error.filename or ("the standard output" if standard_output_failed(error) else "a file being written")
    advice = OS_ADVICE.get(error.errno, error.strerror or str(error))
    return f"{where}: {advice}"


def standard_output_failed(error: OSError) -> bool:
    """Whether a nameless OSError is the standard output's: a closed pipe, or a full disk under `command > file`
    (/dev/full included). Then the output is pointed at /dev/null, so the interpreter's own flush at exit cannot
    report the same failure a second time."""
    try:
        fd = sys.stdout.fileno()
        mode, device = os.fstat(fd).st_mode, os.fstat(fd).st_rdev
        full = stat.S_ISCHR(mode) and device == os.makedev(1, 7) or stat.S_ISREG(mode) and \
            os.fstatvfs(fd).f_bavail == 0
        if not (error.errno == errno.EPIPE or error.errno in (errno.ENOSPC, errno.EDQUOT) and full):
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return True
    except (OSError, ValueError, AttributeError):  # no usable standard output to look at
        return False


def describe(error: BaseException) -> str | None:
    """The one-line message for an error a user can act on; None for anything else."""
    if isinstance(error, OSError) and error.errno is not None:
        return describe_os_error(error)
    if isinstance(error, (UserError, OSError)):  # an OSError without errno: our own "no such file" with its advice
        text = str(error)
        return text.splitlines()[0] if text else type(error).__name__
    return None


@contextmanager
def user_errors():
    """Turn user-fixable errors into `error: ...` on stderr and exit status 1."""
    try:
        yield
    except Exception as error:
        message = describe(error)
        if message is None:
            raise
        sys.exit(f"error: {message}")
