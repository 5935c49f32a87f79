"""LoRA adapters on the serving side: which adapters a model serves, and the Router's per-replica loader.

Configuration (serve_config.yaml `models[].loras` / `lora_dir`, CLI `--lora name=path`, `--lora-dir`):
a base model serves the adapters declared for it by name, and any adapter directory
`<lora_dir>/<name>/` loaded on demand. Requests pick one with their `model` field: the adapter's
`name`, or `base:adapter` (vLLM's and Ray Serve LLM's forms). `AdapterCatalog` answers, for the
ingress and the Router alike, which name means which directory; `resolve_adapter` splits a request's
`model` into (base model, adapter).

Routing (Ray Serve model multiplexing): the ingress calls the base model's Router handle with
`.options(multiplexed_model_id=<adapter>)`, so Serve prefers a replica that already holds that
adapter; on the replica, `LoraLoader.acquire()` reads `serve.get_multiplexed_model_id()` and loads
the adapter through a `serve.multiplexed` function (at most `max_loras_per_replica` per replica,
least recently used evicted: eviction unregisters the adapter from the engine; requests already
running with it finish with it). An unknown adapter is `ModelNotFoundError` (404 / NOT_FOUND)
naming it; one that cannot be applied (malformed directory, rank over the cap, a module or shape
of another base model) is `InvalidRequestError` (400 / INVALID_ARGUMENT) with the loader's reason,
and the replica keeps serving everything else.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from pathlib import Path

from deployments.errors import InvalidRequestError, ModelNotFoundError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # adapter names (also directory names under lora_dir)
MAX_LISTED = 256  # adapters of one lora_dir listed in /v1/models


def parse_lora_arg(text: str) -> tuple[str, str]:
    """CLI `--lora name=path` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--lora expects name=path, got {text!r}")
    check_name(name)
    return name, path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"LoRA adapter name {name!r} must match {NAME.pattern}")
    return name


@dataclass
class AdapterCatalog:
    """One base model's adapters: declared (name -> directory) and a directory of adapters loaded on demand."""
    base: str
    declared: dict[str, str] = field(default_factory=dict)
    directory: str | None = None

    @classmethod
    def from_config(cls, base: str, loras: dict | list | None, lora_dir: str | None) -> "AdapterCatalog":
        """`loras`: {name: path} or [{name, path}] (serve_config.yaml) or ["name=path"] (CLI)."""
        declared: dict[str, str] = {}
        items = loras.items() if isinstance(loras, dict) else [
            (i["name"], i["path"]) if isinstance(i, dict) else parse_lora_arg(i) for i in (loras or [])]
        for name, path in items:
            check_name(name)
            if name == base:
                raise ValueError(f"LoRA adapter {name!r} has the name of its base model")
            declared[name] = str(Path(path).expanduser())
        return cls(base, declared, str(Path(lora_dir).expanduser()) if lora_dir else None)

    @property
    def enabled(self) -> bool:
        return bool(self.declared or self.directory)

    def path_of(self, name: str) -> str | None:
        """The adapter's directory, or None if this model has no adapter of that name."""
        if name in self.declared:
            return self.declared[name]
        if self.directory and NAME.match(name) and (Path(self.directory) / name).is_dir():
            return str(Path(self.directory) / name)  # malformed or not: loading says what is wrong
        return None

    def names(self) -> list[str]:
        """Declared adapters, then those in lora_dir (directories with an adapter_config.json)."""
        found = list(self.declared)
        if self.directory and Path(self.directory).is_dir():
            for p in sorted(Path(self.directory).iterdir())[:MAX_LISTED]:
                if p.name not in self.declared and NAME.match(p.name) and (p / "adapter_config.json").is_file():
                    found.append(p.name)
        return found


def resolve_adapter(model: str, catalogs: dict[str, AdapterCatalog]) -> tuple[str, str] | None:
    """A request's `model` -> (base model name, adapter name), or None when it names no adapter.

    `base:adapter` names the base explicitly; a bare name is looked up in every base's catalog.
    """
    base, sep, adapter = model.partition(":")
    if sep:
        cat = catalogs.get(base)
        return (base, adapter) if cat is not None and cat.path_of(adapter) is not None else None
    for cat in catalogs.values():
        if cat.path_of(model) is not None:
            return cat.base, model
    return None


def _in_serve_replica() -> bool:
    try:
        from ray.serve.context import _get_internal_replica_context
        return _get_internal_replica_context() is not None
    except Exception:
        return False


class _LoadedAdapter:
    """What Serve's multiplexer holds per adapter; unloading it (LRU) unregisters it from the engine."""

    def __init__(self, async_engine, name: str, ref):
        self.async_engine, self.name, self.ref = async_engine, name, ref
        self.ref_for_request = ref  # kept after unloading: requests already given it finish with it

    def __del__(self):  # called by Serve on eviction (and again by the GC: idempotent, guarded by identity)
        if self.ref is not None:
            self.async_engine.engine.remove_lora(self.name, self.ref)
            self.ref = None


class LoraLoader:
    """The Router's adapters: Serve's multiplexing picks the replica, this loads them into its engine."""

    def __init__(self, async_engine, catalog: AdapterCatalog, max_per_replica: int):
        self.async_engine, self.catalog = async_engine, catalog
        self.max_per_replica = max(1, int(max_per_replica))
        self.requests: collections.Counter = collections.Counter()  # requests served per adapter on this replica
        self.loads = 0

        async def load(model_id: str):  # a plain function: Serve keeps its LRU cache on it
            return await self._load(model_id)

        if _in_serve_replica():
            from ray import serve
            self._get = serve.multiplexed(max_num_models_per_replica=self.max_per_replica)(load)
        else:  # driven directly (tests, no Serve): load on first use, no per-replica LRU
            cache: dict[str, _LoadedAdapter] = {}

            async def get(model_id: str):
                if model_id not in cache:
                    cache[model_id] = await load(model_id)
                return cache[model_id]
            self._get = get

    async def _load(self, name: str) -> _LoadedAdapter:
        path = self.catalog.path_of(name)
        if path is None:
            raise ModelNotFoundError(f"{self.catalog.base}:{name}", available=self.catalog.names())
        from qwen2_model.lora import LoraError

        try:
            ref = await self.async_engine.add_lora(name, path)
        except (LoraError, ValueError) as exc:
            raise InvalidRequestError(f"LoRA adapter {name!r} cannot be loaded: {exc}", param="model") from None
        self.loads += 1
        return _LoadedAdapter(self.async_engine, name, ref)

    async def acquire(self, name: str | None = None):
        """The adapter this request asked for (Serve's multiplexed model id), loaded: its engine LoraRef
        (None: the base model)."""
        if name is None:
            from ray import serve
            try:
                name = serve.get_multiplexed_model_id() or None
            except Exception:
                name = None
        if name is None:
            return None
        if not self.catalog.enabled:
            raise ModelNotFoundError(f"{self.catalog.base}:{name}", available=[])
        loaded = await self._get(name)
        self.requests[name] += 1
        return loaded.ref_for_request

    def stats(self) -> dict:
        engine = self.async_engine.engine
        return {"registered": sorted(engine.loras), "in_slots": [r.name for r in engine.lora_slots],
                "requests": dict(self.requests), "loads": self.loads, "max_per_replica": self.max_per_replica}
