"""The evaluation report's skeleton, CSS, script and histogram frame are package data in clients/report/: they are
there, the wheel's package-data globs cover them, and a rendered report inlines them with every placeholder filled."""

import fnmatch
import importlib.resources
import re
import tomllib
from pathlib import Path

from clients.evaluation import ImageRecord, histogram_svg, render_report, summarize

ASSETS = ("report.html", "report.css", "report.js", "histogram.svg")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# What string.Template would substitute: $name or ${name}.
PLACEHOLDER = re.compile(r"\$(\{\w+\}|[A-Za-z_]\w*)")


def test_every_asset_is_package_data() -> None:
    folder = importlib.resources.files("clients") / "report"
    assert sorted(entry.name for entry in folder.iterdir()) == sorted(ASSETS)
    for name in ASSETS:
        assert (folder / name).read_text(encoding="utf-8").strip(), name
    # An editable install reads the source tree, so check the globs the wheel is built from as well.
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["clients"]
    for name in ASSETS:
        assert any(fnmatch.fnmatch(f"report/{name}", pattern) for pattern in patterns), name


def test_rendered_report_inlines_the_assets_and_fills_every_placeholder() -> None:
    records = [
        ImageRecord(variant, "a red circle", 0, 0, 7, f"images/{variant}.png", {"jpeg_compressibility": score})
        for variant, score in (("base", 1.5), ("lora", 2.5))
    ]
    summary = summarize(records, ["jpeg_compressibility"], {"model": "tiny-sd"})
    report = render_report(records, ["jpeg_compressibility"], summary)
    folder = importlib.resources.files("clients") / "report"
    for name in ("report.css", "report.js"):
        assert (folder / name).read_text(encoding="utf-8") in report, name
    assert report.count("<svg ") == 1
    assert "<title>DDPO evaluation: base, lora</title>" in report
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", report), "the report must not load anything external"
    assert not PLACEHOLDER.search(report)
    assert not PLACEHOLDER.search(histogram_svg("jpeg_compressibility", {"base": [1.0, 2.0], "lora": [3.0]}))
