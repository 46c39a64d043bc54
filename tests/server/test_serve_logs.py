"""Structured log lines: logfmt quoting and the JSON formatter carry the same fields."""
from __future__ import annotations

import json
import logging

from explainrt.server.logs import JsonFormatter, KeyValueFormatter, log_event, logfmt


def test_logfmt_quotes_what_needs_quoting():
    assert logfmt({"a": 1, "b": "x y", "c": None, "d": 0.123456789, "e": ""}) == 'a=1 b="x y" d=0.123457 e=""'
    assert logfmt({"msg": 'say "hi"'}) == r'msg="say \"hi\""'


def test_formatters_render_the_event_fields():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("explainrt.test_serve_logs")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    log_event(logger, "rpc", rpc="Explain", code="OK", ms=1.5, error=None)
    (record,) = records
    assert record.getMessage() == "event=rpc rpc=Explain code=OK ms=1.5"
    line = KeyValueFormatter().format(record)
    assert line.startswith("ts=") and line.endswith("logger=explainrt.test_serve_logs event=rpc rpc=Explain code=OK ms=1.5")
    obj = json.loads(JsonFormatter().format(record))
    assert {k: obj[k] for k in ("level", "event", "rpc", "code", "ms")} == {
        "level": "info", "event": "rpc", "rpc": "Explain", "code": "OK", "ms": 1.5}
    assert "error" not in obj
