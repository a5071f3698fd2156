"""Every repository path and every `tessera.` name that a comment, a docstring or a page of the documentation
names exists, and every link between the pages reaches its heading: a file, a function or a section that moves
takes its mentions with it."""

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

from helpers import ROOT

# A path from the repository root into one of our folders (core/data/shards.py, modalities/image/infer.py), not
# the tail of a longer path or URL; placeholders such as modalities/<name>.py or core/tasks/*.py are no one file.
PATH = re.compile(r"(?<![\w./-])(?:core|modalities|flows|tests|benchmarks|docs)/(?:[\w.-]+/)*[\w.-]*\w(?![\w/<*{])")
NAME = re.compile(r"\btessera\.(?:core|modalities|flows)(?:\.\w+)+")  # a module, or a name in one
SOURCES = ("core", "modalities", "flows", "tests", "benchmarks")


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a Python file (attribute docstrings included)."""
    source = path.read_text()
    found = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    found += [(node.lineno, node.value.value) for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    return found


def texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of the prose to check: Python comments and docstrings, and every line of the pages and of
    the files that configure the repository (README.md, docs/*.md, dvc.yaml, params.yaml, pyproject.toml)."""
    found = [(str(f.relative_to(ROOT)), line, text) for folder in SOURCES
             for f in sorted((ROOT / folder).rglob("*.py")) for line, text in prose(f)]
    pages = [ROOT / name for name in ("README.md", "dvc.yaml", "params.yaml", "pyproject.toml")]
    for page in pages + sorted((ROOT / "docs").glob("*.md")):
        found += [(str(page.relative_to(ROOT)), i, line) for i, line in enumerate(page.read_text().splitlines(), 1)]
    return found


def test_the_pattern_finds_paths_and_skips_placeholders_and_urls():
    text = ("see core/data/shards.py, modalities/ and flows/pipeline.py; not modalities/<name>.py, core/tasks/*.py, "
            "https://example.org/core/x.py or sweeps/core/y.py")
    assert PATH.findall(text) == ["core/data/shards.py", "flows/pipeline.py"]


def test_every_repository_path_named_in_prose_exists():
    missing = [f"{file}:{line}: {path}" for file, line, text in texts() for path in PATH.findall(text)
               if not (ROOT / path).exists()]
    assert not missing, "paths named in comments, docstrings or docs that do not exist:\n" + "\n".join(missing)


def resolves(name: str) -> bool:
    """Whether a dotted name is a module, or a chain of attributes of the longest module it starts with."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            found = getattr(found, attr, None)
        return found is not None
    return False


def test_every_tessera_name_named_in_prose_exists():
    assert resolves("tessera.core.stages.evaluate.evaluate_model") and not resolves("tessera.core.stages.evaluate.run")
    missing = [f"{file}:{line}: {name}" for file, line, text in texts() for name in NAME.findall(text)
               if not resolves(name)]
    assert not missing, "names in comments, docstrings or docs that do not exist:\n" + "\n".join(missing)


LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_in_the_docs_reaches_its_file_and_heading():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not broken, "links to no file or no heading:\n" + "\n".join(broken)
