"""The least a FastAPI service on uvicorn can do around umr's engine: the reference for the HTTP
overhead that bench/search.py measures.

One POST route with a two-field pydantic body hands `Engine.search` to one thread and answers
the ids and `took_ms`; no middleware, no dependency, no checks. Its overhead at concurrency 1 is
what uvicorn and FastAPI cost on this machine next to a forward of this size (the forward
evicts the interpreter's working set from the caches, so a stack that answers an empty route in
0.5 ms takes more than twice that here); what `umr serve` adds on top of it is its own.
Run: python bench/minimal_server.py INDEX PORT (bench/search.py starts it).
"""
from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Search(BaseModel):
    text: str
    k: int = 10


def main() -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from umr.retrieval.encoders import load_encoder
    from umr.retrieval.engine import Engine, Query

    engine = Engine.open(Path(sys.argv[1]), load_encoder("lit-base"), mode="read")
    model_thread = ThreadPoolExecutor(max_workers=1)

    app = FastAPI()

    @app.post("/v1/search")
    async def search(req: Search):
        t0 = time.perf_counter()
        hits = await asyncio.get_running_loop().run_in_executor(model_thread, engine.search, [Query(req.text)], req.k)
        ids = ",".join(f'"{h.doc.id}"' for h in hits[0])
        return Response(f'{{"ids": [{ids}], "took_ms": {(time.perf_counter() - t0) * 1000:.3f}}}',
                        media_type="application/json")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()
