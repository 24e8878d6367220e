"""A local stand-in for the Hugging Face Hub's HTTP API, so tests run the real ``huggingface_hub`` client code.

It serves, on 127.0.0.1 only, the few endpoints that ``create_repo``, ``create_commit`` / ``upload_folder``
(preupload + NDJSON commit, every file as a "regular" base64 blob) and ``snapshot_download`` (revision info, tree
listing, file resolve) call. Repositories live in memory. Writes need ``Authorization: Bearer <token>``; private
repositories also need it to read. The server shuts itself down after ``lifetime_s`` in case a test hangs.

    with HubStandIn(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

USER = "test-user"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubStandIn:
    def __init__(self, token: str = "hf_test_token", lifetime_s: float = 300.0):
        self.token, self.lifetime_s = token, lifetime_s
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # ----------------------------------------------------------------------------------------------- helpers
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, f"Repository Not Found for url: {self.path}", "RepoNotFound")
            return None
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return repo

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

    # ------------------------------------------------------------------------------------------------ routes
    def do_POST(self) -> None:
        self._record()
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":  # the client checks a README's metadata block before committing it
            return self._validate_yaml(json.loads(body)["content"])
        if m := re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path):
            if self._repo(m[1], write=True):
                files = json.loads(body)["files"]
                self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in files], "commitOid": self.hub.repos[m[1]].sha})
            return None
        if m := re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path):
            return self._commit(m[1], body)
        return self._error(404, f"stand-in Hub has no route POST {path}")

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        self._record()
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        if path == "/api/whoami-v2":
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": USER, "orgs": []}, head=head)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            if repo := self._repo(m[1]):
                self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                                 "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(repo.files)]},
                           head=head)
            return None
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            if repo := self._repo(m[1]):
                prefix = (m[3] or "").strip("/")
                recursive = parse_qs(parsed.query).get("recursive", ["False"])[0].lower() == "true"
                self._send(200, _tree(repo, prefix, recursive), head=head)
            return None
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            if (repo := self._repo(m[1])) is None:
                return None
            data = repo.files.get(m[3])
            if data is None:
                return self._error(404, f"Entry not found: {m[3]}", "EntryNotFound")
            return self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha(data)}"',
                                          "Content-Type": "application/octet-stream"}, head=head)
        return self._error(404, f"stand-in Hub has no route GET {path}")

    def _create(self, payload: dict) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the Hub answers 409 with the existing repo's url
                return self._send(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
            self.hub.repos[repo_id] = Repo(repo_id, private)
        return self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, content: str) -> None:
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as e:
                return self._error(400, f"Invalid YAML in README.md metadata: {e}")
            if not isinstance(meta, dict):
                return self._error(400, "README.md metadata must be a YAML mapping")
        return self._send(200, {"warnings": []})

    def _commit(self, repo_id: str, body: bytes) -> None:
        if (repo := self._repo(repo_id, write=True)) is None:
            return None
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self.hub.lock:
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    for p in [p for p in repo.files if p.startswith(value["path"].rstrip("/") + "/")]:
                        del repo.files[p]
                elif item["key"] != "header":
                    return self._error(400, f"stand-in Hub does not support commit operation {item['key']}")
            digest = hashlib.sha1(json.dumps([header, sorted(repo.files)], default=str).encode())
            for p in sorted(repo.files):
                digest.update(repo.files[p])
            repo.commits.append(digest.hexdigest())
        return self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha})


def _tree(repo: Repo, prefix: str, recursive: bool) -> list[dict]:
    entries: dict[str, dict] = {}
    for path, data in sorted(repo.files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(([prefix] if prefix else []) + parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            if not recursive:
                break
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
    return list(entries.values())
