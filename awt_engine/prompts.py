"""Class prompts: the dataset template filled with the class name, plus descriptions.

Prompt 0 of a class is ``template.format(name) + "."``; prompt p >= 1 is that same
sentence, a space, and description p (DESIGN.md section 2). Every class gets the
same number of prompts, so their embeddings stack into one [C, P, D] tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from awt_engine.datasets import fill_template, validate_template


def bare_prompt(template: str, class_name: str) -> str:
    sentence = fill_template(template, class_name).rstrip()
    return sentence if sentence.endswith(".") else sentence + "."


def build_prompts(
    classes: Sequence[str],
    template: str,
    descriptions: Mapping[str, Sequence[str]] | None = None,
    n_descriptions: int = 50,
) -> list[list[str]]:
    """[C][P] prompt strings, P = 1 + the descriptions used per class.

    Each class uses its first ``n_descriptions`` descriptions. When some class has
    fewer, every class is cut to the shortest count (the scorer needs one P), with a
    warning naming the short classes.
    """
    validate_template(template)
    if n_descriptions < 0:
        raise ValueError(f"the number of descriptions must be >= 0, got {n_descriptions}")
    if not classes:
        raise ValueError("the class list is empty")
    n = n_descriptions
    if n > 0:
        if descriptions is None:
            raise ValueError(f"{n} descriptions per class were asked for but none were given")
        missing = [c for c in classes if not descriptions.get(c)]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise ValueError(
                f"no descriptions for {len(missing)} class(es): {shown}{more}; "
                "generate them with `awt-engine describe` or use --descriptions 0"
            )
        counts = {c: len(descriptions[c]) for c in classes}
        shortest = min(counts.values())
        if shortest < n:
            short = sorted((k for k, v in counts.items() if v < n), key=counts.get)
            names = ", ".join(f"{c!r} ({counts[c]})" for c in short[:5])
            warnings.warn(
                f"{len(short)} class(es) have fewer than {n} descriptions: {names}; "
                f"using {shortest} per class so every class has the same prompt count",
                stacklevel=2,
            )
            n = shortest
    prompts = []
    for c in classes:
        base = bare_prompt(template, c)
        extra = [f"{base} {d.strip()}" for d in (descriptions[c][:n] if n else [])]
        prompts.append([base, *extra])
    return prompts
