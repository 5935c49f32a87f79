"""The CLI's local Ray slows Serve's periodic work (deployments/cli.py `quiet_serve_env`); a cluster
(--address) and an operator's own setting are left alone. tests/e2e/test_cli_demo.py checks that the
Serve controller of `qwen2-serve demo` starts with it."""

from __future__ import annotations

import pytest

from deployments.cli import (LOG_MONITOR_GLOB, QUIET_SERVE_ENV, SERVE_CONTROL_LOOP, SERVE_METRICS_EXPORT, build_parser,
                             quiet_serve_env)


def args(*extra: str):
    return build_parser().parse_args(["run", "--model", "demo:causal_lm", *extra])


@pytest.fixture(autouse=True)
def _no_operator_setting(monkeypatch):
    for key in QUIET_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)


def test_local_ray_gets_a_slower_control_loop_metrics_export_and_log_glob():
    env = quiet_serve_env(args())
    assert float(env[SERVE_CONTROL_LOOP]) > 0.1  # Serve's default
    assert int(env[SERVE_METRICS_EXPORT]) > 100  # Serve's default
    assert int(env[LOG_MONITOR_GLOB]) < 1000  # Ray's default: the log monitor globs on every pass below it
    assert quiet_serve_env(build_parser().parse_args(["demo"])) == env


def test_a_cluster_keeps_its_own_settings():
    assert quiet_serve_env(args("--address", "auto")) == {}


def test_an_operators_variable_wins(monkeypatch):
    monkeypatch.setenv(SERVE_CONTROL_LOOP, "0.2")
    env = quiet_serve_env(args())
    assert SERVE_CONTROL_LOOP not in env and env[SERVE_METRICS_EXPORT] == QUIET_SERVE_ENV[SERVE_METRICS_EXPORT]
