"""Template extraction, number parsing and the safe evaluator of benchmarks/math23k_accuracy.py.

Synthetic problems only (written for these tests): the Math23k data need not be present, and
nothing here imports torch.
"""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import math23k_accuracy as m  # noqa: E402


@pytest.mark.parametrize("token, value", [
    ("12", 12.0), ("3.5", 3.5), ("50%", 0.5), ("12.5%", 0.125), ("(1/2)", 0.5), ("(3/4)", 0.75),
    ("1(5/6)", 1 + 5 / 6), ("2(1/4)", 2.25), ("(1.5/3)", 0.5),
])
def test_number_value(token, value):
    assert math.isclose(m.number_value(token), value)


@pytest.mark.parametrize("token", ["", "abc", "1/2", "(1/0)", "5%%", "--3"])
def test_number_value_rejects(token):
    with pytest.raises(ValueError):
        m.number_value(token)


def test_text_numbers_in_order_of_appearance():
    text = "小红有1(5/6)千克糖，吃了(1/3)，又买了2.5千克，占全部的40%，还剩7袋。"
    assert m.text_numbers(text) == ["1(5/6)", "(1/3)", "2.5", "40%", "7"]


@pytest.mark.parametrize("answer, value", [
    ("17", 17.0), ("2.5", 2.5), ("25%", 0.25), ("((4)/(7))", 4 / 7), ("7((2)/(3))", 7 + 2 / 3),
])
def test_parse_answer(answer, value):
    assert math.isclose(m.parse_answer(answer), value)


# (synthetic text, equation, expected template)
CASES = [
    ("Tom has 24 apples and buys 150% more. How many?", "x=24+24*150%", "N0 + N0 * N1"),
    ("每天看12页，看了3天，还剩5页。", "x=12*3+5", "N0 * N1 + N2"),
    ("一根绳长8米，用去(1/4)。", "x=8*(1-(1/4))", "(1 - N1) * N0"),         # 1 is a constant
    ("a circle of radius 5 m", "x=3.14*5^2", "3.14 * N0 ** 2"),           # power, constant 3.14
    ("售价60元，打八折后便宜了多少？", "x=60*(1-80%)", "(1 - 80 / 100) * N0"),  # 80% not in text
    ("共1(5/6)吨，运走(1/2)", "x=[1(5/6)-(1/2)]*2", "2 * (N0 - N1)"),         # brackets, mixed
    ("原价50元，现价是原价的0.8", "x=50*80%", "N0 * N1"),                   # 80% found by value 0.8
    ("甲3天，乙6天。", "x=1/((1/3)+(1/6))", "1 / (1 / N0 + 1 / N1)"),          # fraction of text numbers
]


@pytest.mark.parametrize("text, equation, template", CASES)
def test_extract_template(text, equation, template):
    got, numbers = m.extract_template(text, equation)
    assert got == template
    assert numbers == m.text_numbers(text)


@pytest.mark.parametrize("text, equation, template", CASES)
def test_round_trip(text, equation, template):
    """The template filled with the text's own numbers has the value of the original equation."""
    got, numbers = m.extract_template(text, equation)
    assert math.isclose(m.evaluate(got, numbers), m.equation_value(equation), rel_tol=1e-12)


def test_commutative_orders_are_one_template():
    text = "有5箱，每箱12个，又来3个"
    a, _ = m.extract_template(text, "x=5*12+3")
    b, _ = m.extract_template(text, "x=3+12*5")
    c, _ = m.extract_template(text, "x=[12*5]+3")
    assert a == b == c == "N0 * N1 + N2"
    assert m.normalise("N0-(N1-N2)") == "N0 + N2 - N1"
    assert m.normalise("N0/(N1/N2)") == "N0 * N2 / N1"


def test_other_problem_numbers_substitute():
    template, _ = m.extract_template("A 3 B 4", "x=(3+4)*2")
    assert m.evaluate(template, ["10", "20%"]) == pytest.approx((10 + 0.2) * 2)
    with pytest.raises(ValueError, match="N1"):
        m.evaluate(template, ["10"])          # a slot the problem does not have


def test_unparseable_equation():
    with pytest.raises(ValueError):
        m.extract_template("速度80千米每小时", "x=80千米/小时")


@pytest.mark.parametrize("source", [
    "__import__('os')", "__import__('os').system('true')", "N0.__class__", "open('f')",
    "(lambda: 1)()", "'a' * 3", "[1, 2]", "x", "N0 if 1 else 2", "1 < 2", "N0 // 2", "2 % 3",
    "True + 1", "1; 2",
])
def test_malicious_or_non_arithmetic_input_is_rejected(source):
    with pytest.raises(ValueError):
        m.evaluate(source, [1.0])


def test_rejection_message_names_the_problem():
    with pytest.raises(ValueError, match="not allowed in an arithmetic template"):
        m.evaluate("__import__('os')")


def test_evaluator_limits():
    assert m.evaluate("2^10") == 1024
    assert m.evaluate("[1+2]*(3-1)/4") == 1.5
    assert m.evaluate("-N0+1", [3]) == -2
    with pytest.raises(ValueError, match="power"):
        m.evaluate("9^9^9")
    with pytest.raises(ValueError, match="division by zero"):
        m.evaluate("1/(2-2)")
    with pytest.raises(ValueError, match="too long"):
        m.evaluate("1+" * 600 + "1")


def test_same_answer_tolerance():
    assert m.same_answer(100.0, 100.00999)
    assert not m.same_answer(100.0, 100.02)


def test_model_text_slots():
    p = m.Problem("0", "买了3本书，每本12.5元，打了80%的折扣", ["3", "12.5", "80%"], None, None)
    assert m.model_text(p, slots=False) == p.text
    assert m.model_text(p, slots=True) == "买了 n0 本书，每本 n1 元，打了 n2 % 的折扣"


def test_answer_table_scores_templates_by_answer():
    """A template counts as right when it gives the answer with the problem's numbers, whatever
    the gold template; a template needing more numbers than the problem has is simply wrong."""
    p = m.Problem("0", "有3箱，每箱4个", ["3", "4"], "N0 * N1", 12.0)
    assert m.answer_table([p], ["N0 * N1", "N0 + N1", "N1 * 3", "N0 * N1 * N2"]) == [[True, False, True, False]]
