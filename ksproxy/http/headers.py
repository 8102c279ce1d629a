"""
An ordered HTTP header multi-map that keeps what the client sent.

Names keep their original spelling on the wire (some upstreams care), lookups go by the lower-case name,
which is computed once when a header is added, never per lookup.  Values are bytes, as received.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Tuple

__all__ = ["Headers", "renderInto"]


class Headers:
    """
    Ordered multi-map of HTTP headers.

    @ivar items: list of C{[lowerName, name, value]} triples (all bytes), in wire order.  Exposed so the hot
        path can iterate without building tuples.
    """

    __slots__ = ("items",)

    def __init__(self, pairs: Iterable[Tuple[bytes, bytes]] = ()) -> None:
        self.items: List[List[bytes]] = [[n.lower(), n, v] for n, v in pairs]

    @classmethod
    def fromItems(cls, items: List[List[bytes]]) -> Headers:
        """Wrap C{[lowerName, name, value]} triples built by a parser (taken, not copied)."""
        h = cls.__new__(cls)
        h.items = items
        return h

    def __repr__(self) -> str:
        return f"Headers({[(n, v) for _, n, v in self.items]!r})"

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, lname: bytes) -> bool:
        for item in self.items:
            if item[0] == lname:
                return True
        return False

    def __iter__(self) -> Iterator[Tuple[bytes, bytes]]:
        for _, n, v in self.items:
            yield n, v

    def copy(self) -> Headers:
        h = Headers()
        h.items = [list(item) for item in self.items]
        return h

    def add(self, name: bytes, value: bytes) -> None:
        self.items.append([name.lower(), name, value])

    def get(self, lname: bytes, default: Optional[bytes] = None) -> Optional[bytes]:
        """The first value of C{lname} (lower-case), or C{default}."""
        for item in self.items:
            if item[0] == lname:
                return item[2]
        return default

    def getAll(self, lname: bytes) -> List[bytes]:
        return [item[2] for item in self.items if item[0] == lname]

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of C{name} with one C{value}, keeping the position of the first."""
        lname = name.lower()
        out: List[List[bytes]] = []
        placed = False
        for item in self.items:
            if item[0] == lname:
                if not placed:
                    out.append([lname, name, value])
                    placed = True
            else:
                out.append(item)
        if not placed:
            out.append([lname, name, value])
        self.items = out

    def remove(self, lname: bytes) -> bool:
        """Remove every header called C{lname} (lower-case); say whether any was there."""
        before = len(self.items)
        self.items = [item for item in self.items if item[0] != lname]
        return len(self.items) != before

    def removeMany(self, lnames: frozenset[bytes] | set[bytes]) -> None:
        self.items = [item for item in self.items if item[0] not in lnames]

    def removePrefix(self, lprefix: bytes) -> None:
        self.items = [item for item in self.items if not item[0].startswith(lprefix)]

    def serialize(self) -> bytes:
        """The header block as it goes on the wire (without the blank line that ends it)."""
        out: List[bytes] = []
        renderInto(out, self.items)
        return b"".join(out)


def renderInto(out: List[bytes], items: Iterable[List[bytes]]) -> None:
    """
    Append the wire form of C{[lowerName, name, value]} items to C{out}, for one C{b"".join} by the caller:
    four appends per header measured twice as fast as a C{%}-format per line.
    """
    for _, name, value in items:
        out += (name, b": ", value, b"\r\n")
