"""One progress-bar policy for every long step: tqdm on stderr, only on a terminal.

``enabled=False`` (``--no-progress``) turns bars off; ``enabled=True`` draws them only
when stderr is a terminal, so logs and pipes never fill with bar updates and stdout
(predictions) is never interleaved with them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def progress_bar(total: int | None, enabled: bool = True, *, desc: str | None = None, unit="img"):
    """A tqdm bar on stderr (drawn only on a terminal, and only when ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=None if enabled else True,  # None: tqdm's own "only on a TTY"
    )


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' (and the hub's) progress bars off until the block ends, unless
    ``enabled`` (then left as they are: HF_HUB_DISABLE_PROGRESS_BARS=1 still holds), so a
    log file never fills with "Loading weights" bars."""
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
