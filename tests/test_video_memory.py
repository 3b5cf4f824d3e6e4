"""Videos under the pixel budget (issue 17, item 3): the frames a video keeps fit the
budget (reduced by an integer factor when they must, never below R on the shorter side),
a count that cannot fit is refused naming it, and the views never hold a tensor copy of
every frame. Clips are made here with PyAV (tests/test_video.py's helpers).

Held pixels are measured by instrumenting the objects that hold them (the frames'
images, the view code's tensors), not by RSS; one slow test also checks RSS on a
1280x720 clip in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.inputs import (
    DEFAULT_PIXEL_BUDGET,
    ImageDecodeError,
    OpenedVideo,
    check_frame_count,
    decode_frames,
    decode_images,
)
from awt_engine.inputs import views as views_mod
from awt_engine.inputs.views import ViewConfig, make_video_views, make_views
from tests.fixtures_embedders import ColourEmbedder
from tests.test_video import NAMES, RGB, colour_backbone, write_video  # noqa: F401

pytest.importorskip("av")

runner = CliRunner()
N = 12  # frames sampled; the clip has 12 distinct textured frames of 96 x 64
FULL = 96 * 64 * 4  # one frame in Pillow's storage (4 bytes a pixel): 24576
DECODER = 16 * 96 * 64  # the decoder's working frames, estimated at 16 B/px: 98304


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """12 frames of noise (1 s at 12 fps): reducing them changes their pixels."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(N)]
    path = tmp_path_factory.mktemp("clips") / "noise.mp4"
    return write_video(path, frames, fps=N, size=(96, 64))


def pixels(image) -> bytes:
    return image.tobytes()


def test_frames_that_fit_the_budget_are_never_reduced(textured):
    """Ordinary clips keep their pixels: up to the exact budget 12 full frames need."""
    full = decode_frames(textured, N, target_size=8, pixel_budget=None)
    assert full.size == (96, 64)
    exact = N * FULL + DECODER  # 393216: the frames plus the decoder's estimate
    for budget in (DEFAULT_PIXEL_BUDGET, exact):
        clip = decode_frames(textured, N, target_size=8, pixel_budget=budget)
        assert clip.size == (96, 64)
        assert [pixels(f) for f in clip.frames] == [pixels(f) for f in full.frames]


