"""Each command's top level: user errors become one `error:` line and exit 1, programming errors keep their
traceback."""
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from infra.errors import describe

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
