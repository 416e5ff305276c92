"""Label Studio's API, in one place: tokens, tasks, annotations, predictions.

`LabelStudioClient` talks to one Label Studio (its URL and key) with plain `requests`, on the
routes and paging conventions label-studio-sdk 2.1.2 uses (`GET /api/tasks/?project=&page=&page_size=`,
`GET/POST /api/predictions/`, `POST /api/projects/{id}/import/predictions`, `POST /api/token/refresh/`).
Its own transport keeps the rules of the rest of the backend: the key goes only to that URL's
origin, redirects are not followed, every call has a time limit, and errors say what to fix.

Tokens: a legacy token is sent as `Authorization: Token <t>`; a personal access token (a JWT
refresh token) is exchanged at `POST <LS>/api/token/refresh/` for a short-lived access token sent
as `Authorization: Bearer <access>`. `LabelStudioCredentials` does that exchange and caches the
result; the image fetcher (backend/images.py) uses it too, through its own guarded transport.

Typical use::

    client = LabelStudioClient.from_settings(settings)            # LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY
    for task in client.iter_tasks(project=3, only_unlabeled=True):   # one page (100 tasks) at a time
        ...
    client.create_predictions(project=3, predictions=[{"task": 1, "result": [...], "score": 0.8,
                                                       "model_version": "gem-..."}])
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests

logger = logging.getLogger(__name__)

# Renew a personal-access-token's access token this long before it expires (LS gives 300 s).
ACCESS_TOKEN_MARGIN_S = 30.0
ACCESS_TOKEN_FALLBACK_LIFETIME_S = 240.0
DEFAULT_PAGE_SIZE = 100


class LabelStudioError(Exception):
    """A Label Studio API call failed; `reason` is a short label (auth, http_4xx, connection, ...)."""

    def __init__(self, message: str, reason: str = "api", status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class LabelStudioAccess:
    url: str                    # base URL without trailing slash, "" when unknown
    token: str                  # legacy token or personal access token, "" when unknown


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports filled in: the unit of trust for the LS token."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def redact(url: str, keep_query: bool = False) -> str:
    """URL for logs and error messages: no credentials, and no query (signatures live there)."""
    if url.startswith("data:"):
        return "data:..."
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return "<malformed URL>"
    path = parts.path if len(parts.path) <= 200 else parts.path[:200] + "..."
    return urlunsplit((parts.scheme, netloc, path, parts.query if keep_query else "", ""))


def _b64url_json(segment: str) -> dict | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def jwt_claims(token: str) -> dict | None:
    """Claims of a JWT-shaped token (no signature check: we only need its type and expiry)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    header = _b64url_json(parts[0])
    if header is None or "alg" not in header:
        return None
    return _b64url_json(parts[1]) or {}


# send(method, url, deadline, access, **requests_kwargs) -> requests.Response; raises the caller's errors.
Send = Callable[..., requests.Response]
# error(message, reason) -> the exception the caller raises (ImageFetchError for images, LabelStudioError here).
ErrorFactory = Callable[[str, str], Exception]


def request_access_token(access: LabelStudioAccess, deadline: float, send: Send,
                         error: ErrorFactory = LabelStudioError) -> str:
    """Exchange a personal access token for an access token at `POST <LS>/api/token/refresh/`."""
    if not access.url:
        raise error("a personal access token needs LABEL_STUDIO_URL to be refreshed", "config")
    url = access.url + "/api/token/refresh/"
    response = send("POST", url, deadline, access, json={"refresh": access.token})
    try:
        if response.status_code != 200:
            raise error(f"Label Studio refused the personal access token (HTTP {response.status_code} from "
                        f"{redact(url)}); check LABEL_STUDIO_API_KEY", "auth")
        try:
            new_access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise error(f"unexpected answer from {redact(url)}: no access token", "auth") from None
        if not isinstance(new_access, str) or not new_access:
            raise error(f"unexpected answer from {redact(url)}: no access token", "auth")
        return new_access
    finally:
        response.close()


