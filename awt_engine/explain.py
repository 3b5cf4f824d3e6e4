"""Why AWT predicted what it did: one image's transport plan, weights and contributions.

AWT's score of a class is ``sum_{v,p} T[v, p] * logits[v, p]``: the transport plan T says
how much of each view (a crop of the image) was matched to each prompt (a description of
the class), and each pair adds ``T * logit`` to the score. :func:`explain` runs exactly the
classifier's scorer (the same call, with its plans kept: never a re-implementation), for
any model behind the interface, and returns an :class:`Explanation` with:

* where every view comes from in the image (its crop box) and its weight;
* for every class, its score and probability, and for the top classes the prompt texts
  with their weights, the plan ``[V, P]`` and the per-pair contributions ``[V, P]``
  (summing to the score);

and renders it as one picture (:meth:`Explanation.save` to ``.png``, matplotlib), one
self-contained HTML page (images inline) or JSON (the numbers, for scripts), or all three
into a folder (:meth:`Explanation.save_all`).

Scores are on the model's logit scale ("score (logit)"), probabilities the softmax over
the label set ("probability %"). Class names and descriptions are drawn as plain text
(a ``$`` is a dollar sign, never matplotlib mathtext). An image whose scores are not
finite (a diverged checkpoint) has nothing to explain: :func:`explain` raises ValueError.

Axes: V views, C classes, P prompts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from awt_engine._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from awt_engine._plotting import pyplot
from awt_engine.runner import NONFINITE_REASON, nonfinite_rows

# what needs matplotlib, and what does not (its ImportError says both)
_PICTURE = ("the explanation picture", ".html and .json need nothing more")


@dataclass
class ClassExplanation:
    """One class's part of the score."""

    index: int
    name: str
    score: float  # the scorer's class score (logit scale)
    probability: float  # softmax over the label set
    prompts: list[str]  # [P] the texts the prompts stand for
    prompt_weights: torch.Tensor  # [P] the column marginal of the plan
    plan: torch.Tensor  # [V, P], sums to 1
    contributions: torch.Tensor  # [V, P] plan * logits: sums to ``score``

    def top_pairs(self, n: int = 5) -> list[tuple[int, int, float]]:
        """The n (view, prompt, share of the score) pairs that add most to it."""
        flat = self.contributions.flatten()
        k = min(n, flat.numel())
        vals, idx = flat.topk(k)
        P = self.contributions.shape[1]
        total = float(self.contributions.sum())
        return [
            (int(i) // P, int(i) % P, float(v) / total if total else 0.0)
            for v, i in zip(vals, idx, strict=True)
        ]

    def prompt_totals(self) -> torch.Tensor:
        """[P] what each prompt adds to the score (summed over views)."""
        return self.contributions.sum(0)


@dataclass
class Explanation:
    source: str
    image: Image.Image  # the decoded image (reduced like the views' source when huge)
    scorer: str
    boxes: torch.Tensor  # [V, 5] (top, left, h, w, flipped) of each view in ``image``
    view_weights: torch.Tensor  # [V]
    classes: list[ClassExplanation]  # the top classes, best first
    all_scores: dict[str, float] = field(default_factory=dict)  # every class's score
    model: str = ""

    @property
    def prediction(self) -> ClassExplanation:
        return self.classes[0]

    # -- numbers ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        def rows(t: torch.Tensor) -> list:
            return [[round(float(x), 7) for x in r] for r in t.tolist()]

        return {
            "source": self.source,
            "model": self.model,
            "scorer": self.scorer,
            "image_size": list(self.image.size),
            "views": [
                {
                    "box": {"top": b[0], "left": b[1], "height": b[2], "width": b[3]},
                    "flipped": bool(b[4]),
                    "weight": float(w),
                }
                for b, w in zip(self.boxes.tolist(), self.view_weights.tolist(), strict=True)
            ],
            "scores": self.all_scores,
            "classes": [
                {
                    "name": c.name,
                    "score": c.score,
                    "probability": c.probability,
                    "prompts": [
                        {"text": t, "weight": float(w), "contribution": float(s)}
                        for t, w, s in zip(
                            c.prompts,
                            c.prompt_weights.tolist(),
                            c.prompt_totals().tolist(),
                            strict=True,
                        )
                    ],
                    "plan": rows(c.plan),
                    "contributions": rows(c.contributions),
                    "top_pairs": [
                        {"view": v, "prompt": p, "share": s} for v, p, s in c.top_pairs(8)
                    ],
                }
                for c in self.classes
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1, allow_nan=False)

    # -- pictures --------------------------------------------------------------------

    def crop(self, view: int, size: int = 96) -> Image.Image:
        """The image region view ``view`` was made from (flipped as the view was)."""
        top, left, h, w, flip = self.boxes[view].tolist()
        im = self.image.crop((left, top, left + w, top + h)).resize((size, size))
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

    def outlined(self, n: int = 12) -> Image.Image:
        """The image with the n heaviest views' crops outlined (stronger = more weight).

        Each outline is a white line inside a black border, so it shows on any image
        (a red one, a white one, a busy photo).
        """
        im = self.image.convert("RGB").copy()
        draw = ImageDraw.Draw(im, "RGBA")
        order = self.view_weights.argsort(descending=True)[:n].tolist()
        wmax = float(self.view_weights.max()) or 1.0
        line = max(1, round(min(im.size) / 150))
        edge = max(1, (line + 1) // 2)  # the black border on each side of the white line
        for v in reversed(order):  # strongest drawn last, on top
            top, left, h, w, _ = self.boxes[v].tolist()
            a = int(110 + 145 * max(0.0, float(self.view_weights[v])) / wmax)
            box = (left, top, left + w - 1, top + h - 1)
            draw.rectangle(box, outline=(0, 0, 0, a), width=line + 2 * edge)
            inner = (box[0] + edge, box[1] + edge, box[2] - edge, box[3] - edge)
            if inner[2] > inner[0] and inner[3] > inner[1]:
                draw.rectangle(inner, outline=(255, 255, 255, a), width=line)
        return im

    def outlined_caption(self, n: int) -> str:
        """What :meth:`outlined` (n) shows, with the real count."""
        total = len(self.view_weights)
        if n >= total:
            return f"all {total} crops outlined"
        return f"the {n} heaviest of {total} crops outlined"

    def figure(self, *, pairs: int = 4, prompts: int = 8):
        """One matplotlib figure: the image with its crops, the score decomposition that
        sets the two best classes apart, the view weights; then for every explained class
        (all of :attr:`classes`) the plan, the weighted descriptions, the strongest pairs."""
        plt = pyplot(*_PICTURE)
        from matplotlib.ticker import MaxNLocator

        shown = self.classes
        fig = plt.figure(figsize=(17, 4.8 * (len(shown) + 1)), constrained_layout=True)
        grid = fig.add_gridspec(len(shown) + 1, 4, width_ratios=[1.25, 1.15, 1.6, 1.4])
        ax = fig.add_subplot(grid[0, 0])
        ax.imshow(self.outlined(8))
        ax.set_title(f"{_plain(Path(self.source).name)}\n{self.outlined_caption(8)}", fontsize=10)
        ax.axis("off")
        ax = fig.add_subplot(grid[0, 1:3])
        self._decomposition(ax, prompts)
        ax = fig.add_subplot(grid[0, 3])
        v = self.view_weights.numpy()
        ax.bar(range(len(v)), v, color="#c33")
        ax.set_title("view weights\n(view 0 = the whole image)", fontsize=10)
        ax.set_xlabel("view")
        for row, c in enumerate(shown, start=1):
            ax = fig.add_subplot(grid[row, 0])
            im = ax.imshow(c.plan.numpy(), aspect="auto", cmap="magma")
            ax.set_title(
                f"{_rank(row)}: {_plain(c.name)}\nscore (logit) {c.score:.2f}, probability "
                f"{100 * c.probability:.1f}%\nplan: views x prompts",
                fontsize=10,
            )
            ax.set_xlabel("prompt")
            ax.set_ylabel("view")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax = fig.add_subplot(grid[row, 1])
            self._prompt_bars(ax, c, prompts)
            sub = grid[row, 2:4].subgridspec(1, pairs)
            for j, (view, p, share) in enumerate(c.top_pairs(pairs)):
                ax = fig.add_subplot(sub[0, j])
                ax.imshow(self.crop(view))
                ax.axis("off")
                ax.set_title(
                    f"view {view}: {100 * share:.1f}% of the score\n"
                    + _plain(_wrap(c.prompts[p], 34, 4)),
                    fontsize=8,
                )
        fig.suptitle(
            f"AWT explanation ({self.scorer}): {_plain(self.prediction.name)}, probability "
            f"{100 * self.prediction.probability:.1f}%",
            fontsize=13,
        )
        return fig

    def _prompt_bars(self, ax, c: ClassExplanation, n: int) -> None:
        order = c.prompt_weights.argsort(descending=True)[:n].tolist()
        labels = [_plain(_wrap(c.prompts[p], 48, 2)) for p in order]
        ax.barh(range(len(order)), [float(c.prompt_weights[p]) for p in order], color="#36c")
        ax.set_yticks(range(len(order)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"prompt weights (top {len(order)} of {len(c.prompts)})", fontsize=10)

    def _decomposition(self, ax, n: int) -> None:
        """Winner vs runner-up: what each of their top prompts adds to the score."""
        if len(self.classes) < 2:
            ax.axis("off")
            return
        a, b = self.classes[:2]
        rows = []
        for c, colour in ((a, "#2a7"), (b, "#999")):
            totals = c.prompt_totals()
            for p in totals.argsort(descending=True)[: n // 2].tolist():
                text = _plain(f"{c.name}: {_wrap(c.prompts[p], 50, 1)}")
                rows.append((text, float(totals[p]), colour))
        ax.barh(range(len(rows)), [r[1] for r in rows], color=[r[2] for r in rows])
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("adds to the class score (logit)")
        ax.set_title(
            f"why {_plain(a.name)} (score {a.score:.2f}) beat {_plain(b.name)} (score "
            f"{b.score:.2f}), gap {a.score - b.score:.2f} (logit)\nwhat each class's top "
            "prompts add to its score (summed over views)",
            fontsize=10,
        )

    def png_bytes(self, dpi: int = 90) -> bytes:
        plt = pyplot(*_PICTURE)
        fig = self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        return buf.getvalue()

    def to_html(self, *, pairs: int = 6, prompts: int = 10) -> str:
        """One self-contained page (images inline) with the picture's content."""

        def img_tag(im: Image.Image, width: int) -> str:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            return f'<img width="{width}" src="data:image/png;base64,{data}">'

        e = html.escape
        n_out = 12
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>AWT explanation: {e(Path(self.source).name)}</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
            "table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:left;vertical-align:top}.bar{background:#36c;height:10px}"
            ".pair{display:inline-block;width:170px;margin:4px;vertical-align:top;"
            "font-size:12px}</style></head><body>",
            f"<h1>{e(self.prediction.name)}: probability "
            f"{100 * self.prediction.probability:.1f}%</h1>",
            f"<p>{e(self.source)} &middot; scorer {e(self.scorer)} &middot; {e(self.model)}</p>",
            "<p>Scores are on the model's logit scale; probabilities are their softmax over "
            "the label set.</p>",
            img_tag(self.outlined(n_out), 420),
            f"<p>{e(self.outlined_caption(n_out)).capitalize()} (stronger outline, more "
            "weight).</p>",
        ]
        if len(self.classes) >= 2:
            a, b = self.classes[:2]
            parts.append(
                f"<h2>Why {e(a.name)} and not {e(b.name)}</h2><p>score (logit) {a.score:.3f} "
                f"vs {b.score:.3f} (gap {a.score - b.score:.3f}). What each prompt adds:</p>"
            )
            parts.append("<table><tr><th>class</th><th>prompt</th><th>adds (logit)</th></tr>")
            for c in (a, b):
                totals = c.prompt_totals()
                for p in totals.argsort(descending=True)[: prompts // 2].tolist():
                    parts.append(
                        f"<tr><td>{e(c.name)}</td><td>{e(c.prompts[p])}</td>"
                        f"<td>{float(totals[p]):.3f}</td></tr>"
                    )
            parts.append("</table>")
        for c in self.classes:
            parts.append(
                f"<h2>{e(c.name)}: score (logit) {c.score:.3f}, probability "
                f"{100 * c.probability:.2f}%</h2><h3>Strongest (crop, prompt) pairs</h3>"
            )
            for view, p, share in c.top_pairs(pairs):
                parts.append(
                    f"<div class='pair'>{img_tag(self.crop(view), 160)}<br>view {view}, "
                    f"{100 * share:.1f}% of the score<br>{e(c.prompts[p])}</div>"
                )
            parts.append("<h3>Prompt weights</h3><table><tr><th>weight</th><th></th>")
            parts.append("<th>prompt</th></tr>")
            wmax = float(c.prompt_weights.max()) or 1.0
            for p in c.prompt_weights.argsort(descending=True)[:prompts].tolist():
                w = float(c.prompt_weights[p])
                parts.append(
                    f"<tr><td>{w:.3f}</td><td><div class='bar' style='width:"
                    f"{int(200 * w / wmax)}px'></div></td><td>{e(c.prompts[p])}</td></tr>"
                )
            parts.append("</table>")
        parts.append("<h3>All classes</h3><table><tr><th>class</th><th>score (logit)</th>")
        parts.append("<th>probability %</th></tr>")
        names = list(self.all_scores)
        probs = torch.softmax(torch.tensor([self.all_scores[n] for n in names]), -1).tolist()
        ranked = sorted(zip(names, probs, strict=True), key=lambda kv: -self.all_scores[kv[0]])
        for name, prob in ranked[:20]:
            parts.append(
                f"<tr><td>{e(name)}</td><td>{self.all_scores[name]:.3f}</td>"
                f"<td>{100 * prob:.2f}</td></tr>"
            )
        parts.append("</table></body></html>")
        return "\n".join(parts)

    def save(self, path: str | Path) -> Path:
        """Write the picture (.png), the page (.html) or the numbers (.json)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".png":
            atomic_write_bytes(path, self.png_bytes())
        elif suffix in (".html", ".htm"):
            atomic_write_text(path, self.to_html())
        elif suffix == ".json":
            atomic_write_json(path, self.to_dict())
        else:
            raise ValueError(f"{path}: write an explanation as .png, .html or .json")
        return path

    def save_all(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """The picture, the page and the numbers in ``folder`` (made if need be), as
        ``<stem>.explain.png``, ``.html`` and ``.json``; ``stem`` defaults to the image
        file's. Everything is rendered before the first file is written."""
        folder = Path(folder)
        if stem is None:
            stem = Path(self.source).stem if self.source != "<image>" else "explanation"
        png, page, data = self.png_bytes(), self.to_html(), self.to_dict()
        paths = [folder / f"{stem}.explain{ext}" for ext in (".png", ".html", ".json")]
        atomic_write_bytes(paths[0], png)
        atomic_write_text(paths[1], page)
        atomic_write_json(paths[2], data)
        return paths


def _class_explanation(c, out, logits_c, scores, probs, name, prompts, source):
    """Class c's part of image 0's score, from the scorer's output and its logits [V, P]."""
    plan = out.plans[0, c].cpu().double()  # [V, P]; float64 on the CPU (MPS has none)
    contrib = (plan * logits_c).float()
    weights = out.prompt_weights[0, c].cpu().float()
    if not all(torch.isfinite(t).all() for t in (plan, contrib, weights)):
        raise ValueError(f"{source}: {NONFINITE_REASON}; there is nothing to explain")
    return ClassExplanation(
        index=c,
        name=name,
        score=float(scores[c]),
        probability=float(probs[c]),
        prompts=prompts,
        prompt_weights=weights,
        plan=plan.float(),
        contributions=contrib,
    )


def _plain(text: str) -> str:
    """``text`` drawn as is by matplotlib: every ``$`` escaped, so a class named
    ``$\\frac{$`` is never read as mathtext (matplotlib shows ``\\$`` as ``$``)."""
    return text.replace("$", r"\$")


def _rank(row: int) -> str:
    return {1: "prediction", 2: "runner-up"}.get(row, f"#{row}")


def _wrap(text: str, width: int, lines: int) -> str:
    words, out, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    out.append(cur)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1] + "…"
    return "\n".join(out)


def _views(rgb, model, cfg, source: str) -> torch.Tensor:
    """The image's views [1, V, 3, R, R], from the one input pipeline (``view_batches``)
    as classify makes them; ValueError naming ``source`` when none can be made."""
    from awt_engine.inputs import Failure, view_batches

    (item,) = view_batches(
        [rgb], model.preprocess, cfg, batch_size=1, workers=1, device=model.device
    )
    if isinstance(item, Failure):
        raise ValueError(f"{source}: {item.reason}")
    return item.views


def explain(clf, image, *, top_k: int = 2) -> Explanation:
    """Explain ``clf``'s scores for one image (path, PIL image, array or tensor).

    Raises ValueError for a scorer without a plan, a video, or scores that are not finite
    (nothing to explain: a diverged checkpoint, say).
    """
    from awt_engine.inputs import as_rgb_image, is_video_path, view_boxes

    s = clf.scorer
    if not s.explains:
        raise ValueError(
            f"explain shows AWT's transport plan; the {s.name!r} scorer has none: use awt, "
            "awt-uniform or awt-no-transport"
        )
    model = clf.model
    source = str(image) if isinstance(image, str | Path) else "<image>"
    if isinstance(image, str | Path) and is_video_path(image):
        raise ValueError(f"{source}: explain takes images; videos are not explained yet")
    rgb = as_rgb_image(image, target_size=model.preprocess.size)  # what the views see
    cfg = clf.view_config
    views = _views(rgb, model, cfg, source)  # [1, V, 3, R, R]
    boxes = view_boxes(rgb, model.preprocess, cfg)  # [V, 5]
    runner = clf.runner_for([s])
    labels = runner.labels
    output = runner.outputs(views)
    out = runner.score(output, (0,), explain=True)[s.name]  # the scorer's own call, plans kept
    logits = output.pair_logits(0)  # [C, V, P] float64 on the CPU
    scores = out.scores[0].float().cpu()  # [C]
    view_weights = out.view_weights[0].cpu().float()
    if nonfinite_rows(scores[None], clf.shortlist)[0] or not torch.isfinite(view_weights).all():
        raise ValueError(f"{source}: {NONFINITE_REASON}; there is nothing to explain")
    probs = torch.softmax(scores, dim=-1)
    k = max(1, min(top_k, int(torch.isfinite(scores).sum())))  # shortlisted classes only
    texts = labels.prompt_texts()
    explained = [
        _class_explanation(c, out, logits[c], scores, probs, labels.classes[c], texts[c], source)
        for c in scores.topk(k).indices.tolist()
    ]
    return Explanation(
        source=source,
        image=rgb,
        scorer=s.name,
        boxes=boxes,
        view_weights=view_weights,
        classes=explained,
        # every class's score; with a shortlist, the shortlisted classes' (the rest are -inf)
        all_scores={
            n: float(x)
            for n, x in zip(labels.classes, scores.tolist(), strict=True)
            if x != float("-inf")
        },
        model=getattr(model, "identity", ""),
    )


__all__ = ["ClassExplanation", "Explanation", "explain"]
