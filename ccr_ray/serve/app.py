"""The Ray Serve application: one deployment, `Retrieval`, whose replicas each hold a `RetrievalService` (the
torch-free runtime, the image index and the image store, loaded once per replica) behind a FastAPI ingress.

    POST /search          {"text", "lang", "k"} -> {"ids", "scores", "urls"}, best first
    POST /search/image    an image (request body, or multipart field "image"), ?k= -> nearest images
    POST /encode/text     {"texts": [...], "lang"} -> {"embeddings": [[...]]}
    POST /encode/image    an image -> {"embedding": [...]}
    GET  /languages, /healthz, /images/{id}[?max_side=N], / (the search page), /docs and /redoc (OpenAPI)

Captions and images are queued per replica and run in batches (ccr_ray/serve/batching.py: a lone request starts
at once, a batch takes what is waiting); a search batch is encoded language by language and goes through the
index in one search. The batch size and wait, every input limit, and the model export itself (`"model"`: another
export of the same model, e.g. a language added; the index is kept) are the deployment's `user_config` (changed
live by `serve deploy`); replicas and autoscaling are deployment options (cluster/serve/serve_config.yaml, or
`build_app` args). Every refused request gets a 4xx JSON answer {"detail": "<field>: <why>", "field": "<field>"}.
"""

# No `from __future__ import annotations` here: Serve rebuilds the route methods of the ingress class, and
# FastAPI could not resolve string annotations (Request, the body models) from there.
import asyncio
import math
import os
from pathlib import Path
from typing import Any

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccr_ray import __version__
from ccr_ray.serve import batching as request_batching
from ccr_ray.serve.batching import Batcher
from ccr_ray.serve.page import image_url, render_page
from ccr_ray.serve.service import ActiveLimits, BadRequest, Limits, RetrievalService

DEPLOYMENT = "Retrieval"
APP_NAME = "ccr-ray"
UPLOAD_PATHS = ("/search/image", "/encode/image")
DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}

# FastAPIOffline: FastAPI whose /docs and /redoc pages load Swagger UI / ReDoc from files in the package, not a
# CDN (the machines that run the service may have no internet).
api = FastAPIOffline(title="ccr-ray retrieval", version=__version__, description=(
    "Multilingual text -> image search over an image index with an exported ccr-ray model (MLA or DASD "
    "adapters on a CLIP). Errors are 4xx with a JSON body naming the offending field."))


# ----------------------------------------------------------------------------------------- errors, limits


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"detail": f"{field}: {message}", "field": field}, status_code=status)


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, err: BadRequest) -> JSONResponse:
    return _error(err.status, err.field, err.message)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return _error(400, "body", f"malformed JSON ({reason})")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    return _error(422, ".".join(loc) or "body", first.get("msg", "invalid"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals in the service's shape: an unknown path, a wrong method, a body that
    is not UTF-8 JSON or is nested too deeply to parse ("There was an error parsing the body")."""
    if err.status_code == 404:
        field, message = "path", f"{request.url.path!r} is not an endpoint of this service (see /docs)"
    elif err.status_code == 405:
        field, message = "method", f"{request.method} is not allowed on {request.url.path}"
    elif err.status_code == 400 and "parsing the body" in str(err.detail):
        field, message = "body", "malformed JSON (not UTF-8, or nested too deeply)"
    else:
        field, message = "request", str(err.detail)
    response = _error(err.status_code, field, message)
    response.headers.update(err.headers or {})
    return response


class BodyLimit:
    """Refuse a request body over the limit (413) before the route reads it, with or without Content-Length;
    image uploads have their own, larger limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith(UPLOAD_PATHS)
        limits = ActiveLimits.current
        limit = limits.max_upload_bytes if upload else limits.max_body_bytes
        field = "image" if upload else "body"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _error(413, field, f"{int(declared):,} bytes; the limit is {limit:,}")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _error(413, field, f"over {limit:,} bytes")(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


api.add_middleware(BodyLimit)
api.add_middleware(request_batching.CountArrivals)  # outermost: a request counts from the moment it comes in


# ----------------------------------------------------------------------------------------- request models


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="the caption, in `lang`", examples=["ein roter Kreis oben links"])
    lang: StrictStr = Field("en", description="a language code from GET /languages")
    k: StrictInt = Field(10, description="how many images (1 to the service's max_k)")


class SearchResponse(BaseModel):
    query: str
    lang: str | None
    k: int
    ids: list[str]
    scores: list[float] = Field(description="cosine similarity, best first")
    urls: list[str | None] = Field(description="GET these for the images (null without an image store)")


class EncodeTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="captions, all in `lang`")
    lang: StrictStr = "en"


class EncodeResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    model: str | None


IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}}, "required": ["image"]}}}}}


