"""The guard in front of every route of server.py: the Host header on a loopback bind (DNS rebinding), the API key,
the body's size, and the count of answers by route and status; and errors as OpenAI's JSON body."""

import hmac

from fastapi.responses import JSONResponse

from paligemma.chat import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


class Guard:
    """In front of every route: the Host header on a loopback bind (DNS rebinding), the API key (but for the public
    routes: /health and the page's files), the body's size (refused from Content-Length before it is read, or once
    a streamed body passes it); and the metrics' count."""

    def __init__(self, app, state, routes: tuple[str, ...], public: tuple[str, ...]):
        self.app, self.state, self.routes, self.public = app, state, routes, public  # public: no key needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            self.check(scope)
            receive = await self.buffered(scope, receive)
        except ApiError as e:
            await error_response(e)(scope, receive, counted)
        else:
            await self.app(scope, receive, counted)
        finally:
            route = scope["path"] if scope["path"] in self.routes + self.public else "other"
            self.state.requests.labels(route, str(status[0])).inc()

    def check(self, scope):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.state.flags["host"] in LOOPBACK_NAMES and host is not None:
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in LOOPBACK_NAMES:
                raise ApiError(400, f"the Host header {host[:100]!r} is not this loopback server's name (DNS "
                                    "rebinding?); use localhost or 127.0.0.1")
        key = self.state.flags["api_key"]
        if key and scope["path"] not in self.public:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
        limit = self.state.flags["max_body_bytes"]
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"the body is over the limit of {limit} bytes (--max_body_bytes)")

    async def buffered(self, scope, receive):
        """The body read up to the limit, handed to the route as if it came in now; later messages (a client that
        disconnects) pass through."""
        body, limit = [], self.state.flags["max_body_bytes"]
        size, more = 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            size += len(message.get("body", b""))
            if size > limit:
                raise ApiError(413, f"the body is over the limit of {limit} bytes (--max_body_bytes)")
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def again():
            return replay.pop() if replay else await receive()

        return again
