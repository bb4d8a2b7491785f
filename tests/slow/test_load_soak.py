"""Load and soak against the real daemon, real CLI and real llama.cpp (SmolLM2 under three keys).

CI sizes by default; `make stress` sets LMS_LOAD_CLIENTS=40 LMS_LOAD_SECONDS=60 LMS_SOAK_CYCLES=200
LMS_SOAK_REQUESTS=1000 and collects the figures into docs/reliability.md.
"""

from __future__ import annotations

import pytest

from tests.support.stress import env_size, run_load, run_soak, write_figures

pytestmark = [pytest.mark.slow, pytest.mark.smollm2, pytest.mark.timeout(3600)]


def test_load_many_clients_three_models_auto_evict_every_request_answered_in_full_or_refused_honestly() -> None:
    figures = run_load(env_size("LMS_LOAD_CLIENTS", 20), env_size("LMS_LOAD_SECONDS", 20))
    write_figures("load", figures.as_dict())
    assert figures.failed == 0, "\n".join(figures.failures)  # none hung, none cut off mid-stream, no error chunk
    assert figures.served > 0 and figures.swaps >= 2  # the models really took turns
    assert figures.refused_with_retry_after == figures.refused
    assert figures.most_instances_of_one_model == 1
    assert figures.zombies == 0 and figures.orphans == 0


def test_soak_load_unload_cycles_and_requests_leave_the_daemon_flat() -> None:
    figures = run_soak(env_size("LMS_SOAK_CYCLES", 20), env_size("LMS_SOAK_REQUESTS", 100))
    write_figures("soak", figures.as_dict())
    assert figures.failed == 0, "\n".join(figures.failures)
    assert figures.served == figures.requests
    assert figures.distinct_worker_pids >= figures.cycles  # every load its own process, every unload ended it
    first, last = figures.first, figures.last
    assert first is not None and last is not None
    assert last.rss_mb - first.rss_mb < 25, f"daemon RSS grew from {first.rss_mb} MB to {last.rss_mb} MB"
    assert last.fds <= first.fds + 2, f"open descriptors grew from {first.fds} to {last.fds}"
    assert last.threads <= first.threads + 2, f"threads grew from {first.threads} to {last.threads}"
    assert figures.zombies == 0 and figures.orphans == 0
