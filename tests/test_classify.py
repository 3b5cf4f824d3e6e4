"""Classification end to end: Python API and `awt-engine classify`, with known answers."""

import csv
import io
import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine import backbone as backbone_mod
from awt_engine.cli import app
from awt_engine.descriptions import descriptions_path, from_plain, save_descriptions
from awt_engine.text_cache import text_cache_key, text_cache_path
from tests.fixtures_embedders import COLOURS, ColourBackbone, ColourEmbedder, solid
from tests.fixtures_images import deny_listing, make_bad_input_folder

runner = CliRunner()
NAMES = ["red", "green", "blue", "yellow"]


@pytest.fixture
def colour_backbone(monkeypatch):
    """`load_backbone` returns the known-answer backbone; remembers its arguments."""
    made = []

    def fake_load(model, pretrained=None, **kw):
        bb = ColourBackbone()
        made.append((model, pretrained, kw, bb))
        return bb

    monkeypatch.setattr(backbone_mod, "load_backbone", fake_load)
    return made


@pytest.fixture
def colour_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    truth = {}
    for i, name in enumerate(["red", "blue", "green", "yellow", "blue"]):
        path = folder / ("sub" if i % 2 else "") / f"{i}_{name}.png"
        solid(name, (20 + 3 * i, 17)).save(path)
        truth[str(path)] = name
    return folder, truth


def test_api_predicts_known_answers():
    clf = awt_engine.create_classifier(classes=NAMES, embedder=ColourEmbedder(), views=5)
    images = [solid(c) for c in ["blue", "red", "yellow"]]
    preds = clf.predict(images, top_k=3)
    assert [p[0]["label"] for p in preds] == ["blue", "red", "yellow"]
    for p in preds:
        assert len(p) == 3 and set(p[0]) == {"label", "score"}
        assert p[0]["score"] >= p[1]["score"] >= p[2]["score"]
        assert sum(x["score"] for x in p) <= 1 + 1e-6
    single = clf.predict(solid("green"), top_k=2)  # one image -> one list, as HF does
    assert single[0]["label"] == "green" and len(single) == 2
    assert clf.scores(images).shape == (3, 4)


def test_results_do_not_depend_on_batching_or_order():
    images = [solid(c, (17 + i, 23)) for i, c in enumerate(["blue", "red", "yellow", "green"])]
    for im, c in zip(images, ["blue", "red", "yellow", "green"], strict=True):  # add texture
        im.putpixel((3, 4), (int(255 * COLOURS[c][0]), 128, 7))
    a = awt_engine.create_classifier(
        classes=NAMES, embedder=ColourEmbedder(), views=7, batch_size=4
    )
    b = awt_engine.create_classifier(
        classes=NAMES, embedder=ColourEmbedder(), views=7, batch_size=1
    )
    sa = a.scores(images)
    sb = b.scores(images[::-1]).flip(0)
    alone = torch.cat([a.scores([im]) for im in images])
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sa, alone, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "scorer", ["awt", "clip", "clip-descriptions", "awt-uniform", "awt-no-transport"]
)
def test_every_scorer_gets_the_known_answers(scorer):
    clf = awt_engine.create_classifier(
        classes=NAMES, embedder=ColourEmbedder(), views=4, scorer=scorer
    )
    assert [p[0]["label"] for p in clf.predict([solid("green"), solid("red")])] == ["green", "red"]


def test_clip_scorer_encodes_bare_prompts_and_one_view(tmp_path):
    emb = ColourEmbedder()
    save_descriptions(
        from_plain(
            {n: [f"{n} thing {i}" for i in range(3)] for n in NAMES},
            "colours",
            template="a photo of a {}",
        ),
        descriptions_path("colours", tmp_path),
    )
    clf = awt_engine.create_classifier(
        dataset="colours", embedder=emb, views=9, scorer="clip", cache_dir=tmp_path, descriptions=3
    )
    clf.predict([solid("red")])
    assert emb.texts_encoded == len(NAMES)  # prompt 0 only
    assert clf.view_config.n_views == 1


