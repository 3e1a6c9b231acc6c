"""What a setting may declare about its values, and the one loop that checks a config against it.

A field says what it allows where it is defined, with :func:`setting`::

    batch_size: int = setting(16, ">= 1")              # a range, written as the refusal shows it
    top_p: float = setting(0.95, "(0, 1]")
    backend: str = setting("hf", GENERATOR_BACKENDS)   # one of a few names
    template: str | None = setting(None, template="judge")  # a file, here a judge prompt template

:func:`check` walks a section and the sections inside it, inner ones first; for each,
:func:`check_own` tries each field's declared rule in order, then the section's own
:meth:`Section.check` for the rules that tie fields together. A refusal is a :class:`ConfigError`
naming the setting by its dotted place in the whole config, which the walk knows from where the
section sits (``roles.meta_judge.generator.batch_size``). A section made on its own
(``GeneratorConfig(batch_size=0)``) is checked as it is made, named at its usual place in the root
config (``generator.batch_size``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metareward.config.templates import template_problem

NO_VALUE = object()  # a refusal that names a key but no value (e.g. an unknown key)


class ConfigError(ValueError):
    """A setting has a value metareward cannot run with; the message names the setting.

    ``key`` is the setting's dotted key within the section that refused it (``batch_size``),
    ``where`` the section's place in the whole config (``roles.judge.generator.``)."""

    def __init__(self, key: str, value: Any = NO_VALUE, why: str = "", where: str = ""):
        self.key, self.value, self.why, self.where = key, value, why, where
        shown = f"{where}{key}" if value is NO_VALUE else f"{where}{key}={value!r}"
        super().__init__(f"{shown}: {why}")

    def at(self, where: str) -> ConfigError:
        """The same refusal, named from another place in the tree."""
        return ConfigError(self.key, self.value, self.why, where)


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Refuse ``key=value`` for ``why`` unless ``ok`` (for the rules a section's ``check`` holds)."""
    if not ok:
        raise ConfigError(key, value, why)


# ---------------------------------------------------------------- the rules a field may declare

_BOUND = re.compile(r"^(>=?) *(-?[\d.]+)$")  # >= 1, > 0
_INTERVAL = re.compile(r"^([\[(]) *(-?[\d.]+), *(-?[\d.]+) *([\])])$")  # (0, 1], [0.5, 1]


@dataclass(frozen=True)
class Range:
    """Numbers within bounds written as the refusal shows them: ``>= 1``, ``> 0``, ``(0, 1]``."""

    text: str
    says: str | None = None  # what the refusal says before the bounds; None: "must be" / "must be in"
    note: str = ""  # said after them, e.g. "(or null: no limit)"

    def __post_init__(self) -> None:
        if not (_BOUND.match(self.text) or _INTERVAL.match(self.text)):
            raise ValueError(f"not a range: {self.text!r} (e.g. '>= 1', '> 0', '(0, 1]')")

    def allows(self, value: Any) -> bool:
        if not math.isfinite(value):  # an open bound means any finite number (null says "no limit")
            return False
        if bound := _BOUND.match(self.text):
            sign, low = bound.groups()
            return value >= float(low) if sign == ">=" else value > float(low)
        opening, low, high, closing = _INTERVAL.match(self.text).groups()  # type: ignore[union-attr]
        above = value >= float(low) if opening == "[" else value > float(low)
        return above and (value <= float(high) if closing == "]" else value < float(high))

    def why(self) -> str:
        says = self.says if self.says is not None else "must be" if _BOUND.match(self.text) else "must be in"
        return " ".join(part for part in (says, self.text, self.note) if part)


@dataclass(frozen=True)
class OneOf:
    """One of a few names (each item of a list setting); the refusal names the item refused."""

    names: tuple[str, ...]
    says: str = "one of"
    note: str = ""

    def why(self) -> str:
        return " ".join(part for part in (self.says, str(self.names), self.note) if part)


@dataclass(frozen=True)
class File:
    """Empty, or an existing file; for a prompt template (``template``: judge, meta_judge, pairwise)
    UTF-8 text whose placeholders are the ones that template is given."""

    template: str | None = None

    def problem(self, path: str) -> str | None:
        if not Path(path).is_file():
            return "no such file"
        if self.template is None:
            return None
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return "not UTF-8 text"
        except OSError as error:
            return error.strerror or str(error)
        return template_problem(text, self.template)


Rule = Range | OneOf | File
RULE = "rule"  # the metadata key a field's rule is kept under


def setting(
    default: Any = dataclasses.MISSING,
    allowed: str | tuple[str, ...] | None = None,
    *,
    factory: Any = dataclasses.MISSING,
    says: str | None = None,
    note: str = "",
    file: bool = False,
    template: str | None = None,
) -> Any:
    """A dataclass field with its rule: ``allowed`` is a range (``">= 1"``, ``"(0, 1]"``) or the tuple
    of names allowed; ``file``: an existing file (or empty); ``template``: a prompt template file of that
    kind. ``says`` and ``note`` are the refusal's words before and after what is allowed. ``factory``
    makes a mutable default (a list)."""
    rule: Rule | None = None
    if isinstance(allowed, str):
        rule = Range(allowed, says, note)
    elif allowed is not None:
        rule = OneOf(tuple(allowed), says if says is not None else "one of", note)
    elif file or template:
        rule = File(template)
    metadata = {RULE: rule} if rule else {}
    return field(default=default, default_factory=factory, metadata=metadata)


def _declared_rule(cls: type, name: str) -> Rule | None:
    """The rule ``cls`` declares for field ``name``, or a base's when ``cls`` only changes its default."""
    for base in cls.__mro__:
        if dataclasses.is_dataclass(base):
            for f in dataclasses.fields(base):
                if f.name == name and RULE in f.metadata:
                    return f.metadata[RULE]
    return None


@functools.cache
def rules_of(cls: type) -> dict[str, tuple[Rule, bool, bool]]:
    """Each ruled field of ``cls``: its rule, whether its type admits None (None then passes), and
    whether it is a list (each item is checked)."""
    hints = typing.get_type_hints(cls)
    ruled = {}
    for f in dataclasses.fields(cls):
        rule = _declared_rule(cls, f.name)
        if rule is not None:
            hint = hints[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            optional = union and type(None) in typing.get_args(hint)
            ruled[f.name] = (rule, optional, typing.get_origin(hint) is list)
    return ruled


def refusal(rule: Rule, value: Any, optional: bool, is_list: bool) -> tuple[Any, str] | None:
    """The value refused and why, or None when ``rule`` allows ``value``."""
    if value is None and optional:
        return None
    if isinstance(rule, File):
        problem = rule.problem(value) if value else None
        return (value, problem) if problem else None
    if is_list and not isinstance(value, Iterable):
        return None  # not a list at all: the section's check says what it needs
    for item in value if is_list else [value]:
        ok = rule.allows(item) if isinstance(rule, Range) else item in rule.names
        if not ok:
            return item, rule.why()
    return None


# ---------------------------------------------------------------- sections and the checking loop


class Section:
    """A group of settings: a dataclass whose fields may declare a rule (:func:`setting`) and whose
    :meth:`check` holds the rules that tie its fields together. The class made with ``root=True``
    (the whole config) is the tree whose places name refusals."""

    root: typing.ClassVar[type | None] = None

    def __init_subclass__(cls, root: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if root:
            Section.root = cls

    def __post_init__(self) -> None:
        if not _UNCHECKED.get():  # the sections inside were checked when they were made
            check_own(self, place_of(type(self)))

    def check(self) -> None:
        """The rules that tie this section's fields together; each field's own rule is declared."""


def check(section: Section, where: str = "") -> None:
    """Check ``section``, which sits at ``where`` (``roles.judge.``), and every section inside it, inner
    ones first. Raises :class:`ConfigError` naming the first refused setting by its full dotted key."""
    for f in dataclasses.fields(section):
        inner = getattr(section, f.name)
        if isinstance(inner, Section):
            check(inner, f"{where}{f.name}.")
    check_own(section, where)


def check_own(section: Section, where: str) -> None:
    """The one checking loop: each of ``section``'s own fields against its declared rule, in order, then
    the section's :meth:`Section.check`; a refusal is named at ``where``."""
    ruled = rules_of(type(section))
    for f in dataclasses.fields(section):
        if f.name in ruled:
            rule, optional, is_list = ruled[f.name]
            refused = refusal(rule, getattr(section, f.name), optional, is_list)
            if refused:
                raise ConfigError(f.name, refused[0], refused[1], where)
    try:
        section.check()
    except ConfigError as error:
        raise error.at(where) from None


_UNCHECKED = contextvars.ContextVar("metareward_config_unchecked", default=False)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Sections made inside are not checked as they are made: the caller checks the finished tree
    with :func:`check`, which names each refusal at its real place."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)


@functools.cache
def _places() -> dict[type, str]:
    places: dict[type, str] = {}
    queue = [(Section.root, "")] if Section.root else []
    for cls, where in queue:  # breadth first: a class's usual place is its shallowest one
        if cls in places:
            continue
        places[cls] = where
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = hints[f.name]
            if isinstance(inner, type) and issubclass(inner, Section):
                queue.append((inner, f"{where}{f.name}."))
    return places


def place_of(cls: type) -> str:
    """Where sections of ``cls`` usually sit in the root config (``generator.vllm.``); "" for the root
    and for a class that sits nowhere (a base such as the sampling settings)."""
    return _places().get(cls, "")
