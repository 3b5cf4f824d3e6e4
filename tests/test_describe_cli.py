"""`awt-engine describe` and `awt-engine cache ...` through typer's CliRunner."""

import json
import re
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.descriptions import load_descriptions
from awt_engine.registry import display_name
from tests.fixtures_llm import (
    TOY_DATASETS,
    Router,
    ScriptedServer,
    chat_reply,
    last_user,
)

# a sample in the published AWT sets' plain form, shipped with the tests
SAMPLE = Path(__file__).resolve().parent / "data" / "awt-descriptions"
QUESTIONS = ["What colour is {}?", "What shape is {}?"]
runner = CliRunner()


def responder(classes):
    router = Router(classes, QUESTIONS)

    def respond(body):
        if "{}" in last_user(body):
            return chat_reply("\n".join(f"- {q}" for q in QUESTIONS))
        c, qi = router(body)
        name = display_name(c)
        return chat_reply(f"- The {name} has look {qi}.\n- The {name} has feel {qi}.")

    return respond


def openai_args(server, *extra):
    return [
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--model",
        "scripted",
        "--per-class",
        "4",
        "--questions",
        "2",
        "--no-progress",
        *extra,
    ]


def cache_file(tmp_path, name):
    return tmp_path / "awt-cache" / "descriptions" / f"{name}.json"


def test_describe_registered_dataset(tmp_path, toy_registry):
    info = TOY_DATASETS["toytex"]
    with ScriptedServer(responder(info.classes)) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
    assert result.exit_code == 0, result.output
    assert "toytex: 3/3 classes have >= 4 descriptions" in result.stdout
    ds = load_descriptions(cache_file(tmp_path, "toytex"))
    assert ds.classes == info.classes
    assert ds.template == info.template
    assert ds.dataset_description == info.description
    assert ds.questions == tuple(QUESTIONS)
    assert ds.descriptions["sea_lion"] == [
        "The sea lion has look 0.",
        "The sea lion has look 1.",
        "The sea lion has feel 0.",
        "The sea lion has feel 1.",
    ]
    # the same command again: nothing to do, no request
    with ScriptedServer(responder(info.classes)) as server:
        again = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
        assert server.requests == []
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_describe_custom_class_file(tmp_path, toy_registry):
    labels = tmp_path / "labels.txt"
    labels.write_text("gear\nbolt_nut\nspring\n", encoding="utf-8")
    with ScriptedServer(responder(["gear", "bolt_nut", "spring"])) as server:
        result = runner.invoke(
            app,
            [
                "describe",
                "--classes",
                str(labels),
                "--name",
                "my-parts",
                "--dataset-description",
                "close-up photos of machine parts",
                *openai_args(server),
            ],
        )
        assert "close-up photos of machine parts" in last_user(server.requests[0])
    assert result.exit_code == 0, result.output
    ds = load_descriptions(cache_file(tmp_path, "my-parts"))
    assert ds.classes == ("gear", "bolt_nut", "spring")
    assert ds.template == "a photo of a {}"
    assert ds.is_complete(4)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nope"], "unknown data set 'nope'"),
        (["--dataset", "folderset"], "no built-in class list; give --classes"),
        (["--classes", "a,b"], "needs --name"),
        (["--classes", "a,b,a", "--name", "x", "--dataset-description", "d"], "duplicate"),
        (["--classes", "a,b", "--name", "x"], "has no description"),
        (["--dataset", "toytex", "--template", "a photo"], "exactly one '{}'"),
        (["--dataset", "toytex", "--name", "../up"], "path separator"),
        (["--dataset", "toytex", "--backend", "openai"], "needs --base-url"),
        ([], "give --dataset NAME"),
    ],
)
def test_describe_usage_errors_exit_2_with_a_message(args, message, toy_registry):
    result = runner.invoke(app, ["describe", *args, "--no-progress"])
    assert result.exit_code == 2
    assert message in result.stderr
    if "unknown data set" in message:  # registered data sets are listed with the built-in
        assert "toytex" in result.stderr and "dtd" in result.stderr
    assert "Traceback" not in result.output


