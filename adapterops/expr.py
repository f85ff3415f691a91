"""A small, safe expression language over adapters: ``(code - math) * 0.5 + ties(a, b, density=0.3)``.

Grammar (precedence climbing; ``*`` and ``/`` bind tighter than ``+`` and ``-``, all left-assoc.)::

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("-" | "+") unary | atom
    atom    := NUMBER | NAME | NAME "(" args ")" | "(" expr ")"
    args    := [arg ("," arg)* [","]]
    arg     := expr | NAME "=" value
    value   := expr | STRING | "true" | "false" | "[" expr ("," expr)* "]"

Names are the adapters bound by the caller (``NAME=PATH`` on the command line); the only callable
names are the merge methods of ``adapterops.methods`` (``ties``, ``knots_ties``, ...), called as
``method(adapter, ..., option=value, ...)`` and evaluated by ``adapterops.blend``; ``weights=[...]``
gives one weight per adapter (default 1 each), ``rank=``/``energy=``/``budget=`` the call's
re-compression. Numbers scale adapters; adapter + adapter and adapter - adapter are the exact sums.
Nothing else exists: no attributes, no indexing, no other calls. The text is read by the tokenizer
and parser below and never handed to Python's ``eval``; an error names the 1-based column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from .adapter import Adapter
from .errors import AdapterOpsError

__all__ = ["Expr", "ExpressionError", "parse", "names", "evaluate"]

MAX_DEPTH = 64  # nesting deeper than this is refused (before Python's recursion limit is near)
MAX_OPERATORS = 100  # binary operators per expression: bounds the depth of a left-leaning chain too

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>'[^'\\]*'|"[^"\\]*")
      | (?P<op>[-+*/(),=\[\]])
    """,
    re.VERBOSE,
)


class ExpressionError(AdapterOpsError):
    """An expression that does not parse or has no value; ``column`` (1-based) says where.

    ``str()`` is one self-contained line; ``caret()`` adds the expression with a ``^`` under the column.
    """

    def __init__(self, message: str, expression: str = "", column: int = 0) -> None:
        self.message, self.expression, self.column = message, expression, column
        super().__init__(f"expression, column {column}: {message}" if column else f"expression: {message}")

    def caret(self) -> str:
        if not self.column:
            return ""
        return f"  {self.expression}\n  {' ' * (self.column - 1)}^"


@dataclass(frozen=True)
class _Token:
    kind: str  # number, name, string, op, end
    text: str
    col: int  # 1-based


# --------------------------------------------------------------------------------------------
# Syntax tree


@dataclass(frozen=True)
class Num:
    value: float
    col: int


@dataclass(frozen=True)
class Ref:
    name: str
    col: int


@dataclass(frozen=True)
class Unary:
    op: str
    operand: Expr
    col: int


@dataclass(frozen=True)
class Binary:
    op: str
    left: Expr
    right: Expr
    col: int


@dataclass(frozen=True)
class Str:
    value: str
    col: int


@dataclass(frozen=True)
class Bool:
    value: bool
    col: int


@dataclass(frozen=True)
class List:
    items: tuple[Expr, ...]
    col: int


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr, int], ...]  # (name, value, column of the name)
    col: int


Expr = Union[Num, Ref, Unary, Binary, Str, Bool, List, Call]


# --------------------------------------------------------------------------------------------
# Tokenizer and parser


