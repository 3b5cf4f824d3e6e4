"""The LLM fingerprint: a local folder's weights are hashed once per (path, size, mtime_ns),
in the process and across processes (the cache folder's record), with the same value."""

import hashlib
import os

import awt_engine.models.llm as llm


def _reference(folder):
    """The fingerprint as it was before any caching: every file read and hashed."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in llm._WEIGHT_FILES and f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            h.update(f"{f.name}\0{digest}\0".encode())
    return f"llm|sha256:{h.hexdigest()}"


def _folder(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(os.urandom(3 << 20))
    (folder / "notes.md").write_text("not a weight file")
    return folder


def _count_reads(monkeypatch):
    reads = []
    real = llm.file_sha256

    def spy(path):
        reads.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(llm, "file_sha256", spy)
    return reads


def test_a_second_call_reads_no_weights_and_gives_the_same_value(tmp_path, monkeypatch):
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llm, "_FILE_HASHES", {})
    folder = _folder(tmp_path)
    reads = _count_reads(monkeypatch)
    first = llm.llm_fingerprint(str(folder), None)
    assert first == _reference(folder)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert llm.llm_fingerprint(str(folder), None) == first and len(reads) == 2  # in memory
    monkeypatch.setattr(llm, "_FILE_HASHES", {})  # a new process: the cache folder's record
    assert llm.llm_fingerprint(str(folder), None) == first and len(reads) == 2


def test_a_changed_file_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llm, "_FILE_HASHES", {})
    folder = _folder(tmp_path)
    reads = _count_reads(monkeypatch)
    first = llm.llm_fingerprint(str(folder), None)
    weights = folder / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(os.urandom(3 << 20))  # same size: the new mtime tells
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    monkeypatch.setattr(llm, "_FILE_HASHES", {})
    second = llm.llm_fingerprint(str(folder), None)
    assert second == _reference(folder) != first
    assert reads[2:] == ["model.safetensors"]  # config.json from the record


def test_an_unwritable_cache_keeps_the_hashes_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(blocker))  # a file: no folder can be made
    monkeypatch.setattr(llm, "_FILE_HASHES", {})
    folder = _folder(tmp_path)
    reads = _count_reads(monkeypatch)
    assert llm.llm_fingerprint(str(folder), None) == _reference(folder)
    assert llm.llm_fingerprint(str(folder), None) == _reference(folder) and len(reads) == 2