class LabelStudioCredentials:
    """Turns a configured token into the Authorization header value, refreshing PAT access tokens.

    The refresh is a network call, so it never runs under the lock that guards the cache: a slow
    Label Studio then delays only the requests that need that very token, and only until their
    own deadline. One lock per token makes concurrent requests wait for one refresh, not start many.
    `refresh(access, deadline) -> access token` makes the call (each caller brings its transport);
    `error(message, reason)` builds the exception raised when waiting times out.
    """

    MAX_TOKENS = 256   # cached access tokens (tokens may come from an open /setup: stay bounded)

    def __init__(self):
        self._lock = threading.Lock()   # guards the two dicts below; held for dict operations only
        self._access: dict[tuple[str, str], tuple[str, float]] = {}   # (LS url, PAT) -> (access, expires at)
        self._refreshing: dict[tuple[str, str], threading.Lock] = {}  # (LS url, PAT) -> its refresh lock

    @staticmethod
    def is_personal_access_token(token: str) -> bool:
        claims = jwt_claims(token)
        return claims is not None and claims.get("token_type", "refresh") == "refresh"

    def header(self, access: LabelStudioAccess, deadline: float,
               refresh: Callable[[LabelStudioAccess, float], str],
               error: ErrorFactory = LabelStudioError) -> str | None:
        token = access.token
        if not token:
            return None
        claims = jwt_claims(token)
        if claims is None:
            return f"Token {token}"
        if claims.get("token_type") == "access":  # someone passed an access token itself
            return f"Bearer {token}"
        key = (access.url, token)
        with self._lock:
            cached = self._cached(key)
            if cached:
                return cached
            refresh_lock = self._refreshing.get(key)
            if refresh_lock is None:
                refresh_lock = self._refreshing[key] = threading.Lock()
                self._bound(self._refreshing, keep=lambda lock: lock.locked())
        if not refresh_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise error(f"timed out waiting for Label Studio to renew the access token ({redact(access.url)})",
                        "timeout")
        try:
            with self._lock:   # another request may have renewed it while this one waited
                cached = self._cached(key)
            if cached:
                return cached
            new_access = refresh(access, deadline)
            exp = (jwt_claims(new_access) or {}).get("exp")
            expires = (float(exp) if isinstance(exp, (int, float)) else time.time() + ACCESS_TOKEN_FALLBACK_LIFETIME_S)
            with self._lock:
                self._access[key] = (new_access, expires - ACCESS_TOKEN_MARGIN_S)
                self._bound(self._access)
            return f"Bearer {new_access}"
        finally:
            refresh_lock.release()

    def invalidate(self, access: LabelStudioAccess, header: str | None) -> None:
        """Forget the cached access token `header` carried (Label Studio refused it), unless
        another request has renewed it since: the next header() then refreshes once."""
        with self._lock:
            key = (access.url, access.token)
            cached = self._access.get(key)
            if cached and header == f"Bearer {cached[0]}":
                del self._access[key]

    def _cached(self, key: tuple[str, str]) -> str | None:
        cached = self._access.get(key)
        return f"Bearer {cached[0]}" if cached and cached[1] > time.time() else None

    def _bound(self, table: dict, keep=lambda value: False) -> None:
        for old in list(table)[:max(0, len(table) - self.MAX_TOKENS)]:
            if not keep(table[old]):
                del table[old]


def _no_auth(request):
    return request


