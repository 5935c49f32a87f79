"""`qwen2-serve run/demo` (`--direct-ingress on`, the default) on a local Ray puts the Ingress replica
itself on --port and --grpc-port (Ray Serve's direct ingress, deployments/cli.py); Serve's proxy
moves to free ports of its own. With `--direct-ingress off` and on a cluster, nothing changes."""

from __future__ import annotations

import argparse
import socket

from deployments.cli import (DIRECT_INGRESS_DRAIN, DIRECT_INGRESS_GRPC, DIRECT_INGRESS_HTTP, DIRECT_INGRESS_ON,
                             build_parser, direct_ingress_env, proxy_ports)


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["demo", "--direct-ingress", "on", *argv])


def test_local_ray_gets_the_users_ports_as_the_only_direct_ingress_ports():
    env = direct_ingress_env(args("--port", "8100", "--grpc-port", "9100"))
    assert env[DIRECT_INGRESS_ON] == "1"
    # Serve's ranges exclude their upper bound: exactly one port each, the user's
    assert (env[DIRECT_INGRESS_HTTP[0]], env[DIRECT_INGRESS_HTTP[1]]) == ("8100", "8101")
    assert (env[DIRECT_INGRESS_GRPC[0]], env[DIRECT_INGRESS_GRPC[1]]) == ("9100", "9101")
    assert env[DIRECT_INGRESS_DRAIN] == "0"  # no load balancer to wait for on Ctrl-C
    wide = direct_ingress_env(args("--port", "8100", "--grpc-port", "9100"), ports=8)  # one per ingress replica
    assert (wide[DIRECT_INGRESS_HTTP[1]], wide[DIRECT_INGRESS_GRPC[1]]) == ("8108", "9108")


def test_grpc_off_asks_for_no_grpc_port():
    env = direct_ingress_env(args("--grpc-port", "0"))
    assert DIRECT_INGRESS_GRPC[0] not in env and env[DIRECT_INGRESS_ON] == "1"


def test_on_by_default():
    assert direct_ingress_env(build_parser().parse_args(["demo"]))[DIRECT_INGRESS_ON] == "1"
    assert direct_ingress_env(build_parser().parse_args(["run", "--model", "demo:causal_lm"]))[DIRECT_INGRESS_ON] == "1"


def test_off_and_a_cluster_leave_serve_as_it_is():
    assert direct_ingress_env(args("--direct-ingress", "off")) == {}
    assert direct_ingress_env(args("--address", "auto")) == {}


def test_the_proxy_moves_to_free_ports_only_with_direct_ingress():
    a = args("--port", "8100", "--grpc-port", "9100")
    assert proxy_ports(a, direct=False) == (8100, 9100)
    http, grpc = proxy_ports(a, direct=True)
    assert {http, grpc}.isdisjoint({8100, 9100}) and http != grpc
    for port in (http, grpc):  # free: bindable now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert proxy_ports(args("--grpc-port", "0"), direct=True)[1] == 0
