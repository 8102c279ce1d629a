"""
Memory benchmark for streaming (issue 5, SPEC 6): a 1 GiB upload and a 1 GiB download through a ksproxy process
each grow its resident memory by less than 50 MiB.  Stdlib only besides ksproxy itself (no nginx needed):

    python bench/memory.py [--mib 1024] [--limit-mib 50]

ksproxy runs in a subprocess (C{python -m ksproxy.cli run}) with one ReverseProxy C{/*} to an upstream served by
threads here: it discards upload bodies (answering with the byte count) and streams download bodies from one
reused buffer.  The client also runs here.  RSS is sampled from C{/proc/PID/status} every 10 ms.  Prints one
line per transfer and exits non-zero when a bound does not hold.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Tuple

CHUNK = 1 << 20


def _readHead(sock: socket.socket) -> Tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before the head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _serveUpstream(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_upstreamConnection, args=(conn,), daemon=True).start()


def _upstreamConnection(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    block = b"d" * CHUNK
    with conn:
        while True:
            try:
                head, rest = _readHead(conn)
            except (ConnectionError, OSError):
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])
            }
            if method == b"PUT":
                left = int(headers[b"content-length"]) - len(rest)
                got = len(rest)
                while left > 0:
                    n = conn.recv_into(buf, min(left, CHUNK))
                    if not n:
                        return
                    left -= n
                    got += n
                body = b"%d" % got
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                size = int(target.rsplit(b"=", 1)[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                view = memoryview(block)
                while size > 0:
                    n = min(size, CHUNK)
                    conn.sendall(view[:n])
                    size -= n


def _rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rssKiB(self.pid))
            time.sleep(0.01)


def _upload(port: int, size: int) -> bytes:
    block = memoryview(b"u" * CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"PUT /up HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size
        )
        left = size
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(block[:n])
            left -= n
        head, rest = _readHead(s)
        while True:
            more = s.recv(65536)
            if not more:
                break
            rest += more
        return head.split(b"\r\n")[0] + b" body=" + rest


def _download(port: int, size: int) -> bytes:
    buf = bytearray(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /down?size=%d HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % size)
        head, rest = _readHead(s)
        got = len(rest)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        return head.split(b"\r\n")[0] + b" body=%d" % got


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="transfer size in MiB (default 1024)")
    parser.add_argument(
        "--limit-mib", type=float, default=50.0, help="allowed RSS growth in MiB (default 50)"
    )
    args = parser.parse_args(argv)
    size = args.mib << 20

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    threading.Thread(target=_serveUpstream, args=(listener,), daemon=True).start()
    upPort = listener.getsockname()[1]

    folder = tempfile.mkdtemp(prefix="ksproxy-bench-")
    with open(os.path.join(folder, "rp.yaml"), "w") as f:
        f.write(
            "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata: {name: all}\n"
            f"spec:\n  matcher: {{path: /*, method: '*'}}\n  upstream: {{url: 'http://127.0.0.1:{upPort}'}}\n"
        )
    port = _freePort()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ksproxy.cli",
            "run",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin-listen",
            "none",
            "--source",
            f"dir:{folder}",
            "--no-access-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failed = False
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            print("ksproxy did not start listening", file=sys.stderr)
            return 2
        _download(port, 1 << 20)  # warm up: imports, first connection, pool
        for name, run in (("upload", _upload), ("download", _download)):
            before = _rssKiB(proc.pid)
            sampler = _Sampler(proc.pid)
            sampler.start()
            start = time.monotonic()
            result = run(port, size)
            elapsed = time.monotonic() - start
            sampler.running = False
            sampler.join()
            growth = (sampler.peak - before) / 1024.0
            ok = growth < args.limit_mib and result.endswith(b"body=%d" % size)
            failed = failed or not ok
            print(
                f"{name:8} {args.mib} MiB in {elapsed:5.1f}s ({args.mib / elapsed:6.1f} MiB/s): ksproxy RSS "
                f"{before / 1024:.1f} MiB -> peak {sampler.peak / 1024:.1f} MiB, growth {growth:.1f} MiB "
                f"(limit {args.limit_mib:g}) {'OK' if ok else 'FAIL'}  [{result.decode('latin-1')}]"
            )
    finally:
        proc.terminate()
        proc.wait(10)
        listener.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
