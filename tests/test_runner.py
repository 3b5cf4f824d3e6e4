"""The run loop: both model kinds through one function, refusals that name their reason,
explain through the scorer and the shortlist."""

import json

import pytest
import torch

import awt_engine
from awt_engine.inputs import Failure, view_batches
from awt_engine.inputs.views import ViewConfig
from awt_engine.runner import RunConfig, Scored, run
from awt_engine.scoring import awt_solve
from tests.fixtures_embedders import COLOURS, ColourEmbedder, ColourLogitModel, solid

CLASSES = list(COLOURS)


def _paths(tmp_path, n=5):
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        solid(CLASSES[i % 6]).save(p)
        out.append(p)
    (tmp_path / "bad.png").write_bytes(b"nope")
    return [*out[:2], tmp_path / "bad.png", *out[2:]]


@pytest.mark.parametrize("kind", [ColourEmbedder, ColourLogitModel])
def test_run_gives_indexed_rows_equal_to_the_classifier(tmp_path, kind):
    model = kind()
    paths = _paths(tmp_path)
    clf = awt_engine.create_classifier(classes=CLASSES, embedder=model, views=3, batch_size=2)
    labels = clf.labels_for(["awt"])
    batches = view_batches(paths, model.preprocess, ViewConfig(n_views=3), batch_size=2)
    rows = list(run(batches, model, labels, "awt", class_embeddings=clf.class_embeddings))
    failures = [r for r in rows if isinstance(r, Failure)]
    scored = [r for r in rows if isinstance(r, Scored)]
    assert [f.index for f in failures] == [2]
    assert [i for r in scored for i in r.indices] == [0, 1, 3, 4, 5]  # input positions
    got = torch.cat([r.scores["awt"] for r in scored])
    want = clf.scores([p for i, p in enumerate(paths) if i != 2])
    assert torch.equal(got, want)


def test_a_logit_model_refuses_what_needs_class_embeddings_and_says_why():
    with pytest.raises(ValueError, match="picks each image's classes by their embeddings"):
        awt_engine.create_classifier(classes=CLASSES, embedder=ColourLogitModel(), shortlist=2)
    with pytest.raises(ValueError, match="needs class embeddings"):
        awt_engine.create_classifier(
            classes=CLASSES, embedder=ColourLogitModel(), scorer="clip-descriptions"
        )


def test_create_classifier_groups_its_settings_and_keywords_still_win():
    rc = RunConfig(batch_size=7, workers=3, shortlist=4)
    clf = awt_engine.create_classifier(
        classes=CLASSES, embedder=ColourEmbedder(), run_config=rc, workers=1
    )
    assert (clf.batch_size, clf.workers, clf.shortlist) == (7, 1, 4)
    assert clf.run_config == RunConfig(batch_size=7, workers=1, shortlist=4)
    plain = awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder())
    assert plain.run_config == RunConfig()  # batch 4, workers 2, as before
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder(), batch_size=0)


def test_explain_takes_the_scorers_own_plans(tmp_path):
    p = _paths(tmp_path)[0]
    clf = awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder(), views=4)
    exp = clf.explain(p, top_k=2)
    model, labels = clf.model, clf.labels_for(["awt"])
    from awt_engine.inputs import as_rgb_image
    from awt_engine.inputs.views import make_views

    rgb = as_rgb_image(str(p), target_size=model.preprocess.size)
    img = model.embed_views(make_views(rgb, model.preprocess, clf.view_config)[None])
    want = awt_solve(img, clf.class_embeddings(labels), 100.0, keep_plans=True)
    c = exp.prediction.index
    assert torch.equal(exp.prediction.plan, want.plans[0, c].double().float())
    assert exp.prediction.score == float(want.scores[0, c])


def test_explain_goes_through_the_shortlist(tmp_path):
    p = _paths(tmp_path)[0]
    clf = awt_engine.create_classifier(
        classes=CLASSES, embedder=ColourEmbedder(), views=4, shortlist=2
    )
    exp = clf.explain(p, top_k=2)
    assert len(exp.all_scores) == 2  # only the shortlisted classes have scores
    assert exp.prediction.name == CLASSES[0]
    assert {c.name for c in exp.classes} <= set(exp.all_scores)
    for c in exp.classes:
        assert float(c.plan.sum()) == pytest.approx(1.0, rel=1e-5)
    json.loads(exp.to_json())  # no -inf leaks into the JSON
