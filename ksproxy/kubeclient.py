"""
Where the Kubernetes client configuration comes from (SPEC 10, C{--source kubernetes[:KUBECONFIG]}).

One place for both the Kubernetes source and the auth reviews (TokenReview, SubjectAccessReview), so that the choice between in-cluster and kubeconfig credentials
is one small function that the tap and the tests can call without starting a watcher.
"""

from __future__ import annotations

import os
from typing import Optional

from kubernetes import client, config

__all__ = ["loadConfiguration"]


def loadConfiguration(kubeconfig: Optional[str] = None) -> client.Configuration:
    """
    Build a client configuration.

    @param kubeconfig: a kubeconfig path (C{os.pathsep}-separated paths are merged, as kubectl does).
        C{None}: the pod's service account when C{KUBERNETES_SERVICE_HOST} is set, else C{$KUBECONFIG}, else
        C{~/.kube/config}.
    @raise kubernetes.config.ConfigException: no usable configuration; raised at construction, so that a
        misconfigured gateway fails at start rather than retrying forever.
    """
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        # persist_config=False: never write refreshed tokens back into the operator's kubeconfig.
        config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
    return configuration
