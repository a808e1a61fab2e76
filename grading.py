"""
Answer grading (NPR.md section 6): the last brace-matched \\boxed{} of a response, and an equivalence
check for math answers: integers (leading zeros allowed: AIME writes 033), decimals (relative
tolerance), fractions (\\frac, \\dfrac, a/b), percentages, \\binom, \\text{}, \\left / \\right,
degrees, tuples, intervals and sets, units stripped; symbolic equality through sympy only when sympy
is importable (imported lazily).

Judgement calls (tests/test_grading.py pins each one):
- tuples and intervals are ordered; sets \\{...\\} and bare lists "1, 2" (a list of solutions) are
  compared unordered, as multisets, and a set equals the same bare list
- "1,000" is a thousand (a comma between groups of three digits); "1,2" is a list
- units go after a number: any \\text{ unit} ("m/s", "cm}^2") and words of two letters or more or
  with a slash ("5 cm", "60 km/h"); a lone letter stays ("5 m" != "5": it may be a product)
- a % on one side also matches its value / 100 ("50\\%" == "0.5"), but no % means no scaling
  ("0.5" != "50"), and "50\\%" != "0.5\\%"
- decimals match within a relative 1e-4 ("0.33333" == 1/3, "0.333" != 1/3, "3.14" != pi);
  degrees are dropped, never converted ("90^\\circ" != pi/2)
- a cut-off last \\boxed{ (generation ran out) falls back to the box before it

Used through npr.grade: distill's acceptance, grpo's reward and eval's accuracy. Standard library
only (sympy optional).
"""
import ast
import math
import re


def _match_brace(s, i):
    """Index of the '}' matching the '{' at s[i], or None."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (brace-matched), or of "\\boxed 5" (one token).
    A last box that is cut off falls back to the one before it. None when there is none."""
    text = text or ""
    hits = sorted(m.end() for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text))
    for i in reversed(hits):
        j = i
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            k = _match_brace(text, j)
            if k is not None:
                return text[j + 1:k].strip()
        elif j > i:  # "\boxed 5": the next run of non-space characters, up to a '$'
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group()
    return None


def _unwrap(s, cmds):
    """\\cmd{X} -> X for each command, brace-matched."""
    for cmd in cmds:
        i = s.find(cmd + "{")
        while i >= 0:
            j = _match_brace(s, i + len(cmd))
            if j is None:
                break
            s = s[:i] + s[i + len(cmd) + 1:j] + s[j + 1:]
            i = s.find(cmd + "{")
    return s


_UNIT = r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s./]*\}"  # \text{ cm}, \text{ m/s}
_UNIT_TEXT_RE = re.compile(r"(?<=[\d}])\s*" + _UNIT + r"(?:\s*(?:\^\s*\{?-?\d\}?|/\s*" + _UNIT + r"))*\s*$")
_UNIT_WORD_RE = re.compile(r"([-+]?\d[\d.,]*(?:/\d+)?)\s+"
                           r"(?:(?:[a-zA-Z]{2,}|[a-zA-Z]+/[a-zA-Z]+)\.?\s*)+(?:\^\{?\d\}?)?")


def normalize_answer(s) -> str:
    """A canonical string for comparison. Percent signs are dropped here ("50\\%" -> "50");
    is_equiv remembers them and also accepts the value / 100. Trailing unit words are dropped only
    after a plain number and when at least two letters long or with a slash ("5 cm" -> "5",
    "3 m/s" -> "3", but "5 m" stays)."""
    if s is None:
        return ""
    s = str(s).strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or s
    for a in ("\\!", "\\,", "\\;", "\\:", "\\qquad", "\\quad", "\\displaystyle", "\\$", "$"):
        s = s.replace(a, "")
    s = s.replace("\\ ", " ").replace("~", " ")
    s = _UNIT_TEXT_RE.sub("", s)  # "5\text{ cm}^2" -> "5", "3\text{ m/s}" -> "3"
    s = _unwrap(s, ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\boldsymbol"))
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\dbinom", "\\binom"), ("\\tbinom", "\\binom"),
                 ("\\lbrace", "\\{"), ("\\rbrace", "\\}")):
        s = s.replace(a, b)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "").replace("\\degree", "")
    s = s.replace("\\%", "").replace("%", "").strip().rstrip(".").strip()
    m = re.fullmatch(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)", s, re.S)
    if m and "=" not in m.group(1):  # "x = 5" -> "5", "x \in [0, 1)" -> "[0, 1)"
        s = m.group(1)
    m = _UNIT_WORD_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # "1,000" is a thousand, not a pair
        s = s.replace(",", "")
    s = s.replace("{,}", "")
    # drop whitespace, except one space that ends a command before a letter ("\pi r" != "\pir")
    s = re.sub(r"(\\[a-zA-Z]+)?\s+(?=(.?))",
               lambda m: (m[1] or "") + (" " if m[1] and m[2].isalpha() else ""), s)
    # short LaTeX forms: \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac ?(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac ?(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt ?(\w)", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"\(([A-E])\)", s)  # multiple choice "(B)" -> "B"
    return m.group(1) if m else s


