"""docs/benchmarks.md and the README: every generated block is what its results file gives,
and nothing outside the blocks is touched."""

import re
from pathlib import Path

import pytest

from mpm_fx.bench import report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
PAGES = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_are_regenerated_from_the_results(page):
    text = page.read_text()
    assert report.render(text, RESULTS) == text, "run: mpm-bench report"


def test_every_block_is_known_and_rendered_from_its_file(tmp_path):
    """A changed result changes its block and nothing else; a missing file says which, and the
    command that writes it."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    names = re.findall(r"<!-- generated: ([\w-]+) -->", page)
    assert names and set(names) <= set(report.BLOCKS)
    results = tmp_path / "results"
    for f in RESULTS.rglob("*.json"):
        target = results / f.relative_to(RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.read_text().replace('"pixel_agreement": 0.9', '"pixel_agreement": 0.1'))
    changed = report.render(page, results)
    assert changed != page
    outside = lambda text: re.sub(r"<!-- generated: .*?<!-- /generated -->", "", text,  # noqa
                                  flags=re.S)
    assert outside(changed) == outside(page)
    (results / "gate_measure.json").unlink()
    assert "`bench/results/gate_measure.json` is missing (`mpm-bench gate --measure 5`)" in \
        report.render(page, results)
