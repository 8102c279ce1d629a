"""
Where resources come from: a directory of manifests (L{ksproxy.sources.files}) or a Kubernetes watch, both
feeding an L{Inventory} on the reactor thread.
"""

from ksproxy.sources.inventory import (
    Inventory,
    InventorySnapshot,
    ObjectRecord,
    SourceDocument,
    SourceError,
)

__all__ = ["Inventory", "InventorySnapshot", "ObjectRecord", "SourceDocument", "SourceError"]
