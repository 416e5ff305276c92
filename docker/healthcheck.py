"""Container health check: exit 0 once the backend answers /health with model_ready true.

Standard library only (the slim image has no curl). Sends basic auth when the backend requires it.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "9090").strip() or "9090"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if isinstance(body, dict) and body.get("model_ready") is False:
        print(f"starting: model not ready yet ({body.get('model_error') or 'loading'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
