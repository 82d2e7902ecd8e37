"""mpm-bench study NAME: every study runs on the shared runner in its quick form (real model,
small sizes, eager) and writes what docs/benchmarks.md reads; the list --help shows is the list
the runner runs."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpm_fx.bench import cli, studies
from mpm_fx.bench.common import UsageError
from mpm_fx.bench.studies import STUDIES
from mpm_fx.bench.studies_list import STUDY_FLAGS, STUDY_NAMES

from fixtures import needs_held_out

SCRIPT = Path(sys.executable).parent / "mpm-bench"


def study(name, tmp_path, *extra) -> dict:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([str(SCRIPT), "study", name, "--quick", "--backends", "eager",
                           "--json", str(out), *extra], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_help_lists_what_the_runner_runs():
    assert list(STUDIES) == list(STUDY_NAMES)


def test_each_study_declares_exactly_the_flags_it_reads():
    for name, function in STUDIES.items():
        read = set(re.findall(r'run\.option\("(\w+)"', inspect.getsource(function)))
        assert read == set(STUDY_FLAGS[name]), name


@pytest.mark.parametrize("argv, message", [
    (["local", "--methods", "tome"], r"study local does not read --methods; it reads --size, "
                                     r"--schedules"),
    (["onnx", "--memory", "--photos", "3"], r"does not read --memory, --photos"),
    (["batches", "--share-sizes", ""], r"does not read --share-sizes"),
    (["high-res", "--methods", "mpm,forest:edges=odd"],
     r"--methods forest:edges=odd: option edges of 'forest' must be one"),
    (["op-cost", "--methods", "tome:beta=1"], r"unknown option\(s\) beta for method 'tome'"),
])
def test_a_bad_or_unread_flag_fails_before_anything_loads(monkeypatch, argv, message):
    """The study's runner never starts (no header, no model): the flag is named at once."""
    def started(*_):
        raise AssertionError("the study started before its flags were checked")

    monkeypatch.setattr(studies, "start_script", started)
    monkeypatch.setattr(studies.Runner, "model", started)
    args = cli.parser().parse_args(["study", *argv])
    with pytest.raises(UsageError, match=message):
        studies.main(args)


def test_op_cost_times_every_method_beside_a_block(tmp_path):
    result = study("op-cost", tmp_path, "--methods", "mpm,tome,forest", "--memory")
    row = result["op_cost"][0]
    assert row["block_ms"] > 0 and set(row["merge_ms"]) == {"mpm", "tome", "forest"}
    assert all(m["peak_MiB"] > 0 for m in result["memory"])


@pytest.mark.compile
def test_high_res_measures_cost_share_and_agreement(tmp_path):
    result = study("high-res", tmp_path, "--methods", "mpm,local,forest", "--share-methods",
                   "mpm,local", "--schedules", "0,1,2;2,5")
    assert {r["tokens"] for r in result["op_cost"]} == {64, 256}
    for run in result["runs"]:
        share = run["time"]["eager"]
        assert 0 < share["share"] < 1 and share["merges_ms"] < share["model_ms"]
        assert 0 <= run["vs_unmerged"] <= 1
    assert all(r["vs_global_mpm"] == 1.0 for r in result["runs"] if r["method"] == "mpm")


@needs_held_out
def test_local_chooses_on_the_search_photos_and_checks_elsewhere(tmp_path):
    result = study("local", tmp_path, "--schedules", "0,1,2")
    entry = result["schedules"][0]
    best = max(entry["search"], key=lambda k: entry["search"][k]["pixel_agreement"])
    assert best == str(entry["chosen"])
    assert set(entry["scores"]) == {"search", "check", "held-out"}
    assert set(entry["time"]["eager"]) == {"unmerged_ms", "mpm_ms", "local_ms"}


def test_batches_and_size_aware(tmp_path):
    rows = study("batches", tmp_path)["batches"]
    assert rows[0]["padding_share"] == 0 and 0 <= rows[1]["padding_share"] < 0.5
    variants = study("size-aware", tmp_path, "--schedules", "2,5")["variants"]
    assert set(variants) == {"(2, 5) plain", "(2, 5) size-aware"}


@pytest.mark.compile
def test_onnx_runs_the_real_model_without_mpm_fx(tmp_path):
    runs = study("onnx", tmp_path, "--schedules", "2,5")["runs"]
    assert [r["batch"] for r in runs] == [1, 3]
    assert all(r["max_abs_difference"] < 1e-4 for r in runs)
