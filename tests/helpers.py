"""Shared test helpers: random checkpoints whose greedy output varies, and the check that it does.

qwen2_model.testing writes weights with std 0.02, so a tiny model's logits are nearly flat and its
greedy output is often one token repeated: a batching bug that swapped two rows' outputs would then
go unseen by "batched equals alone" tests. `write_checkpoint(varied=True)` scales every weight but
the norms by VARIED_SCALE, which makes the logits peaked and input-dependent, and
`assert_greedy_varies` checks that the output changes from token to token and from prompt to prompt.
The session-wide `checkpoints` fixture (tests/conftest.py) caches them by their arguments.
Also `cache_prompt`, which fills a BlockManager's prefix cache for the scheduler and hash tests.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from qwen2_model.testing import write_random_checkpoint

VARIED_SCALE = 8.0  # weight std 0.16 instead of 0.02
VARIETY_PROMPTS = [[(7 * i + 13 * j) % 500 for j in range(5 + i)] for i in range(6)]


def write_checkpoint(out_dir: str | Path, head: str = "causal_lm", preset: str = "tiny", varied: bool = True,
                     **overrides) -> Path:
    """A random checkpoint (qwen2_model.testing) in the HF layout; `varied`: weights scaled up."""
    path = write_random_checkpoint(out_dir, preset=preset, head=head, **overrides)
    if varied:
        for file in sorted(path.glob("*.safetensors")):
            tensors = load_file(str(file))
            tensors = {k: v if k.endswith("norm.weight") else v * VARIED_SCALE for k, v in tensors.items()}
            save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def greedy_outputs(engine, prompts=VARIETY_PROMPTS, max_tokens: int = 16) -> list[list[int]]:
    from qwen2_model.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = engine.generate_all({f"p{i}": p for i, p in enumerate(prompts)}, params)
    return [out[f"p{i}"][0] for i in range(len(prompts))]


def assert_greedy_varies(engine, min_distinct: int = 3) -> None:
    """Each prompt's greedy tokens are not one token repeated, and no two prompts answer alike."""
    outs = greedy_outputs(engine)
    assert all(len(set(o)) >= min_distinct for o in outs), outs
    assert len({tuple(o) for o in outs}) == len(outs), outs


class HFRewardReference:
    """The published reward models' math (their trust_remote_code, which transformers does not ship)
    on transformers' own Qwen2Model: the decoder, then score = Sequential(Linear(E, E), ReLU,
    Linear(E, num_labels)) read from the checkpoint's score.0 / score.2 tensors, in plain torch.
    `logits(ids [B, S], mask)` -> [B, S, num_labels]."""

    def __init__(self, ckpt: str | Path):
        import torch
        import transformers

        tensors = {}
        for file in sorted(Path(ckpt).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        self.decoder = transformers.Qwen2Model.from_pretrained(ckpt, dtype=torch.float32).eval()
        hidden, labels = tensors["score.0.weight"].shape[1], tensors["score.2.weight"].shape[0]
        self.score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, labels)).float().eval()
        self.score.load_state_dict({k[len("score."):]: v.float() for k, v in tensors.items() if k.startswith("score.")})
        # the decoder really came from the checkpoint (not left at a random init)
        assert torch.equal(self.decoder.embed_tokens.weight, tensors["model.embed_tokens.weight"].float())

    def logits(self, ids, mask=None):
        import torch

        with torch.no_grad():
            hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return self.score(hidden)


def cache_prompt(blocks, tokens: list[int]) -> list[int]:
    """Allocate and publish `tokens` in a BlockManager as if computed, then release: the full blocks
    stay in the prefix cache. Returns the block ids they took."""
    table, hashes = [], []
    blocks.grow(table, len(tokens))
    blocks.register_full_blocks(table, hashes, tokens, len(tokens))
    ids = list(table)
    blocks.release(table)
    return ids
