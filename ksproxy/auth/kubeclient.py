# -*- test-case-name: tests.integration.test_auth_kube -*-
"""
The one call the gate makes to a kube-apiserver: create a review object (TokenReview, SubjectAccessReview)
and read back its status.

The official client is blocking, so each call runs in the reactor's thread pool.  The C{kubernetes} package
is imported only when a client is built: a gate without reviews never pays for it.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

__all__ = ["IKubeReviewClient", "KubeAPIError", "ThreadedKubeClient", "apiClientFromConfig", "logReviewFailure"]


class KubeAPIError(Exception):
    """The API server answered with something other than a 2xx JSON object."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def logReviewFailure(log: Any, what: str, failure: Any) -> None:
    """
    Log a failed review call: one warning line for what an API server that is down or refusing causes
    (L{KubeAPIError}, connection and timeout errors), the traceback only for anything else (a bug).  The
    failure is about the API call, never about the token, so it is safe to log.
    """
    from twisted.internet.defer import CancelledError

    from ksproxy.failures import describeFailure

    expected: tuple = (KubeAPIError, OSError, TimeoutError, CancelledError)
    try:
        import urllib3.exceptions

        expected += (urllib3.exceptions.HTTPError,)
    except ImportError:  # the kubernetes client (and urllib3 with it) is optional
        pass
    if failure.check(*expected):
        log.warn("{what} failed: {error}", what=what, error=describeFailure(failure))
    else:
        log.failure("{what} failed", failure, what=what)


class IKubeReviewClient(Interface):
    def create(path: str, body: dict) -> Deferred[dict]:
        """
        POST C{body} (a JSON object) to C{path} and fire with the returned object; fail with L{KubeAPIError}
        on a non-2xx answer, or with the transport's error.
        """


def apiClientFromConfig(kubeconfig: Optional[str] = None) -> Any:
    """A C{kubernetes.client.ApiClient} with the credentials L{ksproxy.kubeclient.loadConfiguration} finds."""
    from kubernetes import client

    from ksproxy.kubeclient import loadConfiguration

    return client.ApiClient(configuration=loadConfiguration(kubeconfig))


@implementer(IKubeReviewClient)
class ThreadedKubeClient:
    """
    L{IKubeReviewClient} over a C{kubernetes.client.ApiClient} (its credentials, CA and server), one blocking
    call per pool thread.

    @param timeout: seconds for connect and for the answer; a review must never hold a request for long.
    """

    def __init__(
        self, apiClient: Any, reactor: Any, threadPool: Optional[ThreadPool] = None, timeout: float = 10.0
    ) -> None:
        self._api = apiClient
        self._reactor = reactor
        self._pool = threadPool
        self._timeout = timeout

    def create(self, path: str, body: dict) -> Deferred[dict]:
        pool = self._pool if self._pool is not None else self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, self._post, path, body)

    def _post(self, path: str, body: dict) -> dict:
        params = self._api.param_serialize(
            method="POST",
            resource_path=path,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(*params, _request_timeout=(self._timeout, self._timeout))
        data = response.read()
        if not 200 <= response.status < 300:
            raise KubeAPIError(response.status, _statusMessage(data))
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise KubeAPIError(response.status, f"answer is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise KubeAPIError(response.status, "answer is not a JSON object")
        return obj


def _statusMessage(data: bytes) -> str:
    try:
        obj = json.loads(data)
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            return obj["message"][:200]
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace")
