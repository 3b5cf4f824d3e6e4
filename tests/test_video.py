"""Videos as inputs: frame sampling by seeking, views, known answers, bad files.

Every video is made here with PyAV (synthetic solid-colour frames, a fraction of a second
each), so the frame shown at each sample time is known.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine import backbone as backbone_mod
from awt_engine.cli import app
from awt_engine.inputs import (
    VIDEO_EXTENSIONS,
    ImageDecodeError,
    decode_frames,
    decode_images,
    find_images,
    sample_times,
)
from awt_engine.inputs.views import (
    ViewConfig,
    image_to_tensor,
    make_video_views,
    make_views,
    video_view_boxes,
)
from awt_engine.labelled import load_labelled
from tests.fixtures_embedders import COLOURS, ColourBackbone, ColourEmbedder, solid

av = pytest.importorskip("av")

runner = CliRunner()
NAMES = ["red", "green", "blue", "yellow"]
RGB = {name: tuple(int(255 * c) for c in rgb) for name, rgb in COLOURS.items()}
# Frame i of an indexed clip has colour PALETTE[i]: levels 64 apart in each channel, so
# the decoded frame is identified however the codec rounds (errors are < 16 levels).
PALETTE = [tuple(64 * d for d in digits) for digits in itertools.product(range(4), repeat=3)]
ENCODERS = {  # extension -> (codec, options): the fast encoders of PyAV's wheel
    ".mp4": ("libx264", {"preset": "ultrafast"}),
    ".mkv": ("libx264", {"preset": "ultrafast"}),
    ".mov": ("libx264", {"preset": "ultrafast"}),
    ".avi": ("mpeg4", {}),
    ".webm": ("libvpx", {"deadline": "realtime", "cpu-used": "8"}),
}


def write_video(path, colours, *, fps=10, size=(32, 24), gop=None, options=None, rotation=0):
    """Encode one solid frame per entry of ``colours`` (RGB tuples or arrays [H, W, 3])."""
    path = Path(path)
    codec, opts = ENCODERS[path.suffix]
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = opts
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        frame = np.empty((size[1], size[0], 3), np.uint8)
        for colour in colours:
            frame[:] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_index(image) -> int:
    """The PALETTE index of a decoded solid frame (nearest colour)."""
    pixel = np.asarray(image, dtype=np.float64)[image.height // 2, image.width // 2]
    return int(np.argmin([np.abs(pixel - np.array(c)).sum() for c in PALETTE]))


def colour_of(image) -> str:
    pixel = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    return min(RGB, key=lambda n: np.abs(pixel - np.array(RGB[n])).sum())


@pytest.fixture
def colour_backbone(monkeypatch):
    made = []

    def fake_load(model, pretrained=None, **kw):
        bb = ColourBackbone()
        made.append(bb)
        return bb

    monkeypatch.setattr(backbone_mod, "load_backbone", fake_load)
    return made


# --------------------------------------------------------------------------- sampling


def test_sample_times_are_the_centres_of_equal_segments():
    assert sample_times(10.0, 4) == [1.25, 3.75, 6.25, 8.75]
    assert sample_times(3.0, 1) == [1.5]
    assert sample_times(0.0, 3) == [0.0, 0.0, 0.0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="frames"):
            sample_times(1.0, bad)


@pytest.mark.parametrize("ext", sorted(VIDEO_EXTENSIONS))
def test_decode_frames_shows_the_first_frame_at_or_after_each_sample_time(tmp_path, ext):
    fps, count, n = 10, 40, 8
    path = write_video(tmp_path / f"clip{ext}", PALETTE[:count], fps=fps, gop=12)
    clip = decode_frames(path, n)
    assert clip.duration == pytest.approx(count / fps)
    assert clip.sample_times == pytest.approx([(k + 0.5) * 4.0 / n for k in range(n)])
    # Independently: frame i is shown from i / fps, so the first at or after t is ceil(t*fps).
    expected = [math.ceil(t * fps - 1e-9) for t in clip.sample_times]
    assert [frame_index(f) for f in clip.frames] == expected
    assert clip.times == pytest.approx([i / fps for i in expected])
    assert all(f.mode == "RGB" and f.size == (32, 24) for f in clip.frames)
    assert clip.decoded < count  # the last frames are never reached


def test_variable_frame_rate_uses_timestamps(tmp_path):
    path = tmp_path / "vfr.mkv"
    shown_at_ms = [0, 100, 200, 300, 4000, 4100, 9000, 9500]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(shown_at_ms):
            frame = av.VideoFrame.from_ndarray(
                np.full((24, 32, 3), PALETTE[i], np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    clip = decode_frames(path, 4)
    ends = clip.duration
    assert ends == pytest.approx(9.6, abs=0.11)  # the last frame's end
    expected = [
        next(i for i, ms in enumerate(shown_at_ms) if ms / 1000 >= t) for t in clip.sample_times
    ]
    assert [frame_index(f) for f in clip.frames] == expected


def test_duration_of_a_stream_without_one_is_measured(tmp_path):
    # Matroska "live" mode writes no duration, no frame count and no cues.
    path = write_video(tmp_path / "live.mkv", PALETTE[:30], fps=10, options={"live": "1"})
    with av.open(str(path)) as c:
        assert c.streams.video[0].duration is None and c.duration is None
    clip = decode_frames(path, 3)
    assert clip.duration == pytest.approx(3.0)
    assert [frame_index(f) for f in clip.frames] == [5, 15, 25]


def test_frames_ending_before_a_container_duration_are_the_videos_end(tmp_path, monkeypatch):
    """Sound may outlast the picture: an early end against the container's duration is
    the video's end (sampled again over it); against the video's own, truncation."""
    from awt_engine.inputs import video as video_mod

    path = tmp_path / "with_sound.mkv"
    with av.open(str(path), "w") as out:
        picture = out.add_stream("libx264", rate=10)
        picture.width, picture.height, picture.pix_fmt = 32, 24, "yuv420p"
        sound = out.add_stream("aac", rate=16000)
        for i in range(20):  # 2 s of picture
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), PALETTE[i], np.uint8))
            for packet in picture.encode(frame):
                out.mux(packet)
        silence = av.AudioFrame.from_ndarray(
            np.zeros((1, 16000), np.float32), format="fltp", layout="mono"
        )
        silence.sample_rate = 16000
        for packet in [*picture.encode(), *sound.encode(silence), *sound.encode()]:
            out.mux(packet)
    monkeypatch.setattr(video_mod.OpenedVideo, "duration", lambda self: (4.0, False))
    clip = decode_frames(path, 4)
    assert clip.duration == pytest.approx(2.0)
    assert [frame_index(f) for f in clip.frames] == [3, 8, 13, 18]
    monkeypatch.setattr(video_mod.OpenedVideo, "duration", lambda self: (4.0, True))
    with pytest.raises(ImageDecodeError, match=r"truncated .* frames end at 2.00 s of the 4.00 s"):
        decode_frames(path, 4)


def test_display_rotation_is_applied(tmp_path):
    left_red = np.zeros((24, 32, 3), np.uint8)
    left_red[:, :16], left_red[:, 16:] = RGB["red"], RGB["blue"]
    path = write_video(tmp_path / "phone.mp4", [left_red] * 4, rotation=90)
    frame = decode_frames(path, 1).frames[0]
    # 90 degrees counter-clockwise: the stored right half (blue) is shown on top.
    assert frame.size == (24, 32)
    assert colour_of(frame.crop((0, 0, 24, 12))) == "blue"
    assert colour_of(frame.crop((0, 20, 24, 32))) == "red"


def test_anamorphic_frames_get_square_pixels(tmp_path):
    path = tmp_path / "wide_pixels.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)  # each pixel twice as wide
        frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), RGB["red"], np.uint8))
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    image = decode_frames(path, 1).frames[0]
    assert image.size == (64, 24) and colour_of(image) == "red"


def test_enormous_frames_are_reduced_like_huge_images(tmp_path):
    path = write_video(tmp_path / "big.mp4", [RGB["green"]] * 3, size=(96, 64))
    assert decode_frames(path, 2, target_size=2).frames[0].size == (96 // 2, 64 // 2)
    assert decode_frames(path, 2, target_size=4).frames[0].size == (96, 64)  # 64 < 32 * 4


# --------------------------------------------------------------------------- long videos

_LONG_SCRIPT = """
import resource, sys, time
from awt_engine.inputs import decode_frames
decode_frames(sys.argv[1], 8)  # warm up: codecs, allocator
unit = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, else KiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
clip = decode_frames(sys.argv[2], 8)
seconds = time.perf_counter() - t0
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // unit
print(clip.decoded, clip.seeks, round(clip.duration), grown, seconds)
"""


def test_a_long_video_is_sought_through_not_decoded_whole(tmp_path):
    """10 minutes at 5 fps (3000 frames, a keyframe every 10 s): 8 frames cost about what
    a 10 s clip's do, in frames decoded, memory and time."""
    fps, gop = 5, 50
    long_colours = [PALETTE[(i // 10) % len(PALETTE)] for i in range(600 * fps)]
    long = write_video(tmp_path / "long.mp4", long_colours, fps=fps, size=(64, 48), gop=gop)
    short = write_video(tmp_path / "short.mp4", long_colours[: 10 * fps], fps=fps, size=(64, 48))

    def timed(path):
        best = float("inf")
        for _ in range(2):  # the better of two: other processes share these cores
            t0 = time.perf_counter()
            clip = decode_frames(path, 8)
            best = min(best, time.perf_counter() - t0)
        return clip, best

    short_clip, short_s = timed(short)
    clip, long_s = timed(long)
    assert clip.duration == pytest.approx(600.0)
    # Each sample decodes from the keyframe before it: at most one keyframe interval each.
    assert clip.seeks == 8
    assert clip.decoded <= 8 * (gop + 1) < len(long_colours) // 5
    expected = [math.ceil(t * fps - 1e-9) // 10 % len(PALETTE) for t in clip.sample_times]
    assert [frame_index(f) for f in clip.frames] == expected
    assert long_s < 10 * short_s + 0.5, (long_s, short_s)
    assert short_clip.decoded <= 2 * 10 * fps  # at worst one re-read of the short clip

    # Peak memory in a fresh process: decoding the long clip's 8 frames holds a few
    # frames, not the 3000 (37 MB as RGB images, 14 MB even as YUV).
    if sys.platform == "win32":
        return  # no resource module
    out = subprocess.run(
        [sys.executable, "-c", _LONG_SCRIPT, str(short), str(long)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    decoded, seeks, duration, grown_kb, _seconds = out.stdout.split()
    assert int(decoded) <= 8 * (gop + 1) and int(seeks) == 8 and int(duration) == 600
    assert int(grown_kb) < 10 * 1024, out.stdout


# --------------------------------------------------------------------------- views


def test_video_views_are_the_frames_then_crops_of_random_frames(tmp_path):
    path = write_video(tmp_path / "clip.mp4", PALETTE[:20], fps=10, size=(40, 24))
    clip = decode_frames(path, 5)
    pp = ColourEmbedder.preprocess
    cfg = ViewConfig(n_views=12, frames=5)
    views = make_video_views(clip, pp, cfg)
    assert views.shape == (12, 3, pp.size, pp.size)

    # View 0: the middle frame (index 5 // 2 = 2) exactly as an image's view 0; views
    # 1..4: the other frames, in time order, the same way.
    one = ViewConfig(n_views=1)
    for k, i in enumerate([2, 0, 1, 3, 4]):
        torch.testing.assert_close(views[k], make_views(clip.frames[i], pp, one)[0], rtol=0, atol=0)

    # Views 5..11: crops, each of the frame its box names, rendered as the box says.
    boxes = video_view_boxes(clip, cfg)
    assert boxes.shape == (12, 6)
    assert boxes[:5, 0].tolist() == [2, 0, 1, 3, 4]
    assert boxes[:5, 1:].tolist() == [[0, 8, 24, 24, 0]] * 5  # the centre square
    for k in range(5, 12):
        i, top, left, h, w, _flip = boxes[k].tolist()
        assert 0 <= i < 5 and 0 < h <= 24 and 0 < w <= 40
        crop = image_to_tensor(clip.frames[i])[:, top : top + h, left : left + w].float() / 255
        # a solid frame: every crop is the frame's colour, whatever the box
        expected = crop.mean(dim=(1, 2))
        torch.testing.assert_close(views[k].mean(dim=(1, 2)), expected, atol=2 / 255, rtol=0)
    # A crop's frame, box and flip do not depend on how many views are made.
    more = video_view_boxes(clip, ViewConfig(n_views=20, frames=5))
    assert torch.equal(more[:12], boxes)
    # Fewer views than frames: the first frame views only, nothing random.
    assert video_view_boxes(clip, ViewConfig(n_views=3, frames=5))[:, 0].tolist() == [2, 0, 1]
    # Every view a crop (training's raw_view=False).
    crops = video_view_boxes(clip, ViewConfig(n_views=6, frames=5, raw_view=False))
    assert crops.shape == (6, 6) and len(set(crops[:, 0].tolist())) > 1


def test_video_views_depend_on_content_and_seed_only(tmp_path):
    colours = [PALETTE[i] for i in (3, 9, 17, 30, 41, 50)]
    (tmp_path / "copy").mkdir()
    a = write_video(tmp_path / "a.mp4", colours, size=(48, 32))
    b = write_video(tmp_path / "copy" / "b.mp4", colours, size=(48, 32))
    cfg = ViewConfig(n_views=10, frames=6)
    pp = ColourEmbedder.preprocess
    va = make_video_views(decode_frames(a, 6), pp, cfg)
    vb = make_video_views(decode_frames(b, 6), pp, cfg)
    assert torch.equal(va, vb)  # same content elsewhere: same views
    boxes = video_view_boxes(decode_frames(a, 6), cfg)
    other_seed = video_view_boxes(decode_frames(a, 6), ViewConfig(n_views=10, frames=6, seed=1))
    assert torch.equal(boxes[:6], other_seed[:6]) and not torch.equal(boxes, other_seed)


def test_frames_setting_is_validated_and_keys_the_view_config():
    with pytest.raises(ValueError, match="frames"):
        ViewConfig(frames=0)
    assert ViewConfig().frames == 8
    clf = awt_engine.create_classifier(classes=NAMES, embedder=ColourEmbedder(), frames=3)
    assert clf.view_config.frames == 3


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def colour_videos(tmp_path):
    """One solid-colour clip per container, and a PNG."""
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    truth = {}
    for (name, ext), length in zip(
        [
            ("red", ".mp4"),
            ("green", ".avi"),
            ("blue", ".mkv"),
            ("yellow", ".webm"),
            ("green", ".mov"),
        ],
        [12, 20, 9, 15, 11],
        strict=True,
    ):
        path = write_video(folder / "sub" / f"{name}{ext}", [RGB[name]] * length, size=(30, 20))
        truth[str(path)] = name
    image = folder / "yellow.png"
    solid("yellow").save(image)
    truth[str(image)] = "yellow"
    return folder, truth


def test_cli_classifies_a_mixed_folder_of_videos_and_images(
    colour_videos, colour_backbone, tmp_path
):
    folder, truth = colour_videos
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(
        app,
        [
            *("classify", str(folder), "--classes", ",".join(NAMES)),
            *("--template", "a photo of a {}", "--views", "12", "--frames", "8"),
            *("--batch-size", "3", "-o", str(out)),
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [ln.split("\t") for ln in res.stdout.strip().splitlines()]
    assert {p: label for p, label, _ in lines} == truth
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["path"]: r["predictions"][0]["label"] for r in rows} == truth
    assert max(colour_backbone[-1].image_batches) == 3 * 12  # 3 inputs' views per pass


def test_the_clip_scorer_sees_the_middle_frame(tmp_path):
    path = write_video(tmp_path / "red_then_blue.mp4", [RGB["red"]] * 10 + [RGB["blue"]] * 10)
    assert [colour_of(f) for f in decode_frames(path, 4).frames] == ["red", "red", "blue", "blue"]
    # One view (the clip scorer's): the middle of 8 frames, index 4, at 56% of the clip.
    clf = awt_engine.create_classifier(classes=NAMES, embedder=ColourEmbedder(), scorer="clip")
    assert clf.view_config.n_views == 1
    assert clf.predict(str(path))[0]["label"] == "blue"
    # With 3 frames the middle one is at 50%: the 11th frame, blue; with 1 frame too.
    for frames in (3, 1):
        clf = awt_engine.create_classifier(
            classes=NAMES, embedder=ColourEmbedder(), scorer="clip", frames=frames
        )
        assert clf.predict(str(path))[0]["label"] == "blue"


def test_scores_do_not_depend_on_batch_or_order(tmp_path):
    paths = []
    for i, name in enumerate(["red", "blue", "green"]):
        colours = [RGB[name]] * 6 + [PALETTE[7 * i + k] for k in range(6)]  # some texture
        paths.append(str(write_video(tmp_path / f"{i}.mp4", colours, size=(36 + 4 * i, 24))))
    image = tmp_path / "img.png"
    solid("yellow", (20, 30)).save(image)
    paths.insert(2, str(image))
    kw = dict(classes=NAMES, embedder=ColourEmbedder(), views=9, frames=4)
    a = awt_engine.create_classifier(batch_size=4, **kw).scores(paths)
    b = awt_engine.create_classifier(batch_size=1, workers=1, **kw).scores(paths[::-1]).flip(0)
    alone = torch.cat([awt_engine.create_classifier(**kw).scores([p]) for p in paths])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a, alone, rtol=1e-6, atol=1e-5)


def test_eval_on_class_folders_of_videos_uses_the_image_cache(tmp_path, colour_backbone):
    root = tmp_path / "data"
    for name, ext in [("red", ".mp4"), ("green", ".avi"), ("blue", ".mkv")]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            write_video(root / name / f"clip{i}{ext}", [RGB[name]] * (8 + i), size=(24 + 2 * i, 16))
    args = ["eval", "--data-root", str(root), "--classes", "red,green,blue"]
    args += ["--template", "a photo of a {}", "--views", "10", "--cache-dir", str(tmp_path / "c")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "100.00%" in res.stdout and "6 images" in res.stderr
    assert colour_backbone[-1].image_batches  # encoded
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and not colour_backbone[-1].image_batches  # all cached
    res = runner.invoke(app, [*args, "--frames", "4"])  # another view setting: recomputed
    assert res.exit_code == 0 and colour_backbone[-1].image_batches


def test_ucf101_download_layout_reads_class_folders_of_videos(tmp_path):
    base = tmp_path / "data" / "UCF-101"
    for folder, clip in [
        ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi"),
        ("YoYo", "v_YoYo_g02_c03.avi"),
    ]:
        (base / folder).mkdir(parents=True)
        (base / folder / clip).write_bytes(b"never opened by the layout reader")
    for root in (base, base.parent):  # --data-root ~/data/UCF-101, or its parent
        data = load_labelled(root, dataset="ucf101")
        assert len(data.classes) == 101
        got = {
            p.name: data.classes[label] for p, label in ((it.path, it.label) for it in data.items)
        }
        assert got == {
            "v_ApplyEyeMakeup_g01_c01.avi": "Apply_Eye_Makeup",
            "v_YoYo_g02_c03.avi": "Yo_Yo",
        }


# --------------------------------------------------------------------------- bad inputs


def bad_videos(folder: Path) -> dict[str, str]:
    """{file name: a phrase its error must contain} (written under ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    # An MP4 cut in half: its index (at the end) is gone.
    cut = write_video(folder / "cut.mp4", PALETTE[:40])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    expected["cut.mp4"] = "corrupt"
    # A Matroska file cut after 40%: its header's duration outlasts its frames.
    short = write_video(folder / "short.mkv", PALETTE[:60])
    short.write_bytes(short.read_bytes()[: short.stat().st_size * 2 // 5])
    expected["short.mkv"] = "truncated"
    # A video stream without a single frame.
    with av.open(str(folder / "empty.avi"), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        out.start_encoding()
    expected["empty.avi"] = "no frames"
    # Sound only: a second of a 440 Hz sine in AAC, in an MP4.
    with av.open(str(folder / "sound.mp4"), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        sine = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(sine[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    expected["sound.mp4"] = "audio only"
    # A codec FFmpeg does not know: an AVI whose four-character code is made up.
    avi = write_video(folder / "odd.avi", PALETTE[:5]).read_bytes()
    assert avi.count(b"FMP4") == 2
    (folder / "odd.avi").write_bytes(avi.replace(b"FMP4", b"ZQZQ"))
    expected["odd.avi"] = "unsupported codec"
    (folder / "notes.webm").write_text("these are my notes, not a video\n" * 20)
    expected["notes.webm"] = "not a video"
    (folder / "zero.mov").write_bytes(b"")
    expected["zero.mov"] = "empty file"
    return expected


def test_decode_frames_names_each_bad_file_and_why(tmp_path):
    for name, phrase in bad_videos(tmp_path).items():
        with pytest.raises(ImageDecodeError) as err:
            decode_frames(tmp_path / name, 8)
        assert err.value.path == str(tmp_path / name)
        assert phrase in err.value.reason, (name, err.value.reason)


def test_cli_bad_videos_are_error_rows_and_the_rest_is_classified(tmp_path, colour_backbone):
    folder = tmp_path / "in"
    expected = bad_videos(folder)
    write_video(folder / "good.mp4", [RGB["green"]] * 10)
    solid("red").save(folder / "good.png")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(
        app,
        ["classify", str(folder), "--classes", ",".join(NAMES), "--views", "4", "-o", str(out)],
    )
    assert res.exit_code == 1, res.output
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["good.mp4"]["predictions"][0]["label"] == "green"
    assert rows["good.png"]["predictions"][0]["label"] == "red"
    for name, phrase in expected.items():
        assert phrase in rows[name]["error"], (name, rows[name])
        assert f"error: {folder / name}: " in res.stderr
    assert f"{len(expected)} of {len(expected) + 2} input(s) could not be classified" in res.stderr


def test_decode_images_takes_videos_only_when_asked(tmp_path):
    clip = write_video(tmp_path / "v.mp4", [RGB["blue"]] * 6)
    solid("red").save(tmp_path / "i.png")
    assert [p.name for p in find_images([tmp_path]).images] == ["i.png", "v.mp4"]
    plain = list(decode_images([clip, tmp_path / "i.png"]))
    assert not plain[0].ok and "video" in plain[0].error and plain[1].ok
    for workers in (1, 2):
        # 3 frames of 32x24 (9216 bytes) fit beside the decoder's estimate reserved at
        # half the budget, not beside all of it (12288 bytes): decoded alone
        items = list(decode_images([clip], frames=3, workers=workers, pixel_budget=20_000))
        assert items[0].is_video and len(items[0].image) == 3
        assert items[0].image.size == (32, 24)
        (refused,) = decode_images([clip], frames=3, workers=workers, pixel_budget=1)
        assert "--frames 3: 3 frames of 32x24 do not fit" in refused.error  # never held


def test_missing_pyav_is_an_error_row_with_the_install_hint(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "v.mp4", [RGB["blue"]] * 4)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails
    (item,) = decode_images([clip], frames=2)
    assert "uv sync --extra video" in item.error and "awt-engine[video]" in item.error


def test_explain_refuses_a_video_clearly(tmp_path):
    clip = write_video(tmp_path / "v.mp4", [RGB["blue"]] * 4)
    clf = awt_engine.create_classifier(classes=NAMES, embedder=ColourEmbedder(), views=3)
    with pytest.raises(ValueError, match=r"v\.mp4: explain takes images"):
        clf.explain(str(clip))
