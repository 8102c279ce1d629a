#!/usr/bin/env python3
# ruff: noqa: UP031, UP032 - %-formatting kept, as in the reference harness this follows
"""ksproxy side-by-side benchmark: peers, ksproxy-only checks, and the issue-7 targets (loopback only).

    .venv/bin/python bench/run.py --quick      # ~2 min smoke run
    .venv/bin/python bench/run.py              # full run, under 10 min
    .venv/bin/python bench/run.py --profile 15 # py-spy profile of ksproxy under the 1 KiB keep-alive load

Layout of one run (2 CPUs):

  CPU 0: wrk (1 thread) + upstream nginx (1 worker, static /1k /1m /32m /1g) + the upload sink
  CPU 1: the reverse proxy under test (every peer single process / thread / worker)

Each peer is started once on its own 127.0.0.1 port.  Measurements are interleaved: for every repetition, for
every scenario, every peer runs once, in an order rotated per repetition, so drift hits all peers alike; the
tables show medians.  The script installs nothing: it says what is missing and how to install it.  Everything
it starts runs in a process group of its own and is stopped by PID at the end, also on Ctrl-C or an error.
Only the standard library is used here; the Python peers run with --python (default: this interpreter).
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LUA_REPORT = os.path.join(HERE, "lua", "report.lua")
LUA_PACED = os.path.join(HERE, "lua", "paced.lua")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1048576.0

# The reference run (same method, same kind of machine), used only to *estimate* Caddy when it is not
# installed: Caddy's figures as a fraction of "direct" in that run.  Marked "est." wherever used.
REF = dict(direct_small=44200, caddy_small=10200, direct_close=12200, caddy_close=6860,
           direct_p50=73, caddy_p50=306)

# ---------------------------------------------------------------- scenarios
# group "main": every peer; group "rules": the two ksproxy table-size instances only.
SCENARIOS = {
    "small": dict(title="1 KiB GET, keep-alive, 50 connections (saturating)",
                  path="/1k", conns=50, headers=[], paced=False, group="main"),
    "big": dict(title="1 MiB GET, keep-alive, 10 connections (throughput)",
                path="/1m", conns=10, headers=[], paced=False, group="main"),
    "paced": dict(title="1 KiB GET, keep-alive, 50 connections, fixed 1000 req/s (latency)",
                  path="/1k", conns=50, headers=[], paced=True, group="main"),
    "close": dict(title="1 KiB GET, `Connection: close` on every request, 50 connections",
                  path="/1k", conns=50, headers=["Connection: close"], paced=False, group="main"),
    "rules": dict(title="1 KiB GET, keep-alive, 50 connections: ksproxy with 1 rule vs N rules",
                  path=None, conns=50, headers=[], paced=False, group="rules"),
}
SCENARIO_ORDER = ["small", "big", "paced", "close", "rules"]
CHECKS = ["slow", "swap", "idle", "gib", "workers"]


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# ------------------------------------------------------------ /proc helpers
def proc_children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def proc_tree(pid):
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen or not os.path.isdir("/proc/%d" % p):
            continue
        seen.append(p)
        todo += proc_children(p)
    return seen


def proc_stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # comm may contain spaces and parentheses


def tree_cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            fields = proc_stat_fields(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total / CLK_TCK


def tree_status_kb(pids, key):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_hwm(pids):
    ok = True
    for p in pids:
        try:
            with open("/proc/%d/clear_refs" % p, "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        except OSError:
            ok = False
    return ok


def cpu_times():
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                out[int(parts[0][3:])] = dict(task=v[0] + v[1] + v[2], irq=v[5] + v[6],
                                              idle=v[3] + v[4], steal=v[7], total=sum(v))
    return out


def cpu_delta(before, after):
    return {c: {k: after[c][k] - before[c][k] for k in after[c]} for c in after if c in before}


def steal_pct(d, cpu):
    x = d.get(cpu)
    return 100.0 * x["steal"] / max(1, x["total"]) if x else 0.0


def foreign_pct(d, ours_s, wall_s):
    """CPU used by processes that are not ours, % of one CPU (user+nice+system ticks minus ours)."""
    task_s = sum(x["task"] for x in d.values()) / CLK_TCK
    return 100.0 * max(0.0, task_s - ours_s) / max(1e-3, wall_s)


# ---------------------------------------------------------- process control
# Own process group (a terminal Ctrl-C reaches only this script, which stops the children itself), same
# session (a new session would get its own scheduler autogroup and defeat the SCHED_IDLE keep-awake loops).
NEW_PGRP = dict(process_group=0) if sys.version_info >= (3, 11) else dict(preexec_fn=os.setpgrp)


class Proc:
    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.logf = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd, **NEW_PGRP)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def tree(self):
        return proc_tree(self.pid) if self.alive() else []

    def stop(self, grace=5.0):
        """SIGTERM our PID, then SIGKILL it and leftover descendants still in the group we created."""
        desc = self.tree()
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        for p in desc:
            if p == self.pid:
                continue
            try:
                if int(proc_stat_fields(p)[2]) == self.pid:  # process group
                    os.kill(p, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        self.logf.close()


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy variables


def http_get(port, path, timeout=5.0):
    with _OPENER.open("http://%s:%d%s" % (HOST, port, path), timeout=timeout) as r:
        return r.status, r.read(), r.headers


def wait_ready(proc, port, path, expect, timeout=30.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if not proc.alive():
            return "exited with code %s (see %s)" % (proc.popen.returncode, proc.log_path)
        try:
            status, body, _ = http_get(port, path, timeout=2)
            if status == 200 and (expect is None or body == expect):
                return None
            last = "status %s, %d bytes" % (status, len(body))
        except Exception as e:  # noqa: BLE001 - still starting
            last = repr(e)
        time.sleep(0.2)
    return "not ready after %.0fs: %s" % (timeout, last)


def wait_port(proc, port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not proc.alive():
            return "exited (see %s)" % proc.log_path
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return None
        except OSError:
            time.sleep(0.1)
    return "port %d not open after %.0fs" % (port, timeout)


def http_roundtrip(sock, request):
    """Send one request on a blocking socket and read one response with a Content-Length body."""
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise OSError("connection closed before the response headers")
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(body) < need:
        data = sock.recv(65536)
        if not data:
            raise OSError("connection closed mid-body")
        body += data
    return int(head.split(b" ", 2)[1]), head, body


# ----------------------------------------------------------- peer configs
NGINX_TMP = """  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
"""


def nginx_user():
    return "user root;\n" if os.geteuid() == 0 else ""


def write_upstream_conf(rundir, port):
    conf = os.path.join(rundir, "upstream-nginx.conf")
    with open(conf, "w") as f:
        f.write("""# upstream origin: static files, 1 worker, no access log
daemon off;
master_process on;
worker_processes 1;
{user}pid {rd}/upstream-nginx.pid;
error_log {rd}/upstream-nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 65;
  default_type application/octet-stream;
  open_file_cache max=64;
{tmpdirs}  server {{
    listen {host}:{port} backlog=4096;
    root {rd}/www;
  }}
}}
""".format(rd=rundir, user=nginx_user(), host=HOST, port=port,
           tmpdirs=NGINX_TMP.format(tmp=os.path.join(rundir, "tmp", "upstream"))))
    return conf


def peer_nginx(ctx, port):
    rundir, up = ctx["rundir"], ctx["up_port"]
    conf = os.path.join(rundir, "proxy-nginx.conf")
    with open(conf, "w") as f:
        f.write("""# nginx as reverse proxy: 1 worker, upstream keep-alive pool, defaults otherwise
daemon off;
master_process on;
worker_processes 1;
{user}pid {rd}/proxy-nginx.pid;
error_log {rd}/proxy-nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65;
{tmpdirs}  upstream origin {{
    server {host}:{up};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {host}:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""".format(rd=rundir, user=nginx_user(), host=HOST, port=port, up=up,
           tmpdirs=NGINX_TMP.format(tmp=os.path.join(rundir, "tmp", "proxy-nginx"))))
    return dict(argv=["nginx", "-e", os.path.join(rundir, "proxy-nginx.error.log"), "-c", conf],
                desc="nginx 1 worker, proxy_pass + upstream keepalive 64, HTTP/1.1 upstream, "
                     "default proxy buffering, access_log off")


def peer_haproxy(ctx, port):
    conf = os.path.join(ctx["rundir"], "haproxy.cfg")
    with open(conf, "w") as f:
        f.write("""# haproxy: 1 thread, HTTP mode, server-side connection reuse, no logging
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind {host}:{port}
  default_backend be
backend be
  http-reuse always
  server origin {host}:{up} maxconn 1000
""".format(host=HOST, port=port, up=ctx["up_port"]))
    return dict(argv=["haproxy", "-db", "-f", conf],
                desc="haproxy nbthread 1, mode http, http-reuse always, no log")


def peer_caddy(ctx, port):
    rundir = ctx["rundir"]
    conf = os.path.join(rundir, "Caddyfile")
    with open(conf, "w") as f:
        f.write("""{{
	admin off
	auto_https off
	servers {{
		protocols h1
	}}
}}
http://{host}:{port} {{
	bind {host}
	reverse_proxy {host}:{up} {{
		transport http {{
			keepalive_idle_conns 128
			keepalive_idle_conns_per_host 64
		}}
	}}
}}
""".format(host=HOST, port=port, up=ctx["up_port"]))
    home = os.path.join(rundir, "caddy-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, XDG_DATA_HOME=home, XDG_CONFIG_HOME=home, GOMAXPROCS="1")
    return dict(argv=["caddy", "run", "--config", conf, "--adapter", "caddyfile"], env=env,
                desc="caddy reverse_proxy, GOMAXPROCS=1, idle conns per host 64, no access log")


def peer_twisted(ctx, port):
    return dict(argv=[ctx["python"], os.path.join(HERE, "proxies", "twisted_rproxy.py"),
                      str(port), HOST, str(ctx["up_port"])],
                desc="twisted.web.proxy.ReverseProxyResource as shipped (epoll reactor)")


def peer_aiohttp(ctx, port):
    return dict(argv=[ctx["python"], os.path.join(HERE, "proxies", "aiohttp_rproxy.py"),
                      str(port), HOST, str(ctx["up_port"])],
                desc="aiohttp streaming proxy, pooled upstream keep-alive, default asyncio loop")


def reverse_proxy_doc(name, path, upstream, strip=None, header_down=None):
    lines = ["apiVersion: extensions.kubesphere.io/v1alpha1", "kind: ReverseProxy",
             "metadata: {name: %s}" % name, "spec:",
             "  matcher: {path: '%s', method: '*'}" % path,
             "  upstream: {url: '%s'}" % upstream]
    if strip or header_down:
        lines.append("  directives:")
        if strip:
            lines.append("    stripPathPrefix: %s" % strip)
        if header_down:
            lines.append("    headerDown: ['%s']" % header_down)
    return "\n".join(lines) + "\n"


def write_manifest(directory, docs, name="bench.yaml", text=None):
    """Write atomically (rename) so the watcher never sees half a file (YAML documents, or C{text} as is)."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(directory.rstrip("/")), suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write("---\n".join(docs) if text is None else text)
    os.replace(tmp, os.path.join(directory, name))


def rules_json(n, probe, upstream, gen):
    """The same resources as L{rules_docs}, as one JSON List (what `kubectl get -o json` writes)."""
    ids = [probe] if n == 1 else range(n)
    items = [{"apiVersion": "extensions.kubesphere.io/v1alpha1", "kind": "ReverseProxy",
              "metadata": {"name": "r-%d" % i},
              "spec": {"matcher": {"path": "/r/%d/*" % i, "method": "*"}, "upstream": {"url": upstream},
                       "directives": {"stripPathPrefix": "/r/%d" % i,
                                      "headerDown": ["X-Bench-Gen %d" % gen]}}} for i in ids]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def rules_docs(n, probe, upstream, gen):
    """n ReverseProxy resources /r/<i>/* (prefix stripped, one header down); n == 1 keeps only /r/<probe>/*."""
    ids = [probe] if n == 1 else range(n)
    return [reverse_proxy_doc("r-%d" % i, "/r/%d/*" % i, upstream, strip="/r/%d" % i,
                              header_down="X-Bench-Gen %d" % gen) for i in ids]


def ksproxy_spec(ctx, port, manifest_dir, admin_port=None):
    listen = "tcp:%d:interface=%s:backlog=1024" % (port, HOST)
    admin = "tcp:%d:interface=%s" % (admin_port, HOST) if admin_port else "none"
    argv = [ctx["python"], "-m", "ksproxy.cli", "run", "--listen", listen, "--admin-listen", admin,
            "--source", "dir:" + manifest_dir, "--no-access-log"] + ctx["ksproxy_args"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return dict(argv=argv, env=env, cwd=ROOT, desc=" ".join(shlex.quote(a) for a in argv))


def peer_ksproxy(ctx, port):
    d = os.path.join(ctx["rundir"], "manifests-main")
    up = "http://%s:%d" % (HOST, ctx["up_port"])
    sink = "http://%s:%d" % (HOST, ctx["sink_port"])
    write_manifest(d, [reverse_proxy_doc("all", "/*", up),
                       reverse_proxy_doc("sink", "/sink/*", sink)])
    spec = ksproxy_spec(ctx, port, d)
    spec["desc"] = "ksproxy, 1 process: ReverseProxy /* -> upstream (plus /sink/* for the upload check): " \
        + spec["desc"]
    return spec


def peer_ks_rules(n):
    def build(ctx, port):
        d = os.path.join(ctx["rundir"], "manifests-rules-%d" % n)
        up = "http://%s:%d" % (HOST, ctx["up_port"])
        write_manifest(d, rules_docs(n, ctx["probe"], up, 1))
        admin = ctx["admin_port"] if n > 1 else None
        spec = ksproxy_spec(ctx, port, d, admin)
        spec.update(manifest_dir=d, admin_port=admin, rules=n)
        spec["desc"] = "ksproxy with %d ReverseProxy rule%s /r/<i>/* (stripPathPrefix, headerDown)" % (
            n, "" if n == 1 else "s")
        return spec
    return build


# name, binary needed (None: Python peer), module needed, builder, group
PEERS = [
    ("nginx", "nginx", None, peer_nginx, "main"),
    ("haproxy", "haproxy", None, peer_haproxy, "main"),
    ("caddy", "caddy", None, peer_caddy, "main"),
    ("twisted", None, "twisted", peer_twisted, "main"),
    ("aiohttp", None, "aiohttp", peer_aiohttp, "main"),
    ("ksproxy", None, "ksproxy", peer_ksproxy, "main"),
]


# ------------------------------------------------------------------ runner
def wrk_argv(port, sc, path, duration):
    argv = ["taskset", "-c", "0", "wrk", "-t1", "-c%d" % sc["conns"], "-d%ds" % duration,
            "--timeout", "5s", "--latency", "-s", LUA_PACED if sc["paced"] else LUA_REPORT]
    for h in sc["headers"]:
        argv += ["-H", h]
    argv.append("http://%s:%d%s" % (HOST, port, path))
    return argv


def start_wrk(argv, rate):
    env = dict(os.environ, BENCH_RATE=str(rate), BENCH_THREADS="1")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, **NEW_PGRP)


def finish_wrk(p, argv, duration, rawdir, tag):
    try:
        out, _ = p.communicate(timeout=duration + 20)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)  # our own wrk, by PID
        out, _ = p.communicate()
        out += b"\n(killed: wrk overran its time limit)\n"
    except BaseException:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        raise
    text = out.decode("utf-8", "replace")
    if rawdir:
        with open(os.path.join(rawdir, tag + ".txt"), "w") as f:
            f.write(" ".join(shlex.quote(a) for a in argv) + "\n" + text)
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    raise RuntimeError("wrk produced no result for %s:\n%s" % (tag, text[-2000:]))


def run_wrk(port, sc, path, duration, rate, rawdir, tag):
    argv = wrk_argv(port, sc, path, duration)
    return finish_wrk(start_wrk(argv, rate), argv, duration, rawdir, tag), argv


def start_keepawake(rundir):
    """One SCHED_IDLE busy loop per CPU so the vCPUs never halt during the paced run.

    A halted vCPU here takes 100+ us to wake, and at 1000 req/s every cross-CPU hop pays it, which would swamp
    the proxy's own latency.  SCHED_IDLE tasks yield at once to any runnable task; `timeout` bounds them even
    if this script dies.  Their CPU time is not counted as anyone's.
    """
    spinners = []
    for cpu in (0, 1):
        spinners.append(Proc("keepawake%d" % cpu,
                             ["taskset", "-c", str(cpu), "chrt", "-i", "0", "timeout", "120",
                              "sh", "-c", "while :; do :; done"],
                             os.path.join(rundir, "keepawake%d.log" % cpu)))
    time.sleep(0.2)
    return spinners


class Noise:
    """Detects CPU use by processes that are not ours and hypervisor steal; waits for quiet and retries
    disturbed runs, within fixed budgets so the whole run stays bounded."""

    def __init__(self, args, our_procs):
        self.args = args
        self.our_procs = our_procs
        self.wait_budget = args.quiet_budget
        self.retry_budget = args.retry_budget
        self.waited = 0.0
        self.retries = 0
        self.disturbed_kept = 0

    def ours_cpu(self):
        return sum(tree_cpu_seconds(p.tree()) for p in self.our_procs if p.alive())

    def sample(self, seconds):
        c0, o0, t0 = cpu_times(), self.ours_cpu(), time.monotonic()
        time.sleep(seconds)
        c1, o1, t1 = cpu_times(), self.ours_cpu(), time.monotonic()
        d = cpu_delta(c0, c1)
        return foreign_pct(d, o1 - o0, t1 - t0), max(steal_pct(d, c) for c in d)

    def wait_quiet(self):
        t_start = time.monotonic()
        limit = min(self.args.quiet_wait, self.wait_budget)
        while True:
            fpct, spct = self.sample(0.3)
            if fpct <= self.args.max_foreign / 2 and spct <= self.args.max_steal:
                break
            if time.monotonic() - t_start >= limit:
                break
        waited = time.monotonic() - t_start
        if waited > 0.4:
            self.wait_budget -= waited - 0.3
            self.waited += waited - 0.3

    def disturbed(self, rec):
        steal = rec["steal0_pct"] if rec.get("proxy_cpu_pct") is None \
            else max(rec["steal0_pct"], rec["steal1_pct"])
        return rec["foreign_pct"] > self.args.max_foreign or steal > self.args.max_steal


def measure_once(peer, sc_name, args, ctx, tag, noise):
    sc = SCENARIOS[sc_name]
    pids = peer["proc"].tree() if peer.get("proc") else []
    noise.wait_quiet()
    spinners = start_keepawake(ctx["rundir"]) if (sc["paced"] and args.keepawake) else []
    try:
        spin_pids = [sp.tree() for sp in spinners]
        spin0 = sum(tree_cpu_seconds(t) for t in spin_pids)
        reset_hwm(pids)
        ours0 = noise.ours_cpu()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0 = cpu_times()
        cpu0 = tree_cpu_seconds(pids)
        t0 = time.monotonic()
        res, argv = run_wrk(peer["port"], sc, sc["path"] or peer["path"], args.duration, args.rate,
                            ctx["rawdir"], tag)
        wall = time.monotonic() - t0
        cpu1 = tree_cpu_seconds(pids)
        c1 = cpu_times()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk has been reaped
        ours1 = noise.ours_cpu()
        spin1 = sum(tree_cpu_seconds(t) for t in spin_pids)
    finally:
        for sp in spinners:
            sp.stop()
    d = cpu_delta(c0, c1)
    wrk_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    ours_s = (ours1 - ours0) + wrk_s + (spin1 - spin0)
    dur = res["duration_us"] / 1e6
    rec = dict(
        peer=peer["name"], scenario=sc_name, tag=tag,
        rps=res["requests"] / dur, bytes_s=res["bytes"] / dur, requests=res["requests"],
        p50_us=res["p50_us"], p90_us=res["p90_us"], p99_us=res["p99_us"],
        p999_us=res["p999_us"], max_us=res["max_us"], mean_us=res["mean_us"],
        errors=sum(res[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")),
        err_detail={k: res[k] for k in res if k.startswith("err_")},
        steal0_pct=steal_pct(d, 0), steal1_pct=steal_pct(d, 1),
        foreign_pct=foreign_pct(d, ours_s, wall), wall=wall,
    )
    if pids:
        rec["proxy_cpu_pct"] = 100.0 * (cpu1 - cpu0) / dur
        rec["proxy_cpu_us_per_req"] = 1e6 * (cpu1 - cpu0) / max(1, res["requests"])
        rec["peak_rss_kb"] = tree_status_kb(pids, "VmHWM")
    return rec, argv


def measure(peer, sc_name, args, ctx, tag, noise):
    attempts = []
    for attempt in range(1 + args.retries):
        rec, argv = measure_once(peer, sc_name, args, ctx,
                                 tag if attempt == 0 else "%s-retry%d" % (tag, attempt), noise)
        attempts.append(rec)
        if not noise.disturbed(rec):
            break
        if attempt < args.retries and noise.retry_budget > 0:
            noise.retry_budget -= 1
            noise.retries += 1
            log("%s disturbed (foreign %.0f%% of a CPU, steal %.0f/%.0f%%): retrying" % (
                tag, rec["foreign_pct"], rec["steal0_pct"], rec["steal1_pct"]))
            continue
        break
    best = min(attempts, key=lambda r: r["foreign_pct"] + 2 * max(r["steal0_pct"], r["steal1_pct"]))
    best["attempts"] = len(attempts)
    best["disturbed"] = noise.disturbed(best)
    if best["disturbed"]:
        noise.disturbed_kept += 1
    return best, argv


# --------------------------------------------------------------- checks
def slow_client_check(peer, n, hold, path="/32m"):
    """n clients request a 32 MiB body and stop reading (4 KiB receive buffer).  A proxy with flow control
    stays flat; one that drains the upstream into memory grows by about n x 32 MiB.  -> (growth_kb, after_kb)"""
    before = tree_status_kb(peer["proc"].tree(), "VmRSS")
    socks = []
    try:
        for _ in range(n):
            sk = socket.socket()
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sk.settimeout(5)
            sk.connect((HOST, peer["port"]))
            sk.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path, HOST, peer["port"])).encode())
            socks.append(sk)
        peak = before
        t_end = time.monotonic() + hold
        while time.monotonic() < t_end:
            peak = max(peak, tree_status_kb(peer["proc"].tree(), "VmRSS"))
            time.sleep(0.1)
    finally:
        for sk in socks:
            sk.close()
    time.sleep(0.5)
    return peak - before, tree_status_kb(peer["proc"].tree(), "VmRSS")


def idle_check(peer, n, expect):
    """Open n client connections, make one 1 KiB request on each, keep them all open and idle; the proxy's
    RSS growth divided by n is the memory one idle keep-alive connection holds."""
    pids = peer["proc"].tree()
    req = ("GET /1k HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (HOST, peer["port"])).encode()
    batch = 50

    def open_batch(k):
        socks = []
        for _ in range(k):
            sk = socket.socket()
            sk.settimeout(10)
            sk.connect((HOST, peer["port"]))
            sk.sendall(req)
            socks.append(sk)
        for sk in socks:
            sk.settimeout(10)
            status, _, body = http_roundtrip(sk, b"")
            if status != 200 or body != expect:
                raise OSError("idle check: bad response %s (%d bytes)" % (status, len(body)))
        return socks

    # warm-up: the same work once on 200 connections that are then closed (pool, caches, allocator arenas)
    for _ in range(4):
        for sk in open_batch(batch):
            sk.close()
    time.sleep(0.5)
    before = tree_status_kb(pids, "VmRSS")
    held = []
    t0 = time.monotonic()
    deadline = t0 + 120
    try:
        while len(held) < n and time.monotonic() < deadline:
            held += open_batch(min(batch, n - len(held)))
        opened = time.monotonic() - t0
        time.sleep(1.0)
        after = tree_status_kb(pids, "VmRSS")
        alive = 0
        for sk in held:
            sk.setblocking(False)
            try:
                alive += 0 if sk.recv(1, socket.MSG_PEEK) == b"" else 1  # data: unexpected but open
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
    finally:
        for sk in held:
            sk.close()
    return dict(n=len(held), alive=alive, before_kb=before, after_kb=after,
                per_conn_kib=(after - before) / max(1, len(held)), open_seconds=opened)


def gib_check(peer, size, sink_ok):
    """1 GiB download (/1g from nginx) and upload (POST to the sink) through the proxy: peak RSS growth."""
    out = {}
    pids = peer["proc"].tree()

    def watch(worker):
        time.sleep(0.3)
        before = tree_status_kb(pids, "VmRSS")
        reset_hwm(pids)
        peak = before
        t0 = time.monotonic()
        th = threading.Thread(target=worker, daemon=True)
        th.start()
        while th.is_alive() and time.monotonic() - t0 < 120:
            peak = max(peak, tree_status_kb(pids, "VmRSS"))
            th.join(0.05)
        peak = max(peak, tree_status_kb(pids, "VmHWM"))
        return before, peak, time.monotonic() - t0

    res = {}

    def download():
        try:
            sk = socket.create_connection((HOST, peer["port"]), timeout=30)
            sk.sendall(("GET /1g HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (HOST, peer["port"])).encode())
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            got = 0
            head = b""
            while b"\r\n\r\n" not in head:
                k = sk.recv_into(view)
                if not k:
                    raise OSError("closed before headers")
                head += bytes(view[:k])
            hdr, rest = head.split(b"\r\n\r\n", 1)
            got = len(rest)
            while got < size:
                k = sk.recv_into(view)
                if not k:
                    break
                got += k
            sk.close()
            res["down"] = (int(hdr.split(b" ", 2)[1]), got)
        except OSError as e:
            res["down"] = (None, repr(e))

    def upload():
        try:
            sk = socket.create_connection((HOST, peer["port"]), timeout=30)
            sk.sendall(("POST /sink/up HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/octet-stream\r\n"
                        "Content-Length: %d\r\n\r\n" % (HOST, peer["port"], size)).encode())
            chunk = memoryview(os.urandom(1 << 20))
            sent = 0
            while sent < size:
                n = min(len(chunk), size - sent)
                sk.sendall(chunk[:n])
                sent += n
            status, _, body = http_roundtrip(sk, b"")
            sk.close()
            res["up"] = (status, body.decode("ascii", "replace").strip())
        except OSError as e:
            res["up"] = (None, repr(e))

    b, p, secs = watch(download)
    status, got = res.get("down", (None, "timed out"))
    out["download"] = dict(before_kb=b, peak_kb=p, growth_mib=(p - b) / 1024.0, seconds=secs,
                           ok=status == 200 and got == size, detail="status %s, %s bytes" % (status, got))
    if sink_ok:
        b, p, secs = watch(upload)
        status, body = res.get("up", (None, "timed out"))
        out["upload"] = dict(before_kb=b, peak_kb=p, growth_mib=(p - b) / 1024.0, seconds=secs,
                             ok=status == 200 and body == "received %d" % size,
                             detail="status %s, sink said %r" % (status, body))
    return out


WORKER_COUNTS = (1, 2)
WORKER_SCENARIOS = ("small", "close")


def worker_peers(ctx, procs, first_port):
    """Start ksproxy with --workers 1 and with --workers 2, each free to run on both CPUs (wrk and the
    upstream stay on CPU 0, as everywhere); -> [peer] for measure(), the ones that did not start left out."""
    d = os.path.join(ctx["rundir"], "manifests-workers")
    write_manifest(d, [reverse_proxy_doc("all", "/*", "http://%s:%d" % (HOST, ctx["up_port"]))])
    peers = []
    for i, n in enumerate(WORKER_COUNTS):
        port, admin = first_port + 2 * i, first_port + 2 * i + 1
        spec = ksproxy_spec(ctx, port, d, admin)
        argv = spec["argv"] + ["--workers", str(n)]
        name = "ks-%dworker%s" % (n, "" if n == 1 else "s")
        pr = Proc(name, ["taskset", "-c", "0,1"] + argv, os.path.join(ctx["rundir"], "peer-%s.log" % name),
                  env=spec["env"], cwd=spec["cwd"])
        procs.append(pr)
        peers.append(dict(name=name, port=port, admin_port=admin, proc=pr, group="workers", path="/1k",
                          workers=n, desc=" ".join(shlex.quote(a) for a in ["taskset", "-c", "0,1"] + argv)))
    ready = []
    for peer in peers:
        err = wait_ready(peer["proc"], peer["port"], "/1k", None, timeout=60)
        if err:
            log("peer %s excluded: %s" % (peer["name"], err))
            peer["proc"].stop()
            procs.remove(peer["proc"])
        else:
            ready.append(peer)
    return ready


def requests_per_worker(admin_port):
    """{worker index: requests} from the merged /metrics of a --workers instance (ksproxy_requests_total,
    summed over its other labels)."""
    _, body, _ = http_get(admin_port, "/metrics", timeout=10)
    per = {}
    for line in body.decode().splitlines():
        m = re.match(r'ksproxy_requests_total\{(.*)\} ([0-9.e+]+)$', line)
        w = m and re.search(r'worker="(\d+)"', m.group(1))
        if w:
            per[int(w.group(1))] = per.get(int(w.group(1)), 0) + float(m.group(2))
    return per


def workers_check(args, ctx, procs, noise, first_port, records):
    """--workers scaling: the small and close scenarios on 1 and on 2 workers, there and back (1, 2, 2, 1)
    in every repetition; the records join the others (group "workers").  -> {name: requests per worker}"""
    peers = worker_peers(ctx, procs, first_port)
    if len(peers) < 2:
        return {}
    if args.warmup:
        for s in WORKER_SCENARIOS:
            for peer in peers:
                run_wrk(peer["port"], SCENARIOS[s], peer["path"], args.warmup, args.rate, None, "warmup")
    base = {p["name"]: requests_per_worker(p["admin_port"]) for p in peers if p["workers"] > 1}
    for rep in range(args.reps):
        for s in WORKER_SCENARIOS:
            order = peers if rep % 2 == 0 else peers[::-1]
            for pass_, peer in enumerate(order + order[::-1]):
                tag = "workers-%s-%s-r%d%s" % (s, peer["name"], rep + 1, "b" if pass_ >= len(order) else "")
                rec, _ = measure(peer, s, args, ctx, tag, noise)
                records.append(rec)
                log("%-34s %8.0f req/s  CPU %.2f cores  err %d%s" % (
                    tag, rec["rps"], rec["proxy_cpu_pct"] / 100.0, rec["errors"],
                    " DISTURBED" if rec["disturbed"] else ""))
    spread_ = {}
    for peer in peers:
        if peer["workers"] > 1:
            now = requests_per_worker(peer["admin_port"])
            spread_[peer["name"]] = {w: now.get(w, 0) - base[peer["name"]].get(w, 0) for w in now}
    return dict(peers=[{k: v for k, v in p.items() if k != "proc"} for p in peers], per_worker=spread_)


def render_workers(agg, result):
    """The scaling table: each --workers instance against the 1-worker one, with the CPU it used."""
    peers = result["peers"]
    one = peers[0]["name"]
    L = ["| ksproxy | 1 KiB k-a req/s | × 1 worker | CPU used (cores) | µs/req | conn-close req/s | × 1 worker "
         "| CPU used (cores) |", "|" + "---|" * 8]
    for p in peers:
        n = p["name"]
        row = ["%d worker%s" % (p["workers"], "" if p["workers"] == 1 else "s")]
        for s in WORKER_SCENARIOS:
            rps = metric(agg, n, s, "rps")
            cpu = metric(agg, n, s, "proxy_cpu_pct")
            row += [fmt_int(rps), fmt_ratio(div(rps, metric(agg, one, s, "rps"))),
                    "-" if cpu is None else "%.2f" % (cpu / 100.0)]
            if s == "small":
                us = metric(agg, n, s, "proxy_cpu_us_per_req")
                row.append("-" if us is None else "%.0f" % us)
        L.append("| " + " | ".join(row) + " |")
    for name, per in result["per_worker"].items():
        total = sum(per.values()) or 1
        L += ["", "Requests each worker of %s served during these runs (its /metrics): %s." % (
            name, ", ".join("worker %d %.0f %%" % (w, 100.0 * per[w] / total) for w in sorted(per)))]
    return "\n".join(L)


def swap_check(peer, args, ctx, gen=2, fmt="yaml"):
    """Rewrite the N-rule manifest (every rule gets a new header value, generation C{gen}; YAML documents, or
    the same objects as one JSON List) while a paced load runs; time from the rename to the first response
    carrying the new value, the generation /debug/routes reports, and the latency of requests in flight
    meanwhile (compared with the same paced run without a swap)."""
    sc = SCENARIOS["paced"]
    path = peer["path"]
    duration = max(args.swap_duration, 4)
    base, _ = run_wrk(peer["port"], sc, path, duration, args.rate, ctx["rawdir"], "swap-baseline")
    argv = wrk_argv(peer["port"], sc, path, duration)
    wrk = start_wrk(argv, args.rate)
    probe_lat = []
    live = None
    errors = 0
    try:
        time.sleep(1.0)
        up = "http://%s:%d" % (HOST, ctx["up_port"])
        if fmt == "json":
            text, docs = rules_json(peer["rules"], ctx["probe"], up, gen), None
        else:
            text, docs = None, rules_docs(peer["rules"], ctx["probe"], up, gen)
        t_write = time.monotonic()
        write_manifest(peer["manifest_dir"], docs, text=text)
        conn = http.client.HTTPConnection(HOST, peer["port"], timeout=30)
        deadline = t_write + args.swap_timeout
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                gen_seen = r.getheader("X-Bench-Gen")
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(HOST, peer["port"], timeout=30)
                gen_seen = None
            t1 = time.monotonic()
            probe_lat.append(t1 - t0)
            if gen_seen == str(gen):
                live = t1 - t_write
                break
            time.sleep(0.005)
        conn.close()
    finally:
        res = finish_wrk(wrk, argv, duration, ctx["rawdir"], "swap-during")
    out = dict(live_s=live, probe_max_ms=1000 * max(probe_lat or [0]), probe_errors=errors,
               during=res, baseline=base, generation=None, built_s=None)
    try:
        status, body, _ = http_get(peer["admin_port"], "/debug/routes", timeout=60)
        data = json.loads(body)
        out["generation"] = data.get("generation")
        out["built_s"] = data.get("builtSeconds")
    except Exception as e:  # noqa: BLE001
        out["routes_error"] = repr(e)
    return out


# ---------------------------------------------------------------- profile
def profile_ksproxy(ctx, peer, seconds, scenario="small"):
    """py-spy (sampling) on ksproxy during one load scenario (default: 1 KiB keep-alive); prints the top frames."""
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(ctx["python"]), "py-spy")
    if not os.path.exists(pyspy):
        sys.exit("--profile needs py-spy: %s -m pip install py-spy" % ctx["python"])
    raw = os.path.join(ctx["rundir"], "profile.folded")
    svg = os.path.join(ctx["rundir"], "profile.svg")
    sc = SCENARIOS[scenario]
    out = {}
    for fmt, dest in (("raw", raw), ("flamegraph", svg)):
        spy = Proc("py-spy", ["taskset", "-c", "0", pyspy, "record", "-r", "250",
                              "-d", str(seconds), "-p", str(peer["proc"].pid), "-f", fmt, "-o", dest],
                   os.path.join(ctx["rundir"], "py-spy-%s.log" % fmt))
        try:
            time.sleep(1.0)
            pids = peer["proc"].tree()
            cpu0 = tree_cpu_seconds(pids)
            res, _ = run_wrk(peer["port"], sc, sc["path"], seconds - 2, 0, ctx["rawdir"], "profile-" + fmt)
            cpu1 = tree_cpu_seconds(pids)
            spy.popen.wait(seconds + 30)
        finally:
            spy.stop()
        out[fmt] = dict(rps=res["requests"] / (res["duration_us"] / 1e6),
                        us_per_req=1e6 * (cpu1 - cpu0) / max(1, res["requests"]))
    if not os.path.exists(raw):
        sys.exit("py-spy wrote nothing; see %s" % os.path.join(ctx["rundir"], "py-spy-raw.log"))
    self_line, self_func, incl = {}, {}, {}
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if re.search(r"\((threading|selectors|queue)\.py:\d+\)$", frames[-1]):
                continue  # a thread waiting (the file watcher between scans): py-spy counts it as active
            total += n
            leaf = frames[-1]
            self_line[leaf] = self_line.get(leaf, 0) + n
            fn = re.sub(r":\d+\)$", ")", leaf)
            self_func[fn] = self_func.get(fn, 0) + n
            for fr in set(re.sub(r":\d+\)$", ")", x) for x in frames):
                incl[fr] = incl.get(fr, 0) + n
    us = out["raw"]["us_per_req"]

    def top(d, k):
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return ["  %5.1f%%  ~%5.1f us/req  %s" % (100.0 * v / total, us * v / total, shorten(name))
                for name, v in rows]

    lines = ["ksproxy under the %s load (%s) while profiled: %.0f req/s, %.1f us CPU per request "
             "(py-spy -r 250, which pauses the process per sample; %d samples; us/req = share x measured CPU per "
             "request)"
             % (scenario, sc["title"], out["raw"]["rps"], us, total), "", "Top self time by line:"] + top(self_line, 30)
    lines += ["", "Top self time by function:"] + top(self_func, 25)
    lines += ["", "Top inclusive time by function:"] + top(incl, 40)
    lines += ["", "folded stacks: %s   flame graph: %s" % (raw, svg)]
    return "\n".join(lines)


def cprofile_ksproxy(ctx, port, seconds, scenario="small"):
    """ksproxy under cProfile for the same load: exact calls per request (the costs include cProfile's own)."""
    import pstats

    out = os.path.join(ctx["rundir"], "ksproxy.cprofile")
    spec = peer_ksproxy(ctx, port)
    argv = [spec["argv"][0], os.path.join(HERE, "profiled.py"), out] + spec["argv"][1:]
    pr = Proc("ksproxy-cprofile", ["taskset", "-c", "1"] + argv, os.path.join(ctx["rundir"], "peer-cprofile.log"),
              env=spec["env"], cwd=spec["cwd"])
    try:
        err = wait_ready(pr, port, "/1k", None, timeout=30)
        if err:
            return "cProfile run failed: %s" % err
        sc = SCENARIOS[scenario]
        res, _ = run_wrk(port, sc, sc["path"], seconds, 0, ctx["rawdir"], "cprofile")
        os.kill(pr.pid, signal.SIGUSR1)  # write the statistics (see profiled.py)
        deadline = time.time() + 30
        while time.time() < deadline and not os.path.exists(out):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        pr.stop(grace=30)
    if not os.path.exists(out):
        return "cProfile wrote nothing (see %s)" % pr.log_path
    n = res["requests"] + 1
    st = pstats.Stats(out)
    rows = []
    for (path, line, func), (_cc, nc, tt, ct, _) in st.stats.items():
        rows.append((tt, ct, nc, "%s (%s:%d)" % (func, path, line)))
    lines = ["", "cProfile, same load, %d requests in %d s (times inflated by cProfile; calls are exact):" % (
        res["requests"], seconds), "", "Top by own time:   calls/req  own us/req  cum us/req"]
    for tt, ct, nc, name in sorted(rows, key=lambda r: -r[0])[:30]:
        lines.append("  %8.2f  %9.1f  %9.1f  %s" % (nc / n, 1e6 * tt / n, 1e6 * ct / n, shorten_path(name)))
    lines += ["", "Most called (per request):"]
    for tt, ct, nc, name in sorted(rows, key=lambda r: -r[2])[:30]:
        lines.append("  %8.2f  %9.1f  %9.1f  %s" % (nc / n, 1e6 * tt / n, 1e6 * ct / n, shorten_path(name)))
    return "\n".join(lines)


def shorten_path(name):
    for prefix in (ROOT + "/", os.path.dirname(os.__file__) + "/"):
        name = name.replace(prefix, "")
    return re.sub(r"/\S*/site-packages/", "", name)


def shorten(frame):
    m = re.match(r"^(.*) \((.*?)(:\d+)?\)$", frame)
    if not m:
        return frame
    func, path, line = m.group(1), m.group(2), m.group(3) or ""
    for prefix in (ROOT + "/", os.path.dirname(os.__file__) + "/"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    path = re.sub(r"^.*/site-packages/", "", path)
    return "%s (%s%s)" % (func, path, line)


# ------------------------------------------------------------- reporting
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt_int(v):
    return "-" if v is None else "{:,.0f}".format(v)


def fmt_lat(us):
    if us is None:
        return "-"
    return "%.0f µs" % us if us < 1000 else "%.2f ms" % (us / 1000.0)


def fmt_ratio(v):
    return "-" if v is None else "%.2f" % v


def spread(vals):
    if len(vals) < 2:
        return "-"
    m = statistics.median(vals)
    return "±%.0f%%" % (100.0 * (max(vals) - min(vals)) / 2 / m) if m else "-"


def summarize(records):
    agg = {}
    for r in records:
        agg.setdefault((r["peer"], r["scenario"]), []).append(r)
    out = {}
    for key, rs_all in agg.items():
        clean = [r for r in rs_all if not r.get("disturbed")]
        rs = clean if len(clean) >= min(2, len(rs_all)) else rs_all
        a = dict(n=len(rs_all), disturbed=sum(1 for r in rs_all if r.get("disturbed")),
                 disturbed_used=sum(1 for r in rs if r.get("disturbed")))
        for k in ("rps", "bytes_s", "p50_us", "p99_us", "p999_us", "max_us", "proxy_cpu_pct",
                  "proxy_cpu_us_per_req", "steal0_pct", "steal1_pct", "foreign_pct"):
            a[k] = med([r.get(k) for r in rs])
        a["rps_all"] = [r["rps"] for r in rs]
        a["peak_rss_kb"] = max([r.get("peak_rss_kb") or 0 for r in rs_all]) or None
        a["errors"] = sum(r["errors"] for r in rs_all)
        a["requests"] = sum(r["requests"] for r in rs_all)
        out[key] = a
    return out


def metric(agg, peer, scenario, key):
    a = agg.get((peer, scenario))
    return None if a is None else a.get(key)


def div(a, b):
    return None if a is None or not b else a / b


def render_main(agg, names, args, slow):
    L = []
    head = ["peer", "1 KiB k-a req/s", "× direct", "proxy CPU µs/req", "1 MiB MiB/s", "× direct",
            "conn-close req/s", "× direct", "p50 @%d req/s" % args.rate, "p99 @%d req/s" % args.rate,
            "peak RSS MiB", "RSS growth, %d stalled 32 MiB downloads" % args.slow_clients]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for p in names:
        small, big, close = (metric(agg, p, s, k) for s, k in
                             (("small", "rps"), ("big", "bytes_s"), ("close", "rps")))
        rss = [agg[(p, s)]["peak_rss_kb"] for s in ("small", "big", "paced", "close")
               if (p, s) in agg and agg[(p, s)].get("peak_rss_kb")]
        cpu = metric(agg, p, "small", "proxy_cpu_us_per_req")
        g = slow.get(p)
        L.append("| " + " | ".join([
            p, fmt_int(small), fmt_ratio(div(small, metric(agg, "direct", "small", "rps"))),
            "-" if cpu is None else "%.0f" % cpu,
            fmt_int(big and big / MIB), fmt_ratio(div(big, metric(agg, "direct", "big", "bytes_s"))),
            fmt_int(close), fmt_ratio(div(close, metric(agg, "direct", "close", "rps"))),
            fmt_lat(metric(agg, p, "paced", "p50_us")), fmt_lat(metric(agg, p, "paced", "p99_us")),
            "%.1f" % (max(rss) / 1024.0) if rss else "-",
            "-" if g is None else "%+.1f MiB" % (g / 1024.0)]) + " |")
    return "\n".join(L)


def render_vs_peers(agg, names, subject="ksproxy"):
    others = [p for p in names if p != subject]
    rows = [("1 KiB k-a req/s (>1: ksproxy faster)", "small", "rps", False),
            ("proxy CPU µs/req (<1: ksproxy cheaper)", "small", "proxy_cpu_us_per_req", False),
            ("1 MiB MiB/s (>1: ksproxy faster)", "big", "bytes_s", False),
            ("conn-close req/s (>1: ksproxy faster)", "close", "rps", False),
            ("p50 @ fixed rate (<1: ksproxy quicker)", "paced", "p50_us", False),
            ("p99 @ fixed rate (<1: ksproxy quicker)", "paced", "p99_us", False)]
    L = ["| ksproxy ÷ peer | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
    for label, s, k, _ in rows:
        mine = metric(agg, subject, s, k)
        L.append("| %s | %s |" % (label, " | ".join(fmt_ratio(div(mine, metric(agg, p, s, k)))
                                                      for p in others)))
    return "\n".join(L)


def render_details(agg, names, scenarios, peers_of):
    L = []
    for s in scenarios:
        sc = SCENARIOS[s]
        L.append("#### %s: %s" % (s, sc["title"]))
        L.append("")
        L.append("| peer | req/s | spread | MiB/s | p50 | p99 | p99.9 | max | proxy CPU % | proxy µs/req | "
                 "peak RSS MiB | errors/requests | noise |")
        L.append("|" + "---|" * 13)
        for p in peers_of(s):
            a = agg.get((p, s))
            if not a:
                continue
            L.append("| " + " | ".join([
                p, fmt_int(a["rps"]), spread(a["rps_all"]), "%.1f" % (a["bytes_s"] / MIB),
                fmt_lat(a["p50_us"]), fmt_lat(a["p99_us"]), fmt_lat(a["p999_us"]), fmt_lat(a["max_us"]),
                "-" if a.get("proxy_cpu_pct") is None else "%.0f" % a["proxy_cpu_pct"],
                "-" if a.get("proxy_cpu_us_per_req") is None else "%.0f" % a["proxy_cpu_us_per_req"],
                "%.1f" % (a["peak_rss_kb"] / 1024.0) if a.get("peak_rss_kb") else "-",
                "%d/%d" % (a["errors"], a["requests"]),
                "steal %.0f/%.0f%%, foreign %.0f%%%s" % (
                    a["steal0_pct"], a["steal1_pct"], a["foreign_pct"],
                    "" if not a["disturbed"] else ", %d/%d runs disturbed (%s)" % (
                        a["disturbed"], a["n"],
                        "in the median" if a["disturbed_used"] else "left out of the median"))]) + " |")
        L.append("")
    return "\n".join(L)


def evaluate_targets(agg, names, extra, args):
    """[(target, measured, verdict)] with verdict MET / NOT MET / n/a."""
    T = []
    have = set(names)

    def verdict(ok):
        return "n/a" if ok is None else ("MET" if ok else "NOT MET")

    ks_small = metric(agg, "ksproxy", "small", "rps")
    ks_close = metric(agg, "ksproxy", "close", "rps")
    d_small = metric(agg, "direct", "small", "rps")
    d_close = metric(agg, "direct", "close", "rps")
    if "caddy" in have:
        caddy_small, caddy_close = metric(agg, "caddy", "small", "rps"), metric(agg, "caddy", "close", "rps")
        caddy_p50 = metric(agg, "caddy", "paced", "p50_us")
        est = ""
    else:
        caddy_small = d_small and d_small * REF["caddy_small"] / REF["direct_small"]
        caddy_close = d_close and d_close * REF["caddy_close"] / REF["direct_close"]
        d_p50 = metric(agg, "direct", "paced", "p50_us")
        caddy_p50 = d_p50 and d_p50 + REF["caddy_p50"] - REF["direct_p50"]
        est = " (Caddy not installed: est. from the issue's reference run)"

    def ratio_row(label, mine, theirs, need, est_note=""):
        r = div(mine, theirs)
        T.append((label + est_note, "%s vs %s = %s×" % (fmt_int(mine), fmt_int(theirs), fmt_ratio(r)),
                  verdict(None if r is None else r >= need)))

    ratio_row("1 KiB keep-alive req/s ≥ 1.0× Caddy", ks_small, caddy_small, 1.0, est)
    ratio_row("1 KiB keep-alive req/s ≥ 2.2× aiohttp", ks_small, metric(agg, "aiohttp", "small", "rps"), 2.2)
    ratio_row("1 KiB keep-alive req/s ≥ 4.4× Twisted ReverseProxyResource", ks_small,
              metric(agg, "twisted", "small", "rps"), 4.4)
    ratio_row("Connection: close req/s ≥ 1.0× Caddy", ks_close, caddy_close, 1.0, est)
    ks_big, ng_big = metric(agg, "ksproxy", "big", "bytes_s"), metric(agg, "nginx", "big", "bytes_s")
    T.append(("1 MiB MiB/s ≥ 1.0× nginx", "%s vs %s MiB/s = %s×" % (
        fmt_int(ks_big and ks_big / MIB), fmt_int(ng_big and ng_big / MIB), fmt_ratio(div(ks_big, ng_big))),
        verdict(None if div(ks_big, ng_big) is None else div(ks_big, ng_big) >= 1.0)))
    ks_p50 = metric(agg, "ksproxy", "paced", "p50_us")
    T.append(("p50 at %d req/s ≤ Caddy's%s" % (args.rate, est), "%s vs %s" % (fmt_lat(ks_p50), fmt_lat(caddy_p50)),
              verdict(None if ks_p50 is None or caddy_p50 is None else ks_p50 <= caddy_p50)))
    g = extra.get("slow", {}).get("ksproxy")
    T.append(("RSS growth with %d stalled 32 MiB downloads < 10 MiB" % args.slow_clients,
              "-" if g is None else "%+.1f MiB" % (g / 1024.0), verdict(None if g is None else g < 10 * 1024)))
    r1, rn = metric(agg, "ks-1rule", "rules", "rps"), metric(agg, "ks-%drules" % args.rules, "rules", "rps")
    c1 = metric(agg, "ks-1rule", "rules", "proxy_cpu_us_per_req")
    cn = metric(agg, "ks-%drules" % args.rules, "rules", "proxy_cpu_us_per_req")
    T.append(("%d ReverseProxy rules vs 1: throughput within 5 %%" % args.rules,
              "%s vs %s req/s = %s× (CPU per request %s vs %s µs = %s×)" % (
                  fmt_int(rn), fmt_int(r1), fmt_ratio(div(rn, r1)), fmt_int(cn), fmt_int(c1),
                  fmt_ratio(div(cn, c1))),
              verdict(None if div(rn, r1) is None else div(rn, r1) >= 0.95)))
    sw = extra.get("swap")
    if sw:
        js = extra.get("swap-json") or {}
        jlive = js.get("live_s")

        def shown(res, what):
            if not res:
                return "%s: not measured" % what
            if res.get("live_s") is None:
                return "%s: not live within %.0fs" % (what, args.swap_timeout)
            return "%s: %.2f s (table build %s s)" % (what, res["live_s"], res.get("built_s"))

        T.append(("compile + swap of a %d-resource table < 1 s (manifest written → served; verdict on the "
                  "JSON manifest, YAML parsing shown beside it)" % args.rules,
                  "%s; %s" % (shown(js, "JSON manifest"), shown(sw, "YAML manifest")),
                  verdict(jlive is not None and jlive < 1.0)))
        mx = max(sw["during"]["max_us"], sw["probe_max_ms"] * 1000,
                 (js.get("during") or {}).get("max_us", 0), js.get("probe_max_ms", 0) * 1000)
        T.append(("no latency spike over 50 ms for requests in flight during the swap",
                  "max %s over both swaps (YAML: wrk max %s, probe max %.1f ms; same run without a swap: "
                  "max %s)" % (fmt_lat(mx), fmt_lat(sw["during"]["max_us"]), sw["probe_max_ms"],
                               fmt_lat(sw["baseline"]["max_us"])),
                  verdict(mx <= 50000)))
    else:
        T.append(("compile + swap of a %d-resource table < 1 s, no spike over 50 ms" % args.rules, "-", "n/a"))
    idle = extra.get("idle")
    T.append(("%d idle keep-alive connections: < 40 KiB each" % args.idle_conns,
              "-" if not idle else "%.1f KiB per connection (%d held, %d still open, RSS %.0f → %.0f MiB)" % (
                  idle["per_conn_kib"], idle["n"], idle["alive"], idle["before_kb"] / 1024.0,
                  idle["after_kb"] / 1024.0),
              verdict(None if not idle else idle["per_conn_kib"] < 40 and idle["n"] >= args.idle_conns
                      and idle["alive"] == idle["n"])))
    gib = extra.get("gib") or {}
    for k in ("download", "upload"):
        x = gib.get(k)
        T.append(("1 GiB %s: RSS growth < 50 MiB" % k,
                  "-" if not x else "%+.1f MiB in %.1f s (%s)" % (x["growth_mib"], x["seconds"], x["detail"]),
                  verdict(None if not x else x["ok"] and x["growth_mib"] < 50)))
    return T


def tool_versions(python):
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            txt = (out.stdout + out.stderr).strip().splitlines()
            return txt[0] if txt else "?"
        except Exception:  # noqa: BLE001
            return "not available"
    v = {"wrk": first_line(["wrk", "-v"]), "nginx": first_line(["nginx", "-v"])}
    for b, a in (("haproxy", ["haproxy", "-v"]), ("caddy", ["caddy", "version"])):
        v[b] = first_line(a) if shutil.which(b) else "not installed"
    v["python"] = first_line([python, "-c", "import sys; print(sys.version.split()[0])"])
    for mod in ("twisted", "aiohttp", "httptools"):
        v[mod] = first_line([python, "-c", "import %s; print(%s.__version__)" % (mod, mod)])
    v["ksproxy"] = first_line(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    return v


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (%s), kernel %s" % (os.cpu_count(), model, platform.release())


# -------------------------------------------------------------------- main
def python_has(python, module):
    try:
        return subprocess.run([python, "-c", "import " + module], capture_output=True, timeout=60,
                              cwd=ROOT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def preflight(args):
    """Exit with install instructions if a required tool is missing; return notes about optional ones."""
    notes = []
    missing = [b for b in ("wrk", "nginx", "taskset") if not shutil.which(b)]
    if missing:
        pkgs = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"}
        sys.exit("missing required tool(s): %s\ninstall with: apt-get install -y %s%s" % (
            ", ".join(missing), " ".join(pkgs[b] for b in missing),
            "  (plus haproxy for that peer)" if not shutil.which("haproxy") else ""))
    if not shutil.which("chrt"):
        args.keepawake = False
        notes.append("chrt not found: no keep-awake loops in the paced scenario (apt-get install -y util-linux)")
    if not python_has(args.python, "ksproxy.tap"):
        sys.exit("%s cannot import ksproxy: run from a checkout with `pip install -e .` done" % args.python)
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPUs (the proxy on CPU 1, wrk and the upstream on CPU 0)")
    return notes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See bench/README.md for how to read the output.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 rep x 2 s, no warm-up, 2,000 idle connections (~2 min)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 4; quick 2)")
    ap.add_argument("--reps", type=int, help="repetitions per (peer, scenario); medians (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, help="unrecorded warm-up seconds per (peer, scenario) (default 1)")
    ap.add_argument("--rate", type=int, default=1000, help="req/s of the fixed-rate latency scenario")
    ap.add_argument("--base-port", type=int, default=18080, help="upstream port; peers use the next ones")
    ap.add_argument("--peers", default="", help="comma list restricting the peers "
                    "(direct,nginx,haproxy,caddy,twisted,aiohttp,ksproxy); ksproxy is always kept")
    ap.add_argument("--scenarios", default=",".join(SCENARIO_ORDER),
                    help="comma list of %s" % ",".join(SCENARIO_ORDER))
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma list of %s (or none)" % ",".join(CHECKS))
    ap.add_argument("--rules", type=int, default=10000, help="table size for the rules and swap checks")
    ap.add_argument("--idle-conns", type=int, help="idle keep-alive connections held (default 10000; quick 2000)")
    ap.add_argument("--slow-clients", type=int, default=10, help="stalled clients on a 32 MiB body")
    ap.add_argument("--slow-hold", type=float, help="seconds the stalled clients are held (default 3)")
    ap.add_argument("--swap-duration", type=int, help="seconds of paced load around the swap (default 8)")
    ap.add_argument("--swap-timeout", type=float, default=15.0, help="give up waiting for the new table")
    ap.add_argument("--python", default=sys.executable, help="interpreter for ksproxy and the Python peers")
    ap.add_argument("--ksproxy-args", default="", help="extra arguments for `ksproxy run` (e.g. '--workers 2')")
    ap.add_argument("--profile", type=int, metavar="SECONDS", default=0,
                    help="instead of the benchmark: py-spy profile of ksproxy under the 1 KiB keep-alive load")
    ap.add_argument("--profile-scenario", default="small", choices=["small", "big", "close", "paced"],
                    help="the load run while profiling (default small)")
    ap.add_argument("--no-keepawake", dest="keepawake", action="store_false",
                    help="no SCHED_IDLE keep-awake loops during the paced scenario")
    ap.add_argument("--max-foreign", type=float, default=15.0,
                    help="a run is 'disturbed' if other processes used more than this %% of a CPU")
    ap.add_argument("--max-steal", type=float, default=10.0, help="... or hypervisor steal above this %%")
    ap.add_argument("--retries", type=int, help="re-run a disturbed measurement up to N times (default 2)")
    ap.add_argument("--retry-budget", type=int, default=6, help="at most this many retries in the whole run")
    ap.add_argument("--quiet-wait", type=float, default=5.0, help="per run: wait up to this for a quiet machine")
    ap.add_argument("--quiet-budget", type=float, default=30.0, help="total waiting allowed for quiet")
    ap.add_argument("--out", default="", help="run directory (default $TMPDIR/ksproxy-bench-<timestamp>)")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("duration", 4, 2), ("reps", 3, 1), ("warmup", 1, 0), ("idle_conns", 10000, 2000),
                              ("slow_hold", 3.0, 1.5), ("swap_duration", 8, 6), ("retries", 2, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if q:
        args.quiet_budget = min(args.quiet_budget, 10.0)
    args.ksproxy_args = shlex.split(args.ksproxy_args)
    return args


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv=None):
    args = parse_args(argv)
    notes = preflight(args)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    checks = [c.strip() for c in args.checks.split(",") if c.strip() and c.strip() != "none"]
    for s in scenarios:
        if s not in SCENARIOS:
            sys.exit("unknown scenario %r" % s)
    for c in checks:
        if c not in CHECKS:
            sys.exit("unknown check %r" % c)

    # children inherit the limit: the proxy and this script each hold --idle-conns sockets in the idle check
    nofile = raise_nofile(args.idle_conns + 2048)
    if "idle" in checks and nofile < args.idle_conns + 512:
        notes.append("idle check reduced to %d connections: the hard open-files limit is %d (raise it with "
                     "`ulimit -Hn` as root or in limits.conf)" % (nofile - 512, nofile))
        args.idle_conns = nofile - 512

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = os.path.abspath(args.out or os.path.join(tempfile.gettempdir(), "ksproxy-bench-" + stamp))
    rawdir = os.path.join(rundir, "raw")
    os.makedirs(rawdir, exist_ok=True)
    www = os.path.join(rundir, "www")
    os.makedirs(www, exist_ok=True)
    for sub in ("upstream", "proxy-nginx"):
        os.makedirs(os.path.join(rundir, "tmp", sub), exist_ok=True)
    small_body, big_body = os.urandom(1024), os.urandom(1048576)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(small_body)
    with open(os.path.join(www, "1m"), "wb") as f:
        f.write(big_body)
    for name, size in (("32m", 32 << 20), ("1g", 1 << 30)):
        with open(os.path.join(www, name), "wb") as f:
            f.truncate(size)  # sparse: no disk used

    want = {p.strip() for p in args.peers.split(",") if p.strip()}
    up_port = args.base_port
    ctx = dict(rundir=rundir, rawdir=rawdir, up_port=up_port, sink_port=up_port + 1, admin_port=up_port + 2,
               python=args.python, ksproxy_args=args.ksproxy_args, probe=args.rules // 2)
    plan = []
    port = up_port + 3
    for name, binary, module, builder, group in PEERS:
        if want and name not in want and name != "ksproxy":
            port += 1
            continue
        if args.profile and name != "ksproxy":
            continue
        if binary and not shutil.which(binary):
            notes.append("%s skipped: `%s` not installed (%s)" % (
                name, binary, "apt-get install -y " + binary))
        elif module and not python_has(args.python, module):
            notes.append("%s skipped: %s cannot import %s (%s -m pip install %s)" % (
                name, args.python, module, args.python, module))
        else:
            plan.append((name, port, builder, group, "/1k"))
        port += 1
    if "rules" in scenarios or "swap" in checks:
        if not args.profile:
            plan.append(("ks-1rule", port, peer_ks_rules(1), "rules", "/r/%d/1k" % ctx["probe"]))
            plan.append(("ks-%drules" % args.rules, port + 1, peer_ks_rules(args.rules), "rules",
                         "/r/%d/1k" % ctx["probe"]))
    workers_port = port + 2  # after the two table-size instances: 1 and 2 workers, each with an admin port
    wanted_ports = [x[1] for x in plan] + (list(range(workers_port, workers_port + 2 * len(WORKER_COUNTS)))
                                          if "workers" in checks and not args.profile else [])
    for p in [up_port, up_port + 1, up_port + 2] + wanted_ports:
        if not port_free(p):
            sys.exit("port %d on %s is in use; move the whole range with --base-port" % (p, HOST))
    include_direct = not args.profile and (not want or "direct" in want)

    main_peers = len(plan) - (2 if any(x[3] == "rules" for x in plan) else 0) + include_direct
    n_main = len([s for s in scenarios if SCENARIOS[s]["group"] == "main"])
    n_rules = 1 if "rules" in scenarios else 0
    est = ((main_peers * n_main + 2 * n_rules * 2) * (args.reps * (args.duration + 0.7)
                                                    + (args.warmup + 0.2 if args.warmup else 0))
           + ("slow" in checks) * main_peers * (args.slow_hold + 0.8)
           + ("swap" in checks) * 2 * (2 * args.swap_duration + 3)
           + ("idle" in checks) * (3 + args.idle_conns / 1500.0)
           + ("gib" in checks) * 8
           + ("workers" in checks) * len(WORKER_SCENARIOS) * len(WORKER_COUNTS) * (
               2 * args.reps * (args.duration + 0.7) + args.warmup + 0.2) + 15)
    if args.profile:
        est = 2 * args.profile + 15
    log("run dir %s; estimated %.1f min" % (rundir, est / 60))

    procs = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    peers, records, extra = [], [], {}
    argv_example = {}
    t_start = time.time()
    noise = Noise(args, procs)
    try:
        up = Proc("upstream", ["taskset", "-c", "0", "nginx", "-e",
                               os.path.join(rundir, "upstream-nginx.error.log"), "-c",
                               write_upstream_conf(rundir, up_port)], os.path.join(rundir, "upstream.log"))
        procs.append(up)
        err = wait_ready(up, up_port, "/1k", small_body)
        if err:
            sys.exit("upstream nginx failed: %s" % err)
        sink = Proc("sink", ["taskset", "-c", "0", sys.executable, os.path.join(HERE, "sink.py"),
                             str(ctx["sink_port"])], os.path.join(rundir, "sink.log"))
        procs.append(sink)
        sink_err = wait_port(sink, ctx["sink_port"])
        if sink_err:
            notes.append("upload sink failed (%s): no 1 GiB upload check" % sink_err)
        if include_direct:
            peers.append(dict(name="direct", port=up_port, proc=None, group="main", path="/1k",
                              desc="wrk -> upstream nginx, no proxy"))
        for name, p, builder, group, path in plan:
            spec = builder(ctx, p)
            pr = Proc(name, ["taskset", "-c", "1"] + spec["argv"], os.path.join(rundir, "peer-%s.log" % name),
                      env=spec.get("env"), cwd=spec.get("cwd"))
            procs.append(pr)
            peer = dict(name=name, port=p, proc=pr, group=group, path=path, desc=spec["desc"])
            peer.update({k: spec[k] for k in ("manifest_dir", "admin_port", "rules") if k in spec})
            peers.append(peer)
        for peer in list(peers):
            if peer["proc"] is None:
                continue
            err = wait_ready(peer["proc"], peer["port"], peer["path"], small_body, timeout=60)
            if not err and peer["group"] == "main":
                try:
                    st, body, _ = http_get(peer["port"], "/1m", timeout=10)
                    if st != 200 or body != big_body:
                        err = "1 MiB body mismatch (status %s, %d bytes)" % (st, len(body))
                except Exception as e:  # noqa: BLE001
                    err = "1 MiB fetch failed: %r" % e
            if err:
                log("peer %s excluded: %s" % (peer["name"], err))
                notes.append("%s excluded: %s" % (peer["name"], err))
                peer["proc"].stop()
                procs.remove(peer["proc"])
                peers.remove(peer)
            else:
                peer["idle_rss_kb"] = tree_status_kb(peer["proc"].tree(), "VmRSS")
                log("peer %-12s ready on :%d pid %d" % (peer["name"], peer["port"], peer["proc"].pid))

        by_name = {p["name"]: p for p in peers}
        if args.profile:
            if "ksproxy" not in by_name:
                sys.exit("ksproxy did not start; see %s" % os.path.join(rundir, "peer-ksproxy.log"))
            text = profile_ksproxy(ctx, by_name["ksproxy"], args.profile, args.profile_scenario)
            by_name["ksproxy"]["proc"].stop()
            text += "\n" + cprofile_ksproxy(ctx, by_name["ksproxy"]["port"] + 1, args.profile,
                                            args.profile_scenario)
            with open(os.path.join(rundir, "profile.txt"), "w") as f:
                f.write(text + "\n")
            print(text)
            return

        def peers_of(s):
            return [p for p in peers if p["group"] == SCENARIOS[s]["group"]]

        if args.warmup:
            log("warm-up: %ds per peer and scenario (not recorded)" % args.warmup)
            for s in scenarios:
                for peer in peers_of(s):
                    run_wrk(peer["port"], SCENARIOS[s], SCENARIOS[s]["path"] or peer["path"], args.warmup,
                            args.rate, None, "warmup")
        for rep in range(args.reps):
            for s in scenarios:
                group = peers_of(s)
                if not group:
                    continue
                k = rep % len(group)
                order = group[k:] + group[:k]
                # Reversed on odd repetitions, so neighbours change too; not for two peers, where reversing
                # the rotation undid it (the "rules" pair always ran 1 rule first, 10,000 rules second).
                if rep % 2 == 1 and len(group) > 2:
                    order = order[::-1]
                # A pair, compared with each other to 5 %, runs there and back (ABBA): drift over the seconds
                # of one repetition then counts for both alike, and each gets twice the samples.
                passes = [order, order[::-1]] if len(group) == 2 else [order]
                for pass_, peer in [(i, p) for i, o in enumerate(passes) for p in o]:
                    if peer["proc"] is not None and not peer["proc"].alive():
                        log("peer %s died; skipping" % peer["name"])
                        continue
                    tag = "%s-%s-r%d%s" % (s, peer["name"], rep + 1, "b" if pass_ else "")
                    rec, argv = measure(peer, s, args, ctx, tag, noise)
                    argv_example[s] = argv
                    records.append(rec)
                    log("%-24s %8.0f req/s %7.1f MiB/s p50 %-9s p99 %-9s max %-9s CPU %s err %d%s" % (
                        tag, rec["rps"], rec["bytes_s"] / MIB, fmt_lat(rec["p50_us"]), fmt_lat(rec["p99_us"]),
                        fmt_lat(rec["max_us"]),
                        "-" if rec.get("proxy_cpu_us_per_req") is None
                        else "%.0f µs/req" % rec["proxy_cpu_us_per_req"],
                        rec["errors"], " DISTURBED" if rec["disturbed"] else ""))
        for peer in peers:
            if peer["proc"] is not None:
                peer["final_rss_kb"] = tree_status_kb(peer["proc"].tree(), "VmRSS")

        if "slow" in checks:
            log("stalled clients: %d clients stop reading a 32 MiB body, held %.1fs per proxy" % (
                args.slow_clients, args.slow_hold))
            extra["slow"] = {}
            for peer in peers:
                if peer["proc"] is None or peer["group"] != "main" or not peer["proc"].alive():
                    continue
                try:
                    grow, after = slow_client_check(peer, args.slow_clients, args.slow_hold)
                    extra["slow"][peer["name"]] = grow
                    peer["slow_after_kb"] = after
                    log("  %-8s RSS %+.1f MiB while stalled (%.1f MiB afterwards)" % (
                        peer["name"], grow / 1024.0, after / 1024.0))
                except OSError as e:
                    notes.append("stalled-client check failed for %s: %r" % (peer["name"], e))
        big_name = "ks-%drules" % args.rules
        if "swap" in checks and big_name in by_name:
            log("swap: rewriting the %d-rule manifest under %d req/s" % (args.rules, args.rate))
            for key, gen, fmt in (("swap", 2, "yaml"), ("swap-json", 3, "json")):
                extra[key] = sw = swap_check(by_name[big_name], args, ctx, gen, fmt)
                log("  %s: live after %s s; /debug/routes generation %s, built in %s s; max latency %s "
                    "(baseline %s)" % (fmt, "-" if sw["live_s"] is None else "%.2f" % sw["live_s"],
                                       sw["generation"], sw["built_s"], fmt_lat(sw["during"]["max_us"]),
                                       fmt_lat(sw["baseline"]["max_us"])))
        if "idle" in checks and "ksproxy" in by_name:
            log("idle: %d keep-alive connections to ksproxy" % args.idle_conns)
            try:
                extra["idle"] = idle_check(by_name["ksproxy"], args.idle_conns, small_body)
                log("  %.1f KiB per connection" % extra["idle"]["per_conn_kib"])
            except OSError as e:
                notes.append("idle check failed: %r" % e)
        if "gib" in checks and "ksproxy" in by_name:
            log("1 GiB download and upload through ksproxy")
            extra["gib"] = gib_check(by_name["ksproxy"], 1 << 30, sink_err is None)
            for k, x in extra["gib"].items():
                log("  %s: %+.1f MiB, %.1f s, %s" % (k, x["growth_mib"], x["seconds"], x["detail"]))
        if "workers" in checks:
            log("--workers scaling: ksproxy with 1 and with 2 workers on both CPUs")
            extra["workers"] = workers_check(args, ctx, procs, noise, workers_port, records)
            if not extra["workers"]:
                notes.append("--workers scaling not measured: an instance did not start (see peer-ks-*.log)")
        if noise.retries or noise.waited or noise.disturbed_kept:
            notes.append("noise control: %d run(s) retried, %.0f s spent waiting for a quiet machine, %d kept "
                         "run(s) still disturbed (other processes > %.0f%% of a CPU or steal > %.0f%%)" % (
                             noise.retries, noise.waited, noise.disturbed_kept, args.max_foreign,
                             args.max_steal))
    finally:
        for pr in reversed(procs):
            try:
                pr.stop()
            except Exception as e:  # noqa: BLE001
                log("stop %s: %r" % (pr.name, e))
        for f in ("upstream-nginx.error.log", "proxy-nginx.error.log"):
            pth = os.path.join(rundir, f)
            if os.path.exists(pth) and os.path.getsize(pth):
                with open(pth) as fh:
                    lines = fh.read().splitlines()
                notes.append("%s has %d lines, e.g. `%s`" % (f, len(lines), lines[-1][:160]))
        for name in ("1g", "32m"):
            try:
                os.unlink(os.path.join(www, name))
            except OSError:
                pass

    elapsed = time.time() - t_start
    agg = summarize(records)
    main_names = [p["name"] for p in peers if p["group"] == "main"]
    R = ["## Run %s (%s)" % (datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "quick" if args.quick else "full"),
         "",
         "- command: `%s`" % " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)
                                                               if sys.executable.startswith(ROOT) else
                                                               sys.executable, "bench/run.py"] + sys.argv[1:]),
         "- machine: %s" % machine_info(),
         "- tools: " + "; ".join("%s %s" % kv for kv in tool_versions(args.python).items()),
         "- pinning: CPU 0 = wrk (1 thread) + upstream nginx (1 worker) + upload sink; CPU 1 = proxy under test",
         "- %d rep(s) x %d s per (peer, scenario), interleaved and rotated, %d s warm-up; medians; "
         "paced %d req/s%s; wall time %.1f min; raw output in %s" % (
             args.reps, args.duration, args.warmup, args.rate,
             " with keep-awake loops" if args.keepawake else "", elapsed / 60, rundir),
         ""]
    n_dist = sum(1 for r in records if r.get("disturbed"))
    if n_dist:
        R += ["> %d of %d kept runs were disturbed by other load on the machine; see the noise column." % (
            n_dist, len(records)), ""]
    R += ["### Targets (issue 7)", "", "| target | measured (ksproxy) | verdict |", "|---|---|---|"]
    targets = evaluate_targets(agg, main_names, extra, args)
    R += ["| %s | %s | **%s** |" % t for t in targets]
    met = sum(1 for t in targets if t[2] == "MET")
    R += ["", "%d of %d targets met%s." % (met, len(targets), "" if all(t[2] != "n/a" for t in targets)
                                            else " (n/a: not measured in this run)"), ""]
    R += ["### Peers (medians)", "", render_main(agg, main_names, args, extra.get("slow", {})), ""]
    if "ksproxy" in main_names and len(main_names) > 1:
        R += ["### ksproxy as a ratio to each peer", "", render_vs_peers(agg, main_names), ""]
    R += ["### Details", "", render_details(agg, [p["name"] for p in peers], scenarios,
                                            lambda s: [p["name"] for p in peers
                                                       if p["group"] == SCENARIOS[s]["group"]])]
    if extra.get("workers"):
        R += ["### Scaling with --workers", "",
              "The same ksproxy with 1 and with 2 worker processes, each free to run on both CPUs; wrk and the "
              "upstream stay on CPU 0, so the second worker shares its CPU with them: the ceiling here is below "
              "2×. %d rep(s) x %d s, there and back (1, 2, 2, 1 workers), medians." % (args.reps, args.duration),
              "", render_workers(agg, extra["workers"]), ""]
    R += ["Peers:", ""]
    for p in peers:
        x = ""
        if p.get("idle_rss_kb"):
            x = " (RSS after start %.1f MiB, after the load runs %.1f MiB)" % (
                p["idle_rss_kb"] / 1024.0, p.get("final_rss_kb", 0) / 1024.0)
        R.append("- **%s** :%d — %s%s" % (p["name"], p["port"], p["desc"], x))
    for p in (extra.get("workers") or {}).get("peers", []):
        R.append("- **%s** :%d (admin :%d) — %s" % (p["name"], p["port"], p["admin_port"], p["desc"]))
    R += ["", "wrk command lines (the port differs per peer):", ""]
    for s in scenarios:
        if s in argv_example:
            a = list(argv_example[s])
            a[-1] = re.sub(r":\d+/", ":PORT/", a[-1])
            R.append("- %s: `%s%s`" % (s, "BENCH_RATE=%d " % args.rate if SCENARIOS[s]["paced"] else "",
                                       " ".join(shlex.quote(x) for x in a)))
    if notes:
        R += ["", "Notes:", ""] + ["- " + n for n in notes]
    text = "\n".join(R) + "\n"
    with open(os.path.join(rundir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(rundir, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), records=records, extra=extra, notes=notes, targets=targets,
                       peers=[{k: v for k, v in p.items() if k != "proc"} for p in peers]),
                  f, indent=1, default=str)
    print(text)
    log("done in %.1f min; report: %s" % (elapsed / 60, os.path.join(rundir, "report.md")))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        log("interrupted (%s); every process started here has been stopped" % e)
        sys.exit(130)
