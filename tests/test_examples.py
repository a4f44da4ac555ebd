"""Every code example in the README, in docs/ and in the package's docstrings runs as
written: each in a fresh namespace, in an empty working folder, on the tiny data the
example itself builds.

Examples are the README's and docs' ```python blocks and the reST literal blocks of
docstrings (a paragraph ending in "::", then an indented block; ``.. math::`` is not
code). A docstring's code goes in such a block, so that this test finds it.
"""

import ast
import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCED = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def markdown_examples(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    return [
        (f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}", match.group(1))
        for match in FENCED.finditer(text)
    ]


def literal_blocks(docstring: str) -> list[str]:
    """The indented blocks that follow a line ending in "::" (not a directive)."""
    lines, blocks = docstring.splitlines(), []
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::") or line.strip().startswith(".."):
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        blocks.append(textwrap.dedent("\n".join(block)).strip() + "\n")
    return blocks


def docstring_examples() -> list[tuple[str, str]]:
    examples = []
    for path in sorted((REPO / "worm_fast").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                continue
            docstring = ast.get_docstring(node, clean=True)
            for code in literal_blocks(docstring or ""):
                name = getattr(node, "name", "<module>")
                examples.append((f"{path.relative_to(REPO)}:{name}", code))
    return examples


EXAMPLES = [
    *markdown_examples(REPO / "README.md"),
    *(
        example
        for doc in sorted((REPO / "docs").glob("*.md"))
        for example in markdown_examples(doc)
    ),
    *docstring_examples(),
]


def test_every_kind_of_example_is_found():
    # A collector that silently found nothing would pass every example test.
    sources = {name.rsplit(":", 1)[0] for name, _ in EXAMPLES}
    for expected in ("README.md", "docs/searches.md", "worm_fast/integrations/huggingface.py",
                     "worm_fast/profiling/energy.py", "worm_fast/profiling/phases.py"):  # fmt: skip
        assert expected in sources, expected


@pytest.mark.parametrize("name, code", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs_as_written(name, code, tmp_path, monkeypatch):
    if "transformers" in code:
        pytest.importorskip("transformers")
        pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, name, "exec"), {"__name__": "__example__"})