async def read_upload(request: Request) -> bytes:
    """The image of a request: the raw body, or the multipart form's file field `image`."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - starlette raises several kinds for a bad multipart body
            raise BadRequest("image", f"malformed multipart body ({type(err).__name__})", 400) from None
        item = form.get("image")
        if item is None or isinstance(item, str):
            raise BadRequest("image", "the multipart form has no file field 'image'")
        return await item.read()
    return await request.body()


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


# ----------------------------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class Retrieval:
    def __init__(self, model: str, index: str, images: str | None = None, precision: str = "fp32",
                 threads: int | None = None):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        # onnxruntime and faiss threads = the CPUs Ray gave this replica (at least one)
        self.service = RetrievalService(model, index, images, precision, threads or max(1, math.ceil(cpus)))
        # Captions and images are batched per replica (ccr_ray/serve/batching.py): a batch runs in a worker thread,
        # so the event loop keeps queueing the next one (and answering health checks) while onnxruntime and faiss
        # compute; a lone request starts at once, a batch waits only for requests already on their way.
        # The batchers look the service up per batch (self.service), so a model swapped in by reconfigure serves
        # the next batch while a batch already computing finishes on the old one.
        self._search_batch = Batcher(self._search_texts, arrivals=request_batching.ARRIVALS, name="search")
        self._text_batch = Batcher(self._embed_texts, arrivals=request_batching.ARRIVALS, name="text")
        self._image_batch = Batcher(self._embed_images, arrivals=request_batching.ARRIVALS, name="image")
        self._apply(*self._parse({}))

    async def reconfigure(self, config: dict) -> None:
        """user_config: {"max_batch_size", "batch_wait_timeout_s", "limits": {...}, "model": EXPORT}; unknown keys
        refused. "model" swaps the replica's model for another export of it (a language added): the new runtime
        loads and warms up in a worker thread while this one keeps answering, keeps the index (checked against
        the new export's image-tower fingerprint: a mismatch fails the update and the replica keeps its model),
        and takes over between two requests. Serve applies a user_config change without replacing replicas."""
        config = dict(config or {})
        model = config.pop("model", None)
        settings = self._parse(config)  # a bad config fails before anything is loaded
        if model and os.path.realpath(os.path.expanduser(str(model))) != os.path.realpath(self.service.model_dir):
            self.service = await asyncio.to_thread(self.service.with_model, os.path.expanduser(str(model)))
        self._apply(*settings)

    @staticmethod
    def _parse(config: dict) -> tuple[Limits, int, float]:
        unknown = sorted(set(config) - {*DEFAULT_BATCH, "limits"})
        if unknown:
            raise ValueError(f"user_config: unknown {', '.join(unknown)}")
        size = int(config.get("max_batch_size", DEFAULT_BATCH["max_batch_size"]))
        wait = float(config.get("batch_wait_timeout_s", DEFAULT_BATCH["batch_wait_timeout_s"]))
        if size < 1 or wait < 0:
            raise ValueError("user_config: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        return Limits.from_dict(config.get("limits")), size, wait

    def _apply(self, limits: Limits, size: int, wait: float) -> None:
        self.service.limits = ActiveLimits.current = limits
        for batcher in (self._search_batch, self._text_batch, self._image_batch):
            batcher.max_batch_size, batcher.wait_s = size, wait
        self.batching = {"max_batch_size": size, "batch_wait_timeout_s": wait}

    def check_health(self) -> None:
        if self.service.index is None or self.service.encoder is None:
            raise RuntimeError("service not loaded")

    def _search_texts(self, items: list[tuple[str, str, int]]) -> list:
        return self.service.search_texts(items)

    def _embed_texts(self, items: list[tuple[str, str]]) -> list:
        return list(self.service.embed_texts(items))

    def _embed_images(self, images: list) -> list:
        return list(self.service.embed_images(images))

    def _urls(self, request: Request, ids: list[str]) -> list[str | None]:
        store, root = self.service.images, _root(request)
        return [image_url(root, i) if store is not None and i in store else None for i in ids]

    async def _search(self, text, lang, k) -> dict:
        lang = self.service.check_lang(lang)
        text = self.service.check_text(text, lang=lang)
        k = self.service.check_k(k)
        return {"query": text, "lang": lang, "k": k, **await self._search_batch((text, lang, k))}

    # ------------------------------------------------------------------------------------- routes
    @api.post("/search", response_model=SearchResponse, summary="Images for a caption in any model language")
    async def search(self, body: SearchRequest, request: Request) -> dict:
        result = await self._search(body.text, body.lang, body.k)
        return {**result, "urls": self._urls(request, result["ids"])}

    @api.post("/search/image", response_model=SearchResponse, openapi_extra=IMAGE_BODY,
              summary="Images nearest to an uploaded image")
    async def search_image(self, request: Request, k: int = Query(10, description="how many images")) -> dict:
        k = self.service.check_k(k)
        image = self.service.decode_image(await read_upload(request))
        vector = await self._image_batch(image)
        (hits,) = await asyncio.to_thread(self.service.search_vectors, vector[None, :], [k])
        return {"query": "<image>", "lang": None, "k": k, **hits, "urls": self._urls(request, hits["ids"])}

    @api.post("/encode/text", response_model=EncodeResponse, summary="Caption embeddings (L2-normalised)")
    async def encode_text(self, body: EncodeTextRequest) -> dict:
        lang = self.service.check_lang(body.lang)
        texts = self.service.check_texts(body.texts, lang=lang)
        vectors = await asyncio.gather(*(self._text_batch((t, lang)) for t in texts))
        return {"embeddings": [v.tolist() for v in vectors], "dim": self.service.encoder.embed_dim,
                "model": self.service.index.fingerprint}

    @api.post("/encode/image", response_model=EncodeResponse, openapi_extra=IMAGE_BODY,
              summary="An image embedding (L2-normalised)")
    async def encode_image(self, request: Request) -> dict:
        image = self.service.decode_image(await read_upload(request))
        vector = await self._image_batch(image)
        return {"embeddings": [vector.tolist()], "dim": self.service.encoder.embed_dim,
                "model": self.service.index.fingerprint}

    @api.get("/languages", summary="The languages the model reads")
    async def languages(self) -> dict:
        return {"languages": [{"code": c, "name": n} for c, n in self.service.language_names.items()]}

    @api.get("/healthz", summary="Liveness, the model, the index and the limits")
    async def healthz(self) -> dict:
        return {"status": "ok", **self.service.describe(), "batching": self.batching,
                "batches": {b.name: b.stats() for b in (self._search_batch, self._text_batch, self._image_batch)}}

    @api.get("/images/{image_id:path}", summary="An indexed image (max_side: a thumbnail at most this size)",
             response_class=Response)
    async def image(self, image_id: str, max_side: int | None = Query(None, ge=16, le=2048)) -> Response:
        store = self.service.images
        if store is None or image_id not in store:
            return _error(404, "image_id", f"no image {image_id!r} in this service's image store")
        data, media = await asyncio.to_thread(store.thumbnail, image_id, max_side)
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    @api.get("/", response_class=HTMLResponse, summary="The search page")
    async def page(self, request: Request, q: str | None = None, lang: str = "en", k: str = "12") -> HTMLResponse:
        service, root = self.service, _root(request)
        names = service.language_names
        asked = lang
        if lang not in names:
            lang = service.languages[0]
        shown_k = int(k) if k.isdigit() else 12
        if q is None:
            return HTMLResponse(render_page(languages=names, lang=lang, k=shown_k, root=root,
                                            about=service.describe()))
        try:
            service.check_lang(asked)  # a query is never searched in a language it was not asked in
            if not k.isdigit():
                raise BadRequest("k", f"{k!r} is not a whole number")
            result = await self._search(q, lang, int(k))
        except BadRequest as err:
            return HTMLResponse(render_page(languages=names, query=q, lang=lang, k=shown_k, error=str(err),
                                            root=root, about=service.describe()), status_code=err.status)
        urls = self._urls(request, result["ids"])
        hits = [{"id": i, "score": s, "url": u} for i, s, u in zip(result["ids"], result["scores"], urls)]
        return HTMLResponse(render_page(languages=names, query=q, lang=lang, k=shown_k, results=hits, root=root,
                                        about=service.describe()))


# ----------------------------------------------------------------------------------------- building


class AppArgs(BaseModel):
    """`build_app` arguments (the Serve config's `args`); paths must exist on every node that runs a replica."""

    model_config = ConfigDict(extra="forbid")
    model: str
    index: str
    images: str | None = None
    precision: str = "fp32"
    threads: int | None = None
    num_replicas: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    num_cpus: float | None = None
    max_ongoing_requests: int | None = None
    user_config: dict[str, Any] | None = None
    access_log: bool = False  # Serve's per-request log line in each replica's log file (off: it costs CPU per request)


def build_app(args: dict | None = None):
    """The Serve application (`import_path: ccr_ray.serve.app:build_app`); options given here override the
    deployment's defaults, and a Serve config's `deployments` entry overrides both."""
    a = AppArgs.model_validate(args or {})
    options: dict[str, Any] = {}
    if a.num_replicas is not None:
        options["num_replicas"] = a.num_replicas
    if a.autoscaling_config is not None:
        options["autoscaling_config"] = a.autoscaling_config
    if a.num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": a.num_cpus}
    if a.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = a.max_ongoing_requests
    if a.user_config is not None:
        options["user_config"] = a.user_config
    options["logging_config"] = {"enable_access_log": a.access_log}
    deployment = Retrieval.options(**options)

    def path(p: str | None) -> str | None:
        return str(Path(os.path.expanduser(p)).resolve()) if p else None

    return deployment.bind(path(a.model), path(a.index), path(a.images), a.precision, a.threads)
