"""`ksproxy check` and `ksproxy routes`: what an extension author runs before shipping manifests."""

from __future__ import annotations

import io
import json

from ksproxy.cli import check, routes

GOOD = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {name: good}
spec:
  matcher: {path: /good/*}
  upstream: {url: 'http://u'}
  directives: {stripPathPrefx: /good}
"""

BAD = """
apiVersion: extensions.kubesphere.io/v1alpha1
kind: ReverseProxy
metadata: {name: bad}
spec:
  matcher: {path: /bad/*}
  upstream: {url: 'http://u', caBundle: 'bm90IGEgY2VydA=='}
"""


def run(command, path) -> tuple:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    return command(str(path), out), out.getvalue()


def test_goodFileAndTypoNote(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "good.yaml"
    f.write_text(GOOD)
    code, text = run(check, f)  # a single file, not only a folder
    assert code == 0
    assert "spec.directives.stripPathPrefx: unknown field" in text
    assert "1 resources accepted, 0 problems" in text


def test_brokenManifestNamesTheField(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "good.yaml").write_text(GOOD)
    code, text = run(check, tmp_path)
    assert code == 1
    assert "rejected: ReverseProxy/bad: spec.upstream.caBundle:" in text
    assert "1 resources accepted, 1 problem\n" in text


def test_syntaxErrorWithLine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "broken.yaml").write_text("kind: ReverseProxy\nmetadata:\n  name: [unclosed\n")
    code, text = run(check, tmp_path)
    assert code == 1
    assert "broken.yaml:" in text and "syntax:" in text


def test_nonMappingDocumentReportedOthersChecked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A list among the documents: reported by file and number, exit 1; the file's other documents are checked."""
    f = tmp_path / "t-list.yaml"
    f.write_text(GOOD + "---\n- just a list\n---\n" + BAD)
    code, text = run(check, f)
    assert code == 1
    assert f"{f}: document 2: expected a mapping, found list\n" in text
    assert "rejected: ReverseProxy/bad: spec.upstream.caBundle:" in text  # reported, not lost with the file
    assert "1 resources accepted, 2 problems\n" in text


def test_routesPrintsTheTable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "good.yaml").write_text(GOOD)
    code, text = run(routes, tmp_path)
    assert code == 0
    doc = json.loads(text)
    assert [r["name"] for r in doc["routes"]] == ["good"]


def test_missingPathSaidOnce(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The error line names the path once (it used to print "syntax: P: P: cannot read directory")."""
    missing = tmp_path / "nonexistent"
    code, text = run(check, missing)
    assert code == 1
    assert f"syntax: {missing}: cannot read directory: " in text
    assert text.count(str(missing)) == 1
    # /debug/routes (and `ksproxy routes`) list the same error, once too.
    code, text = run(routes, missing)
    assert code == 1
    (error,) = json.loads(text)["sourceErrors"]
    assert error.startswith(f"{missing}: cannot read directory: ") and error.count(str(missing)) == 1
