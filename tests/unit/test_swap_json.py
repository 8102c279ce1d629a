"""A .yaml manifest whose content is one JSON object is read as JSON: the same documents, much faster."""

from __future__ import annotations

import json
from typing import Any, List

import yaml

from ksproxy.routing import background
from ksproxy.sources.files import _Loader, parseData

OBJ = {
    "apiVersion": "extensions.kubesphere.io/v1alpha1",
    "kind": "ReverseProxy",
    "metadata": {"name": "a", "labels": {"x": "yes"}},
    "spec": {"matcher": {"path": "/a/*", "method": "*"}, "upstream": {"url": "http://127.0.0.1:1"}},
}


def test_jsonContentMatchesTheYamlLoader() -> None:
    for value in (OBJ, {"apiVersion": "v1", "kind": "List", "items": [OBJ, dict(OBJ, metadata={"name": "b"})]}):
        text = json.dumps(value, indent=2)
        docs, errors = parseData("/m/x.yaml", text.encode())
        assert errors == []
        expected = [d.raw for d in parseData("/m/x.yaml", ("# yaml\n" + text).encode())[0]]
        assert [d.raw for d in docs] == expected == [
            d for d in ([value] if value["kind"] != "List" else value["items"])
        ]
        assert [d.raw for d in docs] == [
            o for doc in yaml.load_all(text, Loader=_Loader) for o in (doc["items"] if doc["kind"] == "List" else [doc])
        ]


def test_yamlThatLooksLikeJsonFallsBack() -> None:
    docs, errors = parseData("/m/x.yaml", b"{kind: ReverseProxy, metadata: {name: a}}\n")
    assert errors == [] and docs[0].raw == {"kind": "ReverseProxy", "metadata": {"name": "a"}}
    docs, errors = parseData("/m/x.yaml", b'{"kind": "A", "metadata": {"name": "a"}}\n---\n{"kind": "B"}\n')
    assert errors == [] and [d.raw["kind"] for d in docs] == ["A", "B"]
    docs, errors = parseData("/m/x.yaml", b'{"kind": "A",\n  "broken": [}\n')
    assert docs == [] and errors and errors[0].message.startswith("/m/x.yaml:")  # YAML's error, with its line


def test_everyJsonManifestLetsTheReactorIn(monkeypatch: Any) -> None:
    """A .json file and a .yaml file holding JSON are both read by L{loadJSON}: a Python call per object."""
    calls: List[int] = []
    real = background._jsonObject

    def counting(pairs: Any) -> Any:
        calls.append(1)
        return real(pairs)

    monkeypatch.setattr(background, "_jsonObject", counting)
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [OBJ, dict(OBJ, metadata={"name": "b"})]})
    for name in ("/m/x.json", "/m/x.yaml"):
        del calls[:]
        docs, errors = parseData(name, text.encode())
        assert errors == [] and len(docs) == 2
        assert len(calls) >= 2 * 5, name  # items, their metadata, labels, spec, ...
