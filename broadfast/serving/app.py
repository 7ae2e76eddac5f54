"""The scoring API (FastAPI): ``POST /v1/score``, health, readiness, metrics and the admin endpoints.

Request ``{query, ads: [{ad_id, title, text?}], user_id?, request_id?}``; response
``{request_id, model_version, arm, experiment_id, results: [{ad_id, score, grade_probs}]}``
with results in input order; ``score = P(exact) + ½·P(partial)``.

Admin endpoints (``/admin/…``) need ``Authorization: Bearer <BROADFAST_ADMIN_TOKEN>``:
401 without it or with a wrong one, 403 when no token is configured (admin is off).

>>> from fastapi.testclient import TestClient
>>> app = create_app(Settings(admin_token=None), model_dir=Path("runs/hd"))  # the engine starts with the app's lifespan
>>> TestClient(app).get("/admin/models").status_code   # (no ``with``: no lifespan, nothing started)
403
>>> app = create_app(Settings(admin_token="s3cret"), model_dir=Path("runs/hd"))
>>> TestClient(app).get("/admin/models", headers={"Authorization": "Bearer wrong"}).status_code
401
>>> # uvicorn.run(app, host=..., port=...)  -- or `broadfast serve --model runs/hd`
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from broadfast import __version__
from broadfast.core.errors import BroadfastError
from broadfast.core.settings import Settings
from broadfast.serving.engine import ScoringEngine
from broadfast.serving.errors import NotReady, SwapRefused
from broadfast.serving.scoredlog import ScoredRecord
from broadfast.core.events import score_from_probs
from broadfast.model.student import student_text, text_read

log = logging.getLogger(__name__)

QUERY_MAX_CHARS = 4096  # the Scored event's limit


def unicode_text(value: str) -> str:
    """Text every later step can take (tokenizer, events, logs): valid Unicode, no NUL.

    >>> unicode_text("garden hose")
    'garden hose'
    >>> unicode_text("t \\udfff")
    Traceback (most recent call last):
    ...
    ValueError: is not valid Unicode text (surrogates not allowed at position 2)
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode text ({exc.reason} at position {exc.start})") from None
    if "\x00" in value:
        raise ValueError(f"holds a NUL character at position {value.index(chr(0))}")
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is blank: there is nothing to score")
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
Words = Annotated[str, AfterValidator(unicode_text), AfterValidator(not_blank)]


class AdIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ad_id: Text = Field(min_length=1, max_length=4096, examples=["205872"])
    title: Words = Field(examples=["20V MAX cordless drill driver kit"])
    text: Text = Field(default="", description="Description; the student reads the title and the start of this.")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Words = Field(min_length=1, examples=["cordless drill"])
    ads: list[AdIn] = Field(min_length=1)
    user_id: Text | None = Field(default=None, max_length=256, description="A/B assignment is sticky per user (else per request).")
    request_id: Text | None = Field(default=None, min_length=1, max_length=256)


