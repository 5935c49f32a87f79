"""Shared fixtures: paths to the real Qwen vocabulary, random checkpoints (tests/helpers.py), GPU skipping."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = Path(os.environ.get("QWEN2_TOKENIZER_FIXTURE", REPO.parent / "shared/fixtures/qwen-tokenizer"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    if not (QWEN_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen vocabulary not found at {QWEN_TOKENIZER}")
    return QWEN_TOKENIZER


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(head="causal_lm", preset="tiny", varied=True, **overrides)` -> a checkpoint
    directory, written once per session for each set of arguments (tests/helpers.py)."""
    from tests.helpers import write_checkpoint

    made = {}

    def get(head: str = "causal_lm", preset: str = "tiny", varied: bool = True, **overrides):
        key = (head, preset, varied, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = write_checkpoint(tmp_path_factory.mktemp(f"{preset}-{head}"), head=head, preset=preset,
                                         varied=varied, **overrides)
        return made[key]
    return get
