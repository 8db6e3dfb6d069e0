"""report.py: the page's rows, order and escaping; the page in headless Chromium (no console messages, one row per
video, a screenshot that is not blank); the grid's summary page."""
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

import report

needs_browser = pytest.mark.skipif(report.find_browser() is None,
                                   reason="no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def rows(tiny_manifest):
    lines = [json.loads(line) for line in tiny_manifest.read_text().splitlines()][:4]
    rows = [{"id": r["id"], "video": str(tiny_manifest.parent / r["video"]), "prediction": f"<빨간> 원 {i}",
             "references": r["captions"], "meteor": 0.1 * (3 - i), "cider_d": 0.5} for i, r in enumerate(lines)]
    rows.append({"id": "gone", "video": str(tiny_manifest.parent / "gone.mp4"), "prediction": "없다",
                 "references": ["없는 영상"], "meteor": 0.9, "cider_d": 0.0})
    return rows


def write_page(rows, path: Path) -> Path:
    metrics = {"meteor": {"value": 0.25, "reference": "NLTK"}, "cider_d": {"value": 0.5, "reference": "coco"}}
    path.write_text(report.render_report("test report", {"run": "r", "checkpoint": "c"}, metrics, rows,
                                         num_frames=3), encoding="utf-8")
    return path


def test_rows_are_worst_first_escaped_and_carry_the_frames(rows, tmp_path):
    text = write_page(rows, tmp_path / "report.html").read_text(encoding="utf-8")
    ids = re.findall(r'<tr class="video"><td>([^<]*)<br>', text)
    assert ids == ["v3", "v2", "v1", "v0", "gone"]  # by METEOR, worst first
    assert text.count('src="data:image/jpeg;base64,') == 4 * 3  # num_frames thumbnails per readable video
    assert "&lt;빨간&gt; 원 0" in text and "<빨간>" not in text  # the caption is text, not markup
    assert "gone.mp4: no such file" in html.unescape(text)  # the unreadable video says why, the page still renders
    assert '<meta charset="utf-8">' in text and "Noto Sans CJK KR" in text


def test_thumbnails_are_the_frames_the_model_reads(rows):
    import base64

    import cv2

    from data import read_frames
    uris = report.thumbnail_uris(rows[0]["video"], 3, height=28)  # the noise videos are 28 px: no resize
    frames = read_frames(rows[0]["video"], 3)  # (F, H, W, 3)
    for uri, frame in zip(uris, frames):
        jpeg = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
        decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1]  # BGR -> RGB
        assert decoded.shape == frame.shape
        assert np.abs(decoded.astype(int) - frame).mean() < 40  # JPEG of noise at q80: close, not exact


@needs_browser
def test_page_in_headless_chromium(rows, tmp_path):
    from PIL import Image
    page = write_page(rows, tmp_path / "report.html")
    dom = report.run_browser(page, "--dump-dom")
    assert dom.returncode == 0
    assert report.console_messages(dom) == []  # the filter script loads without an error or a message
    assert dom.stdout.count('<tr class="video">') == len(rows)
    messages = report.screenshot(page, tmp_path / "shot.png", width=900, height=700)
    assert messages == []
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("L"), dtype=float)
    assert pixels.shape == (700, 900) and pixels.std() > 10  # text, tables and thumbnails, not a blank page


@needs_browser
def test_console_errors_are_seen(tmp_path):
    """The check above can fail: a page whose script throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text(report.page("broken", "<p>x</p>", "undefinedFunction();"))
    assert any("undefinedFunction" in m for m in report.console_messages(report.run_browser(page, "--dump-dom")))


@needs_browser
def test_screenshot_command(rows, tmp_path, capsys):
    page = write_page(rows, tmp_path / "report.html")
    report.main(["screenshot", str(page), str(tmp_path / "out.png"), "--width", "800", "--height", "600"])
    assert (tmp_path / "out.png").stat().st_size > 1000 and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such report"):
        report.main(["screenshot", str(tmp_path / "none.html"), str(tmp_path / "x.png")])


def test_summary_page_has_the_table_plots_and_links(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.plot([0, 1], [1, 0])
    plt.savefig(tmp_path / "plot.png")
    plt.close()
    table = [{"experiment": "E1", "projector": "linear", "meteor": 0.5}, {"experiment": "E2", "projector": "mlp",
                                                                       "meteor": 0.25}]
    text = report.render_summary("grid", table, ["experiment", "projector", "meteor"], {"plots": tmp_path / "plot.png"},
                                 {"E1 linear": "../runs/E1/samples/report.html"}, notes=["BERTScore off"])
    assert text.count('<tr class="run">') == 2 and "<td class=\"score\">0.5000</td>" in text
    assert 'src="data:image/png;base64,' in text and 'href="../runs/E1/samples/report.html"' in text
    assert "BERTScore off" in text


def test_summary_page_sections_follow_the_results(tmp_path):
    """A section (LoRA vs DoRA) is its own table after the results, its lines below it; a missing value is empty."""
    section = report.SummarySection("LoRA vs DoRA", [{"projector": "mlp", "meteor_lora": 0.5, "ratio": None},
                                                     {"projector": "<b>", "meteor_lora": 0.25}],
                                    ["projector", "meteor_lora", "ratio"], ["mlp: DoRA & LoRA draw"])
    text = report.render_summary("grid", [{"experiment": "E1"}], ["experiment"], {}, {}, sections=[section])
    assert text.count('<tr class="run">') == 1 and text.count('<tr class="compared">') == 2
    assert text.index('id="results"') < text.index("<h2>LoRA vs DoRA</h2>") < text.index("<p>mlp: DoRA &amp; LoRA draw")
    assert '<tr class="compared"><td>mlp</td><td class="score">0.5000</td><td></td></tr>' in text
    assert "&lt;b&gt;" in text and "<td>None</td>" not in text
