"""The offline description stage: LLM-written, dataset-aware class descriptions.

Entry points: :func:`describe_classes` (cache-aware, resumable) and the two steps
:func:`generate_questions` / :func:`generate_descriptions`. Backends live in
:mod:`awt_engine.describe.backends`.
"""

from awt_engine.describe.backends import (
    BACKENDS,
    BackendSpec,
    ChatBackend,
    SamplingConfig,
    default_backend_name,
    make_backend,
)
from awt_engine.describe.errors import BackendError, DescribeError, NoUsableOutputError
from awt_engine.describe.instructions import InstructionSet, load_instruction
from awt_engine.describe.pipeline import (
    describe_classes,
    generate_descriptions,
    generate_questions,
)
from awt_engine.describe.task import DescribeConfig, DescribeResult, DescribeTask

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendSpec",
    "ChatBackend",
    "DescribeConfig",
    "DescribeError",
    "DescribeResult",
    "DescribeTask",
    "InstructionSet",
    "NoUsableOutputError",
    "SamplingConfig",
    "default_backend_name",
    "describe_classes",
    "generate_descriptions",
    "generate_questions",
    "load_instruction",
    "make_backend",
]
