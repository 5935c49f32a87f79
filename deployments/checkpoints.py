"""Where a served model's files come from, and the facts the ingress needs about it.

`resolve_model_path(path)`: a checkpoint directory, or `demo:<head>`, which resolves to
`$QWEN2_SERVE_HOME/demo/<head>` (default ~/.cache/qwen2-serve), written once with
qwen2_model.testing.write_random_checkpoint (tiny preset) in a race-safe way.
`model_facts(path, engine)`: architecture, task, labels and the served context length, read from
config.json with the engine's own rule, so the ingress and the Router agree without asking.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEMO_HEADS = ("causal_lm", "sequence_classification", "token_classification", "question_answering", "base")


def qwen2_serve_home() -> Path:
    return Path(os.environ.get("QWEN2_SERVE_HOME") or Path.home() / ".cache" / "qwen2-serve")


def demo_checkpoint(head: str) -> Path:
    """The embedded demo checkpoint for `head`, written on first use (idempotent, race-safe)."""
    if head not in DEMO_HEADS:
        raise ValueError(f"demo:{head}: unknown head; choose one of {', '.join(DEMO_HEADS)}")
    from qwen2_model.testing import write_random_checkpoint, write_tokenizer

    target = qwen2_serve_home() / "demo" / head
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{head}-", dir=target.parent))
    try:
        # The model's vocab = the tokenizer's, so the random demo model only emits decodable ids.
        tok_dir = tmp / "tok"
        tok_dir.mkdir()
        size = write_tokenizer(tok_dir, None)["size"]
        write_random_checkpoint(tmp, preset="tiny", head=head, tokenizer_dir=tok_dir, vocab_size=size)
        shutil.rmtree(tok_dir)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str | os.PathLike) -> Path:
    path = str(path)
    if path.startswith("demo:"):
        return demo_checkpoint(path.split(":", 1)[1])
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {p} (config.json missing); give a Hugging Face checkpoint "
                                f"directory or demo:<head> ({', '.join(DEMO_HEADS)})")
    return p.resolve()


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    architecture: str
    task: str  # qwen2_model.tasks: generate | classify | classify_tokens | answer | embed | reward
    max_model_len: int
    vocab_size: int
    id2label: dict[int, str] = field(default_factory=dict)
    step_tag_id: int | None = None  # process reward models: the token their steps end with (qwen2_model/reward.py)


def model_facts(path: str | os.PathLike, engine: dict | None = None, hf_overrides: dict | None = None) -> ModelFacts:
    """The served model's facts from its config.json (with the model's `hf_overrides`) and the Router's
    `engine` options. A `max_model_len` above what the RoPE scaling supports raises ConfigError."""
    from qwen2_model.config import Qwen2Config
    from qwen2_model.engine.engine import EngineConfig, context_length
    from qwen2_model.reward import step_tag_id
    from qwen2_model.tasks import task_of

    resolved = resolve_model_path(path)
    config = Qwen2Config.from_pretrained(resolved, overrides=hf_overrides)
    max_model_len = context_length(EngineConfig(max_model_len=(engine or {}).get("max_model_len")), config)
    return ModelFacts(resolved, config.architecture, task_of(config.architecture), max_model_len, config.vocab_size,
                      {int(k): v for k, v in dict(config.id2label).items()}, step_tag_id(config))
