"""Writes sent to a read-only replica are relayed to the index's one writer.

Every replica of `umr serve --replicas N` answers searches itself; adds, deletes and encoder
activations must happen in the process that holds the index's write lock. The replica checks
the request first (its key, its body), so the writer sees only well-formed requests with a
valid key, then relays it to the writer's private port and returns the writer's answer as it
is. Once a relayed write succeeded, the replica catches up before answering, so its client
reads its own write from this replica at once, and from the others within the follow interval.
"""
from __future__ import annotations

import httpx
from fastapi import Request
from fastapi.responses import Response

from umr.server.errors import ApiError

# Not relayed: they describe one hop, not the request.
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "accept-encoding"}
PASSED_BACK = {"content-type", "retry-after"}


class WriteForwarder:
    def __init__(self, writer_url: str, timeout_s: float = 120.0):
        self.writer_url = writer_url
        self.client = httpx.AsyncClient(base_url=writer_url, timeout=timeout_s, trust_env=False)

    async def relay(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        try:
            answer = await self.client.request(request.method, request.url.path, params=request.url.query,
                                               content=await request.body(), headers=headers)
        except httpx.ConnectError:
            raise ApiError(503, "writer_unavailable", f"the index's writer ({self.writer_url}) is not answering; "
                                                      "the write was not applied: retry it shortly",
                           {"Retry-After": "1"}) from None
        except httpx.HTTPError as e:
            raise ApiError(504, "writer_timeout", f"the index's writer did not finish answering ({type(e).__name__}); "
                                                  "the write may or may not have been applied: adds and deletes by id "
                                                  "can be sent again safely") from None
        return Response(answer.content, status_code=answer.status_code,
                        headers={k: v for k, v in answer.headers.items() if k.lower() in PASSED_BACK})

    async def close(self) -> None:
        await self.client.aclose()


async def relayed(request: Request, st) -> Response:
    """The writer's answer to this write; the replica has caught up with it when it succeeded."""
    answer = await st.forwarder.relay(request)
    if answer.status_code < 300 and st.follower is not None:
        await st.follower.catch_up()
    return answer
