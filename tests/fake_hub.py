"""A Hugging Face Hub on loopback for download tests: the few endpoints huggingface_hub's
snapshot_download uses (repo info, recursive tree, resolve with HEAD and GET), serving
repositories held in memory. Point a process at it with HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_FROM = 1024  # files this big are served as LFS files (ETag = sha256), as the Hub does


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        h.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(f"{h.command} {path}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
        r = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (m or r).group(1) if (m or r) else None
        if repo not in self.repos:
            return self._send(h, 404, b'{"error":"Repository not found"}',
                              {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, body)
        files, commit = self.repos[repo], self.commits[repo]
        if m and m.group(2) == "revision":
            info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                    "siblings": [{"rfilename": name} for name in files]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if m:
            tree = [self._entry(name, data) for name, data in files.items()]
            return self._send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        name = r.group(3)
        if name not in files:
            return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        data = files[name]
        etag = self._entry(name, data).get("lfs", {}).get("oid") or self._blob_id(data)
        self._send(h, 200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"}, body)

    @staticmethod
    def _blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _entry(self, name: str, data: bytes) -> dict:
        entry: dict = {"type": "file", "path": name, "size": len(data), "oid": self._blob_id(data)}
        if len(data) >= LFS_FROM:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry
