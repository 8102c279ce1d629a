"""
ksproxy as a real process: `twistd -n ksproxy run` in the foreground, and `--workers 2` with a supervisor that
restarts a dead worker and passes SIGTERM on.  Slow (process start-up), bounded: every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = pytest.mark.slow


def _freePort() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _get(url: str, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _waitFor(predicate, deadline: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the process")


@pytest.fixture
def demoUpstream():  # type: ignore[no-untyped-def]
    """The examples point at 127.0.0.1:8081; run them against a private copy that points elsewhere."""
    port = _freePort()
    proc = subprocess.Popen([sys.executable, "-m", "ksproxy.demo", "--port", str(port)], cwd=ROOT)
    folder = tempfile.mkdtemp(prefix="ksproxy-proc-")
    for name in os.listdir(EXAMPLES):
        if name.endswith(".yaml"):
            with open(os.path.join(EXAMPLES, name)) as f:
                text = f.read().replace("127.0.0.1:8081", f"127.0.0.1:{port}")
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    _waitFor(lambda: _get(f"http://127.0.0.1:{port}/healthz")[0] == 200)
    yield folder
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def _start(args, env=None, cwd=ROOT):  # type: ignore[no-untyped-def]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_twistdForeground(demoUpstream) -> None:  # type: ignore[no-untyped-def]
    port, admin = _freePort(), _freePort()
    env = dict(os.environ, PYTHONPATH=ROOT)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = _start(
        # The reactor plugin must be found by a plain twistd, as the Deployment and the unit use it.
        [twistd, "-n", "--pidfile=", "--reactor=ksproxy", "ksproxy", "run", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1", "--source", f"dir:{demoUpstream}"],
        env,
    )
    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{admin}/readyz")[0] == 200)
        status, body = _get(f"http://127.0.0.1:{port}/proxy/demo/hello")
        assert status == 200 and b'"uri": "/hello"' in body
        status, body = _get(f"http://127.0.0.1:{port}/dist/demo/index.js")
        assert status == 200 and b"demo-inline" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("taken", ["listen", "admin", "workers"])
def test_portInUseIsOneLineNotATraceback(taken) -> None:  # type: ignore[no-untyped-def]
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    listen = f"tcp:{port if taken != 'admin' else _freePort()}:interface=127.0.0.1"
    admin = f"tcp:{port}:interface=127.0.0.1" if taken == "admin" else "none"
    workers = ["--workers", "2"] if taken == "workers" else []
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ksproxy.cli", "run", "--listen", listen, "--admin-listen", admin,
             "--source", f"dir:{EXAMPLES}", *workers],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    finally:
        held.close()
    # twistd -n sends what is written to stderr after logging starts through its log, on stdout.
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"ksproxy: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--listen", "tcp:99999"], "ksproxy: cannot listen: bind(): port must be 0-65535"),
        (["--admin-listen", "tcp:99999"], "ksproxy: cannot listen: bind(): port must be 0-65535"),
        (["--listen", "unix:/nonexistent/ksproxy/s.sock"], "ksproxy: cannot listen: [Errno 2] No such file"),
        (["--workers", "2", "--listen", "tcp:99999"], "ksproxy: cannot listen on *:99999: bind(): port must"),
    ],
)
def test_anAddressThatCannotBeBoundIsOneLine(args, fragment) -> None:  # type: ignore[no-untyped-def]
    """Not only a port in use: a port out of range, a socket in a missing folder (twistd binds them)."""
    base = ["--admin-listen", "none"] if "--admin-listen" not in args else ["--listen", f"tcp:{_freePort()}"]
    result = subprocess.run(
        [sys.executable, "-m", "ksproxy.cli", "run", "--source", f"dir:{EXAMPLES}", *base, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert fragment in output
    assert "Traceback" not in output


def test_workersShareThePortAndRestart(demoUpstream) -> None:  # type: ignore[no-untyped-def]
    port, admin = _freePort(), _freePort()
    proc = _start(
        [sys.executable, "-m", "ksproxy.cli", "run", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1", "--source", f"dir:{demoUpstream}",
         "--workers", "2", "--no-access-log"]
    )
    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{admin}/readyz")[0] == 200)
        _waitFor(lambda: len(_children(proc.pid)) == 2)
        for _ in range(20):
            assert _get(f"http://127.0.0.1:{port}/proxy/demo/x")[0] == 200
        first = _children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        # The other worker keeps serving while the dead one is replaced.
        assert _get(f"http://127.0.0.1:{port}/proxy/demo/x")[0] == 200
        _waitFor(lambda: len(_children(proc.pid)) == 2 and set(_children(proc.pid)) != set(first))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert _children(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workersMetricsCoverEveryWorker(demoUpstream) -> None:  # type: ignore[no-untyped-def]
    """/metrics (served by worker 0) counts the requests every worker answered, labelled by worker."""
    from prometheus_client.parser import text_string_to_metric_families

    port, admin = _freePort(), _freePort()
    proc = _start(
        [sys.executable, "-m", "ksproxy.cli", "run", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1", "--source", f"dir:{demoUpstream}",
         "--workers", "2", "--no-access-log", "--drain-grace", "1s"]
    )

    def scrape() -> dict:
        status, body = _get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200, body
        out: dict = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name in ("ksproxy_requests_total", "ksproxy_worker_metrics_up"):
                    key = (s.name, s.labels["worker"])
                    out[key] = out.get(key, 0) + s.value
        return out

    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{admin}/readyz")[0] == 200)
        _waitFor(lambda: scrape().get(("ksproxy_worker_metrics_up", "1")) == 1)
        # New connections each: the kernel spreads them over both workers' accept calls, mostly.
        sent = 0
        while sent < 400:
            assert _get(f"http://127.0.0.1:{port}/proxy/demo/x")[0] == 200
            sent += 1
            if sent % 50 == 0 and all(scrape().get(("ksproxy_requests_total", w), 0) > 0 for w in "01"):
                break
        _waitFor(lambda: sum(v for (name, _), v in scrape().items() if name == "ksproxy_requests_total") == sent)
        got = scrape()
        assert got[("ksproxy_requests_total", "0")] > 0 and got[("ksproxy_requests_total", "1")] > 0, got
        assert got[("ksproxy_worker_metrics_up", "0")] == 1 and got[("ksproxy_worker_metrics_up", "1")] == 1
        with open(f"/proc/{_children(proc.pid)[0]}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        directory = env[b"KSPROXY_WORKER_DIR"].decode()
        assert os.path.exists(os.path.join(directory, "metrics-1.sock"))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert not os.path.exists(directory)  # the metrics sockets' directory goes with the supervisor
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def test_workersStopWhenTheSupervisorIsKilled(demoUpstream) -> None:  # type: ignore[no-untyped-def]
    port = _freePort()
    proc = _start(
        [sys.executable, "-m", "ksproxy.cli", "run", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin-listen", "none", "--source", f"dir:{demoUpstream}", "--workers", "2", "--no-access-log",
         "--drain-grace", "1s"]
    )
    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{port}/proxy/demo/x")[0] == 200)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(10)
        # Orphaned workers notice within a second or two and stop serving the unsupervised port.
        _waitFor(lambda: not any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers))
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_workersRunFromADirectoryHoldingAKsproxyFolder(demoUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Run from /etc (with /etc/ksproxy/manifests) or a checkout's parent: ./ksproxy must not shadow the package."""
    (tmp_path / "ksproxy" / "manifests").mkdir(parents=True)
    port = _freePort()
    script = os.path.join(os.path.dirname(sys.executable), "ksproxy")
    if not os.path.exists(script):
        pytest.skip("the ksproxy console script is not installed")
    proc = _start(
        [script, "run", "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin-listen", "none",
         "--source", f"dir:{demoUpstream}", "--workers", "2", "--no-access-log", "--drain-grace", "1s"],
        cwd=str(tmp_path),
    )
    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{port}/proxy/demo/x", timeout=2)[0] == 200, deadline=15)
        _waitFor(lambda: len(_children(proc.pid)) == 2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workerImportsTheSupervisorsPackage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker runs the supervisor's own ksproxy even where ./ksproxy is another (regular) package."""
    from ksproxy.workers import workerArgv

    shadow = tmp_path / "ksproxy"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "cli.py").write_text("import sys\nsys.stdout.write('shadowed')\nsys.exit(3)\n")
    argv = workerArgv(["--workers", "2", "--source", "dir:x"])
    assert argv[argv.index("run"):] == ["run", "--source", "dir:x"]
    # The same interpreter and bootstrap, asked for an offline check instead of a gateway.
    interpreter = argv[: argv.index("run")]
    done = subprocess.run(
        [*interpreter, "check", EXAMPLES], cwd=str(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert "shadowed" not in done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resources accepted, 0 problems" in done.stdout


class _HeldUpstream(BaseHTTPRequestHandler):
    """Answers /hold only once the test releases it: a request in flight while the gateway stops."""

    received: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        if self.path.startswith("/hold"):
            self.server.received.set()  # type: ignore[attr-defined]
            self.server.release.wait(20)  # type: ignore[attr-defined]
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_workersRefuseNewConnectionsWhileDraining(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After SIGTERM the port refuses new clients at once (none waits in a backlog nobody accepts from), and
    the request in flight still gets its answer."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _HeldUpstream)
    upstream.daemon_threads = True
    upstream.received = threading.Event()  # type: ignore[attr-defined]
    upstream.release = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    (tmp_path / "held.yaml").write_text(
        "apiVersion: extensions.kubesphere.io/v1alpha1\nkind: ReverseProxy\nmetadata:\n  name: held\n"
        "spec:\n  matcher:\n    path: /held/*\n    method: '*'\n  upstream:\n"
        f"    url: http://127.0.0.1:{upstream.server_address[1]}\n  directives:\n    stripPathPrefix: /held\n"
    )
    port = _freePort()
    proc = _start(
        [sys.executable, "-m", "ksproxy.cli", "run", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--admin-listen", "none", "--source", f"dir:{tmp_path}", "--workers", "2", "--no-access-log",
         "--drain-grace", "20s"]
    )
    client = None
    try:
        _waitFor(lambda: _get(f"http://127.0.0.1:{port}/held/ping", timeout=2)[0] == 200)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /held/hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert upstream.received.wait(10)
        proc.send_signal(signal.SIGTERM)
        _waitFor(lambda: _refused(port), deadline=5)
        assert proc.poll() is None  # still draining the request in flight
        upstream.release.set()
        answer = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert proc.wait(15) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        upstream.release.set()
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
        upstream.shutdown()
        upstream.server_close()
