"""The README's two set-up commands stay the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "README must give exactly two set-up commands"
    test_lines = next(c for c in commands if "pytest" in c).splitlines()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    positions = [ci_lines.index(line) for line in test_lines]  # each line, verbatim
    assert positions == sorted(positions), "CI runs the README's lines in their order"
    assert test_lines[-1] == "python -m pytest -q"


def test_commands_are_short_and_install_what_they_need():
    main, tests = sorted(readme_commands(), key=lambda c: "pytest" in c)
    assert all(len(line) <= 100 for c in (main, tests) for line in c.splitlines())
    assert main.splitlines()[-1] == "mpm-bench" and '".[bench]"' in main
    assert '".[test]"' in tests
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'mpm-bench = "mpm_fx.bench.cli:main"' in pyproject
    assert (ROOT / "bench" / "cli.py").is_file()


def test_ci_runs_the_gate_the_readme_names():
    assert "`mpm-bench gate`" in (ROOT / "README.md").read_text()
    assert "mpm-bench gate" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_stays_short():
    """Details live in docs/; the README is what a newcomer reads first."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
