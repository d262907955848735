"""Prompt sources of the data step: counterfactual prompt pairs (:class:`Pair`) and benign prompts.

Three readers, each returning rows in file order (every error is a one-line
:class:`~runtime.errors.BadInputError` naming the file and the fix, exit code 3):

- :func:`read_pairs` -- a paired CSV, ``prompt,safe_prompt`` (header case-insensitive, UTF-8 with or without a
  BOM), optional ``instruction``, ``category``, ``seed`` / ``evaluation_seed``. Other columns are ignored (the
  shared dataset's ``source``). Column names other projects use are mapped (:data:`PAIR_COLUMNS`): SafeRedir's
  IGMU sets name the two sides ``forgot`` / ``retain`` (also ``forget``), Ring-A-Bell's ``sensitive`` /
  ``normal``; ``unsafe_prompt`` / ``unsafe`` and ``safe`` are accepted too. ``../shared/datasets/
  paired_unsafe_safe_prompts.csv`` (``prompt,safe_prompt,category,source``) loads as is.
- :func:`read_rules` + :func:`apply_rules` -- a rule file (CSV ``pattern,replacement[,instruction,category]``, an
  optional header row starting with ``pattern``, lines starting with ``#`` are comments; one rule per line): ``pattern`` is a Python
  regular expression matched case-insensitively, ``replacement`` a :func:`re.sub` template (``\\1`` back
  references work; empty = removal). The FIRST rule whose pattern matches a prompt makes its pair (every match
  of that one pattern is replaced); then whitespace is collapsed and stray connective words / punctuation left
  at either end or doubled by the edit (``and``, ``or``, ``with``, ``,``) are cleaned. Prompts no rule matches
  are counted and skipped (:class:`RuleReport`).
- :func:`read_prompts` -- an I2P / COCO-30k style prompts CSV: a ``prompt`` column, optional ``evaluation_seed``
  (else ``seed`` column, else ``base seed + row index``); also ``categories`` (I2P's list) for the record.

Missing fields are derived: instruction -> ``"remove " + the words of prompt missing from safe_prompt`` (``"make
it safe"`` when none is missing); category -> ``"unsafe"``; seed -> ``base seed + row index`` (0-based data row
of the file, so ``--limit`` never changes a prompt's seed).
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.errors import BadInputError

DEFAULT_CATEGORY = "unsafe"
DEFAULT_INSTRUCTION = "make it safe"
PAIR_COLUMNS = {
    "prompt": ("prompt", "unsafe_prompt", "unsafe", "forgot", "forget", "sensitive"),
    "safe_prompt": ("safe_prompt", "safe", "retain", "normal"),
    "instruction": ("instruction",),
    "category": ("category", "categories"),
    "seed": ("seed", "evaluation_seed"),
}
"""Accepted column names (lower case) for each :class:`Pair` field, first match wins."""
CONNECTIVES = ("and", "or", "with")
_WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class Pair:
    """One counterfactual prompt pair: the unsafe prompt, its minimally edited safe prompt, the safety
    instruction ("remove the knife"), the category and the seed of the unsafe image."""

    prompt: str
    safe_prompt: str
    instruction: str
    category: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompts CSV (unsafe or benign) with its seed and I2P categories (may be empty)."""

    prompt: str
    seed: int
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    replacement: str
    instruction: str | None
    category: str | None
    line: int


@dataclass
class RuleReport:
    """What :func:`apply_rules` did with a prompt list."""

    prompts: int = 0
    matched: int = 0
    unmatched: int = 0
    emptied: int = 0                                  # matched, but nothing was left after the edit
    per_rule: dict[int, int] = field(default_factory=dict)  # rule file line -> pairs it made
    unmatched_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "matched": self.matched, "unmatched": self.unmatched,
                "emptied": self.emptied, "pairs_per_rule_line": {str(k): v for k, v in self.per_rule.items()},
                "unmatched_examples": self.unmatched_examples}


# ---- derived fields --------------------------------------------------------------------------------------

def derive_instruction(prompt: str, safe_prompt: str) -> str:
    """``"remove " + the words of prompt missing from safe_prompt`` (in order), ``"make it safe"`` if none."""
    kept = {w.lower() for w in _WORD.findall(safe_prompt)}
    gone: list[str] = []
    for w in _WORD.findall(prompt):
        if w.lower() not in kept and w.lower() not in gone:
            gone.append(w.lower())
    return "remove " + " ".join(gone) if gone else DEFAULT_INSTRUCTION


