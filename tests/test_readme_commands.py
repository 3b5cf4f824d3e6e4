"""Every command in README.md runs (issue 17, item 13), so the README cannot drift.

The module reads README.md's ```bash blocks at collection time. Every line of the form
``uv run [--extra X] awt-engine ARGS`` becomes one test that runs ARGS in this process
through typer's CliRunner (no subprocess per command) and expects exit 0; a line that is
not an awt-engine command, or cannot run here, must be in :data:`SKIPS` with its reason,
and a skip that no longer matches a README line fails too. The ```python blocks are
executed, or listed in :data:`PY_SKIPS`. A new README command is therefore run by
default, and a broken one fails here.

Substitutions (what a user's machine has and this one does not):

- **Models.** ``awt_engine.backbone.load_backbone`` loads the suite's tiny random CLIP
  (tests/fixtures_clip.py, with CLIP's 77-token text context; 12 layers per tower for
  the methods in :data:`LAYERS_FOR_METHOD`) whatever model name and pretrained tag a
  command gives, so the commands keep their ``--model`` and ``--pretrained`` as
  written. ``--llm NAME`` becomes the tiny random chat model (tests/fixtures_llm.py).
- **The describe LLM.** ``describe`` runs with ``--backend openai`` against a scripted
  OpenAI-compatible server on 127.0.0.1 (its ``--backend``, ``--model`` and
  ``--base-url`` are replaced); the vllm and transformers backends have their own tests.
- **Files.** Commands run in a scratch folder holding what they name: ``photos/``,
  ``a.jpg``, ``b.png``, ``photo.jpg``, ``labels.txt``, ``mydesc.json``,
  ``published/dtd.json`` and ``tests/data`` (a link to the repository's). ``~`` is
  expanded as the shell would, to a scratch home with ``~/data/dtd`` (DTD in CoOp's
  layout: split file, all 47 classes, 2 train / 1 val / 1 test image each) and
  ``~/data/mine`` (an ImageFolder for the ``mine`` description cache) and ``~/data/ood``
  (three random images of no class). Relative outputs (``results/``, ``preds.jsonl``,
  ``explain/``, ``plots/``, checkpoints) land in the scratch folder.
- **Caches.** A shared cache holds description sets for ``dtd`` and ``mine`` (5 per
  class, so the commands use 5 with a warning: AWT's cost grows with the prompts),
  built before the first command; ``describe`` and ``cache import`` write into a fresh
  cache each (the README shows alternatives that would otherwise collide on one file).
- **Training.** ``train`` gets ``--epochs 1 --batch-size 32`` where it gives neither
  (:data:`TRAIN_SHORT`: a few steps show that the command runs). A
  ``--checkpoint FILE`` a command needs is made first by the README command that writes
  it, or as :data:`PRODUCERS` says (``coop-b2n.safetensors``: the CoOp command with
  ``--subsample base``).
- **Pipes.** ``... -o - | jq .`` runs the left side and checks that every stdout line
  is JSON (what ``jq .`` needs).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from awt_engine.cli import app
from tests.fixtures_clip import TINY_MODEL_CFG, write_local_dir
from tests.fixtures_llm import ScriptedServer, chat_reply, last_user, requested_count

# The fixtures are small on purpose: 5 descriptions per class where the commands ask for
# 50, 2 training images per class where they ask for 4 or 16 shots. Those warnings are
# expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*have fewer than 50 descriptions:UserWarning"),
    pytest.mark.filterwarnings("ignore:--shots .* have fewer training images:UserWarning"),
]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Command lines (as written in the README, comment removed) that are not run, and why.
SKIPS: dict[str, str] = {
    "uv run pytest": "the test suite itself",
    "uv run --extra serve awt-engine serve --dataset dtd --port 8000": "serves until stopped; "
    "the serve command (start-up, SIGTERM) is covered by tests/test_serve_http.py",
    "uv run --extra serve awt-engine serve --checkpoint coop-dtd.safetensors --views 21 "
    "--max-batch 64": "serves until stopped; covered by tests/test_serve_http.py",
    "curl -F image=@photo.jpg -F candidate_labels=cat,dog http://127.0.0.1:8000/v1/classify": (
        "a client of a running server; tests/test_serve_http.py sends these requests"
    ),
    "uv run --extra ray awt-engine classify photos/ s3://bucket/more/ --dataset imagenet "
    "--ray --output preds.parquet": "reads s3:// (no network here); Ray is covered by "
    "tests/test_distributed.py",
    "uv run awt-engine train -m epalm --dataset dtd --data-root ~/data/dtd --shots 4 --preset "
    "small -o epalm-small.safetensors": "the small preset names a hub LM (facebook/opt-125m; no "
    "network here); presets and their LLM checks are covered by tests/test_presets.py",
    "uv run --extra ray awt-engine eval --dataset dtd --data-root ~/data/dtd --ray "
    "--ray-address auto --concurrency 8": "--ray-address auto joins a running Ray cluster; "
    "Ray eval is covered by tests/test_distributed.py",
}
# Python blocks (found by a line they contain) that are not executed, and why.
PY_SKIPS: dict[str, str] = {
    'r = httpx.post("http://127.0.0.1:8000/v1/classify"': "a client of a running server; "
    "tests/test_serve_http.py sends the same request to a served classifier",
    "from awt_engine.distributed import classify_dataset": "reads s3:// through Ray Data "
    "(no network here); covered by tests/test_distributed.py",
}
# Commands that take more than a few seconds on 2 CPU cores (run without -m "not slow").
SLOW = ("train -m llamp",)  # builds 12-layer CLIP towers and runs an LLM: ~25 s
# Checkpoints no README command writes: (the README checkpoint it is made like, extra args).
PRODUCERS = {"coop-b2n.safetensors": ("coop-dtd.safetensors", ("--subsample", "base"))}
# What `train` gets unless the command gives it: one short epoch (a few steps over the
# fixture's 94 DTD training images) shows the command runs; learning has its own tests.
TRAIN_SHORT = {"--epochs": "1", "--batch-size": "32"}
# Pipes the README uses after a command, and the check that stands for them.
PIPES = {"jq .": "json-lines"}


# --------------------------------------------------------------------------- the README


@dataclass(frozen=True)
class Block:
    kind: str  # "bash" or "python"
    line: int  # README line number of the command / the block's first line
    text: str  # the command without its comment, or the whole Python block


def readme_blocks(text: str) -> list[Block]:
    """Commands of the ```bash blocks (one per line, ``\\`` continuations joined) and the
    ```python blocks, in README order."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)\s*", lines[i])
        if not fence:
            i += 1
            continue
        kind, start, body = fence.group(1), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if kind == "python":
            out.append(Block("python", start, "\n".join(body)))
        elif kind in ("bash", "sh", "shell", "console"):
            out.extend(_commands(body, start))
    return out


