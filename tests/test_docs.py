"""The docs stay true: docs/SPEC.md's worked example is what the code computes, and every link
in the repository's Markdown resolves inside the repository."""

import ast
import re
import subprocess
import unicodedata
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from oracle import oracle

from sdjax import losses

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "SPEC.md"

# float32 error of the loss on this tiny batch: a few ulps of values near 1 to 3 (logits up to
# 2, log-sum-exp of 3 terms), so 2e-6 is a generous bound; the doc rounds to 6 decimals on top.
FLOAT32_SLACK = 2e-6


# --------------------------------------------------------------------------------------------
# The worked example of docs/SPEC.md
# --------------------------------------------------------------------------------------------


def section(text, heading):
    """The body of the `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/SPEC.md has no section '## {heading}'"
    return match.group(1)


def table(text, first_header_cell):
    """The body rows (lists of stripped cells) of the table whose header starts with the cell."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {first_header_cell} |"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with header cell {first_header_cell!r}")


def rounding_tolerance(written: str) -> float:
    """Half a unit in the last written decimal place."""
    decimals = len(written.partition(".")[2])
    return 0.5 * 10.0**-decimals


def assert_matches_doc(written: str, value: float, slack: float, what: str):
    assert abs(float(written) - value) <= rounding_tolerance(written) + slack, (
        f"{what}: docs/SPEC.md says {written}, the code gives {value}"
    )


@pytest.fixture(scope="module")
def example():
    text = section(SPEC.read_text(), "A worked example")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    inputs = {}
    for statement in ast.parse(code).body:
        inputs[statement.targets[0].id] = ast.literal_eval(statement.value)
    features = np.array(inputs["features"], np.float64)
    labels = np.array(inputs["labels"])
    temperature = inputs["temperature"]
    loss, per_anchor, reduction = oracle(features[:, None], labels, temperature=temperature)
    return dict(
        text=text,
        features=features,
        labels=labels,
        temperature=temperature,
        oracle_loss=loss,
        oracle_per_anchor=per_anchor[:, 0],
        oracle_has_positive=reduction[:, 0] > 0,
    )


def test_worked_example_logits(example):
    z = example["features"] / np.linalg.norm(example["features"], axis=1, keepdims=True)
    logits = z @ z.T / example["temperature"]
    rows = table(example["text"], "s_ab")
    assert len(rows) == len(logits)
    for a, row in enumerate(rows):
        assert row[0] == f"a = {a + 1}"
        for b, written in enumerate(row[1:]):
            if a == b:
                assert written == "–"
            else:
                assert_matches_doc(written, logits[a, b], 1e-12, f"s_{a + 1}{b + 1}")


def test_worked_example_pair_weights(example):
    weights = np.asarray(losses.pair_weights(example["labels"]))
    relations = np.asarray(losses.label_relations(example["labels"]))
    listed = np.zeros_like(weights, bool)
    for a, b, relation, k_s, k_d, w in table(example["text"], "a"):
        a, b = int(a) - 1, int(b) - 1
        listed[a, b] = True
        assert losses.Relation(int(relations[a, b])).name == relation.upper()
        assert Fraction(k_s) * Fraction(k_d) == Fraction(w)
        # Weights are ratios of small integers: exact up to one float32 rounding.
        np.testing.assert_allclose(weights[a, b], float(Fraction(w)), rtol=1e-7)
    # "Every other ordered pair is disjoint and has weight 0."
    np.testing.assert_array_equal(weights[~listed], 0.0)
    off_diagonal = ~np.eye(len(weights), dtype=bool)
    assert np.all(relations[~listed & off_diagonal] == losses.Relation.DISJOINT)


def test_worked_example_per_anchor_losses(example):
    result = losses.per_anchor_losses(
        example["features"], example["labels"], temperature=example["temperature"]
    )
    sdjax_losses = np.asarray(result.losses)[:, 0]
    z = example["features"] / np.linalg.norm(example["features"], axis=1, keepdims=True)
    logits = z @ z.T / example["temperature"]
    rows = table(example["text"], "anchor a")
    assert len(rows) == len(logits)
    for a, (anchor, _, log_normaliser, written) in enumerate(rows):
        assert anchor == str(a + 1)
        others = np.delete(logits[a], a)
        assert_matches_doc(log_normaliser, np.logaddexp.reduce(others), 1e-12, f"L_{a + 1}")
        has_positive = written != "–"
        assert bool(result.has_positive[a, 0]) == has_positive
        assert example["oracle_has_positive"][a] == has_positive
        if has_positive:
            assert_matches_doc(written, example["oracle_per_anchor"][a], 1e-12, f"oracle ℓ_{a + 1}")
            assert_matches_doc(written, sdjax_losses[a], FLOAT32_SLACK, f"sdjax ℓ_{a + 1}")


