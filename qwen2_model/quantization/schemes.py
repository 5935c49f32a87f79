"""Which quantization a model uses: the checkpoint's `quantization_config`, or `--quantization int8`.

`resolve_scheme(config, requested)` returns a `GPTQScheme`, `AWQScheme`, `Int8Scheme` or None, and
refuses, with a message naming the field, what we cannot run correctly (other methods, AWQ
versions other than gemm, 3-bit, `lm_head` quantized, gptqmodel's per-module `dynamic` overrides,
a checkpoint that is already quantized plus `--quantization int8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, Qwen2Config

QUANTIZATIONS = ("int8",)  # what --quantization accepts (pre-quantized checkpoints need no flag)


@dataclass(frozen=True)
class GPTQScheme:
    bits: int
    group_size: int  # -1: one group per output channel (the whole input)
    desc_act: bool
    sym: bool
    zero_offset: int = 1  # 1 for checkpoint_format "gptq" (v1), 0 for "gptq_v2"
    skip: tuple[str, ...] = ()  # module names left in float (AWQ's modules_to_not_convert)
    name: str = "gptq"


@dataclass(frozen=True)
class AWQScheme:
    bits: int
    group_size: int
    zero_point: bool
    skip: tuple[str, ...] = field(default=())
    name: str = "awq"


@dataclass(frozen=True)
class Int8Scheme:
    """Weight-only int8 made at load from a float checkpoint, one scale per output channel."""
    skip: tuple[str, ...] = ()
    name: str = "int8"


Scheme = GPTQScheme | AWQScheme | Int8Scheme


def _field(qc: dict, name: str, types, default=None):
    value = qc.get(name, default)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise ConfigError(f"quantization_config.{name} has the wrong type: {value!r}")
    return value


def _group_size(qc: dict) -> int:
    group = _field(qc, "group_size", int, -1)
    if group != -1 and (group <= 0 or group % 8):  # 8: a packed int32 of zeros never straddles groups
        raise ConfigError(f"quantization_config.group_size must be -1 or a positive multiple of 8, got {group}")
    return group


def resolve_scheme(config: Qwen2Config, requested: str | None = None) -> Scheme | None:
    qc = config.extra.get("quantization_config")
    if requested not in (None, "", "none", *QUANTIZATIONS):
        raise ConfigError(f"quantization {requested!r} is not supported (expected one of {list(QUANTIZATIONS)}; "
                          f"GPTQ and AWQ checkpoints are recognized from config.json)")
    if qc is not None and requested not in (None, "", "none"):
        raise ConfigError(f"quantization {requested!r} was asked for, but the checkpoint is already quantized "
                          f"({qc.get('quant_method')!r} in config.json's quantization_config)")
    if requested == "int8":
        return Int8Scheme()
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if qc.get("lm_head"):
        raise ConfigError("quantization_config.lm_head: a quantized lm_head is not supported")
    if method == "gptq":
        if qc.get("dynamic"):
            raise ConfigError("quantization_config.dynamic (per-module GPTQ settings) is not supported")
        bits = _field(qc, "bits", int)
        if bits not in (2, 4, 8):
            raise ConfigError(f"quantization_config.bits {bits} is not supported for GPTQ (expected 2, 4 or 8)")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"quantization_config.checkpoint_format {fmt!r} is not supported (expected 'gptq' "
                              f"or 'gptq_v2')")
        return GPTQScheme(bits=bits, group_size=_group_size(qc), desc_act=bool(qc.get("desc_act", False)),
                          sym=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0,
                          skip=tuple(qc.get("modules_to_not_convert") or ()))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"quantization_config.version {version!r} is not supported for AWQ (expected 'gemm')")
        bits = _field(qc, "bits", int, qc.get("w_bit", 4))
        if bits != 4:
            raise ConfigError(f"quantization_config.bits {bits} is not supported for AWQ (expected 4)")
        group = _group_size({"group_size": qc.get("group_size", qc.get("q_group_size", 128))})
        if group == -1:
            raise ConfigError("quantization_config.group_size -1 is not supported for AWQ")
        if not qc.get("zero_point", True):
            raise ConfigError("quantization_config.zero_point false is not supported for AWQ gemm")
        return AWQScheme(bits=bits, group_size=group, zero_point=True,
                         skip=tuple(qc.get("modules_to_not_convert") or ()))
    raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (expected 'gptq' or 'awq')")


def check_quantized_tp_split(config: Qwen2Config, tp: int) -> None:
    """Fail at start-up, naming the numbers, when a quantized checkpoint's linears cannot be split
    over `tp` ranks on packing and group boundaries (e.g. intermediate 29568, group 128, tp=8)."""
    try:
        scheme = resolve_scheme(config)
    except ConfigError:
        return  # reported by the loader with the full message
    if not isinstance(scheme, (GPTQScheme, AWQScheme)) or tp == 1:
        return
    pack = 32 // scheme.bits
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    kv_parts = tp // max(1, tp // config.num_key_value_heads)
    # column-parallel outputs (q, k, v, gate/up) split by rank; packed zeros need whole int32s
    for name, full, parts in (("q_proj", q, tp), ("k_proj/v_proj", kv, kv_parts),
                              ("gate_proj/up_proj", config.intermediate_size, tp)):
        if (full // parts) % pack:
            raise ValueError(f"{scheme.name} {scheme.bits}-bit: {name} output size {full} over {parts} ranks "
                             f"gives {full // parts} per rank, not a multiple of {pack} (values per packed int32)")
    # row-parallel inputs (o_proj, down_proj) split by rank on group boundaries
    for name, full in (("o_proj", q), ("down_proj", config.intermediate_size)):
        local = full // tp
        unit = max(pack, scheme.group_size) if scheme.group_size != -1 else pack
        if local % unit or (scheme.group_size != -1 and local % scheme.group_size):
            raise ValueError(f"{scheme.name} group_size {scheme.group_size}: {name} input size {full} over "
                             f"tensor_parallel_size {tp} gives {local} per rank, which does not split on group "
                             f"boundaries ({local} is not a multiple of {unit})")