def _commands(body: list[str], start: int) -> list[Block]:
    out, pending, first = [], "", None
    for n, raw in enumerate(body, start=start):
        if first is None:
            first = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + raw, comments=True)
        pending, line = "", first
        first = None
        if words:
            out.append(Block("bash", line, shlex.join(words)))
    return out


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _id(block: Block) -> str:
    if block.kind == "python":
        return f"L{block.line}-python"
    words = block.text.split()
    rest = words[words.index("awt-engine") + 1 :] if "awt-engine" in words else words[2:]
    return f"L{block.line}-" + "-".join(w for w in rest[:3] if not w.startswith("-"))


def _marks(block: Block) -> list:
    marks = []
    if any(s in block.text for s in SLOW):
        marks.append(pytest.mark.slow)
    return marks


def _normal(command: str) -> str:
    return shlex.join(shlex.split(command))


# --------------------------------------------------------------------------- the workspace

# Fewer than the 50 the commands ask for by default (they use 5 then, with a warning):
# AWT's cost grows with the prompts per class, and 5 exercise the same code.
DESCRIPTIONS_PER_CLASS = 5
# The suite's tiny CLIP with CLIP's text context (77 tokens), so that CoOp's 16 learned
# context tokens fit in front of DTD's long template as they do with real models.
README_CLIP_CFG = {
    **TINY_MODEL_CFG,
    "text_cfg": {**TINY_MODEL_CFG["text_cfg"], "context_length": 77},
}
# Methods whose paper settings name layers beyond the tiny model's one: their commands
# load the same tiny CLIP with this many layers in each tower (LLaMP prompts text layers
# 0-8 and adapts vision layers 6-11 of ViT-B/16's 12).
LAYERS_FOR_METHOD = {"llamp": 12}
MINE = {"gear": (200, 60, 40), "bolt": (40, 60, 200), "spring": (60, 180, 60)}


