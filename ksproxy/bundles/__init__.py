"""
JSBundle content (SPEC 5): inline, ConfigMap and Secret bytes resolved once per change, URL/service
sources fetched and kept, and the HTTP responses for bundle links.
"""

from ksproxy.bundles.content import (
    JS_CONTENT_TYPE,
    BundleContent,
    BundleLink,
    bundleIndex,
    bundleLinks,
    bundleResponse,
    contentTypeFor,
    makeContent,
    resolveBundle,
)
from ksproxy.bundles.fetcher import BundleFetcher

__all__ = [
    "JS_CONTENT_TYPE",
    "BundleContent",
    "BundleLink",
    "BundleFetcher",
    "bundleIndex",
    "bundleLinks",
    "bundleResponse",
    "contentTypeFor",
    "makeContent",
    "resolveBundle",
]
