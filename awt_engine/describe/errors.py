"""Errors of the description stage. The CLI turns each into a message and exit code 2."""


class DescribeError(RuntimeError):
    """A describe run cannot go on; the message says why and what to do."""


class BackendError(DescribeError):
    """The LLM backend failed: unreachable endpoint, refused request, missing model or library."""


class NoUsableOutputError(DescribeError):
    """The LLM answered, but nothing in its answers could be used."""
