"""Label sets: what the classes are, how they are prompted, and their descriptions.

A :class:`LabelSet` is what every model receives (it builds its own prompts from it):
the classes in label order, the prompt template with one ``{}``, and the same number
of LLM descriptions for every class. CLIP-style text prompts follow docs/design.md section 2
(docs/design.md): prompt 0 of a class is ``template.format(name) + "."``, prompt p >= 1
is that sentence, a space, and description p.

:func:`resolve_label_set` builds one from a data set name (registry and description
cache), an explicit class list, or both.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from awt_engine._io import file_sha256, resolve_cache_root, sha256_hex
from awt_engine.registry import (
    fill_template,
    get_dataset,
    read_class_list,
    validate_class_names,
    validate_template,
)

DEFAULT_TEMPLATE = "a photo of a {}"  # CLIP's generic template, for ad-hoc label sets
DEFAULT_DESCRIPTIONS = 50  # AWT: the bare prompt plus 50 descriptions per class


class MissingDescriptionsError(ValueError):
    """A data set was named whose description cache does not exist."""


def bare_prompt(template: str, class_name: str) -> str:
    """``template`` filled with the class name, ending in one full stop."""
    sentence = fill_template(template, class_name).rstrip()
    return sentence if sentence.endswith(".") else sentence + "."


@dataclass(frozen=True)
class LabelSet:
    """Classes in label order, their template and ``n_descriptions`` descriptions each."""

    classes: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    descriptions: tuple[tuple[str, ...], ...] = ()  # per class; () means none for any class
    name: str | None = None  # data set / description-cache name, if any
    descriptions_sha256: str | None = None  # SHA-256 of the description file they came from

    def __post_init__(self) -> None:
        classes = tuple(validate_class_names(self.classes, source="label set"))
        validate_template(self.template)
        descriptions = tuple(tuple(d.strip() for d in row) for row in self.descriptions)
        if descriptions and len(descriptions) != len(classes):
            raise ValueError(
                f"label set has {len(classes)} classes but descriptions for {len(descriptions)}"
            )
        if descriptions and len({len(row) for row in descriptions}) != 1:
            counts = sorted({len(row) for row in descriptions})
            raise ValueError(
                f"every class needs the same number of descriptions (the scorer needs one P); "
                f"got counts {counts} (use LabelSet.from_descriptions to cut them)"
            )
        if descriptions and not descriptions[0]:
            descriptions = ()
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "descriptions", descriptions)

    @classmethod
    def from_descriptions(
        cls,
        classes: Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        descriptions: Mapping[str, Sequence[str]] | None = None,
        n_descriptions: int = DEFAULT_DESCRIPTIONS,
        *,
        name: str | None = None,
        descriptions_sha256: str | None = None,
    ) -> LabelSet:
        """A label set using each class's first ``n_descriptions`` descriptions.

        When some class has fewer, every class is cut to the shortest count (the scorer
        needs one P), with a warning naming the short classes.
        """
        if n_descriptions < 0:
            raise ValueError(f"the number of descriptions must be >= 0, got {n_descriptions}")
        classes = tuple(classes)
        if not classes:
            raise ValueError("the class list is empty")
        n = n_descriptions
        rows: tuple[tuple[str, ...], ...] = ()
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
            rows = tuple(tuple(descriptions[c][:n]) for c in classes)
        return cls(classes, template, rows, name, descriptions_sha256 if rows else None)

    # -- queries ---------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_descriptions(self) -> int:
        return len(self.descriptions[0]) if self.descriptions else 0

    @property
    def n_prompts(self) -> int:
        """P: the bare prompt plus the descriptions."""
        return 1 + self.n_descriptions

    def class_descriptions(self, c: int) -> tuple[str, ...]:
        return self.descriptions[c] if self.descriptions else ()

    def prompt_texts(self) -> list[list[str]]:
        """[C][P] CLIP text prompts: the bare sentence, then the sentence + description."""
        out = []
        for c, name in enumerate(self.classes):
            base = bare_prompt(self.template, name)
            out.append([base, *(f"{base} {d}" for d in self.class_descriptions(c))])
        return out

    def bare(self) -> LabelSet:
        """The same classes and template without descriptions (P = 1)."""
        return (
            replace(self, descriptions=(), descriptions_sha256=None) if self.descriptions else self
        )

    def select(self, classes: Sequence[str]) -> LabelSet:
        """A label set over ``classes`` (in that order); descriptions are kept when every
        one of them is a class of this set, else the result has none."""
        index = {c: i for i, c in enumerate(self.classes)}
        if self.descriptions and all(c in index for c in classes):
            rows = tuple(self.descriptions[index[c]] for c in classes)
            return LabelSet(
                tuple(classes), self.template, rows, self.name, self.descriptions_sha256
            )
        return LabelSet(tuple(classes), self.template, (), self.name)

    def key(self) -> str:
        """SHA-256 of everything that changes a model's class embeddings."""
        body = json.dumps([self.classes, self.template, self.descriptions], ensure_ascii=False)
        return sha256_hex("awt-label-set", "1", body)

    def record(self) -> dict:
        """The label set as result files record it."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "template": self.template,
            "descriptions_per_class": self.n_descriptions,
            "descriptions_sha256": self.descriptions_sha256,
        }


def resolve_label_set(
    dataset: str | None = None,
    classes: Sequence[str] | str | None = None,
    template: str | None = None,
    descriptions: int | None = None,
    cache_dir: str | Path | None = None,
) -> LabelSet:
    """Classes, template and descriptions from a data set name, an explicit list, or both.

    * classes: ``classes`` if given (a list, a comma list or a file), else the
      description cache's, else the registry's;
    * template: ``template``, else the description cache's, else the registry's,
      else ``"a photo of a {}"``;
    * descriptions: ``descriptions`` per class (default 50 when a data set is named, 0
      otherwise), read from ``<cache>/descriptions/<dataset>.json``.
    """
    from awt_engine.descriptions import descriptions_path, load_descriptions

    root = resolve_cache_root(cache_dir)
    if isinstance(classes, str | Path):
        classes = read_class_list(classes)
    info = None
    cache_file = descriptions_path(dataset, root) if dataset else None
    cached = load_descriptions(cache_file) if cache_file and cache_file.exists() else None
    if dataset and cached is None:
        try:
            info = get_dataset(dataset)
        except ValueError as exc:
            raise ValueError(
                f"{exc}\n(no description cache {cache_file} either; a custom label set "
                "needs --classes, or `awt-engine describe --classes ... --name NAME` first)"
            ) from None
    if descriptions is None:
        descriptions = DEFAULT_DESCRIPTIONS if dataset else 0
    if descriptions < 0:
        raise ValueError(f"descriptions must be >= 0, got {descriptions}")

    if classes is None:
        if cached is not None:
            classes = cached.classes
        elif info is not None and info.classes is not None:
            classes = info.classes
        elif info is not None:
            raise ValueError(
                f"the class names of {info.name!r} are not known offline: pass --classes "
                "(a file with one name per line, or a comma list)"
            )
        else:
            raise ValueError("no classes: pass a data set name (--dataset) or --classes")
    classes = tuple(classes)
    if template is None:
        template = (cached.template if cached is not None else None) or (
            info.template if info is not None else DEFAULT_TEMPLATE
        )
    validate_template(template)

    desc_map, desc_sha = None, None
    if descriptions > 0:
        if not dataset:
            raise ValueError(
                f"--descriptions {descriptions} needs a description cache: name it with "
                "--dataset, or use --descriptions 0"
            )
        if cached is None:
            raise MissingDescriptionsError(
                f"no class descriptions for data set {dataset!r}: looked for {cache_file}.\n"
                f"Either generate them:   awt-engine describe --dataset {dataset}\n"
                "or classify without:    --descriptions 0"
            )
        desc_map, desc_sha = cached.descriptions, file_sha256(cache_file)
    return LabelSet.from_descriptions(
        classes, template, desc_map, descriptions, name=dataset, descriptions_sha256=desc_sha
    )
