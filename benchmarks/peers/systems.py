"""One system, one workload, one process: `python systems.py SYSTEM WORKLOAD.json OUT.json`.

Run by benchmarks/peers/run.py, each system in its own subprocess (and its own Python environment:
the engine and transformers from the project's .venv, vLLM from the peers venv), so no peer can
disturb another's threads, allocator or imports. Each system loads the checkpoint, warms up on a
small workload outside the timing, then runs the workload (all requests submitted at once; greedy,
`ignore_eos`, exact `max_tokens`) and writes the wall seconds, output tokens and the first tokens of
each request (for the cross-check in run.py). Imports happen inside each runner: this file must
load in either environment.

SYSTEM: engine | vllm | transformers-cb
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WARMUP = [([1, 2, 3, 4, 5, 6, 7, 8], 4), ([9, 10, 11], 4)]


def run_engine(ckpt: str, work: list, cfg: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from qwen2_model.engine.engine import Engine, EngineConfig
    from qwen2_model.engine.executor import LocalExecutor
    from qwen2_model.engine.sampling import SamplingParams
    torch.set_num_threads(cfg["threads"])
    executor = LocalExecutor(ckpt, dtype=cfg["dtype"], kv_cache_memory=cfg["kv_cache_bytes"])
    engine = Engine(executor, EngineConfig(max_num_seqs=cfg["max_num_seqs"],
                                           max_num_batched_tokens=cfg["max_num_batched_tokens"],
                                           enable_prefix_caching=False))

    def go(items):
        prompts = {f"r{i}": p for i, (p, _) in enumerate(items)}
        params = {f"r{i}": SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for i, (_, n) in enumerate(items)}
        out = engine.generate_all(prompts, params)
        return [out[f"r{i}"][0] for i in range(len(items))]

    go(WARMUP)
    start = time.perf_counter()
    outs = go(work)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, outputs=outs, dtype=executor.dtype_choice.name,
                dtype_reason=executor.dtype_choice.reason, threads=torch.get_num_threads(),
                version=_project_version())


def run_vllm(ckpt: str, work: list, cfg: dict) -> dict:
    # vLLM's CPU backend reads its KV budget (GiB) and thread binding from the environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, cfg["kv_cache_bytes"] >> 30)))
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    llm = LLM(model=ckpt, dtype=cfg["dtype"], max_num_seqs=cfg["max_num_seqs"],
              max_num_batched_tokens=cfg["max_num_batched_tokens"], enable_prefix_caching=False,
              skip_tokenizer_init=True, max_model_len=cfg["max_model_len"], seed=0)

    def go(items):
        prompts = [{"prompt_token_ids": p} for p, _ in items]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False) for _, n in items]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    go(WARMUP)
    start = time.perf_counter()
    outs = go(work)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, outputs=outs, dtype=cfg["dtype"], threads=torch.get_num_threads(),
                version=f"vllm-cpu {vllm.__version__}, torch {torch.__version__}",
                omp_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))


def run_transformers_cb(ckpt: str, work: list, cfg: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    torch.set_num_threads(cfg["threads"])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, cfg["dtype"]),
                                                 attn_implementation="sdpa").eval()

    def go(items):
        # One GenerationConfig for the batch, so each request's length comes from its own max_new_tokens:
        # continuous batching requests are added one by one with their own limit.
        gen = GenerationConfig(max_new_tokens=max(n for _, n in items), do_sample=False, eos_token_id=-1, pad_token_id=0)
        page = 256
        kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
            (model.config.hidden_size // model.config.num_attention_heads) * model.dtype.itemsize
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=cfg["kv_cache_bytes"] // (kv_per_token * page),
                                      max_batch_tokens=cfg["max_num_batched_tokens"],
                                      max_requests_per_batch=cfg["max_num_seqs"], allow_block_sharing=False,
                                      use_cuda_graph=False)
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        manager.start()
        try:
            ids = [manager.add_request(p, max_new_tokens=n, request_id=f"r{i}") for i, (p, n) in enumerate(items)]
            got = {}
            while len(got) < len(ids):
                res = manager.get_result(timeout=600)
                if res is not None and res.is_finished():
                    got[res.request_id] = list(res.generated_tokens)
        finally:
            manager.stop(block=True)
        return [got[r] for r in ids]

    with torch.inference_mode():
        go(WARMUP)
        start = time.perf_counter()
        outs = go(work)
        seconds = time.perf_counter() - start
    return dict(seconds=seconds, outputs=outs, dtype=cfg["dtype"], threads=torch.get_num_threads(),
                version=f"transformers {transformers.__version__}, torch {torch.__version__}")


def _project_version() -> str:
    import torch
    return f"qwen2-serve engine, torch {torch.__version__}"


RUNNERS = {"engine": run_engine, "vllm": run_vllm, "transformers-cb": run_transformers_cb}


def main() -> int:
    system, workload, out = sys.argv[1:4]
    spec = json.loads(Path(workload).read_text())
    work = [(p, n) for p, n in spec["requests"]]
    result = RUNNERS[system](spec["checkpoint"], work, spec["config"])
    lengths = [len(o) for o in result["outputs"]]
    if lengths != [n for _, n in work]:
        raise SystemExit(f"{system} produced {lengths[:8]}... tokens, expected exactly {[n for _, n in work][:8]}...")
    result["tokens"] = sum(lengths)
    result["outputs"] = [o[:16] for o in result["outputs"]]  # enough for the cross-check
    result["load_after"] = os.getloadavg()[0]
    Path(out).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
