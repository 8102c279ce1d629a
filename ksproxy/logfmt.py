"""
JSON logs, one object per line: C{twistd --logger ksproxy.logfmt.jsonLogObserver ...}.

twistd picks the log observer before it loads a plugin, so this is a log-observer factory for twistd's
C{--logger} option rather than an option of C{ksproxy run}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Dict, Optional

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

__all__ = ["jsonLogObserver", "JSONLineObserver"]

_SKIP = {"log_logger", "log_source", "log_format", "log_io", "log_trace", "log_flattened", "log_text", "format"}


@implementer(ILogObserver)
class JSONLineObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: Dict[str, Any]) -> None:
        record: Dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()


def jsonLogObserver(out: Optional[IO[str]] = None) -> JSONLineObserver:
    """The factory twistd's C{--logger} calls."""
    return JSONLineObserver(out or sys.stdout)
