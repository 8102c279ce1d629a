"""
The whole suite runs on the reactor `ksproxy run` installs (ksproxy/reactor.py), where it exists, so every
integration test also checks it; KSPROXY_TEST_REACTOR=default keeps Twisted's default reactor.
"""

import os
import select
import sys

if hasattr(select, "epoll") and os.environ.get("KSPROXY_TEST_REACTOR") != "default":
    if "twisted.internet.reactor" not in sys.modules:
        from ksproxy.reactor import install

        install()
