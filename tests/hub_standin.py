"""A stand-in for the Hugging Face Hub's HTTP API on loopback: the endpoints ``HfApi.create_repo`` and
``HfApi.upload_folder`` use for small ("regular") files, in huggingface_hub 0.x and later. Tests point ``huggingface_hub`` at it, so the real client
code, HTTP included, runs without a network. ``failures[path]`` lists the error statuses the next requests to
``path`` answer."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, dict]] = []  # method, path, headers
        self.failures: dict[str, list[int]] = {}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                standin.handle(self, "GET")

            def do_POST(self):
                standin.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        self.requests.append((method, request.path, dict(request.headers)))
        path = request.path.split("?")[0]
        if self.failures.get(path):
            return self.reply(request, self.failures[path].pop(0), {"error": "stand-in failure"})
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            private = data.get("visibility", "private" if data.get("private") else "public") != "public"
            self.repos.setdefault(repo_id, {"private": private, "files": {}})
            return self.reply(request, 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":  # the client checks the model card's metadata
            return self.reply(request, 200, {})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):  # huggingface_hub 0.x asks
            return self.reply(request, 200, {"id": match.group(1), "sha": "0" * 40, "xetEnabled": False})  # for Xet
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self.reply(request, 200, {"files": modes, "commitOid": "0" * 40})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            repo = self.repos[match.group(1)]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            url = f"{self.endpoint}/{match.group(1)}/commit/{'1' * 40}"
            return self.reply(request, 200, {"commitUrl": url, "commitOid": "1" * 40, "pullRequestUrl": None})
        return self.reply(request, 404, {"error": f"the stand-in does not serve {method} {path}"})

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
