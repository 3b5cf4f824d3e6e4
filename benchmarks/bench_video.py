"""Video inputs: decode + views ms per video, for a 10 s and a 10 min 480p clip.

Each clip is 854 x 480 H.264 at 25 fps (libx264 from PyAV's wheel, a keyframe every
``--gop`` frames: 50 = 2 s, as streaming encodes use, and 250 = 10 s, x264's default),
with moving synthetic content. Per clip:
``decode_frames`` (seek to the keyframe before each sample time, decode forward, RGB)
for ``--frames`` frames, then ``make_video_views`` for ``--views`` views at 224 x 224,
beside the image encoder's time for those views (ViT-B-32, random weights, on
``--device``). The long clip must cost about what the short one does: decoding seeks,
it never reads the whole file. "frames held" is the bytes of decoded pixels the clip's
frames keep (``VideoFrames.nbytes``, Pillow's 4 bytes a pixel), what the 512 MiB pixel
budget bounds: frames that would not fit are reduced (awt_engine/inputs/video.py).

    uv run python benchmarks/bench_video.py [--frames 8] [--views 51] [--gop 50 250]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, timeit, today

from awt_engine.inputs import decode_frames
from awt_engine.inputs.views import ViewConfig, make_video_views

WIDTH, HEIGHT, FPS = 854, 480, 25


def synthetic_clip(path: Path, seconds: int, gop: int) -> float:
    """Encode ``seconds`` of moving gradients and a bouncing block; returns seconds taken."""
    yy, xx = np.mgrid[0:HEIGHT, 0 : 2 * WIDTH]
    base = np.stack([xx * 255.0 / (2 * WIDTH), yy * 255.0 / HEIGHT, (xx + yy) % 97 * 2.6], -1)
    base = base.astype(np.uint8)
    t0 = time.perf_counter()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(seconds * FPS):
            shift = (3 * i) % WIDTH
            frame = np.ascontiguousarray(base[:, shift : shift + WIDTH])
            top, left = (7 * i) % (HEIGHT - 80), (11 * i) % (WIDTH - 80)
            frame[top : top + 80, left : left + 80] = (255 - i % 256, i % 256, 128)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--views", type=int, default=51)
    ap.add_argument(
        "--gop",
        type=int,
        nargs="+",
        default=[50, 250],
        help="frames between keyframes (50: 2 s, as streaming encodes; 250: x264's default)",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long-minutes", type=int, default=10)
    args = ap.parse_args()

    from awt_engine.backbone import load_backbone

    device = torch.device(args.device)
    backbone = load_backbone("ViT-B-32", None, device=str(device))
    pp = backbone.preprocess
    cfg = ViewConfig(n_views=args.views, frames=args.frames)
    lengths = [("10 s", 10), (f"{args.long_minutes} min", 60 * args.long_minutes)]

    def decode(path):
        return decode_frames(path, args.frames, target_size=pp.size)

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f}"

    rows = []
    encoder = None
    with tempfile.TemporaryDirectory() as tmp:
        for gop in args.gop:
            paths = {}
            for label, seconds in lengths:
                paths[label] = Path(tmp) / f"clip_{seconds}_{gop}.mp4"
                spent = synthetic_clip(paths[label], seconds, gop)
                print(f"{label}, gop {gop}: encoded in {spent:.1f} s", file=sys.stderr)
            clips = {label: decode(p) for label, p in paths.items()}  # warm-up
            best = {(label, k): float("inf") for label in paths for k in ("decode", "views")}
            for _ in range(args.repeat):  # interleaved: both clips see the same load
                for label, path in paths.items():
                    t0 = time.perf_counter()
                    decode(path)
                    best[label, "decode"] = min(best[label, "decode"], time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    make_video_views(clips[label], pp, cfg, device=device)
                    best[label, "views"] = min(best[label, "views"], time.perf_counter() - t0)
            if encoder is None:  # the same [V, 3, R, R] for every clip
                views = make_video_views(clips[lengths[0][0]], pp, cfg, device=device)
                encoder = timeit(lambda v=views: backbone.encode_images(v), repeat=2, device=device)
            for label, seconds in lengths:
                clip, path = clips[label], paths[label]
                rows.append(
                    [
                        label,
                        f"{gop / FPS:g} s",
                        f"{path.stat().st_size / 1e6:.1f} MB",
                        f"{clip.decoded} of {seconds * FPS}",
                        clip.seeks,
                        f"{clip.nbytes / 2**20:.1f} MiB",
                        ms(best[label, "decode"]),
                        ms(best[label, "views"]),
                        f"**{ms(best[label, 'decode'] + best[label, 'views'])}**",
                        ms(encoder),
                    ]
                )
    print_table(
        f"Video inputs: ms per video ({today()})",
        [
            "clip",
            "keyframe every",
            "file",
            "frames decoded",
            "seeks",
            "frames held",
            "decode_frames",
            "make_video_views",
            "decode + views",
            f"encoder ({args.views} views)",
        ],
        rows,
        notes=[
            f"hardware: {hardware(device)}; PyAV {av.__version__}",
            f"{WIDTH} x {HEIGHT} H.264 (libx264 ultrafast, crf 28) at {FPS} fps; "
            f"{args.frames} frames sampled, {args.views} views at R = {pp.size} on {device}",
            "encoder: ViT-B-32 image tower, random weights, float32 on CPU (fp16 on CUDA), "
            "best of 2",
            f"decode and views: best of {args.repeat} runs after a warm-up, the clips interleaved",
        ],
    )


if __name__ == "__main__":
    main()
