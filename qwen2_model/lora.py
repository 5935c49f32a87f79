"""LoRA adapters (PEFT's format), applied per row so one batch mixes adapters and the base model.

An adapter directory is what PEFT's `save_pretrained` writes: `adapter_config.json` (`r`,
`lora_alpha`, `use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern`) and
`adapter_model.safetensors` with tensors named
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). The delta of a targeted linear is `scaling * x A^T B^T`, `scaling = alpha / r`
(`alpha / sqrt(r)` with rslora); we fold the scaling into B when loading.

- `read_adapter(path, config, max_rank)` checks an adapter against the base model's shapes from the
  safetensors header alone (no tensor is read) and returns an `AdapterSpec`; every refusal is a
  `LoraError` naming the file, tensor or field.
- `LoraSlots(decoder, max_loras, max_rank)` gives the decoder `max_loras` adapter slots: each of
  the four linears of every layer (qkv_proj, o_proj, gate_up_proj, down_proj) gets a `LoraLinear`
  hook (parallel.py calls it after the base matmul) holding stacked weights A [slots, k*R, in] and
  B [slots, out, k*R], where k is the number of sub-matrices fused in the layer (3 for q/k/v,
  2 for gate/up): the sub-matrices' A's are stacked on the rank axis and B is block-diagonal, so
  each fused layer is one shrink and one expand matmul. `load(slot, spec)` reads this rank's
  slices (column-parallel: B split on output rows like the weight; row-parallel: A split on input
  columns, and the delta joins the partial sum before the layer's all-reduce).
- Per step, `slots.rows(row_slots)` sets which flat-batch row uses which slot (-1: the base model).
  Rows are grouped by slot once per step (a slice when they are contiguous, else an index), and
  each hook runs one small matmul pair per adapter present (segmented matmul); rows without an
  adapter cost nothing and a step without adapters is the base path exactly.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Qwen2Config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT module name -> (our fused module under the layer, sub-matrix id in it or None)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
    "down_proj": ("mlp.down_proj", None),
}
FUSED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be applied to this base model; the message names the problem."""


def full_shapes(config: Qwen2Config) -> dict[str, tuple[int, int]]:
    """PEFT module name -> the base weight's full [out, in]."""
    E, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    return {"q_proj": (q, E), "k_proj": (kv, E), "v_proj": (kv, E), "o_proj": (E, q),
            "gate_proj": (I, E), "up_proj": (I, E), "down_proj": (E, I)}


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class ModuleDelta:
    """One targeted PEFT module of one layer: where its tensors are and how to scale them."""
    key_a: str
    key_b: str
    rank: int
    scaling: float


@dataclass
class AdapterSpec:
    """A checked adapter: which (layer, PEFT module) it changes, with ranks and scalings."""
    path: Path
    rank: int  # the largest module rank
    modules: dict[tuple[int, str], ModuleDelta] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE


def read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise LoraError(f"LoRA adapter directory {path} does not exist")
    if not file.is_file():
        raise LoraError(f"{path} is not a PEFT LoRA adapter: {CONFIG_FILE} is missing")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise LoraError(f"{file} must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"{file}: peft_type {peft_type!r} is not supported (only LORA)")
    refused = {
        "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "lora_bias": "LoRA biases",
        "modules_to_save": "modules_to_save (fully trained modules such as lm_head)",
        "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
    }
    for key, what in refused.items():
        if cfg.get(key):
            raise LoraError(f"{file}: {key} is set; {what} cannot be applied (only plain LoRA on the decoder's linears)")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{file}: bias {cfg['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise LoraError(f"{file}: {key} must be a positive number, got {cfg.get(key)!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        bad = sorted(set(targets) - set(TARGETS))
        if bad:
            raise LoraError(f"{file}: target_modules {bad} cannot be applied; LoRA is supported on "
                            f"{', '.join(TARGETS)}")
    return cfg


def read_adapter(path: str | Path, config: Qwen2Config, max_rank: int) -> AdapterSpec:
    """Check an adapter directory against the base model (header only) -> AdapterSpec."""
    path = Path(path)
    cfg = read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        hint = " (adapter_model.bin found: pickle files are not loaded; save with safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise LoraError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise LoraError(f"cannot read {file}: {exc}") from exc
    expected = full_shapes(config)
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        m = KEY.match(key)
        if m is None:
            raise LoraError(f"{file.name}: tensor {key!r} cannot be applied; LoRA is supported on the decoder "
                            f"layers' {', '.join(TARGETS)}")
        layer, _, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in TARGETS or TARGETS[module][0].split(".")[0] != m.group(2):
            raise LoraError(f"{file.name}: tensor {key!r}: LoRA on {m.group(2)}.{module} cannot be applied; "
                            f"supported modules are {', '.join(TARGETS)}")
        if layer >= config.num_hidden_layers:
            raise LoraError(f"{file.name}: tensor {key!r} is for layer {layer}, but the base model has "
                            f"{config.num_hidden_layers} layers: the adapter is for another base model")
        found.setdefault((layer, module), {})[ab] = key
    if not found:
        raise LoraError(f"{file} holds no LoRA tensors")
    spec = AdapterSpec(path, 0)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for (layer, module), keys in sorted(found.items()):
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise LoraError(f"{file.name}: layer {layer} {module} has no {missing} tensor")
        out_f, in_f = expected[module]
        a_shape, b_shape = shapes[keys["A"]], shapes[keys["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise LoraError(f"{file.name}: {keys['A']} {list(a_shape)} and {keys['B']} {list(b_shape)} are not a "
                            f"rank-r pair [r, in], [out, r]")
        rank = a_shape[0]
        if a_shape[1] != in_f or b_shape[0] != out_f:
            raise LoraError(f"{file.name}: layer {layer} {module} is [{b_shape[0]} x {a_shape[1]}] in the adapter but "
                            f"[{out_f} x {in_f}] in the base model: the adapter is for another base model")
        if rank > max_rank:
            raise LoraError(f"{file.name}: layer {layer} {module} has rank {rank}, over max_lora_rank {max_rank}")
        name = f"model.layers.{layer}.{'self_attn' if module in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{module}"
        declared = _pattern_value(rank_pattern, name, cfg["r"])
        if declared != rank:
            raise LoraError(f"{file.name}: layer {layer} {module} has rank {rank} but the config says {declared}")
        alpha = _pattern_value(alpha_pattern, name, cfg["lora_alpha"])
        scaling = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        spec.modules[(layer, module)] = ModuleDelta(keys["A"], keys["B"], rank, float(scaling))
        spec.rank = max(spec.rank, rank)
    return spec


# --- the model side -------------------------------------------------------------------------------


class LoraState:
    """The current step's rows per slot, shared by every hook of one model."""

    def __init__(self):
        # [(slot, rows)] with rows a slice or a LongTensor of flat-batch rows; None: no adapter in the step
        self.segments: list[tuple[int, slice | torch.Tensor]] | None = None


class LoraLinear:
    """The delta hook of one (fused) parallel linear: y += x A_slot^T B_slot^T for each slot's rows.

    Not an nn.Module on purpose: its buffers are not checkpoint weights (the loader walks modules).
    """

    def __init__(self, layer, sub_ids: list[str | None], state: LoraState, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device):
        self.layer, self.sub_ids, self.state = layer, sub_ids, state
        # shapes from the layer's layout, not its weight (a quantized layer has none in that shape)
        if hasattr(layer, "in_local"):  # row-parallel
            out_local, in_local = layer.out_features, layer.in_local
        else:
            out_local, in_local = sum(layer.local_sizes.values()), layer.in_features
        k = len(sub_ids)
        self.A = torch.zeros(max_loras, k * max_rank, in_local, dtype=dtype, device=device)
        self.B = torch.zeros(max_loras, out_local, k * max_rank, dtype=dtype, device=device)
        self.ranks = [0] * max_loras  # columns of B / rows of A in use per slot (0: this slot leaves the layer alone)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        segments = self.state.segments
        if not segments:
            return y
        for slot, rows in segments:
            n = self.ranks[slot]
            if n == 0:
                continue
            xs = x[rows]  # [t, in_local]
            delta = (xs @ self.A[slot, :n].T) @ self.B[slot, :, :n].T  # [t, n] -> [t, out_local]
            if isinstance(rows, slice):
                y[rows] += delta
            else:
                y.index_add_(0, rows, delta)
        return y


class LoraSlots:
    """`max_loras` adapter slots on a decoder (this rank's shard of it)."""

    def __init__(self, decoder, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_rank}")
        self.decoder, self.max_loras, self.max_rank = decoder, max_loras, max_rank
        self.state = LoraState()
        self.hooks: list[dict[str, LoraLinear]] = []  # per layer: fused module name -> hook
        embed = decoder.embed_tokens.weight  # the model's compute dtype and device
        for layer in decoder.layers:
            hooks = {}
            for name in FUSED:
                linear = layer.get_submodule(name)
                subs = list(getattr(linear, "local_sizes", {None: 0}))
                hooks[name] = linear.lora = LoraLinear(linear, subs, self.state, max_loras, max_rank,
                                                       embed.dtype, embed.device)
            self.hooks.append(hooks)
        self.names: list[str | None] = [None] * max_loras

    def detach(self) -> None:
        for hooks in self.hooks:
            for hook in hooks.values():
                hook.layer.lora = None

    def clear(self, slot: int) -> None:
        for hooks in self.hooks:
            for hook in hooks.values():
                hook.ranks[slot] = 0
                hook.A[slot].zero_()
                hook.B[slot].zero_()
        self.names[slot] = None

    @torch.inference_mode()
    def load(self, slot: int, spec: AdapterSpec, name: str | None = None) -> None:
        """Read this rank's slices of the adapter into `slot` (the slot's previous adapter is gone)."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot {slot} is outside [0, {self.max_loras})")
        if spec.rank > self.max_rank:
            raise LoraError(f"adapter rank {spec.rank} is over max_lora_rank {self.max_rank}")
        self.clear(slot)
        r = spec.rank  # every sub-matrix's block is r wide (zero-padded below a module's own rank)
        try:
            with safe_open(str(spec.weights_file), framework="pt", device="cpu") as f:
                for (layer_idx, module), delta in spec.modules.items():
                    fused, sub = TARGETS[module]
                    hook = self.hooks[layer_idx][fused]
                    linear = hook.layer
                    a, b = f.get_slice(delta.key_a), f.get_slice(delta.key_b)  # [r_m, in], [out, r_m]
                    i = hook.sub_ids.index(sub)
                    cols = slice(i * r, i * r + delta.rank)  # this sub-matrix's block on the rank axis
                    ctx = linear.ctx
                    if sub is None and hasattr(linear, "in_local"):  # row-parallel: A split on input
                        lo = ctx.rank * linear.in_local
                        a_local, b_local = a[:, lo:lo + linear.in_local], b[:]
                        out_rows = slice(0, b_local.shape[0])
                    else:  # column-parallel: B split on output like the weight (KV replicas share a part)
                        key = sub if sub is not None else next(iter(linear.local_sizes))
                        size = linear.local_sizes[key]
                        part = ctx.rank // linear.shard_replicas[key]
                        a_local, b_local = a[:], b[part * size:(part + 1) * size]
                        off = linear._offset(key)
                        out_rows = slice(off, off + size)
                    dtype = hook.A.dtype
                    hook.A[slot, cols].copy_(a_local.to(dtype))
                    hook.B[slot, out_rows, cols].copy_((b_local.float() * delta.scaling).to(dtype))
                    hook.ranks[slot] = len(hook.sub_ids) * r
        except LoraError:
            self.clear(slot)
            raise
        except Exception as exc:
            self.clear(slot)
            raise LoraError(f"cannot read {spec.weights_file}: {exc}") from exc
        self.names[slot] = name or str(spec.path)

    @contextmanager
    def rows(self, row_slots: list[tuple[int, int, int]]):
        """Within the block, flat-batch rows [start, start + count) use `slot` for each (slot, start, count);
        slot -1 (or an absent range) is the base model."""
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for slot, start, count in row_slots:
            if slot >= 0 and count:
                by_slot.setdefault(slot, []).append((start, count))
        segments = []
        for slot, ranges in by_slot.items():
            ranges.sort()
            if all(ranges[j][0] + ranges[j][1] == ranges[j + 1][0] for j in range(len(ranges) - 1)):
                segments.append((slot, slice(ranges[0][0], ranges[-1][0] + ranges[-1][1])))
            else:
                device = self.decoder.embed_tokens.weight.device
                idx = torch.cat([torch.arange(s, s + c) for s, c in ranges]).to(device)
                segments.append((slot, idx))
        self.state.segments = segments or None
        try:
            yield
        finally:
            self.state.segments = None
