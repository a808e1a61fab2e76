"""grading.py: the last brace-matched boxed answer, and answer equivalence on a table of equal and
unequal pairs that holds in both argument orders, with and without sympy (each judgement call in
grading's docstring has rows here). Pure Python, seconds.
Run: .venv/bin/python -m pytest tests/test_grading.py -q"""
import pytest

import grading


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{4}.", "4"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, {2}\\}}", "\\{1, {2}\\}"),
    ("\\fbox{x+1}", "x+1"),
    ("answer $\\boxed 5$", "5"),
    ("\\boxed{3} and a cut off \\boxed{4", "3"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}} and \\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("", None),
])
def test_extract_boxed(text, want):
    assert grading.extract_boxed(text) == want


EQUIV = [
    # equal
    ("4", "4", True), ("  4 ", "4", True), ("4.", "4", True), ("1,000", "1000", True), ("1{,}000", "1000", True),
    ("1\\,000", "1000", True), ("-3", "-3", True), ("0.5", ".5", True), ("0.50", "0.5", True), ("2.0", "2", True),
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "0.75", True), ("\\tfrac{1}{3}", "\\frac13", True),
    ("\\frac12", "1/2", True), ("-\\frac{1}{2}", "-0.5", True), ("\\frac{-1}{2}", "-1/2", True),
    ("\\frac{1}{3}", "0.33333", True), ("50\\%", "50", True), ("50\\%", "0.5", True), ("0.5", "50%", True),
    ("25%", "\\frac{1}{4}", True), ("\\text{5}", "5", True), ("\\mathrm{5}", "5", True), ("\\mbox{yes}", "Yes", True),
    ("yes", "YES", True), ("\\left(1, 2\\right)", "(1,2)", True), ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True), ("30°", "30", True), ("\\!5", "5", True), ("$5$", "5", True), ("\\$5", "5", True),
    ("x = 5", "5", True),
    ("y=2x+1", "2x+1", True), ("5 cm", "5", True), ("10 dollars", "10", True), ("1,000 dollars", "1000", True),
    ("3 meters", "3", True), ("5\\text{ cm}^2", "5", True), ("12 square units", "12", True), ("(1, 2)", "(1,2)", True),
    ("[0, 1)", "[0,1)", True), ("(-\\infty, 3]", "(-\\infty,3]", True), ("x \\in [0, 1)", "[0,1)", True),
    ("(\\frac12, 0.25)", "(0.5,\\frac{1}{4})", True), ("\\sqrt{2}", "\\sqrt2", True), ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True), ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", True),
    ("\\pi", "\\pi", True), ("2\\pi", "2 \\pi", True), ("\\frac{\\pi}{2}", "\\pi/2", True), ("(B)", "B", True),
    ("\\text{(C)}", "C", True), ("\\boxed{7}", "7", True), ("1, 2", "2, 1", True), ("2^{10}", "1024", True),
    ("10^3", "1000", True), ("\\theta = 45^\\circ", "45", True), ("1.5e-3", "0.0015", True),
    ("\\frac a b", "\\frac{a}{b}", True), ("\\sqrt x", "\\sqrt{x}", True), ("\\pi r^2", "\\pi  r^2", True),
    # not equal
    ("1/2", "2", False), ("(1,2)", "(2,1)", False), ("3.1", "3.14", False), ("123456", "123457", False),
    ("5", "-5", False), ("0.5", "5", False), ("50", "0.5", False), ("25\\%", "0.5", False), ("[0,1)", "[0,1]", False),
    ("(0,1)", "[0,1]", False), ("(1,2)", "(1,2,3)", False), ("\\sqrt{2}", "\\sqrt{3}", False), ("2\\pi", "\\pi", False),
    ("\\frac{1}{3}", "0.33", False), ("", "5", False), (None, "5", False), ("A", "B", False), ("(A)", "(B)", False),
    ("x = 6", "5", False), ("1000", "100", False), ("1,001", "1000", False), ("10^3", "100", False),
    ("\\frac{2}{3}", "\\frac{3}{2}", False), ("-\\frac12", "\\frac12", False), ("1, 2", "1, 3", False),
    ("\\text{yes}", "no", False), ("0", "0.001", False), ("2x+1", "2x-1", False), ("\\infty", "-\\infty", False),
    ("\\boxed{}", "0", False),
    # AIME-style integers with leading zeros (answers are written 000-999)
    ("033", "33", True), ("-03", "-3", True), ("007", "7", True), ("000", "0", True), ("\\boxed{033}", "33", True),
    ("(01, 02)", "(1,2)", True), ("0033.5", "33.5", True),
    ("033", "34", False), ("0.33", "033", False), ("007", "70", False), ("-03", "3", False),
    # units: simple and compound, \text / \mbox / \mathrm, exponents, degrees
    ("3.0 \\text{ m/s}", "3", True), ("60 \\text{ km/h}", "60", True), ("9.8\\text{ m/s}^2", "9.8", True),
    ("12\\text{ cm}^2", "12", True), ("5\\,\\text{cm}", "5", True), ("7\\mbox{ km/h}", "7", True),
    ("4 \\mathrm{~cm}", "4", True), ("3\\text{ m}/\\text{s}", "3", True), ("60 km/h", "60", True), ("3 m/s", "3", True),
    ("45 degrees", "45", True), ("45^{\\circ}", "45^\\circ", True), ("\\frac{1}{2}\\text{ m}", "0.5", True),
    ("5 m", "5", False), ("3.0 \\text{ m/s}", "4", False), ("90^\\circ", "\\frac{\\pi}{2}", False),
    # percent: one side written with % also matches its value / 100; both with %: plain comparison
    ("50\\%", "\\frac{1}{2}", True), ("12.5\\%", "0.125", True), ("5%", "5\\%", True),
    ("50\\%", "0.5\\%", False), ("0.5", "50", False), ("5\\%", "0.5", False),
    # fractions and decimals
    ("3/4", "\\frac{3}{4}", True), ("\\dfrac{6}{8}", "0.75", True), ("\\frac{3\\pi}{4}", "3\\pi/4", True),
    ("0.333", "\\frac{1}{3}", False), ("\\frac{1}{4}", "0.2", False),
    # LaTeX spacing and brackets
    ("\\;7", "7", True), ("1\\!000", "1000", True), ("x = 5\\quad", "5", True), ("\\left[0, 1\\right)", "[0,1)", True),
    # tuples and intervals are ordered; sets unordered; a bare list counts as a set of solutions
    ("(2, 1)", "(1,2)", False), ("(0, 1]", "(0,1)", False),
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1, 2, 3\\}", "\\{3,1,2\\}", True),
    ("\\left\\{ 2, 1 \\right\\}", "\\{1,2\\}", True),
    ("\\lbrace 1, 2\\rbrace", "\\{2,1\\}", True), ("\\{1,2\\}", "2, 1", True),
    ("\\{\\frac12, 3\\}", "\\{3, 0.5\\}", True), ("\\{5\\}", "\\{5.0\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False), ("\\{1,2\\}", "\\{1,2,3\\}", False), ("\\{1,2\\}", "(1,2)", False),
    ("3, -1", "-1, 3", True), ("3, 1", "3", False),
    # binomials, roots, pi
    ("\\binom{5}{2}", "10", True), ("\\dbinom{10}{3}", "120", True), ("\\binom{6}{2}", "\\binom{6}{4}", True),
    ("\\binom{5}{2}", "20", False), ("\\sqrt{12}", "2\\sqrt{3}", True), ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt{2}", "1.41421", True), ("\\sqrt{2}", "1.41", False), ("2\\pi", "6.2832", True), ("\\pi", "3.14", False),
    # negative numbers
    ("- 5", "-5", True), ("(-1, -2)", "(-1,-2)", True), ("-\\frac{3}{2}", "-1.5", True), ("-1.5", "1.5", False),
    # thousands separators: a comma between groups of three digits is a thousands separator
    ("1,000,000", "1000000", True), ("12,345.5", "12345.5", True), ("1\\,000", "1,000", True), ("1,000", "1", False),
    # scientific notation
    ("1.5\\times10^{-3}", "0.0015", True), ("6.02 \\times 10^{23}", "6.02e23", True), ("3\\cdot 10^5", "300000", True),
    ("1e3", "1000", True), ("1.5\\times10^{-3}", "0.015", False),
    # text answers
    ("\\text{yes}", "yes", True), ("\\text{Monday}", "monday", True), ("\\textbf{No}", "no", True),
    ("\\text{no}", "yes", False), ("\\text{even}", "odd", False),
    # boxed extraction: nested braces, the last of several boxes, a cut-off last box, \fbox
    ("\\boxed{\\frac{1}{2}}", "0.5", True), ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", True),
    ("\\boxed{1} or \\boxed{2}", "2", True),
    ("\\boxed{1} or \\boxed{2}", "1", False), ("\\boxed{3} then \\boxed{4", "3", True),
    ("\\boxed{3} then \\boxed{4", "4", False),
    ("\\fbox{5}", "5", True), ("\\boxed{\\text{(B)}}", "B", True),
    # more clearly wrong pairs, near misses of the rules above (a set is a multiset here)
    ("033", "330", False), ("\\{1,2\\}", "\\{1,1,2\\}", False), ("12\\text{ cm}^2", "144", False),
    ("1.5e-3", "1.5e3", False), ("\\sqrt[3]{8}", "\\sqrt{8}", False), ("-\\binom{5}{2}", "10", False),
]


