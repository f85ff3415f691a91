"""The expression language: what it refuses (with the column), what it computes, and the eval command."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

import adapterops
from adapterops import Adapter, LoraLayer
from adapterops.cli import main
from adapterops.expr import ExpressionError, evaluate, names, parse

from train_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)


def make(rank: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({n: LoraLayer(torch.randn(rank, 7, generator=g, dtype=torch.float64), torch.randn(9, rank, generator=g, dtype=torch.float64), 2.0)
                    for n in ("q", "v")})


A, B, C = make(2, 1), make(3, 2), make(1, 3)
BOUND = {"a": A, "b": B, "c": C}


def column_of(text: str, **bindings) -> int:
    with pytest.raises(ExpressionError) as info:
        evaluate(text, bindings or BOUND)
    assert str(info.value).startswith(f"expression, column {info.value.column}: ")
    return info.value.column


# --------------------------------------------------------------------------------------------
# Refusals, each at its column


@pytest.mark.parametrize("text, column, message", [
    ("a.norm()", 2, "attribute access"),
    ("(a + b", 7, "expected ')' to close the '(' at column 1"),
    ("a + * b", 5, "expected a name, a number or '('"),
    ("a b", 3, "unexpected 'b' after a complete expression"),
    ("", 1, "empty expression"),
    ("a + 1;", 6, "unexpected character ';'"),
    ("a[0]", 2, "unexpected '['"),
    ("ties(a, density=0.3, b)", 22, "positional argument after a keyword option"),
    ("ties(a, density=0.3, density=0.4)", 22, "option 'density' given twice"),
    ("ties(a b)", 8, "expected ',' or ')' in the call of ties at column 1"),
    ("a + 'x'", 5, "a string can only be the value of a keyword option"),
    ("ties(a, majority_sign='total)", 23, "unterminated string"),
    ("-" * 200 + "a", 64, "nested more than 64 deep"),
    ("__import__('os')", 12, "a string can only be the value of a keyword option"),
    ("a + [1, 2]", 5, "expected a name, a number or '(', found '['"),
    ("a * 1e400", 5, "the number 1e400 is too large"),
    ("a" + " + a" * 150, 403, "more than 100 operators in one expression"),
    ("(" * 100 + "a" + ")" * 100, 65, "nested more than 64 deep"),
])
def test_syntax_errors_give_the_column(text, column, message):
    with pytest.raises(ExpressionError, match=re.escape(message)) as info:
        parse(text)
    assert info.value.column == column
    caret = info.value.caret().splitlines()
    assert caret == [f"  {text}", "  " + " " * (column - 1) + "^"]


@pytest.mark.parametrize("text, column, message", [
    ("__import__(a)", 1, "__import__\\(\\) is not a merge method: unknown merge method '__import__'"),
    ("eval(a)", 1, "eval\\(\\) is not a merge method"),
    ("a + open(b)", 5, "open\\(\\) is not a merge method"),
    ("a(b)", 1, "a\\(\\) is not a merge method"),
    ("a + d", 5, "name 'd' is not bound; bind it as d=PATH"),
    ("a * b", 3, "an adapter can only be multiplied by a number"),
    ("a / b", 3, "division by an adapter"),
    ("2 / (a - b)", 3, "division by an adapter"),
    ("a + 1", 3, "cannot add a number and an adapter"),
    ("1 - a", 3, "cannot subtract a number and an adapter"),
    ("a / (1 - 1)", 3, "division by zero"),
    ("core_linear()", 1, "needs at least one adapter"),
    ("core_linear(a, 2)", 16, "takes adapters as positional arguments, got the number 2"),
    ("core_linear(a, b, weights=[1])", 19, "weights= needs a list of 2 numbers"),
    ("core_linear(a, b, weights=0.5)", 19, "weights= needs a list of 2 numbers"),
    ("core_linear(a, density=b)", 24, "option density= of core_linear\\(\\) must be a number, got an adapter"),
    ("ties(a, method='linear')", 9, "method= cannot be given in an expression"),
    ("ties(a, device='cuda')", 9, "device= cannot be given in an expression"),
])
def test_evaluation_errors_give_the_column(text, column, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate(text, BOUND)
    assert column_of(text) == column


def test_names_lists_the_adapters_used_in_order():
    assert names(parse("(code - math) * 0.5 + ties(a, b, density=0.3) - code")) == ["code", "math", "a", "b"]


# --------------------------------------------------------------------------------------------
# Values


def delta(adapter: Adapter) -> torch.Tensor:
    return torch.stack([adapter.delta(n) for n in ("q", "v")])


@pytest.mark.parametrize("text, expected", [
    ("(a - b) * 0.5 + 2 * c", lambda: 0.5 * (delta(A) - delta(B)) + 2 * delta(C)),
    ("a + b * 2", lambda: delta(A) + 2 * delta(B)),
    ("a - b - c", lambda: delta(A) - delta(B) - delta(C)),
    ("-a / 4", lambda: -delta(A) / 4),
    ("--a", lambda: delta(A)),
    ("+a", lambda: delta(A)),
    ("1e-1 * a * .5 + (2 - 3) * b", lambda: 0.05 * delta(A) - delta(B)),
    ("a / 2 / 4", lambda: delta(A) / 8),
])
def test_arithmetic_is_exact(text, expected):
    torch.testing.assert_close(delta(evaluate(text, BOUND)), expected(), rtol=1e-12, atol=1e-12)


def test_numbers_alone_evaluate_to_numbers():
    assert evaluate("(1 + 2) * 3 - 4 / 8", {}) == 8.5


def test_calls_go_to_blend_with_adapters_weights_and_options():
    calls = []

    def blend(adapters, weights, **kwargs):
        calls.append((adapters, weights, kwargs))
        return adapters[0]

    evaluate("ties(a, b * 2, density=0.3, majority_sign='frequency', rank=4) + dare_ties(c, weights=[0.5], seed=7, ties=false)",
             BOUND, device="cpu", blend=blend)
    (first, w1, k1), (second, w2, k2) = calls
    assert first[0] is A and w1 == [1.0, 1.0]
    torch.testing.assert_close(delta(first[1]), 2 * delta(B))
    assert k1 == {"method": "ties", "device": "cpu", "density": 0.3, "majority_sign": "frequency", "rank": 4}
    assert isinstance(k1["rank"], int)
    assert second == [C] and w2 == [0.5] and k2 == {"method": "dare_ties", "device": "cpu", "seed": 7, "ties": False}


def test_a_real_method_call_evaluates():
    value = evaluate("core_linear(a, b, weights=[0.6, -0.4], energy=1.0) * 2", BOUND)
    torch.testing.assert_close(delta(value), 2 * (0.6 * delta(A) - 0.4 * delta(B)), rtol=1e-9, atol=1e-9)


def test_method_errors_carry_the_column():
    with pytest.raises(ExpressionError, match="column 5: core_ties\\(\\): .*density must be in"):
        evaluate("a + core_ties(a, b, density=2)", BOUND)


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def files(tmp_path):
    for name, adapter in (("a", A), ("b", B), ("c", C)):
        adapter.save(tmp_path / f"{name}.st")
    return tmp_path


def test_eval_writes_the_value(files):
    out = files / "out.st"
    result = CliRunner().invoke(main, ["eval", "(x - y) * 0.5", f"x={files / 'a.st'}", f"y={files / 'b.st'}", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["expression"] == "(x - y) * 0.5" and data["rank"] == 5 and data["ranks"] == {"q": 5, "v": 5}
    torch.testing.assert_close(delta(adapterops.load(out)).double(), 0.5 * (delta(A) - delta(B)), rtol=1e-6, atol=1e-6)


def test_eval_re_compresses_when_asked(files):
    out = files / "out.st"
    result = CliRunner().invoke(main, ["eval", "x + y", f"x={files / 'a.st'}", f"y={files / 'b.st'}", "-o", str(out), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert adapterops.load(out).ranks == {"q": 2, "v": 2}
    assert result.stdout.startswith(f"wrote {out}: 2 layers, rank 2")


@pytest.mark.parametrize("text, first", [
    ("(x - y * 0.5", "expression, column 13: expected ')' to close the '(' at column 1, found the end of the expression"),
    ("(x - y) * x", "expression, column 9: an adapter can only be multiplied by a number (adapter * adapter is not defined)"),
])
def test_eval_expression_errors_point_at_the_column_in_one_line(files, text, first):
    out = files / "out.st"
    result = CliRunner().invoke(main, ["eval", text, f"x={files / 'a.st'}", f"y={files / 'b.st'}", "-o", str(out)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: {first} (in {text!r})"]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["x + z", "x=A"], "Error: z not bound; add z=PATH"),
    (["x", "x"], "Error: 'x' is not a binding; write NAME=PATH"),
    (["x", "x=A", "x=B"], "Error: x is bound twice"),
    (["2 * 3"], "Error: the expression is the number 6, not an adapter; nothing to write"),
    (["x + y", "x=A", "y=MISSING"], "Error: "),
])
def test_eval_refuses_with_one_line(files, args, message):
    out = files / "out.st"
    paths = {"A": files / "a.st", "B": files / "b.st", "MISSING": files / "missing.st"}
    args = [a[:2] + str(paths[a[2:]]) if a[2:] in paths else a for a in args]
    result = CliRunner().invoke(main, ["eval", *args, "-o", str(out)])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert not out.exists()


def test_eval_never_overwrites_an_input(files):
    source = files / "a.st"
    before = source.read_bytes()
    result = CliRunner().invoke(main, ["eval", "x * 2", f"x={source}", "-o", str(source), "--force"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "input" in result.stderr
    assert source.read_bytes() == before


def test_eval_notes_unused_bindings(files):
    result = CliRunner().invoke(main, ["eval", "x", f"x={files / 'a.st'}", f"y={files / 'missing.st'}", "-o", str(files / "o.st")])
    assert result.exit_code == 0, result.output
    assert "note: y is bound but not used" in result.stderr


def test_an_expression_that_begins_with_a_minus_goes_after_double_dash(files):
    out = files / "neg.st"
    misread = CliRunner().invoke(main, ["eval", "-x + y", f"x={files / 'a.st'}", f"y={files / 'b.st'}", "-o", str(out)])
    assert misread.exit_code == 2 and misread.stderr.count("\n") == 1
    assert "An expression that begins with '-' goes after '--', the options before it: " in misread.stderr and " eval -o OUT -- EXPRESSION" in misread.stderr
    typo = CliRunner().invoke(main, ["eval", "--forse", "x", f"x={files / 'a.st'}", "-o", str(out)])
    assert typo.exit_code == 2 and "goes after '--'" not in typo.stderr  # a misspelt option is not an expression
    result = CliRunner().invoke(main, ["eval", "-o", str(out), "--", "-x + y", f"x={files / 'a.st'}", f"y={files / 'b.st'}"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(delta(adapterops.load(out)).double(), delta(B) - delta(A), rtol=1e-6, atol=1e-6)
