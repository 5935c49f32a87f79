"""The load generator of serve_load.py: streaming clients, arrival patterns and the metrics.

A request is `Work(prompt_token_ids, max_tokens)`: token-id prompts, greedy, `ignore_eos` with an
exact `max_tokens`, so every system generates exactly the same number of tokens. Two clients:

- `HttpClient`: OpenAI `/v1/completions` with `stream: true` and `stream_options.include_usage`
  (the last chunk's usage gives the exact token count), over aiohttp. Works against qwen2-serve
  and vLLM's OpenAI server alike.
- `GrpcClient`: qwen2-serve's `GenerateStream` (protos/qwen2_serve/v1); each message names its
  token ids, so token counts are exact per message.

Arrivals: `poisson(rate)` (exponential gaps from a fixed seed; rate inf = all at t=0) or
`concurrency(c)` (c streams in flight, the next request starts when one ends).

Metrics follow vLLM's benchmark_serving: TTFT (request sent -> first chunk with a token), TPOT per
request ((end-to-end - TTFT) / (output tokens - 1)), ITL (gap between consecutive chunks, one per
chunk: a chunk that carries several tokens counts once, as in vLLM's), end-to-end latency; p50, p90,
p99 and mean; request and output-token throughput over the run's wall time; goodput: requests per
second that met both the TTFT and the TPOT target.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable


@dataclass
class Work:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter when sent (or when it arrived, for the engine alone)
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds since start, one per chunk with tokens
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per chunk (1 where the wire does not say)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_workload(num_requests: int, seed: int, vocab_size: int, scale: float = 1.0,
                  prompt_range=(32, 512), output_range=(16, 256)) -> list[Work]:
    """The workload of offline_throughput.py (same seed -> same prompts and lengths)."""
    rng = random.Random(seed)
    lo_p, hi_p = (max(1, round(x * scale)) for x in prompt_range)
    lo_o, hi_o = (max(1, round(x * scale)) for x in output_range)
    work = []
    for _ in range(num_requests):
        plen, olen = rng.randint(lo_p, hi_p), rng.randint(lo_o, hi_o)
        work.append(Work([rng.randrange(vocab_size) for _ in range(plen)], olen))
    return work


def fresh_prompts(work: list[Work], salt: int, vocab_size: int) -> list[Work]:
    """The same lengths and `max_tokens`, new prompt ids: a server's prefix cache cannot carry over.

    Every run of a sweep (the engine alone, each protocol, each rate, each peer) gets its own
    `salt`, so no run is served from KV blocks an earlier run of the same server left cached; with
    one shared prompt set, every run after the first skipped its prefills (a 1.3x "speed-up").
    """
    rng = random.Random(f"fresh-prompts-{salt}")
    return [Work([rng.randrange(vocab_size) for _ in w.prompt_token_ids], w.max_tokens) for w in work]


# --- clients ----------------------------------------------------------------------------------------

class HttpClient:
    """Streaming OpenAI completions over aiohttp (one connection pool for the run)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 1800):
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self._session = None

    async def __aenter__(self):
        import aiohttp
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0, force_close=False))
        return self

    async def __aexit__(self, *exc):
        await self._session.close()

    async def send(self, work: Work) -> RequestResult:
        body = {"model": self.model, "prompt": work.prompt_token_ids, "max_tokens": work.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        res = RequestResult(len(work.prompt_token_ids), work.max_tokens)
        start = res.start = time.perf_counter()
        try:
            async with self._session.post(self.url, data=json.dumps(body), headers=self.headers) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return res
                buf = b""
                async for data in resp.content.iter_any():
                    now = time.perf_counter() - start
                    buf += data
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data:"):
                                continue
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                continue
                            chunk = json.loads(payload)
                            if chunk.get("error"):
                                res.error = str(chunk["error"])[:300]
                                return res
                            if chunk.get("usage"):
                                res.output_tokens = int(chunk["usage"]["completion_tokens"])
                            for choice in chunk.get("choices") or ():
                                ids = choice.get("token_ids")
                                n = len(ids) if ids else (1 if choice.get("text") or not choice.get("finish_reason")
                                                          else 0)
                                if n:
                                    res.chunk_times.append(now)
                                    res.chunk_tokens.append(n)
            res.latency = time.perf_counter() - start
        except Exception as exc:  # a broken stream is a failed request, not a crashed benchmark
            res.error = f"{type(exc).__name__}: {exc}"[:300]
            return res
        return _finish(res)


class GrpcClient:
    """qwen2-serve's GenerateStream over grpc.aio (one channel for the run)."""

    def __init__(self, target: str, model: str, api_key: str | None = None, timeout_s: float = 1800):
        self.target, self.model, self.timeout_s = target, model, timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = None

    async def __aenter__(self):
        import grpc

        from protos.qwen2_serve.v1 import qwen2_serve_pb2_grpc as pb_grpc
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.Qwen2ServeStub(self._channel)
        return self

    async def __aexit__(self, *exc):
        await self._channel.close()

    async def send(self, work: Work) -> RequestResult:
        from protos.qwen2_serve.v1 import qwen2_serve_pb2 as pb

        req = pb.GenerateRequest(model=self.model, prompt_token_ids=work.prompt_token_ids,
                                 max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
        res = RequestResult(len(work.prompt_token_ids), work.max_tokens)
        start = res.start = time.perf_counter()
        try:
            call = self._stub.GenerateStream(req, metadata=self.metadata, timeout=self.timeout_s)
            async for msg in call:
                n = len(msg.token_ids)
                if n:
                    res.chunk_times.append(time.perf_counter() - start)
                    res.chunk_tokens.append(n)
                if msg.HasField("usage"):
                    res.output_tokens = msg.usage.completion_tokens
            res.latency = time.perf_counter() - start
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {getattr(exc, 'details', lambda: exc)()}"[:300]
            return res
        return _finish(res)


def _finish(res: RequestResult) -> RequestResult:
    if not res.output_tokens:
        res.output_tokens = sum(res.chunk_tokens)
    if not res.chunk_times:
        res.error = "no tokens received"
        return res
    res.ttft = res.chunk_times[0]
    if res.output_tokens != res.max_tokens:
        res.error = f"got {res.output_tokens} tokens, asked for exactly {res.max_tokens}"
        return res
    res.ok = True
    return res


# --- arrivals ---------------------------------------------------------------------------------------

async def run_load(send: Callable[[Work], Awaitable[RequestResult]], work: list[Work], *,
                   rate: float | None = None, concurrency: int | None = None, seed: int = 0,
                   desc: str = "") -> tuple[list[RequestResult], float]:
    """Sends every request once; returns (results in workload order, wall seconds).

    rate: Poisson arrivals at `rate` requests/s (inf: all at once); concurrency: at most that many
    in flight (with rate too: arrivals by rate, but never more than that many in flight).
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(work), desc=desc, unit="req", leave=False, mininterval=1.0)
    results: list[RequestResult | None] = [None] * len(work)

    async def one(i: int) -> None:
        if limit:
            async with limit:
                results[i] = await send(work[i])
        else:
            results[i] = await send(work[i])
        bar.update(1)

    start = time.perf_counter()
    tasks = []
    for i in range(len(work)):
        tasks.append(asyncio.create_task(one(i)))
        if rate and not math.isinf(rate) and i + 1 < len(work):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    bar.close()
    return results, seconds


# --- metrics ----------------------------------------------------------------------------------------

def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """mean / p50 / p90 / p99 (ms by default), linear interpolation as numpy does."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        pos = (len(v) - 1) * p
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        return (v[lo] + (v[hi] - v[lo]) * (pos - lo)) * scale

    return {"mean": sum(v) / len(v) * scale, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(v)}


def summarize(results: list[RequestResult], seconds: float, ttft_slo_ms: float, tpot_slo_ms: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    good = [r for r in ok if r.ttft * 1000 <= ttft_slo_ms and (r.tpot is None or r.tpot * 1000 <= tpot_slo_ms)]
    chunks = sum(len(r.chunk_times) for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": seconds,
        "input_tokens": sum(r.prompt_len for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / seconds if seconds else 0.0,
        "output_throughput": out_tokens / seconds if seconds else 0.0,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / seconds if seconds else 0.0,
        "goodput": len(good) / seconds if seconds else 0.0,
        "goodput_targets_ms": {"ttft": ttft_slo_ms, "tpot": tpot_slo_ms},
        "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpots),
        "itl_ms": percentiles([x for r in ok for x in r.itls]),
        "e2e_ms": percentiles([r.latency for r in ok]),
    }


def result_rows(results: list[RequestResult]) -> list[dict]:
    """Per-request records for the JSON (without the per-chunk lists, which only add bulk)."""
    rows = []
    for r in results:
        d = asdict(r)
        d.pop("chunk_times")
        d.pop("chunk_tokens")
        d["chunks"] = len(r.chunk_times)
        d["max_itl"] = max(r.itls, default=None)
        rows.append(d)
    return rows
