"""The README's two set-up commands stay the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "README must give exactly two set-up commands"
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_main_command_runs_the_installed_benchmark():
    main = next(c for c in readme_commands() if "pytest" not in c)
    assert main.split("&&")[-1].split()[-1] == "mpm-bench"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'mpm-bench = "mpm_fx.bench.cli:main"' in pyproject
    assert (ROOT / "bench" / "cli.py").is_file()


def test_ci_runs_the_gate_the_readme_names():
    gate = re.search(r"^(GLIBC_TUNABLES=\S+ mpm-bench gate.*)$", (ROOT / "README.md").read_text(),
                     re.M).group(1)
    assert gate in (ROOT / ".ci" / "run").read_text().splitlines()
