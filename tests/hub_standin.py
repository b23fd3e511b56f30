"""A stand-in for the Hugging Face Hub's HTTP API on loopback: the endpoints ``HfApi.create_repo`` and
``HfApi.upload_folder`` use for small ("regular") files, and those of listing a repo's files and downloading them
(``list_repo_files``, ``snapshot_download``), in huggingface_hub 0.x and later. Tests point ``huggingface_hub`` at
it, so the real client code, HTTP included, runs without a network. ``failures[path]`` lists the error statuses the
next requests to ``path`` answer; ``repos[repo_id]["files"]`` is what a repo holds."""

from __future__ import annotations

import base64
import hashlib
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

            def do_HEAD(self):
                standin.handle(self, "HEAD")

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
            files = self.repos.get(match.group(1), {"files": {}})["files"]  # for Xet before an upload
            return self.reply(request, 200, {"id": match.group(1), "sha": "0" * 40, "xetEnabled": False,
                                             "siblings": [{"rfilename": name} for name in sorted(files)]})  # fmt: skip
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            files = self.repos[match.group(1)]["files"]
            entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in sorted(files.items())]  # fmt: skip
            return self.reply(request, 200, entries)
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            data = self.repos[match.group(1)]["files"].get(match.group(3))
            if data is None:
                return self.reply(request, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": "0" * 40, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            return self.reply(request, 200, data, headers)
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
    def reply(request: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None) -> None:
        """Answer with ``payload`` (JSON, or bytes as they are) and ``headers``; no body for a HEAD request."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        request.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