def _split_seq(s):
    """"(1,2)" -> ("()", ["1", "2"]); "[0,1)" -> ("[)", ...); "\\{1,2\\}" and "\\{1\\}" -> ("{}", ...);
    bare "1,2" -> ("", [...]); else None."""
    whole = [(s[0] + s[-1], s[1:-1])] if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" else []
    if len(s) >= 4 and s.startswith("\\{") and s.endswith("\\}"):
        whole = [("{}", s[2:-2])]
    for outer, body in whole + [("", s)]:
        items, depth, cur = [], 0, ""
        for ch in body:
            depth += (ch in "([{") - (ch in ")]}")
            if depth < 0:
                break  # "(1)+(2)": the outer brackets are not one pair
            if ch == "," and depth == 0:
                items, cur = items + [cur], ""
            else:
                cur += ch
        else:
            return (outer, items + [cur]) if items or outer == "{}" else None
    return None


_FUNCS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp"}


def _to_py(s):
    """Normalised LaTeX-lite -> a Python expression string, or None when it holds anything else.
    Identifiers are restricted to single letters and a few functions (safe for sympy's parser)."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = re.sub(r"(\d)[eE]([-+]?\d+)(?![\w.])", r"\1*10^{\2}", s)  # 1.5e-3
    s = re.sub(r"\\pi(?![a-zA-Z])", "(pi)", s)  # "2\pi r" -> "2(pi) r": a product either way
    s = re.sub(r"\\(sin|cos|tan|log|ln|exp)(?![a-zA-Z])", r"\1 ", s)  # "\ln2" -> "ln 2" (sympy applies it)
    s = re.sub(r"\\binom\{(\d{1,3})\}\{(\d{1,3})\}", lambda m: str(math.comb(int(m[1]), int(m[2]))), s)
    for cmd in ("\\frac", "\\sqrt"):
        while (i := s.rfind(cmd)) >= 0:  # the last one holds no other: innermost first
            j = i + len(cmd)
            root = None
            if cmd == "\\sqrt" and s[j:j + 1] == "[":
                k = s.find("]", j)
                if k < 0:
                    return None
                root, j = s[j + 1:k], k + 1
            if s[j:j + 1] != "{" or (k := _match_brace(s, j)) is None:
                return None
            a = s[j + 1:k]
            if cmd == "\\frac":
                if s[k + 1:k + 2] != "{" or (k2 := _match_brace(s, k + 1)) is None:
                    return None
                rep, k = f"(({a})/({s[k + 2:k2]}))", k2
            else:
                rep = f"(({a})**(1/({root})))" if root else f"sqrt({a})"
            s = s[:i] + rep + s[k + 1:]
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    s = re.sub(r"(?<![\w.])0+(?=\d)", "", s)  # "033" -> "33": Python rejects leading zeros, AIME writes them
    if re.search(r"[^\w+\-*/(). ]", s) or "__" in s or re.search(r"\.(?!\d)", s):
        return None

    def ident(m):
        w = m.group()
        if w in _FUNCS or re.fullmatch(r"[a-zA-Z](?:_\d+)?", w):
            return w
        return "*".join(w) if w.isalpha() else "@"  # "xy" -> x*y; anything else poisons it
    s = re.sub(r"[a-zA-Z_]\w*", ident, s)
    s = re.sub(r"(?<=[\d)])(?=[a-zA-Z(])", "*", s)  # implicit products: 2pi, 2(x+1), (a)(b)
    return None if "@" in s else s


def _eval_num(node):
    """Float value of a parsed expression of numbers, + - * / **, pi and sqrt; raises otherwise."""
    if isinstance(node, ast.Expression):
        return _eval_num(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_num(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" \
            and len(node.args) == 1 and not node.keywords:
        return math.sqrt(_eval_num(node.args[0]))
    if isinstance(node, ast.BinOp):
        a, b = _eval_num(node.left), _eval_num(node.right)
        # floats only: a ** b is constant time (OverflowError past 1e308, never a huge integer)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b, ast.Pow: lambda: a ** b}
        v = ops[type(node.op)]()
        if isinstance(v, complex):
            raise ValueError("complex")
        return v
    raise ValueError(f"not numeric: {ast.dump(node)}")


def _number(s):
    """The numeric value of a normalised answer, or None."""
    py = _to_py(s)
    if not py:
        return None
    try:
        v = _eval_num(ast.parse(py, mode="eval"))
        return v if math.isfinite(v) else None
    except Exception:  # syntax, domain, overflow, unknown node: simply not a number
        return None


_SYMPY = None


def _sympy():
    """The sympy module and its parser, imported on first use; False when not installed."""
    global _SYMPY
    if _SYMPY is None:
        try:
            import sympy
            from sympy.parsing import sympy_parser as sp
            _SYMPY = (sympy, sp.parse_expr,
                      sp.standard_transformations + (sp.implicit_multiplication_application,))
        except Exception:
            _SYMPY = False
    return _SYMPY


def _symbolic_equal(a, b, rel_tol):
    """Equality through sympy: both sides parsed, then compared numerically at a few fixed points
    (cheap, no simplify, so no timeout needed). False when sympy is missing or either side fails."""
    lib = _sympy()
    pa, pb = _to_py(a), _to_py(b)
    if not lib or not pa or not pb or len(pa) + len(pb) > 200:
        return False
    sympy, parse_expr, tf = lib
    try:
        names = {w: sympy.Symbol(w) for w in re.findall(r"[a-zA-Z](?:_\d+)?", pa + " " + pb)
                 if w not in _FUNCS}
        names.update(pi=sympy.pi, sqrt=sympy.sqrt, ln=sympy.log, log=sympy.log, exp=sympy.exp,
                     sin=sympy.sin, cos=sympy.cos, tan=sympy.tan)
        # evaluate=False: "9^{9^{9}}" must not be expanded to an exact integer (that never ends);
        # evalf below works in floating point, whatever the size
        ea = parse_expr(pa, local_dict=dict(names), transformations=tf, evaluate=False)
        eb = parse_expr(pb, local_dict=dict(names), transformations=tf, evaluate=False)
        syms = sorted(ea.free_symbols | eb.free_symbols, key=str)
        if len(syms) > 4:
            return False
        for trial in ((0.37, 1.21, 2.03, 0.59), (1.73, 0.41, 0.83, 2.57), (2.9, 1.6, 0.23, 1.1)):
            sub = dict(zip(syms, trial))
            va, vb = complex(ea.evalf(subs=sub)), complex(eb.evalf(subs=sub))
            d = abs(va - vb)  # inf or nan when either side overflows: never a match
            if not (math.isfinite(d) and d <= rel_tol * max(abs(va), abs(vb)) + 1e-12):
                return False
        return True
    except Exception:  # parse errors, TypeError from non-numeric results, ...
        return False


def _num_close(x, y, rel_tol, exact_int):
    return x == y if exact_int else math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12)


def is_equiv(pred, gold, rel_tol: float = 1e-4) -> bool:
    """Is the predicted answer equal to the gold one? In order: normalised strings equal; text-only
    answers equal ignoring case; sequences element by element (same brackets, ordered; a bare list
    "1, 2" is compared as a multiset, being a list of solutions); numbers (integers exactly,
    everything else with relative tolerance; a side written with % also matches its value / 100,
    so "50\\%" == "50" == "0.5"); then sympy, when installed, for symbolic expressions."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    if not re.search(r"[\d\\]", a + b) and a.lower() == b.lower():
        return True
    sa, sb = _split_seq(a), _split_seq(b)
    if sa or sb:
        if not (sa and sb) or len(sa[1]) != len(sb[1]):
            return False
        unordered = sa[0] in ("", "{}") and sb[0] in ("", "{}")  # a set, or a bare list of solutions
        if sa[0] != sb[0] and not unordered:
            return False
        if not unordered:
            return all(is_equiv(x, y, rel_tol) for x, y in zip(sa[1], sb[1]))
        rest = list(sb[1])
        for x in sa[1]:
            hit = next((i for i, y in enumerate(rest) if is_equiv(x, y, rel_tol)), None)
            if hit is None:
                return False
            rest.pop(hit)
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        exact = bool(re.fullmatch(r"[-+]?\d+", a) and re.fullmatch(r"[-+]?\d+", b))
        pa, pb = "%" in str(pred), "%" in str(gold)  # both with %: the values compare as they are
        return (_num_close(x, y, rel_tol, exact) or (pa and not pb and _num_close(x / 100, y, rel_tol, False))
                or (pb and not pa and _num_close(x, y / 100, rel_tol, False)))
    return _symbolic_equal(a, b, rel_tol)


def grade(response_text: str, gold) -> bool:
    """Correctness of a response: its last boxed answer against the gold answer."""
    return is_equiv(extract_boxed(response_text), gold)
