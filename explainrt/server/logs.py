"""Structured logs: one ``key=value`` line (logfmt) or one JSON object per event.

Library code logs ``log_event(log, "rpc", rpc="Explain", code="OK", ...)``; the message reads as
logfmt under any formatter, and ``JsonFormatter`` turns the same fields into JSON keys.
"""
from __future__ import annotations

import json
import logging
import time


def _value(value) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def logfmt(fields: dict) -> str:
    """``{"a": 1, "b": "x y"}`` → ``a=1 b="x y"`` (None values left out)."""
    return " ".join(f"{key}={_value(val)}" for key, val in fields.items() if val is not None)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with ``fields`` as one structured line."""
    if logger.isEnabledFor(level):
        payload = {"event": event, **fields}
        logger.log(level, logfmt(payload), extra={"fields": payload})


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… event=… key=value …`` (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        head = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        line = logfmt(head) + " " + (logfmt(fields) if fields else logfmt({"msg": record.getMessage()}))
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ts, level, logger and the event's fields (or msg)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        out.update({k: v for k, v in fields.items() if v is not None} if fields else {"msg": record.getMessage()})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure(fmt: str = "kv", level: int = logging.INFO) -> None:
    """Route the root logger to stderr with ``fmt`` 'kv' (logfmt) or 'json' (for `explainrt serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