class LabelStudioClient:
    """One Label Studio's API: tasks (streamed page by page), annotations, predictions, tokens.

    Thread-safe (one requests.Session, one credentials cache). `timeout` bounds each call.
    Raises `LabelStudioError` with a message that says what to fix.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0, session: requests.Session | None = None,
                 credentials: LabelStudioCredentials | None = None):
        url = (url or "").strip().rstrip("/")
        if not url:
            raise LabelStudioError("Label Studio's address is not set: set LABEL_STUDIO_URL", reason="config")
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"LABEL_STUDIO_URL must start with http:// or https://, got {redact(url)}",
                                   reason="config")
        if not token:
            raise LabelStudioError("no Label Studio key: set LABEL_STUDIO_API_KEY (a personal access token or "
                                   "legacy token, from Label Studio's Account & Settings)", reason="config")
        self.access = LabelStudioAccess(url=url, token=token)
        self.url = url
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.trust_env = False        # no proxies or ~/.netrc credentials from the environment
        self.credentials = credentials or LabelStudioCredentials()

    @classmethod
    def from_settings(cls, settings: Any, timeout: float | None = None) -> "LabelStudioClient":
        """Client for LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY; LabelStudioError(reason="config") if unset."""
        return cls(settings.label_studio_url, settings.label_studio_api_key,
                   timeout=timeout or max(30.0, float(getattr(settings, "fetch_timeout", 30.0))))

    # -- transport ----------------------------------------------------------------------------

    def _send(self, method: str, url: str, deadline: float, access: LabelStudioAccess,
              **kwargs: Any) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LabelStudioError(f"timed out calling {redact(url)}", reason="timeout")
        if origin(url) != origin(self.url):   # the key never leaves Label Studio's origin
            raise LabelStudioError(f"refusing to call {redact(url)}: not {redact(self.url)}", reason="blocked")
        try:
            return self.session.request(method, url, timeout=(min(10.0, remaining), remaining),
                                        allow_redirects=False, auth=_no_auth, **kwargs)
        except requests.Timeout:
            raise LabelStudioError(f"timed out calling {redact(url)} after {self.timeout:g} s",
                                   reason="timeout") from None
        except requests.ConnectionError as exc:
            raise LabelStudioError(f"cannot connect to Label Studio at {redact(self.url)} "
                                   f"({type(exc).__name__}); check LABEL_STUDIO_URL", reason="connection") from None
        except requests.RequestException as exc:
            raise LabelStudioError(f"request to {redact(url)} failed: {type(exc).__name__}",
                                   reason="connection") from None

    def auth_header(self, deadline: float | None = None) -> str | None:
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout
        return self.credentials.header(
            self.access, deadline,
            refresh=lambda access, dl: request_access_token(access, dl, self._send))

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json_body: Any = None, ok: Sequence[int] = (200, 201, 204)) -> Any:
        """Call `<LS>/<path>` with the key; the decoded JSON answer (None when empty)."""
        url = f"{self.url}/{path.lstrip('/')}"
        deadline = time.monotonic() + self.timeout
        refreshed = False
        while True:
            header = self.auth_header(deadline)
            headers = {"Accept": "application/json"}
            if header:
                headers["Authorization"] = header
            response = self._send(method, url, deadline, self.access, params=params, json=json_body,
                                  headers=headers)
            try:
                if (response.status_code == 401 and not refreshed
                        and LabelStudioCredentials.is_personal_access_token(self.access.token)):
                    refreshed = True           # the cached access token may have been revoked: renew once
                    self.credentials.invalidate(self.access, header)
                    continue
                if response.status_code not in ok:
                    raise self._error(response, method, url)
                if not response.content:
                    return None
                try:
                    return response.json()
                except ValueError:
                    raise LabelStudioError(f"{method} {redact(url)} answered {response.status_code} with something "
                                           "that is not JSON (is LABEL_STUDIO_URL Label Studio?)",
                                           reason="api", status=response.status_code) from None
            finally:
                response.close()

    def _error(self, response: requests.Response, method: str, url: str) -> LabelStudioError:
        status = response.status_code
        try:
            detail = response.json()
            detail = detail.get("detail") or detail.get("validation_errors") or detail if isinstance(detail, dict) \
                else detail
        except ValueError:
            detail = response.text[:200]
        hint = ""
        if status in (401, 403):
            hint = (" (check LABEL_STUDIO_API_KEY: legacy tokens must be enabled in Label Studio's organization "
                    "settings, or use a personal access token)")
        elif 300 <= status < 400:
            hint = f" (redirected to {redact(response.headers.get('Location', ''))}: check LABEL_STUDIO_URL)"
        return LabelStudioError(f"{method} {redact(url)}: HTTP {status}: {str(detail)[:300]}{hint}",
                                reason="auth" if status in (401, 403) else f"http_{status // 100}xx", status=status)

    # -- projects and tasks ----------------------------------------------------------------------

    def get_project(self, project: int) -> dict:
        """The project (`label_config`, `title`, `task_number`, ...)."""
        return self.request("GET", f"api/projects/{int(project)}/")

    def get_task(self, task: int) -> dict:
        return self.request("GET", f"api/tasks/{int(task)}/")

    def iter_tasks(self, project: int, *, page_size: int = DEFAULT_PAGE_SIZE, only_unlabeled: bool = False,
                   task_ids: Iterable[int] | None = None, fields: str = "all") -> Iterator[dict]:
        """Yield the project's tasks in id order, fetching one page at a time (memory: one page).

        `fields="all"` includes each task's annotations and predictions (needed to skip tasks
        already predicted). `only_unlabeled`: tasks without annotations. `task_ids`: only these.
        """
        page = 1
        while True:
            tasks, more = self.tasks_page(project, page, page_size=page_size, only_unlabeled=only_unlabeled,
                                          task_ids=task_ids, fields=fields)
            yield from tasks
            if not more:
                return
            page += 1

    def tasks_page(self, project: int, page: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                   only_unlabeled: bool = False, task_ids: Iterable[int] | None = None,
                   fields: str = "all") -> tuple[list[dict], bool]:
        """Page `page` (from 1) of what `iter_tasks` yields, and whether more pages may follow.

        Pages can be read in any order and in parallel (`python -m backend.prelabel --ray` does).
        """
        query: dict[str, Any] = {"ordering": ["tasks:id"]}
        ids = None if task_ids is None else sorted({int(t) for t in task_ids})
        if ids is not None:
            if not ids:
                return [], False
            query["selectedItems"] = {"all": False, "included": ids}
        if only_unlabeled:
            query["filters"] = {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]}
        try:
            answer = self.request("GET", "api/tasks/", params={
                "project": int(project), "page": page, "page_size": page_size, "fields": fields,
                "query": json.dumps(query)})
        except LabelStudioError as exc:
            if exc.status == 404 and page > 1:   # past the last page
                return [], False
            raise
        tasks = answer.get("tasks", answer.get("results")) if isinstance(answer, dict) else answer
        if not isinstance(tasks, list):
            raise LabelStudioError(f"unexpected answer listing tasks of project {project}", reason="api")
        wanted = set(ids) if ids is not None else None
        # Filters are checked here too: an older Label Studio may ignore the query.
        kept = [task for task in tasks
                if (wanted is None or task.get("id") in wanted)
                and not (only_unlabeled and (task.get("total_annotations") or task.get("annotations")))]
        return kept, len(tasks) >= page_size

    def tasks_after(self, project: int, after_id: int = 0, *, upto_id: int | None = None,
                    page_size: int = DEFAULT_PAGE_SIZE, only_unlabeled: bool = False,
                    task_ids: Iterable[int] | None = None, fields: str = "all") -> tuple[list[dict], int | None]:
        """Up to `page_size` tasks with `after_id < id <= upto_id` in id order, and the id to ask
        after next (None: no more).

        Paging by a key, not by page number: a task that leaves or joins the filtered list
        meanwhile (labelled during an `only_unlabeled` run, imported) moves no other task from
        one page to another, so none is skipped or listed twice. Uses Label Studio's task
        filter `filter:tasks:id` (operators `greater` / `less_or_equal`, Data Manager filters,
        which `GET /api/tasks/` honours in 1.23).
        """
        ids = None if task_ids is None else sorted({int(t) for t in task_ids})
        if ids is not None and not ids:
            return [], None
        items = [{"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(after_id)}]
        if upto_id is not None:
            items.append({"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number",
                          "value": int(upto_id)})
        tasks = self._query_tasks(project, items, page_size=page_size, only_unlabeled=only_unlabeled, ids=ids,
                                  fields=fields)
        listed = [t.get("id") for t in tasks if isinstance(t.get("id"), int)]
        beyond = [i for i in listed if i > after_id and (upto_id is None or i <= upto_id)]
        if listed and not beyond:
            # The filter was ignored (a Label Studio without it): asking again would loop forever.
            raise LabelStudioError(f"Label Studio ignored the task id filter listing project {project}; "
                                   "it needs a version that filters tasks by id (1.23 does)", reason="api")
        wanted = set(ids) if ids is not None else None
        # Filters are checked here too, as in tasks_page.
        kept = [task for task in tasks if task.get("id") in beyond
                and (wanted is None or task.get("id") in wanted)
                and not (only_unlabeled and (task.get("total_annotations") or task.get("annotations")))]
        kept.sort(key=lambda t: t["id"])
        return kept, (max(beyond) if len(tasks) >= page_size else None)

    def iter_tasks_by_id(self, project: int, *, after_id: int = 0, upto_id: int | None = None,
                         page_size: int = DEFAULT_PAGE_SIZE, only_unlabeled: bool = False,
                         task_ids: Iterable[int] | None = None, fields: str = "all") -> Iterator[dict]:
        """Like `iter_tasks`, paged by task id (`tasks_after`): stable while tasks are labelled or
        imported during the walk. Tasks imported meanwhile with a higher id are listed too."""
        ids = None if task_ids is None else sorted({int(t) for t in task_ids})
        after: int | None = after_id
        while after is not None:
            tasks, after = self.tasks_after(project, after, upto_id=upto_id, page_size=page_size,
                                            only_unlabeled=only_unlabeled, task_ids=ids, fields=fields)
            yield from tasks

    def task_id_range(self, project: int, *, only_unlabeled: bool = False,
                      task_ids: Iterable[int] | None = None) -> tuple[int, int] | None:
        """(lowest, highest) id of the tasks `iter_tasks_by_id` would list now; None when there are none."""
        ids = None if task_ids is None else sorted({int(t) for t in task_ids})
        if ids is not None and not ids:
            return None
        ends = []
        for ordering in ("tasks:id", "-tasks:id"):
            tasks = self._query_tasks(project, [], page_size=1, only_unlabeled=only_unlabeled, ids=ids,
                                      fields="task_only", ordering=ordering)
            if not tasks or not isinstance(tasks[0].get("id"), int):
                return None
            ends.append(tasks[0]["id"])
        return min(ends), max(ends)

    def _query_tasks(self, project: int, items: list[dict], *, page_size: int, only_unlabeled: bool,
                     ids: list[int] | None, fields: str, ordering: str = "tasks:id") -> list[dict]:
        """The first page of the project's tasks under Data Manager filter `items` (and'ed)."""
        items = list(items)
        query: dict[str, Any] = {"ordering": [ordering]}
        if ids is not None:
            query["selectedItems"] = {"all": False, "included": ids}
        if only_unlabeled:
            items.append({"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number",
                          "value": 0})
        if items:
            query["filters"] = {"conjunction": "and", "items": items}
        answer = self.request("GET", "api/tasks/", params={
            "project": int(project), "page": 1, "page_size": page_size, "fields": fields,
            "query": json.dumps(query)})
        tasks = answer.get("tasks", answer.get("results")) if isinstance(answer, dict) else answer
        if not isinstance(tasks, list):
            raise LabelStudioError(f"unexpected answer listing tasks of project {project}", reason="api")
        return [t for t in tasks if isinstance(t, Mapping)]

    def count_tasks(self, project: int, only_unlabeled: bool = False) -> int | None:
        """How many tasks `iter_tasks` would consider (None when Label Studio does not say)."""
        project_info = self.get_project(project)
        if only_unlabeled:
            total, done = project_info.get("task_number"), project_info.get("num_tasks_with_annotations")
            return total - done if isinstance(total, int) and isinstance(done, int) else None
        total = project_info.get("task_number")
        return total if isinstance(total, int) else None

    # -- Data Manager views (tabs) ----------------------------------------------------------------

    def list_views(self, project: int) -> list[dict]:
        """The project's Data Manager tabs (`GET /api/dm/views/?project=`): each `id`, `data` (its
        `title`, `filters`, `ordering`, ...)."""
        answer = self.request("GET", "api/dm/views/", params={"project": int(project)})
        views = answer if isinstance(answer, list) else (answer or {}).get("results", [])
        return [v for v in views if isinstance(v, Mapping)]

    def save_view(self, project: int, data: Mapping[str, Any], view_id: int | None = None) -> dict:
        """Create a tab (`POST /api/dm/views/`) or replace one's `data` (`PATCH /api/dm/views/<id>/`).
        `data` as the Data Manager keeps it: `title`, `filters` ({conjunction, items}), `ordering`, ..."""
        body = {"project": int(project), "data": dict(data)}
        if view_id is None:
            return self.request("POST", "api/dm/views/", json_body=body)
        return self.request("PATCH", f"api/dm/views/{int(view_id)}/", json_body=body)

    # -- annotations and predictions -------------------------------------------------------------

    def get_annotation(self, annotation: int) -> dict:
        return self.request("GET", f"api/annotations/{int(annotation)}/")

    def get_prediction(self, prediction: int) -> dict:
        return self.request("GET", f"api/predictions/{int(prediction)}/")

    def list_annotations(self, task: int) -> list[dict]:
        return self.request("GET", f"api/tasks/{int(task)}/annotations/") or []

    def list_predictions(self, task: int | None = None, project: int | None = None) -> list[dict]:
        params = {k: v for k, v in (("task", task), ("project", project)) if v is not None}
        answer = self.request("GET", "api/predictions/", params=params)
        return answer if isinstance(answer, list) else (answer or {}).get("results", [])

    def has_prediction(self, task: int, model_version: str) -> bool:
        """True when the task already holds a prediction of `model_version` (asks Label Studio now)."""
        return any(p.get("model_version") == model_version for p in self.list_predictions(task=task)
                   if isinstance(p, Mapping))

    def create_prediction(self, task: int, result: list, score: float, model_version: str) -> dict:
        return self.request("POST", "api/predictions/", json_body={
            "task": int(task), "result": result, "score": score, "model_version": model_version})

    def create_predictions(self, project: int, predictions: Sequence[Mapping[str, Any]],
                           chunk: int = 100) -> int:
        """Store many predictions (`task`, `result`, `score`, `model_version` each), `chunk` per call.

        Uses `POST /api/projects/{id}/import/predictions`, one call per chunk; returns how many
        were stored. A failing chunk raises LabelStudioError; earlier chunks stay stored.
        """
        stored = 0
        for start in range(0, len(predictions), chunk):
            part = [{"task": int(p["task"]), "result": p["result"], "score": p.get("score", 0.0),
                     "model_version": p["model_version"]} for p in predictions[start:start + chunk]]
            answer = self.request("POST", f"api/projects/{int(project)}/import/predictions", json_body=part)
            created = answer.get("created") if isinstance(answer, dict) else None
            stored += created if isinstance(created, int) else len(part)
        return stored


def task_prediction_versions(task: Mapping[str, Any]) -> set[str]:
    """Model versions of the predictions a task (as listed with fields=all) already holds."""
    versions = set()
    for prediction in task.get("predictions") or ():
        if isinstance(prediction, Mapping) and isinstance(prediction.get("model_version"), str):
            versions.add(prediction["model_version"])
    return versions
