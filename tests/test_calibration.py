"""Calibration metrics (awt_engine.calibration) against plain-Python float64 references,
known answers, edge cases, and the eval JSON end to end."""

import itertools
import json
import math
import random
from fractions import Fraction

import pytest
import torch
from PIL import Image

import awt_engine
from awt_engine.calibration import (
    CONF,
    P_FLOOR,
    calibration_metrics,
    image_terms,
    max_prob,
    ood_metrics,
)
from awt_engine.evaluate import compute_metrics, evaluate, result_records, write_results
from awt_engine.labelled import LabelledData, LabelledItem
from tests.fixtures_embedders import ColourEmbedder, solid

NAMES = ("ece", "ece_adaptive", "nll", "brier", "aurc")


# -- references: plain Python loops over images and bins ---------------------------------


def ref_rows(probs, labels):
    """[(conf, correct, p_true, brier)] from lists of probabilities (argmax: first max)."""
    rows = []
    for p, y in zip(probs, labels, strict=True):
        pred = max(range(len(p)), key=lambda c: (p[c], -c))
        brier = sum((p[c] - (1.0 if c == y else 0.0)) ** 2 for c in range(len(p)))
        rows.append((p[pred], 1.0 if pred == y else 0.0, p[y], brier))
    return rows


def ref_ece(rows, n_bins=15):
    bins = [[] for _ in range(n_bins)]
    for conf, ok, _, _ in rows:
        for b in range(n_bins):
            if b < conf * n_bins <= b + 1 or (b == 0 and conf * n_bins <= 0):
                bins[b].append((conf, ok))
    total = 0.0
    for members in bins:
        if members:
            acc = sum(ok for _, ok in members) / len(members)
            conf = sum(c for c, _ in members) / len(members)
            total += len(members) / len(rows) * abs(acc - conf)
    return total


def ref_ece_adaptive(rows, n_bins=15):
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], i))
    n_groups = min(n_bins, len(rows))
    total, start = 0.0, 0
    for g in range(n_groups):
        size = len(rows) // n_groups + (1 if g < len(rows) % n_groups else 0)
        members = [rows[i] for i in order[start : start + size]]
        start += size
        acc = sum(r[1] for r in members) / size
        conf = sum(r[0] for r in members) / size
        total += size / len(rows) * abs(acc - conf)
    assert start == len(rows)
    return total


def ref_aurc_one_order(confs_errs):
    """AURC of one ordering [(conf, err)], highest confidence first."""
    errors, total = 0.0, 0.0
    for k, (_, err) in enumerate(confs_errs, start=1):
        errors += err
        total += errors / k
    return total / len(confs_errs)


def ref_aurc(rows):
    """Ties: the mean over every order of the tied images (brute force, small N only)."""
    pairs = [(r[0], 1.0 - r[1]) for r in rows]
    groups = {}
    for p in pairs:
        groups.setdefault(p[0], []).append(p)
    keys = sorted(groups, reverse=True)
    perms = [list(itertools.permutations(groups[k])) for k in keys]
    values = [
        ref_aurc_one_order([p for grp in combo for p in grp]) for combo in itertools.product(*perms)
    ]
    return sum(values) / len(values)


def reference(probs, labels):
    rows = ref_rows(probs, labels)
    return {
        "ece": ref_ece(rows),
        "ece_adaptive": ref_ece_adaptive(rows),
        "nll": sum(-math.log(max(r[2], P_FLOOR)) for r in rows) / len(rows),
        "brier": sum(r[3] for r in rows) / len(rows),
        "aurc": ref_aurc(rows),
    }


