import os

from hypothesis import HealthCheck, settings

# ci: deterministic (a red CI must be reproducible), the default. dev: fresh random examples.
# slow: 10x the examples, for `pytest -m slow` or HYPOTHESIS_PROFILE=slow.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_common)
settings.register_profile("dev", **_common)
settings.register_profile("slow", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """Examples for one property test: n normally, 10 n under the slow profile."""
    return n * 10 if settings.get_current_profile_name() == "slow" else n
