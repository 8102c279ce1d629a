"""
Every YAML example in README.md and docs/*.md passes C{ksproxy check}: a fragment that starts at C{spec:} is
checked as the kind its section (the closest C{## Kind} heading above it) is about; whole manifests of other
API groups (RBAC policy, Kubernetes objects) are for other tools and only have to parse.
"""

from __future__ import annotations

import glob
import io
import os
import re
from typing import Iterator, List, Tuple

import pytest
import yaml

from ksproxy.cli import check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")))
KINDS = ("APIService", "ReverseProxy", "JSBundle")
_FENCE = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
_HEADING = re.compile(r"^## (\w+)", re.M)


def _examples(page: str) -> Iterator[Tuple[str, int, str]]:
    """(section kind or "", line number, one YAML document) for every fenced YAML block of C{page}."""
    text = open(page, encoding="utf-8").read()
    for block in _FENCE.finditer(text):
        headings = [h.group(1) for h in _HEADING.finditer(text, 0, block.start())]
        section = headings[-1] if headings else ""
        line = text.count("\n", 0, block.start()) + 1
        for doc in re.split(r"^---\s*$", block.group(1), flags=re.M):
            if doc.strip():
                yield section, line, doc


def _manifests(page: str) -> Tuple[List[str], int]:
    """The extension manifests of C{page} as check would read them, and how many there are."""
    out: List[str] = []
    for n, (section, line, doc) in enumerate(_examples(page)):
        parsed = yaml.safe_load(doc)
        assert isinstance(parsed, dict), f"{page}:{line}: not a YAML mapping"
        if "spec" in parsed and "kind" not in parsed:
            assert section in KINDS, f"{page}:{line}: a bare spec outside a {'/'.join(KINDS)} section"
            header = f"apiVersion: extensions.kubesphere.io/v1alpha1\nkind: {section}\nmetadata: {{name: example-{n}}}\n"
            out.append(header + doc)
        elif str(parsed.get("apiVersion", "")).startswith("extensions.kubesphere.io/"):
            out.append(doc)
    return out, len(out)


def test_thereAreExamples() -> None:
    assert any(_manifests(page)[1] for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_examplesPassCheck(page: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    manifests, count = _manifests(page)
    if not count:
        pytest.skip("no extension manifests on this page")
    (tmp_path / "examples.yaml").write_text("---\n".join(manifests), encoding="utf-8")
    out = io.StringIO()
    code = check(str(tmp_path), out)
    lines = out.getvalue().splitlines()
    # A note is an unknown field: in an example that is a typo too.
    assert (code, lines[:-1]) == (0, []), out.getvalue()
    assert lines[-1] == f"{count} resources accepted, 0 problems"
