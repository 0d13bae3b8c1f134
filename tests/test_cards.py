"""Model cards and code agree (issue 9, deliverable 3).

Conventions (models/README.md, "Equation labels"):

- A card *defines* a label on the line of its equation: an indented
  (>= 4 spaces) or fenced code line ending in ``(eq:<label>)``, or a LaTeX
  ``\\tag{eq:<label>}``. Every other ``eq:<label>`` in a card is a reference.
- Code *cites* a label in a docstring, in the References section, as
  ``models/<card>.md (eq:<label>)``; several labels may follow one card
  (``models/x.md (eq:a), (eq:b)``). A bare ``(eq:<label>)`` in a module's
  text refers to one of the cards that module names or is registered with.

The checks: every label the code mentions exists in the card it points to;
every label a card defines is cited by some docstring; labels are unique
across cards; references inside the cards resolve; every model of the
registry has an indexed card with the sections the issue asks for; every
image a card links exists. The parsers are tested on small made-up inputs
first, so that a parser that finds nothing cannot pass the real checks.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "models"
PACKAGE = ROOT / "bayesfuse"

LABEL = r"[A-Za-z0-9][A-Za-z0-9_-]*"
LABEL_RE = re.compile(rf"(?<![\w])eq:({LABEL})")
CARD_RE = re.compile(r"models/([A-Za-z0-9_]+\.md)")
#: What may sit between a card's name and the labels that belong to it.
CHAIN_RE = re.compile(rf"(?:[\s,()`]|\band\b)*eq:({LABEL})\)?")
DEFINITION_RE = re.compile(rf"\(eq:({LABEL})\)\s*$")
TAG_RE = re.compile(rf"\\(?:tag|label)\{{eq:({LABEL})\}}")
IMAGE_RE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")


# ------------------------------------------------------------------ parsers
@dataclass(frozen=True)
class Mention:
    label: str
    card: str | None  # None: a bare label
    line: int


def card_definitions(text: str) -> dict[str, int]:
    """Labels a card defines, with their line numbers (duplicates raise)."""
    defs: dict[str, int] = {}
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        found = TAG_RE.findall(line)
        m = DEFINITION_RE.search(line)
        if m and (fenced or line.startswith("    ") or line.startswith("\t")):
            found.append(m.group(1))
        for label in found:
            if label in defs:
                raise ValueError(f"eq:{label} defined twice (lines {defs[label]} and {i})")
            defs[label] = i
    return defs


def mentions(text: str) -> list[Mention]:
    """Every ``eq:<label>`` in a text, bound to the card named just before it
    (``models/x.md (eq:a), (eq:b)``) or bare."""
    explicit: dict[int, str] = {}
    for cm in CARD_RE.finditer(text):
        pos = cm.end()
        while True:
            m = CHAIN_RE.match(text, pos)
            if not m:
                break
            explicit[m.start(1) - 3] = cm.group(1)
            pos = m.end()
    out = []
    for m in LABEL_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append(Mention(m.group(1), explicit.get(m.start()), line))
    return out


def docstrings(source: str) -> list[tuple[str, int]]:
    """(docstring, first line) of the module, classes and functions of a source."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].value.value, body[0].lineno))
    return out


# ---------------------------------------------------------- the project
def _registry_cards() -> dict[str, set[str]]:
    """Module dotted name -> cards of its registry entries."""
    from bayesfuse.models import REGISTRY

    cards: dict[str, set[str]] = defaultdict(set)
    for spec in REGISTRY.values():
        if spec.card:
            cards[spec.module].add(spec.card)
    return cards


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def load_cards() -> dict[str, dict[str, int]]:
    return {p.name: card_definitions(p.read_text()) for p in sorted(CARDS.glob("*.md")) if p.name != "README.md"}


def code_mentions() -> list[tuple[Path, Mention, bool, set[str]]]:
    """Every label mentioned under bayesfuse/: (file, mention, in a docstring,
    cards the file may mean by a bare label)."""
    registry = _registry_cards()
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        home = set(registry.get(_module_name(path), set())) | set(CARD_RE.findall(source))
        doc_lines = set()
        for doc, first in docstrings(source):
            for m in mentions(doc):
                doc_lines.add((m.label, first + m.line - 1))
        for m in mentions(source):
            out.append((path, m, (m.label, m.line) in doc_lines, home))
    return out


# ----------------------------------------------------- tests of the parsers
def test_card_definitions_tell_equations_from_references():
    text = "\n".join([
        "Prose that refers to (eq:other) is not a definition.",
        "",
        "    x = a + b                                  (eq:first)",
        "",
        "  (eq:listed) in a list item is a reference too.",
        "```",
        "y = c (eq:fenced)",
        "```",
        "$$ z = d \\tag{eq:latex} $$",
    ])
    assert card_definitions(text) == {"first": 3, "fenced": 7, "latex": 9}
    with pytest.raises(ValueError, match="eq:first defined twice"):
        card_definitions(text + "\n    x = 1   (eq:first)")


