"""The static token file: Kubernetes' CSV format, and reloads on change, at most once a second."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ksproxy.auth.identity import Identity
from ksproxy.auth.tokenfile import StaticTokenAuthenticator, TokenFileError, parseTokenFile


def lookup(tokens, token):
    import hashlib

    return tokens.get(hashlib.sha256(token.encode()).digest())


def test_parse_kubernetes_csv():
    tokens = parseTokenFile(
        b't1,alice,1001,"dev,ops"\n'
        b"t2,bob,1002\n"
        b"\n"
        b't3, carol , 7, " a , b ,",extra,columns\n'
        b"t2,bobby,1003,late\n"
    )
    assert lookup(tokens, "t1") == Identity("alice", "1001", ("dev", "ops"))
    assert lookup(tokens, "t2") == Identity("bobby", "1003", ("late",))  # the later duplicate wins
    assert lookup(tokens, "t3") == Identity("carol", "7", ("a", "b"))
    assert lookup(tokens, "nope") is None


@pytest.mark.parametrize(
    "data,message",
    [
        (b"t1,alice\n", "line 1: need at least token,user,uid"),
        (b"ok,a,1\n,alice,1\n", "line 2: empty token"),
        (b"t1,,1\n", "line 1: empty user name"),
        (b't1,"al\nice",1\n', "not allowed"),
        (b"\xff,a,1\n", "not UTF-8"),
        (b't1,"alice,1\n', "line"),
    ],
)
def test_parse_errors_name_the_line_not_the_token(data, message):
    with pytest.raises(TokenFileError, match=message) as e:
        parseTokenFile(data, "tokens.csv")
    assert "t1" not in str(e.value).replace("tokens.csv", "")


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.write(b"t1,alice,1,dev\n")
        self.clock = Clock()
        self.auth = StaticTokenAuthenticator(self.path, self.clock)

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)
        # Make every write visible to the mtime check, however coarse the file system's clock.
        st = os.stat(self.path)
        bump = getattr(self, "_bump", 0) + 1
        self._bump = bump
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))

    def test_reload_after_a_second(self):
        self.assertEqual(self.auth.authenticate("t1"), Identity("alice", "1", ("dev",)))
        self.write(b"t2,bob,2\n")
        self.clock.advance(0.99)
        self.assertEqual(self.auth.authenticate("t1"), Identity("alice", "1", ("dev",)))
        self.assertIsNone(self.auth.authenticate("t2"))
        self.clock.advance(0.02)
        self.assertIsNone(self.auth.authenticate("t1"))
        self.assertEqual(self.auth.authenticate("t2"), Identity("bob", "2"))

    def test_broken_reload_keeps_previous_tokens(self):
        self.write(b"t9,only-two-columns\n")
        self.clock.advance(1)
        self.assertEqual(self.auth.authenticate("t1"), Identity("alice", "1", ("dev",)))
        self.assertIn("line 1", self.auth._file.lastError)
        self.flushLoggedErrors()
        # Fixed later: picked up.
        self.write(b"t9,carol,9\n")
        self.clock.advance(1)
        self.assertEqual(self.auth.authenticate("t9"), Identity("carol", "9"))
        self.assertIsNone(self.auth._file.lastError)

    def test_deleted_file_keeps_previous_tokens(self):
        os.remove(self.path)
        self.clock.advance(1)
        self.assertEqual(self.auth.authenticate("t1"), Identity("alice", "1", ("dev",)))

    def test_missing_file_at_start_is_an_error(self):
        self.assertRaises(OSError, StaticTokenAuthenticator, self.path + ".missing", self.clock)
