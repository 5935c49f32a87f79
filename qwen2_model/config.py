"""Qwen2Config: a checkpoint's config.json, with Hugging Face field names and defaults, validated.

Reads both spellings transformers has used for RoPE settings (`rope_theta` + `rope_scaling` in 4.x,
`rope_parameters` in 5.x) and both dtype keys (`torch_dtype`, `dtype`). Anything inconsistent fails
here, at load time, with a `ConfigError` naming the field, instead of as a shape error deep in a layer.

Serving-time facts derived here: `max_context_length` (the context the RoPE scaling supports: YaRN
`original_max_position_embeddings x factor`, as vLLM derives it), `check_max_model_len`, `is_causal`
(false for bidirectional embedding models such as gte-Qwen2), and `overrides` (vLLM's
`--hf-overrides`: top-level config.json fields replaced before validation). Configs we cannot run
correctly (`dual_chunk_attention_config`) are refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
SUPPORTED_ACTIVATIONS = ("silu", "swish")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHITECTURES = (
    "Qwen2Model",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "Qwen2ForTokenClassification",
    "Qwen2ForQuestionAnswering",
    "Qwen2ForRewardModel",  # trust_remote_code checkpoints (Qwen2.5-Math-RM / -PRM): qwen2_model/reward.py
    "Qwen2ForProcessRewardModel",
)
# config.json fields that change the model's math in ways we do not implement: refused, not ignored.
UNSUPPORTED_FIELDS = {
    "dual_chunk_attention_config": "dual chunk attention (the 1M-context Qwen2.5 models) is not implemented; "
                                   "serving it with full attention would give wrong answers past its chunk size",
}


class ConfigError(ValueError):
    """An invalid or inconsistent config.json; the message names the field."""


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type"/"rope_type": linear|dynamic|yarn, "factor": ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None  # transformers 5 writes it: "full_attention" | "sliding_attention"
    torch_dtype: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    is_causal: bool = True  # false: bidirectional attention (gte-Qwen2 style embedding models)
    # Fields we carry through unchanged (initializer_range, attention_dropout, model_type, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.id2label = {int(k): str(v) for k, v in (self.id2label or {}).items()}
        if not self.id2label:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.num_labels = len(self.id2label)
        if not self.label2id:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.validate()

    # --- derived values -------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return self.architectures[0] if self.architectures else "Qwen2ForCausalLM"

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype or "float32", torch.float32)

    @property
    def max_context_length(self) -> int:
        """The longest context this config supports: `max_position_embeddings`, or with RoPE scaling
        `original_max_position_embeddings` (YaRN; else max_position_embeddings) x factor, as vLLM
        derives it."""
        if self.rope_type == "default":
            return self.max_position_embeddings
        base = self.max_position_embeddings
        if self.rope_type == "yarn":
            base = self.rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings
        return int(base * self.rope_scaling["factor"])

    def check_max_model_len(self, max_model_len: int | None) -> int:
        """The served context length: `max_model_len` if given and supported, else max_context_length."""
        limit = self.max_context_length
        if max_model_len is None:
            return limit
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len <= 0:
            raise ConfigError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        if max_model_len > limit:
            how = (f"rope_scaling {self.rope_type} factor {self.rope_scaling['factor']}" if self.rope_type != "default"
                   else "max_position_embeddings, no rope_scaling")
            raise ConfigError(f"max_model_len {max_model_len} is larger than the model supports: {limit} ({how}); "
                              f"add rope_scaling (e.g. with --hf-overrides) to serve longer contexts")
        return max_model_len

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of one layer: Qwen2 slides only on layers >= max_window_layers."""
        if not (self.use_sliding_window and self.sliding_window):
            return None
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        return self.sliding_window if layer_idx >= self.max_window_layers else None

    # --- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (expected one of {SUPPORTED_ACTIVATIONS})")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {self.rope_type!r} is not supported (expected one of {SUPPORTED_ROPE_TYPES})")
        if self.rope_type != "default":
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise ConfigError(f"rope_scaling.factor must be a number >= 1, got {factor!r}")
        if self.use_sliding_window and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer when use_sliding_window is set, got {self.sliding_window!r}")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not supported (expected one of {sorted(DTYPES)})")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")
        for eos in self.eos_token_ids:
            if not (0 <= eos < self.vocab_size):
                raise ConfigError(f"eos_token_id {eos} is outside the vocabulary [0, {self.vocab_size})")
        if self.num_labels <= 0:
            raise ConfigError(f"num_labels must be positive, got {self.num_labels}")
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ConfigError(f"id2label keys must be 0..{self.num_labels - 1}, got {sorted(self.id2label)}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if not isinstance(self.is_causal, bool):
            raise ConfigError(f"is_causal must be true or false, got {self.is_causal!r}")
        for name, why in UNSUPPORTED_FIELDS.items():
            if self.extra.get(name):
                raise ConfigError(f"{name} is not supported: {why}")
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown:
            raise ConfigError(f"architectures {unknown} are not Qwen2 classes (expected one of {ARCHITECTURES})")

    # --- (de)serialization ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> "Qwen2Config":
        """`overrides`: top-level fields that replace config.json's (vLLM's --hf-overrides)."""
        raw = dict(raw)
        if overrides:
            if not isinstance(overrides, dict):
                raise ConfigError(f"hf_overrides must be a JSON object, got {overrides!r}")
            if "rope_scaling" in overrides and "rope_parameters" not in overrides:
                # an override of rope_scaling (null included) wins over transformers 5's rope_parameters
                old = raw.pop("rope_parameters", None) or {}
                if "rope_theta" in old:
                    raw.setdefault("rope_theta", old["rope_theta"])
            raw.update(overrides)
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"model_type must be 'qwen2', got {model_type!r}")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
            if rope_parameters.get("rope_type", "default") != "default" and not raw.get("rope_scaling"):
                raw["rope_scaling"] = rope_parameters
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in known and k != "dtype"}
        if kwargs.get("architectures") is None:  # absent, or null in the JSON: the default
            kwargs.pop("architectures", None)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a field of the wrong JSON type
            raise ConfigError(f"config.json has a field of the wrong type: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "Qwen2Config":
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid JSON: {exc}") from exc
        config = cls.from_dict(raw, overrides)
        # generation_config.json's EOS ids (Qwen2.5-Instruct lists <|im_end|> there) join config.json's.
        from .generation_config import GenerationConfigError, read_generation_config
        try:
            extra_eos = read_generation_config(config_file.parent).eos_token_ids
        except GenerationConfigError as exc:
            raise ConfigError(str(exc)) from exc
        merged = config.eos_token_ids + [t for t in extra_eos if t not in config.eos_token_ids]
        if merged != config.eos_token_ids:
            config.eos_token_id = merged
            config.validate()  # the ids must lie in the vocabulary
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config.json that transformers (4.x and 5.x) reads back to the same model."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if out["is_causal"]:
            del out["is_causal"]  # the default; only bidirectional models write it
        out["model_type"] = "qwen2"
        out.update(self.extra)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
