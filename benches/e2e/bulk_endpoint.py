#!/usr/bin/env python3
"""A bulk endpoint for the Elasticsearch benchmark: reads each request whole and answers a valid
all-success bulk response (one item per action line), so a client's own speed is what is measured.

Usage: bulk_endpoint.py PORT  -- prints "ready" once listening. Counts documents and bytes:
GET /_stats answers {"docs": n, "bytes": n}. Any other request gets {} with status 200.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
stats = {"docs": 0, "bytes": 0}
ITEM = b'{"index":{"_index":"bench","_id":"x","_version":1,"result":"created","status":201}}'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        # The official Python client checks that it talks to Elasticsearch.
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        if path == "/_stats":
            return self.answer(json.dumps(stats).encode())
        if path.endswith("/_bulk"):
            # Documents without a source line (delete) do not occur here: two lines per item.
            items = body.count(b"\n") // 2
            with lock:
                stats["docs"] += items
                stats["bytes"] += len(body)
            return self.answer(b'{"took":1,"errors":false,"items":[' + b",".join([ITEM] * items) + b"]}")
        if path == "/":
            return self.answer(json.dumps({"version": {"number": "8.15.0", "build_flavor": "default"},
                                           "tagline": "You Know, for Search"}).encode())
        self.answer(b"{}")

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = handle_any


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
