"""Test doubles for the description stage, all real code paths, nothing downloaded:

- :class:`ScriptedServer`: a real HTTP server on 127.0.0.1 speaking the OpenAI
  chat-completions protocol, answering from a Python function.
- :func:`build_tiny_chat_model`: a randomly initialised 2-layer Qwen2 causal LM and a
  byte-level BPE tokenizer trained in memory, saved to a folder with a chat template.
- :func:`toy_registry`: two toy data sets registered in ``awt_engine.registry`` for one test
  (``register_dataset``, the registry's public seam).

Fixtures reach every test module through ``pytest_plugins`` in conftest.py; helpers are
imported by name (``from tests.fixtures_llm import ScriptedServer``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from awt_engine.describe.instructions import InstructionSet, fill_question

# ----------------------------------------------------------------------------------------------
# loopback OpenAI-compatible server
# ----------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: dict | str = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def chat_reply(*texts: str, finish_reason: str = "stop") -> Reply:
    """A 200 chat-completions answer with one choice per text."""
    return Reply(
        200,
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "scripted",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": finish_reason,
                }
                for i, t in enumerate(texts)
            ],
        },
    )


def last_user(body: dict) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


class ScriptedServer:
    """``responder(body) -> Reply`` answers every POST to ``/v1/chat/completions``.

    ``requests`` holds every request body received (retries included), in arrival order;
    ``seen`` holds (method, path, Authorization header) of every request of any method.
    """

    def __init__(self, responder: Callable[[dict], Reply]) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self.seen: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _record(self):
                with server.lock:
                    server.seen.append((self.command, self.path, self.headers.get("Authorization")))

            def do_GET(self):  # what urllib turns a redirected POST into
                self._record()
                self._send(Reply(404, {"error": f"no GET route {self.path}"}))

            def do_POST(self):
                self._record()
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(Reply(404, {"error": f"no route {self.path}"}))
                    return
                body = json.loads(raw)
                body["_auth"] = self.headers.get("Authorization")
                with server.lock:
                    server.requests.append(body)
                try:
                    reply = server.responder(body)
                except Exception as e:  # a bug in a test's responder: make it visible
                    reply = Reply(599, {"error": f"responder failed: {e!r}"})
                self._send(reply)

            def _send(self, reply: Reply):
                data = (
                    reply.body.encode()
                    if isinstance(reply.body, str)
                    else json.dumps(reply.body).encode()
                )
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (killed)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class Router:
    """Tells question requests from description requests and finds (class, question index)
    from the rendered question in the last user message (independent of the prompt wording)."""

    def __init__(self, classes, questions) -> None:
        self.pairs = sorted(
            ((fill_question(q, c), c, qi) for c in classes for qi, q in enumerate(questions)),
            key=lambda t: -len(t[0]),
        )

    def __call__(self, body: dict) -> tuple[str, int] | None:
        text = last_user(body)
        for rendered, c, qi in self.pairs:
            if rendered in text:
                return c, qi
        return None


def requested_count(body: dict) -> int | None:
    """The number of sentences/questions the prompt asks for (first number in the message)."""
    m = re.search(r"\b(\d+)\b", last_user(body).split("\n", 3)[-1])
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# tiny random chat model
# ----------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_chat_model(
    folder: Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 600,
    extra_corpus: tuple[str, ...] = (),
) -> Path:
    """Save a random 2-layer Qwen2 LM (hidden 32) with an in-memory-trained byte-level BPE
    tokenizer and a chat template to ``folder``; return the folder. ``extra_corpus`` and a
    larger ``vocab_size`` make whole words of its texts single tokens, as a real LM's
    tokenizer does for common words (the benchmarks' token counts then look real)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [
        *InstructionSet.load().texts.values(),
        "A banded texture shows parallel stripes of alternating colour.",
        "- What colour is {}?",
        "The quick brown fox jumps over the lazy dog.",
        *extra_corpus,
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(folder)

    config = Qwen2Config(
        vocab_size=len(hf_tok) + 8,  # headroom: AutoTokenizer may add a token on reload
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # sharper logits: greedy output then depends on the prompt
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Zero the (tied) embeddings of the special tokens: their logits are then 0 while the
        # best ordinary token's is positive, so even greedy decoding writes visible text.
        emb = model.get_input_embeddings().weight
        for t in SPECIAL:
            emb[hf_tok.convert_tokens_to_ids(t)] = 0.0
        emb[len(hf_tok) :] = 0.0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


# ----------------------------------------------------------------------------------------------
# data set registry stand-in
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyDataset:
    name: str
    template: str
    description: str
    classes: tuple[str, ...] | None


TOY_DATASETS = {
    "toytex": ToyDataset(
        "toytex",
        "a photo of a {}, which is a type of texture",
        "close-up photos of surface textures",
        ("banded", "blotchy", "sea_lion"),
    ),
    "folderset": ToyDataset("folderset", "a photo of a {}", "photos of things", None),
}


@pytest.fixture
def toy_registry():
    """Two toy data sets registered through the registry's public seam for one test."""
    from awt_engine import registry

    infos = [
        registry.DatasetInfo(t.name, t.template, t.description, t.classes)
        for t in TOY_DATASETS.values()
    ]
    for info in infos:
        registry.register_dataset(info, replace=True)
    yield {info.name: info for info in infos}
    for info in infos:
        registry.unregister_dataset(info.name)
