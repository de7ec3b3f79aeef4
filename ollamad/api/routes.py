"""The application: middlewares in order, then each route family registers its routes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from ollamad.api import embed, manage, native, openai_compat
from ollamad.api.common import (
    CTX,
    AppContext,
    errors_middleware,
    mark_started,
    retry_unstarted_middleware,
    started_middleware,
)
from ollamad.api.guard import (
    add_cors_headers,
    auth_middleware,
    body_log_middleware,
    cors_middleware,
    host_middleware,
)
from ollamad.api.reqlog import request_log
from ollamad.service.metrics import CONTENT_TYPE, Metrics


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


METRICS = web.AppKey("metrics", Metrics)


def make_app(ctx: AppContext) -> web.Application:
    s = ctx.settings
    observed = Metrics(ctx.scheduler)
    # CORS outermost (preflights), then one log line and metrics for every request, Host and auth included
    middlewares: list[Middleware] = [cors_middleware(s.origins), request_log(observed, lambda: ctx.cutting),
                                     host_middleware(s.allowed_hosts)]
    if s.api_key:
        middlewares.append(auth_middleware(s.api_key))
    middlewares += [started_middleware, errors_middleware, retry_unstarted_middleware]
    if s.log_requests:
        middlewares.append(body_log_middleware())
    app = web.Application(middlewares=middlewares, client_max_size=s.max_body)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(mark_started)
    app[CTX] = ctx
    app[METRICS] = observed
    app.router.add_get("/metrics", metrics)
    native.register(app)
    manage.register(app)
    embed.register(app)
    openai_compat.register(app)
    return app
