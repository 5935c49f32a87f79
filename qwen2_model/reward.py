"""Reward models of the Qwen2 family, served as vLLM serves them.

`Qwen2ForRewardModel` (Qwen2.5-Math-RM-72B) and `Qwen2ForProcessRewardModel` (Qwen2.5-Math-PRM-7B,
-72B) are a Qwen2Model plus a two-layer score head,

    score = Sequential(Linear(E, E), ReLU, Linear(E, num_labels))     # score.0.*, score.2.* in the checkpoint

published as trust_remote_code (transformers has no class for them). vLLM forces num_labels to 1
(RM) and 2 (PRM) whatever config.json says; so do we. What each returns per input (vLLM's poolers):

- RM, ALL pooling: the reward of every token, [S, 1] (the answer's reward is the last token's).
- PRM, STEP pooling: at every step-tag token (the solution's steps each end with `<extra_0>`,
  id 151651 in the PRM's vocabulary), the softmax over the two labels, [steps, 2]: P(step wrong),
  P(step right). config.json's `step_tag_id` (or `--hf-overrides`) names another tag; null pools
  every token, as vLLM's StepPool without a tag.

The head is small next to the decoder (E x E), so it is kept whole on every rank under tensor
parallelism (like the classification heads), where vLLM splits it column/row-parallel.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Qwen2Config
from .modeling import _Qwen2Head
from .parallel import ReplicatedLinear

REWARD_MODEL = "Qwen2ForRewardModel"
PROCESS_REWARD_MODEL = "Qwen2ForProcessRewardModel"
DEFAULT_STEP_TAG_ID = 151651  # `<extra_0>` in Qwen2.5-Math-PRM's vocabulary (vLLM's default)


def step_tag_id(config: Qwen2Config) -> int | None:
    """The token a process reward model pools at: config.json's `step_tag_id` when present (null:
    every token), else vLLM's default. None for every other architecture."""
    if config.architecture != PROCESS_REWARD_MODEL:
        return None
    tag = config.extra.get("step_tag_id", DEFAULT_STEP_TAG_ID)
    if tag is not None and (isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < config.vocab_size):
        raise ValueError(f"step_tag_id must be a token id in [0, {config.vocab_size}) or null, got {tag!r}")
    return tag


class _Qwen2RewardHead(_Qwen2Head):
    num_labels: int

    def _head(self, config: Qwen2Config, dtype) -> None:
        E = config.hidden_size
        self.score = nn.Sequential(ReplicatedLinear(E, E, bias=True, dtype=dtype), nn.ReLU(),
                                   ReplicatedLinear(E, self.num_labels, bias=True, dtype=dtype))

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        return self.score(self.model(input_ids, attention_mask, position_ids))  # [B, S, num_labels]


class Qwen2ForRewardModel(_Qwen2RewardHead):
    num_labels = 1

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[list[float]]]:
        """ALL pooling: the raw reward of every real token of every row, [S, 1] each."""
        rewards = self(input_ids, attention_mask).float()  # [B, S, 1]
        return [rewards[i, :n].tolist() for i, n in enumerate(attention_mask.sum(1).tolist())]


class Qwen2ForProcessRewardModel(_Qwen2RewardHead):
    num_labels = 2

    def __init__(self, config: Qwen2Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.step_tag_id = step_tag_id(config)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[list[float]]]:
        """STEP pooling: label probabilities at each step-tag token of every row, [steps, 2] each
        (every real token when step_tag_id is null). The head runs on those tokens only."""
        hidden = self.model(input_ids, attention_mask)  # [B, S, E]
        keep = attention_mask.bool()
        if self.step_tag_id is not None:
            keep &= input_ids == self.step_tag_id  # [B, S]
        probs = self.score(hidden[keep]).float().softmax(-1)  # [K, 2], rows in (row, position) order
        return [part.tolist() for part in probs.split(keep.sum(1).tolist())]
