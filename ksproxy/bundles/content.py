# -*- test-case-name: tests.unit.test_bundles -*-
"""
JSBundle content (SPEC 5): the bytes behind each link, prepared once per change, and the HTTP response for
a request on a link.

Everything a request needs (the ETag, the gzip copy, the headers) is computed when the content is built, so
serving a bundle is a dictionary lookup and a few comparisons.  Content objects are shared: building the same
bytes with the same type again returns the object already in use, so a route-table rebuild triggered by an
unrelated change does not hash or compress anything.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import mimetypes
import posixpath
import re
import weakref
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import attrs

from ksproxy.http.headers import Headers
from ksproxy.model.types import (
    BundleSource,
    ConfigMapSource,
    JSBundle,
    RawSource,
    SecretSource,
)

__all__ = [
    "BundleContent",
    "BundleLink",
    "JS_CONTENT_TYPE",
    "makeContent",
    "bundleLinks",
    "resolveBundle",
    "bundleResponse",
    "bundleIndex",
    "contentTypeFor",
]

JS_CONTENT_TYPE = b"application/javascript; charset=utf-8"
# Smaller bodies are not worth a second representation (and the Vary header that comes with it).
GZIP_MIN_SIZE = 256
# Both the main link and assets are revalidated on every use: asset links carry no version, so a cached copy
# could outlive an upgrade; a revalidation is a cheap 304 thanks to the ETag.
CACHE_CONTROL = b"no-cache"

RefsMapping = Mapping[Tuple[str, str, str], Mapping[str, bytes]]


@attrs.frozen(eq=False)
class BundleContent:
    """
    One representation set of a bundle file.

    @ivar etag: strong, quoted, from the SHA-256 of C{body}.
    @ivar gzipped: C{body} gzip-compressed, when that is smaller (and the body is not tiny), else C{None}.
    @ivar integrity: Subresource Integrity value (C{sha384-...}) of C{body}, for the bundle index.
    """

    body: bytes
    etag: bytes
    gzipped: Optional[bytes]
    contentType: bytes
    integrity: str = ""

    @property
    def gzipEtag(self) -> bytes:
        """The ETag of the gzip representation: a strong ETag must differ between different bytes."""
        return self.etag[:-1] + b'-gzip"'


# Content in use, by (bytes, type): values die with the last route table that holds them.
_contents: weakref.WeakValueDictionary[Tuple[bytes, bytes], BundleContent] = weakref.WeakValueDictionary()


def makeContent(body: bytes, contentType: bytes) -> BundleContent:
    """The content for C{body}; the existing object when the same bytes and type are already in use."""
    key = (body, contentType)
    existing = _contents.get(key)
    if existing is not None:
        return existing
    digest = hashlib.sha256(body).hexdigest()
    gzipped: Optional[bytes] = None
    if len(body) >= GZIP_MIN_SIZE:
        compressed = gzip.compress(body, compresslevel=6, mtime=0)
        if len(compressed) < len(body):
            gzipped = compressed
    content = BundleContent(
        body=body,
        etag=b'"' + digest[:32].encode("ascii") + b'"',
        gzipped=gzipped,
        contentType=contentType,
        integrity="sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode("ascii"),
    )
    _contents[key] = content
    return content


# Types that matter for a console, fixed here rather than taken from the host's /etc/mime.types.
_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".html": "text/html",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".wasm": "application/wasm",
    ".txt": "text/plain",
}
_mimeTypes = mimetypes.MimeTypes()  # the built-in table only: the same answer on every host
_TEXTUAL = re.compile(r"^(text/.*|application/(javascript|json|xml|.*\+json|.*\+xml)|image/svg\+xml)$")


def contentTypeFor(link: str, mimeType: Optional[str] = None, *, main: bool = False) -> bytes:
    """
    C{Content-Type} for a link: JavaScript for the main link; for an asset its C{mimeType} as written, or a
    type guessed from the extension (UTF-8 for textual types), or C{application/octet-stream}.
    """
    if main:
        return JS_CONTENT_TYPE
    if mimeType:
        return mimeType.encode("latin-1", "replace")
    ext = posixpath.splitext(link.split("?", 1)[0])[1].lower()
    guessed = (_TYPES.get(ext) or _mimeTypes.guess_type("x" + ext)[0]) if ext else None
    if not guessed:
        return b"application/octet-stream"
    if _TEXTUAL.match(guessed):
        return f"{guessed}; charset=utf-8".encode("ascii")
    return guessed.encode("ascii")


@attrs.frozen
class BundleLink:
    """One link served for a bundle: the main script or an asset."""

    link: str
    source: BundleSource
    contentType: bytes
    main: bool


def bundleLinks(bundle: JSBundle) -> List[BundleLink]:
    """The main link, then every asset link (an asset that repeats an earlier link is left out)."""
    links = [BundleLink(bundle.link, bundle.source, JS_CONTENT_TYPE, True)]
    seen = {bundle.link}
    for asset in bundle.assets:
        if asset.link in seen:
            continue
        seen.add(asset.link)
        links.append(BundleLink(asset.link, asset.source, contentTypeFor(asset.link, asset.mimeType), False))
    return links


def _lookup(refs: RefsMapping, kind: str, namespace: str, name: str, key: str) -> Union[bytes, str]:
    data = refs.get((kind, namespace, name))
    if data is None and not namespace:
        data = refs.get((kind, "default", name))
    if data is None:
        return f"{kind} {namespace}/{name} not found"
    value = data.get(key)
    if value is None:
        return f"{kind} {namespace}/{name} has no key {key!r}"
    return value


def resolveBundle(bundle: JSBundle, refs: RefsMapping) -> Dict[str, Union[BundleContent, str]]:
    """
    What each link of C{bundle} serves: a L{BundleContent} for inline, ConfigMap and Secret sources, or a
    message saying what is missing (a ConfigMap, a Secret, a key).  Links whose source is a URL or a Service
    are left out: their content is in L{ksproxy.bundles.BundleFetcher}.  Call it when the bundle or C{refs}
    change, not per request.
    """
    out: Dict[str, Union[BundleContent, str]] = {}
    for entry in bundleLinks(bundle):
        source = entry.source
        if isinstance(source, RawSource):
            out[entry.link] = makeContent(source.data, entry.contentType)
        elif isinstance(source, (ConfigMapSource, SecretSource)):
            kind = "ConfigMap" if isinstance(source, ConfigMapSource) else "Secret"
            found = _lookup(refs, kind, source.namespace, source.name, source.key)
            out[entry.link] = makeContent(found, entry.contentType) if isinstance(found, bytes) else found
    return out


# -- HTTP --------------------------------------------------------------------------------------------------

_QVALUE = re.compile(rb"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")
_ETAG = re.compile(rb'(?:W/)?"([^"]*)"')


def _codings(values: Iterable[bytes]) -> Dict[bytes, float]:
    """Accept-Encoding as coding -> q (RFC 9110 12.5.3); elements with an invalid q are ignored."""
    weights: Dict[bytes, float] = {}
    for element in b",".join(values).split(b","):
        coding, *params = element.split(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q: Optional[float] = 1.0
        for param in params:
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                value = value.strip()
                q = float(value) if _QVALUE.match(value) else None
        if q is not None:
            weights[coding] = q
    return weights


def acceptsGzip(values: Sequence[bytes]) -> bool:
    """Whether gzip is the client's preferred acceptable coding (identity wins only with a higher q)."""
    if not values:
        return False
    weights = _codings(values)
    star = weights.get(b"*")
    gz = weights.get(b"gzip", weights.get(b"x-gzip", star))
    if not gz:
        return False
    identity = weights.get(b"identity", star if star is not None and star == 0 else 1.0)
    return gz >= identity


