#!/usr/bin/env bash
# Start the demo upstream on 127.0.0.1:8081 and ksproxy on :8080 (admin on 127.0.0.1:9090) serving this folder.
# Ctrl-C stops both.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$(dirname "$here")"
bin="$top/.venv/bin"
[ -x "$bin/twistd" ] || bin="$(dirname "$(command -v twistd)")"
"$bin/python" -m ksproxy.demo --port 8081 &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT
exec_status=0
"$bin/twistd" -n --pidfile= ksproxy run --listen tcp:8080 --admin-listen tcp:9090:interface=127.0.0.1 \
    --source "dir:$here" "$@" || exec_status=$?
exit $exec_status