@dataclass
class Workspace:
    root: Path  # the commands' working folder
    home: Path  # what ~ stands for
    cache: Path  # the shared cache
    server: ScriptedServer
    results: dict = field(default_factory=dict)  # argv -> (Result, env): each command once
    fresh: itertools.count = field(default_factory=itertools.count)
    layers: int = 1  # of the tiny CLIP the running command loads


def _image(path: Path, seed: int, size=(40, 32)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _dtd(root: Path) -> None:
    """DTD as CoOp keeps it: images/<class>/ and split_zhou_DescribableTextures.json."""
    from awt_engine.registry import get_dataset

    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    seed = itertools.count()
    for label, name in enumerate(get_dataset("dtd").classes):
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            for _ in range(n):
                rel = f"{name}/{name}_{next(seed):04d}.jpg"
                _image(root / "images" / rel, seed=len(splits[split]) * 100 + label)
                splits[split].append([rel, label, name])
    (root / "split_zhou_DescribableTextures.json").write_text(json.dumps(splits))


def _descriptions(classes, tag: str) -> dict[str, list[str]]:
    return {
        c: [f"{tag} {c} shows visual trait number {i}." for i in range(DESCRIPTIONS_PER_CLASS)]
        for c in classes
    }


def _llm_responder():
    """Questions when asked for questions, else as many new sentences as asked for."""
    counter, lock = itertools.count(), threading.Lock()

    def respond(body):
        n = max(requested_count(body) or 0, 8)
        if "{}" in last_user(body):  # the question prompt shows the placeholder itself
            return chat_reply("\n".join(f"- What does {{}} show as trait {k}?" for k in range(n)))
        with lock:
            ks = [next(counter) for _ in range(n)]
        return chat_reply("\n".join(f"- It shows a visual trait numbered {k}." for k in ks))

    return respond


def _populate(ws: Workspace) -> None:
    from awt_engine.descriptions import descriptions_path, from_plain, save_descriptions
    from awt_engine.registry import get_dataset

    root, home = ws.root, ws.home
    for i, name in enumerate(["photos/one.jpg", "photos/more/two.png", "photos/three.jpg"]):
        _image(root / name, seed=1000 + i)
    for i, name in enumerate(["a.jpg", "b.png", "photo.jpg"]):
        _image(root / name, seed=2000 + i, size=(64, 48))
    (root / "tests").mkdir()
    (root / "tests" / "data").symlink_to(REPO / "tests" / "data", target_is_directory=True)
    dtd_classes = get_dataset("dtd").classes
    (root / "published").mkdir()
    published = _descriptions(dtd_classes, "A published")
    (root / "published" / "dtd.json").write_text(json.dumps(published))
    (root / "labels.txt").write_text("gear\nbolt_nut\nspring\n")
    (root / "mydesc.json").write_text(json.dumps(_descriptions(MINE, "My")))
    _dtd(home / "data" / "dtd")
    for k in range(3):
        _image(home / "data" / "ood" / f"{k}.jpg", seed=3000 + k)
    for name, rgb in MINE.items():
        for split, n in (("train", 2), ("test", 2)):
            for k in range(n):
                img = Image.new("RGB", (40, 32), tuple(min(255, c + 10 * k) for c in rgb))
                (home / "data" / "mine" / split / name).mkdir(parents=True, exist_ok=True)
                img.save(home / "data" / "mine" / split / name / f"{k}.png")
    dtd = from_plain(_descriptions(dtd_classes, "A"), "dtd", template=get_dataset("dtd").template)
    save_descriptions(dtd, descriptions_path("dtd", ws.cache))
    mine = from_plain(_descriptions(MINE, "My"), "mine")
    save_descriptions(mine, descriptions_path("mine", ws.cache))


def _tiny_clip(folder: Path, layers: int = 1) -> str:
    import open_clip
    import torch

    cfg = json.loads(json.dumps(README_CLIP_CFG))
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return f"local-dir:{write_local_dir(folder, state, model_cfg=cfg)}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from awt_engine import backbone

    base = tmp_path_factory.mktemp("readme")
    real = backbone.load_backbone
    models = {1: _tiny_clip(base / "tiny-clip")}

    def tiny_backbone(model=None, pretrained=None, **kwargs):
        layers = space.layers
        if layers not in models:
            models[layers] = _tiny_clip(base / f"tiny-clip-{layers}", layers)
        return real(models[layers], None, **kwargs)

    with ScriptedServer(_llm_responder()) as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbone, "load_backbone", tiny_backbone)
        space = Workspace(base / "work", base / "home", base / "cache", server)
        space.root.mkdir()
        _populate(space)
        yield space