def _tokens(text: str) -> list[_Token]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch == ".":
                raise ExpressionError("attribute access ('.') is not allowed: use names, numbers, + - * / and method calls", text, pos + 1)
            if ch in "'\"":
                raise ExpressionError("unterminated string", text, pos + 1)
            raise ExpressionError(f"unexpected character {ch!r}", text, pos + 1)
        if m.lastgroup != "space":
            out.append(_Token(m.lastgroup, m.group(), pos + 1))
        pos = m.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.operators = 0

    def peek(self) -> _Token:
        return self.toks[self.i]

    def take(self) -> _Token:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, message: str, tok: _Token | None = None) -> ExpressionError:
        tok = tok or self.peek()
        return ExpressionError(message, self.text, tok.col)

    def expect(self, op: str, context: str) -> _Token:
        tok = self.peek()
        if tok.kind != "op" or tok.text != op:
            raise self.fail(f"expected '{op}' {context}, found {_describe(tok)}")
        return self.take()

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            raise self.fail("empty expression")
        node = self.expr()
        if self.peek().kind != "end":
            raise self.fail(f"unexpected {_describe(self.peek())} after a complete expression")
        return node

    def expr(self) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"expression nested more than {MAX_DEPTH} deep")
        node = self.term()
        while self.peek().kind == "op" and self.peek().text in "+-":
            op = self.operator()
            node = Binary(op.text, node, self.term(), op.col)
        self.depth -= 1
        return node

    def term(self) -> Expr:
        node = self.unary()
        while self.peek().kind == "op" and self.peek().text in "*/":
            op = self.operator()
            node = Binary(op.text, node, self.unary(), op.col)
        return node

    def operator(self) -> _Token:
        self.operators += 1
        if self.operators > MAX_OPERATORS:
            raise self.fail(f"more than {MAX_OPERATORS} operators in one expression")
        return self.take()

    def unary(self) -> Expr:
        tok = self.peek()
        if tok.kind == "op" and tok.text in "+-":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"expression nested more than {MAX_DEPTH} deep", tok)
            node = Unary(tok.text, self.unary(), tok.col)
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Expr:
        tok = self.take()
        if tok.kind == "number":
            value = float(tok.text)
            if not math.isfinite(value):
                raise self.fail(f"the number {tok.text} is too large", tok)
            return Num(value, tok.col)
        if tok.kind == "name":
            if self.peek().kind == "op" and self.peek().text == "(":
                return self.call(tok)
            return Ref(tok.text, tok.col)
        if tok.kind == "op" and tok.text == "(":
            node = self.expr()
            self.expect(")", f"to close the '(' at column {tok.col}")
            return node
        if tok.kind == "string":
            raise self.fail("a string can only be the value of a keyword option (name='text')", tok)
        raise self.fail(f"expected a name, a number or '(', found {_describe(tok)}", tok)

    def call(self, name: _Token) -> Call:
        opened = self.take()  # "("
        args: list[Expr] = []
        kwargs: list[tuple[str, Expr, int]] = []
        while not (self.peek().kind == "op" and self.peek().text == ")"):
            tok, nxt = self.peek(), self.toks[self.i + 1]
            if tok.kind == "name" and nxt.kind == "op" and nxt.text == "=":
                self.take(), self.take()
                if any(k == tok.text for k, _, _ in kwargs):
                    raise self.fail(f"option {tok.text!r} given twice", tok)
                kwargs.append((tok.text, self.value(), tok.col))
            elif kwargs:
                raise self.fail("positional argument after a keyword option", tok)
            else:
                args.append(self.expr())
            if self.peek().kind == "op" and self.peek().text == ",":
                self.take()
            elif not (self.peek().kind == "op" and self.peek().text == ")"):
                raise self.fail(f"expected ',' or ')' in the call of {name.text} at column {name.col}, found {_describe(self.peek())}")
        self.expect(")", f"to close the '(' at column {opened.col}")
        return Call(name.text, tuple(args), tuple(kwargs), name.col)

    def value(self) -> Expr:
        tok = self.peek()
        if tok.kind == "string":
            self.take()
            return Str(tok.text[1:-1], tok.col)
        if tok.kind == "name" and tok.text.lower() in ("true", "false"):
            after = self.toks[self.i + 1]
            if after.kind == "end" or (after.kind == "op" and after.text in ",)"):
                self.take()
                return Bool(tok.text.lower() == "true", tok.col)
        if tok.kind == "op" and tok.text == "[":
            self.take()
            items = [self.expr()]
            while self.peek().kind == "op" and self.peek().text == ",":
                self.take()
                if self.peek().kind == "op" and self.peek().text == "]":
                    break
                items.append(self.expr())
            self.expect("]", f"to close the '[' at column {tok.col}")
            return List(tuple(items), tok.col)
        return self.expr()


def _describe(tok: _Token) -> str:
    return "the end of the expression" if tok.kind == "end" else repr(tok.text)


def parse(text: str) -> Expr:
    """The syntax tree of ``text``; ExpressionError (with the column) when it is not well formed."""
    return _Parser(text).parse()


def names(expr: Expr) -> list[str]:
    """The adapter names ``expr`` refers to, in order of first use."""
    found: dict[str, None] = {}

    def walk(node: Expr) -> None:
        if isinstance(node, Ref):
            found.setdefault(node.name)
        for child in _children(node):
            walk(child)

    walk(expr)
    return list(found)


def _children(node: Expr) -> tuple[Expr, ...]:
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, List):
        return node.items
    if isinstance(node, Call):
        return node.args + tuple(v for _, v, _ in node.kwargs)
    return ()


# --------------------------------------------------------------------------------------------
# Evaluation

Value = Union[Adapter, float]


