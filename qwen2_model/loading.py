"""Load a Hugging Face Qwen2 checkpoint (config.json + safetensors) into our modules.

- Single `model.safetensors` or sharded with `model.safetensors.index.json`.
- The model is built on the meta device, given real (uninitialized) storage once, and each tensor
  is copied in from a lazy safetensors slice: a rank reads only its own rows/columns, and the
  weights are never held twice in memory.
- Every parameter shard must be filled exactly by a checkpoint tensor of the right shape; missing,
  unexpected or wrong-shaped tensors, truncated files and weightless directories raise
  `CheckpointError` naming the tensor or file.
- Quantized checkpoints (GPTQ / AWQ, from config.json's `quantization_config`) and `quantization="int8"`:
  the linears get their quantized weights before loading and their kernels after
  (qwen2_model/quantization). `hf_overrides` replaces config.json fields, as vLLM's `--hf-overrides`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import quantization as quant_lib
from .config import DTYPES, ConfigError, Qwen2Config
from .hardware import DtypeChoice, choose_dtype, cpu_flags, isa_summary
from .layers import pick_backend
from .modeling import MODEL_CLASSES as DECODER_CLASSES
from .parallel import SINGLE, ParallelContext, ShapeMismatch
from .reward import Qwen2ForProcessRewardModel, Qwen2ForRewardModel

logger = logging.getLogger(__name__)

# config.json's `architectures[0]` -> the class built (modeling.py's decoder and heads, reward.py's).
MODEL_CLASSES = {**DECODER_CLASSES, **{cls.__name__: cls for cls in (Qwen2ForRewardModel, Qwen2ForProcessRewardModel)}}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Fused modules and the checkpoint tensors stacked into them: (our name, shard id) -> HF name.
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def parse_dtype(dtype: str | torch.dtype | None, config: Qwen2Config) -> torch.dtype:
    """An explicit dtype (name or alias), or None for the checkpoint's own."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    if dtype is None:
        return config.dtype
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[name]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which is missing from {path}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.glob("*.bin"))
    hint = f" (found {pickled}: pickle checkpoints are not loaded; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"no safetensors weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def checkpoint_names(model: nn.Module, optional: bool = False) -> dict[str, tuple[nn.Module, str, str | None]]:
    """HF tensor name -> (our module that loads it, parameter name, shard id). With `optional`, the
    tensors a checkpoint may have or not (GPTQ's g_idx without act-order)."""
    names = {}
    for module_path, module in model.named_modules():
        if not hasattr(module, "expected_shards"):
            continue
        shards = module.expected_shards() if not optional else getattr(module, "optional_shards", set)()
        for param, shard in shards:
            parts = module_path.split(".")
            if parts[-1] in STACKED:
                parts[-1] = f"{shard}_proj"
            if parts[-1] == "own" and parts[-2] == "lm_head":  # untied LM head
                parts = parts[:-1]
            names[".".join(parts + [param])] = (module, param, shard)
    return names


def _alias(name: str, names: dict) -> str | None:
    """Checkpoints of QA models have used both `transformer.` and `model.` for the decoder."""
    for old, new in (("model.", "transformer."), ("transformer.", "model.")):
        if name.startswith(old) and new + name[len(old):] in names:
            return new + name[len(old):]
    return None


def load_weights(model: nn.Module, files: list[Path], tied: bool) -> None:
    names = checkpoint_names(model)
    optional = checkpoint_names(model, optional=True)
    required = set(names)
    names.update(optional)
    loaded: set[str] = set()
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        with handle:
            keys = list(handle.keys())
        for name in keys:
            if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            # One mapping per tensor: the pages of a file read so far stay mapped (and counted in the
            # process's RSS) until its handle closes, which would hold the weights twice at the peak.
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                target = name if name in names else _alias(name, names)
                if target is None:
                    raise CheckpointError(f"unexpected tensor {name!r} in {file.name}: the "
                                          f"{type(model).__name__} built from config.json has no such weight")
                if target in loaded:
                    raise CheckpointError(f"tensor {name!r} appears twice (again in {file.name})")
                module, param, shard = names[target]
                try:
                    module.load(param, shard, handle.get_slice(name))
                except ShapeMismatch as exc:
                    raise CheckpointError(f"tensor {name!r} in {file.name}: {exc}") from exc
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name!r} from {file.name}: {exc}") from exc
                loaded.add(target)
    missing = sorted(required - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:5]}{more}")


