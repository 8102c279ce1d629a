"""
The pure parts of L{ksproxy.testing.kubeapi} (patch semantics, selectors) and of
L{ksproxy.kubeclient} (where the client configuration comes from).
"""

from __future__ import annotations

import json
import os

from kubernetes.config import ConfigException
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.kubeclient import loadConfiguration
from ksproxy.testing.kubeapi import (
    PatchError,
    _APIError,
    _matchesSelectors,
    _parseFieldSelector,
    _parseLabelSelector,
    jsonPatch,
    mergePatch,
)


class MergePatchTests(SynchronousTestCase):
    """RFC 7386 appendix A, plus the case ksproxy's status writer depends on."""

    cases = [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
        # A status patch leaves spec and the rest of status alone.
        (
            {"spec": {"x": 1}, "status": {"link": "/l", "conditions": [1]}},
            {"status": {"conditions": [2]}},
            {"spec": {"x": 1}, "status": {"link": "/l", "conditions": [2]}},
        ),
    ]

    def test_table(self) -> None:
        for target, patch, expected in self.cases:
            before = json.dumps(target)
            self.assertEqual(mergePatch(target, patch), expected, (target, patch))
            self.assertEqual(json.dumps(target), before, "the target is not modified")


class JSONPatchTests(SynchronousTestCase):
    """RFC 6902 operations, including the errors."""

    def test_operations(self) -> None:
        doc = {"a": {"b": [1, 2]}, "c": "x"}
        cases = [
            ([{"op": "add", "path": "/a/b/1", "value": 9}], {"a": {"b": [1, 9, 2]}, "c": "x"}),
            ([{"op": "add", "path": "/a/b/-", "value": 3}], {"a": {"b": [1, 2, 3]}, "c": "x"}),
            ([{"op": "add", "path": "/d", "value": {}}], {"a": {"b": [1, 2]}, "c": "x", "d": {}}),
            ([{"op": "remove", "path": "/a/b/0"}], {"a": {"b": [2]}, "c": "x"}),
            ([{"op": "replace", "path": "/c", "value": "y"}], {"a": {"b": [1, 2]}, "c": "y"}),
            ([{"op": "replace", "path": "/a/b/0", "value": 7}], {"a": {"b": [7, 2]}, "c": "x"}),
            ([{"op": "move", "from": "/c", "path": "/e"}], {"a": {"b": [1, 2]}, "e": "x"}),
            ([{"op": "copy", "from": "/a/b", "path": "/f"}], {"a": {"b": [1, 2]}, "c": "x", "f": [1, 2]}),
            ([{"op": "test", "path": "/c", "value": "x"}], doc),
            ([{"op": "add", "path": "/a~1b", "value": 1}], {"a": {"b": [1, 2]}, "c": "x", "a/b": 1}),
        ]
        for operations, expected in cases:
            self.assertEqual(jsonPatch(doc, operations), expected, operations)
        self.assertEqual(doc, {"a": {"b": [1, 2]}, "c": "x"}, "the target is not modified")

    def test_errors(self) -> None:
        doc = {"a": [1]}
        for operations in [
            [{"op": "test", "path": "/a", "value": [2]}],
            [{"op": "remove", "path": "/missing"}],
            [{"op": "replace", "path": "/missing", "value": 1}],
            [{"op": "add", "path": "/a/5", "value": 1}],
            [{"op": "add", "path": "/x/y", "value": 1}],
            [{"op": "frobnicate", "path": "/a"}],
            [{"op": "add", "path": "/a"}],
            {"op": "add"},
        ]:
            self.assertRaises(PatchError, jsonPatch, doc, operations)


class SelectorTests(SynchronousTestCase):
    obj = {"metadata": {"name": "cm", "namespace": "ext", "labels": {"app": "x", "tier": "web"}}}

    def test_fieldSelectors(self) -> None:
        cases = [
            ("metadata.name=cm", True),
            ("metadata.name==cm", True),
            ("metadata.name=other", False),
            ("metadata.name!=other", True),
            ("metadata.name=cm,metadata.namespace=ext", True),
            ("metadata.name=cm,metadata.namespace=default", False),
            ("", True),
        ]
        for text, expected in cases:
            self.assertEqual(_matchesSelectors(self.obj, _parseFieldSelector(text), []), expected, text)

    def test_unsupportedField(self) -> None:
        e = self.assertRaises(_APIError, _parseFieldSelector, "spec.x=1")
        self.assertEqual((e.code, e.status["message"]), (400, "field label not supported: spec.x"))

    def test_labelSelectors(self) -> None:
        cases = [
            ("app=x", True),
            ("app==x", True),
            ("app=y", False),
            ("app!=y", True),
            ("app", True),
            ("!app", False),
            ("missing", False),
            ("!missing", True),
            ("app=x,tier=web", True),
            ("app=x,tier=db", False),
        ]
        for text, expected in cases:
            self.assertEqual(_matchesSelectors(self.obj, [], _parseLabelSelector(text)), expected, text)


class LoadConfigurationTests(SynchronousTestCase):
    """Where the client configuration comes from: an explicit kubeconfig, $KUBECONFIG, or in-cluster."""

    def setUp(self) -> None:
        saved = dict(os.environ)
        self.addCleanup(lambda: (os.environ.clear(), os.environ.update(saved)))
        for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            os.environ.pop(name, None)

    def kubeconfig(self, server: str) -> str:
        path = self.mktemp()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "t0k"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def test_explicitPath(self) -> None:
        configuration = loadConfiguration(self.kubeconfig("http://127.0.0.1:1"))
        self.assertEqual(configuration.host, "http://127.0.0.1:1")
        self.assertEqual(configuration.api_key, {"BearerToken": "Bearer t0k"})

    def test_explicitPathWinsInCluster(self) -> None:
        os.environ["KUBERNETES_SERVICE_HOST"] = "10.0.0.1"
        self.assertEqual(loadConfiguration(self.kubeconfig("http://127.0.0.1:2")).host, "http://127.0.0.1:2")

    def test_environment(self) -> None:
        os.environ["KUBECONFIG"] = self.kubeconfig("http://127.0.0.1:3")
        self.assertEqual(loadConfiguration(None).host, "http://127.0.0.1:3")

    def test_inCluster(self) -> None:
        """With KUBERNETES_SERVICE_HOST set and no path, the service account is used (absent here: an error)."""
        os.environ["KUBECONFIG"] = self.kubeconfig("http://127.0.0.1:4")
        os.environ["KUBERNETES_SERVICE_HOST"] = "10.0.0.1"
        os.environ["KUBERNETES_SERVICE_PORT"] = "443"
        self.assertRaises(ConfigException, loadConfiguration, None)

    def test_missingFile(self) -> None:
        self.assertRaises(ConfigException, loadConfiguration, self.mktemp())
