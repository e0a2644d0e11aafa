#!/usr/bin/env python3
"""A small SMTP catcher: keeps every message in memory and lists them Mailpit's way.

SMTP on :1025 (any sender, any recipient); HTTP on :8025: GET /livez (open, for the health
check) and GET /api/v1/messages (basic auth from MP_UI_AUTH="user:password"), answering
{"total": n, "messages": [{"ID", "Subject", "From": {"Address"}, "To": [{"Address"}]}]}.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

MESSAGES: list[dict[str, object]] = []
LOCK = threading.Lock()


class Catch:
    """aiosmtpd handler: parse and keep each message."""

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with LOCK:
            MESSAGES.append({
                "ID": str(len(MESSAGES) + 1),
                "Subject": str(message.get("Subject", "")).strip(),
                "From": {"Address": envelope.mail_from},
                "To": [{"Address": address} for address in envelope.rcpt_tos],
                "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        return "250 Message accepted for delivery"


def _expected_auth() -> bytes | None:
    credentials = os.environ.get("MP_UI_AUTH", "")
    return b"Basic " + base64.b64encode(credentials.encode()) if credentials else None


class Api(BaseHTTPRequestHandler):
    """/livez for anyone; the messages only with the right basic auth."""

    def do_GET(self) -> None:
        if self.path == "/livez":
            self._answer(200, b"ok", "text/plain")
            return
        expected = _expected_auth()
        given = self.headers.get("Authorization", "").encode()
        if expected is None or not hmac.compare_digest(given, expected):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mailcatcher"')
            self.end_headers()
            return
        if self.path.split("?")[0] != "/api/v1/messages":
            self._answer(404, b"not found", "text/plain")
            return
        with LOCK:
            body = {"total": len(MESSAGES), "messages": list(reversed(MESSAGES))}
        self._answer(200, json.dumps(body).encode(), "application/json")

    def _answer(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    """Serve SMTP and the API until stopped."""
    if not os.environ.get("MP_UI_AUTH"):
        print("warning: MP_UI_AUTH is not set: the message API refuses everyone", flush=True)
    controller = Controller(Catch(), hostname="0.0.0.0", port=1025)
    controller.start()
    # PID 1 in its container: SIGTERM has no default action there, so `docker stop` would
    # wait its 10 s and kill; stop at once instead.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    print("smtp :1025, api :8025", flush=True)
    ThreadingHTTPServer(("0.0.0.0", 8025), Api).serve_forever()


if __name__ == "__main__":
    main()