def from_pretrained(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                    ctx: ParallelContext = SINGLE, attn_backend: str | None = None,
                    architecture: str | None = None, quantization: str | None = None,
                    quant_kernel: str = "auto", hf_overrides: dict | None = None) -> nn.Module:
    """Build the class named by config.json's `architectures` and load its weights (this rank's share).

    dtype: None = the checkpoint's `torch_dtype`; "auto" = the fast dtype for this hardware
    (hardware.choose_dtype: bf16/fp16 weights compute in fp32 on a CPU without native bf16/fp16);
    a name ("bfloat16", "fp32", ...) or torch.dtype = exactly that. The choice is `model.dtype_choice`.

    quantization: None (float, or whatever config.json's quantization_config declares) or "int8"
    (weight-only, per output channel, made at load). quant_kernel: "auto" | "packed" | "dequant" for
    GPTQ/AWQ linears (qwen2_model/quantization/linear.py). hf_overrides: config.json fields to replace.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = Qwen2Config.from_pretrained(path, overrides=hf_overrides)
    device = torch.device(device)
    if dtype == "auto":  # the fast dtype for this hardware (hardware.py), logged below
        choice = choose_dtype(config.dtype, None, device)
    else:
        explicit = parse_dtype(dtype, config)
        choice = DtypeChoice(explicit, config.dtype, "requested explicitly" if dtype is not None else "the checkpoint's dtype")
    torch_dtype = choice.dtype
    scheme = quantization_scheme(config, quantization)
    files = weight_files(path)
    arch = architecture or config.architecture
    if arch not in MODEL_CLASSES:
        raise CheckpointError(f"architecture {arch!r} is not one of {sorted(MODEL_CLASSES)}")
    if arch == "Qwen2ForCausalLM" and not config.is_causal:
        raise CheckpointError("config.json has is_causal: false (a bidirectional embedding model) but architecture "
                              "Qwen2ForCausalLM: serve it as an embedding model (architectures [\"Qwen2Model\"])")
    backend = pick_backend(attn_backend, device)
    model = MODEL_CLASSES[arch](config, ctx=ctx, dtype=torch_dtype, attn_backend=backend)
    try:
        quant_lib.install(model, scheme, torch_dtype, kernel=quant_kernel)
    except ValueError as exc:  # a tensor-parallel split that does not fit the packing or groups
        raise CheckpointError(str(exc)) from exc
    model.to_empty(device=device)  # one uninitialized allocation; filled below
    from .modeling import base_model
    base_model(model).rotary_emb.to_device(device)
    load_weights(model, files, tied=config.tie_word_embeddings)
    try:
        quant_lib.finalize(model, scheme)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model.eval()
    model.dtype_choice = choice  # read by the executors (start-up log, /v1/models)
    logger.info("loaded %s from %s (%s, %s%s, rank %d/%d)", arch, path, torch_dtype, device,
                f", {scheme.name}" if scheme else "", ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        logger.info("compute dtype %s: %s (CPU flags: %s)", choice.name, choice.reason, isa_summary(cpu_flags()))
    return model


def quantization_scheme(config: Qwen2Config, requested: str | None) -> "quant_lib.Scheme | None":
    """The scheme for this load; a ConfigError (named field) for what we cannot run."""
    try:
        return quant_lib.resolve_scheme(config, requested)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
