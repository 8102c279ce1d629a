"""
C{--default-upstream}: unmatched C{/api} and C{/apis} requests go to a kube-apiserver, the way ks-apiserver
fronts one (SPEC 2, issue 6 item 4).

ksproxy talks to it with its own credentials (a bearer token file, e.g. the pod's service-account token) and
asks it to act as the authenticated caller with C{Impersonate-User}/C{Impersonate-Group}.  The client's own
C{Authorization} and any C{Impersonate-*} it sent are removed, so nobody borrows ksproxy's rights.
"""

from __future__ import annotations

import os
from typing import Optional

from ..auth import Identity, addImpersonationHeaders, stripImpersonationHeaders
from ..http.headers import Headers
from ..model.types import Endpoint, TLSSettings

__all__ = ["IN_CLUSTER", "KubeAPICredentials", "inClusterEndpoint", "endpointWithCA"]

_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
IN_CLUSTER = "in-cluster"


class KubeAPICredentials:
    """
    Adds ksproxy's own bearer token and the caller's impersonation headers.  The token file is re-read when
    its modification time changes (projected service-account tokens are rotated), checked at most every
    C{recheck} seconds on the injected clock.
    """

    def __init__(self, clock, tokenFile: Optional[str], recheck: float = 10.0) -> None:
        self.clock = clock
        self.tokenFile = tokenFile
        self.recheck = recheck
        self._token: Optional[bytes] = None
        self._mtime: Optional[float] = None
        self._checkedAt = float("-inf")

    def token(self) -> Optional[bytes]:
        if self.tokenFile is None:
            return None
        now = self.clock.seconds()
        if now - self._checkedAt >= self.recheck:
            self._checkedAt = now
            try:
                mtime = os.stat(self.tokenFile).st_mtime
                if mtime != self._mtime:
                    with open(self.tokenFile, "rb") as f:
                        self._token = f.read().strip()
                    self._mtime = mtime
            except OSError:
                pass  # keep the last token we could read; the API server will say if it no longer works
        return self._token

    def __call__(self, headers: Headers, identity: Identity) -> None:
        headers.remove(b"authorization")
        stripImpersonationHeaders(headers)
        addImpersonationHeaders(headers, identity)
        token = self.token()
        if token:
            headers.set(b"Authorization", b"Bearer " + token)


def _readCA(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path} holds no PEM certificate")
    return data


def endpointWithCA(endpoint: Endpoint, caFile: Optional[str]) -> Endpoint:
    """The endpoint with its CA bundle from a file (the system trust store when None)."""
    if caFile is None:
        return endpoint
    return Endpoint(endpoint.scheme, endpoint.host, endpoint.port, endpoint.path, TLSSettings(caBundle=_readCA(caFile)))


def inClusterEndpoint() -> tuple:
    """The pod's API server (from the environment) with the service-account CA; and the token file path."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = int(os.environ.get("KUBERNETES_SERVICE_PORT", "443"))
    if not host:
        raise ValueError("--default-upstream in-cluster: KUBERNETES_SERVICE_HOST is not set (not in a pod?)")
    endpoint = Endpoint("https", host, port, "", TLSSettings(caBundle=_readCA(os.path.join(_SA_DIR, "ca.crt"))))
    return endpoint, os.path.join(_SA_DIR, "token")
