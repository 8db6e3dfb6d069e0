"""The results as pages to look at: one self-contained report.html per evaluation, one summary page per grid.

    python report.py screenshot runs/perceiver_dora/samples/report.html report.png     # headless Chromium

A run's report: a header (run, checkpoint, decoding settings, the metrics table), then one row per video, worst
METEOR first: a strip of the frames the model saw (JPEG thumbnails inlined as data URIs, so the file travels
alone), the predicted caption, the references and the caption's own scores; a filter box narrows the rows. The
page is UTF-8 with a font stack that names Korean fonts, so Hangul renders on Linux, macOS and Windows alike.
The grid's summary (experiments.py) holds the E1-E10 table, the LoRA-vs-DoRA comparison with its conclusions, the
comparison plots, the learning curves of all runs overlaid, and links to each run's report.
"""
import argparse
import base64
import html
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data import VideoError, read_frames
from infra.errors import UserError, user_errors

FONTS = ('"Noto Sans KR", "Noto Sans CJK KR", "Nanum Gothic", "NanumGothic", "Malgun Gothic", '
         '"Apple SD Gothic Neo", system-ui, sans-serif')
STYLE = f"""
body {{ font-family: {FONTS}; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
.frames img {{ height: 56px; margin-right: 2px; border-radius: 2px; }}
.prediction {{ font-weight: 600; }} .refs {{ color: #555; font-size: 0.9em; }}
.score {{ font-variant-numeric: tabular-nums; white-space: nowrap; }} .note {{ color: #a33; }}
#filter {{ width: 30em; padding: 4px; margin: 0.5em 0; font-family: inherit; }}
"""
# Rows whose text holds every word typed in the box stay visible; nothing else runs on the page.
FILTER_SCRIPT = """
document.getElementById("filter").addEventListener("input", function (event) {
  var words = event.target.value.toLowerCase().split(/\\s+/).filter(Boolean);
  document.querySelectorAll("tr.video").forEach(function (row) {
    var text = row.textContent.toLowerCase();
    row.style.display = words.every(function (w) { return text.indexOf(w) >= 0; }) ? "" : "none";
  });
});
"""


def thumbnail_uris(video, num_frames: int, height: int = 56, start=None, end=None) -> list[str]:
    """The `num_frames` frames the model reads (same sampling, centre square as CLIP's crop), as JPEG data URIs."""
    frames = read_frames(video, num_frames, start=start, end=end)  # (F, H, W, 3) uint8 RGB
    F, H, W, _ = frames.shape
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    uris = []
    for frame in frames[:, top:top + side, left:left + side]:  # (side, side, 3)
        small = cv2.resize(np.ascontiguousarray(frame[:, :, ::-1]), (height, height), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            raise ValueError(f"{video}: a thumbnail could not be JPEG-encoded")
        uris.append("data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii"))
    return uris


def frame_strip(row: dict, num_frames: int) -> str:
    """The thumbnails of a row's video (or segment) as <img> tags, or a note naming why it could not be shown."""
    try:
        uris = thumbnail_uris(row["video"], num_frames, start=row.get("start"), end=row.get("end"))
        return "".join(f'<img src="{uri}" alt="frame {i + 1}">' for i, uri in enumerate(uris))
    except VideoError as error:
        return f'<span class="note">{html.escape(str(error))}</span>'


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="ko"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head>\n<body>\n{body}\n'
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def key_values(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f'<table class="header">{rows}</table>'


def metrics_table(metrics: dict) -> str:
    """{name: {"value", "reference"}} as an HTML table (the same rows evaluate.py prints)."""
    rows = "".join(f'<tr><td>{html.escape(name)}</td><td class="score">{m["value"]:.4f}</td>'
                   f'<td class="refs">{html.escape(m.get("reference", ""))}</td></tr>' for name, m in metrics.items())
    return f'<table class="metrics"><tr><th>metric</th><th>value</th><th>reference</th></tr>{rows}</table>'


def score_cell(row: dict) -> str:
    names = [k for k in ("meteor", "cider_d", "bertscore_f1") if k in row]
    return "<br>".join(f"{name} {row[name]:.3f}" for name in names)


def video_row(row: dict, num_frames: int) -> str:
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in row.get("references", []))
    return (f'<tr class="video"><td>{html.escape(str(row.get("id", "")))}<br>'
            f'<span class="refs">{html.escape(Path(str(row["video"])).name)}</span></td>'
            f'<td class="frames">{frame_strip(row, num_frames)}</td>'
            f'<td><div class="prediction">{html.escape(row["prediction"])}</div>'
            + (f'<ul class="refs">{refs}</ul>' if refs else "") +
            f'</td><td class="score">{score_cell(row)}</td></tr>')


