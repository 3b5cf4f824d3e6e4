"""The text-embedding cache: an entry is used only when every check passes.

Damage is made the ways a disk, a bug or a hostile writer would make it: a flipped bit
(checksum), an integer dtype, huge values and a wrong width written with a valid
checksum (so only the dtype / unit-norm / width checks can catch them).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from awt_engine._tensorfile import save_tensors
from awt_engine.text_cache import load_or_encode, text_cache_key, text_cache_path

PROMPTS = [["a red thing.", "a red thing. shiny"], ["a blue thing.", "a blue thing. matte"]]
IDENTITY = "test-encoder|v1"
D = 5


class Encoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        g = torch.Generator().manual_seed(len(texts))
        return F.normalize(torch.randn(len(texts), D, generator=g), dim=-1)


def _path(root):
    return text_cache_path(root, text_cache_key(IDENTITY, PROMPTS))


def _fresh(root):
    enc = Encoder()
    first = load_or_encode(enc, IDENTITY, PROMPTS, root, dim=D)
    assert enc.calls == 1 and _path(root).is_file()
    return first


def _reload(root):
    enc = Encoder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_or_encode(enc, IDENTITY, PROMPTS, root, dim=D)
    return out, enc.calls, [str(w.message) for w in caught]


def test_valid_entry_is_served_without_encoding(tmp_path):
    first = _fresh(tmp_path)
    out, calls, msgs = _reload(tmp_path)
    assert calls == 0 and not msgs
    assert torch.equal(out, first)


def test_flipped_bit_is_recomputed_with_a_warning(tmp_path):
    first = _fresh(tmp_path)
    path = _path(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x04  # one bit of the last float
    path.write_bytes(bytes(data))
    out, calls, msgs = _reload(tmp_path)
    assert calls == 1
    assert torch.equal(out, first)
    assert any(str(path) in m and "checksum" in m for m in msgs), msgs


@pytest.mark.parametrize(
    "bad, reason",
    [
        (lambda t: (t * 1000).to(torch.int64), "dtype"),
        (lambda t: t * 1e30, "unit"),
        (lambda t: torch.cat([t, t[..., :1]], dim=-1), "shape"),
        (lambda t: t.reshape(1, 4, D), "shape"),
    ],
    ids=["integer-dtype", "huge-values", "wrong-width", "wrong-prompt-count"],
)
def test_checksum_valid_but_wrong_tensor_is_recomputed(tmp_path, bad, reason):
    first = _fresh(tmp_path)
    path = _path(tmp_path)
    key = text_cache_key(IDENTITY, PROMPTS)
    save_tensors(path, {"embeds": bad(first)}, {"key": key})  # a valid checksum of bad data
    out, calls, msgs = _reload(tmp_path)
    assert calls == 1, "a wrong tensor must never be served"
    assert torch.equal(out, first)
    assert any(str(path) in m and reason in m for m in msgs), msgs


def test_entry_of_another_key_is_not_served(tmp_path):
    first = _fresh(tmp_path)
    save_tensors(_path(tmp_path), {"embeds": first.flip(0)}, {"key": "0" * 64})
    out, calls, _ = _reload(tmp_path)
    assert calls == 1 and torch.equal(out, first)


def test_unwritable_cache_warns_once_and_carries_on(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "text_embeddings").write_text("a file where the cache folder should be")
    enc = Encoder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = load_or_encode(enc, IDENTITY, PROMPTS, root, dim=D)
        b = load_or_encode(enc, IDENTITY, PROMPTS, root, dim=D)
    assert enc.calls == 2 and torch.equal(a, b)
    msgs = [str(w.message) for w in caught if "cannot write" in str(w.message)]
    assert len(msgs) == 1 and "text-embedding" in msgs[0], msgs


def _swap_bytes(path, a: bytes, b: bytes) -> None:
    """Exchange the byte runs ``a`` and ``b`` wherever they stand in ``path``."""
    data = path.read_bytes()
    assert data.count(a) >= 1 and data.count(b) >= 1
    marker = b"\x00AWT-SWAP\x00" * 2
    data = data.replace(a, marker).replace(b, a).replace(marker, b)
    path.write_bytes(data)


def test_classify_after_rows_swapped_in_the_cache_file(tmp_path, monkeypatch):
    """Format-agnostic damage: the red and blue prompt embeddings trade places on disk.

    Without a checksum the cache then says red images are blue (exit 0, wrong labels).
    """
    from typer.testing import CliRunner

    from awt_engine import backbone as backbone_mod
    from awt_engine.cli import app
    from tests.fixtures_embedders import ColourBackbone, ColourEmbedder, solid

    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("red", "blue"):
        solid(name).save(folder / f"{name}.png")
    cache = tmp_path / "cache"
    args = ["classify", str(folder), "--classes", "red,blue", "--views", "1"]
    args += ["--cache-dir", str(cache)]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    (entry,) = (cache / "text_embeddings").iterdir()
    rows = ColourEmbedder().embed_texts([["a photo of a red."], ["a photo of a blue."]])
    _swap_bytes(entry, rows[0, 0].numpy().tobytes(), rows[1, 0].numpy().tobytes())
    with pytest.warns(UserWarning, match="checksum") as caught:
        second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    labels = dict(line.split("\t")[:2] for line in second.stdout.splitlines())
    assert labels == {str(folder / "red.png"): "red", str(folder / "blue.png"): "blue"}
    assert any(str(entry) in str(w.message) for w in caught)  # the warning names the file
