"""docs/benchmarks.md and the README's results table are what the results files give."""

from pathlib import Path

from mpm_fx.bench import report

ROOT = Path(__file__).resolve().parents[2]


def test_pages_are_regenerated_from_the_results(tmp_path):
    page = report.render(ROOT / "bench" / "results")
    assert (ROOT / "docs" / "benchmarks.md").read_text() == page, "run: mpm-bench report"
    readme = (ROOT / "README.md").read_text()
    assert report.with_results(readme, ROOT / "bench" / "results") == readme
    # a changed result changes the pages
    results = tmp_path / "results"
    for f in (ROOT / "bench" / "results").rglob("*.json"):
        target = results / f.relative_to(ROOT / "bench" / "results")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.read_text().replace('"pixel_agreement": 0.98', '"pixel_agreement": 0.18'))
    assert report.render(results) != page
    assert report.with_results(readme, results) != readme
