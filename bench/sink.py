# ruff: noqa: UP031, UP032 - %-formatting kept, as in the reference harness this follows
"""A request-body sink for the 1 GiB upload check (stdlib only, one thread per connection).

Usage: python sink.py LISTEN_PORT

Reads each request's body (Content-Length or chunked) into a reused buffer, discards it, and only then answers
200 with the number of body bytes it received, so a proxy in front of it has to stream the whole upload.
nginx cannot stand in here: it answers a POST to a static location before the body has arrived.
"""

import socket
import sys
import threading

BUF = 1 << 20


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.pending = b""
        self.scratch = bytearray(BUF)

    def recv(self):
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        return self.sock.recv(BUF)

    def line(self):
        while b"\r\n" not in self.pending:
            data = self.sock.recv(BUF)
            if not data:
                raise EOFError
            self.pending += data
        line, self.pending = self.pending.split(b"\r\n", 1)
        return line

    def skip(self, n):
        got = 0
        if self.pending:
            take = min(n, len(self.pending))
            self.pending = self.pending[take:]
            got = take
        view = memoryview(self.scratch)
        while got < n:
            k = self.sock.recv_into(view, min(BUF, n - got))
            if not k:
                raise EOFError
            got += k
        return got


def handle(sock):
    conn = Conn(sock)
    try:
        while True:
            request = conn.line()
            if not request:
                continue
            headers = {}
            while True:
                line = conn.line()
                if not line:
                    break
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            received = 0
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int(conn.line().split(b";")[0], 16)
                    if size == 0:
                        while conn.line():
                            pass
                        break
                    received += conn.skip(size)
                    conn.line()
            elif b"content-length" in headers:
                received = conn.skip(int(headers[b"content-length"]))
            body = b"received %d\n" % received
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
    except (EOFError, OSError, ValueError):
        pass
    finally:
        sock.close()


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(128)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