def test_mentions_bind_labels_to_the_card_named_before_them():
    doc = ("Bare (eq:alpha, eq:beta) here.\n"
           "References\n----------\n"
           "models/one.md (eq:gamma), (eq:delta) and (eq:eps)\n"
           "``models/two.md`` (eq:zeta); later (eq:eta).\n"
           "Card: models/three.md eq:theta)")
    got = [(m.label, m.card) for m in mentions(doc)]
    assert got == [("alpha", None), ("beta", None), ("gamma", "one.md"), ("delta", "one.md"),
                   ("eps", "one.md"), ("zeta", "two.md"), ("eta", None), ("theta", "three.md")]
    assert mentions("freq: 3, seq:x") == []


def test_docstrings_are_found_with_their_lines():
    src = '"""mod (eq:a)"""\n\ndef f():\n    """f\n\n    (eq:b)\n    """\n    # (eq:c) in a comment\n'
    found = {label for doc, _ in docstrings(src) for label in (m.label for m in mentions(doc))}
    assert found == {"a", "b"}


# ------------------------------------------------------- tests of the project
def test_labels_are_unique_across_cards():
    seen: dict[str, str] = {}
    for card, defs in load_cards().items():
        for label in defs:
            assert label not in seen, f"eq:{label} is defined in both {seen[label]} and {card}"
            seen[label] = card


def test_every_label_the_code_mentions_exists_in_its_card():
    cards = load_cards()
    defined_anywhere = {label for defs in cards.values() for label in defs}
    problems = []
    for path, m, _, home in code_mentions():
        where = f"{path.relative_to(ROOT)}:{m.line}"
        if m.card is not None:
            if m.card not in cards:
                problems.append(f"{where}: cites models/{m.card}, which does not exist")
            elif m.label not in cards[m.card]:
                problems.append(f"{where}: cites models/{m.card} (eq:{m.label}), not defined in that card")
        elif not any(m.label in cards.get(c, {}) for c in home):
            hint = "defined in " + ", ".join(c for c, d in cards.items() if m.label in d) if m.label in defined_anywhere \
                else "defined nowhere"
            problems.append(f"{where}: bare (eq:{m.label}) is not in the file's cards {sorted(home)} ({hint})")
    assert not problems, "\n".join(problems)


def test_every_labelled_equation_of_a_card_is_cited_by_a_docstring():
    cards = load_cards()
    cited: set[tuple[str, str]] = set()
    for _, m, in_doc, home in code_mentions():
        if not in_doc:
            continue
        for card in ([m.card] if m.card else sorted(home)):
            if m.label in cards.get(card, {}):
                cited.add((card, m.label))
    missing = [f"models/{card}:{line} (eq:{label})" for card, defs in cards.items()
               for label, line in defs.items() if (card, label) not in cited]
    assert not missing, "labelled in a card but cited by no docstring under bayesfuse/:\n" + "\n".join(missing)


def test_references_inside_the_cards_resolve():
    cards = load_cards()
    defined = {label: card for card, defs in cards.items() for label in defs}
    problems = []
    for card in cards:
        for m in mentions((CARDS / card).read_text()):
            target = m.card or card
            if m.card and m.card not in cards:
                problems.append(f"models/{card}:{m.line}: refers to models/{m.card}, which does not exist")
            elif m.label not in defined:
                problems.append(f"models/{card}:{m.line}: (eq:{m.label}) is defined in no card")
            elif m.card and defined[m.label] != target:
                problems.append(f"models/{card}:{m.line}: (eq:{m.label}) is in {defined[m.label]}, not {target}")
    assert not problems, "\n".join(problems)


def _headings(text: str) -> list[str]:
    return [line.lstrip("#").strip().lower() for line in text.splitlines() if line.startswith("#")]


def test_every_model_of_the_registry_has_an_indexed_card_with_the_required_sections():
    from bayesfuse.models import REGISTRY

    index = (CARDS / "README.md").read_text()
    problems = []
    by_card: dict[str, list] = defaultdict(list)
    for spec in REGISTRY.values():
        if not spec.card:
            problems.append(f"{spec.name}: the registry names no card")
            continue
        by_card[spec.card].append(spec)
    for card, specs in sorted(by_card.items()):
        names = ", ".join(s.name for s in specs)
        path = CARDS / card
        if not path.is_file():
            problems.append(f"models/{card} ({names}): missing")
            continue
        if f"]({card})" not in index:
            problems.append(f"models/{card} ({names}): not linked from models/README.md")
        text = path.read_text()
        heads = _headings(text)
        needs = {"references": r"reference"}
        if any(s.pymc for s in specs):
            needs |= {"a PyMC section": r"pymc", "a cross-check section": r"cross-check",
                      "a graphical model": r"graphical model"}
            if not card_definitions(text):
                problems.append(f"models/{card} ({names}): no labelled equation")
        for what, pattern in needs.items():
            if not any(re.search(pattern, h) for h in heads):
                problems.append(f"models/{card} ({names}): no heading with {what}")
    assert not problems, "\n".join(problems)


def test_every_image_a_card_links_exists():
    broken = []
    for path in sorted(CARDS.glob("*.md")):
        for m in IMAGE_RE.finditer(path.read_text()):
            target = m.group(1) or m.group(2)
            if "://" not in target and not (path.parent / target).is_file():
                broken.append(f"models/{path.name}: {target}")
    assert not broken, "broken image links:\n" + "\n".join(broken)
