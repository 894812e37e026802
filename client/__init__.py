"""mmrec.client: score and encode items on an mmrec Triton server, built on tritonclient.

Sync (`MMRecClient`) and asyncio (`AsyncMMRecClient`) clients share method names and are
context managers; both speak gRPC or HTTP, to one server or spread over several replicas.
Private modules are re-exported here.
"""
from ._aio import AsyncMMRecClient
from ._client import MMRecClient
from ._endpoints import EndpointStatus
from ._errors import (InvalidItemError, InvalidRequestError, MMRecError, ModelNotReadyError,
                      OverloadedError, RequestTimeoutError, ServerUnavailableError)
from ._items import Item
from ._results import EncodedItems, RankedItem
from ._retry import RetryBudget
from ._server_info import ModelNames, ServerInfo

__all__ = [
    "AsyncMMRecClient",
    "EncodedItems",
    "EndpointStatus",
    "InvalidItemError",
    "InvalidRequestError",
    "Item",
    "MMRecClient",
    "MMRecError",
    "ModelNames",
    "ModelNotReadyError",
    "OverloadedError",
    "RankedItem",
    "RequestTimeoutError",
    "RetryBudget",
    "ServerInfo",
    "ServerUnavailableError",
]
