"""The serving benchmark's anchor: a plain single-process FastAPI app on uvicorn that answers `POST /search`
with the project's own `RetrievalService` (same checks, same `search_texts`, same answer shape as the Serve
deployment; no batching, no Ray). `bench/serve.py` and `bench/soak.py` start it beside the Serve application
and report Serve's throughput as a ratio of this one's, measured in the same run with the same client.

Usage:
    python bench/serve_anchor.py --model DIR --index DIR [--port 8001] [--threads 1]

Binds 127.0.0.1 only; stops on Ctrl-C or SIGTERM. Not a product path: export/serve.py is the service.
"""


# No `from __future__ import annotations`: FastAPI resolves the route's body model from its annotation.
import argparse
import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread, as one replica
    os.environ.setdefault(_var, "1")


def build_anchor(model: str, index: str, threads: int = 1):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

    from ccr_ray.serve.service import BadRequest, RetrievalService

    service = RetrievalService(model, index, threads=threads)
    app = FastAPI(title="ccr-ray anchor")

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: StrictStr
        lang: StrictStr = "en"
        k: StrictInt = 10

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, err: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(err), "field": err.field}, status_code=err.status)

    @app.post("/search")
    def search(body: SearchRequest) -> dict:  # a sync route: FastAPI runs it in its thread pool
        lang = service.check_lang(body.lang)
        text = service.check_text(body.text, lang=lang)
        k = service.check_k(body.k)
        (hits,) = service.search_texts([(text, lang, k)])
        return {"query": text, "lang": lang, "k": k, **hits, "urls": [None] * len(hits["ids"])}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(build_anchor(args.model, args.index, args.threads), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
