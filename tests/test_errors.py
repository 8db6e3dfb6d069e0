"""Each command's top level: user errors become one `error:` line and exit 1, programming errors keep their
traceback."""
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from infra import checkpoint
from infra.errors import UserError, describe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only"), (errno.EISDIR, "is a folder")])
def test_operating_system_refusals_name_the_file_and_what_to_do(code, words):
    message = describe(OSError(code, "whatever the OS says", "/runs/x/checkpoints/best_model.pt"))
    assert message.startswith("/runs/x/checkpoints/best_model.pt: ") and words in message


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from infra.errors import UserError, user_errors\n"
              "with user_errors():\n    raise {}\n")
    for raised, one_line in [("UserError('data/train.jsonl:4: caption 1 is empty')", True),
                             ("OSError(28, 'No space left on device', 'runs/x/state.pt')", True),
                             ("FileNotFoundError('runs/x/best_model.pt: no such checkpoint')", True),
                             ("ZeroDivisionError('a bug')", False),
                             ("ValueError('a bug of ours checking a value')", False),
                             ("KeyError('a bug of ours looking a key up')", False)]:
        result = subprocess.run([sys.executable, "-c", script.format(raised), str(ROOT)], capture_output=True,
                                text=True)
        assert result.returncode == 1
        assert ("Traceback" not in result.stderr) == one_line, result.stderr
        if one_line:
            assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_a_user_error_is_a_value_error_told_in_one_line():
    assert issubclass(UserError, ValueError)
    assert describe(UserError("--top-p must be in (0, 1], got 0.0\nmore")) == "--top-p must be in (0, 1], got 0.0"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_standard_output_is_named_once(tmp_path):
    """`command > file` on a full disk: the error names the standard output, in one line, and the interpreter's own
    flush at exit adds nothing."""
    script = ("import sys, errno; sys.path.insert(0, sys.argv[1]); from infra.errors import user_errors\n"
              "with user_errors():\n    print('a caption\\t' * 100)\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", script, str(ROOT)], stdout=full, stderr=subprocess.PIPE,
                                text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: the standard output: the disk is full: free space (or choose "
                                          "another folder) and run again"]


def test_a_write_that_fails_without_a_file_name_names_the_file(tmp_path):
    def full_disk(f):
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")  # what a plain write() raises: no file name
    with pytest.raises(OSError) as failed:
        checkpoint.atomic_write(tmp_path / "metrics.json", full_disk)
    assert describe(failed.value).startswith(f"{tmp_path / 'metrics.json'}: the disk is full")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
