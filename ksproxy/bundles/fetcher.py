# -*- test-case-name: tests.unit.test_bundles -*-
"""
Bundles whose source is a URL or a Service (SPEC 5): fetched when they appear or change, and kept.

Requests are served from the kept copy, never by a fetch of their own, so a slow or failing upstream cannot
slow down the console; when a refetch fails the last good copy stays in service.  A fetch that fails with no
copy yet is retried with exponential backoff.  How to fetch (TLS settings, streaming, size limits) is the
injected C{fetch} function's business.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Optional, Sequence, Set, Tuple

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ksproxy.bundles.content import BundleContent, bundleLinks, makeContent
from ksproxy.failures import describeFailure
from ksproxy.model.types import Endpoint, EndpointSource, JSBundle

__all__ = ["BundleFetcher"]


def _version(bundle: JSBundle) -> object:
    """
    What makes a bundle "changed": its generation where the API server keeps one (status writes bump it
    too, but ksproxy writes only when something changed, so this settles), else the whole object (the file
    source: any edit of the manifest).
    """
    if bundle.meta.generation:
        return (bundle.meta.name, bundle.meta.uid, bundle.meta.generation)
    return bundle


def _contents(body: Optional[bytes], contentTypes: Tuple[bytes, ...]) -> Dict[bytes, BundleContent]:
    return {} if body is None else {t: makeContent(body, t) for t in contentTypes}


@attrs.define(eq=False)
class _Fetch:
    # Every type the endpoint is served under; the first is what get() without a type answers.
    contentTypes: Tuple[bytes, ...]
    versions: FrozenSet[object]
    body: Optional[bytes] = None
    # The fetched body as content of each type in contentTypes, built when it arrives (not per request).
    contents: Dict[bytes, BundleContent] = attrs.Factory(dict)
    error: Optional[str] = None
    pending: Optional[Deferred[bytes]] = None
    timer: Any = None  # IDelayedCall for a retry or refresh
    generation: int = 0
    failures: int = 0


class BundleFetcher:
    """
    The content of every URL/service bundle source, by endpoint and content type.

    @param fetch: fetches the bytes at an endpoint (its C{path} included); a Deferred that fails on any
        error, and that can be cancelled.
    @param retryDelay: first retry after a failure; doubles on each further failure up to C{maxRetryDelay}.
    @param refreshInterval: also refetch this often while in use (None: only on change).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        fetch: Callable[[Endpoint], Deferred[bytes]],
        *,
        retryDelay: float = 1.0,
        maxRetryDelay: float = 60.0,
        refreshInterval: Optional[float] = None,
    ) -> None:
        self._reactor = reactor
        self._fetch = fetch
        self._retryDelay = retryDelay
        self._maxRetryDelay = maxRetryDelay
        self._refreshInterval = refreshInterval
        self._entries: Dict[Endpoint, _Fetch] = {}

    def reconcile(self, bundles: Sequence[JSBundle]) -> None:
        """
        Make the set of fetched endpoints match C{bundles}: start fetching new ones, refetch those whose
        bundle changed (keeping the old copy until the new one arrives), drop those no longer used.
        """
        wanted: Dict[Endpoint, Tuple[Dict[bytes, None], Set[object]]] = {}
        for bundle in sorted(bundles, key=lambda b: (b.link, b.meta.name)):
            for link in bundleLinks(bundle):
                if isinstance(link.source, EndpointSource):
                    # An endpoint used under two types (unusual: two bundles claiming one link, say) is fetched
                    # once and kept as content of each type, so whichever link serves it gets its own type.
                    types, versions = wanted.setdefault(link.source.endpoint, ({}, set()))
                    types[link.contentType] = None
                    versions.add(_version(bundle))

        for endpoint in [e for e in self._entries if e not in wanted]:
            self._cancel(self._entries.pop(endpoint))

        for endpoint, (typeSet, versionSet) in wanted.items():
            versions = frozenset(versionSet)
            contentTypes = tuple(typeSet)
            entry = self._entries.get(endpoint)
            if entry is None:
                entry = self._entries[endpoint] = _Fetch(contentTypes, versions)
                self._start(endpoint, entry)
                continue
            if entry.contentTypes != contentTypes:
                entry.contentTypes = contentTypes
                entry.contents = _contents(entry.body, contentTypes)
            if entry.versions != versions:
                entry.versions = versions
                self._start(endpoint, entry)

    def get(self, endpoint: Endpoint, contentType: Optional[bytes] = None) -> Optional[BundleContent]:
        """
        The newest content fetched from C{endpoint} as C{contentType} (by default the first type it is used
        under), or None if no fetch has succeeded yet or the endpoint is not used under that type.
        """
        entry = self._entries.get(endpoint)
        if entry is None or not entry.contentTypes:
            return None
        return entry.contents.get(contentType if contentType is not None else entry.contentTypes[0])

    def error(self, endpoint: Endpoint) -> Optional[str]:
        """Why the latest fetch from C{endpoint} failed, or None when it succeeded (or is in progress)."""
        entry = self._entries.get(endpoint)
        return entry.error if entry is not None else None

    def stop(self) -> None:
        """Cancel every fetch and timer (when the service stops)."""
        for entry in self._entries.values():
            self._cancel(entry)
        self._entries.clear()

    def _cancel(self, entry: _Fetch) -> None:
        entry.generation += 1  # whatever is still running now reports to nobody
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        pending, entry.pending = entry.pending, None
        if pending is not None:
            pending.cancel()

    def _start(self, endpoint: Endpoint, entry: _Fetch) -> None:
        self._cancel(entry)
        generation = entry.generation
        d = maybeDeferred(self._fetch, endpoint)
        if not d.called:
            entry.pending = d
        d.addCallbacks(
            self._fetched,
            self._failed,
            callbackArgs=(endpoint, entry, generation),
            errbackArgs=(endpoint, entry, generation),
        )

    def _current(self, endpoint: Endpoint, entry: _Fetch, generation: int) -> bool:
        return entry.generation == generation and self._entries.get(endpoint) is entry

    def _fetched(self, body: bytes, endpoint: Endpoint, entry: _Fetch, generation: int) -> None:
        if not self._current(endpoint, entry, generation):
            return
        entry.pending = None
        entry.body = bytes(body)
        entry.contents = _contents(entry.body, entry.contentTypes)
        entry.error = None
        entry.failures = 0
        if self._refreshInterval is not None:
            entry.timer = self._reactor.callLater(self._refreshInterval, self._start, endpoint, entry)

    def _failed(self, failure: Failure, endpoint: Endpoint, entry: _Fetch, generation: int) -> None:
        if not self._current(endpoint, entry, generation):
            return  # superseded (often by our own cancel): nobody is waiting for it
        entry.pending = None
        entry.error = describeFailure(failure)
        entry.failures += 1
        delay = min(self._maxRetryDelay, self._retryDelay * 2 ** min(entry.failures - 1, 30))
        self._log.warn(
            "Fetching bundle from {url} failed ({error}); {fallback}, retrying in {delay:g}s",
            url=endpoint.origin + endpoint.path,
            error=entry.error,
            fallback="serving the last good copy" if entry.body is not None else "nothing to serve yet",
            delay=delay,
        )
        entry.timer = self._reactor.callLater(delay, self._start, endpoint, entry)
