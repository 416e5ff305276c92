"""An in-process stand-in for Label Studio's API (the routes backend/ls_client.py uses).

Shapes follow Label Studio 1.23.2 as observed: `GET /api/tasks/` answers `{"total", "tasks": [...]}`
with each task's predictions (fields=all), honours `query` (selectedItems, a total_annotations
filter) and answers 404 "Invalid page." past the last page; `POST /api/projects/{id}/import/predictions`
answers `{"created": n}`; Data Manager tabs are kept (`GET/POST /api/dm/views/`, `PATCH /api/dm/views/<id>/`). Used by the unit tests and by bench/bench_prelabel.py.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


TOKEN = "legacy-token-0123456789"   # the legacy token FakeLabelStudio accepts unless told otherwise


class FakeLabelStudio:
    def __init__(self, token: str = TOKEN, label_config: str = ""):
        self.token = token
        self.label_config = label_config
        self.tasks: dict[int, dict] = {}                 # id -> {"id", "data", "annotations"}
        self.predictions: list[dict] = []
        self.requests: list[tuple[str, str]] = []        # (method, path)
        self.fail_prediction_posts_for: set[int] = set()   # task ids whose upload answers 500
        self.files: dict[str, tuple[bytes, str]] = {}      # /data/upload/... path -> (bytes, content type)
        self.refresh_token: str | None = None               # a personal access token it accepts
        self.access_tokens: set[str] = set()                 # access tokens it handed out and still accepts
        self.after_list: list = []                           # hooks called (lock held) after each task page
        self.views: dict[int, dict] = {}                     # Data Manager tabs: id -> {"id", "project", "data"}
        self.ignore_id_filter = False                         # behave like a Label Studio without the id filter
        self.unavailable = False                             # True: every call answers 503 (a proxy, LS down)
        self.lock = threading.RLock()   # re-entrant: after_list hooks run with it held
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner._handle(self, "GET")

            def do_POST(self):
                owner._handle(self, "POST")

            def do_PATCH(self):
                owner._handle(self, "PATCH")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state ------------------------------------------------------------------------------

    def add_tasks(self, datas: list[dict], annotated: set[int] | None = None) -> list[int]:
        ids = []
        with self.lock:
            for data in datas:
                tid = len(self.tasks) + 1
                self.tasks[tid] = {"id": tid, "data": data, "project": 1,
                                   "annotations": [{"id": tid, "result": []}] if annotated and tid in annotated
                                   else []}
                ids.append(tid)
        return ids

    def annotate(self, task_ids) -> None:
        """Give these tasks an annotation (an annotator at work). Call with the lock held or not."""
        for tid in task_ids:
            self.tasks[tid]["annotations"] = [{"id": 10_000 + tid, "result": []}]

    def add_file(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve `data` as an upload; returns the task data URL (`/data/upload/1/<name>`)."""
        path = f"/data/upload/1/{name}"
        self.files[path] = (data, content_type)
        return path

    def predictions_of(self, task: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == task]

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def _store(self, body: dict) -> dict:
        prediction = {"id": len(self.predictions) + 1, "task": int(body["task"]), "result": body.get("result"),
                      "score": body.get("score"), "model_version": body.get("model_version"), "project": 1}
        self.predictions.append(prediction)
        return prediction

    def _task_view(self, task: dict) -> dict:
        preds = [p for p in self.predictions if p["task"] == task["id"]]
        return {**task, "predictions": preds, "total_annotations": len(task["annotations"]),
                "total_predictions": len(preds)}

    # -- HTTP --------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append((method, parts.path))
        if self.unavailable:
            return self._reply(handler, 503, {"detail": "Service Unavailable"})
        if method == "POST" and parts.path == "/api/token/refresh/" and self.refresh_token:
            length = int(handler.headers.get("Content-Length") or 0)
            sent = json.loads(handler.rfile.read(length) or b"{}").get("refresh")
            if sent != self.refresh_token:
                return self._reply(handler, 401, {"detail": "Token is invalid"})
            import base64
            claims = base64.urlsafe_b64encode(json.dumps(
                {"token_type": "access", "exp": 4102444800, "n": len(self.access_tokens)}).encode()).decode().rstrip("=")
            header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=")
            access = f"{header}.{claims}.sig"
            with self.lock:
                self.access_tokens.add(access)
            return self._reply(handler, 200, {"access": access})
        auth = handler.headers.get("Authorization") or ""
        if auth != f"Token {self.token}" and not (auth.startswith("Bearer ") and auth[7:] in self.access_tokens):
            return self._reply(handler, 401, {"detail": "Authentication credentials were not provided."})
        if method == "GET" and parts.path in self.files:
            data, content_type = self.files[parts.path]
            handler.send_response(200)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        path = parts.path
        with self.lock:
            if method == "GET" and (m := re.fullmatch(r"/api/projects/(\d+)/", path)):
                return self._reply(handler, 200, {
                    "id": int(m.group(1)), "label_config": self.label_config, "task_number": len(self.tasks),
                    "num_tasks_with_annotations": sum(1 for t in self.tasks.values() if t["annotations"])})
            if method == "GET" and path == "/api/tasks/":
                return self._list_tasks(handler, query)
            if method == "GET" and path == "/api/predictions/":
                task = int(query["task"]) if "task" in query else None
                return self._reply(handler, 200, [p for p in self.predictions if task is None or p["task"] == task])
            if method == "POST" and path == "/api/predictions/":
                if int(body["task"]) in self.fail_prediction_posts_for:
                    return self._reply(handler, 500, {"detail": "boom"})
                return self._reply(handler, 201, self._store(body))
            if method == "POST" and re.fullmatch(r"/api/projects/(\d+)/import/predictions", path):
                if any(int(p["task"]) in self.fail_prediction_posts_for for p in body):
                    return self._reply(handler, 500, {"detail": "boom"})
                for p in body:
                    self._store(p)
                return self._reply(handler, 201, {"created": len(body)})
            if path == "/api/dm/views/" and method in ("GET", "POST"):
                if method == "GET":
                    project = int(query["project"]) if "project" in query else None
                    return self._reply(handler, 200, [v for v in self.views.values()
                                                      if project is None or v["project"] == project])
                view = {"id": max(self.views, default=0) + 1, "project": int(body["project"]),
                        "data": dict(body.get("data") or {})}
                self.views[view["id"]] = view
                return self._reply(handler, 201, view)
            if method == "PATCH" and (m := re.fullmatch(r"/api/dm/views/(\d+)/", path)):
                view = self.views.get(int(m.group(1)))
                if view is None:
                    return self._reply(handler, 404, {"detail": "Not found."})
                view["data"] = dict(body.get("data") or {})
                return self._reply(handler, 200, view)
        return self._reply(handler, 404, {"detail": "Not found."})

    def _list_tasks(self, handler, query: dict) -> None:
        q = json.loads(query.get("query") or "{}")
        tasks = sorted(self.tasks.values(), key=lambda t: t["id"])
        selected = q.get("selectedItems")
        if selected and not selected.get("all"):
            wanted = set(selected.get("included") or ())
            tasks = [t for t in tasks if t["id"] in wanted]
        for item in (q.get("filters") or {}).get("items", ()):
            if item["filter"] == "filter:tasks:total_annotations" and item["operator"] == "equal":
                tasks = [t for t in tasks if len(t["annotations"]) == item["value"]]
            elif item["filter"] == "filter:tasks:id" and not self.ignore_id_filter:
                compare = {"greater": lambda a, b: a > b, "less_or_equal": lambda a, b: a <= b}[item["operator"]]
                tasks = [t for t in tasks if compare(t["id"], float(item["value"]))]
        if (q.get("ordering") or [""])[0].startswith("-"):
            tasks.reverse()
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        chunk = tasks[(page - 1) * size: page * size]
        if page > 1 and not chunk:
            return self._reply(handler, 404, {"detail": "Invalid page.", "status_code": 404})
        self._reply(handler, 200, {"total": len(tasks), "tasks": [self._task_view(t) for t in chunk]})
        for hook in list(self.after_list):   # e.g. an annotator labelling tasks between two pages
            hook(self)

    @staticmethod
    def _reply(handler, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