def render_report(title: str, header: dict, metrics: dict | None, rows: list[dict], *, num_frames: int) -> str:
    """The page for one evaluation (or one caption.py run: no references, no scores). Rows with a METEOR are
    sorted worst first, so failures are on top; the others keep their order."""
    if all("meteor" in r for r in rows):
        rows = sorted(rows, key=lambda r: r["meteor"])
    body = (f"<h1>{html.escape(title)}</h1>\n{key_values(header)}\n"
            + (f"<h2>metrics</h2>\n{metrics_table(metrics)}\n" if metrics else "")
            + f'<h2>{len(rows)} videos</h2>\n<input id="filter" type="search" placeholder="filter: words in the '
              f'caption, references or id">\n<table id="videos"><tr><th>video</th><th>frames the model saw</th>'
              f'<th>caption / references</th><th>scores</th></tr>\n'
            + "\n".join(video_row(r, num_frames) for r in rows) + "\n</table>")
    return page(title, body, FILTER_SCRIPT)


@dataclass
class SummarySection:
    """A table of the grid's page after the results (LoRA vs DoRA per projector), with lines below it."""
    heading: str
    rows: list[dict]
    columns: list[str]
    lines: list[str] = field(default_factory=list)


def html_table(rows: list[dict], columns: list[str], row_class: str, table_id: str | None = None) -> str:
    """Floats with four decimals; a value a row lacks (or None) as an empty cell."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cells = ["".join(f'<td class="score">{v:.4f}</td>' if isinstance(v, float) else
                     f"<td>{html.escape('' if v is None else str(v))}</td>" for v in (row.get(c) for c in columns))
             for row in rows]
    opening = f'<table id="{table_id}">' if table_id else "<table>"
    return f"{opening}<tr>{head}</tr>" + "".join(f'<tr class="{row_class}">{c}</tr>' for c in cells) + "</table>\n"


def render_summary(title: str, table: list[dict], columns: list[str], images: dict[str, Path],
                   links: dict[str, str], notes: list[str] = (), sections: list[SummarySection] = ()) -> str:
    """The grid's page: the results table, each section's table and lines, PNG figures inlined, and a link per run
    to its report."""
    body = (f"<h1>{html.escape(title)}</h1>\n" + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
            + html_table(table, columns, "run", "results")
            + "".join(f"<h2>{html.escape(s.heading)}</h2>\n" + html_table(s.rows, s.columns, "compared")
                      + "".join(f"<p>{html.escape(line)}</p>" for line in s.lines) for s in sections)
            + "".join(f'<h2>{html.escape(name)}</h2><img src="{png_uri(path)}" alt="{html.escape(name)}"'
                      f' style="max-width:100%">\n' for name, path in images.items())
            + "<h2>each run's report</h2><ul>" + "".join(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a>'
                                                       f"</li>" for name, href in links.items()) + "</ul>")
    return page(title, body)


# ---- looking at a page the way a reader does ---------------------------------------------------------------------
def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def run_browser(page_path: Path, *flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page; stderr carries the page's console messages as `CONSOLE` lines."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (chromium, chromium-browser or google-chrome on PATH); install "
                                "it (Debian: apt-get install chromium) to render reports")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state shared between runs
        return subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags,
                               Path(page_path).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout)


def console_messages(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page_path, out_png, *, width: int = 1280, height: int = 1600) -> list[str]:
    """A PNG of the page as headless Chromium draws it; returns the page's console messages (none is healthy)."""
    if not Path(page_path).is_file():
        raise FileNotFoundError(f"{page_path}: no such report")
    out_png = Path(out_png).resolve()
    result = run_browser(Path(page_path), f"--screenshot={out_png}", f"--window-size={width},{height}")
    if not out_png.is_file():
        raise UserError(f"{page_path}: Chromium wrote no screenshot (exit {result.returncode}): "
                         f"{result.stderr.strip().splitlines()[-1:] or ''}")
    return console_messages(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("screenshot", help="a PNG of a report page (headless Chromium)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shot.add_argument("report", help="a report.html")
    shot.add_argument("png", help="the PNG to write")
    shot.add_argument("--width", type=int, default=1280, help="window width in pixels")
    shot.add_argument("--height", type=int, default=1600, help="window height in pixels (the page is cut there)")
    args = parser.parse_args(argv)
    with user_errors():
        messages = screenshot(args.report, args.png, width=args.width, height=args.height)
        print(f"wrote {args.png}" + "".join(f"\nconsole: {m}" for m in messages))


if __name__ == "__main__":
    main()
