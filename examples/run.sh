#!/usr/bin/env bash
# Start the demo upstream on 127.0.0.1:8081 and ksproxy on 127.0.0.1:8080 (admin on 127.0.0.1:9090) serving this
# folder (loopback only: with no authentication configured, ksproxy is an open proxy).
# Extra arguments go to `ksproxy run`. Ctrl-C stops both.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$(dirname "$here")/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
"$py" -m ksproxy.demo --port 8081 &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT
"$py" -m ksproxy.cli run --listen tcp:8080:interface=127.0.0.1 --admin-listen tcp:9090:interface=127.0.0.1 --source "dir:$here" "$@"
