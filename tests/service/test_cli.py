"""`steerprune serve` flags -> ServeConfig fields (no server started)."""
from __future__ import annotations

import pytest

from steerprune.service.cli import acceptance_from_flags, server_env
from steerprune.service.config import ENV_PREFIX, ServeConfig
from steerprune.service.engine import FALLBACK_REASONS


def test_default_is_the_per_route_rule():
    assert acceptance_from_flags(None, None) == ("route", 0.7)


def test_min_prob_alone_selects_the_global_rule():
    assert acceptance_from_flags(None, 0.9) == ("global", 0.9)


def test_explicit_acceptance_wins():
    assert acceptance_from_flags("route", 0.9) == ("route", 0.9)
    assert acceptance_from_flags("global", None) == ("global", 0.7)


def test_flags_reach_the_worker_environment(tmp_path):
    acceptance, min_prob = acceptance_from_flags(None, 0.85)
    env = server_env(tmp_path, base={}, acceptance=acceptance, min_prob=min_prob)
    cfg = ServeConfig.from_env(env)
    assert (cfg.acceptance, cfg.min_prob) == ("global", 0.85)
    assert env[ENV_PREFIX + "ACCEPTANCE"] == "global"


@pytest.mark.parametrize("reason", ["off_route", "low_confidence", "not_served"])
def test_every_fallback_reason_has_a_sentence(reason):
    assert FALLBACK_REASONS[reason].endswith("full model")