@pytest.mark.parametrize("use_sympy", [True, False])
def test_equivalence_table(use_sympy, monkeypatch):
    if not use_sympy:
        monkeypatch.setattr(grading, "_SYMPY", False)  # the no-sympy path must give the same table
    # both argument orders: a prediction and a gold answer in the same form must grade alike
    wrong = [(p, g, e) for p, g, e in EQUIV if grading.is_equiv(p, g) != e or grading.is_equiv(g, p) != e]
    assert wrong == []


SYMBOLIC = [("x^2+2x+1", "(x+1)^2", True), ("\\frac{x}{2}", "x/2", True), ("2(a+b)", "2a+2b", True),
            ("\\sin(\\pi/6)", "\\frac{1}{2}", True), ("\\pi r^2", "r^2\\pi", True), ("\\ln 2", "0.693147", True),
            ("x^2", "2x", False), ("x+1", "x+2", False), ("\\pi r^2", "\\pi r", False)]


@pytest.mark.skipif(not grading._sympy(), reason="sympy not installed")
def test_symbolic_equivalence_with_sympy():
    assert [grading.is_equiv(p, g) for p, g, _ in SYMBOLIC] == [e for _, _, e in SYMBOLIC]


def test_symbolic_cases_are_false_without_sympy(monkeypatch):
    monkeypatch.setattr(grading, "_SYMPY", False)
    assert not any(grading.is_equiv(p, g) for p, g, _ in SYMBOLIC)
    assert grading.is_equiv("\\frac{\\pi}{4}", "\\pi/4")  # numeric forms still work


def test_huge_numbers_are_cheap_and_unequal():
    # exact integer powers like 9^(9^9) must never be expanded (sympy runs with evaluate=False)
    for p in ("9^{9^{9}}", "2^{2^{2^{2^{2}}}}", "(10^{10})^{10^{10}}", "\\exp(\\exp(\\exp(9)))"):
        assert not grading.is_equiv(p, "3")
    assert grading.is_equiv("10^{400}", "10^{400}") and not grading.is_equiv("10^{400}", "10^{401}")
