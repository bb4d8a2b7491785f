"""The slow tier (stress, soak, faults, fuzz) uses the end-to-end fixtures: a real daemon in its own LMS_HOME."""

from tests.e2e.conftest import server  # noqa: F401  (a fixture)
