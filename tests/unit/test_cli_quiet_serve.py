"""The CLI's local Ray slows Serve's periodic work (deployments/cli.py `quiet_serve_env`); a cluster
(--address) and an operator's own setting are left alone. tests/e2e/test_cli_demo.py checks that the
Serve controller of `qwen2-serve demo` starts with it."""

from __future__ import annotations

import pytest

from deployments.cli import (LOG_MONITOR_GLOB, QUIET_SERVE_ENV, RAYLET_TIMERS, SERVE_CONTROL_LOOP, SERVE_METRICS_EXPORT,
                             build_parser, quiet_serve_env)

# Ray's defaults (src/ray/common/ray_config_def.h), in milliseconds.
RAY_TIMER_DEFAULTS_MS = {"raylet_report_resources_period_milliseconds": 100, "raylet_check_gc_period_milliseconds": 100,
                         "object_manager_timer_freq_ms": 100, "memory_monitor_refresh_ms": 250,
                         "kill_idle_workers_interval_ms": 200, "local_fs_monitor_interval_ms": 100}


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


def test_local_ray_gets_slower_raylet_timers():
    env = quiet_serve_env(args())
    assert {k[len("RAY_"):] for k in RAYLET_TIMERS} == set(RAY_TIMER_DEFAULTS_MS)
    for name, default_ms in RAY_TIMER_DEFAULTS_MS.items():
        assert int(env[f"RAY_{name}"]) > default_ms, name  # slower, and never 0 (the memory monitor's "off")


def test_a_cluster_keeps_its_own_settings():
    assert quiet_serve_env(args("--address", "auto")) == {}


def test_an_operators_variable_wins(monkeypatch):
    monkeypatch.setenv(SERVE_CONTROL_LOOP, "0.2")
    env = quiet_serve_env(args())
    assert SERVE_CONTROL_LOOP not in env and env[SERVE_METRICS_EXPORT] == QUIET_SERVE_ENV[SERVE_METRICS_EXPORT]
