"""Interrupted runs keep every finished class; running again asks only for what is missing."""

import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from awt_engine.describe import (
    BackendError,
    ChatBackend,
    DescribeConfig,
    DescribeTask,
    describe_classes,
)
from awt_engine.describe.backends import Completion, OpenAIBackend, OpenAIConfig
from awt_engine.descriptions import load_descriptions
from awt_engine.registry import display_name
from tests.fixtures_llm import Reply, Router, ScriptedServer, chat_reply, last_user

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
QUESTIONS_ANSWER = "- What colour is {}?\n- What shape is {}?\n"
QUESTIONS = ["What colour is {}?", "What shape is {}?"]


def answer_for(c, qi):
    name = display_name(c).capitalize()
    return f"- {name} shows trait {qi}a.\n- {name} shows trait {qi}b.\n"


def expected(c):
    name = display_name(c).capitalize()
    # interleaved: first sentence of each question's answer, then the second ones
    return [f"{name} shows trait {q}{s}." for s in "ab" for q in (0, 1)]


class Endpoint:
    """Answers correctly until ``fail_after`` description answers were given, then 500s."""

    def __init__(self, fail_after=None):
        self.fail_after = fail_after
        self.router = Router(CLASSES, QUESTIONS)
        self.lock = threading.Lock()
        self.served = 0
        self.asked = Counter()  # class -> description requests received
        self.question_requests = 0

    def __call__(self, body):
        if "{}" in last_user(body):
            with self.lock:
                self.question_requests += 1
            return chat_reply(QUESTIONS_ANSWER)
        c, qi = self.router(body)
        with self.lock:
            self.asked[c] += 1
            if self.fail_after is not None and self.served >= self.fail_after:
                return Reply(500, {"error": "endpoint lost"})
            self.served += 1
        return chat_reply(answer_for(c, qi))


def run(endpoint, tmp_path, concurrency):
    task = DescribeTask("zoo", CLASSES, "photos of animals")
    config = DescribeConfig(per_class=4, num_questions=2, max_rounds=2, save_every_s=3600)
    with ScriptedServer(endpoint) as server:
        backend = OpenAIBackend(
            OpenAIConfig(
                server.base_url, "m", concurrency=concurrency, max_retries=1, backoff_s=0.001
            ),
            sleep=lambda s: None,
        )
        return describe_classes(task, backend, config, cache_root=tmp_path)


def test_killed_run_keeps_finished_classes_and_rerun_asks_only_for_the_rest(tmp_path):
    path = tmp_path / "descriptions" / "zoo.json"
    first = Endpoint(fail_after=2 * 2)  # two classes' worth of answers, then the endpoint dies
    with pytest.raises(BackendError, match="HTTP 500"):
        run(first, tmp_path, concurrency=1)
    partial = load_descriptions(path)
    # one request at a time, in class order: exactly the first two classes finished
    assert partial.descriptions == {"ant": expected("ant"), "bee": expected("bee")}
    assert partial.questions == tuple(QUESTIONS)
    assert partial.missing(4) == {"cat": 0, "dog": 0, "eel": 0, "fox": 0}

    second = Endpoint()
    result = run(second, tmp_path, concurrency=1)
    assert second.question_requests == 0  # stored questions reused
    assert set(second.asked) == {"cat", "dog", "eel", "fox"}  # finished classes not re-requested
    assert all(n == 2 for n in second.asked.values())
    final = load_descriptions(path)
    assert final.descriptions == {c: expected(c) for c in CLASSES}
    assert result.generated == ["cat", "dog", "eel", "fox"]
    assert result.short == {}

    third = Endpoint()
    result = run(third, tmp_path, concurrency=1)  # nothing left to do: no request at all
    assert third.question_requests == 0 and not third.asked
    assert result.requests == 0


def test_concurrent_run_killed_part_way_resumes_without_redoing_finished_classes(tmp_path):
    path = tmp_path / "descriptions" / "zoo.json"
    first = Endpoint(fail_after=5)
    with pytest.raises(BackendError):
        run(first, tmp_path, concurrency=4)
    partial = load_descriptions(path)
    finished = set(partial.descriptions)
    # whatever finished is complete and correct; at most 5 answers -> at most 2 classes
    assert len(finished) <= 2
    for c in finished:
        assert partial.descriptions[c] == expected(c)

    second = Endpoint()
    run(second, tmp_path, concurrency=4)
    assert not (set(second.asked) & finished)
    assert set(second.asked) == set(CLASSES) - finished
    assert load_descriptions(path).descriptions == {c: expected(c) for c in CLASSES}


class InterruptingBackend(ChatBackend):
    """Answers every request of a step, then raises KeyboardInterrupt after ``k`` answers
    (what Ctrl-C in the middle of a batch looks like to the pipeline)."""

    name = "fake"

    def __init__(self, k):
        super().__init__("fake-model")
        self.k = k

    def chat(self, requests, sampling, on_result=None):
        router = Router(CLASSES, QUESTIONS)
        out = []
        for i, req in enumerate(requests):
            body = {"messages": req.messages}
            if "{}" in last_user(body):
                comps = [Completion(QUESTIONS_ANSWER)]
            else:
                if self.k == 0:
                    raise KeyboardInterrupt
                self.k -= 1
                comps = [Completion(answer_for(*router(body)))]
            self.stats.add(requests=1)
            if on_result:
                on_result(i, comps)
            out.append(comps)
        return out


def test_ctrl_c_mid_batch_saves_finished_classes(tmp_path):
    task = DescribeTask("zoo", CLASSES, "photos of animals")
    config = DescribeConfig(per_class=4, num_questions=2, save_every_s=3600)
    with pytest.raises(KeyboardInterrupt):
        describe_classes(task, InterruptingBackend(k=5), config, cache_root=tmp_path)
    saved = load_descriptions(tmp_path / "descriptions" / "zoo.json")
    assert saved.descriptions == {"ant": expected("ant"), "bee": expected("bee")}


BACKUP_NAME = re.compile(r"zoo\.json\.\d{8}T\d{6}\.\d{6}Z(-\d+)?\.bak")


def test_force_regenerates_and_keeps_every_earlier_file_as_a_dated_backup(tmp_path):
    run(Endpoint(), tmp_path, concurrency=2)
    path = tmp_path / "descriptions" / "zoo.json"
    task = DescribeTask("zoo", CLASSES, "photos of animals")
    befores, backups = [], []
    for _ in range(2):  # --force twice: the second must not overwrite the first backup
        befores.append(path.read_bytes())
        again = Endpoint()
        with ScriptedServer(again) as server:
            backend = OpenAIBackend(OpenAIConfig(server.base_url, "m"), sleep=lambda s: None)
            result = describe_classes(
                task,
                backend,
                DescribeConfig(per_class=4, num_questions=2),
                cache_root=tmp_path,
                force=True,
            )
        assert again.question_requests == 1 and set(again.asked) == set(CLASSES)
        (note,) = [n for n in result.notes if "kept as" in n]
        backups.append(Path(note.rsplit(" ", 1)[-1]))
    assert len(set(backups)) == 2
    for backup, before in zip(backups, befores, strict=True):
        assert backup.parent == path.parent and BACKUP_NAME.fullmatch(backup.name), backup
        assert backup.read_bytes() == before
    assert sorted(path.parent.glob("*.bak")) == sorted(backups)
