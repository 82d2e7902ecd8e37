"""The mpm-bench command line: bad input is one line naming the fix with exit code 2, help
answers without importing torch, timings say when they cannot be trusted."""

import subprocess
import sys
from pathlib import Path

import pytest

from mpm_fx.bench import common

SCRIPT = Path(sys.executable).parent / "mpm-bench"
TINY = "tests.bench.test_bench:tiny_segmenter"
ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd=ROOT):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--schedules", "2,x"], "'x' in '2,x' is not an int"),
    (["--schedules", "2,2"], "appears twice"),
    (["--backends", "eager,tensorrt"], "unknown backend"),
    (["--photos", "99"], "photos must be an integer in 1..17"),
    (["tune", "--repeats", "x"], "repeats must be an integer"),
    (["--compare", "mpm"], "unknown method 'mpm' to compare with MPM"),
    (["--compare", "tome:inside"], "unknown placement 'inside'"),
    (["frontier", "--methods", "tome,forest:edges"], "'edges' in 'forest:edges' is not an option"),
    (["frontier", "--methods", "forest:edges=odd"], "option edges of 'forest' must be one of"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("mpm-bench")


def test_a_schedule_past_the_models_blocks_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run(  # python -m puts the checkout on the path, so TINY imports
        [sys.executable, "-m", "mpm_fx.bench", "--models", TINY, "--sizes", "64", "--schedules",
         "9", "--photos", "1", "--repeats", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "block 9 is out of range: the encoder has 4 blocks" in out.stderr.strip().splitlines()[-1]


def test_help_shows_defaults_and_imports_no_torch():
    code = ("import sys\nfrom mpm_fx.bench import cli\n"
            "for argv in (['--help'], ['run', '--help'], ['tune', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'help imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(default: 2,5;2,4,6,8,10)" in out.stdout  # run --help
    assert "--min-fidelity" in out.stdout and "least mean pixel agreement" in out.stdout


def test_steadiness_names_a_wide_spread(monkeypatch):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    steady = common.steadiness([100.0, 101.0, 99.0, 100.5, 99.5])
    assert steady["steady"] and steady["note"] == ""
    wide = common.steadiness([100.0, 150.0, 60.0, 100.0, 170.0])
    assert not wide["steady"] and "p10-p90 spread" in wide["note"] and "--repeats" in wide["note"]
    monkeypatch.setattr(common.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert "load average 9.0" in common.steadiness([100.0, 101.0, 99.0])["note"]
