import os
import sys

from hypothesis import HealthCheck, settings

# Test helpers (reference.py, families.py, dpt.py) import by name from any test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Profiles (HYPOTHESIS_PROFILE):
# - random (the default, what CI runs): fresh random examples on every run, so each run
#   explores new inputs; a failure prints its falsifying example and a @reproduce_failure blob
#   (pin it with @example). The seed of a run can be fixed with pytest --hypothesis-seed=N.
# - derandomized: the same examples every run, for bisecting; never the only profile CI runs,
#   since a new hypothesis release changes which examples those are.
# - slow: random, 10x the examples, for `pytest -m slow` or HYPOTHESIS_PROFILE=slow.
_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("random", **_common)
settings.register_profile("dev", **_common)  # the earlier name of "random", still accepted
settings.register_profile("derandomized", derandomize=True, **_common)
settings.register_profile("slow", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "random"))


def examples(n: int) -> int:
    """Examples for one property test: n normally, 10 n under the slow profile."""
    return n * 10 if settings.get_current_profile_name() == "slow" else n
