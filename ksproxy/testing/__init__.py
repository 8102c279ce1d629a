"""
Public test helpers for ksproxy and for code that is tested against it.

L{ksproxy.testing.kubeapi.FakeKubeAPI} is a local HTTP server that follows the Kubernetes API conventions
for every call ksproxy makes, so that the real C{kubernetes} client can be used in tests.
"""