def test_text_cache_hit_and_recompute_on_damage(tmp_path, colour_backbone):
    kw = dict(classes=NAMES, template="a photo of a {}", cache_dir=tmp_path, views=2)
    clf = awt_engine.create_classifier(**kw)
    clf.predict([solid("red")])
    first = colour_backbone[-1][3]
    assert first.text_calls == 1
    key = text_cache_key(clf.model.identity, clf.labels)
    assert clf.model.identity == f"{first.identity}|float32"
    path = text_cache_path(tmp_path, key)
    assert path.exists()

    clf2 = awt_engine.create_classifier(**kw)
    assert clf2.predict(solid("blue"))[0]["label"] == "blue"
    assert colour_backbone[-1][3].text_calls == 0  # served from the cache

    path.write_bytes(path.read_bytes()[:50])  # damage it
    with pytest.warns(UserWarning, match="not usable"):
        clf3 = awt_engine.create_classifier(**kw)
        assert clf3.predict(solid("green"))[0]["label"] == "green"
    assert colour_backbone[-1][3].text_calls == 1
    # and the rewritten file is good again
    clf4 = awt_engine.create_classifier(**kw)
    clf4.predict([solid("green")])
    assert colour_backbone[-1][3].text_calls == 0


def test_cli_classifies_folder_with_known_answers(colour_folder, colour_backbone, tmp_path):
    folder, truth = colour_folder
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(
        app,
        [
            "classify",
            str(folder),
            "--classes",
            ",".join(NAMES),
            "--template",
            "a photo of a {}",
            "--views",
            "3",
            "--output",
            str(out),
            "--top-k",
            "2",
            "--batch-size",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [ln.split("\t") for ln in res.stdout.strip().splitlines()]
    assert {p: label for p, label, _ in lines} == truth
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["path"]: r["predictions"][0]["label"] for r in rows} == truth
    assert all(len(r["predictions"]) == 2 for r in rows)
    model, pretrained, _kw, bb = colour_backbone[-1]
    assert (model, pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert max(bb.image_batches) == 2 * 3  # two images' views per forward pass


def test_cli_csv_output_and_files_and_globs(colour_folder, colour_backbone, tmp_path):
    folder, truth = colour_folder
    out = tmp_path / "p.csv"
    files = sorted(truth)[:2]
    res = runner.invoke(
        app,
        [
            "classify",
            *files,
            str(folder / "sub" / "*.png"),
            "--classes",
            ",".join(NAMES),
            "--views",
            "2",
            "-o",
            str(out),
            "--top-k",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    expected = {p for p in truth if p in files or "/sub/" in p}
    assert {r["path"] for r in rows} == expected
    assert all(truth[r["path"]] == r["label"] for r in rows)


def test_cli_bad_input_folder(tmp_path, colour_backbone):
    folder = tmp_path / "bad"
    expected = make_bad_input_folder(folder)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(
        app,
        [
            "classify",
            str(folder),
            "--classes",
            ",".join(NAMES),
            "--views",
            "2",
            "-o",
            str(out),
            "--workers",
            "2",
        ],
    )
    assert res.exit_code == 1, res.output  # some inputs failed
    rows = {json.loads(x)["path"]: json.loads(x) for x in out.read_text().splitlines()}
    assert len(rows) == len(expected)
    for name, outcome in expected.items():
        row = rows[str(folder / name)]
        if outcome == "ok":
            assert "predictions" in row, (name, row)
        else:
            assert row.get("error"), (name, row)
            assert f"{folder / name}:" in res.stderr
    printed = res.stdout.strip().splitlines()
    assert len(printed) == sum(v == "ok" for v in expected.values())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "dtdd"], "dtd"),  # unknown data set lists choices
        (["--classes", "a,b", "--scorer", "sinkhorn"], "awt, clip"),
        (["--classes", "a,b", "--views", "0"], "views"),
        (["--classes", "a,b", "-o", "x.txt"], ".jsonl or .csv"),
        (["--classes", "a,a"], "duplicate"),
        ([], "--dataset NAME, --classes LIST or --checkpoint"),
    ],
)
def test_cli_usage_errors_exit_2(args, needle, colour_folder, colour_backbone):
    folder, _ = colour_folder
    res = runner.invoke(app, ["classify", str(folder), *args])
    assert res.exit_code == 2, res.output
    assert needle.lower() in res.output.lower()