def _noneMatch(values: Sequence[bytes], etags: Sequence[bytes]) -> bool:
    """If-None-Match (RFC 9110 13.1.2): weak comparison against any of our tags; C{*} matches."""
    joined = b",".join(values)
    if any(part.strip() == b"*" for part in joined.split(b",")):
        return True
    ours = {tag.strip(b'"') for tag in etags}
    return any(opaque in ours for opaque in _ETAG.findall(joined))


def bundleResponse(
    content: BundleContent, method: bytes, requestHeaders: Headers, *, main: bool
) -> Tuple[int, List[Tuple[bytes, bytes]], bytes]:
    """
    Status, headers and body for a request on a bundle link.

    GET and HEAD only: anything else is 405 with C{Allow} and an empty body (the caller writes the Status
    body).  C{main} says whether this is the bundle's main script; both kinds get C{Cache-Control:
    no-cache} (see L{CACHE_CONTROL}).
    """
    if method not in (b"GET", b"HEAD"):
        return 405, [(b"Allow", b"GET, HEAD")], b""
    useGzip = content.gzipped is not None and acceptsGzip(requestHeaders.getAll(b"accept-encoding"))
    etag = content.gzipEtag if useGzip else content.etag
    headers: List[Tuple[bytes, bytes]] = [(b"ETag", etag), (b"Cache-Control", CACHE_CONTROL)]
    if content.gzipped is not None:
        headers.append((b"Vary", b"Accept-Encoding"))
    noneMatch = requestHeaders.getAll(b"if-none-match")
    if noneMatch and _noneMatch(noneMatch, (content.etag, content.gzipEtag)):
        return 304, headers, b""
    body = content.gzipped if useGzip and content.gzipped is not None else content.body
    headers.append((b"Content-Type", content.contentType))
    headers.append((b"X-Content-Type-Options", b"nosniff"))
    if useGzip:
        headers.append((b"Content-Encoding", b"gzip"))
    headers.append((b"Content-Length", str(len(body)).encode("ascii")))
    return 200, headers, (b"" if method == b"HEAD" else body)


def bundleIndex(entries: Iterable[Tuple[JSBundle, Optional[BundleContent]]]) -> bytes:
    """
    C{GET /dist/index.json}: one entry per bundle, sorted by link, with C{name}, C{link}, C{integrity} (null
    while the content is not available) and C{version} (the object's resourceVersion, or for objects without
    one, such as the file source's, the start of the content hash).
    """
    items = []
    for bundle, content in entries:
        version = bundle.meta.resourceVersion or (
            content.etag.strip(b'"')[:16].decode("ascii") if content else ""
        )
        items.append(
            {
                "name": bundle.meta.name,
                "link": bundle.link,
                "integrity": content.integrity if content is not None else None,
                "version": version,
            }
        )
    items.sort(key=lambda item: (str(item["link"]), str(item["name"])))
    return json.dumps({"bundles": items}, indent=1, sort_keys=True).encode("utf-8") + b"\n"
