"""deployments/torch_env.py: the Router's runtime_env gets libgomp's spin count unless the operator chose."""

from deployments.app import _router_options
from deployments.torch_env import with_torch_env


def test_router_options_carry_the_spin_count_and_keep_the_operators_runtime_env(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    opts = _router_options({"name": "m", "ray_actor_options": {"num_cpus": 1, "runtime_env": {
        "env_vars": {"FOO": "1"}, "pip": ["x"]}}})
    assert opts["ray_actor_options"]["num_cpus"] == 1
    assert opts["ray_actor_options"]["runtime_env"] == {"env_vars": {"GOMP_SPINCOUNT": "300000", "FOO": "1"},
                                                        "pip": ["x"]}
    # the operator's own value wins
    assert with_torch_env({"runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "0"}}})["runtime_env"]["env_vars"] == \
        {"GOMP_SPINCOUNT": "0"}


def test_an_operator_who_chose_a_wait_policy_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert with_torch_env({"num_cpus": 0.25}) == {"num_cpus": 0.25}
