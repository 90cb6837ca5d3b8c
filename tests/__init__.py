"""The tempesta-ts test suite: ``python -m twisted.trial tests``."""

import os

from hypothesis import settings

# The suite is deterministic: the same examples every run. HYPOTHESIS_PROFILE=explore draws new
# ones (run it when changing a parser).
settings.register_profile("deterministic", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