def test_cli_no_images_found(tmp_path, colour_backbone):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(
        app, ["classify", str(tmp_path / "empty"), str(tmp_path / "nope.jpg"), "--classes", "a,b"]
    )
    assert res.exit_code == 2
    assert "nope.jpg" in res.output and "empty" in res.output


def test_cli_missing_descriptions_exit_2(colour_folder, colour_backbone, tmp_path):
    folder, _ = colour_folder
    res = runner.invoke(
        app, ["classify", str(folder), "--dataset", "dtd", "--cache-dir", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "awt-engine describe --dataset dtd" in res.output


def test_cli_datasets_lists_registry():
    res = runner.invoke(app, ["datasets"])
    assert res.exit_code == 0
    assert "dtd" in res.stdout and "eurosat" in res.stdout and "a photo of a {}" in res.stdout


def test_cli_and_api_with_a_real_tiny_open_clip_model(tiny_clip_dir, colour_folder, tmp_path):
    """The user's code path for real weights: local-dir: folder, open_clip, text cache."""
    folder, truth = colour_folder
    out = tmp_path / "tiny.jsonl"
    args = [
        "classify",
        str(folder),
        "--model",
        tiny_clip_dir,
        "--classes",
        ",".join(NAMES),
        "--views",
        "3",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "c"),
        "-o",
        str(out),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(truth)
    for r in rows:  # random weights: structure, not content
        assert len(r["predictions"]) == 4 and {p["label"] for p in r["predictions"]} == set(NAMES)
        assert abs(sum(p["score"] for p in r["predictions"]) - 1) < 1e-4
    assert list((tmp_path / "c" / "text_embeddings").glob("*.safetensors"))
    # the API gives the same scores as the CLI printed
    clf = awt_engine.create_classifier(
        tiny_clip_dir, classes=NAMES, views=3, device="cpu", cache_dir=tmp_path / "c"
    )
    preds = clf.predict([str(p) for p in sorted(truth)], top_k=1)
    by_path = {r["path"]: r["predictions"][0] for r in rows}
    for p, pred in zip(sorted(truth), preds, strict=True):
        assert pred[0]["label"] == by_path[p]["label"]
        assert abs(pred[0]["score"] - by_path[p]["score"]) < 1e-4


# --------------------------------------------------------------------------- awkward file names

# Undecodable bytes (Latin-1 e-acute, 0xff), a newline, a tab, a backslash, a carriage
# return and an escape character: every one must reach the output and come back exactly.
AWKWARD = {
    b"caf\xe9_red.png": "red",
    b"line\nbreak_blue.png": "blue",
    b"tab\there_green.png": "green",
    b"back\\slash_yellow.png": "yellow",
    b"\xff\xfe\r\x1b_red.png": "red",
    "plain_ünïcode_blue.png".encode(): "blue",
}
BROKEN = b"broken\xff\n.png"  # not an image: an error row, its name intact


@pytest.fixture
def awkward_folder(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    truth = {}
    for name, colour in AWKWARD.items():
        path = os.path.join(os.fsencode(folder), name)
        buf = io.BytesIO()
        solid(colour, (21, 19)).save(buf, format="PNG")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        truth[path] = colour
    with open(os.path.join(os.fsencode(folder), BROKEN), "wb") as f:
        f.write(b"not a png")
    return folder, truth, os.path.join(os.fsencode(folder), BROKEN)


def _unescape(field: str) -> bytes:
    """The README's stdout rules, undone: the file name's bytes."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] != "\\":
            out += field[i].encode("utf-8")
            i += 1
        elif field[i + 1] in "\\tnr":
            out += {"\\": b"\\", "t": b"\t", "n": b"\n", "r": b"\r"}[field[i + 1]]
            i += 2
        elif field[i + 1] == "x":
            out.append(int(field[i + 2 : i + 4], 16))
            i += 4
        elif field[i + 1] == "u":
            out += chr(int(field[i + 2 : i + 6], 16)).encode("utf-8")
            i += 6
        else:
            raise AssertionError(f"unknown escape in {field!r}")
    return bytes(out)


def _classify_awkward(folder, out):
    args = ["classify", str(folder), "--classes", ",".join(NAMES), "--views", "2", "--top-k", "1"]
    return runner.invoke(app, [*args, "-o", str(out)] if out else args)


def test_cli_stdout_has_one_escaped_line_per_awkward_name(awkward_folder, colour_backbone):
    folder, truth, broken = awkward_folder
    res = _classify_awkward(folder, None)
    assert res.exit_code == 1, res.output  # the broken file
    lines = res.stdout.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(truth)  # exactly one line per image
    got = {}
    for line in lines[:-1]:
        path, label, score = line.split("\t")  # exactly three fields
        assert path.isprintable() and float(score) > 0
        got[_unescape(path)] = label
    assert got == truth
    errors = [ln for ln in res.stderr.split("\n") if ln.startswith("error: ")]
    assert len(errors) == 1 and _unescape(errors[0][len("error: ") :].split(": ")[0]) == broken


def test_cli_jsonl_writes_awkward_names_losslessly(awkward_folder, colour_backbone, tmp_path):
    folder, truth, broken = awkward_folder
    out = tmp_path / "preds.jsonl"
    res = _classify_awkward(folder, out)
    assert res.exit_code == 1, res.output
    text = out.read_bytes().decode("utf-8")  # strictly valid UTF-8
    rows = [json.loads(line) for line in text.split("\n")[:-1]]
    assert len(rows) == len(truth) + 1
    ok = {os.fsencode(r["path"]): r["predictions"][0]["label"] for r in rows if "predictions" in r}
    assert ok == truth
    (error_row,) = [r for r in rows if "error" in r]
    assert os.fsencode(error_row["path"]) == broken


def test_cli_csv_writes_awkward_names_losslessly(awkward_folder, colour_backbone, tmp_path):
    folder, truth, broken = awkward_folder
    out = tmp_path / "preds.csv"
    res = _classify_awkward(folder, out)
    assert res.exit_code == 1, res.output
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(truth) + 1
    ok = {os.fsencode(r["path"]): r["label"] for r in rows if not r["error"]}
    assert ok == truth
    (error_row,) = [r for r in rows if r["error"]]
    assert os.fsencode(error_row["path"]) == broken and error_row["rank"] == ""


# --------------------------------------------------------------------------- unreadable folders


def test_cli_unreadable_subfolder_is_an_error_row(
    colour_folder, colour_backbone, monkeypatch, tmp_path
):
    folder, truth = colour_folder
    locked = folder / "locked"
    (locked / "inner").mkdir(parents=True)
    solid("red").save(locked / "inner" / "x.png")
    deny_listing(monkeypatch, locked)
    out = tmp_path / "p.jsonl"
    res = runner.invoke(
        app, ["classify", str(folder), "--classes", ",".join(NAMES), "--views", "2", "-o", str(out)]
    )
    assert res.exit_code == 1, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["path"]: r["predictions"][0]["label"] for r in rows if "predictions" in r} == truth
    errors = [r for r in rows if "error" in r]
    assert errors == [{"path": str(locked), "error": "cannot read folder (permission denied)"}]
    assert f"error: {locked}: cannot read folder (permission denied)" in res.stderr
    assert "1 folder(s) could not be read" in res.stderr


def test_full_disk_while_writing_predictions_is_a_clear_error(tmp_path, colour_backbone):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("red", "blue"):
        solid(name).save(folder / f"{name}.png")
    out = tmp_path / "preds.jsonl"
    out.symlink_to("/dev/full")  # every write fails with ENOSPC
    res = runner.invoke(app, ["classify", str(folder), "--classes", "red,blue", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert f"cannot write predictions to {out}" in res.output
    assert "No space left" in res.output and "Traceback" not in res.output


def test_awt_options_on_the_command_line_reach_the_scorer(tmp_path, colour_backbone):
    from awt_engine.scorers import AWTConfig

    images = []
    for i, (a, b) in enumerate([("red", "blue"), ("green", "red"), ("blue", "green")]):
        im = solid(a, (24 + i, 16))  # left half one class, right half another:
        im.paste(solid(b, (12, 16)), (12 + i, 0))  # the crops disagree, the weights matter
        images.append(tmp_path / f"{a}-{b}.png")
        im.save(images[-1])
    options = {
        "--eps": "0.3",
        "--view-temperature": "2.0",
        "--prompt-temperature": "0.1",
        "--sinkhorn-tol": "1e-4",
        "--sinkhorn-iters": "7",
    }
    out = tmp_path / "p.jsonl"
    args = ["classify", *map(str, images), "--classes", "red,green,blue", "--views", "6"]
    res = runner.invoke(app, [*args, *sum(options.items(), ()), "-o", str(out)])
    assert res.exit_code == 0, res.output
    cli = [json.loads(x)["predictions"] for x in out.read_text().splitlines()]
    cfg = AWTConfig(eps=0.3, view_temperature=2.0, prompt_temperature=0.1, tol=1e-4, max_iter=7)
    kw = dict(classes=["red", "green", "blue"], embedder=ColourEmbedder(), views=6)
    api = awt_engine.create_classifier(**kw, awt_config=cfg).predict(
        [str(p) for p in images], top_k=5
    )
    default = awt_engine.create_classifier(**kw).predict([str(p) for p in images], top_k=5)
    for got, want in zip(cli, api, strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in want]
        for g, w in zip(got, want, strict=True):
            assert g["score"] == pytest.approx(w["score"], rel=1e-6)
    # and the options did change something (the runner-up's probability, by 10% or more)
    assert any(
        abs(math.log(got[1]["score"]) - math.log(plain[1]["score"])) > 0.1
        for got, plain in zip(cli, default, strict=True)
    )
    bad = runner.invoke(app, [*args, "--eps", "-1"])
    assert bad.exit_code == 2 and "--eps" in bad.output


def test_old_method_option_warns_and_still_works(tmp_path, colour_backbone):
    solid("red").save(tmp_path / "r.png")
    res = runner.invoke(
        app, ["classify", str(tmp_path / "r.png"), "--classes", "red,blue", "--method", "clip"]
    )
    assert res.exit_code == 0, res.output
    assert "--method is now --scorer" in res.stderr and "\tred\t" in res.stdout


def test_usage_errors_come_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    solid("red").save(tmp_path / "r.png")
    code = (
        "import sys; from awt_engine.cli import app\n"
        "try:\n    app(['classify', sys.argv[1], '--classes', 'a,b', '--scorer', 'nope'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "r.png")], capture_output=True, text=True
    )
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "unknown scorer 'nope'" in done.stderr


def test_version_and_jsonl_on_stdout(tmp_path, colour_backbone):
    import awt_engine as pkg

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"awt-engine {pkg.__version__}"
    solid("red").save(tmp_path / "r.png")
    res = runner.invoke(
        app, ["classify", str(tmp_path / "r.png"), "--classes", "red,blue", "-o", "-"]
    )
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert row["path"] == str(tmp_path / "r.png") and row["predictions"][0]["label"] == "red"


def test_cli_threads_reach_the_ray_actors(colour_folder, monkeypatch):
    """--threads with --ray: each CPU actor's CPUs and threads (distributed.pool's
    num_cpus, which sets ceil(num_cpus) threads in the actor), not only the driver's."""
    from awt_engine import distributed

    folder, _ = colour_folder
    seen = {}

    def fake_dataset(inputs, **kw):
        seen.update(kw)
        raise SystemExit(0)  # nothing to run: the keywords are what is checked

    monkeypatch.setattr(distributed, "init", lambda address=None: None)
    monkeypatch.setattr(distributed, "classify_dataset", fake_dataset)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the driver's: untouched
    for extra, want in ((["--threads", "3"], 3), ([], None)):
        seen.clear()
        args = ["classify", str(folder), "--classes", "red,blue", "--ray", *extra]
        runner.invoke(app, [*args, "--device", "cpu"])
        assert seen["num_cpus"] == want
