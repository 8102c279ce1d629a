"""
A raw, scripted HTTP/1.1 upstream for protocol tests, and small blocking socket clients (run in threads).

The upstream parses requests with httptools and answers by the last path segment: WebSocket and SPDY-style
upgrades (echo tunnels), SSE and watch streams that the test feeds event by event, HEAD/204/304, trailers, several
Set-Cookie headers, 100-continue, large downloads, and a request body it reads only when the test says so.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from typing import Dict, List, Optional, Tuple

import httptools
from twisted.internet import threads
from twisted.internet.protocol import Factory, Protocol

CLIENT_TIMEOUT = 10.0
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Seen:
    """One request as the upstream received it."""

    def __init__(self, method: bytes, target: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = b""
        self.bodyBytes = 0
        self.complete = False

    def header(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def headerAll(self, name: bytes) -> List[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Upstream(Protocol):
    def __init__(self, factory: ScriptedUpstream) -> None:
        self.factory = factory
        self._parser = httptools.HttpRequestParser(self)
        self._headers: List[Tuple[bytes, bytes]] = []
        self._url = b""
        self.seen: Optional[Seen] = None
        self.mode = "http"  # or "ws", "raw"
        self._wsBuffer = b""
        self.keepBody = True

    # -- parsing ---------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "ws":
            self._wsData(data)
            return
        if self.mode == "raw":
            self.transport.write(b"echo:" + data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0] :]
            self._upgrade()
            if rest:
                self.dataReceived(rest)

    def on_message_begin(self) -> None:
        self._headers = []
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.seen = Seen(self._parser.get_method(), self._url, self._headers)
        self.factory.requests.append(self.seen)
        word = self._word()
        if word == "slowread":
            # Read nothing of the body until the test says so (L{resumeReading}); a small receive buffer makes
            # the kernel hold little, so the sender's backpressure shows after less data.
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            self.transport.pauseProducing()
            self.factory.slowReaders.append(self)
            self.keepBody = False
        elif word == "continue" and self.seen.header(b"expect"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.seen is not None
        self.seen.bodyBytes += len(body)
        if self.keepBody:
            self.seen.body += body

    def on_message_complete(self) -> None:
        assert self.seen is not None
        self.seen.complete = True
        if not self._parser.should_upgrade():
            self._respond()

    def _word(self) -> str:
        assert self.seen is not None
        path = self.seen.target.split(b"?", 1)[0]
        return path.rsplit(b"/", 1)[-1].decode("latin-1")

    # -- answers ---------------------------------------------------------------------------------------------

    def _respond(self) -> None:
        seen = self.seen
        assert seen is not None
        word = self._word()
        t = self.transport
        if word in ("sse", "watch"):
            ctype = b"text/event-stream" if word == "sse" else b"application/json"
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % ctype)
            self.factory.streams.append(self)
            first = self.factory.firstEvent(word, 1)
            t.write(chunk(first))
        elif word == "head":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\n")
            if seen.method != b"HEAD":
                t.write(b"hello world")
        elif word == "nocontent":
            t.write(b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n")
        elif word == "notmodified":
            t.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 42\r\n\r\n')
        elif word == "trailers":
            t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n")
            t.write(chunk(b"part1,") + chunk(b"part2") + b"0\r\nX-Checksum: abc123\r\n\r\n")
        elif word == "cookies":
            t.write(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2, c=3\r\n"
                b"Set-Cookie: d=4; Expires=Wed, 21 Oct 2015 07:28:00 GMT\r\nContent-Length: 2\r\n\r\nok"
            )
        elif word == "big":
            size = int(dict(p.split(b"=") for p in seen.target.split(b"?", 1)[1].split(b"&"))[b"size"])
            self.factory.bigWriters.append(self)
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            _Sender(t, size).start()
        else:
            body = b"%s %s %d" % (seen.method, seen.target, seen.bodyBytes)
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

    def resumeReading(self) -> None:
        """Start reading a slow reader's body, with a normal receive buffer again."""
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.transport.resumeProducing()

    def push(self, data: bytes) -> None:
        """Send one more event of a stream."""
        self.transport.write(chunk(data))

    def end(self) -> None:
        self.transport.write(b"0\r\n\r\n")

    def _upgrade(self) -> None:
        seen = self.seen
        assert seen is not None
        word = self._word()
        proto = (seen.header(b"upgrade") or b"").lower()
        if proto == b"websocket":
            key = seen.header(b"sec-websocket-key") or b""
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: %s\r\nX-Upstream: ws\r\n\r\n" % accept
            )
            self.mode = "ws"
        elif proto.startswith(b"spdy/") and word != "refuse":
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n"
                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
            )
            self.mode = "raw"
        else:
            body = b"no upgrade here"
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            self.transport.loseConnection()

    # -- WebSocket (RFC 6455): echo every message -------------------------------------------------------------

    def _wsData(self, data: bytes) -> None:
        self._wsBuffer += data
        while True:
            frame = _parseClientFrame(self._wsBuffer)
            if frame is None:
                return
            opcode, payload, used = frame
            self._wsBuffer = self._wsBuffer[used:]
            if opcode == 8:
                self.transport.write(_serverFrame(8, payload[:2]))
                self.transport.loseConnection()
                return
            if opcode == 9:
                self.transport.write(_serverFrame(10, payload))
            elif opcode in (1, 2):
                self.transport.write(_serverFrame(opcode, b"echo:" + payload))


