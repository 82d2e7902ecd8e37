"""The Python side of the emulated Raspberry Pi 5 check (bench/pi5): the comparison of the
emulated packages' outputs with the x86 reference, and the reference's own contents."""

import torch

from mpm_fx.bench.pi5.compare import TOLERANCE, compare


def _reference():
    g = torch.Generator().manual_seed(0)
    unmerged = torch.randn(2, 3, 8, 8, generator=g)
    merged = unmerged + 0.1 * torch.randn(2, 3, 8, 8, generator=g)  # merging moves it
    return {"unmerged": unmerged, "merged": merged, "token_counts": [[150, 110], [140, 100]]}


def test_matching_packages_pass():
    ref = _reference()
    emulated = {"outputs": {"unmerged": ref["unmerged"] + 1e-5, "merged": ref["merged"] - 1e-5},
                "mpm_fx_imported": []}
    result = compare(ref, emulated)
    assert result["passed"] and all(result["checks"].values())
    assert result["max_abs_diff"]["merged"] < TOLERANCE
    assert result["token_counts_x86_eager"] == [[150, 110], [140, 100]]


def test_each_failure_is_named():
    ref = _reference()
    off = {"outputs": {"unmerged": ref["unmerged"], "merged": ref["merged"] + 0.05},
           "mpm_fx_imported": []}
    assert not compare(ref, off)["checks"]["merged_matches_x86_eager"]
    unmerged_only = {"outputs": {"unmerged": ref["unmerged"], "merged": ref["unmerged"]},
                     "mpm_fx_imported": []}
    result = compare(ref, unmerged_only)
    assert not result["checks"]["merged_package_merged"] and not result["passed"]
    leaked = {"outputs": {"unmerged": ref["unmerged"], "merged": ref["merged"]},
              "mpm_fx_imported": ["mpm_fx"]}
    assert not compare(ref, leaked)["checks"]["packages_ran_without_mpm_fx"]


def test_reference_model_rebuilds_from_its_spec():
    from mpm_fx.bench.pi5.reference import build_model

    spec = {"model": "tiny", "size": 64, "classes": 8, "schedule": (2, 5)}
    a, b = build_model(spec), build_model(spec)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and a(x).shape == (1, 8, 64, 64)
