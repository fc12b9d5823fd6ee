"""A fake Hugging Face Hub for tests: a threaded HTTP server on 127.0.0.1 (free port).

It answers what ``HfApi(endpoint=hub.url)`` calls for ``create_repo``, ``create_branch`` and
``create_commit``/``upload_folder`` with regular (non-LFS) files:

* ``POST /api/repos/create``                          → creates the repo (409 if it exists)
* ``POST /api/validate-yaml``                         → README.md metadata check
* ``POST /api/models/{repo}/branch/{branch}``         → creates a branch
* ``POST /api/models/{repo}/preupload/{revision}``    → every file is ``uploadMode: regular``
* ``POST /api/models/{repo}/commit/{revision}``       → ndjson commit with base64 file contents

and records the repos (with their private flag), branches, commits (with every file's bytes) and
each request's Authorization header. ``status`` makes it answer every request with that HTTP
status instead (e.g. 401); ``yaml_error`` makes the metadata check fail with that message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("create_repo", re.compile(r"/api/repos/create")),
    ("validate_yaml", re.compile(r"/api/validate-yaml")),
    ("branch", re.compile(rf"/api/models/{_REPO}/branch/(?P<ref>.+)")),
    ("preupload", re.compile(rf"/api/models/{_REPO}/preupload/(?P<ref>.+)")),
    ("commit", re.compile(rf"/api/models/{_REPO}/commit/(?P<ref>.+)")),
]


@dataclass
class Request:
    method: str
    path: str
    authorization: Optional[str]
    body: bytes


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """Context manager running the fake Hub; ``url`` is the endpoint to give HfApi."""

    def __init__(self, status: Optional[int] = None, yaml_error: Optional[str] = None):
        self.status = status
        self.yaml_error = yaml_error
        self.requests: list[Request] = []
        self.repos: dict[str, dict] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[Commit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def authorizations(self) -> list[Optional[str]]:
        """The Authorization header of every request received, in order."""
        return [r.authorization for r in self.requests]

    # -- request handling (called from server threads) -------------------------------------
    def handle(self, method: str, path: str, authorization: Optional[str], body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(Request(method, path, authorization, body))
            if self.status is not None:
                return self.status, {"error": f"fake hub answers {self.status}"}
            for name, pattern in _ROUTES:
                match = pattern.fullmatch(path)
                if method == "POST" and match:
                    groups = {k: unquote(v) for k, v in match.groupdict().items()}
                    return getattr(self, f"_{name}")(body, **groups)
            return 404, {"error": f"fake hub has no route for {method} {path}"}

    def _create_repo(self, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "type": payload.get("type", "model")}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, body: bytes) -> tuple[int, dict]:
        if self.yaml_error:
            return 400, {"errors": [{"message": self.yaml_error}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _branch(self, body: bytes, repo: str, ref: str) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        self.branches.append((repo, ref))
        return 200, {}

    def _preupload(self, body: bytes, repo: str, ref: str) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def _commit(self, body: bytes, repo: str, ref: str) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        commit = Commit(repo_id=repo, revision=ref, summary=header["summary"])
        for item in lines:
            if item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64", value["encoding"]
                commit.files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] != "header":
                return 422, {"error": f"fake hub does not support {item['key']} operations"}
        self.commits.append(commit)
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            status, payload = hub.handle(
                self.command, urlsplit(self.path).path, self.headers.get("Authorization"), self._read_body()
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args) -> None:  # keep test output quiet
            pass

    return Handler


def closed_port_url() -> str:
    """An http://127.0.0.1 URL on a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
