"""
Tests for the lean YAML loading of L{ksproxy.sources.files}: the same documents and the same errors as
PyYAML's SafeLoader (without timestamp resolution), whatever the input uses.
"""

from __future__ import annotations

from typing import Any, Tuple

import yaml
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.sources import files

_Safe: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Reference(_Safe):  # type: ignore[misc, valid-type]
    """PyYAML's own SafeLoader (same parser), timestamps left as strings: what the lean loader must match."""


_Reference.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Safe.yaml_implicit_resolvers.items()
}

TEXTS = [
    "apiVersion: v1\nkind: X\nmetadata: {name: a, labels: {x: 'y'}}\nspec:\n  matcher: {path: '/a/*', method: '*'}\n",
    "a: &x {b: 1}\nc: *x\n",
    "a: &x [1, 2]\nc: *x\n",
    "&a [*a]\n",
    "&a {k: *a}\n",
    "a: &s 1\nb: *s\n",
    "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n",
    "d:\n  <<: [{a: 1}, {b: 2}]\n  c: 3\n",
    "t: 2001-12-14t21:59:43.10-05:00\nu: 2002-12-14\n",
    "t: !!timestamp 2001-12-14\n",
    "b: !!binary aGVsbG8=\n",
    "s: !!set {a, b}\n",
    "o: !!omap [a: 1, b: 2]\n",
    "x: !foo bar\n",
    "a: 1\na: 2\nb: 3\n",
    "? [1, 2]\n: x\n",
    "=: 1\nk: =\n",
    "i: [0b101, 0x1F, 017, 1_000, 190:20:30, +12, -0, 0o17]\n",
    "f: [1.5, .inf, -.Inf, 1e3, 1.0e+3, 190:20:30.15, 6.8523015e+5]\n",
    "b: [yes, No, on, OFF, true, False, y, n]\n",
    "n: [~, null, Null, '', ]\n1: a\n2.5: b\ntrue: c\nnull: d\n",
    "a: !!str 1\nb: !!int '2'\nc: !!float '3'\nd: !!null ''\ne: !!bool yes\n",
    "a: !!int abc\n",
    "a: [\n",
    "a: b: c\n",
    "a: *undefined\n",
    "%TAG !e! tag:example.com,2000:\n---\na: !e!foo 1\n",
    "a: |\n  x\n  y\nb: >\n  p\n  q\nc: 'quoted: 1'\nd: \"dq\\n\"\n",
    "--- 5\n--- 'x'\n---\n---\n# only a comment\n",
    "- &a x\n- *a\n- {k: [1, {m: *a}]}\n",
    "",
]


def load(loader: Any, text: str) -> Tuple[Any, ...]:
    try:
        return ("ok", repr(list(yaml.load_all(text, Loader=loader))))
    except (yaml.YAMLError, ValueError) as e:
        return ("error", type(e).__name__, str(e))


class LeanLoaderTests(SynchronousTestCase):
    def test_sameAsSafeLoader(self) -> None:
        for text in TEXTS:
            self.assertEqual(load(files._Loader, text), load(_Reference, text), text)

    def test_leanPathTaken(self) -> None:
        """Plain documents are built without PyYAML's constructor (which would fill constructed_objects)."""
        seen = []

        class Spy(files._Loader):
            def construct_object(self, node: Any, deep: bool = False) -> Any:
                seen.append(node)
                return super().construct_object(node, deep)

        self.assertEqual(list(yaml.load_all(TEXTS[0], Loader=Spy))[0]["kind"], "X")
        self.assertEqual(seen, [])
        list(yaml.load_all(TEXTS[1], Loader=Spy))  # an alias: the usual construction
        self.assertNotEqual(seen, [])

    def test_scalarsShared(self) -> None:
        """Equal plain scalars resolve once per load (immutable values, so sharing them is invisible)."""
        docs = list(yaml.load_all("a: 10\nb: 10\n---\nc: 10\n", Loader=files._Loader))
        self.assertEqual(docs, [{"a": 10, "b": 10}, {"c": 10}])