def clean_edit(text: str) -> str:
    """Collapse whitespace and drop connectives / commas an edit left dangling at either end or doubled."""
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)            # "fox , on" -> "fox, on"
    conn = "|".join(CONNECTIVES)
    for _ in range(3):
        before = text
        text = re.sub(rf"^(?:(?:{conn})\b|[,;])\s*", "", text, flags=re.I)
        text = re.sub(rf"\s*(?:\b(?:{conn})|[,;])$", "", text, flags=re.I)
        text = re.sub(rf"\b({conn})\s+(?:{conn})\b", r"\1", text, flags=re.I)   # "and and" -> "and"
        text = re.sub(r"([,;])\s*[,;]", r"\1", text)
        text = re.sub(rf"\b(?:{conn}),", ",", text, flags=re.I)                 # "a and, b" -> "a, b"
        if text == before:
            break
    return text.strip()


def removal_prompt(prompt: str, safe_prompt: str, rules: list[Rule] | None = None) -> str:
    """``prompt`` with its unsafe part removed, not replaced: the first matching rule's match deleted (``rules``),
    else the words ``safe_prompt`` changed deleted; connectives left dangling are dropped (:func:`clean_edit`)."""
    rule = next((r for r in rules or () if r.pattern.search(prompt)), None)
    if rule is not None:
        return clean_edit(rule.pattern.sub("", prompt))
    words, safe = prompt.split(), safe_prompt.split()
    kept = [w for op, i1, i2, _, _ in difflib.SequenceMatcher(None, words, safe).get_opcodes() if op == "equal"
            for w in words[i1:i2]]
    return clean_edit(" ".join(kept))


# ---- CSV plumbing ---------------------------------------------------------------------------------------