def check(scores, labels):
    """The module's metrics of ``scores`` equal the reference on the same float32 softmax."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels)
    probs = torch.softmax(scores, dim=-1).double().tolist()
    got = calibration_metrics(image_terms(scores, labels))
    want = reference(probs, labels.tolist())
    for name in NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name
    return got


def logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


# -- known answers -------------------------------------------------------------------------


def test_perfectly_calibrated_has_zero_ece():
    # 10 images at confidence 0.8, 8 of them right: acc = conf in the one bin
    probs = [[0.8, 0.2]] * 10
    labels = [0] * 8 + [1] * 2
    got = check(logits(probs), labels)
    assert got["ece"] == pytest.approx(0.0, abs=1e-6)
    assert got["ece_adaptive"] > 0  # equal-mass bins split the 8 right from the 2 wrong


def test_always_wrong_and_confident_has_ece_equal_to_confidence():
    probs = [[0.9, 0.05, 0.05]] * 7
    got = check(logits(probs), [1] * 7)
    assert got["ece"] == pytest.approx(0.9, abs=1e-6)
    assert got["ece_adaptive"] == pytest.approx(0.9, abs=1e-6)
    assert got["aurc"] == pytest.approx(1.0)
    assert got["nll"] == pytest.approx(-math.log(0.05), rel=1e-6)
    assert got["brier"] == pytest.approx(0.9**2 + 0.95**2 + 0.05**2, rel=1e-6)


def test_aurc_of_a_perfect_ranking_is_the_closed_form():
    # N images, the m errors the least confident: risk 0 up to N - m, then (k-(N-m))/k
    N, m = 20, 6
    confs = [0.95 - 0.02 * i for i in range(N)]
    probs = [[c, 1 - c] for c in confs]
    labels = [0] * (N - m) + [1] * m
    got = check(logits(probs), labels)
    harmonic = sum(1 / k for k in range(N - m + 1, N + 1))
    assert got["aurc"] == pytest.approx((m - (N - m) * harmonic) / N, rel=1e-9)


def test_random_probability_sets_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    for n, c in [(1, 2), (7, 3), (15, 4), (16, 5), (40, 10), (103, 6)]:
        scores = torch.randn(n, c, generator=gen) * 3
        labels = torch.randint(0, c, (n,), generator=gen)
        check(scores, labels)


# -- edge cases ----------------------------------------------------------------------------


def test_ties_in_confidence_are_order_free():
    # images 0-3 tie at one confidence (2 right, 2 wrong), 4-5 tie at another
    probs = [[0.7, 0.3]] * 4 + [[0.6, 0.4]] * 2
    labels = [0, 1, 0, 1, 1, 0]
    got = check(logits(probs), labels)
    shuffled = [labels[i] for i in (1, 3, 0, 2, 5, 4)]
    assert check(logits(probs), shuffled)["aurc"] == pytest.approx(got["aurc"], rel=1e-12)


def test_fewer_images_than_bins_and_one_image():
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.5, 0.0]])
    got = check(scores, [0, 2, 1])  # N = 3 < 15: one image per equal-mass bin
    rows = ref_rows(torch.softmax(scores, -1).double().tolist(), [0, 2, 1])
    assert got["ece_adaptive"] == pytest.approx(sum(abs(r[1] - r[0]) for r in rows) / 3)
    one = check(torch.tensor([[0.0, 2.0]]), [1])  # one image
    p = torch.softmax(torch.tensor([0.0, 2.0]), -1)[1].item()
    assert one["ece"] == pytest.approx(1 - p) and one["aurc"] == 0.0


def test_no_image_gives_none_and_shortlist_zero_probability_stays_finite():
    assert calibration_metrics(torch.empty(0, 4)) == dict.fromkeys(NAMES)
    assert compute_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).ece is None
    # a shortlist leaves the true class at -inf: p = 0, clamped, so the NLL is finite
    scores = torch.tensor([[1.0, 0.0, -math.inf], [0.0, 2.0, 1.0]])
    got = check(scores, [2, 1])
    assert math.isfinite(got["nll"])
    assert got["nll"] > -math.log(P_FLOOR) / 2


# -- end to end: the eval JSON ------------------------------------------------------------

SIX = ("red", "green", "blue", "yellow", "cyan", "magenta")


@pytest.fixture
def noisy_six(tmp_path):
    rng, items = random.Random(1), []
    for label, name in enumerate(SIX):
        for i in range(3):
            base = solid(name, (14 + i, 11 + label))
            noise = Image.new("RGB", base.size, tuple(rng.randrange(256) for _ in range(3)))
            path = tmp_path / "six" / f"{name}{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.blend(base, noise, 0.55).save(path)
            items.append(LabelledItem(path, label))
    return LabelledData("six", SIX, tuple(items), "test")


@pytest.mark.parametrize("shortlist", [None, 2])
def test_eval_json_carries_the_five_metrics(noisy_six, tmp_path, shortlist):
    model, scorers = ColourEmbedder(), ["awt", "clip"]
    kw = {"classes": list(SIX), "embedder": model, "views": 4, "shortlist": shortlist}
    clf = awt_engine.create_classifier(batch_size=4, **kw)
    # no image cache: it stores embeddings rounded, which moves the probabilities
    res = evaluate(clf, noisy_six, scorers, cache_root=None)
    records = result_records(res, clf, model="m", data_root=tmp_path, split="test", limit=None)
    paths = write_results(records, tmp_path / "out")
    recs = {json.loads(p.read_text())["scorer"]: json.loads(p.read_text()) for p in paths}
    images = [str(it.path) for it in noisy_six.items]
    labels = [it.label for it in noisy_six.items]
    for name in scorers:
        one = awt_engine.create_classifier(batch_size=1, scorer=name, **kw)
        probs = torch.softmax(one.scores(images).float(), dim=-1).double().tolist()
        want = reference(probs, labels)
        got = recs[name]["metrics"]
        assert set(NAMES) <= set(got)
        for metric in NAMES:
            assert got[metric] == pytest.approx(want[metric], rel=1e-5, abs=1e-6), (name, metric)


# -- out-of-distribution detection ---------------------------------------------------------


def ref_auroc(id_scores, ood_scores):
    """P(ID > OOD) + P(tie) / 2 over every pair (the definition, O(N M))."""
    total = 0.0
    for a in id_scores:
        for b in ood_scores:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(id_scores) * len(ood_scores))


def ref_fpr95(id_scores, ood_scores):
    """OpenOOD's fpr_recall (ID positive, roc_curve(gt, conf), the first ROC point with
    tpr >= 0.95) over every threshold: scan the distinct scores from the highest down,
    accept score >= t, stop at the first t keeping at least 95% of ID (exact fractions)."""
    for t in sorted(set(id_scores) | set(ood_scores), reverse=True):
        tpr = Fraction(sum(1 for a in id_scores if a >= t), len(id_scores))
        if tpr >= Fraction(95, 100):
            return sum(1 for b in ood_scores if b >= t) / len(ood_scores)
    raise AssertionError("unreachable: the lowest score accepts every ID image")


def check_ood(id_scores, ood_scores):
    got = ood_metrics(torch.tensor(id_scores), torch.tensor(ood_scores))
    a, b = torch.tensor(id_scores).double().tolist(), torch.tensor(ood_scores).double().tolist()
    assert got["ood_auroc"] == pytest.approx(ref_auroc(a, b), rel=1e-12, abs=1e-15)
    assert got["ood_fpr95"] == ref_fpr95(a, b)  # a count over M: exact
    return got


def test_ood_random_sets_match_the_pairwise_and_scanning_references():
    gen = torch.Generator().manual_seed(3)
    for n, m in [(1, 1), (1, 5), (7, 3), (19, 20), (20, 17), (21, 40), (100, 33), (157, 90)]:
        for ties in (False, True):
            a = torch.rand(n, generator=gen, dtype=torch.float64)
            b = torch.rand(m, generator=gen, dtype=torch.float64) * 0.8 + 0.1
            if ties:  # a coarse grid: many ties within and across the sets
                a, b = (a * 6).round() / 6, (b * 6).round() / 6
            check_ood(a.tolist(), b.tolist())


def test_ood_float32_confidences_and_the_threshold_tie_rule():
    gen = torch.Generator().manual_seed(4)
    check_ood(torch.rand(60, generator=gen).tolist(), torch.rand(45, generator=gen).tolist())
    # 20 ID images: the 19th highest (0.5, shared by 3 ID and 2 OOD) is the threshold,
    # every image tied with it accepted: 2 + the OOD above it (1) = 3 of 4
    id_scores = [0.9] * 16 + [0.5] * 3 + [0.1]
    got = check_ood(id_scores, [0.95, 0.5, 0.5, 0.2])
    assert got["ood_fpr95"] == 0.75


def test_ood_known_answers():
    sep = check_ood([0.9, 0.8, 0.95, 0.7], [0.1, 0.3, 0.2])
    assert sep == {"ood_auroc": 1.0, "ood_fpr95": 0.0}
    rev = check_ood([0.1, 0.3, 0.2], [0.9, 0.8, 0.95, 0.7])
    assert rev == {"ood_auroc": 0.0, "ood_fpr95": 1.0}
    same = [0.2, 0.5, 0.5, 0.9, 0.3]
    assert check_ood(same, same)["ood_auroc"] == 0.5  # identical sets: exactly 1/2
    gen = torch.Generator().manual_seed(5)
    a, b = torch.rand(4000, generator=gen), torch.rand(3000, generator=gen)
    got = ood_metrics(a, b)  # same distribution: chance
    assert got["ood_auroc"] == pytest.approx(0.5, abs=0.02)
    assert got["ood_fpr95"] == pytest.approx(0.95, abs=0.02)


def test_ood_empty_sets_and_nan():
    none = {"ood_auroc": None, "ood_fpr95": None}
    assert ood_metrics(torch.empty(0), torch.rand(3)) == none
    assert ood_metrics(torch.rand(3), torch.empty(0)) == none
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(torch.tensor([0.5, math.nan]), torch.rand(3))


def test_max_prob_is_the_conf_column():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(9, 5, generator=gen) * 4
    scores[0, 2] = -math.inf  # a shortlist's excluded class
    want = [max(p) for p in torch.softmax(scores.float(), -1).double().tolist()]
    got = max_prob(scores)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, rel=1e-12)
    labels = torch.randint(0, 5, (9,), generator=gen)
    assert torch.equal(got, image_terms(scores, labels)[:, CONF])