# --------------------------------------------------------------------------- running one


def _value(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _without(argv: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            out.append(a)
    return out


def _cli_args(words: list[str]) -> list[str] | None:
    """ARGS of ``uv run [--extra X]... awt-engine ARGS``; None for any other command."""
    if words[:2] != ["uv", "run"]:
        return None
    rest = words[2:]
    while rest[:1] == ["--extra"]:
        rest = rest[2:]
    return rest[1:] if rest[:1] == ["awt-engine"] else None


def _substitute(ws: Workspace, argv: list[str], request) -> tuple[list[str], dict]:
    argv = [str(ws.home) + a[1:] if a == "~" or a.startswith("~/") else a for a in argv]
    env = {"AWT_ENGINE_CACHE": str(ws.cache), "HF_HUB_OFFLINE": "1"}
    command = argv[0]
    if command == "describe" or argv[:2] == ["cache", "import"]:
        env["AWT_ENGINE_CACHE"] = str(ws.root.parent / f"fresh-cache-{next(ws.fresh)}")
    if command == "describe":
        argv = _without(argv, "--backend", "--model", "--base-url")
        argv += ["--backend", "openai", "--base-url", ws.server.base_url, "--model", "scripted"]
    if "--llm" in argv:
        llm = str(request.getfixturevalue("tiny_chat_model"))
        argv = [*_without(argv, "--llm"), "--llm", llm]
    if command in ("train", "fewshot"):
        for option, value in TRAIN_SHORT.items():
            if option not in argv:
                argv += [option, value]
    return argv, env


def run(ws: Workspace, argv: list[str], request):
    """Run one README command (each once per module: later uses share the result)."""
    checkpoint = _value(argv, "--checkpoint")
    if checkpoint is not None:
        _ensure_checkpoint(ws, checkpoint, request)
    if argv[0] == "plot-training":  # a training log: its run's checkpoint made first
        _ensure_checkpoint(ws, argv[1].removesuffix(".log.jsonl") + ".safetensors", request)
    argv, env = _substitute(ws, argv, request)
    key = tuple(argv)
    if key not in ws.results:
        method = _value(argv, "-m", "--method") if argv[0] == "train" else None
        ws.layers = LAYERS_FOR_METHOD.get(method, 1)
        try:
            with contextlib.chdir(ws.root):
                ws.results[key] = (CliRunner().invoke(app, argv, env=env), env)
        finally:
            ws.layers = 1
    return ws.results[key]


def _ensure_checkpoint(ws: Workspace, name: str, request) -> None:
    if (ws.root / name).exists():
        return
    like, extra = PRODUCERS.get(name, (name, ()))
    for block in BLOCKS:
        args = _cli_args(shlex.split(block.text)) if block.kind == "bash" else None
        if args and args[0] == "train" and _value(args, "-o", "--output") == like:
            argv = [*_without(args, "-o", "--output"), "-o", name, *extra]
            res, _ = run(ws, argv, request)
            assert res.exit_code == 0, f"making {name} with {shlex.join(argv)}:\n{res.output}"
            return
    raise AssertionError(f"no README train command writes {like} (needed for {name})")


# --------------------------------------------------------------------------- the tests


def test_the_readme_has_commands_and_every_skip_is_still_in_it():
    commands = {_normal(b.text) for b in BLOCKS if b.kind == "bash"}
    assert len(commands) > 20, "README parsing found too few commands"
    stale = [c for c in SKIPS if _normal(c) not in commands]
    assert not stale, f"SKIPS names commands the README no longer has: {stale}"
    blocks = [b.text for b in BLOCKS if b.kind == "python"]
    stale = [k for k in PY_SKIPS if not any(k in b for b in blocks)]
    assert not stale, f"PY_SKIPS names Python blocks the README no longer has: {stale}"


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=_id(b), marks=_marks(b)) for b in BLOCKS if b.kind == "bash"],
)
def test_readme_command(block: Block, ws: Workspace, request):
    skip = next((why for c, why in SKIPS.items() if _normal(c) == _normal(block.text)), None)
    if skip is not None:
        pytest.skip(f"README line {block.line}: {skip}")
    words = shlex.split(block.text)
    pipe = words[words.index("|") + 1 :] if "|" in words else None
    words = words[: words.index("|")] if pipe is not None else words
    argv = _cli_args(words)
    assert argv, (
        f"README line {block.line}: {block.text!r} is not an awt-engine command; run it here "
        "or add it to SKIPS with the reason"
    )
    if pipe is not None:
        assert " ".join(pipe) in PIPES, f"README line {block.line}: add the pipe {pipe} to PIPES"
    res, env = run(ws, argv, request)
    assert res.exit_code == 0, f"README line {block.line}: {block.text}\n{res.output}"
    assert "Traceback" not in res.output
    if pipe is not None:
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        assert rows and all("path" in r for r in rows)
    if argv[0] == "describe":
        name = _value(argv, "--name") or _value(argv, "--dataset", "-d")
        assert (Path(env["AWT_ENGINE_CACHE"]) / "descriptions" / f"{name}.json").is_file()


# What the Python blocks use without defining (a user has their own).
PRELUDE = """
import numpy as np, torch
from PIL import Image
pil_image = Image.open("photo.jpg")
numpy_array = np.asarray(Image.open("a.jpg"))
chw_tensor = torch.rand(3, 48, 64)
images = ["a.jpg", "b.png", pil_image]
image_embeds = torch.nn.functional.normalize(torch.randn(2, 5, 16), dim=-1)
class_embeds = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)
"""


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=_id(b)) for b in BLOCKS if b.kind == "python"]
)
def test_readme_python_block(block: Block, ws: Workspace, monkeypatch):
    skip = next((why for k, why in PY_SKIPS.items() if k in block.text), None)
    if skip is not None:
        pytest.skip(f"README line {block.line}: {skip}")
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(ws.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "readme_block"}
    with contextlib.chdir(ws.root):
        exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
        exec(compile(block.text, f"README.md:{block.line}", "exec"), namespace)


def test_parsing_joins_continuations_and_drops_comments():
    text = "x\n```bash\nuv run awt-engine a \\\n  --b 1   # note\n\n# only a comment\n```\n"
    (block,) = readme_blocks(text)
    assert block == Block("bash", 3, "uv run awt-engine a --b 1")