def test_empty_class_file_is_refused(tmp_path, toy_registry):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    result = runner.invoke(
        app,
        ["describe", "--classes", str(empty), "--name", "x", "--dataset-description", "d"],
    )
    assert result.exit_code == 2
    assert "has no class names" in result.stderr and str(empty) in result.stderr


def test_unreachable_endpoint_exits_2_naming_it(toy_registry):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = runner.invoke(
        app,
        [
            "describe",
            "--dataset",
            "toytex",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--model",
            "m",
            "--max-retries",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    assert url in result.stderr and "cannot connect" in result.stderr


def test_damaged_cache_exits_2_naming_the_file(tmp_path, toy_registry):
    path = cache_file(tmp_path, "toytex")
    path.parent.mkdir(parents=True)
    path.write_text("{ not json", encoding="utf-8")
    with ScriptedServer(responder(TOY_DATASETS["toytex"].classes)) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
    assert result.exit_code == 2
    assert str(path) in result.stderr and "not valid JSON" in result.stderr
    assert path.read_text(encoding="utf-8") == "{ not json"
    shown = runner.invoke(app, ["cache", "show", "toytex"])
    assert shown.exit_code == 2 and str(path) in shown.stderr


def test_api_key_comes_from_the_named_variable(tmp_path, toy_registry, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "k-very-secret")
    info = TOY_DATASETS["toytex"]
    with ScriptedServer(responder(info.classes)) as server:
        result = runner.invoke(
            app,
            [
                "describe",
                "--dataset",
                "toytex",
                "--api-key-env",
                "MY_LLM_KEY",
                *openai_args(server),
            ],
        )
        assert {b["_auth"] for b in server.requests} == {"Bearer k-very-secret"}
    assert result.exit_code == 0, result.output
    assert "k-very-secret" not in result.output
    assert "k-very-secret" not in cache_file(tmp_path, "toytex").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# cache show / export / import / list
# ----------------------------------------------------------------------------------------------


def write_plain(tmp_path, mapping):
    path = tmp_path / "published.json"
    path.write_text(json.dumps(mapping), encoding="utf-8")
    return path


def test_import_plain_export_cupl_and_show(tmp_path, toy_registry):
    published = write_plain(
        tmp_path,
        {"Banded": ["Banded is striped.", "Banded has bands."], "sea lion": ["A sea lion swims."]},
    )
    result = runner.invoke(app, ["cache", "import", str(published), "--dataset", "toytex"])
    assert result.exit_code == 0, result.output
    assert "2/3 classes" in result.stdout
    assert "blotchy" in result.stderr  # the class the file lacks is named
    ds = load_descriptions(cache_file(tmp_path, "toytex"))
    assert ds.classes == ("banded", "blotchy", "sea_lion")  # registry names and order
    assert ds.descriptions == {
        "banded": ["Banded is striped.", "Banded has bands."],
        "sea_lion": ["A sea lion swims."],
    }
    assert ds.template == TOY_DATASETS["toytex"].template
    assert ds.provenance["source"] == "import"

    exported = runner.invoke(app, ["cache", "export", "toytex", "--format", "cupl"])
    assert exported.exit_code == 0
    assert json.loads(exported.stdout) == {
        "toytex": {
            "banded": ["Banded is striped.", "Banded has bands."],
            "sea_lion": ["A sea lion swims."],
        }
    }
    out = tmp_path / "out.json"
    assert (
        runner.invoke(app, ["cache", "export", "toytex", "-f", "plain", "-o", str(out)]).exit_code
        == 0
    )
    assert json.loads(out.read_text()) == ds.descriptions
    # the CuPL export imports back as it was (round trip)
    cupl = tmp_path / "cupl.json"
    cupl.write_text(exported.stdout, encoding="utf-8")
    back = runner.invoke(
        app, ["cache", "import", str(cupl), "--dataset", "toytex2", "--template", "a {}"]
    )
    assert back.exit_code == 0, back.output
    assert load_descriptions(cache_file(tmp_path, "toytex2")).descriptions == ds.descriptions

    shown = runner.invoke(app, ["cache", "show", "toytex", "--samples", "1"])
    assert shown.exit_code == 0
    assert "classes:      3 (2 described; missing: blotchy)" in shown.stdout
    assert "per class min 0, median 1, max 2" in shown.stdout
    assert "banded (2): Banded is striped." in shown.stdout
    assert "source: import" in shown.stdout

    listed = runner.invoke(app, ["cache", "list"])
    assert "toytex: 3 classes, 3 descriptions" in listed.stdout

    # importing over an existing cache needs --force, and keeps every earlier file
    again = runner.invoke(app, ["cache", "import", str(published), "--dataset", "toytex"])
    assert again.exit_code == 2 and "--force" in again.stderr
    path = cache_file(tmp_path, "toytex")
    befores = []
    for _ in range(2):
        befores.append(path.read_bytes())
        forced = runner.invoke(
            app, ["cache", "import", str(published), "--dataset", "toytex", "--force"]
        )
        assert forced.exit_code == 0
        assert "previous cache was kept as" in forced.stderr
    backups = sorted(path.parent.glob("*.bak"))
    assert len(backups) == 2
    assert all(
        re.fullmatch(r"toytex\.json\.\d{8}T\d{6}\.\d{6}Z(-\d+)?\.bak", b.name) for b in backups
    )
    assert sorted(b.read_bytes() for b in backups) == sorted(befores)


def test_import_then_describe_fills_only_the_missing_class(tmp_path, toy_registry):
    published = write_plain(
        tmp_path,
        {
            "banded": [f"Banded look {i}." for i in range(4)],
            "sea_lion": [f"Sea lion {i} x." for i in range(4)],
        },
    )
    assert (
        runner.invoke(app, ["cache", "import", str(published), "--dataset", "toytex"]).exit_code
        == 0
    )
    with ScriptedServer(responder(TOY_DATASETS["toytex"].classes)) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
        routed = {Router(TOY_DATASETS["toytex"].classes, QUESTIONS)(b) for b in server.requests}
    assert result.exit_code == 0, result.output
    assert routed == {None, ("blotchy", 0), ("blotchy", 1)}  # questions + the missing class
    ds = load_descriptions(cache_file(tmp_path, "toytex"))
    assert ds.descriptions["banded"] == [f"Banded look {i}." for i in range(4)]
    assert len(ds.descriptions["blotchy"]) == 4
    assert ds.provenance["backend"] == "openai"
    assert ds.provenance["history"][0]["source"] == "import"


def test_import_refuses_names_outside_the_registry_and_bad_files(tmp_path, toy_registry):
    published = write_plain(tmp_path, {"unicorn": ["A unicorn."]})
    result = runner.invoke(app, ["cache", "import", str(published), "--dataset", "toytex"])
    assert result.exit_code == 2 and "'unicorn'" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    result = runner.invoke(app, ["cache", "import", str(bad), "--dataset", "toytex"])
    assert result.exit_code == 2 and str(bad) in result.stderr


def test_show_unknown_cache_lists_what_is_cached(toy_registry):
    result = runner.invoke(app, ["cache", "show", "nothing-here"])
    assert result.exit_code == 2 and "no descriptions cached for 'nothing-here'" in result.stderr


def test_cache_without_arguments_shows_help():
    assert runner.invoke(app, ["cache"]).exit_code == 2


# ----------------------------------------------------------------------------------------------
# with the real registry
# ----------------------------------------------------------------------------------------------


def _real_dtd():
    try:
        from awt_engine.registry import get_dataset

        return get_dataset("dtd")
    except Exception:
        return None


@pytest.mark.skipif(_real_dtd() is None, reason="data set registry not available")
def test_describe_dtd_from_the_real_registry(tmp_path):
    info = _real_dtd()
    with ScriptedServer(responder(info.classes)) as server:
        result = runner.invoke(
            app,
            ["describe", "--dataset", "dtd", *openai_args(server, "--concurrency", "8")],
        )
        assert len(server.requests) == 1 + 2 * len(info.classes)
    assert result.exit_code == 0, result.output
    ds = load_descriptions(cache_file(tmp_path, "dtd"))
    assert ds.classes == info.classes and len(ds.classes) == 47
    assert ds.template == info.template
    assert ds.is_complete(4)


@pytest.mark.skipif(_real_dtd() is None, reason="data set registry not available")
def test_import_published_dtd_into_registry_order(tmp_path):
    result = runner.invoke(app, ["cache", "import", str(SAMPLE / "dtd.json"), "--dataset", "dtd"])
    assert result.exit_code == 0, result.output
    raw = json.loads((SAMPLE / "dtd.json").read_text(encoding="utf-8"))
    ds = load_descriptions(cache_file(tmp_path, "dtd"))
    assert ds.classes == _real_dtd().classes
    assert ds.is_complete(3) and not ds.is_complete(4)  # the sample has 3 per class
    assert ds.descriptions["banded"] == [d.strip() for d in raw["banded"] if d.strip()]


def test_llm_without_usable_output_exits_2(toy_registry):
    with ScriptedServer(lambda body: chat_reply("As an AI model I cannot do that.")) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
    assert result.exit_code == 2
    assert "no usable question" in result.stderr and "cannot do that" in result.stderr


def test_ctrl_c_exits_130_and_says_how_to_resume(toy_registry, monkeypatch):
    import awt_engine.describe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(awt_engine.describe, "describe_classes", interrupted)
    with ScriptedServer(lambda body: chat_reply("x")) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
    assert result.exit_code == 130
    assert "toytex.json" in result.stderr and "run the same command again" in result.stderr


def test_short_classes_are_named_and_exit_1(tmp_path, toy_registry):
    info = TOY_DATASETS["toytex"]
    full = responder(info.classes)

    def respond(body):
        if "blotchy" in last_user(body) and "{}" not in last_user(body):
            return chat_reply("- Blotchy is blotched.")  # the same sentence every time
        return full(body)

    with ScriptedServer(respond) as server:
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *openai_args(server)])
    assert result.exit_code == 1
    assert "2/3 classes have >= 4 descriptions" in result.stdout
    assert "short of 4: 1 class(es): blotchy (1)" in result.stdout
    assert load_descriptions(cache_file(tmp_path, "toytex")).counts() == {
        "banded": 4,
        "blotchy": 1,
        "sea_lion": 4,
    }


