"""Settings for the whole suite: the hypothesis profile.

Property tests (random architectures, random graphs) run derandomised by default (profile
``ci``): the examples come from a seed fixed per test, so a failure in CI fails the same way on
every machine and every rerun. ``CONNECTOME_HYPOTHESIS=random`` (profile ``random``) draws new
examples each run, to search further; a failure then prints the ``@reproduce_failure`` blob
that replays it. Every xdist worker configures itself through this file, so ``-n 2`` runs
under the same profile.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import settings

PROFILES = ("ci", "random")

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, database=None, deadline=None, print_blob=True)


def pytest_configure(config: pytest.Config) -> None:
    profile = os.environ.get("CONNECTOME_HYPOTHESIS", "ci")
    if profile not in PROFILES:
        raise pytest.UsageError(f"CONNECTOME_HYPOTHESIS must be one of {PROFILES}, got {profile!r}; unset it for 'ci'")
    settings.load_profile(profile)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
