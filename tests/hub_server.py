"""A tiny Hugging Face Hub-compatible HTTP server for offline tests (standard library only).

It speaks enough of the Hub protocol for the real ``huggingface_hub`` client (``create_repo``,
``upload_file``/``upload_folder``/``create_commit``, ``model_info``/``repo_info``,
``list_repo_files``/``list_repo_tree``, ``file_exists``, ``hf_hub_download``,
``snapshot_download``) and for ``transformers`` ``from_pretrained`` with ``HF_ENDPOINT`` set.

Storage (under ``LocalHub.storage_dir``), per repo ``<type>s/<repo_id>/``:
  ``blobs/<git-sha1>``  file contents, content-addressed (git blob hash, as the Hub's ETag);
  ``repo.json``         ``{"main": <commit sha>, "commits": {sha: {"parent", "message", "files": {path: blob}}}}``.
Every commit gets a new 40-hex sha; any known commit sha or ``main`` can be used as a revision.
Like the real Hub, a new repo starts with an "initial commit" holding a ``.gitattributes``.

All uploads are declared ``"regular"`` in the preupload answer, so contents arrive inline (base64)
in the NDJSON commit payload: no LFS / Xet transfer is ever negotiated. Unknown endpoints answer
404 with a JSON error and are logged to stderr. Auth tokens are accepted and ignored.
Limits: repo ids need a namespace ("user/name", the client rejects single-segment repo URLs); commits
go to ``main`` only (no branches, tags or pull requests); no LFS/Xet; no Range requests.

Usage::

    with LocalHub() as hub:            # or hub = LocalHub(); url = hub.start(); ...; hub.stop()
        api = HfApi(endpoint=hub.url, token="test")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sys
import tempfile
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_REPO = r"([^/]+(?:/[^/]+)?)"
_API_RE = re.compile(
    rf"^/api/(models|datasets|spaces)/{_REPO}(?:/(revision|tree|preupload|commit)/([^/]+)(?:/(.*))?)?$"
)
_RESOLVE_RE = re.compile(rf"^/(?:(datasets|spaces)/)?{_REPO}/resolve/([^/]+)/(.+)$")


def git_blob_sha(data: bytes) -> str:
    """Git blob hash, as computed by ``huggingface_hub.utils.sha.git_hash`` (used for regular-file oids)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class LocalHub:
    """Threaded Hub-compatible server on 127.0.0.1 (random port); ``url`` is set once started."""

    def __init__(self, storage_dir: str | Path | None = None, verbose: bool = False):
        self._own_dir = storage_dir is None
        self.storage_dir = Path(storage_dir or tempfile.mkdtemp(prefix="local_hub_"))
        self.verbose = verbose
        self.url: str | None = None
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None
        if self._own_dir:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ storage
    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.storage_dir / f"{repo_type}s" / repo_id

    def _load(self, repo_type: str, repo_id: str) -> dict:
        meta = self.repo_dir(repo_id, repo_type) / "repo.json"
        if not meta.is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(meta.read_text())

    def _files(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, dict]:
        """(commit sha, {path: blob sha}) of a revision ("main" or a commit sha)."""
        state = self._load(repo_type, repo_id)
        sha = state["main"] if revision == "main" else revision
        if sha not in state["commits"]:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, state["commits"][sha]["files"]

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        with self._lock:
            _, files = self._files(repo_type, repo_id, revision)
            return (self.repo_dir(repo_id, repo_type) / "blobs" / files[path]).read_bytes()

    def create_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        """Create a repo with an initial commit; returns False if it already existed."""
        with self._lock:
            if (self.repo_dir(repo_id, repo_type) / "repo.json").is_file():
                return False
            (self.repo_dir(repo_id, repo_type) / "blobs").mkdir(parents=True, exist_ok=True)
            state = {"main": None, "commits": {}}
            self._commit(repo_type, repo_id, state, {".gitattributes": GITATTRIBUTES}, set(), "initial commit")
            return True

    def _commit(self, repo_type, repo_id, state, adds: dict, deletes: set, message: str) -> str:
        files = dict(state["commits"][state["main"]]["files"]) if state["main"] else {}
        for path in deletes:
            if path.endswith("/"):
                files = {p: b for p, b in files.items() if not p.startswith(path)}
            elif files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        blobs = self.repo_dir(repo_id, repo_type) / "blobs"
        for path, data in adds.items():
            files[path] = git_blob_sha(data)
            if not (blobs / files[path]).exists():  # content-addressed: never rewrite a blob readers may hold
                (blobs / files[path]).write_bytes(data)
        self._counter += 1
        seed = json.dumps([state["main"], message, sorted(files.items()), self._counter, str(self.storage_dir)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        state["commits"][sha] = {"parent": state["main"], "message": message, "files": files,
                                 "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        state["main"] = sha
        tmp = self.repo_dir(repo_id, repo_type) / "repo.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(tmp.with_suffix(""))  # atomic: readers never take the lock
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub  # set by LocalHub.start
    protocol_version = "HTTP/1.1"
    timeout = 60  # socket timeout: a stuck client cannot hold a thread forever

    def log_message(self, fmt, *args):
        if self.hub.verbose:
            sys.stderr.write("[LocalHub] " + fmt % args + "\n")

    # ------------------------------------------------------------------ plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return True

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        return self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str):
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            handled = self._route(method, split.path, body)
            if not handled:
                sys.stderr.write(f"[LocalHub] unsupported endpoint: {method} {self.path}\n")
                self._json({"error": f"LocalHub: unsupported endpoint {method} {split.path}"}, 404)
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._json({"error": e.message}, e.status, headers)
        except Exception as e:  # noqa: BLE001 - report server bugs to the client and stderr
            sys.stderr.write(f"[LocalHub] error on {method} {self.path}: {e!r}\n")
            self._json({"error": f"LocalHub internal error: {e!r}"}, 500)

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, path: str, body: bytes) -> bool:
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            return self._json({"type": "user", "name": "user", "fullname": "Test User", "orgs": [],
                               "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if method in ("POST", "DELETE") and path in ("/api/repos/create", "/api/repos/delete"):
            req = json.loads(body or b"{}")
            repo_type = req.get("type") or "model"
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if path.endswith("delete"):
                with hub._lock:
                    hub._load(repo_type, repo_id)
                    shutil.rmtree(hub.repo_dir(repo_id, repo_type))
                return self._json({})
            created = hub.create_repo(repo_id, repo_type)
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            # Also sent with the 409: `create_repo(exist_ok=True)` reads "url" from it.
            answer = {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id}
            if not created:
                answer["error"] = f"You already created this {repo_type} repo"
            return self._json(answer, 200 if created else 409)

        if m := _RESOLVE_RE.match(path):
            if method not in ("GET", "HEAD"):
                return False
            rtype, repo_id, rev, filename = (m[1] or "models")[:-1], m[2], unquote(m[3]), unquote(m[4])
            sha, files = hub._files(rtype, repo_id, rev)
            if filename not in files:
                raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
            data = (hub.repo_dir(repo_id, rtype) / "blobs" / files[filename]).read_bytes()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{files[filename]}"', "Accept-Ranges": "none"}
            return self._send(200, data, headers, ctype="application/octet-stream")

        m = _API_RE.match(path)
        if not m:
            return False
        rtype, repo_id, action, rev, rest = m[1][:-1], m[2], m[3], unquote(m[4] or "main"), unquote(m[5] or "")
        if method == "GET" and action in (None, "revision"):
            return self._info(rtype, repo_id, rev)
        if method == "GET" and action == "tree":
            return self._tree(rtype, repo_id, rev, rest.strip("/"))
        if method == "POST" and action == "preupload":
            _, files = hub._files(rtype, repo_id, rev)
            req = json.loads(body)
            return self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                for f in req["files"]]})
        if method == "POST" and action == "commit":
            return self._commit(rtype, repo_id, rev, body)
        return False

    def _info(self, rtype: str, repo_id: str, rev: str) -> bool:
        sha, files = self.hub._files(rtype, repo_id, rev)
        commit = self.hub._load(rtype, repo_id)["commits"][sha]
        blobs = self.hub.repo_dir(repo_id, rtype) / "blobs"
        return self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": sha, "private": False,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": commit["date"], "createdAt": commit["date"],
            "siblings": [{"rfilename": p, "size": (blobs / b).stat().st_size, "blobId": b}
                         for p, b in sorted(files.items())],
        })

    def _tree(self, rtype: str, repo_id: str, rev: str, prefix: str) -> bool:
        _, files = self.hub._files(rtype, repo_id, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        blobs = self.hub.repo_dir(repo_id, rtype) / "blobs"
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, blob in sorted(files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):  # intermediate folders
                folder = base + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": blob, "size": (blobs / blob).stat().st_size}
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        return self._json(list(entries.values()))

    def _commit(self, rtype: str, repo_id: str, rev: str, body: bytes) -> bool:
        if self.query.get("create_pr", ["0"])[0] in ("1", "true"):
            raise HubError(400, "LocalHub does not support pull requests (create_pr=True)")
        if rev != "main":
            raise HubError(400, f"LocalHub only supports commits to 'main', got {rev!r}")
        adds, deletes, message, parent = {}, set(), "", None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message, parent = value.get("summary", ""), value.get("parentCommit")
            elif key == "file":
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.add(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:  # lfsFile: never requested since every preupload answer is "regular"
                raise HubError(400, f"LocalHub does not support commit operation {key!r}")
        with self.hub._lock:
            state = self.hub._load(rtype, repo_id)
            if parent and parent != state["main"]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = self.hub._commit(rtype, repo_id, state, adds, deletes, message)
        url = f"{self.hub.url}/{'' if rtype == 'model' else rtype + 's/'}{repo_id}/commit/{sha}"
        return self._json({"success": True, "commitOid": sha, "commitUrl": url, "commitMessage": message,
                           "pullRequestUrl": None})
