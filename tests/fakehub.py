"""A small Hugging Face Hub of our own for the publish tests: stdlib HTTP server on 127.0.0.1 (free port), repos
stored on disk, driven by the real huggingface_hub client (HF_HUB_DISABLE_XET, so LFS-mode files go through the
git-lfs batch API). Endpoints and shapes follow /work/shared/reference/hub-and-tokenizer.md section B.

It counts requests, commits and bytes received, and injects faults on matching requests: an HTTP status (with
``Retry-After``), a connection dropped while the body is sent, or a 500 returned after the request was applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class Reply(Exception):
    """Ends a route with an HTTP answer."""

    def __init__(self, status: int, body=None, headers: dict | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


@dataclass
class Fault:
    method: str
    pattern: str           # regex searched in the request path (unquoted)
    times: int = 1
    status: int = 503
    retry_after: float | None = None
    drop: bool = False     # read part of the body, then close the connection without an answer
    after: bool = False    # apply the request, then answer ``status`` instead of the real answer
    hits: int = 0


@dataclass
class Request:
    method: str
    path: str
    status: int
    received: int  # body bytes read


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict = field(default_factory=dict)    # sha -> {"tree": {path: entry}, "parent", "title", "description"}
    branches: dict = field(default_factory=dict)   # name (main, refs/pr/N) -> sha
    tags: dict = field(default_factory=dict)
    prs: dict = field(default_factory=dict)        # num -> {"title", "description"}


class FakeHub:
    """``with FakeHub(tmp_path) as hub:`` serves at ``hub.url``; ``hub.token`` writes, ``hub.read_token`` reads."""

    def __init__(self, root: Path, *, token: str = "hf_fakeWriteToken0123456789abcdef",
                 read_token: str = "hf_fakeReadToken0123456789abcdef", user: str = "me", page_size: int = 1000):
        self.root = Path(root)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self.token, self.read_token, self.user, self.page_size = token, read_token, user, page_size
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, dict] = {}  # slug -> {"title", "namespace", "private", "items": [repo ids]}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.commit_bodies: list[list[dict]] = []
        self.before_commit = None  # called once with the repo when the next commit arrives (a concurrent writer)
        self.lock = threading.RLock()
        self._secret = hashlib.sha256(str(id(self)).encode()).hexdigest()
        self._counter = 0
        self.server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    # -- test helpers ----------------------------------------------------------------------------------------

    def fail(self, method: str, pattern: str, **kwargs) -> Fault:
        fault = Fault(method, pattern, **kwargs)
        self.faults.append(fault)
        return fault

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.commit_bodies.clear()

    @property
    def commits(self) -> int:
        return sum(1 for r in self.requests if r.method == "POST" and "/commit/" in r.path and r.status == 200)

    @property
    def lfs_bytes(self) -> int:
        """Bytes received by LFS uploads (weights and other LFS-mode files), including failed attempts."""
        return sum(r.received for r in self.requests if r.method == "PUT" and r.path.startswith("/lfs-upload/"))

    def inline_bytes(self, suffixes: tuple[str, ...] = ()) -> int:
        """Decoded bytes of regular files sent inline in commits (only paths ending in ``suffixes`` if given)."""
        total = 0
        for lines in self.commit_bodies:
            for line in lines:
                if line["key"] == "file" and (not suffixes or line["value"]["path"].endswith(suffixes)):
                    total += len(base64.b64decode(line["value"]["content"]))
        return total

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a revision (read from the store)."""
        repo = self.repos[repo_id]
        tree = repo.commits[self._resolve(repo, revision)]["tree"]
        return {path: self._content(entry) for path, entry in tree.items()}

    # -- store -----------------------------------------------------------------------------------------------

    def _content(self, entry: dict) -> bytes:
        if entry.get("lfs"):
            return (self.root / "lfs" / entry["lfs"]).read_bytes()
        return (self.root / "blobs" / entry["oid"]).read_bytes()

    def _save(self, repo: Repo) -> None:
        path = self.root / "repos" / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(repo.__dict__, indent=1, sort_keys=True))

    def _store_blob(self, data: bytes) -> dict:
        oid = blob_sha1(data)
        (self.root / "blobs" / oid).write_bytes(data)
        return {"oid": oid, "size": len(data), "lfs": None}

    def _new_commit(self, repo: Repo, branch: str, tree: dict, title: str, description: str = "") -> str:
        self._counter += 1
        parent = repo.branches.get(branch)
        sha = hashlib.sha1(json.dumps([repo.repo_id, parent, tree, title, self._counter], sort_keys=True)
                           .encode()).hexdigest()
        repo.commits[sha] = {"tree": tree, "parent": parent, "title": title, "description": description}
        repo.branches[branch] = sha
        self._save(repo)
        return sha

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        raise Reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = self.repos[repo_id] = Repo(repo_id, private)
        self._new_commit(repo, "main", {".gitattributes": self._store_blob(GITATTRIBUTES)}, "initial commit")
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.query = parse_qs(split.query)
        plain = "/" + "/".join(self.segments)
        self.received = 0
        fault = None
        with hub.lock:
            for f in hub.faults:
                if f.times > 0 and f.method == method and re.search(f.pattern, plain):
                    f.times -= 1
                    f.hits += 1
                    fault = f
                    break
        if fault is not None and fault.drop:
            length = int(self.headers.get("Content-Length") or 0)
            self.received = len(self.rfile.read(length // 2)) if length else 0
            with hub.lock:
                hub.requests.append(Request(method, plain, 0, self.received))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.body = self._read_body()
        if fault is not None and not fault.after:
            reply = self._fault_reply(fault)
        else:
            try:
                with hub.lock:
                    reply = Reply(200, self._route(method))
            except Reply as r:
                reply = r
            except Exception as exc:  # a bug in the fake: make it visible in the test
                reply = Reply(599, {"error": f"fake hub bug: {type(exc).__name__}: {exc}"})
            if fault is not None:
                reply = self._fault_reply(fault)
        with hub.lock:
            hub.requests.append(Request(method, plain, reply.status, self.received))
        self._send(reply)

    def _fault_reply(self, fault: Fault) -> Reply:
        headers = {"X-Error-Message": "injected fault"}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        return Reply(fault.status, {"error": "injected fault"}, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        self.received = len(data)
        return data

    def _send(self, reply: Reply) -> None:
        body = reply.body
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def json(self):
        return json.loads(self.body or b"{}")

    # -- auth ------------------------------------------------------------------------------------------------

    def _auth(self, write: bool, repo: Repo | None = None) -> None:
        header = self.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        if token is None:
            if write or (repo is not None and repo.private):
                raise Reply(401, {"error": "Unauthorized"}, {"X-Error-Code": "RepoNotFound"} if repo else {})
            return
        if token not in (self.hub.token, self.hub.read_token):
            raise Reply(401, {"error": "Invalid credentials in Authorization header"},
                        {"X-Error-Message": "Invalid credentials in Authorization header"})
        if write and token != self.hub.token:
            raise Reply(403, {"error": "You don't have the rights to write to this repo"},
                        {"X-Error-Message": "You don't have the rights to write to this repo"})

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._auth(write=False)
            raise Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound",
                                                                   "X-Error-Message": "Repository not found"})
        self._auth(write, repo)
        return repo

    # -- routes ----------------------------------------------------------------------------------------------

    def _route(self, method: str):
        s = self.segments
        if s[:2] == ["api", "agent-harnesses"]:
            return {"standardEnvVars": [], "harnesses": {}}
        if method == "GET" and s[:2] == ["api", "whoami-v2"]:
            self._auth(write=False)
            return {"name": self.hub.user, "type": "user", "orgs": []}
        if method == "POST" and s[:3] == ["api", "repos", "create"]:
            return self._create_repo()
        if method == "POST" and s[:2] == ["api", "validate-yaml"]:
            return {"errors": [], "warnings": []}
        if method == "PUT" and s[0] == "lfs-upload":
            return self._lfs_put(s[1])
        if method == "POST" and s[0] == "lfs-verify":
            self._auth(write=True)
            if not (self.hub.root / "lfs" / s[1]).exists():
                raise Reply(404, {"error": "object not found"})
            return {}
        if method == "POST" and len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{s[0]}/{s[1][:-4]}")
        if s[:2] == ["api", "collections"]:
            return self._collections(method, "/".join(s[2:4]), s[4:])
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            return self._repo_route(method, repo_id, rest)
        raise Reply(404, {"error": f"no route for {method} {self.path}"})

    def _repo_route(self, method: str, repo_id: str, rest: list[str]):
        if method == "GET" and not rest:
            return self._info(repo_id, "main")
        if method == "GET" and rest[0] == "revision":
            return self._info(repo_id, rest[1])
        if method == "GET" and rest[0] == "tree":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if method == "GET" and rest[0] == "refs":
            repo = self._repo(repo_id)
            ref = lambda name, kind: {"name": name, "ref": f"refs/{kind}/{name}" if kind else name,  # noqa: E731
                                      "targetCommit": (repo.branches | repo.tags)[name]}
            return {"branches": [ref(b, "heads") for b in repo.branches if not b.startswith("refs/")],
                    "converts": [], "tags": [ref(t, "tags") for t in repo.tags],
                    "pullRequests": [ref(b, None) for b in repo.branches if b.startswith("refs/pr/")]}
        if method == "POST" and rest[0] == "preupload":
            return self._preupload(repo_id, rest[1])
        if method == "POST" and rest[0] == "commit":
            return self._commit(repo_id, rest[1])
        if method == "POST" and rest[0] == "tag":
            repo = self._repo(repo_id, write=True)
            data = self.json()
            if data["tag"] in repo.tags:
                raise Reply(409, {"error": "Tag already exists"})
            repo.tags[data["tag"]] = self.hub._resolve(repo, rest[1])
            self.hub._save(repo)
            return {}
        if method == "POST" and rest == ["discussions"]:
            repo = self._repo(repo_id, write=True)
            data = self.json()
            num = len(repo.prs) + 1
            repo.prs[str(num)] = {"title": data["title"], "description": data.get("description", "")}
            repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
            self.hub._save(repo)
            return {"num": num}
        if method == "GET" and rest[0] == "discussions":
            repo = self._repo(repo_id)
            pr = repo.prs.get(rest[1])
            if pr is None:
                raise Reply(404, {"error": "Discussion not found"})
            return {"title": pr["title"], "num": int(rest[1]), "author": {"name": self.hub.user},
                    "createdAt": "2026-11-30T00:00:00.000Z", "status": "draft", "isPullRequest": True,
                    "repo": {"name": repo_id, "type": "model"}, "events": [], "filesWithConflicts": [],
                    "changes": {"base": "refs/heads/main"}}
        raise Reply(404, {"error": f"no route for {method} {self.path}"})

    def _collection_json(self, slug: str) -> dict:
        c = self.hub.collections[slug]
        return {"slug": slug, "title": c["title"], "owner": {"name": c["namespace"]}, "private": c["private"],
                "items": [{"_id": f"item{i}", "id": repo_id, "type": "model", "position": i}
                          for i, repo_id in enumerate(c["items"])],
                "lastUpdated": "2026-11-30T00:00:00.000Z", "position": 0, "theme": "blue", "upvotes": 0}

    def _collections(self, method: str, slug: str, rest: list[str]):
        if method == "POST" and not slug:
            self._auth(write=True)
            data = self.json()
            for known, c in self.hub.collections.items():
                if (c["namespace"], c["title"]) == (data["namespace"], data["title"]):
                    raise Reply(409, {"error": "Collection already exists", "slug": known})
            name = re.sub("[^a-z0-9]+", "-", data["title"].lower())
            slug = f"{data['namespace']}/{name}-{len(self.hub.collections):024x}"
            self.hub.collections[slug] = {"title": data["title"], "namespace": data["namespace"],
                                          "private": bool(data.get("private")), "items": []}
            return self._collection_json(slug)
        if slug not in self.hub.collections:
            raise Reply(404, {"error": "Collection not found"})
        if method == "GET" and not rest:
            self._auth(write=False)
            return self._collection_json(slug)
        if method == "POST" and rest == ["items"]:
            self._auth(write=True)
            item = self.json()["item"]
            if item["id"] in self.hub.collections[slug]["items"]:
                raise Reply(409, {"error": "Item already in collection"})
            if item["type"] != "model" or item["id"] not in self.hub.repos:
                raise Reply(404, {"error": "Item not found"})
            self.hub.collections[slug]["items"].append(item["id"])
            return self._collection_json(slug)
        raise Reply(404, {"error": f"no route for {method} {self.path}"})

    def _create_repo(self):
        data = self.json()
        self._auth(write=True)
        repo_id = f"{data.get('organization') or self.hub.user}/{data['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            raise Reply(409, {"error": "You already created this model repo", "url": url})
        self.hub.create_repo(repo_id, private=data.get("visibility") == "private" or bool(data.get("private")))
        return {"url": url}

    def _info(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        sha = self.hub._resolve(repo, revision)
        tree = repo.commits[sha]["tree"]
        return {"id": repo_id, "sha": sha, "private": repo.private, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(tree)]}

    def _tree(self, repo_id: str, revision: str, prefix: str):
        repo = self._repo(repo_id)
        tree = repo.commits[self.hub._resolve(repo, revision)]["tree"]
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for path in sorted(tree):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entry = tree[path]
                item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
                if entry.get("lfs"):
                    item["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                                   "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
                entries.append(item)
        if prefix and not entries and not folders:
            raise Reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        cursor = int(self.query.get("cursor", ["0"])[0])
        page = entries[cursor:cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(entries):
            query = f"recursive={str(recursive).lower()}&cursor={cursor + self.hub.page_size}"
            path = urlsplit(self.path).path
            headers["Link"] = f'<{self.hub.url}{path}?{query}>; rel="next"'
        raise Reply(200, page, headers)

    def _preupload(self, repo_id: str, revision: str):
        repo = self._repo(repo_id, write=True)
        tree = repo.commits[self.hub._resolve(repo, revision)]["tree"]
        out = []
        for f in self.json()["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000 or b"\0" in sample
            existing = tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing["lfs"] or existing["oid"]
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return {"files": out, "commitOid": repo.branches.get(revision)}

    def _signature(self, oid: str) -> str:
        return hmac.new(self.hub._secret.encode(), oid.encode(), "sha256").hexdigest()

    def _lfs_batch(self, repo_id: str):
        self._repo(repo_id, write=True)
        data = self.json()
        objects = []
        for obj in data["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.hub.root / "lfs" / obj["oid"]).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}?sig={self._signature(obj['oid'])}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}"}}
            objects.append(item)
        raise Reply(200, {"transfer": "basic", "objects": objects},
                    {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str):
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self._signature(oid)):
            raise Reply(403, {"error": "bad signature"})
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise Reply(400, {"error": "content does not match the oid"})
        (self.hub.root / "lfs" / oid).write_bytes(self.body)
        return {}

    def _commit(self, repo_id: str, revision: str):
        repo = self._repo(repo_id, write=True)
        if "create_pr" in self.query:
            raise Reply(400, {"error": "the fake hub supports PRs through /discussions only"})
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        self.hub.commit_bodies.append(lines)
        header = lines[0]["value"]
        if self.hub.before_commit is not None:
            hook, self.hub.before_commit = self.hub.before_commit, None
            hook(repo)
        head = self.hub._resolve(repo, revision)
        parent = header.get("parentCommit")
        if parent and not head.startswith(parent):
            raise Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
        tree = dict(repo.commits[head]["tree"])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = self.hub._store_blob(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                if not (self.hub.root / "lfs" / value["oid"]).exists():
                    raise Reply(422, {"error": f"LFS object {value['oid']} of {value['path']} is not stored"})
                pointer = lfs_pointer(value["oid"], value["size"])
                tree[value["path"]] = {"oid": blob_sha1(pointer), "size": value["size"], "lfs": value["oid"]}
            elif key == "deletedFile":
                if value["path"] not in tree:
                    raise Reply(404, {"error": "A file with this name doesn't exist"},
                                {"X-Error-Code": "EntryNotFound"})
                del tree[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
            else:
                raise Reply(400, {"error": f"unknown line {key}"})
        branch = revision if revision in repo.branches else None
        if branch is None:
            raise Reply(400, {"error": "can only commit to a branch"})
        sha = self.hub._new_commit(repo, branch, tree, header["summary"], header.get("description", ""))
        return {"commitOid": sha, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "success": True,
                "pullRequestUrl": None}