def printable(value: Any) -> Any:
    """``value`` as JSON can always carry it: text with lone surrogates escaped (anything else as it is)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _no_constants(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number (RFC 8259)", name, 0)


class StrictJSONRequest(Request):
    """A request whose JSON body refuses ``NaN``, ``Infinity`` and ``-Infinity`` anywhere in it
    (Python's parser accepts them; they are not JSON, and no score or event may hold one)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_no_constants)
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes that parse bodies with :class:`StrictJSONRequest` (a refused constant is a 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def body_error(exc: Any) -> Any:
    """An HTTP error's detail, made specific where FastAPI's is vague: a body it could not parse
    (``exc.__cause__``: bytes that are not UTF-8, JSON nested too deeply)."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return exc.detail
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to parse"
    return f"the request body could not be parsed ({type(cause).__name__}: {cause})"


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """The request's field errors without echoing its input (which may not be encodable as JSON)."""
    out = []
    for err in exc.errors():
        msg = str(err.get("msg", ""))
        why = (err.get("ctx") or {}).get("error")
        if err.get("type") == "json_invalid" and why:
            msg = f"{msg}: {why}"
        out.append({"loc": [printable(part) for part in err.get("loc", ())], "msg": printable(msg), "type": printable(str(err.get("type", "")))})
    return out


class ScoreResult(BaseModel):
    ad_id: str
    score: float
    grade_probs: list[float] = Field(description="P(irrelevant), P(partial), P(exact)")


class ScoreResponse(BaseModel):
    request_id: str
    model_version: str
    arm: str
    experiment_id: str | None
    results: list[ScoreResult]


class RolloutStart(BaseModel):
    challenger: str = Field(min_length=1)
    share: float = Field(default=0.1, gt=0.0, lt=1.0)
    salt: str | None = None


class LoadVersion(BaseModel):
    version: str = Field(min_length=1)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 with a message, unread beyond the limit."""

    def __init__(self, app: Any, limit: int, metrics: Any) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send, int(length))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send, size)
                return
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        self.metrics.rejected.labels("413").inc()
        detail = f"request body of {size:,} bytes exceeds the limit of {self.limit:,} bytes (BROADFAST_SERVE_MAX_BODY_BYTES)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def create_app(settings: Settings, model_dir: Path | None = None, *, engine: ScoringEngine | None = None) -> FastAPI:
    """The FastAPI app; the engine starts and stops with the app's lifespan."""
    engine = engine or ScoringEngine(settings, model_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.start)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="broadfast scoring API", version=__version__, lifespan=lifespan,
                  description="Scores query–ad pairs with the live student; A/B rollouts and hot swaps behind it.")  # fmt: skip
    app.router.route_class = StrictJSONRoute  # every route declared below parses strict JSON
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=settings.serving.serve_max_body_bytes, metrics=engine.metrics)
    metrics = engine.metrics

    def reject(status: int, detail: str) -> HTTPException:
        metrics.rejected.labels(str(status)).inc()
        return HTTPException(status_code=status, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.__cause__ is not None and exc.status_code == 400:  # a body that could not be parsed (reject() counts its own)
            metrics.rejected.labels("400").inc()
        return JSONResponse({"detail": printable(body_error(exc))}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("422").inc()
        return JSONResponse({"detail": validation_errors(exc)}, status_code=422)

    @app.exception_handler(BroadfastError)
    async def _broadfast_error(_: Request, exc: BroadfastError) -> JSONResponse:
        status = 503 if isinstance(exc, NotReady) else 409
        metrics.rejected.labels(str(status)).inc()
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def check_limits(req: ScoreRequest) -> None:
        if len(req.ads) > settings.serving.serve_max_ads:
            raise reject(413, f"{len(req.ads)} ads in one request; the limit is {settings.serving.serve_max_ads} (BROADFAST_SERVE_MAX_ADS)")
        limit = settings.serving.serve_max_text_chars
        if len(req.query) > min(limit, QUERY_MAX_CHARS):
            raise reject(422, f"query of {len(req.query):,} characters exceeds the limit of {min(limit, QUERY_MAX_CHARS):,}")
        for i, ad in enumerate(req.ads):
            for name in ("title", "text"):
                value = getattr(ad, name)
                if len(value) > limit:
                    raise reject(422, f"ads[{i}].{name} of {len(value):,} characters exceeds the limit of {limit:,} (BROADFAST_SERVE_MAX_TEXT_CHARS)")

    @app.post("/v1/score", response_model=ScoreResponse, summary="Score a query's candidate ads")
    async def score(req: ScoreRequest) -> Response:
        started = time.perf_counter()
        check_limits(req)
        request_id = req.request_id or uuid.uuid4().hex
        model, arm, experiment_id = engine.routing.route(req.user_id, request_id)
        ad_ids = [a.ad_id for a in req.ads]
        features_task = asyncio.create_task(asyncio.to_thread(engine.read_features, req.query, ad_ids)) if settings.serving.serve_features else None
        try:
            probs = await asyncio.wrap_future(engine.batcher.submit(model, [req.query] * len(req.ads), [student_text(a.title, a.text) for a in req.ads]))
        except Exception as exc:
            engine.count(experiment_id, arm, ok=False)
            metrics.errors.labels("score").inc()
            raise HTTPException(status_code=500, detail=f"scoring failed with {model.version}: {exc}") from exc
        features = await features_task if features_task is not None else None
        scores = [score_from_probs(p) for p in probs]
        latency = time.perf_counter() - started
        metrics.latency.labels(arm).observe(latency)
        metrics.requests.labels(arm).inc()
        engine.count(experiment_id, arm, ok=True)
        engine.scored.offer(
            ScoredRecord(request_id, req.user_id, req.query, [(a.ad_id, a.title, text_read(a.text)) for a in req.ads], probs, scores, model.version, arm, experiment_id, latency * 1000.0, time.time(), features)
        )
        results = [{"ad_id": a, "score": s, "grade_probs": [float(x) for x in p]} for a, s, p in zip(ad_ids, scores, probs)]
        return JSONResponse({"request_id": request_id, "model_version": model.version, "arm": arm, "experiment_id": experiment_id, "results": results})

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and requests are scored")
    async def readyz() -> JSONResponse:
        routing = engine.routing
        body = {"ready": engine.ready, "champion": engine.champion_version, "challenger": routing.challenger.version if routing.challenger else None,
                "experiment_id": routing.experiment.experiment_id if routing.experiment else None,
                "backend": routing.champion.info()["backend"] if routing.champion else None}  # fmt: skip
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- admin ------------------------------------------------------------------------------------
    def require_admin(request: Request) -> None:
        token = settings.serving.admin_token.get_secret_value() if settings.serving.admin_token else ""
        if not token:
            raise reject(403, "admin endpoints are off: no admin token is configured (set BROADFAST_ADMIN_TOKEN)")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            metrics.rejected.labels("401").inc()
            raise HTTPException(status_code=401, detail="a valid 'Authorization: Bearer <token>' header is required", headers={"WWW-Authenticate": "Bearer"})

    admin = [Depends(require_admin)]

    @app.get("/admin/models", dependencies=admin, summary="Resident versions and refused ones")
    async def admin_models() -> dict[str, Any]:
        routing = engine.routing
        return {"champion": routing.champion.info() if routing.champion else None, "challenger": routing.challenger.info() if routing.challenger else None,
                "refused": engine.refused}  # fmt: skip

    @app.post("/admin/models/load", dependencies=admin, summary="Load a registry version (checked) as the champion")
    async def admin_load(body: LoadVersion) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(engine.offer, body.version)
        except SwapRefused as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc

    @app.post("/admin/rollout/start", dependencies=admin, summary="Serve a challenger to a share of traffic")
    async def admin_start(body: RolloutStart) -> dict[str, Any]:
        try:
            exp = await asyncio.to_thread(engine.start_experiment, body.challenger, body.share, body.salt)
        except SwapRefused as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        return {"experiment": asdict(exp)}

    @app.get("/admin/rollout/status", dependencies=admin, summary="The experiment and its per-arm counts")
    async def admin_status() -> dict[str, Any]:
        from broadfast.serving import rollout

        return await asyncio.to_thread(rollout.status, engine.store)

    @app.post("/admin/rollout/promote", dependencies=admin, summary="The challenger becomes the champion")
    async def admin_promote() -> dict[str, Any]:
        from broadfast.serving import rollout

        exp = await asyncio.to_thread(rollout.promote, engine.store, engine.registry)
        await asyncio.to_thread(engine.sync_experiment)
        return {"experiment": asdict(exp), "champion": engine.champion_version}

    @app.post("/admin/rollout/rollback", dependencies=admin, summary="Stop the experiment; the champion takes all traffic")
    async def admin_rollback() -> dict[str, Any]:
        from broadfast.serving import rollout

        exp = await asyncio.to_thread(rollout.rollback, engine.store)
        await asyncio.to_thread(engine.sync_experiment)
        return {"experiment": asdict(exp), "champion": engine.champion_version}

    return app
