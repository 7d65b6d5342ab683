"""`steerprune serve` flags -> ServeConfig fields, and what start_server/stop_server leave behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from steerprune.errors import UserError
from steerprune.service.cli import acceptance_from_flags, server_env, stop_server
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
    shutil.rmtree(env["BENTOML_HOME"], ignore_errors=True)
    cfg = ServeConfig.from_env(env)
    assert (cfg.acceptance, cfg.min_prob) == ("global", 0.85)
    assert env[ENV_PREFIX + "ACCEPTANCE"] == "global"


@pytest.mark.parametrize("reason", ["off_route", "low_confidence", "not_served"])
def test_every_fallback_reason_has_a_sentence(reason):
    assert FALLBACK_REASONS[reason].endswith("full model")


def test_each_server_gets_its_own_bentoml_home(tmp_path):
    # BentoML empties BENTOML_HOME/prometheus_multiproc_dir at start-up: a shared home wipes another server's /metrics
    a, b = server_env(tmp_path, base={}), server_env(tmp_path, base={})
    assert a["BENTOML_HOME"] != b["BENTOML_HOME"]
    try:
        assert os.path.isdir(a["BENTOML_HOME"]) and os.path.isdir(b["BENTOML_HOME"])
    finally:
        for env in (a, b):
            shutil.rmtree(env["BENTOML_HOME"], ignore_errors=True)


def test_a_users_bentoml_home_is_kept(tmp_path):
    env = server_env(tmp_path, base={"BENTOML_HOME": str(tmp_path / "mine")})
    assert env["BENTOML_HOME"] == str(tmp_path / "mine")
    assert "STEERPRUNE_OWN_BENTOML_HOME" not in env


def test_stop_server_removes_the_home_it_made(tmp_path):
    env = server_env(tmp_path, base={})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    proc.bentoml_home = env["STEERPRUNE_OWN_BENTOML_HOME"]
    stop_server(proc, timeout=5)
    assert proc.returncode is not None
    assert not os.path.exists(env["BENTOML_HOME"])


def test_concurrency_reaches_the_worker_and_is_validated(tmp_path):
    env = server_env(tmp_path, base={}, concurrency=4)
    shutil.rmtree(env["BENTOML_HOME"], ignore_errors=True)
    assert ServeConfig.from_env(env).concurrency == 4
    with pytest.raises(UserError, match="concurrency must be >= 1"):
        ServeConfig(bundle=str(tmp_path), concurrency=0)


@pytest.mark.slow
def test_a_server_that_exits_at_start_leaves_no_bentoml_home(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("bentoml")
    import steerprune.service.cli as cli

    made = []
    real = tempfile.mkdtemp

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(cli.tempfile, "mkdtemp", spy)
    monkeypatch.setattr(cli, "SERVICE_REF", "steerprune_no_such_module:Service")  # bentoml serve exits at once
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    with pytest.raises(UserError, match="the server exited"):
        cli.start_server(tiny_bundle, port=cli.free_port(), timeout=60, log_path=tmp_path / "s.log", env=env)
    homes = [m for m in made if "steerprune-bentoml-" in m]
    assert len(homes) == 1 and not os.path.exists(homes[0])
