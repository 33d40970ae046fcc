"""``Annotated`` dependency aliases: what handlers take from ``app.state`` (set in the lifespan),
and the admin bearer-token check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import nats
from fastapi import Depends, Header, Request

from kunserve.gateway.cluster_view import ClusterView
from kunserve.gateway.dispatcher import Dispatcher
from kunserve.gateway.errors import unauthorized
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.planner_client import PlannerClient
from kunserve.gateway.served_model import ServedModel
from kunserve.gateway.settings import GatewaySettings
from kunserve.gateway.tokenization import PromptTokenizer


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    async def get(request: Request) -> Any:  # async: FastAPI runs sync ones in a thread
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[GatewaySettings, Depends(_state("settings"))]
ModelDep = Annotated[ServedModel, Depends(_state("model"))]
TokenizerDep = Annotated[PromptTokenizer, Depends(_state("tokenizer"))]
DispatcherDep = Annotated[Dispatcher, Depends(_state("dispatcher"))]
MetricsDep = Annotated[GatewayMetrics, Depends(_state("metrics"))]
ClusterDep = Annotated[ClusterView, Depends(_state("cluster"))]
NatsDep = Annotated[nats.NATS, Depends(_state("nats"))]
PlannerDep = Annotated[PlannerClient, Depends(_state("planner"))]


async def require_admin(settings: SettingsDep,
                        authorization: Annotated[str | None, Header()] = None) -> None:
    """401 unless the request carries ``Authorization: Bearer <admin_token>``; admin
    endpoints are closed when no admin token is configured."""
    if settings.admin_token is None:
        raise unauthorized("admin endpoints are disabled: the gateway has no admin token")
    expected = f"Bearer {settings.admin_token.get_secret_value()}"
    if authorization is None or not hmac.compare_digest(authorization.encode(),
                                                        expected.encode()):
        raise unauthorized()


AdminDep = Annotated[None, Depends(require_admin)]