def _read_csv(path: Path, what: str, example: str) -> tuple[list[str], list[list[str]]]:
    """(lower-case header, data rows) of a CSV, or a one-line error."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise BadInputError(f"{what} {path} not found: pass an existing file, e.g. {example}") from None
    except IsADirectoryError:
        raise BadInputError(f"{what} {path} is a folder: pass a CSV file, e.g. {example}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"{what} {path} cannot be read ({type(e).__name__}: {e}): pass a readable UTF-8 "
                            "CSV") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise BadInputError(f"{what} {path} is empty: pass a CSV with a header row, e.g. {example}")
    return [c.strip().lower() for c in rows[0]], rows[1:]


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def _seed(raw: str, default: int, path: Path, line: int) -> int:
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInputError(f"{path}:{line}: seed {raw!r} is not a number: fix the cell or drop the seed "
                            "column") from None
    if not value.is_integer() or value < 0:
        raise BadInputError(f"{path}:{line}: seed {raw!r} must be a whole number >= 0")
    return int(value)


# ---- readers ---------------------------------------------------------------------------------------------

def read_pairs(path: str | Path, seed: int = 0) -> list[Pair]:
    """Every pair of a paired CSV (module docstring), in file order."""
    path = Path(path)
    header, rows = _read_csv(path, "paired CSV", "../shared/datasets/paired_unsafe_safe_prompts.csv")
    col = {k: _column(header, names) for k, names in PAIR_COLUMNS.items()}
    missing = [k for k in ("prompt", "safe_prompt") if col[k] is None]
    if missing:
        raise BadInputError(f"paired CSV {path} has no {' or '.join(missing)} column (columns: "
                            f"{', '.join(header) or 'none'}): give it a header row 'prompt,safe_prompt' "
                            "(optional instruction, category, seed)")
    pairs = []
    for i, row in enumerate(rows):
        prompt, safe = _cell(row, col["prompt"]), _cell(row, col["safe_prompt"])
        if not prompt and not safe:
            continue
        if not prompt or not safe:
            raise BadInputError(f"{path}:{i + 2}: a pair needs both a prompt and a safe_prompt: fill in the "
                                "empty cell or delete the row")
        pairs.append(Pair(prompt, safe, _cell(row, col["instruction"]) or derive_instruction(prompt, safe),
                          _cell(row, col["category"]) or DEFAULT_CATEGORY,
                          _seed(_cell(row, col["seed"]), seed + i, path, i + 2)))
    if not pairs:
        raise BadInputError(f"paired CSV {path} has a header but no pairs: add rows 'prompt,safe_prompt'")
    return pairs


def read_prompts(path: str | Path, seed: int = 0, what: str = "prompts CSV") -> list[Prompt]:
    """Every prompt of an I2P / COCO-30k style CSV (module docstring), in file order."""
    path = Path(path)
    header, rows = _read_csv(path, what, "../shared/datasets/i2p_unsafe_prompts_4703.csv")
    i_prompt = _column(header, ("prompt",))
    if i_prompt is None:
        raise BadInputError(f"{what} {path} has no 'prompt' column (columns: {', '.join(header) or 'none'}): "
                            "pass an I2P or COCO-30k style CSV with a header row naming a 'prompt' column")
    i_seed = _column(header, ("evaluation_seed", "seed"))
    i_cat = _column(header, ("categories", "category"))
    out = []
    for i, row in enumerate(rows):
        prompt = _cell(row, i_prompt)
        if prompt:
            cats = tuple(c.strip() for c in _cell(row, i_cat).split(",") if c.strip())
            out.append(Prompt(prompt, _seed(_cell(row, i_seed), seed + i, path, i + 2), cats))
    if not out:
        raise BadInputError(f"{what} {path} has no prompts: fill its 'prompt' column")
    return out


def read_rules(path: str | Path) -> list[Rule]:
    """The rules of a rule file (module docstring), in file order; an empty file is an error."""
    path = Path(path)
    example = "train/tinyworld/prompts/edit_rules.csv"
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise BadInputError(f"rule file {path} not found: pass an existing file, e.g. {example}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"rule file {path} cannot be read ({type(e).__name__}: {e}): pass a readable UTF-8 "
                            "CSV") from None
    rules = []
    for line, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):  # comments may hold any character, quotes too
            continue
        try:
            row = next(csv.reader([text]))
        except csv.Error as e:
            raise BadInputError(f"{path}:{line}: not a CSV row ({e}): quote a pattern holding commas or quotes "
                                'with "..." and double its inner quotes') from None
        if line == 1 and row[0].strip().lower() == "pattern":
            continue
        if len(row) < 2:
            raise BadInputError(f"{path}:{line}: a rule is 'pattern,replacement[,instruction,category]' (an empty "
                                "replacement removes the match; write 'pattern,' to mean that)")
        if len(row) > 4:
            raise BadInputError(f"{path}:{line}: {len(row)} fields, a rule has at most 4 (pattern, replacement, "
                                "instruction, category): quote a pattern that contains commas")
        raw = row[0].strip()
        if not raw:
            raise BadInputError(f"{path}:{line}: empty pattern: write a regular expression or delete the row")
        try:
            pattern = re.compile(raw, re.IGNORECASE)
        except re.error as e:
            raise BadInputError(f"{path}:{line}: pattern {raw!r} is not a valid Python regular expression ({e}): "
                                "fix it (escape literal brackets with a backslash)") from None
        rules.append(Rule(pattern, row[1].strip(), (row[2].strip() if len(row) > 2 else "") or None,
                          (row[3].strip() if len(row) > 3 else "") or None, line))
    if not rules:
        raise BadInputError(f"rule file {path} has no rules: add rows 'pattern,replacement[,instruction,category]', "
                            f"e.g. {example}")
    return rules


def apply_rules(rules: list[Rule], prompts: list[Prompt], path: str | Path = "rules") -> tuple[list[Pair], RuleReport]:
    """One pair per prompt some rule matches (the first matching rule edits it), and what happened."""
    report = RuleReport(prompts=len(prompts))
    pairs = []
    for p in prompts:
        rule = next((r for r in rules if r.pattern.search(p.prompt)), None)
        if rule is None:
            report.unmatched += 1
            if len(report.unmatched_examples) < 5:
                report.unmatched_examples.append(p.prompt)
            continue
        try:
            safe = clean_edit(rule.pattern.sub(rule.replacement, p.prompt))
        except (re.error, IndexError) as e:
            raise BadInputError(f"{path}:{rule.line}: replacement {rule.replacement!r} is not a valid re.sub "
                                f"template for {rule.pattern.pattern!r} ({e}): fix its back references") from None
        if not safe:
            report.emptied += 1
            continue
        report.matched += 1
        report.per_rule[rule.line] = report.per_rule.get(rule.line, 0) + 1
        pairs.append(Pair(p.prompt, safe, rule.instruction or derive_instruction(p.prompt, safe),
                          rule.category or DEFAULT_CATEGORY, p.seed))
    if not pairs:
        example = f" (e.g. {report.unmatched_examples[0]!r})" if report.unmatched_examples else ""
        raise BadInputError(f"rule file {path} makes no pair from the {len(prompts)} prompts{example}: check its "
                            "patterns against the prompts CSV (case-insensitive Python regular expressions)")
    return pairs, report
