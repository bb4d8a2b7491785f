"""A local fake of the Hugging Face Hub HTTP API: the parts huggingface_hub 2.4.0 calls for `model_info` and
`hf_hub_download`. Point the library at it with `endpoint=hub.url`, or HF_ENDPOINT=hub.url in a subprocess
(huggingface_hub reads HF_ENDPOINT once, at import).

Served (repo ids are "owner/name"; a revision is "main" or the repo's commit sha, anything else is RevisionNotFound):
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  model_info JSON: id, sha, siblings (size, blobId, lfs only
       with blobs=true, as on the Hub), gated, tags, library_name
  GET  /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree JSON (one page, no Link header)
  HEAD /{repo}/resolve/{rev}/{filename}  200, no redirect: X-Repo-Commit, ETag (git blob sha1; for .gguf files, which
       are LFS, their sha256), X-Linked-Etag and X-Linked-Size for LFS, Content-Length; never an X-Xet-* header
  GET  /{repo}/resolve/{rev}/{filename}  the bytes; `Range: bytes=N-` or `bytes=N-M` gives 206 and Content-Range
Errors as the Hub sends them (huggingface_hub maps the X-Error-Code header to its exceptions):
  404 RepoNotFound -> RepositoryNotFoundError, 404 EntryNotFound -> RemoteEntryNotFoundError (an EntryNotFoundError),
  404 RevisionNotFound -> RevisionNotFoundError, 401 GatedRepo on any file of a gated repo -> GatedRepoError (a subclass
  of RepositoryNotFoundError). A gated repo's model_info succeeds and says gated="manual", as on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes
    lfs: bool
    sha256: str = field(init=False)
    pointer: bytes = field(init=False)  # the git-lfs pointer git stores in place of an LFS file
    wrong: bytes | None = None  # served by GET instead of `data` (serve_wrong_bytes)
    cut_after: int | None = None  # the next plain GET stops after this many bytes (cut_after)
    stall: tuple[int, threading.Event] | None = None  # the next plain GET stalls after this many bytes (stall_after)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                        f"size {len(self.data)}\n").encode()

    @property
    def blob_id(self) -> str:
        return _git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    sha: str
    files: dict[str, _File]
    gated: bool
    token: str | None = None  # the HF_TOKEN that opens a gated repo


class FakeHub:
    """A Hub on 127.0.0.1 serving the repos added with add_repo.

    `requests` records every request as (method, path with query, headers with lowercased names), e.g.
    `[h.get("range") for m, p, h in hub.requests if m == "GET"]`.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False, token: str | None = None) -> str:
        """Adds (or replaces) a repo and returns its commit sha. .gguf files are LFS, the others plain git files.
        A gated repo's files are served to a request with `Authorization: Bearer <token>` only."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(b"\0%s\0%s" % (name.encode(), hashlib.sha256(files[name]).digest()))
        sha = digest.hexdigest()
        with self._lock:
            self._repos[repo_id] = _Repo(sha, {n: _File(d, n.endswith(".gguf")) for n, d in files.items()}, gated,
                                         token)
        return sha

    def serve_wrong_bytes(self, repo_id: str, filename: str, data: bytes) -> None:
        """GET returns `data` while the listing and ETag keep the original sha256 and size: a checksum mismatch
        (or, with another length, a download that does not end where the listing says)."""
        self._repos[repo_id].files[filename].wrong = data

    def cut_after(self, repo_id: str, filename: str, nbytes: int) -> None:
        """The next GET of the file without a Range header sends its first nbytes, then closes the connection.

        hf_hub_download retries by itself (after 1 s) with `Range: bytes=K-`, K being what it wrote to disk: a multiple
        of huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE (10 MiB; it buffers whole chunks). Below that K is 0 and the
        retry is a plain GET of the whole file; patch the constant down, or cut a file past 10 MiB, to see a Range.
        """
        self._repos[repo_id].files[filename].cut_after = nbytes

    def stall_after(self, repo_id: str, filename: str, nbytes: int) -> threading.Event:
        """The next GET of the file without a Range header sends its first nbytes, then waits (at most 60 s) until the
        returned event is set, and closes the connection: a download in progress that a user interrupts."""
        release = threading.Event()
        self._repos[repo_id].files[filename].stall = (nbytes, release)
        return release

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _model_info(self, repo_id: str, repo: _Repo, blobs: bool) -> dict[str, Any]:
        siblings = []
        for name, f in repo.files.items():
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        has_gguf = any(f.lfs for f in repo.files.values())
        return {"_id": repo.sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": repo.sha, "lastModified": "2024-01-01T00:00:00.000Z", "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": ["gguf"] if has_gguf else [], "library_name": "gguf" if has_gguf else None,
                "siblings": siblings}

    @staticmethod
    def _tree_entry(name: str, f: _File) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": name}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
        return entry


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response below carries a Content-Length

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

        def _route(self) -> None:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            url = urlsplit(self.path)
            path = unquote(url.path)
            if m := _API.match(url.path):  # match before unquoting: a revision is quoted with safe=""
                kind, rev = m[2], unquote(m[3]) if m[3] else "main"
                repo = self._repo(unquote(m[1]), rev)
                if repo is None:
                    return
                if kind == "tree":
                    prefix = unquote(m[4]).rstrip("/") + "/" if m[4] else ""
                    return self._json(200, [hub._tree_entry(n, f) for n, f in repo.files.items()
                                            if n.startswith(prefix)])
                blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"
                return self._json(200, hub._model_info(unquote(m[1]), repo, blobs))
            if m := _RESOLVE.match(url.path):
                repo = self._repo(unquote(m[1]), unquote(m[2]))
                if repo is not None:
                    self._resolve(repo, unquote(m[3]))
                return
            self._error(404, "", f"{path} not found")

        def _repo(self, repo_id: str, rev: str) -> _Repo | None:
            """The repo at that revision, or None after sending the Hub's error."""
            repo = hub._repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif rev not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, repo.sha)
            else:
                return repo
            return None

        def _resolve(self, repo: _Repo, filename: str) -> None:
            f = repo.files.get(filename)
            if repo.gated and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(401, "GatedRepo", "Access to this model is restricted. You must have access.")
            if f is None:
                return self._error(404, "EntryNotFound", "Entry not found", repo.sha)
            body = f.wrong if f.wrong is not None else f.data
            size = len(body)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if f.lfs:
                headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(size)})
            status, start, end = 200, 0, size
            range_header = self.headers.get("Range")
            if self.command == "GET" and range_header:
                r = _RANGE.match(range_header.strip())
                if r is None or int(r[1]) >= size:
                    self._send(416, {"Content-Range": f"bytes */{size}", **headers}, b"")
                    return
                start, end = int(r[1]), min(int(r[2]) + 1 if r[2] else size, size)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            cut, stall = None, None
            if self.command == "GET" and not range_header and f.cut_after is not None:
                cut, f.cut_after = f.cut_after, None
            if self.command == "GET" and not range_header and f.stall is not None:
                (cut, stall), f.stall = f.stall, None
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut is not None:  # announce the whole file, send part of it, close: the client sees a cut connection
                self.wfile.write(body[:cut])
                self.wfile.flush()
                if stall is not None:
                    stall.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body[start:end])

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), "application/json")

        def _json(self, status: int, obj: object) -> None:
            self._send(status, {}, json.dumps(obj).encode(), "application/json")

        def _send(self, status: int, headers: dict[str, str], body: bytes, ctype: str | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def tiny_gguf(name: str = "tiny", *, extra_bytes: int = 0) -> bytes:
    """A small valid GGUF file (llama architecture, 8 tokens, one 8x8 F32 tensor) that read_header accepts.

    It cannot run: the tensors are not a model. `extra_bytes` adds an int8 tensor of that many elements, so the file
    is big enough to cut mid-way, and a truncated copy fails read_header as a truncated real model does.
    """
    import numpy as np
    from gguf import GGUFWriter

    tokens = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        w = GGUFWriter(str(path), "llama")
        w.add_name(name)
        w.add_file_type(0)  # all F32
        w.add_context_length(256)
        w.add_block_count(1)
        w.add_embedding_length(8)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_head_count_kv(2)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
        if extra_bytes > 0:
            w.add_tensor("padding", np.full(extra_bytes, 7, dtype=np.int8))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()