@pytest.mark.parametrize(
    ("budget", "factor", "size"),
    [
        # one byte short of the exact fit: half size (12 x 48x32x4 = 73728 bytes)
        (N * FULL + DECODER - 1, 2, (48, 32)),
        # 140000: the decoder reserved at half, 70000 left; half size needs 73728,
        # a third (32 x 22, 12 x 2816 = 33792) fits
        (140_000, 3, (32, 22)),
    ],
)
def test_frames_over_the_budget_are_reduced_by_the_smallest_factor_that_fits(
    textured, budget, factor, size
):
    full = decode_frames(textured, N, target_size=8, pixel_budget=None)
    clip = decode_frames(textured, N, target_size=8, pixel_budget=budget)
    assert clip.size == size
    # the same box filter as huge images: Image.reduce of the full-size frames
    assert [pixels(f) for f in clip.frames] == [pixels(f.reduce(factor)) for f in full.frames]
    assert clip.nbytes + min(DECODER, budget // 2) <= budget
    assert clip.times == full.times  # the same frames, only smaller


def test_a_count_that_cannot_fit_even_reduced_is_refused_naming_it(textured):
    """Reduced no further than R = 8 on the shorter side (12 x 8, 384 bytes a frame):
    a budget of 8000 leaves 4000 bytes beside the decoder, 10 such frames."""
    with pytest.raises(ImageDecodeError) as err:
        decode_frames(textured, N, target_size=8, pixel_budget=8000)
    assert err.value.path == str(textured)
    assert err.value.reason == (
        "--frames 12: 12 frames of 96x64 do not fit the 7.81 KiB pixel budget even "
        "reduced to 12x8 (the views' 8 px on the shorter side); at most 10 frames of "
        "this video fit"
    )
    assert decode_frames(textured, 10, target_size=8, pixel_budget=8000).size == (12, 8)
    with pytest.raises(ImageDecodeError, match="--frames 11: "):
        decode_frames(textured, 11, target_size=8, pixel_budget=8000)
    # in a stream of inputs it is that video's error row, the run goes on
    (row,) = decode_images([textured], frames=N, target_size=8, pixel_budget=8000)
    assert not row.ok and row.error.startswith("--frames 12: ")


def test_a_count_no_video_could_fit_is_refused_before_decoding():
    # R = 8: one 8x8 frame is 256 bytes; 512 MiB less the decoder's 1024 bytes for it
    most = (512 * 1024 * 1024 - 16 * 64) // 256  # 2097147
    check_frame_count(most, 8)
    with pytest.raises(ValueError) as err:
        check_frame_count(most + 1, 8)
    assert str(err.value) == (
        f"--frames {most + 1}: that many frames cannot fit the 512 MiB pixel budget: "
        "frames are kept at least at the model's input size (8x8 px, 256 bytes each), "
        f"so at most {most} fit"
    )
    with pytest.raises(ValueError, match="--frames 3000000: "):
        decode_images([], frames=3_000_000, target_size=8)  # raised at once, not lazily
    check_frame_count(3_000_000, None)  # no R: nothing to check against
    check_frame_count(3_000_000, 8, None)  # no budget


def _track_frames(monkeypatch):
    """Count the bytes of the frame images the decoder keeps that are alive (4 B/px)."""
    lock = threading.Lock()
    state = {"live": 0, "peak": 0}
    original = OpenedVideo._to_rgb

    def release(nbytes):
        with lock:
            state["live"] -= nbytes

    def to_rgb(self, frame):
        image = original(self, frame)
        nbytes = 4 * image.width * image.height
        with lock:
            state["live"] += nbytes
            state["peak"] = max(state["peak"], state["live"])
        weakref.finalize(image, release, nbytes)
        return image

    monkeypatch.setattr(OpenedVideo, "_to_rgb", to_rgb)
    return state


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_images_holds_the_frames_of_videos_within_the_budget(textured, monkeypatch, workers):
    """Four clips whose 12 full frames (295 KB) exceed a 140000-byte budget: each is
    reduced, and the frames alive at any moment (decoding, and decoded but not yet
    consumed) stay within the budget. Before the fix each was decoded alone at full
    size, 2.1 times the budget."""
    state = _track_frames(monkeypatch)
    budget = 140_000
    items = decode_images(
        [textured] * 4, frames=N, target_size=8, pixel_budget=budget, workers=workers
    )
    sizes = []
    for item in items:
        assert item.ok, item.error
        sizes.append(item.image.size)
        del item
    assert 0 < state["peak"] <= budget, state
    assert sizes == [(32, 22)] * 4


def _track_frame_tensors(monkeypatch):
    """Count the distinct storages of the frame tensors the view code makes that are
    alive (image_to_tensor's and _on_device's outputs share or copy them)."""
    live: dict[int, int] = {}
    state = {"peak": 0}

    def release(ptr):
        live[ptr] -= 1
        if not live[ptr]:
            del live[ptr]

    def track(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        live[ptr] = live.get(ptr, 0) + 1
        state["peak"] = max(state["peak"], len(live))
        weakref.finalize(tensor, release, ptr)
        return tensor

    to_tensor, on_device = views_mod.image_to_tensor, views_mod._on_device
    monkeypatch.setattr(views_mod, "image_to_tensor", lambda img: track(to_tensor(img)))
    monkeypatch.setattr(views_mod, "_on_device", lambda px, target: track(on_device(px, target)))
    return state


@pytest.mark.parametrize("n_views", [30, 5])
def test_video_views_hold_at_most_two_frame_tensors(textured, monkeypatch, n_views):
    """The views need every frame (the seed hashes all of them, crops take random ones)
    but not all as tensors at once: before the fix all 12 were converted together and
    kept beside the frames, 3 more bytes a pixel of each."""
    clip = decode_frames(textured, N, target_size=8)
    config = ViewConfig(n_views=n_views, frames=N)
    pp = ColourEmbedder.preprocess
    expected = _reference_views(clip, pp, config)  # before tracking
    state = _track_frame_tensors(monkeypatch)
    got = make_video_views(clip, pp, config)
    assert 1 <= state["peak"] <= 2, state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _reference_views(clip, pp, config):
    """The views as the module docstring says, each made from the whole frame's tensor:
    the middle frame, the others in order (as an image's view 0), then each crop box
    of video_view_boxes (as an image's crops are made)."""
    boxes = views_mod.video_view_boxes(clip, config)
    out = []
    for k, (i, *box) in enumerate(boxes.tolist()):
        frame = views_mod.image_to_tensor(clip.frames[i])
        if k < min(N, config.n_views):
            out.append(make_views(frame, pp, ViewConfig(n_views=1))[0])
            continue
        view = views_mod._crop_view(
            frame.unsqueeze(0), box, pp.size, views_mod._INTERPOLATIONS["bilinear"]
        )
        out.append(views_mod._normalise(view.unsqueeze(0), pp)[0])
    return torch.stack(out)


def test_cli_refuses_a_frame_count_the_budget_cannot_hold(tmp_path, colour_backbone):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "red.mp4", [RGB["red"]] * 4)
    out = tmp_path / "out.jsonl"
    args = ["classify", str(folder), "--classes", ",".join(NAMES), "-o", str(out)]
    res = runner.invoke(app, [*args, "--frames", "3000000"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --frames 3000000: "), lines
    assert "512 MiB pixel budget" in lines[0] and "Traceback" not in res.output
    assert out.read_text() == ""  # the file was opened, and holds no row
    ok = runner.invoke(app, [*args, "--frames", "4", "--views", "6"])
    assert ok.exit_code == 0, ok.output


_RSS_SCRIPT = """
import resource, sys
from awt_engine.inputs import view_batches
from awt_engine.models.base import PreprocessConfig
from awt_engine.inputs.views import ViewConfig
pp = PreprocessConfig(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
def run(path, n):
    for batch in view_batches([path], pp, ViewConfig(n_views=51, frames=n), batch_size=1):
        assert batch.views.shape == (1, 51, 3, 224, 224), batch
run(sys.argv[1], 8)  # warm-up: codecs, allocator, torch kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
run(sys.argv[2], int(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB")
def test_rss_of_400_frames_of_a_720p_clip_stays_near_the_budget(tmp_path):
    """--frames 400 over 1280x720 (120 distinct frames): 400 full frames would take
    1.4 GB, so they are halved (369 MB estimated; 110 MB for the distinct ones). Before
    the fix this grew by about 800 MB (full frames plus a tensor copy of each)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    frames = [np.roll(base, 8 * i, axis=1) for i in range(120)]
    clip = write_video(tmp_path / "hd.mp4", frames, fps=30, size=(1280, 720))
    small = write_video(tmp_path / "small.mp4", frames[:4], fps=30, size=(1280, 720))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(small), str(clip), "400"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    grown_mb = int(out.stdout.split()[-1]) / 1024
    assert grown_mb < 300, out.stdout
