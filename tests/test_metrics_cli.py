"""metrics.py's command: files read as manifests are (UTF-8 with or without a byte-order mark), anything else named in
one line with the file, and its flags checked before any text or model is loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINES = [{"id": "v1", "prediction": "빨간 원이 움직인다.", "references": ["빨간 원이 움직인다."]},
         {"id": "v2", "prediction": "파란 별", "references": ["노란 세모가 나온다."]}]


def run_metrics(*args):
    return subprocess.run([sys.executable, str(ROOT / "metrics.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("name, text", [
    ("bom.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in LINES)),
    ("bom.json", json.dumps(LINES, ensure_ascii=False)),
])
def test_a_byte_order_mark_is_read_as_manifests_read_it(tmp_path, name, text):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "plain").write_text(text, encoding="utf-8")
    with_mark, plain = run_metrics(tmp_path / name, "--json"), run_metrics(tmp_path / "plain", "--json")
    assert with_mark.returncode == 0, with_mark.stderr
    assert json.loads(with_mark.stdout) == json.loads(plain.stdout) and json.loads(plain.stdout)["captions"] == 2


def test_bytes_that_are_not_utf8_name_the_file(tmp_path):
    (tmp_path / "cp949.jsonl").write_bytes(json.dumps(LINES[0], ensure_ascii=False).encode("cp949"))
    result = run_metrics(tmp_path / "cp949.jsonl")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'cp949.jsonl'}: not UTF-8 text (byte ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_symlink_loop_or_a_pipe_is_not_called_missing(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    loop, pipe = run_metrics(tmp_path / "loop.jsonl"), run_metrics(tmp_path / "pipe.jsonl")
    assert loop.stderr.strip() == f"error: {tmp_path / 'loop.jsonl'}: a symbolic link loop (the link leads back to " \
                                  f"itself) (FILE)"
    assert pipe.stderr.strip() == f"error: {tmp_path / 'pipe.jsonl'}: a named pipe (FIFO), not a regular file (FILE)"


@pytest.mark.parametrize("flags, words", [(["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
                                          (["--bertscore-layer", "-1"], "--bertscore-layer must be a whole number "
                                                                        ">= 0, got -1"),
                                          (["--bertscore-model", "nowhere"], "--bertscore-model nowhere: no such "
                                                                             "folder")])
def test_flags_are_refused_before_loading(tmp_path, flags, words):
    (tmp_path / "p.jsonl").write_text(json.dumps(LINES[0], ensure_ascii=False) + "\n", encoding="utf-8")
    result = run_metrics(tmp_path / "p.jsonl", *flags)
    assert result.returncode == 1 and result.stderr.strip() == f"error: {words}"