def test_worked_example_written_out_arithmetic(example):
    block = re.search(r"```\n(l_1 = .*?)```", example["text"], re.S).group(1)
    values = {}
    for line in block.strip().splitlines():
        expression, stated = line.split("# =")
        name, arithmetic = expression.split("=", 1)
        value = eval(arithmetic, {"__builtins__": {}})  # plain arithmetic on literals
        # The inputs of each line are themselves rounded to 6 decimals: allow 1e-6 for that.
        assert_matches_doc(stated.strip(), value, 1e-6, name.strip())
        values[name.strip()] = float(stated)
    per_anchor_table = {f"l_{row[0]}": row[3] for row in table(example["text"], "anchor a")}
    for name, value in values.items():
        if name != "loss":
            assert f"{value:.6f}" == per_anchor_table[name], name
    assert_matches_doc(f"{values['loss']:.6f}", example["oracle_loss"], 1e-12, "oracle loss")


def test_worked_example_loss_for_every_positives(example):
    bold = re.search(r"positive:\s+\*\*([0-9.]+)\*\*", example["text"]).group(1)
    sd_loss = losses.similarity_dissimilarity_loss(
        example["features"], example["labels"], temperature=example["temperature"]
    )
    assert_matches_doc(bold, example["oracle_loss"], 1e-12, "oracle loss")
    assert_matches_doc(bold, float(sd_loss), FLOAT32_SLACK, "sdjax loss")
    rows = table(example["text"], "`positives`")
    assert sorted(name.strip("`") for name, _ in rows) == sorted(losses.POSITIVES)
    for name, written in rows:
        positives = name.strip("`")
        expected, *_ = oracle(
            example["features"][:, None],
            example["labels"],
            positives=positives,
            temperature=example["temperature"],
        )
        value = losses.multilabel_supcon_loss(
            example["features"],
            example["labels"],
            positives=positives,
            temperature=example["temperature"],
        )
        assert_matches_doc(written, expected, 1e-12, f"oracle {positives}")
        assert_matches_doc(written, float(value), FLOAT32_SLACK, f"sdjax {positives}")


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def tracked(*patterns):
    listing = subprocess.run(
        ["git", "ls-files", "-z", *patterns], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / name for name in listing.split("\0") if name]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to '-', repeats get -1, -2."""
    anchors, seen = set(), {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.*)", line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1).strip())
        slug = "".join(
            c for c in title.lower() if c in "-_ " or unicodedata.category(c)[0] in "LN"
        ).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def markdown_links(path: Path):
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            yield from LINK.findall(line)


def test_markdown_files_exist_to_check():
    names = {path.relative_to(ROOT).as_posix() for path in tracked("*.md")}
    assert {"README.md", "docs/SPEC.md", "experiments/README.md"} <= names


@pytest.mark.parametrize("path", tracked("*.md"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(path):
    broken = []
    for target in markdown_links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md":
            if anchor not in heading_anchors(resolved.read_text()):
                broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_nothing_points_outside_the_repository():
    # Spelled so that this file does not match itself.
    outside = re.compile(r"\.\./shared\b|/wor[k]/")
    offenders = []
    for path in tracked("*.md", "*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_readme_layout_table_matches_the_tree():
    """Every path the table names exists, and every module of the package has a row."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    named = {
        path.rstrip("/")
        for row in layout.splitlines()
        if row.startswith("| `")
        for path in re.findall(r"`([^`]+)`", row.split("|")[1])
    }
    for path in named:
        assert (ROOT / path).exists(), f"README layout names {path}, which does not exist"
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "sdjax").iterdir()
        if path.name != "__init__.py" and not path.name.startswith((".", "_"))
    }
    assert modules <= named, f"modules without a row in README's layout: {modules - named}"