def evaluate(
    expr: Expr | str,
    bindings: Mapping[str, Adapter],
    *,
    device: Any = None,
    blend: Callable[..., Adapter] | None = None,
) -> Value:
    """The value of ``expr`` with its names bound to ``bindings``: an Adapter, or a number.

    Method calls go through ``blend`` (default ``adapterops.blend``) with ``device``. Errors
    (unbound names, adapter * adapter, a bad option) raise ExpressionError naming the column.
    """
    text = expr if isinstance(expr, str) else None
    tree = parse(expr) if isinstance(expr, str) else expr
    if blend is None:
        from . import blend

    return _Evaluator(text or "", bindings, device, blend).eval(tree)


class _Evaluator:
    def __init__(self, text: str, bindings: Mapping[str, Adapter], device: Any, blend: Callable[..., Adapter]) -> None:
        self.text, self.bindings, self.device, self.blend = text, bindings, device, blend

    def fail(self, message: str, col: int) -> ExpressionError:
        return ExpressionError(message, self.text, col)

    def eval(self, node: Expr) -> Value:
        if isinstance(node, Num):
            return node.value
        if isinstance(node, Ref):
            if node.name not in self.bindings:
                raise self.fail(f"name {node.name!r} is not bound; bind it as {node.name}=PATH", node.col)
            return self.bindings[node.name]
        if isinstance(node, Unary):
            value = self.eval(node.operand)
            try:
                return -value if node.op == "-" else value
            except AdapterOpsError as exc:  # e.g. a DoRA adapter
                raise self.fail(str(exc), node.col) from None
        if isinstance(node, Binary):
            return self.binary(node)
        if isinstance(node, Call):
            return self.call(node)
        what = {Str: "a string", Bool: "a boolean", List: "a list"}[type(node)]
        raise self.fail(f"{what} can only be the value of a keyword option", node.col)

    def binary(self, node: Binary) -> Value:
        left, right = self.eval(node.left), self.eval(node.right)
        la, ra = isinstance(left, Adapter), isinstance(right, Adapter)
        op = node.op
        if op in "+-" and la != ra:
            raise self.fail(f"cannot {'add' if op == '+' else 'subtract'} a number and an adapter; scale adapters with * or /", node.col)
        if op == "*" and la and ra:
            raise self.fail("an adapter can only be multiplied by a number (adapter * adapter is not defined)", node.col)
        if op == "/" and ra:
            raise self.fail("division by an adapter is not defined; divide adapters by numbers only", node.col)
        if op == "/" and right == 0:
            raise self.fail("division by zero", node.col)
        try:
            result = {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right, "/": lambda: left / right}[op]()
        except AdapterOpsError as exc:
            raise self.fail(str(exc), node.col) from None
        if not la and not ra and not math.isfinite(result):
            raise self.fail("the number overflows", node.col)
        return result

    def call(self, node: Call) -> Adapter:
        from .methods import get_method

        try:
            get_method(node.func)
        except AdapterOpsError as exc:
            raise self.fail(f"{node.func}() is not a merge method: {exc}", node.col) from None
        adapters = []
        for arg in node.args:
            value = self.eval(arg)
            if not isinstance(value, Adapter):
                raise self.fail(f"{node.func}() takes adapters as positional arguments, got the number {value:g}", _col(arg))
            adapters.append(value)
        if not adapters:
            raise self.fail(f"{node.func}() needs at least one adapter", node.col)
        options: dict[str, Any] = {}
        weights = [1.0] * len(adapters)
        for key, value_node, col in node.kwargs:
            if key in _RESERVED:
                raise self.fail(f"{key}= cannot be given in an expression ({_RESERVED[key]})", col)
            value = self.option(node.func, key, value_node)
            if key == "weights":
                if not isinstance(value, list) or len(value) != len(adapters):
                    raise self.fail(f"weights= needs a list of {len(adapters)} numbers, one per adapter, like weights=[0.6, 0.4]", col)
                weights = value
            else:
                options[key] = value
        try:
            return self.blend(adapters, weights, method=node.func, device=self.device, **options)
        except AdapterOpsError as exc:
            raise self.fail(f"{node.func}(): {exc}", node.col) from None

    def option(self, func: str, key: str, node: Expr) -> Any:
        if isinstance(node, (Str, Bool)):
            return node.value
        if isinstance(node, List):
            return [self.number(func, key, item) for item in node.items]
        return self.number(func, key, node)

    def number(self, func: str, key: str, node: Expr) -> float | int:
        value = self.eval(node)
        if isinstance(value, Adapter):
            raise self.fail(f"option {key}= of {func}() must be a number, got an adapter", _col(node))
        return int(value) if value.is_integer() and key in ("rank", "budget", "seed") else value


_RESERVED = {
    "method": "the method is the function's name",
    "device": "the command's --device applies to every call",
    "adapters": "adapters are the positional arguments",
}


def _col(node: Expr) -> int:
    while isinstance(node, Binary):
        node = node.left
    return node.col
