"""Answer parsing and prompt files of the description stage."""

import shutil
from pathlib import Path

import pytest

from awt_engine.describe.instructions import (
    ALL_FILES,
    InstructionSet,
    default_instructions_dir,
    load_instruction,
)
from awt_engine.describe.parsing import (
    dedupe,
    interleave,
    parse_descriptions,
    parse_questions,
)


def test_questions_keep_exactly_one_placeholder_and_fold_duplicates():
    text = "\n".join(
        [
            "Sure! Here are the questions:",
            "1. What colour is {}?",
            "- Compare {} with {}?",
            "* what colour  is {}?",
            "- What is it?",
            "- Where is {photo} found?",
            "2) **Which texture covers the {}?**",
            "",
            "Q3: How big is a {} in the frame?",
        ]
    )
    assert parse_questions(text) == [
        "What colour is {}?",
        "Which texture covers the {}?",
        "How big is a {} in the frame?",
    ]


def test_descriptions_split_clean_and_dedupe():
    text = "\n".join(
        [
            "Here are five sentences about the zebra:",
            "- Zebras have black and white stripes. A zebra has a short upright mane.",
            "- zebras  have black and WHITE stripes.",
            "-",
            "- ok",
            "3. A zebra's {} is bad.",
            '"A zebra stands on dry grass."',
            "- " + "very long " * 40 + "sentence.",
        ]
    )
    assert parse_descriptions(text) == [
        "Zebras have black and white stripes.",
        "A zebra has a short upright mane.",
        "A zebra stands on dry grass.",
    ]


def test_truncated_answer_drops_its_unfinished_last_line():
    text = "- A zebra has stripes.\n- A zebra has a long"
    assert parse_descriptions(text) == ["A zebra has stripes.", "A zebra has a long"]
    assert parse_descriptions(text, truncated=True) == ["A zebra has stripes."]
    assert parse_questions("- What is {}?\n- How big is {}", truncated=True) == ["What is {}?"]


def test_dedupe_and_interleave():
    seen = {"a b."}
    assert dedupe(["A  B.", "c d.", "C D."], seen) == ["c d."]
    assert seen == {"a b.", "c d."}
    assert interleave([["a1", "a2", "a3"], [], ["c1"]]) == ["a1", "c1", "a2", "a3"]


def test_instructions_load_from_the_package_and_render():
    folder = default_instructions_dir()
    assert folder.name == "instruction_texts"
    for name in ALL_FILES:
        assert load_instruction(name)  # every file exists and is non-empty
    ps = InstructionSet.load()
    q = ps.question_conversation("close-up photos of machine parts", 9)
    assert [m["role"] for m in q] == ["system", "user", "assistant", "user"]
    assert "close-up photos of machine parts" in q[-1]["content"]
    assert "9" in q[-1]["content"]
    # the worked example answer is itself made of valid questions
    assert len(parse_questions(q[2]["content"])) >= 5
    d = ps.description_conversation("toy photos", "sea_lion", "What colour is {}?", 6)
    assert [m["role"] for m in d] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert "What colour is sea lion?" in d[-1]["content"]  # underscores read as spaces
    assert "{}" not in d[-1]["content"]
    for example in (d[2], d[4]):  # worked examples parse into full sentences
        assert len(parse_descriptions(example["content"])) == 5


def test_unknown_prompt_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        load_instruction("nonexistent")


def test_prompt_hash_changes_when_a_prompt_changes(tmp_path):
    copy = tmp_path / "prompts"
    shutil.copytree(default_instructions_dir(), copy)
    same = InstructionSet.load(copy)
    assert same.sha256 == InstructionSet.load().sha256
    (copy / "descriptions_system.txt").write_text("Something else.", encoding="utf-8")
    changed = InstructionSet.load(copy)
    assert changed.sha256 != same.sha256
    diff = {k for k in ALL_FILES if changed.files_sha256[k] != same.files_sha256[k]}
    assert diff == {"descriptions_system"}


def test_broken_placeholder_in_a_prompt_file_fails_at_load(tmp_path):
    copy = tmp_path / "prompts"
    shutil.copytree(default_instructions_dir(), copy)
    (copy / "descriptions_user.txt").write_text("Tell me about ${klass}.", encoding="utf-8")
    with pytest.raises(ValueError, match="placeholder"):
        InstructionSet.load(copy)


def test_instruction_texts_ship_inside_the_package():
    import awt_engine

    folder = default_instructions_dir()
    assert folder.is_relative_to(Path(awt_engine.__file__).resolve().parent)  # package data
    assert sorted(p.stem for p in folder.glob("*.txt")) == sorted(ALL_FILES)