@pytest.mark.parametrize(
    "option, value",
    [
        ("--timeout", "inf"),
        ("--temperature", "inf"),
        ("--save-every", "inf"),
        ("--top-p", "nan"),
        ("--timeout", "nan"),
    ],
)
def test_non_finite_numbers_are_usage_errors(option, value, toy_registry):
    with ScriptedServer(responder(TOY_DATASETS["toytex"].classes)) as server:
        result = runner.invoke(
            app, ["describe", "--dataset", "toytex", *openai_args(server), option, value]
        )
        assert server.requests == []  # refused before anything is asked
    assert result.exit_code == 2, result.output
    assert option in result.stderr and (
        "finite" in result.stderr or "Input should" in result.stderr
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_api_key_given_as_the_variable_name_is_not_printed(toy_registry):
    key = "sk-live-0123456789abcdefXYZ"
    with ScriptedServer(responder(TOY_DATASETS["toytex"].classes)) as server:
        result = runner.invoke(
            app, ["describe", "--dataset", "toytex", "--api-key-env", key, *openai_args(server)]
        )
        assert server.requests == []
    assert result.exit_code == 2
    assert key not in result.output and key[:8] not in result.output
    assert "looks like a key" in result.stderr


def test_base_url_with_credentials_exits_2_without_echoing_them(tmp_path, toy_registry):
    with ScriptedServer(responder(TOY_DATASETS["toytex"].classes)) as server:
        url = server.base_url.replace("http://", "http://me:sk-pass-999@")
        args = openai_args(server)
        args[args.index("--base-url") + 1] = url
        result = runner.invoke(app, ["describe", "--dataset", "toytex", *args])
        assert server.requests == []
    assert result.exit_code == 2
    assert "sk-pass-999" not in result.output and "credentials" in result.stderr
    assert not cache_file(tmp_path, "toytex").exists()
