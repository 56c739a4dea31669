"""The HTTP application: health, ``POST /predict``, limits, and one error path.

Starlette (ASGI) on uvicorn: a small, well-kept stack whose request handling we control byte by
byte (the body limit is enforced while reading, not after), without KServe's model server and its
dependency tree. Inference runs on worker threads (the batcher's lanes) so the event loop keeps accepting requests.

Endpoints (docs/SERVING.md):

- ``GET /v2/health/live``: 200 while the process serves;
- ``GET /v2/health/ready``: 200: the server listens only once the model is loaded, its smoke
  check passed and its largest call ran;
- ``POST /predict`` with ``{"texts": [...]}``: labels and scores (or embeddings), a row per text,
  each saying whether its text was truncated to the model's maximum length;
- the Open Inference Protocol (KServe v2, Triton): ``GET /v2`` (server metadata),
  ``GET /v2/models/{name}[/versions/1]`` (model metadata), ``.../ready``, ``POST .../infer`` with a
  ``BYTES`` input ``text`` or the graph's own token-id inputs, JSON or binary tensors
  (:mod:`trimformer.serving.protocol`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trimformer import __version__
from trimformer.errors import UserError
from trimformer.runtime.encoding import EncodedText
from trimformer.serving.batcher import Batcher, Batching
from trimformer.serving.errors import HTTPProblem, status_and_reason
from trimformer.serving.metrics import Metrics
from trimformer.serving.model import MODEL_VERSION, Limits, ServedModel
from trimformer.serving.protocol import encode_response, parse_request

__all__ = ["build_app", "read_json"]

access_log = logging.getLogger("trimformer.serving.access")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPProblem(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPProblem(413, f"the body has {declared} bytes; at most {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"the body passes {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def read_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPProblem(400, "the body is not UTF-8") from None
    except ValueError as exc:
        raise HTTPProblem(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise HTTPProblem(400, "the body must be a JSON object")
    return payload


# Tokenizing on the event loop holds up every other request (64 texts of 512 tokens take about 50 ms on
# a Zen 2 core) while handing off to a thread costs about 0.1 ms, more than a tweet takes (0.08 ms):
# requests with more characters than this are tokenized on a thread.
ENCODE_ON_LOOP_CHARS = 2048


async def encode(model: ServedModel, texts: list[str]) -> list[EncodedText]:
    if sum(len(text) for text in texts) <= ENCODE_ON_LOOP_CHARS:
        return model.encode(texts)
    return await run_in_threadpool(model.encode, texts)


def _error(exc: BaseException) -> JSONResponse:
    status, reason = status_and_reason(exc)
    return JSONResponse({"error": reason}, status_code=status)


def build_app(model: ServedModel, limits: Limits, batching: Batching | None = None) -> Starlette:
    """The ASGI app serving ``model`` (already loaded and verified) within ``limits``; its largest
    call has run on every lane before it returns (:meth:`Batcher.warm_up`), so a server that
    listens is ready: ``/v2/health/ready`` answers 200 from the first request on."""
    batching = batching or Batching()
    try:
        batching.check_model(model.predictor.max_length)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    metrics = Metrics()
    run = Batcher(lambda rows: model.infer(rows), batching, metrics)
    run.warm_up(model.longest_row())

    async def live(_: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(_: Request) -> Response:
        return JSONResponse({"ready": True})

    async def predict(request: Request) -> Response:
        payload = read_json(await read_body(request, limits.max_body_bytes))
        unknown = sorted(set(payload) - {"texts"})
        if unknown:
            raise HTTPProblem(400, f'unknown keys {unknown}; send {{"texts": [...]}}')
        texts = model.check_texts(payload.get("texts"), limits)
        rows = await encode(model, texts)
        return JSONResponse(model.answer(rows, await run.submit(rows)))

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        run.close()

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    routes += _protocol_routes(model, limits, run, batching)
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_AccessLog, metrics=metrics)
    app.state.model = model
    app.state.batcher = run
    return app


def _protocol_routes(model: ServedModel, limits: Limits, run: Batcher, batching: Batching) -> list[Route]:
    """The Open Inference Protocol's server and model endpoints."""

    def check_model(request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
        if name != model.name:
            raise HTTPProblem(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version != MODEL_VERSION:
            raise HTTPProblem(404, f"model {name!r} has version {MODEL_VERSION} only, not {version!r}")

    async def server_metadata(_: Request) -> Response:
        return JSONResponse(
            {"name": "trimformer", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def model_metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse(model.metadata())

    async def model_ready(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"name": model.name, "ready": True})

    async def infer(request: Request) -> Response:
        check_model(request)
        body = await read_body(request, limits.max_body_bytes)
        parsed = parse_request(body, request.headers.get("inference-header-content-length"))
        texts = model.texts_of(parsed, limits)
        if texts is not None:
            rows = await encode(model, texts)
            raw = await run.submit(rows)
            truncated = [row.truncated for row in rows]
        else:
            batch = len(parsed.inputs.get("input_ids", ()))
            if batch > limits.max_texts:
                raise HTTPProblem(
                    400, f"{batch} rows in one request; at most {limits.max_texts} (--max-texts)"
                )
            raw = await run.call(model.run_ids, parsed.inputs, batching.max_batch_tokens)
            truncated = [False] * len(raw)
        outputs = model.protocol_outputs(parsed, raw, truncated)
        payload, header = encode_response(model.name, MODEL_VERSION, parsed, outputs)
        if header is None:
            return Response(payload, media_type="application/json")
        headers = {"Inference-Header-Content-Length": str(header)}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    routes = [Route("/v2", server_metadata, methods=["GET"])]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return routes


class _AccessLog:
    """One JSON line per request (method, path, status, milliseconds), and the error path: any
    exception becomes its status and one-line reason, never a traceback in the response."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        self.metrics.in_flight.inc()

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if status["sent"]:
                raise
            response = _error(exc)
            status["code"] = response.status_code
            await response(scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.request_done(scope.get("path", ""), int(status["code"]))
            access_log.info(
                json.dumps(
                    {
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status["code"],
                        "ms": round((time.perf_counter() - started) * 1e3, 3),
                    }
                )
            )
