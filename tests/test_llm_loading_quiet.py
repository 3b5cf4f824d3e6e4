"""Loading an LLM (LLaMP, CLAMP, eP-ALM, describe) draws no transformers bars off a terminal.

transformers' "Loading weights" bar went to stderr whatever stderr was, so logs of
``train -m llamp ... 2> log`` filled with bar updates. On a terminal it is drawn as before.
"""

import sys

from awt_engine.models import llm


def test_no_loading_bar_when_stderr_is_not_a_terminal(tiny_chat_model, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a fresh process has it
    assert not sys.stderr.isatty()
    llm.load_causal_lm(str(tiny_chat_model))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # put back for whatever runs next


def test_the_bar_is_left_on_for_a_terminal(tiny_chat_model, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    monkeypatch.setattr(llm, "stderr_is_terminal", lambda: True)
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    llm.load_causal_lm(str(tiny_chat_model))
    assert seen == [True]