class _Sender:
    """Writes C{size} bytes as fast as the transport takes them (a push producer's consumer)."""

    def __init__(self, transport, size: int) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.left = size
        self.paused = False
        self.pauses = 0

    def start(self) -> None:
        # A small kernel send buffer: the backpressure from a reader that stops shows after less data.
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        block = b"x" * 65536
        while not self.paused and self.left > 0:
            n = min(self.left, len(block))
            self.left -= n
            self.transport.write(block[:n])
        if self.left == 0:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


def _parseClientFrame(buf: bytes) -> Optional[Tuple[int, bytes, int]]:
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = buf[1] & 0x80
    length = buf[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        (length,) = struct.unpack("!H", buf[2:4])
        pos = 4
    elif length == 127:
        if len(buf) < 10:
            return None
        (length,) = struct.unpack("!Q", buf[2:10])
        pos = 10
    mask = b""
    if masked:
        mask = buf[pos : pos + 4]
        pos += 4
    if len(buf) < pos + length:
        return None
    payload = buf[pos : pos + length]
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + length


def _serverFrame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload


class ScriptedUpstream(Factory):
    """The factory; C{requests}, C{streams}, C{slowReaders} and C{bigWriters} let a test look and steer."""

    def __init__(self) -> None:
        self.requests: List[Seen] = []
        self.streams: List[_Upstream] = []
        self.slowReaders: List[_Upstream] = []
        self.bigWriters: List[_Upstream] = []

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        return _Upstream(self)

    @staticmethod
    def firstEvent(word: str, n: int) -> bytes:
        if word == "sse":
            return b'id: %d\nevent: tick\ndata: {"n": %d}\n\n' % (n, n)
        return b'{"type":"ADDED","object":{"kind":"Pod","metadata":{"name":"p%d"}}}\n' % n

    @property
    def last(self) -> Seen:
        return self.requests[-1]


def listen(reactor) -> Tuple[ScriptedUpstream, object, int]:  # type: ignore[no-untyped-def]
    factory = ScriptedUpstream()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return factory, port, port.getHost().port


class StreamClient:
    """A blocking client socket kept open across several steps of a test (each step runs in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.data = b""

    def send(self, data: bytes):  # type: ignore[no-untyped-def]
        return threads.deferToThread(self.sock.sendall, data)

    def _readUntil(self, marker: bytes) -> bytes:
        while marker not in self.data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
        return self.data

    def readUntil(self, marker: bytes):  # type: ignore[no-untyped-def]
        """Read until C{marker} has arrived (or the server closed); fires with everything read so far."""
        return threads.deferToThread(self._readUntil, marker)

    def _readAll(self) -> bytes:
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.data
            self.data += chunk

    def readAll(self):  # type: ignore[no-untyped-def]
        return threads.deferToThread(self._readAll)

    def _count(self, limit: int) -> int:
        """Read until close (or C{limit} bytes), keeping only the first 64 KiB; return the byte count."""
        total = len(self.data)
        while total < limit:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if len(self.data) < 65536:
                self.data += chunk[:65536]
        return total

    def readCount(self, limit: int):  # type: ignore[no-untyped-def]
        return threads.deferToThread(self._count, limit)

    def close(self) -> None:
        self.sock.close()


def splitResponse(data: bytes) -> Tuple[bytes, Dict[bytes, List[bytes]], bytes]:
    """(status line, headers by lower-case name, rest) of a raw response."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: Dict[bytes, List[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers, rest
