"""describe under hostile or broken conditions (issue 17, items 4, 6, 17 and the vLLM part of 28):
servers that trickle or flood, answers nested too deeply, a tiny model whose every answer is
noise, signals before anything was saved, the transformers loading bar, and the vLLM options."""

import json
import os
import sys
import threading
import time
import tracemalloc
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.describe import (
    BackendError,
    DescribeConfig,
    DescribeTask,
    NoUsableOutputError,
    SamplingConfig,
    describe_classes,
)
from awt_engine.describe.backends import (
    BackendSpec,
    ChatRequest,
    OpenAIBackend,
    OpenAIConfig,
    TransformersBackend,
    TransformersConfig,
    VLLMBackend,
    VLLMConfig,
    make_backend,
)
from awt_engine.describe.parsing import parse_descriptions, parse_questions
from awt_engine.descriptions import load_descriptions
from tests.fixtures_llm import Router, chat_reply, last_user

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
QUESTIONS = ["What colour is {}?", "What shape is {}?"]
HI = [ChatRequest([{"role": "user", "content": "hi"}], 1)]


# ----------------------------------------------------------------------------------------------
# a loopback server whose answers are written by hand: slowly, hugely, or not at all
# ----------------------------------------------------------------------------------------------
class RawServer:
    """``behaviour(body, handler)`` writes the whole HTTP answer to ``handler.wfile`` itself.
    ``stop`` is set on exit so a behaviour still writing ends (bounded test time)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.stop = threading.Event()
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                server.requests.append(body)
                try:
                    server.behaviour(body, self)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up on us: what the tests want
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def send_json(handler, obj, status=200):
    data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def trickle(server, *, headers_too=False):
    """Sends a valid answer one byte every 0.1 s (each read returns well within any socket
    timeout, so only a total deadline can stop it)."""
    answer = json.dumps(chat_reply("- A slow answer arrives here.").body).encode()
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(answer)}\r\n\r\n"
    ).encode()

    def behaviour(body, handler):
        fast, slow = (b"", head + answer) if headers_too else (head, answer)
        handler.wfile.write(fast)
        handler.wfile.flush()
        for i in range(len(slow)):
            if server.stop.is_set():
                return
            handler.wfile.write(slow[i : i + 1])
            handler.wfile.flush()
            time.sleep(0.1)

    return behaviour


def flood(server, *, declare):
    """Sends 64 MiB of a JSON string, with or without declaring the size first."""
    block = b"x" * 2**20

    def behaviour(body, handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if declare:
            handler.send_header("Content-Length", str(64 * 2**20 + 20))
        else:
            handler.send_header("Connection", "close")  # the body ends when the socket does
        handler.end_headers()
        handler.wfile.write(b'{"choices": [], "x": "')
        for _ in range(64):
            if server.stop.is_set():
                return
            handler.wfile.write(block)

    return behaviour


class NoWait:
    """Backoff stand-in: retries happen at once."""

    def __call__(self):
        return 0.0

    def sleep(self, seconds):
        pass


def backend_for(url, **kw):
    cfg = dict(base_url=url, model="m", backoff_s=0.01, max_retries=1, timeout_s=1.0)
    cfg.update(kw)
    clock = NoWait()
    return OpenAIBackend(OpenAIConfig(**cfg), sleep=clock.sleep, clock=clock, jitter=False)


# ----------------------------------------------------------------------------------------------
# item 4: a total deadline per request and a cap on the answer's size
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_trickling_server_is_cut_off_at_the_total_deadline(headers_too):
    server = RawServer(None)
    server.behaviour = trickle(server, headers_too=headers_too)
    with server:
        backend = backend_for(server.base_url, timeout_s=1.0, max_retries=1)
        start = time.monotonic()
        if headers_too:  # nothing of the answer arrived: like a silent server, the run stops
            with pytest.raises(BackendError, match=r"2 attempt\(s\): no answer within 1 s"):
                backend.chat(HI, SamplingConfig())
        else:  # the answer itself is too slow: this request is given up, nothing else
            out = backend.chat(HI, SamplingConfig())
            assert out == [[]]
            assert backend.stats.rejected == 1
            assert "not complete within 1 s" in backend.stats.first_rejection
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2  # retried as the backend retries
    # two attempts of 1 s each; the answer alone would take ~15 s at 10 bytes per second
    assert 1.9 < elapsed < 5, elapsed


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "streamed"])
def test_a_huge_answer_is_refused_without_holding_it(declare):
    server = RawServer(None)
    server.behaviour = flood(server, declare=declare)
    with server:
        backend = backend_for(server.base_url, max_answer_bytes=2**20, timeout_s=5.0)
        tracemalloc.start()
        try:
            start = time.monotonic()
            out = backend.chat(HI, SamplingConfig())
            elapsed = time.monotonic() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert out == [[]]
    assert backend.stats.rejected == 1 and backend.stats.requests == 0
    assert "larger than the 1048576-byte cap" in backend.stats.first_rejection
    assert len(server.requests) == 2  # retried, then given up
    assert peak < 8 * 2**20, peak  # the cap plus a read buffer, never the 64 MiB sent
    assert elapsed < 4, elapsed


def test_an_error_answer_is_read_only_as_far_as_its_message():
    def behaviour(body, handler):
        handler.send_response(400)
        handler.send_header("Content-Length", str(64 * 2**20))
        handler.end_headers()
        handler.wfile.write(b"bad request: " + b"y" * (2**20 - 13))
        for _ in range(63):
            if server.stop.is_set():
                return
            handler.wfile.write(block)

    block = b"y" * 2**20
    server = RawServer(behaviour)
    with server:
        backend = backend_for(server.base_url)
        tracemalloc.start()
        try:
            with pytest.raises(BackendError, match="HTTP 400 bad request: yyy"):
                backend.chat(HI, SamplingConfig())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def answer_well(router):
    def behaviour(body, handler):
        if "{}" in last_user(body):
            send_json(handler, chat_reply("\n".join(f"- {q}" for q in QUESTIONS)).body)
            return
        c, qi = router(body)
        send_json(handler, chat_reply(f"- The {c} has look {qi}.\n- The {c} has feel {qi}.").body)

    return behaviour


def test_the_run_goes_on_past_an_answer_too_slow_or_too_large(tmp_path):
    router = Router(("ant", "bee", "cat"), QUESTIONS)
    server = RawServer(None)
    good, slow, huge = answer_well(router), trickle(server), flood(server, declare=False)

    def behaviour(body, handler):
        owner = router(body)
        if owner and owner[0] == "bee":
            (slow if owner[1] == 0 else huge)(body, handler)
        else:
            good(body, handler)

    server.behaviour = behaviour
    task = DescribeTask("zoo", ("ant", "bee", "cat"), "photos of animals")
    config = DescribeConfig(per_class=4, num_questions=2, max_rounds=1)
    with server:
        backend = backend_for(server.base_url, max_answer_bytes=2**20, concurrency=4)
        start = time.monotonic()
        result = describe_classes(task, backend, config, cache_root=tmp_path)
        elapsed = time.monotonic() - start
    assert elapsed < 6, elapsed
    saved = load_descriptions(tmp_path / "descriptions" / "zoo.json").descriptions
    assert set(saved) == {"ant", "cat"} and len(saved["ant"]) == 4
    assert result.short == {"bee": 0}
    (note,) = [n for n in result.notes if "given up" in n]
    assert note.startswith("2 request(s) were given up")


def test_the_cli_has_an_answer_size_option_and_a_whole_request_timeout():
    result = runner.invoke(app, ["describe", "--help"], env={"COLUMNS": "200"})
    assert "--max-answer-mib" in result.output
    bad = runner.invoke(
        app, ["describe", "--classes", "a,b", "--name", "x", "--max-answer-mib", "0"]
    )
    assert bad.exit_code == 2


# ----------------------------------------------------------------------------------------------
# item 6: a deeply nested answer
# ----------------------------------------------------------------------------------------------
NESTED = b'{"choices": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"


def test_a_deeply_nested_answer_is_rejected_like_any_unparseable_one():
    with RawServer(lambda body, handler: send_json(handler, NESTED)) as server:
        backend = backend_for(server.base_url, max_retries=1)
        with pytest.raises(BackendError, match=r"2 attempt\(s\): answer is not usable JSON"):
            backend.chat(HI, SamplingConfig())
        assert len(server.requests) == 2


def test_sentences_with_control_characters_or_undecodable_bytes_are_not_descriptions():
    text = "- Bark is rough and brown.\n- aboutws r them\ufffd underwsGum\n- A over\x13 when it rains.\n"
    assert parse_descriptions(text) == ["Bark is rough and brown."]


def test_parsing_survives_nested_and_pathological_text():
    text = "[" * 100_000 + "{}" + "]" * 100_000 + "\n" + "." + " " * 100_000 + "x\n" * 3
    start = time.monotonic()
    assert parse_descriptions(text) == []
    assert parse_questions(text) == []
    assert time.monotonic() - start < 2


# ----------------------------------------------------------------------------------------------
# item 17: say what is true when a run fails or is stopped
# ----------------------------------------------------------------------------------------------
ZOO = ("ant", "bee", "cat")


def zoo_args(cache_dir, *extra):
    return [
        "describe",
        "--classes",
        ",".join(ZOO),
        "--name",
        "zoo",
        "--dataset-description",
        "photos of animals",
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--per-class",
        "2",
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def terminate_inside_describe(monkeypatch, before=None):
    import awt_engine.describe
    from awt_engine.cli.describe import Terminated

    def terminated(*args, **kwargs):
        if before is not None:
            before()
        raise Terminated

    monkeypatch.setattr(awt_engine.describe, "describe_classes", terminated)


def test_sigterm_before_anything_was_saved_says_so(tmp_path, monkeypatch):
    terminate_inside_describe(monkeypatch)
    result = runner.invoke(app, zoo_args(tmp_path))
    path = tmp_path / "descriptions" / "zoo.json"
    assert result.exit_code == 143
    assert not path.exists()
    assert "finished classes are saved" not in result.stderr
    assert f"nothing was saved ({path} was not written)" in result.stderr
    assert "run the same command again to start" in result.stderr


def test_sigterm_names_how_many_classes_the_file_holds(tmp_path, monkeypatch):
    from awt_engine.descriptions import from_plain, save_descriptions

    path = tmp_path / "descriptions" / "zoo.json"
    plain = {"ant": ["Ants walk in a line.", "Ants carry leaves."], "cat": ["A cat sleeps a lot."]}

    def one_class_and_a_half_finished():
        save_descriptions(from_plain(plain, "zoo", classes=list(ZOO)), path)

    terminate_inside_describe(monkeypatch, one_class_and_a_half_finished)
    result = runner.invoke(app, [*zoo_args(tmp_path), "--force"])
    assert result.exit_code == 143
    # independent count: 2 classes have descriptions, 1 of them the full 2
    assert f"2 of 3 classes saved in {path} (1 with all 2 descriptions)" in result.stderr
    assert "run the same command again without --force to resume" in result.stderr


class Garbage:
    """A ChatBackend stand-in whose description answers never parse."""

    name, model = "stub", "noise"

    def __init__(self, texts):
        from awt_engine.describe.backends.base import BackendStats

        self.texts = texts
        self.stats = BackendStats()
        self.calls = 0

    def settings(self):
        return {}

    def chat(self, requests, sampling, on_result=None):
        from awt_engine.describe.backends.base import Completion

        out = []
        for i, _ in enumerate(requests):
            comps = [Completion(self.texts[self.calls % len(self.texts)])]
            self.calls += 1
            out.append(comps)
            if on_result is not None:
                on_result(i, comps)
        return out


def cache_with_questions(tmp_path, classes, description="photos"):
    from awt_engine.descriptions import DescriptionSet, save_descriptions

    path = tmp_path / "descriptions" / "zoo.json"
    ds = DescriptionSet(
        "zoo", tuple(classes), {}, dataset_description=description, questions=tuple(QUESTIONS)
    )
    save_descriptions(ds, path)
    return path


def test_no_description_says_every_answer_failed_to_parse_and_shows_one(tmp_path):
    cache_with_questions(tmp_path, ("a", "b"))
    noise = "   \n" + "%$#" * 100  # no words; 300 chars: shown cut short
    backend = Garbage(["", noise])
    task = DescribeTask("zoo", ("a", "b"), "photos")
    with pytest.raises(NoUsableOutputError) as e:
        describe_classes(
            task, backend, DescribeConfig(per_class=2, max_rounds=1), cache_root=tmp_path
        )
    msg = str(e.value)
    assert f"every one of its {backend.calls} answer(s) failed to parse" in msg
    assert f"one began: '{('%$#' * 100)[:160]}...'" in msg


def test_a_tiny_local_model_that_writes_noise_is_explained(tiny_chat_model, tmp_path):
    cache_with_questions(tmp_path, ("a", "b"), "toy photos")
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model)))
    texts = []
    chat = backend.chat

    def spy(requests, sampling, on_result=None):
        out = chat(requests, sampling, on_result)
        texts.extend(c.text for o in out for c in o)
        return out

    backend.chat = spy
    config = DescribeConfig(
        per_class=2, max_rounds=1, sampling=SamplingConfig(max_tokens=16, temperature=0.0)
    )
    task = DescribeTask("zoo", ("a", "b"), "toy photos")
    with pytest.raises(NoUsableOutputError) as e:
        describe_classes(task, backend, config, cache_root=tmp_path)
    msg = str(e.value)
    assert texts and all(not parse_descriptions(t) for t in texts)
    assert f"every one of its {len(texts)} answer(s) failed to parse" in msg
    shown = msg.split("one began: ", 1)[1]
    assert any(shown.startswith(repr(" ".join(t.split())[:160])) for t in texts if t.strip())


def test_the_cli_reports_unparseable_answers_with_one_of_them(tmp_path):
    from tests.fixtures_llm import ScriptedServer

    def respond(body):
        if "{}" in last_user(body):
            return chat_reply("\n".join(f"- {q}" for q in QUESTIONS))
        return chat_reply("§§ ¤¤ {}")

    with ScriptedServer(respond) as server:
        args = zoo_args(tmp_path)
        args[args.index("--base-url") + 1] = server.base_url
        result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "answer(s) failed to parse" in result.stderr
    assert "one began: '§§ ¤¤ {}'" in result.stderr


def test_loading_a_model_draws_no_bar_when_stderr_is_not_a_terminal(tiny_chat_model, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a fresh process has it
    assert not sys.stderr.isatty()
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model)))
    backend._load()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
    assert hf_logging.is_progress_bar_enabled()  # put back for whatever runs next


def test_no_progress_silences_the_loading_bar_on_a_terminal_too(tiny_chat_model, monkeypatch):
    from transformers.utils import logging as hf_logging

    import awt_engine.describe.backends.hf_backend as hf
    import awt_engine.models.llm as llm

    hf_logging.enable_progress_bar()
    monkeypatch.setattr(hf, "_stderr_is_terminal", lambda: True)
    seen = []
    real = llm.load_causal_lm

    def spy(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(llm, "load_causal_lm", spy)
    TransformersBackend(TransformersConfig(str(tiny_chat_model), progress=True))._load()
    TransformersBackend(TransformersConfig(str(tiny_chat_model), progress=False))._load()
    assert seen == [True, False]


# ----------------------------------------------------------------------------------------------
# item 28 (vLLM part): gpu_memory_utilization is an option, --device is honoured
# ----------------------------------------------------------------------------------------------
class RecordingLLM:
    """vllm.LLM stand-in: records its arguments and the visible GPUs, then refuses to start
    (the run stops there: nothing past the engine's start is under test)."""

    seen: ClassVar[list] = []

    def __init__(self, model, **kwargs):
        RecordingLLM.seen.append((model, kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")))
        raise RuntimeError("stand-in engine stops here")


@pytest.fixture
def stub_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = RecordingLLM
    mod.SamplingParams = dict
    RecordingLLM.seen = []
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def vllm_args(tmp_path, *extra):
    return [
        "describe",
        "--classes",
        "a,b",
        "--name",
        "zoo",
        "--dataset-description",
        "photos",
        "--backend",
        "vllm",
        "--model",
        "org/m",
        "--no-progress",
        "--cache-dir",
        str(tmp_path),
        *extra,
    ]


@pytest.mark.parametrize(
    "visible, device, tp, expected",
    [
        (None, "cuda:1", 1, "1"),
        (None, "cuda:2", 2, "2,3"),
        ("4,5,6", "cuda:1", 2, "5,6"),
        ("4,5", None, 1, "4,5"),
        (None, "cuda", 1, None),
    ],
)
def test_device_picks_the_gpu_through_cuda_visible_devices(
    stub_vllm, monkeypatch, tmp_path, visible, device, tp, expected
):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    extra = ["--gpu-memory-utilization", "0.55", "--tensor-parallel-size", str(tp)]
    if device:
        extra += ["--device", device]
    result = runner.invoke(app, vllm_args(tmp_path, *extra))
    assert result.exit_code == 2 and "stand-in engine stops here" in result.stderr
    ((model, kwargs, seen_visible),) = RecordingLLM.seen
    assert model == "org/m" and kwargs["gpu_memory_utilization"] == 0.55
    assert kwargs["tensor_parallel_size"] == tp
    assert seen_visible == expected
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # put back after the start


def test_the_default_share_of_gpu_memory_is_documented_and_settable(stub_vllm):
    backend = make_backend(BackendSpec(name="vllm", model="m"))
    assert backend.config.gpu_memory_utilization == VLLMConfig.gpu_memory_utilization == 0.9
    backend = make_backend(BackendSpec(name="vllm", model="m", gpu_memory_utilization=0.6))
    assert backend.config.llm_kwargs(0)["gpu_memory_utilization"] == 0.6
    assert backend.settings()["gpu_memory_utilization"] == 0.6


@pytest.mark.parametrize("device", ["cpu", "mps", "mps:0", "cuda:x", "tpu"])
def test_vllm_refuses_devices_it_cannot_use_before_loading(stub_vllm, tmp_path, device):
    result = runner.invoke(app, vllm_args(tmp_path, "--device", device))
    assert result.exit_code == 2
    if device.split(":")[0] in ("cpu", "mps"):  # a real device, not a GPU
        assert f"--device {device}: the vllm backend runs on CUDA GPUs only" in result.stderr
    else:  # not a device name at all
        assert f"--device {device!r}: the vllm backend takes cuda or cuda:N" in result.stderr
    assert RecordingLLM.seen == []  # refused before any engine started
    if device.startswith(("cpu", "mps")):
        assert "CUDA GPUs only" in result.stderr and "--backend transformers" in result.stderr


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_gpu_memory_utilization_out_of_range_is_a_usage_error(tmp_path, value):
    result = runner.invoke(app, vllm_args(tmp_path, "--gpu-memory-utilization", value))
    assert result.exit_code == 2
    with pytest.raises(ValueError, match="fraction in"):
        VLLMConfig("m", gpu_memory_utilization=float(value))


def test_more_gpus_asked_than_visible_is_a_clear_error(stub_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    backend = VLLMBackend(VLLMConfig("m", device="cuda:2"))
    with pytest.raises(BackendError, match=r"--device cuda:2.*CUDA_VISIBLE_DEVICES='4,5' shows 2"):
        backend.chat(HI, SamplingConfig())
    assert RecordingLLM.seen == []


def test_a_cpu_device_without_a_backend_picks_transformers(monkeypatch):
    import awt_engine.describe.backends as backends

    monkeypatch.setattr(backends, "default_backend_name", lambda: "vllm")
    assert isinstance(make_backend(BackendSpec(device="cpu")), TransformersBackend)
    assert isinstance(make_backend(BackendSpec(device="cuda:0")), VLLMBackend)
