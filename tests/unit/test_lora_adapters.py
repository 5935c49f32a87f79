"""The serving side's adapter catalog: declared adapters, lora_dir on demand, `base:adapter`, names that cannot escape lora_dir."""

import json

import pytest

from deployments.lora_adapters import AdapterCatalog, parse_lora_arg, resolve_adapter


@pytest.fixture
def catalogs(tmp_path):
    lora_dir = tmp_path / "loras"
    for name in ("sql", "chat"):
        (lora_dir / name).mkdir(parents=True)
        (lora_dir / name / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (lora_dir / "broken").mkdir()  # no adapter_config.json: resolves (loading says what is wrong), not listed
    (tmp_path / "secret").mkdir()
    return {
        "base": AdapterCatalog.from_config("base", ["declared=/adapters/d"], str(lora_dir)),
        "other": AdapterCatalog.from_config("other", {"o1": "/adapters/o1"}, None),
    }


def test_names_and_paths(catalogs, tmp_path):
    cat = catalogs["base"]
    assert cat.names() == ["declared", "chat", "sql"]
    assert cat.path_of("declared") == "/adapters/d"
    assert cat.path_of("sql") == str(tmp_path / "loras" / "sql")
    assert cat.path_of("broken") == str(tmp_path / "loras" / "broken")
    for bad in ("nope", "../secret", "..", ".hidden", "a/b", ""):
        assert cat.path_of(bad) is None, bad


def test_resolve_model_field(catalogs):
    assert resolve_adapter("sql", catalogs) == ("base", "sql")
    assert resolve_adapter("base:sql", catalogs) == ("base", "sql")
    assert resolve_adapter("o1", catalogs) == ("other", "o1")
    assert resolve_adapter("other:o1", catalogs) == ("other", "o1")
    assert resolve_adapter("other:sql", catalogs) is None  # sql is base's, not other's
    assert resolve_adapter("base:../secret", catalogs) is None
    assert resolve_adapter("missing", catalogs) is None
    assert resolve_adapter("nobase:sql", catalogs) is None


def test_config_errors():
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_arg("justaname")
    with pytest.raises(ValueError, match="must match"):
        AdapterCatalog.from_config("base", {"../x": "/p"}, None)
    with pytest.raises(ValueError, match="name of its base model"):
        AdapterCatalog.from_config("base", {"base": "/p"}, None)


def test_cli_lora_flags_reach_the_first_model():
    from deployments.cli import app_args_for_run, build_parser

    args = build_parser().parse_args(["run", "--model", "demo:causal_lm", "--lora", "sql=/a/sql", "--lora", "chat=/a/chat",
                                      "--lora-dir", "/a/more", "--max-loras", "3"])
    model = app_args_for_run(args)["models"][0]
    assert model["loras"] == {"sql": "/a/sql", "chat": "/a/chat"} and model["lora_dir"] == "/a/more"
    assert model["max_loras_per_replica"] == 3 and model["engine"]["max_loras"] == 3
    with pytest.raises(SystemExit, match="name=path"):
        app_args_for_run(build_parser().parse_args(["run", "--model", "demo:causal_lm", "--lora", "oops"]))
