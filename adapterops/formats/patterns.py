"""PEFT's ``rank_pattern`` / ``alpha_pattern`` rule, evaluated in time linear in the module name.

PEFT (``peft.utils.other.get_pattern_key``) takes, in the config's key order, the first key for
which ``re.match(rf"(.*\\.)?({key})$", module)`` succeeds, and otherwise looks ``module`` itself up
in the dict. Python's ``re`` backtracks, so a key like ``(.|.)*z`` takes exponential time on a long
name: a config could hang every tool that loads the adapter.

Here the same pattern string is parsed by Python's own regex parser (so the syntax means exactly
what it means to ``re``) and run as a Thompson NFA simulation (Thompson 1968; Cox 2007, "Regular
Expression Matching Can Be Simple And Fast"): a set of NFA states advanced one character at a
time, ``O(len(module) * states)``. Whether a match exists does not depend on the order in which a
backtracking engine tries alternatives, so the answer equals ``re.match``'s for every construct
evaluated here (literals, classes, ``.``, ``\\d\\w\\s``, groups, alternation, greedy and lazy
repeats, ``^ $ \\A \\Z \\b \\B``). Constructs whose meaning is not a regular language
(backreferences, lookaround, atomic groups, possessive repeats, conditionals), flags that change
matching (``(?i)``, ``(?m)``, ``(?s)``, ``(?a)``, ``(?L)``), and patterns whose NFA would exceed
``MAX_STATES`` states are refused with a ``FormatError`` naming the key.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from ..errors import FormatError

__all__ = ["MAX_STATES", "pattern_key", "matches"]

MAX_STATES = 20_000  # a key is a module path or a short regex; this is far above any real one
_ALLOWED_FLAGS = _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_VERBOSE  # VERBOSE only affects parsing
_FLAG_NAMES = {
    _c.SRE_FLAG_IGNORECASE: "(?i)", _c.SRE_FLAG_MULTILINE: "(?m)", _c.SRE_FLAG_DOTALL: "(?s)",
    _c.SRE_FLAG_ASCII: "(?a)", _c.SRE_FLAG_LOCALE: "(?L)",
}
_REFUSED = {
    "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group", "ASSERT": "a lookaround",
    "ASSERT_NOT": "a lookaround", "ATOMIC_GROUP": "an atomic group", "POSSESSIVE_REPEAT": "a possessive repeat",
}


class _Refused(Exception):
    """The pattern uses something this matcher does not evaluate (message: what)."""


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_NOT_DIGIT": lambda ch: not ch.isdecimal(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda ch: not ch.isspace(),
    "CATEGORY_WORD": _is_word,
    "CATEGORY_NOT_WORD": lambda ch: not _is_word(ch),
}


def _at(kind: str, text: str, pos: int) -> bool:
    """Zero-width assertion ``kind`` at ``pos`` of ``text`` (no MULTILINE: refused above)."""
    n = len(text)
    if kind in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        return pos == 0
    if kind == "AT_END":  # `$`: the end, or just before a final newline
        return pos == n or (pos == n - 1 and text[-1] == "\n")
    if kind == "AT_END_STRING":
        return pos == n
    if n == 0:  # sre: no word boundary in an empty string, and (before 3.14) no non-boundary either
        return kind == "AT_NON_BOUNDARY" and sys.version_info >= (3, 14)
    boundary = (pos > 0 and _is_word(text[pos - 1])) != (pos < n and _is_word(text[pos]))
    return boundary if kind == "AT_BOUNDARY" else not boundary


class _Program:
    """An NFA: state i is ("char", test, next), ("split", [next...]), ("at", kind, next) or ("match",)."""

    def __init__(self, tree: Any) -> None:
        self.states: list[list[Any]] = [["match"]]
        self.start = self._sequence(tree, 0)

    def _new(self, state: list[Any]) -> int:
        if len(self.states) >= MAX_STATES:
            raise _Refused(f"it would need more than {MAX_STATES:,} NFA states")
        self.states.append(state)
        return len(self.states) - 1

    def _sequence(self, items: Any, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self._item(str(op), av, nxt)
        return nxt

    def _item(self, op: str, av: Any, nxt: int) -> int:
        if op == "LITERAL":
            return self._new(["char", lambda ch, c=chr(av): ch == c, nxt])
        if op == "NOT_LITERAL":
            return self._new(["char", lambda ch, c=chr(av): ch != c, nxt])
        if op == "ANY":
            return self._new(["char", lambda ch: ch != "\n", nxt])
        if op == "IN":
            return self._new(["char", _char_set(av), nxt])
        if op == "AT":
            return self._new(["at", str(av), nxt])
        if op == "BRANCH":
            return self._new(["split", [self._sequence(alt, nxt) for alt in av[1]]])
        if op == "SUBPATTERN":
            _group, add_flags, _del_flags, sub = av
            _check_flags(add_flags)
            return self._sequence(sub, nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of matches
            return self._repeat(*av, nxt)
        raise _Refused(_REFUSED.get(op, f"the construct {op}"))

    def _repeat(self, low: int, high: int, sub: Any, nxt: int) -> int:
        unbounded = high == _c.MAXREPEAT
        if low > MAX_STATES or (not unbounded and high > MAX_STATES):
            raise _Refused(f"a repeat count above {MAX_STATES:,}")
        if unbounded:  # loop: split -> (sub -> split) | nxt
            loop = self._new(["split", []])
            self.states[loop][1] = [self._sequence(sub, loop), nxt]
            tail = loop
        else:  # optional copies, nested: (sub (sub ...)?)?
            tail = nxt
            for _ in range(high - low):
                tail = self._new(["split", [self._sequence(sub, tail), nxt]])
        for _ in range(low):
            tail = self._sequence(sub, tail)
        return tail

    def matches(self, text: str) -> bool:
        """Whether the pattern matches a prefix of ``text`` (``re.match`` semantics)."""
        current = self._closure([self.start], text, 0)
        for pos, ch in enumerate(text):
            if 0 in current:
                return True
            step = [s[2] for s in (self.states[i] for i in current) if s[0] == "char" and s[1](ch)]
            current = self._closure(step, text, pos + 1)
            if not current:
                return False
        return 0 in current

    def _closure(self, starts: list[int], text: str, pos: int) -> set[int]:
        """States reachable from ``starts`` without consuming a character, at ``pos``."""
        seen: set[int] = set()
        stack = list(starts)
        out = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            state = self.states[i]
            if state[0] == "split":
                stack.extend(state[1])
            elif state[0] == "at":
                if _at(state[1], text, pos):
                    stack.append(state[2])
            else:
                out.add(i)
        return out


def _check_flags(flags: int) -> None:
    bad = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    if bad:
        raise _Refused(f"the flag {bad[0]}")


def _char_set(items: list[tuple[Any, Any]]) -> Callable[[str], bool]:
    """A test for one character against a ``[...]`` class (or ``\\d``, which parses to one)."""
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        op = str(op)
        if op == "NEGATE":
            negate = True
        elif op == "LITERAL":
            tests.append(lambda ch, c=chr(av): ch == c)
        elif op == "RANGE":
            tests.append(lambda ch, lo=av[0], hi=av[1]: lo <= ord(ch) <= hi)
        elif op == "CATEGORY" and str(av) in _CATEGORIES:
            tests.append(_CATEGORIES[str(av)])
        else:
            raise _Refused(f"the class item {op} {av}")
    return lambda ch: any(t(ch) for t in tests) != negate


_STRAIGHT = {"LITERAL", "NOT_LITERAL", "ANY", "IN", "AT"}


def _straight(items: Any) -> bool:
    """No repeat and no alternation: each start position costs O(len(pattern))."""
    for op, av in items:
        if str(op) == "SUBPATTERN":
            if not _straight(av[3]):
                return False
        elif str(op) not in _STRAIGHT:
            return False
    return True


@lru_cache(maxsize=4096)
def _compile(key: str) -> Callable[[str], Any]:
    """A linear-time test of PEFT's ``(.*\\.)?(key)$`` against a module name."""
    pattern = rf"(.*\.)?({key})$"
    try:
        tree = _sre_parse.parse(pattern)
    except _c.error as exc:
        raise _Refused(f"not a valid regular expression: {exc}") from None
    except (RecursionError, OverflowError):
        raise _Refused("nested too deeply or too large to parse") from None
    _check_flags(tree.state.flags & ~_ALLOWED_FLAGS)
    items = list(tree)
    if _dump(items[:1]) == _PREFIX and _straight(items[1:]):
        # `.*` backtracks over the name once and the rest is a fixed sequence of one-character
        # tests, so Python's own engine is linear here: use it (the common case, and fast).
        return re.compile(pattern).match
    try:
        return _Program(tree).matches
    except RecursionError:
        raise _Refused("nested too deeply") from None


def _dump(items: Any) -> Any:
    """A parse tree as plain nested tuples (its SubPattern nodes compare by identity)."""
    if isinstance(items, (list, tuple, _sre_parse.SubPattern)):
        return tuple(_dump(x) for x in items)
    return str(items) if isinstance(items, _c._NamedIntConstant) else items


_PREFIX = _dump(list(_sre_parse.parse(r"(.*\.)?")))


def matches(key: str, module: str) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", module) is not None``, in linear time; _Refused otherwise."""
    return bool(_compile(key)(module))


def pattern_key(patterns: Mapping[str, Any], module: str, *, field: str = "pattern", source: str = "") -> str | None:
    """The key of ``patterns`` that PEFT applies to ``module``, or None (PEFT's rule, module docstring).

    A key this matcher refuses raises FormatError naming ``field`` and ``source``.
    """
    for key in patterns:
        try:
            if matches(key, module):
                return key
        except _Refused as exc:
            where = f"{source}: " if source else ""
            raise FormatError(f"{where}{field} key {key!r} cannot be evaluated safely ({exc}); use a plain module path or a simpler regex") from None
    return module if module in patterns else None
