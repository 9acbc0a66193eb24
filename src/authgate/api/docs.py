"""``/docs``: Swagger UI for ``/openapi.json``, its files pinned and integrity-checked.

The page is served on the authentication server's own origin, so any script it runs could call
every endpoint as the browser's user. Its two files come from a CDN (Authgate ships no
front-end files), so they are named by exact version, each with its Subresource Integrity hash
(a browser refuses a file whose bytes differ), and a Content-Security-Policy lets the page run
only those files and its own start-up script, and send requests only to this origin.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

# swagger-ui-dist 5.35.0 from the npm registry (its tarball's sha512 as the registry publishes
# it); the hashes are of the two files in that tarball, which the CDN serves byte for byte.
SWAGGER_UI_VERSION = "5.35.0"
CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
SWAGGER_UI_JS = (f"{CDN}/swagger-ui-bundle.js",
                 "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9")
SWAGGER_UI_CSS = (f"{CDN}/swagger-ui.css",
                  "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I")


def _page(title: str, openapi_url: str) -> tuple[str, str]:
    """The page and its Content-Security-Policy (the start-up script allowed by its hash)."""
    start = ("window.ui = SwaggerUIBundle({url: " + _js_string(openapi_url) + ", "
             "dom_id: '#swagger-ui', deepLinking: true, showExtensions: true, "
             # No badge fetched from the public validator: it would send it the document.
             "validatorUrl: null, "
             "presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset], "
             "layout: 'BaseLayout'});")
    script_hash = base64.b64encode(hashlib.sha256(start.encode()).digest()).decode()
    (js, js_integrity), (css, css_integrity) = SWAGGER_UI_JS, SWAGGER_UI_CSS
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{css}" integrity="{css_integrity}" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js}" integrity="{js_integrity}" crossorigin="anonymous"></script>
<script>{start}</script>
</body>
</html>
"""
    policy = "; ".join((
        "default-src 'none'",
        f"script-src {js} 'sha256-{script_hash}'",
        # Swagger UI sets style attributes as it renders.
        f"style-src {css} 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))
    return page, policy


def _js_string(value: str) -> str:
    """``value`` as a JavaScript string literal (JSON's, all ASCII) that cannot end the
    script element."""
    return json.dumps(value).replace("<", "\\u003c")


def serve_docs(app: FastAPI, *, path: str = "/docs") -> None:
    """Serve Swagger UI for the app's OpenAPI document at ``path``, under the server's root
    path (``--root-path``, behind a proxy that strips a prefix), as FastAPI's page did."""
    title, openapi_url = f"{app.title} - API", app.openapi_url or "/openapi.json"

    @functools.lru_cache(maxsize=8)  # one root path per deployment; pages made once
    def made(root_path: str) -> tuple[bytes, dict[str, str]]:
        page, policy = _page(title, root_path + openapi_url)
        return page.encode(), {"Content-Security-Policy": policy, "Cache-Control": "no-cache",
                               "X-Content-Type-Options": "nosniff"}

    async def docs(request: Request) -> HTMLResponse:
        page, headers = made(request.scope.get("root_path") or "")
        return HTMLResponse(page, headers=headers)

    app.add_route(path, docs, include_in_schema=False)  # GET and HEAD
