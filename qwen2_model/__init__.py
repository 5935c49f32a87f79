"""qwen2_model: the Qwen2 family in plain PyTorch (+ tokenizers, safetensors), and its serving engine.

Imports no Ray, HTTP or gRPC. Entry point: `from_pretrained(path, dtype=..., device=...)`, which
reads `architectures` from config.json and returns the matching class.
"""

from .config import ConfigError, Qwen2Config
from .layers import Qwen2RMSNorm
from .loading import CheckpointError, from_pretrained
from .modeling import (Qwen2ForCausalLM, Qwen2ForQuestionAnswering, Qwen2ForSequenceClassification,
                       Qwen2ForTokenClassification, Qwen2Model)
from .reward import Qwen2ForProcessRewardModel, Qwen2ForRewardModel

__all__ = [
    "CheckpointError", "ConfigError", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForProcessRewardModel",
    "Qwen2ForQuestionAnswering", "Qwen2ForRewardModel",
    "Qwen2ForSequenceClassification", "Qwen2ForTokenClassification", "Qwen2Model", "Qwen2RMSNorm",
    "from_pretrained",
]
