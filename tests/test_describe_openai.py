"""The openai backend and the pipeline against a real loopback HTTP server with scripted answers."""

import json
import socket
import threading
from collections import Counter

import pytest

from awt_engine.describe import (
    BackendError,
    DescribeConfig,
    DescribeError,
    DescribeTask,
    NoUsableOutputError,
    SamplingConfig,
    describe_classes,
)
from awt_engine.describe.backends import ChatRequest, OpenAIBackend, OpenAIConfig
from awt_engine.describe.backends.openai_backend import parse_retry_after
from awt_engine.descriptions import from_plain, load_descriptions, save_descriptions
from tests.fixtures_llm import Reply, Router, ScriptedServer, chat_reply, last_user


class FakeClock:
    """time.monotonic + sleep stand-ins: sleeping advances the clock instantly."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def sleep(self, seconds):
        with self.lock:
            self.sleeps.append(round(seconds, 6))
            self.now += seconds


def backend_for(server, clock=None, **kw):
    clock = clock or FakeClock()
    cfg = dict(base_url=server.base_url, model="scripted-model", backoff_s=0.01, max_retries=3)
    cfg.update(kw)
    return OpenAIBackend(OpenAIConfig(**cfg), sleep=clock.sleep, clock=clock, jitter=False)


QUESTIONS_ANSWER = "\n".join(
    [
        "Sure! Here are some questions:",
        "1. What colour is {}?",
        "- What shape does a {} have?",
        "* what colour  is {}?",
        "- Compare {} with {}?",
        "- What is it?",
        "- Where is {photo} found?",
        "2) Which texture covers the {}?",
    ]
)
QUESTIONS = ["What colour is {}?", "What shape does a {} have?", "Which texture covers the {}?"]


def is_question_request(body):
    return "{}" in last_user(body)  # the question prompt shows the placeholder itself


# ----------------------------------------------------------------------------------------------
# the full scripted run, checked exactly
# ----------------------------------------------------------------------------------------------

ALPHA = {
    0: "- Alpha is red.\n- Alpha is red and round. Alpha has a stem.\n- ok\n",
    1: "- ALPHA  IS RED.\n- Alpha looks shiny in sunlight.\n- {} is bad here.\n",
    2: "Here are sentences about alpha:\n- Alpha sits on a table.\n- Alpha casts a soft shadow.\n",
}
# beta_gamma: answers by (question, how many times that question was answered before)
BETA = {
    (0, 0): "- Beta gamma is blue.\n- Beta gamma is blue.\n",
    (1, 0): "- Beta gamma has many legs.\n",
    (2, 0): "{}{}{}",
    (0, 1): "- Beta gamma is blue.\n- Beta gamma glows at night.\n",
    (1, 1): "- Beta gamma has many legs.\n",
    (2, 1): "- Beta gamma is blue.\n",
    (0, 2): "",
}


def make_scripted_responder(classes):
    router = Router(classes, QUESTIONS)
    lock = threading.Lock()
    answered = Counter()  # (class, q) -> successful answers so far
    hits = Counter()  # (class, q) -> HTTP requests so far

    def respond(body):
        if is_question_request(body):
            return chat_reply(QUESTIONS_ANSWER)
        c, qi = router(body)
        with lock:
            hits[c, qi] += 1
            if c == "beta_gamma" and qi == 0 and hits[c, qi] == 1:
                return Reply(429, {"error": "slow down"}, {"Retry-After": "2"})
            if c == "beta_gamma" and qi == 0 and hits[c, qi] == 2:
                return Reply(500, {"error": "boom"})
            k = answered[c, qi]
            answered[c, qi] += 1
        return chat_reply(ALPHA[qi] if c == "alpha" else BETA[qi, k])

    return respond, hits


def test_scripted_run_parses_dedupes_cycles_retries_and_writes_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", "sk-secret-123")
    classes = ("alpha", "beta_gamma")
    respond, hits = make_scripted_responder(classes)
    task = DescribeTask("toyset", classes, "photos of test objects", "a photo of a {}")
    sampling = SamplingConfig(max_tokens=200, temperature=0.7, top_p=0.9, seed=5)
    config = DescribeConfig(per_class=6, num_questions=3, max_rounds=3, sampling=sampling)
    clock = FakeClock()
    with ScriptedServer(respond) as server:
        backend = backend_for(server, clock, concurrency=4, api_key_env="SCRIPTED_KEY")
        result = describe_classes(task, backend, config, cache_root=tmp_path)

    alpha = [
        "Alpha is red.",
        "Alpha sits on a table.",
        "Alpha is red and round.",
        "Alpha looks shiny in sunlight.",
        "Alpha casts a soft shadow.",
        "Alpha has a stem.",
    ]
    beta = ["Beta gamma is blue.", "Beta gamma has many legs.", "Beta gamma glows at night."]
    assert result.descriptions.descriptions == {"alpha": alpha, "beta_gamma": beta}
    assert result.short == {"beta_gamma": 3}
    assert result.generated == ["alpha", "beta_gamma"]
    assert result.questions_generated
    # 1 question request + 3 (alpha) + 3 + 2 + 2 (beta: rounds 0, 1, 2) answered; 2 retries
    assert result.requests == 11
    assert result.retries == 2
    assert len(server.requests) == 13
    # round 0 asks every question; later rounds continue the cycle: q0 q1, then q2 q0
    assert hits == Counter(
        {
            ("alpha", 0): 1,
            ("alpha", 1): 1,
            ("alpha", 2): 1,
            ("beta_gamma", 0): 5,  # 3 answers + the 429 + the 500
            ("beta_gamma", 1): 2,
            ("beta_gamma", 2): 2,
        }
    )
    assert 2.0 in clock.sleeps  # Retry-After honoured
    # every request carried the sampling settings and its own seed
    desc_bodies = [b for b in server.requests if not is_question_request(b)]
    assert {(b["model"], b["max_tokens"], b["temperature"], b["top_p"]) for b in desc_bodies} == {
        ("scripted-model", 200, 0.7, 0.9)
    }
    assert all("n" not in b for b in server.requests)
    first_tries = {}
    for b in desc_bodies:
        first_tries.setdefault(json.dumps(b["messages"]) + str(b["seed"]), b["seed"])
    assert len(set(first_tries.values())) == 10  # distinct seeds for the 10 distinct requests
    assert {b["_auth"] for b in server.requests} == {"Bearer sk-secret-123"}

    path = tmp_path / "descriptions" / "toyset.json"
    text = path.read_text(encoding="utf-8")
    assert "sk-secret-123" not in text and "SCRIPTED_KEY" not in text
    raw = json.loads(text)
    assert raw["format"] == 1
    assert raw["dataset"] == "toyset"
    assert raw["classes"] == ["alpha", "beta_gamma"]
    assert raw["questions"] == QUESTIONS
    assert raw["descriptions"] == {"alpha": alpha, "beta_gamma": beta}
    assert raw["template"] == "a photo of a {}"
    assert raw["dataset_description"] == "photos of test objects"
    prov = raw["provenance"]
    assert prov["backend"] == "openai"
    assert prov["model"] == "scripted-model"
    assert prov["sampling"]["seed"] == 5
    assert len(prov["prompts_sha256"]) == 64
    assert prov["created"].endswith("Z")


# ----------------------------------------------------------------------------------------------
# retries and errors of the backend itself
# ----------------------------------------------------------------------------------------------


def test_retry_after_is_honoured_and_capped_then_backoff_doubles():
    script = iter(
        [
            Reply(429, {"error": "x"}, {"Retry-After": "3"}),
            Reply(503, "<html>unavailable</html>"),
            Reply(200, "this is not json"),
            chat_reply("- done"),
        ]
    )
    clock = FakeClock()
    with ScriptedServer(lambda body: next(script)) as server:
        backend = backend_for(server, clock, concurrency=1, backoff_s=0.01, max_retries=3)
        out = backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
    assert out[0][0].text == "- done"
    assert clock.sleeps == [3.0, 0.02, 0.04]  # Retry-After, then 0.01 * 2**attempt
    assert backend.stats.retries == 3
    assert len(server.requests) == 4

    script2 = iter([Reply(429, {}, {"Retry-After": "9999"}), chat_reply("ok")])
    clock2 = FakeClock()
    with ScriptedServer(lambda body: next(script2)) as server:
        backend = backend_for(server, clock2, concurrency=1, max_backoff_s=5.0)
        backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
    assert clock2.sleeps == [5.0]


def test_parse_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_persistent_5xx_gives_up_with_a_clear_error():
    with ScriptedServer(lambda body: Reply(502, {"error": "bad gateway"})) as server:
        backend = backend_for(server, max_retries=2)
        with pytest.raises(BackendError, match=r"failed after 3 attempt\(s\): HTTP 502"):
            backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
        assert len(server.requests) == 3


def test_auth_error_is_not_retried_and_hints_at_the_key():
    with ScriptedServer(lambda body: Reply(401, {"error": "bad key"})) as server:
        backend = backend_for(server)
        with pytest.raises(BackendError, match=r"HTTP 401.*api-key-env"):
            backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
        assert len(server.requests) == 1


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ValueError, match="NOPE_KEY"):
        OpenAIBackend(OpenAIConfig("http://127.0.0.1:9/v1", "m", api_key_env="NOPE_KEY"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_names_the_url_and_keeps_the_cache(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    clock = FakeClock()
    backend = OpenAIBackend(
        OpenAIConfig(url, "m", max_retries=1, backoff_s=0.01), sleep=clock.sleep, clock=clock
    )
    task = DescribeTask("toyset", ("a", "b"), "photos")
    path = tmp_path / "descriptions" / "toyset.json"
    save_descriptions(from_plain({"a": ["A is a thing."]}, "toyset", classes=["a", "b"]), path)
    before = path.read_bytes()
    with pytest.raises(BackendError) as e:
        describe_classes(task, backend, DescribeConfig(per_class=1), cache_root=tmp_path)
    assert url in str(e.value) and "cannot connect" in str(e.value)
    assert path.read_bytes() == before


def test_n_samples_are_requested_and_returned_in_index_order():
    def respond(body):
        n = body["n"]
        reply = chat_reply(*[f"- sample {i}" for i in range(n)])
        reply.body["choices"].reverse()  # servers may list choices in any order
        reply.body["choices"][0]["finish_reason"] = "length"
        return reply

    with ScriptedServer(respond) as server:
        backend = backend_for(server)
        out = backend.chat(
            [ChatRequest([{"role": "user", "content": "hi"}], 3)], SamplingConfig(n=3)
        )
    assert server.requests[0]["n"] == 3
    assert [c.text for c in out[0]] == ["- sample 0", "- sample 1", "- sample 2"]
    assert [c.truncated for c in out[0]] == [False, False, True]


def test_requests_of_a_step_run_concurrently():
    barrier = threading.Barrier(4, timeout=5)

    def respond(body):
        barrier.wait()  # only returns once 4 requests are in flight together
        return chat_reply("- fine")

    with ScriptedServer(respond) as server:
        backend = backend_for(server, concurrency=4)
        reqs = [ChatRequest([{"role": "user", "content": f"q{i}"}], i) for i in range(8)]
        out = backend.chat(reqs, SamplingConfig())
    assert [o[0].text for o in out] == ["- fine"] * 8


# ----------------------------------------------------------------------------------------------
# nothing usable, damaged cache, mismatched cache
# ----------------------------------------------------------------------------------------------


def test_no_usable_questions_is_a_clear_error(tmp_path):
    with ScriptedServer(lambda body: chat_reply("I cannot help with that.")) as server:
        backend = backend_for(server)
        task = DescribeTask("toyset", ("a", "b"), "photos")
        with pytest.raises(NoUsableOutputError, match=r"no usable question.*cannot help"):
            describe_classes(task, backend, DescribeConfig(question_rounds=2), cache_root=tmp_path)
        assert len(server.requests) == 2  # bounded re-asking
    assert not (tmp_path / "descriptions" / "toyset.json").exists()


def test_no_usable_descriptions_keeps_what_the_cache_had(tmp_path):
    path = tmp_path / "descriptions" / "toyset.json"
    save_descriptions(
        from_plain({"a": ["A is a round thing.", "A is red."]}, "toyset", classes=["a", "b"]), path
    )

    def respond(body):
        return chat_reply(QUESTIONS_ANSWER if is_question_request(body) else "nope\n{}\n")

    with ScriptedServer(respond) as server:
        backend = backend_for(server)
        task = DescribeTask("toyset", ("a", "b"), "photos")
        cfg = DescribeConfig(per_class=2, num_questions=3, max_rounds=2)
        with pytest.raises(NoUsableOutputError, match="no new usable description"):
            describe_classes(task, backend, cfg, cache_root=tmp_path)
    kept = load_descriptions(path)
    assert kept.descriptions == {"a": ["A is a round thing.", "A is red."]}
    assert kept.questions == tuple(QUESTIONS)  # stored, so the next run reuses them


def test_damaged_cache_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "descriptions" / "toyset.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "dataset": "toyset", "classes": [', encoding="utf-8")
    with ScriptedServer(lambda body: chat_reply("x")) as server:
        backend = backend_for(server)
        task = DescribeTask("toyset", ("a",), "photos")
        with pytest.raises(ValueError, match=r"toyset\.json.*not valid JSON"):
            describe_classes(task, backend, cache_root=tmp_path)
        assert server.requests == []
    assert path.read_text(encoding="utf-8") == '{"format": 1, "dataset": "toyset", "classes": ['


def test_cache_with_other_classes_is_not_mixed(tmp_path):
    path = tmp_path / "descriptions" / "toyset.json"
    save_descriptions(from_plain({"x": ["X is x-like."]}, "toyset"), path)
    task = DescribeTask("toyset", ("a", "b"), "photos")
    with ScriptedServer(lambda body: chat_reply("x")) as server:
        with pytest.raises(DescribeError, match=r"different class list.*--force"):
            describe_classes(task, backend_for(server), cache_root=tmp_path)


@pytest.mark.parametrize(
    "classes, description, template, message",
    [
        ((), "photos", None, "class list is empty"),
        (("a", "b", "a"), "photos", None, "duplicate class names"),
        (("Sea_Lion", "sea lion"), "photos", None, "duplicate class names"),
        (("a",), "  ", None, "no description"),
        (("a",), "photos", "a photo of a thing", "exactly one '{}'"),
    ],
)
def test_bad_tasks_are_refused(classes, description, template, message):
    with pytest.raises(ValueError, match=message):
        DescribeTask("toyset", classes, description, template)


# ----------------------------------------------------------------------------------------------
# the API key goes to the configured origin only and never into a message
# ----------------------------------------------------------------------------------------------

KEY = "sk-live-0123456789abcdefXYZ"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_host_is_refused_and_never_sees_the_key(status, monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", KEY)
    with ScriptedServer(lambda body: chat_reply("- should never be asked")) as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        redirect = Reply(status, {"moved": True}, {"Location": target})
        with ScriptedServer(lambda body: redirect) as server:
            backend = backend_for(server, api_key_env="SCRIPTED_KEY", max_retries=2)
            with pytest.raises(BackendError) as e:
                backend.chat(
                    [ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig()
                )
            assert [auth for _, _, auth in server.seen] == [f"Bearer {KEY}"]  # asked once
        assert elsewhere.seen == []  # not contacted at all, so never sent the key
    here = server.base_url.removesuffix("/v1")
    there = elsewhere.base_url.removesuffix("/v1")
    message = str(e.value)
    assert here in message and there in message and "redirect" in message
    assert KEY not in message


def test_error_bodies_echoing_the_key_are_redacted(monkeypatch):
    monkeypatch.setenv("SCRIPTED_KEY", KEY)
    echo = {"error": f"Incorrect API key provided: {KEY}. You can find your key at ..."}
    with ScriptedServer(lambda body: Reply(401, echo)) as server:
        backend = backend_for(server, api_key_env="SCRIPTED_KEY")
        with pytest.raises(BackendError) as refused:
            backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
    # a 5xx whose body puts the key right where the 200-character snippet is cut off
    cut = Reply(500, "x" * 190 + KEY)
    with ScriptedServer(lambda body: cut) as server:
        backend = backend_for(server, api_key_env="SCRIPTED_KEY", max_retries=1)
        with pytest.raises(BackendError) as retried:
            backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
    # a 200 that is not JSON, echoing the key
    with ScriptedServer(lambda body: Reply(200, f"<html>{KEY}</html>")) as server:
        backend = backend_for(server, api_key_env="SCRIPTED_KEY", max_retries=0)
        with pytest.raises(BackendError) as not_json:
            backend.chat([ChatRequest([{"role": "user", "content": "hi"}], 1)], SamplingConfig())
    for e, why in ((refused, "HTTP 401"), (retried, "HTTP 500"), (not_json, "not JSON")):
        message = str(e.value)
        assert why in message, message
        assert KEY[:12] not in message, message  # not even a truncated prefix
    assert "Incorrect API key provided: ***" in str(refused.value)


@pytest.mark.parametrize("value", [KEY, "gsk_AbCdEf0123456789abcdef0123", "sk-proj-abc"])
def test_api_key_env_given_a_key_says_so_without_printing_it(value, monkeypatch):
    monkeypatch.delenv(value, raising=False)
    with pytest.raises(ValueError) as e:
        OpenAIBackend(OpenAIConfig("http://127.0.0.1:9/v1", "m", api_key_env=value))
    message = str(e.value)
    assert value not in message and value[:8] not in message
    assert "NAME of an environment variable" in message and "looks like a key" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://user:sk-pass-999@127.0.0.1:9/v1",
        "https://sk-pass-999@example.invalid/v1",
        "user:sk-pass-999@127.0.0.1:9/v1",  # no scheme: refused for that, still not echoed
    ],
)
def test_base_url_with_credentials_is_refused_without_echoing_them(url):
    with pytest.raises(ValueError) as e:
        OpenAIConfig(url, "m")
    message = str(e.value)
    assert "sk-pass-999" not in message and "***@" in message
    if "://" in url:
        assert "--base-url must not hold credentials" in message
    else:
        assert "--base-url must start with http:// or https://" in message


def test_non_finite_timeouts_are_refused():
    for value in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="--timeout must be a finite number"):
            OpenAIConfig("http://127.0.0.1:9/v1", "m", timeout_s=value)
    with pytest.raises(ValueError, match="max_backoff_s must be a finite"):
        OpenAIConfig("http://127.0.0.1:9/v1", "m", max_backoff_s=float("inf"))
    with pytest.raises(ValueError, match="temperature must be a finite"):
        SamplingConfig(temperature=float("inf"))
    with pytest.raises(ValueError, match="save_every_s must be a finite"):
        DescribeConfig(save_every_s=float("nan"))
