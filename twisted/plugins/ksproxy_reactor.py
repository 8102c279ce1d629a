"""twistd --reactor=ksproxy: epoll without a log context per I/O event (ksproxy/reactor.py)."""

from twisted.application.reactors import Reactor

ksproxyReactor = Reactor(
    "ksproxy",
    "ksproxy.reactor",
    "epoll reactor without per-event log context (Linux; what `ksproxy run` uses)",
)
