"""One progress-bar policy for every long step: tqdm on stderr, only on a terminal.

``enabled=False`` (``--no-progress``) turns bars off; ``enabled=True`` draws them only
when stderr is a terminal, so logs and pipes never fill with bar updates and stdout
(predictions) is never interleaved with them.
"""

from __future__ import annotations

import sys


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
