"""A real `awt-engine describe --backend openai` process against a loopback server that stops
answering part-way: SIGTERM and Ctrl-C save the finished classes and exit at once (not after
the request timeout); a finished class reaches the file within the save interval, so even
kill -9 costs only the classes in flight."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.descriptions import load_descriptions
from awt_engine.registry import display_name
from tests.fixtures_llm import Router, ScriptedServer, chat_reply, last_user

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
QUESTIONS = ["What colour is {}?", "What shape is {}?"]
FAST = 3  # classes answered at once; then the server holds every answer back
WAIT_S = 20  # bound of every wait; reached only when something is broken

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def answer_for(c, qi):
    name = display_name(c).capitalize()
    return f"- {name} shows trait {qi}a.\n- {name} shows trait {qi}b.\n"


def expected(c):
    name = display_name(c).capitalize()
    return [f"{name} shows trait {q}{s}." for s in "ab" for q in (0, 1)]


class Stalling:
    """Answers the questions and the first ``fast`` classes' requests, then holds every
    further answer until ``release`` is set (a server that went quiet)."""

    def __init__(self, fast=None):
        self.fast = fast
        self.router = Router(CLASSES, QUESTIONS)
        self.lock = threading.Lock()
        self.asked = Counter()  # class -> description requests received
        self.stalled = threading.Event()  # a request is being held
        self.release = threading.Event()

    def __call__(self, body):
        if "{}" in last_user(body):
            return chat_reply("\n".join(f"- {q}" for q in QUESTIONS))
        c, qi = self.router(body)
        with self.lock:
            self.asked[c] += 1
            hold = self.fast is not None and sum(self.asked.values()) > 2 * self.fast
        if hold:
            self.stalled.set()
            self.release.wait(WAIT_S)
        return chat_reply(answer_for(c, qi))


def describe_args(server, cache_dir, *extra):
    return [
        "describe",
        "--classes",
        ",".join(CLASSES),
        "--name",
        "zoo",
        "--dataset-description",
        "photos of animals",
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--model",
        "m",
        "--per-class",
        "4",
        "--questions",
        "2",
        "--concurrency",
        "1",
        "--timeout",
        "60",  # far longer than any wait below: an exit must not wait for it
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def spawn(server, cache_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            # Ctrl-C as in a terminal's foreground job, however pytest was started: a process
            # started in the background by a shell without job control inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt
            "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from awt_engine.cli import main; main()",
            *describe_args(server, cache_dir, *extra),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=WAIT_S)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_finished_classes_and_exits_at_once(tmp_path, sig, code):
    endpoint = Stalling(fast=FAST)
    cache_dir = tmp_path / "cache"
    with ScriptedServer(endpoint) as server:
        # a save interval far beyond the test: only the save on the signal can write the file
        proc = spawn(server, cache_dir, "--save-every", "3600")
        try:
            assert endpoint.stalled.wait(WAIT_S), stop(proc)
            start = time.monotonic()
            proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("the process kept waiting for the request in flight")
            elapsed = time.monotonic() - start
        finally:
            endpoint.release.set()
            stop(proc)
    assert proc.returncode == code, err
    assert elapsed < 3, elapsed  # not the 60 s request timeout
    path = cache_dir / "descriptions" / "zoo.json"
    assert f"{FAST} of {len(CLASSES)} classes saved in {path} ({FAST} with all 4" in err, err
    saved = load_descriptions(cache_dir / "descriptions" / "zoo.json")
    assert saved.descriptions == {c: expected(c) for c in CLASSES[:FAST]}


def test_kill_9_after_a_class_finished_loses_only_the_classes_in_flight(tmp_path):
    endpoint = Stalling(fast=FAST)
    cache_dir = tmp_path / "cache"
    path = cache_dir / "descriptions" / "zoo.json"
    with ScriptedServer(endpoint) as server:
        proc = spawn(server, cache_dir, "--save-every", "0.05")
        try:
            assert endpoint.stalled.wait(WAIT_S), stop(proc)
            # the class that finished last reaches the file within the save interval, although
            # no other class finishes after it (bounded poll; the interval is 0.05 s)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    if len(load_descriptions(path).descriptions) == FAST:
                        break
                except (FileNotFoundError, ValueError):
                    pass
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT_S)
        finally:
            endpoint.release.set()
            stop(proc)
    assert load_descriptions(path).descriptions == {c: expected(c) for c in CLASSES[:FAST]}

    resumed = Stalling()
    with ScriptedServer(resumed) as server:
        result = CliRunner().invoke(app, describe_args(server, cache_dir))
    assert result.exit_code == 0, result.output
    # only the class that was in flight and the ones never started are asked again
    assert resumed.asked == Counter({c: 2 for c in CLASSES[FAST:]})
    assert load_descriptions(path).descriptions == {c: expected(c) for c in CLASSES}
