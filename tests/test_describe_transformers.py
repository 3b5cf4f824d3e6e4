"""The transformers backend, end to end with a tiny random chat model loaded from a folder."""

import json

import pytest

from awt_engine.describe import (
    BackendError,
    DescribeConfig,
    DescribeTask,
    InstructionSet,
    NoUsableOutputError,
    SamplingConfig,
    describe_classes,
)
from awt_engine.describe.backends import ChatRequest, TransformersBackend, TransformersConfig
from awt_engine.descriptions import DescriptionSet, save_descriptions

MAX_NEW = 6


@pytest.fixture(scope="module")
def prompts():
    return InstructionSet.load()


def requests_for(prompts):
    # Conversations of different lengths, so batching needs padding. Short ones keep the test
    # fast; the full prompts run in the end-to-end test below.
    convs = [
        [{"role": "system", "content": "Describe things."}, {"role": "user", "content": "a"}],
        [{"role": "user", "content": "What colour is a sea lion in photos of animals?"}],
        [{"role": "user", "content": "banded " * 30}],
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "- What shape is {}?\n- What texture is {}?"}],
    ]
    return [ChatRequest(c, seed=i) for i, c in enumerate(convs)]


def test_batched_left_padded_generation_matches_one_by_one(tiny_chat_model, prompts):
    reqs = requests_for(prompts)
    greedy = SamplingConfig(max_tokens=MAX_NEW, temperature=0.0)
    batched = TransformersBackend(TransformersConfig(str(tiny_chat_model), batch_size=8))
    single = TransformersBackend(TransformersConfig(str(tiny_chat_model), batch_size=1))
    seen = []
    out_b = batched.chat(reqs, greedy, on_result=lambda i, c: seen.append(i))
    out_s = single.chat(reqs, greedy)
    assert sorted(seen) == list(range(len(reqs)))  # every request reported once
    assert len(out_b) == len(reqs) and all(len(o) == 1 for o in out_b)
    # Padding must not change a row's answer (it would with right padding or no mask).
    assert [o[0].text for o in out_b] == [o[0].text for o in out_s]
    assert len({o[0].text for o in out_b}) > 1  # answers depend on the prompt
    assert batched.stats.requests == len(reqs)
    assert 0 < batched.stats.generated_tokens <= len(reqs) * MAX_NEW
    for o in out_b:  # truncated exactly when no end-of-turn token came within the limit
        assert isinstance(o[0].text, str)
    assert batched.settings()["device"] == "cpu"


def test_sampling_returns_n_completions_per_request(tiny_chat_model, prompts):
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model), batch_size=2))
    reqs = requests_for(prompts)[:3]
    out = backend.chat(reqs, SamplingConfig(max_tokens=MAX_NEW, temperature=1.0, n=2, seed=1))
    assert [len(o) for o in out] == [2, 2, 2]
    again = backend.chat(reqs, SamplingConfig(max_tokens=MAX_NEW, temperature=1.0, n=2, seed=1))
    assert [[c.text for c in o] for o in out] == [[c.text for c in o] for o in again]  # seeded


def test_chat_template_is_rendered_as_text(tiny_chat_model):
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model)))
    text = backend.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|bos|><|system|>S<|end|><|user|>U<|end|><|assistant|>"


def test_describe_runs_end_to_end_through_the_real_backend(tiny_chat_model, tmp_path):
    # Questions are stored (a resumed run), so the noise model only has to answer step 2.
    classes = ("banded", "sea_lion")
    path = tmp_path / "descriptions" / "tiny.json"
    save_descriptions(
        DescriptionSet(
            "tiny",
            classes,
            {},
            dataset_description="toy photos",
            questions=("What colour is {}?", "What shape is {}?"),
        ),
        path,
    )
    task = DescribeTask("tiny", classes, "toy photos", "a photo of a {}")
    config = DescribeConfig(
        per_class=3,
        num_questions=2,
        max_rounds=1,
        sampling=SamplingConfig(max_tokens=16, temperature=1.0, seed=3),
    )
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model), batch_size=4))
    try:
        result = describe_classes(task, backend, config, cache_root=tmp_path)
    except NoUsableOutputError as e:  # noise may hold no sentence at all: a clean error
        assert "transformers" in str(e) and str(tiny_chat_model) in str(e)
        assert json.loads(path.read_text())["descriptions"] == {}
        return
    # 2 classes x 2 questions (ceil(3 / ceil(3/2)) = 2), one batch, one round
    assert result.requests == 4
    raw = json.loads(path.read_text())
    assert raw["classes"] == list(classes)
    assert raw["provenance"]["backend"] == "transformers"
    assert raw["provenance"]["model"] == str(tiny_chat_model)
    counts = {c: len(raw["descriptions"].get(c, [])) for c in classes}
    assert result.short == {c: n for c, n in counts.items() if n < 3}
    for items in raw["descriptions"].values():
        assert 1 <= len(items) <= 3
        assert all(d.strip() == d and "{" not in d and "\n" not in d for d in items)


def test_noise_model_gives_a_clean_error_for_questions(tiny_chat_model, tmp_path):
    task = DescribeTask("tiny", ("a", "b"), "toy photos")
    config = DescribeConfig(
        question_rounds=1, sampling=SamplingConfig(max_tokens=MAX_NEW, temperature=0.0)
    )
    backend = TransformersBackend(TransformersConfig(str(tiny_chat_model)))
    with pytest.raises(NoUsableOutputError, match="no usable question"):
        describe_classes(task, backend, config, cache_root=tmp_path)
    assert not (tmp_path / "descriptions" / "tiny.json").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    backend = TransformersBackend(TransformersConfig(str(tmp_path / "no-such-model")))
    with pytest.raises(BackendError, match=r"LLM folder .*no-such-model does not exist"):
        backend.chat([ChatRequest([{"role": "user", "content": "x"}], 0)], SamplingConfig())
