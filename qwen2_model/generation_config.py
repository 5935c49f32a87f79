"""generation_config.json: the checkpoint's EOS ids and recommended sampling defaults.

Qwen2 chat checkpoints ship a generation_config.json whose `eos_token_id` is a list (Qwen2.5-Instruct:
`[151645, 151643]`, `<|im_end|>` and `<|endoftext|>`) while config.json names one id, and whose
`temperature`, `top_p`, `top_k` and `repetition_penalty` are what the model was tuned for
(Qwen2.5-Instruct: 0.7, 0.8, 20, 1.05). As vLLM's `generation_config="auto"`, the engine stops on
every EOS id of both files and a request that leaves a sampling field unset gets the model's value.

`read_generation_config(path)` -> `GenerationDefaults` (missing file: no defaults). Values out of
range raise `GenerationConfigError` naming the field, at start-up rather than per request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


class GenerationConfigError(ValueError):
    pass


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int] = field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    def sampling_defaults(self) -> dict[str, float | int]:
        """The sampling fields the checkpoint sets (for a request that leaves them unset)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}


def _number(raw: dict, name: str, ok) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise GenerationConfigError(f"generation_config.json: {name} = {value!r} is out of range")
    return value


def parse_generation_config(raw: dict) -> GenerationDefaults:
    if not isinstance(raw, dict):
        raise GenerationConfigError("generation_config.json must be a JSON object")
    eos = raw.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if not isinstance(eos, list) else list(eos))
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos_ids):
        raise GenerationConfigError(f"generation_config.json: eos_token_id = {eos!r} is not an id or a list of ids")
    # do_sample false means greedy in transformers: its temperature / top_p are then unused there.
    greedy = raw.get("do_sample") is False
    top_k = _number(raw, "top_k", lambda v: v >= -1 and float(v).is_integer())
    return GenerationDefaults(
        eos_token_ids=eos_ids,
        temperature=0.0 if greedy else _number(raw, "temperature", lambda v: v >= 0),
        top_p=None if greedy else _number(raw, "top_p", lambda v: 0 < v <= 1),
        top_k=None if greedy or top_k is None else int(top_k),
        repetition_penalty=_number(raw, "repetition_penalty", lambda v: v > 0),
    )


def read_generation_config(path: str | Path) -> GenerationDefaults:
    """From a checkpoint directory (or the file itself); no file -> no defaults."""
    path = Path(path)
    file = path / "generation_config.json" if path.is_dir() else path
    if not file.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise GenerationConfigError(f"{file} is not valid JSON: {exc}") from exc
    return parse_generation_config(raw)
