"""Description-stage throughput.

(a) requests/s the openai backend sustains against a loopback OpenAI-compatible server with
    scripted answers (47 classes x 10 questions by default): the raw backend, and the whole
    pipeline (prompt building, parsing, de-duplication, cache writes). With a simulated
    per-request server latency the gain from concurrency shows.
(b) generated tokens/s of the transformers backend with a small random Qwen2 model on this
    machine, batch 1 vs batched, on the real description prompts.

    uv run python benchmarks/bench_describe.py [--classes 47] [--questions 10] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fixtures_llm
from _common import hardware, print_table, today

from awt_engine.describe import DescribeConfig, DescribeTask, InstructionSet, describe_classes
from awt_engine.describe.backends import (
    ChatRequest,
    OpenAIBackend,
    OpenAIConfig,
    SamplingConfig,
    TransformersBackend,
    TransformersConfig,
)
from tests.fixtures_llm import Router, ScriptedServer, build_tiny_chat_model, chat_reply, last_user


def scripted(classes, questions, latency_s):
    router = Router(classes, questions)
    counter = {"n": 0}
    lock = threading.Lock()

    def respond(body):
        if latency_s:
            time.sleep(latency_s)
        if "{}" in last_user(body):
            return chat_reply("\n".join(f"- {q}" for q in questions))
        c, qi = router(body)
        with lock:
            counter["n"] += 1
            k = counter["n"]
        # six distinct sentences per answer, like a well-behaved LLM
        return chat_reply("\n".join(f"- The {c} shows detail {qi}-{j} ({k})." for j in range(6)))

    return respond


class ServerProcess:
    """The scripted server in a child process, so it does not share the client's GIL."""

    def __init__(self, classes, questions, latency_s):
        ctx = multiprocessing.get_context("fork")
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=self._run, args=(child, classes, questions, latency_s), daemon=True
        )

    @staticmethod
    def _run(conn, classes, questions, latency_s):
        with ScriptedServer(scripted(classes, questions, latency_s)) as server:
            conn.send(server.base_url)
            conn.recv()  # block until told to stop

    def __enter__(self):
        self.proc.start()
        self.base_url = self.parent.recv()
        return self

    def __exit__(self, *exc):
        self.parent.send("stop")
        self.proc.join(10)


def bench_openai(n_classes, n_questions, concurrency, latency_s):
    classes = [f"class_{i:03d}" for i in range(n_classes)]
    questions = [f"What does detail {i} of {{}} look like?" for i in range(n_questions)]
    prompts = InstructionSet.load()
    rows = []
    with ServerProcess(classes, questions, latency_s) as server:
        # raw backend: every (class, question) request of a step in one call
        backend = OpenAIBackend(OpenAIConfig(server.base_url, "scripted", concurrency=concurrency))
        reqs = [
            ChatRequest(prompts.description_conversation("toy photos", c, q, 6), seed=i)
            for i, (c, q) in enumerate((c, q) for c in classes for q in questions)
        ]
        t0 = time.perf_counter()
        backend.chat(reqs, SamplingConfig())
        dt = time.perf_counter() - t0
        rows.append(["openai backend.chat", len(reqs), concurrency, latency_s, dt, len(reqs) / dt])

        # whole pipeline: questions + descriptions + parsing + cache writes
        backend = OpenAIBackend(OpenAIConfig(server.base_url, "scripted", concurrency=concurrency))
        task = DescribeTask("bench", tuple(classes), "toy photos")
        config = DescribeConfig(per_class=50, num_questions=n_questions)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = describe_classes(task, backend, config, cache_root=tmp, prompts=prompts)
            dt = time.perf_counter() - t0
        assert not result.short, result.short
        rows.append(
            [
                "describe_classes (pipeline)",
                result.requests,
                concurrency,
                latency_s,
                dt,
                result.requests / dt,
            ]
        )
    return rows


def bench_transformers(hidden, layers, n_requests, max_new, batch_sizes):
    prompts = InstructionSet.load()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_chat_model(Path(tmp) / "m", hidden=hidden, layers=layers)
        reqs = [
            ChatRequest(
                prompts.description_conversation(
                    "toy photos", f"class {i}", "What colour is {}?", 6
                ),
                seed=i,
            )
            for i in range(n_requests)
        ]
        rows = []
        for bs in batch_sizes:
            backend = TransformersBackend(TransformersConfig(str(folder), batch_size=bs))
            backend.chat(reqs[:1], SamplingConfig(max_tokens=2))  # load + warm up
            backend.stats.generated_tokens = 0
            backend.stats.seconds = 0.0
            prompt_len = len(backend._tokenizer(backend.render(reqs[0].messages))["input_ids"])
            t0 = time.perf_counter()
            backend.chat(reqs, SamplingConfig(max_tokens=max_new, temperature=1.0))
            dt = time.perf_counter() - t0
            toks = backend.stats.generated_tokens
            rows.append([bs, n_requests, prompt_len, max_new, toks, dt, toks / dt])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=47)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 16))

    rows = []
    for lat in args.latency_ms:
        for conc in sorted({1, args.concurrency}) if lat else [args.concurrency]:
            for r in bench_openai(args.classes, args.questions, conc, lat / 1000):
                rows.append([r[0], r[1], r[2], f"{lat:g}", f"{r[4]:.2f}", f"{r[5]:.0f}"])
    print_table(
        f"(a) openai backend vs loopback scripted server, {today()}",
        ["what", "requests", "concurrency", "server latency ms", "seconds", "requests/s"],
        rows,
        notes=[
            f"hardware: {hardware('cpu')}",
            f"{args.classes} classes x {args.questions} questions, per_class 50, 6 sentences per answer",
            "server: stdlib ThreadingHTTPServer on 127.0.0.1 in a child process (its own GIL)",
        ],
    )

    trows = bench_transformers(
        args.hidden, args.layers, args.requests, args.max_new_tokens, [1, 16]
    )
    print_table(
        f"(b) transformers backend, random Qwen2 model on CPU, {today()}",
        ["batch size", "requests", "prompt tokens", "max new", "generated", "seconds", "tokens/s"],
        [[r[0], r[1], r[2], r[3], r[4], f"{r[5]:.2f}", f"{r[6]:.0f}"] for r in trows],
        notes=[
            f"hardware: {hardware('cpu')}",
            f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, 4 heads (2 KV), MLP "
            f"{2 * args.hidden}, byte-level BPE vocab ~600, float32, sampling T=1.0",
            "prompts: the real description conversation (system + 2 worked examples + question)",
        ],
    )


if __name__ == "__main__":
    main()
