"""Snapshot what the engine outputs on the test fixtures, to prove a refactor changed nothing.

    uv run python tools/identity_snapshot.py write before.json    # on the old commit
    uv run python tools/identity_snapshot.py write after.json     # on the new one
    uv run python tools/identity_snapshot.py compare before.json after.json

It builds the tests' tiny random CLIP and toy task (seeded), then records, bit for bit
(floats as ``float.hex``): classify's JSONL rows for every scorer, ``Classifier.scores``,
``awt_solve``'s iterations and weights, the eval JSON of every scorer (minus time stamps
and temporary paths), a CoOp checkpoint trained for two epochs (its tensors' SHA-256 and
losses) with the scores it gives, and explain's JSON for one image. ``compare`` prints
each difference and exits 1 when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOLATILE = {
    "descriptions_sha256",
    "created",
    "engine_version",
    "data_root",
    "seconds",
    "root",
    "source",
    "run_id",
}
WORK = ["<unset>"]  # the temporary folder, written as <work> in the snapshot


def _hex(x):
    if isinstance(x, float):
        return x.hex()
    if isinstance(x, str):
        return x.replace(WORK[0], "<work>").replace(str(ROOT), "<repo>")
    if isinstance(x, dict):
        return {k: _hex(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list | tuple):
        return [_hex(v) for v in x]
    return x


def _tensor(t) -> list:
    return [float(v).hex() for v in t.detach().double().flatten().tolist()]


def _cli(args: list[str]) -> str:
    from typer.testing import CliRunner

    from awt_engine.cli import app

    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        raise SystemExit(f"{' '.join(args)} exited {res.exit_code}:\n{res.output}")
    return res.stdout


def snapshot(work: Path) -> dict:
    import torch

    from tests.fixtures_clip import make_tiny_clip
    from tests.fixtures_training import make_toy_task

    WORK[0] = str(work)
    os.environ["AWT_ENGINE_CACHE"] = str(work / "cache")
    model = make_tiny_clip(work / "clip").local_dir_name
    toy = make_toy_task(work / "toy")
    desc = {c: [f"{c} stripes.", f"a {c} texture.", f"mostly {c}."] for c in toy.classes}
    (work / "desc.json").write_text(json.dumps(desc))
    _cli(["cache", "import", str(work / "desc.json"), "--dataset", "toy"])
    images = sorted(str(p) for p in (toy.root / "test").rglob("*.png"))
    images += sorted(str(p) for p in (ROOT / "tests" / "data" / "images").glob("*.png"))
    common = ["--model", model, "--device", "cpu", "--no-progress", "--views", "5"]
    out: dict = {}
    classes = ",".join(toy.classes)
    for scorer in ("awt", "clip", "clip-descriptions", "awt-uniform", "awt-no-transport"):
        rows = _cli(
            ["classify", *images, "--dataset", "toy", "--classes", classes, *common,
             "--scorer", scorer, "--top-k", str(len(toy.classes)), "-o", "-"]
        )  # fmt: skip
        out[f"classify/{scorer}"] = [_hex(json.loads(r)) for r in rows.splitlines()]
    import awt_engine

    clf = awt_engine.create_classifier(
        model=model, dataset="toy", classes=list(toy.classes), views=5, device="cpu"
    )
    out["scores/awt"] = _tensor(clf.scores(images[:6]))
    from awt_engine.scoring import awt_solve

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 7, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 5, 16, generator=g), dim=-1)
    sol = awt_solve(img, txt, scale=50.0)
    out["awt_solve"] = {
        k: (_tensor(v) if torch.is_tensor(v) else _hex(v))
        for k, v in vars(sol).items()
        if not k.startswith("_")
    }
    res = work / "eval"
    _cli(["eval", "--data-root", str(toy.root), "--dataset", "toy", *common, "--output",
          str(res), "--scorer", "awt", "--scorer", "clip", "--scorer", "clip-descriptions"])  # fmt: skip
    for f in sorted(res.glob("*.json")):
        rec = json.loads(f.read_text())
        out[f"eval/{rec['scorer']}"] = _hex(rec)
    ckpt = work / "coop.safetensors"
    _cli(["train", "-m", "coop", "--data-root", str(toy.root), "--model", model,
          "--pretrained", "none", "--device", "cpu", "--shots", "2", "--epochs", "2",
          "--batch-size", "4", "--set", "n_ctx=2", "-o", str(ckpt), "--no-progress"])  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as sf:
        head = json.loads(sf.metadata()["awt_engine"])
        out["train/tensors"] = {
            k: hashlib.sha256(sf.get_tensor(k).numpy().tobytes()).hexdigest() for k in sf.keys()
        }
    out["train/losses"] = _hex(head.get("losses"))
    rows = _cli(["classify", *images[:8], "--checkpoint", str(ckpt), "--views", "3",
                 "--device", "cpu", "--no-progress", "-o", "-"])  # fmt: skip
    out["classify/checkpoint"] = [_hex(json.loads(r)) for r in rows.splitlines()]
    ex = work / "explain.json"
    _cli(["explain", images[0], "--dataset", "toy", "--classes", classes, "--model", model,
          "--device", "cpu", "--views", "5", "-o", str(ex)])  # fmt: skip
    out["explain"] = _hex(json.loads(ex.read_text()))
    return out


def _diff(a, b, where="") -> list[str]:
    if type(a) is not type(b):
        return [f"{where}: {a!r:.80} != {b!r:.80}"]
    if isinstance(a, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{where}/{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _diff(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r:.80} != {b!r:.80}"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"] and len(argv) == 2:
        with tempfile.TemporaryDirectory() as tmp:
            snap = snapshot(Path(tmp))
        Path(argv[1]).write_text(json.dumps(snap, indent=1, sort_keys=True))
        print(f"{argv[1]}: {len(snap)} entries")
        return 0
    if argv[:1] == ["compare"] and len(argv) == 3:
        a, b = (json.loads(Path(p).read_text()) for p in argv[1:])
        diffs = _diff(a, b)
        for d in diffs[:50]:
            print(d)
        print(f"{len(diffs)} difference(s) over {len(a)} entries")
        return 1 if diffs else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
