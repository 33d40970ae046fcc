"""Every request body this gateway takes is JSON: read it as JSON whatever its Content-Type.

``curl -d`` labels a body ``application/x-www-form-urlencoded``, and many clients send
``text/plain``; FastAPI would then hand the endpoint the raw bytes and answer a confusing
"Input should be a valid dictionary". The admin endpoints parse their bodies themselves and
always read them as JSON; with this the OpenAI endpoints do the same. Pure ASGI middleware:
it only rewrites the header of a request with a body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from kunserve.gateway.body_limit import BODY_METHODS

_JSON = b"application/json"


class JSONBodies:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            declared = dict(scope["headers"]).get(b"content-type", b"")
            kind = declared.split(b";", 1)[0].strip().lower()
            if kind != _JSON and not kind.endswith(b"+json"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", _JSON)]}
        await self.app(scope, receive, send)
