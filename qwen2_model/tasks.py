"""What each Qwen2 architecture serves: the one architecture -> task table.

Every model sits on the decoder, so every architecture can also embed (hidden states of
Qwen2Model); only Qwen2ForCausalLM generates, and only it needs a KV cache. The two reward models
share one task, "reward" (vLLM's): the head's own pooling decides the shape (qwen2_model/reward.py).

    task_of("Qwen2ForSequenceClassification") == CLASSIFY
    can_run("Qwen2ForQuestionAnswering", EMBED) is True
"""

from __future__ import annotations

GENERATE = "generate"
CLASSIFY = "classify"
CLASSIFY_TOKENS = "classify_tokens"
ANSWER = "answer"
EMBED = "embed"
REWARD = "reward"

TASK_OF_ARCHITECTURE: dict[str, str] = {
    "Qwen2ForCausalLM": GENERATE,
    "Qwen2ForSequenceClassification": CLASSIFY,
    "Qwen2ForTokenClassification": CLASSIFY_TOKENS,
    "Qwen2ForQuestionAnswering": ANSWER,
    "Qwen2Model": EMBED,
    "Qwen2ForRewardModel": REWARD,  # a reward per token (vLLM's ALL pooling)
    "Qwen2ForProcessRewardModel": REWARD,  # label probabilities per step tag (vLLM's STEP pooling)
}
POOLED_TASKS = (CLASSIFY, CLASSIFY_TOKENS, ANSWER, EMBED, REWARD)  # one forward, no KV cache


def task_of(architecture: str) -> str:
    """The task a checkpoint's own head does; ValueError naming the known ones otherwise."""
    try:
        return TASK_OF_ARCHITECTURE[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not one of {sorted(TASK_OF_ARCHITECTURE)}") from None


def can_run(architecture: str, task: str) -> bool:
    """A model runs its own head's task, and embeddings (every head sits on the decoder)."""
    return task in (task_of(architecture), EMBED)


def is_generative(architecture: str) -> bool:
    return task_of(architecture) == GENERATE
