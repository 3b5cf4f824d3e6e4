"""Two describe runs on one cache: the file ends with the union of what either finished, the
second run reuses the first one's questions and does not ask again for classes already saved;
every writer holds the file's lock."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import awt_engine.descriptions as descriptions_mod
from awt_engine.cli import app
from awt_engine.describe import BackendError, DescribeConfig, DescribeTask, describe_classes
from awt_engine.describe.backends import OpenAIBackend, OpenAIConfig
from awt_engine.descriptions import (
    CacheLockTimeout,
    from_plain,
    load_descriptions,
    lock_path,
    locked,
    save_descriptions,
)
from awt_engine.registry import display_name
from tests.fixtures_llm import Reply, Router, ScriptedServer, chat_reply, last_user

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "owl", "yak")
QUESTIONS_A = ["What colour is {}?", "What shape is {}?"]
QUESTIONS_B = ["How big is {}?", "Where does {} live?"]
WAIT_S = 20  # bound of every wait below; reached only when something is broken


def answer_for(c, qi, who):
    name = display_name(c).capitalize()
    return f"- {name} shows trait {qi}a ({who}).\n- {name} shows trait {qi}b ({who}).\n"


def expected(c, who):
    name = display_name(c).capitalize()
    return [f"{name} shows trait {q}{s} ({who})." for s in "ab" for q in (0, 1)]


class TwoRuns:
    """Scripts the interleaving of run A (model "run-a") and run B (model "run-b"):

    1. A gets questions QUESTIONS_A, saves them, and asks its first description;
    2. only then is B answered its questions (``b_questions``; if they differ, B must adopt A's);
    3. B's first description request is held until A has finished;
    4. A describes every class but the last, which the server refuses (A stops, saved 9);
    5. B, released, must skip the 9 classes A saved and describe only the last one.
    """

    def __init__(self, b_questions=QUESTIONS_B):
        self.b_questions = b_questions
        self.router = Router(CLASSES, QUESTIONS_A)
        self.lock = threading.Lock()
        self.a_asked_descriptions = threading.Event()
        self.b_asked_descriptions = threading.Event()
        self.a_done = threading.Event()
        self.described = {"run-a": [], "run-b": []}  # (class, question) per description request
        self.unrouted = []

    def __call__(self, body):
        who = body["model"]
        if "{}" in last_user(body):  # the question request
            if who == "run-b" and not self.a_asked_descriptions.wait(WAIT_S):
                return Reply(500, {"error": "A never got going"})
            questions = QUESTIONS_A if who == "run-a" else self.b_questions
            return chat_reply("\n".join(f"- {q}" for q in questions))
        route = self.router(body)
        with self.lock:
            if route is None:
                self.unrouted.append(last_user(body))
                self.b_asked_descriptions.set()  # fail fast instead of holding A back
                return Reply(400, {"error": "question not from QUESTIONS_A"})
            self.described[who].append(route)
            first = len(self.described[who]) == 1
        c, qi = route
        if who == "run-a":
            self.a_asked_descriptions.set()
            if first and not self.b_asked_descriptions.wait(WAIT_S):
                return Reply(500, {"error": "B never asked"})
            if c == CLASSES[-1]:
                return Reply(400, {"error": "run A is refused the last class"})
        else:
            self.b_asked_descriptions.set()
            if first and not self.a_done.wait(WAIT_S):
                return Reply(500, {"error": "A never finished"})
        return chat_reply(answer_for(c, qi, who))


def check_outcome(script, path):
    final = load_descriptions(path)
    assert final.questions == tuple(QUESTIONS_A)  # the file's questions won
    assert final.descriptions == {
        **{c: expected(c, "run-a") for c in CLASSES[:-1]},
        CLASSES[-1]: expected(CLASSES[-1], "run-b"),
    }
    assert script.unrouted == []  # B asked with A's questions only
    assert script.described["run-a"] == [(c, q) for c in CLASSES for q in (0, 1)][:-1]
    # B: its first request was in flight before A saved anything; then only the last class
    assert script.described["run-b"] == [(CLASSES[0], 0), (CLASSES[-1], 0), (CLASSES[-1], 1)]
    return final


@pytest.mark.parametrize("b_questions", [QUESTIONS_B, QUESTIONS_A], ids=["other-q", "same-q"])
def test_two_runs_in_threads_end_with_the_union_and_skip_what_the_other_saved(
    tmp_path, b_questions
):
    script = TwoRuns(b_questions)
    task = DescribeTask("zoo", CLASSES, "photos of animals")
    config = DescribeConfig(per_class=4, num_questions=2, max_rounds=2, save_every_s=0.05)
    outcome = {}

    with ScriptedServer(script) as server:

        def run(who):
            backend = OpenAIBackend(
                OpenAIConfig(server.base_url, who, concurrency=1, max_retries=0),
                sleep=lambda s: None,
            )
            try:
                outcome[who] = describe_classes(task, backend, config, cache_root=tmp_path)
            except BaseException as e:
                outcome[who] = e

        threads = {who: threading.Thread(target=run, args=(who,)) for who in ("run-a", "run-b")}
        for t in threads.values():
            t.start()
        threads["run-a"].join(WAIT_S)
        script.a_done.set()
        threads["run-b"].join(WAIT_S)
        script.a_done.set()
    assert not any(t.is_alive() for t in threads.values())
    assert isinstance(outcome["run-a"], BackendError), outcome["run-a"]
    result_b = outcome["run-b"]
    assert not isinstance(result_b, BaseException), result_b

    final = check_outcome(script, tmp_path / "descriptions" / "zoo.json")
    assert result_b.generated == [CLASSES[-1]]
    assert result_b.short == {}
    assert result_b.descriptions.descriptions == final.descriptions
    assert any("another run" in n for n in result_b.notes)
    # both recipes are on record: A's run is in the history of B's provenance
    assert final.provenance["model"] == "run-b"
    assert [h["model"] for h in final.provenance["history"]] == ["run-a"]


def spawn_describe(server, who, cache_dir):
    cmd = [
        sys.executable,
        "-c",
        "from awt_engine.cli import main; main()",
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
        who,
        "--per-class",
        "4",
        "--questions",
        "2",
        "--max-rounds",
        "2",
        "--concurrency",
        "1",
        "--max-retries",
        "0",
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
    ]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_cli_processes_end_with_the_union_and_skip_what_the_other_saved(tmp_path):
    script = TwoRuns()
    cache_dir = tmp_path / "cache"
    with ScriptedServer(script) as server:
        procs = {who: spawn_describe(server, who, cache_dir) for who in ("run-a", "run-b")}
        try:
            out_a = procs["run-a"].communicate(timeout=WAIT_S)
            script.a_done.set()
            out_b = procs["run-b"].communicate(timeout=WAIT_S)
        finally:
            script.a_done.set()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert procs["run-a"].returncode == 2 and "HTTP 400" in out_a[1], out_a
    assert procs["run-b"].returncode == 0, out_b
    assert "described meanwhile by another run" in out_b[1]
    assert "zoo: 10/10 classes have >= 4 descriptions (1 described in this run)" in out_b[0]
    check_outcome(script, cache_dir / "descriptions" / "zoo.json")


# ----------------------------------------------------------------------------------------------
# the lock itself
# ----------------------------------------------------------------------------------------------

HOLDER = """
import sys
from awt_engine.descriptions import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def lock_held_elsewhere(tmp_path):
    """A second process holding the lock of tmp_path/descriptions/zoo.json until released."""
    path = tmp_path / "descriptions" / "zoo.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield path, holder
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            holder.wait(WAIT_S)


@pytest.mark.skipif(descriptions_mod.fcntl is None, reason="no fcntl: the lock degrades to none")
def test_lock_waits_a_bounded_time_then_names_the_file(lock_held_elsewhere):
    path, holder = lock_held_elsewhere
    with pytest.raises(CacheLockTimeout, match=r"zoo\.json.*another process.*0\.2 s"):
        with locked(path, timeout_s=0.2):
            pass
    holder.stdin.close()  # the other process finishes: the lock is free
    holder.wait(WAIT_S)
    with locked(path, timeout_s=WAIT_S):
        assert lock_path(path).exists()


@pytest.mark.skipif(descriptions_mod.fcntl is None, reason="no fcntl: the lock degrades to none")
def test_cache_import_takes_the_lock(lock_held_elsewhere, tmp_path, monkeypatch):
    path, _ = lock_held_elsewhere
    save_descriptions(from_plain({"ant": ["An ant."]}, "zoo"), path)
    before = path.read_bytes()
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"ant": ["A small ant."]}), encoding="utf-8")
    monkeypatch.setattr(descriptions_mod, "LOCK_TIMEOUT_S", 0.2)
    result = CliRunner().invoke(
        app,
        ["cache", "import", str(published), "--dataset", "zoo", "--force"],
        env={"AWT_ENGINE_CACHE": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "zoo.json" in result.stderr and "another process" in result.stderr
    assert path.read_bytes() == before  # nothing written without the lock
    assert not list(path.parent.glob("*.bak"))
