#!/usr/bin/env python3
"""A test proxy in front of the search server, for flumen's Elasticsearch tests.

Usage: es_proxy.py TARGET [--reject SHARE] [--seed N] [--auth USER:PASSWORD] [--port N]

Listens on 127.0.0.1 on a free port (or N) and prints it on the first line of stdout. Requests are
forwarded to TARGET (http://host:port). For `_bulk` requests, a SHARE of the items (chosen with
the seed) is not forwarded and answered with status 429 in the merged bulk response, as a busy
cluster does. With --auth, requests without that basic-auth user and password get 401.
Counts: GET /_proxy_stats answers {"bulk_requests": n, "rejected_items": n}.
"""
import base64
import json
import random
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

target = sys.argv[1].rstrip("/")
args = sys.argv[2:]
opt = lambda name, default: args[args.index(name) + 1] if name in args else default
share = float(opt("--reject", "0"))
rng = random.Random(int(opt("--seed", "1")))
auth = opt("--auth", None)
expected = "Basic " + base64.b64encode(auth.encode()).decode() if auth else None
lock = threading.Lock()
stats = {"bulk_requests": 0, "rejected_items": 0}


def forward(method, path, body, headers):
    req = urllib.request.Request(target + path, data=body, method=method)
    for k in ("Content-Type",):
        if headers.get(k):
            req.add_header(k, headers[k])
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        if self.path == "/_proxy_stats":
            return self.answer(200, json.dumps(stats).encode())
        if expected and self.headers.get("Authorization") != expected:
            return self.answer(401, b'{"error":{"type":"security_exception","reason":"unable to authenticate user"},"status":401}')
        if self.command == "POST" and self.path.split("?")[0].endswith("/_bulk") and share > 0:
            return self.bulk(body)
        status, out = forward(self.command, self.path, body, self.headers)
        self.answer(status, out)

    def bulk(self, body):
        lines = body.decode().splitlines()
        pairs = []
        i = 0
        while i < len(lines):
            action = json.loads(lines[i])
            op = next(iter(action))
            has_source = op != "delete"
            pairs.append((op, action, lines[i : i + (2 if has_source else 1)]))
            i += 2 if has_source else 1
        with lock:
            stats["bulk_requests"] += 1
            drop = [rng.random() < share for _ in pairs]
            stats["rejected_items"] += sum(drop)
        kept = [l for (p, d) in zip(pairs, drop) if not d for l in p[2]]
        items = []
        if kept:
            status, out = forward("POST", self.path, ("\n".join(kept) + "\n").encode(), self.headers)
            if status != 200:
                return self.answer(status, out)
            items = json.loads(out)["items"]
        merged, it = [], iter(items)
        for (op, action, _), d in zip(pairs, drop):
            if d:
                meta = action[op]
                merged.append({op: {"_index": meta.get("_index"), "_id": meta.get("_id"), "status": 429,
                                    "error": {"type": "es_rejected_execution_exception",
                                              "reason": "rejected by the test proxy"}}})
            else:
                merged.append(next(it))
        errors = any(d for d in drop) or any(next(iter(m.values())).get("status", 200) >= 300 for m in merged)
        self.answer(200, json.dumps({"took": 1, "errors": errors, "items": merged}).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


server = ThreadingHTTPServer(("127.0.0.1", int(opt("--port", "0"))), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
