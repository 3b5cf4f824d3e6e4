"""Label sets: prompts as the design defines them, descriptions, resolution errors."""

import pytest

from awt_engine.descriptions import descriptions_path, from_plain, save_descriptions
from awt_engine.labels import LabelSet, MissingDescriptionsError, resolve_label_set


def test_prompts_follow_the_design():
    labels = resolve_label_set("dtd", descriptions=0)
    assert labels.prompt_texts()[0] == [
        "a photo of a banded, which is a type of texture, or a type of pattern."
    ]
    assert len(labels.classes) == 47


def test_prompts_with_descriptions(tmp_path):
    save_descriptions(
        from_plain(
            {"sea_lion": ["It is brown.", "It swims."], "cat": ["Fur.", "Whiskers."]},
            "animals",
            template="a photo of a {}",
        ),
        descriptions_path("animals", tmp_path),
    )
    labels = resolve_label_set("animals", cache_dir=tmp_path, descriptions=2)
    assert labels.prompt_texts()[0] == [
        "a photo of a sea lion.",
        "a photo of a sea lion. It is brown.",
        "a photo of a sea lion. It swims.",
    ]
    assert labels.classes == ("sea_lion", "cat")


def test_missing_descriptions_message_names_file_and_ways_forward(tmp_path):
    with pytest.raises(MissingDescriptionsError) as info:
        resolve_label_set("dtd", cache_dir=tmp_path)
    msg = str(info.value)
    assert str(descriptions_path("dtd", tmp_path)) in msg
    assert "awt-engine describe --dataset dtd" in msg and "--descriptions 0" in msg


def test_label_set_cuts_to_the_shortest_description_count_with_a_warning():
    with pytest.warns(UserWarning, match=r"'b' \(1\)"):
        labels = LabelSet.from_descriptions(
            ["a", "b"], "a photo of a {}", {"a": ["x", "y"], "b": ["z"]}, 2
        )
    assert labels.n_prompts == 2 and labels.descriptions == (("x",), ("z",))


def test_select_keeps_descriptions_only_for_known_classes():
    labels = LabelSet(("cat", "dog"), "a photo of a {}", (("furry",), ("loyal",)))
    assert labels.select(["dog"]).prompt_texts() == [
        ["a photo of a dog.", "a photo of a dog. loyal"]
    ]
    assert labels.select(["dog", "fox"]).n_prompts == 1  # fox has none: bare prompts only
    assert labels.bare().n_prompts == 1 and labels.bare().classes == labels.classes


def test_key_changes_with_anything_that_changes_embeddings():
    base = LabelSet(("cat", "dog"), "a photo of a {}", (("furry",), ("loyal",)))
    assert base.key() == LabelSet(("cat", "dog"), "a photo of a {}", (("furry",), ("loyal",))).key()
    assert base.key() != LabelSet(("dog", "cat"), "a photo of a {}", (("loyal",), ("furry",))).key()
    assert base.key() != LabelSet(("cat", "dog"), "a {}", (("furry",), ("loyal",))).key()
    assert base.key() != base.bare().key()


def test_bad_label_sets_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="duplicate class names"):
        LabelSet(("sea_lion", "Sea Lion"))
    with pytest.raises(ValueError, match="same number of descriptions"):
        LabelSet(("a", "b"), "a {}", (("x",), ("y", "z")))
    with pytest.raises(ValueError, match="exactly one"):
        LabelSet(("a",), "a photo")
