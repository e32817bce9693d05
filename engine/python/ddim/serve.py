"""ddim.serve: the ddim engine as a Ray Serve application (HTTP and Python deployment handles).

One command on one machine (blocks until Ctrl-C)::

    python -m ddim.serve --model weights/default.ddim --replicas 2 --device cpu --port 8000
    curl -s -X POST localhost:8000/sample -d '{"seed": 7, "steps": 20}' -o seed7.png

On a cluster, ``serve run tools/serve/config.yaml`` / ``serve deploy`` with the application builder
``ddim.serve:app_builder`` (its ``args`` are the options below). In Python::

    from ray import serve
    import ddim.serve
    handle = serve.run(ddim.serve.build_app("weights/default.ddim", replicas=2), name="ddim")
    out = handle.sample.remote(seeds=[1, 2], steps=20, format="npy").result()   # out["images"]: (2, C, H, W)

Each replica loads the model once and keeps ``ddim.Session`` objects of batch sizes 1, 2, 4, ... up to
``max_batch`` (created when first needed), run by one worker thread off the event loop. Requests are checked
first (400 with the engine's message), then batched with ``@serve.batch`` counting images, grouped by sampling
settings and run on the largest sessions that fit. The HTTP routes: POST /sample, GET /info, GET /healthz.
There is NO authentication: it binds 127.0.0.1 unless told otherwise. docs/serving.md is the guide.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import ray
    from ray import serve
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"ddim.serve needs Ray Serve ({e}): pip install 'ray[serve]==2.60.0'") from e

import ddim

from ._serve_core import (Engine, Limits, RequestError, SampleRequest, encode_npy, encode_png, images_in,
                          parse_request, session_sizes, split_seeds)

__all__ = ["DDIMSampler", "OPTIONS", "app_builder", "build_app", "main", "resolve_options"]

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "DDIMSampler"
APP_NAME = "ddim"
SHIP_MODES = ("path", "inline", "object-store")
NO_AUTH_WARNING = ("ddim.serve has no authentication and no TLS: anyone who can reach {where} can use it; keep it "
                   "on 127.0.0.1 or behind an authenticating proxy")


# ----------------------------------------------------------------------------------------------------------------
# Options: one table for the command line, the application builder's args and build_app's keywords
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str
    kind: type
    default: Any
    help: str
    scope: str  # "model", "replica" (given to each replica), "deployment" (Serve's options), "cli" (main only)
    choices: Optional[Tuple[str, ...]] = None


OPTIONS: Tuple[Option, ...] = (
    Option("model", str, None, "the model file (required); with ship_model=path it must exist at this path on every "
           "node", "model"),
    Option("ship_model", str, "path", "how the model reaches the replicas: path (each replica opens the file), "
           "inline (the builder reads the file; its bytes travel in the deployment's arguments, kept by the Serve "
           "controller), object-store (the builder puts the bytes into Ray's object store once; its process must "
           "outlive the application)", "model", SHIP_MODES),
    Option("device", str, "cpu", "cpu, cuda (one GPU per replica) or auto (CUDA when the replica was given a GPU)",
           "replica", ("cpu", "cuda", "auto")),
    Option("threads", int, 1, "CPU engine threads per replica (0: all cores); also the replica's num_cpus",
           "replica"),
    Option("precision", str, "auto", "auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16, bf16", "replica",
           ("auto", "fp32", "fp16", "bf16")),
    Option("max_batch", int, 8, "images per engine call; sessions of 1, 2, 4, ... up to this are kept", "replica"),
    Option("partial", str, "cover", "a batch that no session size fits: cover (several calls of the largest sizes "
           "that fit: 7 = 4 + 2 + 1, nothing wasted; best on the CPU) or pad (one call of the next size up, "
           "padded: fewer calls, may be faster on a GPU)", "replica", ("cover", "pad")),
    Option("batch_wait_ms", float, 10.0, "how long a batch waits to fill after its first image", "replica"),
    Option("max_seeds", int, 16, "images (seeds) per request", "replica"),
    Option("max_steps", int, 1000, "DDIM steps per request", "replica"),
    Option("default_steps", int, 50, "steps when a request names none", "replica"),
    Option("max_body_bytes", int, 65536, "HTTP request body limit (413 above it)", "replica"),
    Option("warmup", bool, False, "create every session size at replica start instead of when first needed",
           "replica"),
    Option("replicas", int, 1, "number of replicas (without autoscaling)", "deployment"),
    Option("min_replicas", int, None, "autoscaling: fewest replicas (default 1)", "deployment"),
    Option("max_replicas", int, None, "autoscaling: most replicas; setting it turns autoscaling on", "deployment"),
    Option("target_ongoing_requests", float, None, "autoscaling: ongoing requests per replica to aim for "
           "(default max_batch)", "deployment"),
    Option("max_ongoing_requests", int, None, "requests a replica holds at once (default 2 * max_batch, so that "
           "one batch fills while another runs)", "deployment"),
    Option("max_queued_requests", int, 64, "requests waiting for a replica per caller before 503 (-1: no limit)",
           "deployment"),
    Option("health_check_period_s", float, 10.0, "seconds between Serve's health checks of a replica",
           "deployment"),
    Option("num_cpus", float, None, "Ray CPUs per replica (default: threads, at least 1)", "deployment"),
    Option("num_gpus", float, None, "Ray GPUs per replica (default: 1 with device=cuda, else 0)", "deployment"),
    Option("host", str, "127.0.0.1", "HTTP address to bind (0.0.0.0: every interface; there is no "
           "authentication)", "cli"),
    Option("port", int, 8000, "HTTP port", "cli"),
    Option("address", str, None, "Ray cluster to join (e.g. auto, or HEAD:6379); default: start a local Ray",
           "cli"),
    Option("name", str, APP_NAME, "Serve application name", "cli"),
    Option("route_prefix", str, "/", "HTTP route prefix of the application", "cli"),
    Option("object_store_mb", int, None, "local Ray only: object store size in MB (default: Ray's)", "cli"),
    Option("dashboard", bool, False, "local Ray only: start Ray's dashboard", "cli"),
)
_BY_NAME = {o.name: o for o in OPTIONS}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(opt: Option, value: Any) -> Any:
    if value is None:
        return None
    bad = ValueError(f"option '{opt.name}' must be {opt.kind.__name__}, got {value!r}")
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if isinstance(value, bool):
        raise bad
    try:
        if opt.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            out = int(value) if not isinstance(value, str) else int(value.strip(), 10)
        elif opt.kind is float:
            out = float(value)
        else:
            out = str(value) if isinstance(value, (str, os.PathLike)) else None
            if out is None:
                raise bad
    except (TypeError, ValueError):
        raise bad from None
    if opt.choices and out not in opt.choices:
        raise ValueError(f"option '{opt.name}' must be one of {', '.join(opt.choices)}, got {out!r}")
    return out


def resolve_options(args: Dict[str, Any], scopes: Sequence[str] = ("model", "replica", "deployment")) -> Dict[str, Any]:
    """Options with defaults filled in and types coerced (strings such as "2" or "true" from ``serve run
    ... key=value`` included). Unknown names and names outside ``scopes`` are errors that list what is accepted."""
    known = [o for o in OPTIONS if o.scope in scopes]
    names = {o.name for o in known}
    unknown = sorted(str(k) for k in args if str(k).replace("-", "_") not in names)
    if unknown:
        cli_only = [k for k in unknown if k.replace("-", "_") in _BY_NAME]
        hint = (" (host and port go in the Serve config's http_options, or serve.start)" if cli_only else "")
        raise ValueError(f"unknown option(s) {', '.join(unknown)}{hint}; accepted: {', '.join(sorted(names))}")
    out = {o.name: o.default for o in known}
    for key, value in args.items():
        name = str(key).replace("-", "_")
        out[name] = _coerce(_BY_NAME[name], value)
    _check(out)
    return out


def _check(o: Dict[str, Any]) -> None:
    """Cross-field checks, so that a bad setting fails when the application is built, not in every replica."""
    def positive(name: str, allow_zero: bool = False) -> None:
        v = o.get(name)
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            raise ValueError(f"option '{name}' must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    if "max_batch" in o:
        session_sizes(o["max_batch"])
        Limits(max_seeds=o["max_seeds"], max_steps=o["max_steps"], max_body_bytes=o["max_body_bytes"],
               default_steps=o["default_steps"])
        positive("threads", allow_zero=True)
        positive("batch_wait_ms", allow_zero=True)
    for name in ("replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                 "health_check_period_s", "port"):
        positive(name)
    for name in ("min_replicas", "num_cpus", "num_gpus"):
        positive(name, allow_zero=True)
    if o.get("max_queued_requests") is not None and o["max_queued_requests"] < -1:
        raise ValueError("option 'max_queued_requests' must be -1 (no limit) or >= 0")
    if o.get("max_replicas") is not None and (o.get("min_replicas") or 1) > o["max_replicas"]:
        raise ValueError(f"min_replicas ({o['min_replicas']}) exceeds max_replicas ({o['max_replicas']})")
    if o.get("max_replicas") is None and (o.get("min_replicas") is not None
                                          or o.get("target_ongoing_requests") is not None):
        raise ValueError("min_replicas / target_ongoing_requests need max_replicas (which turns autoscaling on)")


def _deployment_options(o: Dict[str, Any]) -> Dict[str, Any]:
    """Serve's deployment options for resolved options ``o``."""
    device = o["device"]
    num_cpus = o["num_cpus"] if o["num_cpus"] is not None else (max(1, o["threads"]) if device == "cpu" else 1)
    num_gpus = o["num_gpus"] if o["num_gpus"] is not None else (1 if device == "cuda" else 0)
    out: Dict[str, Any] = dict(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=o["max_ongoing_requests"] or 2 * o["max_batch"],
        max_queued_requests=o["max_queued_requests"],
        health_check_period_s=o["health_check_period_s"],
    )
    if o["max_replicas"] is not None:
        min_r = o["min_replicas"] if o["min_replicas"] is not None else 1
        out["autoscaling_config"] = dict(
            min_replicas=min_r, max_replicas=o["max_replicas"], initial_replicas=max(min_r, 1),
            target_ongoing_requests=o["target_ongoing_requests"] or float(o["max_batch"]))
    else:
        out["num_replicas"] = o["replicas"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model: a path, bytes, or an ObjectRef to bytes
# ----------------------------------------------------------------------------------------------------------------


def _model_source(model: Any, ship: str) -> Tuple[Any, str]:
    """(what the replicas get, a name for messages) for ``model`` (a path, bytes or an ObjectRef) and a ship mode."""
    if isinstance(model, ray.ObjectRef):
        return model, "<object store>"
    if isinstance(model, (bytes, bytearray, memoryview)):
        return (model if ship != "object-store" else ray.put(np.frombuffer(model, dtype=np.uint8))), "<bytes>"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, bytes or an ObjectRef of bytes, got {type(model).__name__}")
    path = os.fspath(model)
    if ship == "path":
        return os.path.abspath(path), os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ddim.IoError(f"cannot read the model file {path!r} to ship it ({ship}): {e}") from None
    if ship == "inline":
        return data, os.path.basename(path)
    # One copy in the object store; a uint8 array so that replicas read it from shared memory without a copy.
    return ray.put(np.frombuffer(data, dtype=np.uint8)), os.path.basename(path)


def _load_model(source: Any, name: str) -> "ddim.Model":
    if isinstance(source, ray.ObjectRef):
        try:
            source = ray.get(source)
        except Exception as e:  # noqa: BLE001 - reworded: the usual cause is an owner that went away
            raise RuntimeError(f"cannot fetch the model's bytes from Ray's object store ({type(e).__name__}: {e}); "
                               "the process that put them (the one that built the application) must stay alive "
                               "while the application runs; use ship_model=inline or a shared path instead") from e
    if isinstance(source, (bytes, bytearray, memoryview, np.ndarray)):
        return ddim.Model.from_bytes(source, name)
    try:
        return ddim.Model(source)
    except ddim.IoError as e:
        raise ddim.IoError(f"{e} (with ship_model=path the model file must exist at this path on every node that "
                           "runs a replica: a shared filesystem, or copy it there; or use ship_model=inline)") from None


# ----------------------------------------------------------------------------------------------------------------
# The deployment
# ----------------------------------------------------------------------------------------------------------------


def _json_response(obj: Any, status: int = 200, headers: Optional[Dict[str, str]] = None):
    from starlette.responses import Response

    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json", headers=headers)


def _error_response(status: int, message: str):
    return _json_response({"error": message, "status": status}, status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


async def _read_body(request: Any, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"invalid Content-Length header {length!r}") from None
        if n > limit:
            raise RequestError(f"the request body has {n} bytes; this server accepts at most {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body exceeds {limit} bytes, the most this server accepts", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise RequestError('the request body is empty; send a JSON object such as {"seed": 0, "steps": 20}')
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def _drop_batch_size_warning(record: logging.LogRecord) -> bool:
    # serve.batch warns when max_batch_size * max_concurrent_batches exceeds max_ongoing_requests; here the
    # concurrent batches only feed the engine's queue, which merges them, so the warning does not apply.
    return not str(record.msg).startswith("`max_batch_size`")


@serve.deployment(name=DEPLOYMENT_NAME)
class DDIMSampler:
    """One replica: the model, its sessions and worker thread (``ddim._serve_core.Engine``), the HTTP routes
    (``__call__``) and the handle methods ``sample``, ``info`` and ``healthz``."""

    def __init__(self, model: Any, model_name: str, options: Dict[str, Any]) -> None:
        o = resolve_options(options, scopes=("replica",))
        self._options = o
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (local testing): any label will do
            self._replica = f"pid{os.getpid()}"
        started = time.monotonic()
        self._model = _load_model(model, model_name)
        del model
        self._model_name = model_name
        self._schedule = self._model.schedule
        self._scheduler = ddim.Scheduler(self._schedule)
        self._limits = Limits(max_seeds=o["max_seeds"], max_steps=o["max_steps"], max_body_bytes=o["max_body_bytes"],
                              default_steps=o["default_steps"])
        self._engine = Engine(self._model, device=o["device"], threads=o["threads"], precision=o["precision"],
                              max_batch=o["max_batch"], partial=o["partial"], label=self._replica)
        # Plan the smallest session now: a replica that cannot sample fails at start, not at its first request.
        self._engine.warm_up(self._engine.sizes if o["warmup"] else (1,))
        self._requests = dict(ok=0, rejected=0, failed=0)
        logging.getLogger("ray.serve").addFilter(_drop_batch_size_warning)
        self._sample_batch.set_max_batch_size(o["max_batch"])
        self._sample_batch.set_batch_wait_timeout_s(o["batch_wait_ms"] / 1000.0)
        logger.info("ddim.serve replica %s: %s on %s in %.2f s, session sizes %s", self._replica, model_name,
                    self._engine.backend, time.monotonic() - started, self._engine.sizes)

    # -- batching ------------------------------------------------------------------------------------------------

    # serve.batch forms batches (counting images) from requests that arrive within batch_wait_ms; it hands them
    # to the engine's queue without waiting for the previous batch to finish (max_concurrent_batches is not the
    # limit: max_ongoing_requests is), and the engine's worker merges what is queued when it becomes free.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=1024, batch_size_fn=images_in)
    async def _sample_batch(self, items: List[Any]) -> List[Any]:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in self._engine.submit(items))))

    async def _run(self, body: Any) -> Tuple[SampleRequest, np.ndarray, List[str]]:
        request = parse_request(body, self._limits, self._scheduler, self._engine.shape[0], self._schedule)
        results = await asyncio.gather(*(self._sample_batch(item)
                                         for item in split_seeds(request, self._engine.max_batch)))
        for r in results:
            if r.error is not None:
                raise r.error
        images = results[0].images if len(results) == 1 else np.concatenate([r.images for r in results], axis=0)
        calls = [c for r in results for c in r.calls]
        return request, images, calls

    @staticmethod
    def _png_text(request: SampleRequest, seed: int) -> Dict[str, str]:
        return {"Software": f"ddim.serve {ddim.__version__}", "ddim.seed": str(seed),
                "ddim.steps": str(request.steps), "ddim.eta": repr(request.eta)}

    async def _pngs(self, request: SampleRequest, images: np.ndarray) -> List[bytes]:
        loop = asyncio.get_running_loop()  # zlib off the event loop (it releases the GIL)
        return await loop.run_in_executor(None, lambda: [encode_png(img, self._png_text(request, s))
                                                         for img, s in zip(images, request.seeds)])

    # -- the Python handle -----------------------------------------------------------------------------------

    async def sample(self, request: Optional[Dict[str, Any]] = None, /, **fields: Any) -> Dict[str, Any]:
        """``handle.sample.remote({"seeds": [1, 2], "steps": 20, "format": "npy"})`` (or the same as keywords).
        Returns a dict: ``seeds``, ``format``, ``images`` (float32 (N, C, H, W), format npy) or ``png`` (one PNG's
        bytes per seed), ``engine_calls`` (per image, the id of the engine call that made it) and ``replica``.
        Raises ``ddim.InvalidArgumentError`` for a bad request, the engine's ``ddim.Error`` when sampling fails."""
        body = dict(request or {})
        body.update(fields)
        try:
            req, images, calls = await self._run(body)
        except ddim.InvalidArgumentError:
            self._requests["rejected"] += 1
            raise
        except Exception:
            self._requests["failed"] += 1
            raise
        self._requests["ok"] += 1
        out: Dict[str, Any] = dict(seeds=list(req.seeds), format=req.format, engine_calls=calls,
                                   replica=self._replica)
        if req.format == "npy":
            out["images"] = images
        else:
            out["png"] = await self._pngs(req, images)
        return out

    def info(self) -> Dict[str, Any]:
        """What /info returns: the model, the settings, and THIS replica's counters."""
        i = self._model.info
        schedule = {k: v for k, v in self._schedule.items() if isinstance(v, (str, int, float, bool))}
        return dict(
            replica=self._replica, version=ddim.__version__,
            model=dict(name=self._model_name, in_channels=i.in_channels, out_channels=i.out_channels,
                       height=i.height, width=i.width, parameter_count=i.parameter_count, schedule=schedule),
            device=self._options["device"], backend=self._engine.backend, threads=self._options["threads"],
            limits=dict(max_seeds=self._limits.max_seeds, max_steps=self._limits.max_steps,
                        max_body_bytes=self._limits.max_body_bytes, default_steps=self._limits.default_steps),
            batching=dict(max_batch=self._engine.max_batch, batch_wait_ms=self._options["batch_wait_ms"],
                          session_sizes=self._engine.sizes,
                          policy="serve.batch counting images feeds the engine's queue; when free, the engine "
                                 "runs the oldest request's settings with every queued request of the same "
                                 "settings, up to max_batch images; partial batches: " + (
                                     "covered greedily by the largest sessions that fit, no padding"
                                     if self._options["partial"] == "cover" else
                                     "one call of the next session size up, padded")),
            requests=dict(self._requests), engine=self._engine.stats(),
        )

    def healthz(self) -> Dict[str, Any]:
        error = self._engine.health_error()
        return dict(status="ok" if error is None else "unhealthy", replica=self._replica,
                    **({"error": error} if error else {}))

    def check_health(self) -> None:
        """Serve's periodic health check: raising makes Serve replace this replica."""
        error = self._engine.health_error()
        if error is not None:
            raise RuntimeError(error)

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.executor.shutdown(wait=False)

    # -- HTTP ------------------------------------------------------------------------------------------------

    async def __call__(self, request: Any) -> Any:
        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {"/sample": "POST", "/info": "GET", "/healthz": "GET"}
        if path not in routes:
            return _error_response(404, f"no route {path}; routes: POST /sample, GET /info, GET /healthz")
        if request.method != routes[path]:
            return _error_response(405, f"{path} takes {routes[path]}, not {request.method}")
        if path == "/info":
            return _json_response(self.info())
        if path == "/healthz":
            h = self.healthz()
            return _json_response(h, 200 if h["status"] == "ok" else 503)
        return await self._http_sample(request)

    async def _http_sample(self, request: Any) -> Any:
        try:
            body = _parse_json(await _read_body(request, self._limits.max_body_bytes))
            req, images, calls = await self._run(body)
        except RequestError as e:
            self._requests["rejected"] += 1
            return _error_response(e.status, str(e))
        except ddim.InvalidArgumentError as e:
            self._requests["rejected"] += 1
            return _error_response(400, str(e))
        except Exception as e:  # noqa: BLE001 - an engine failure: 500 with its message, the replica carries on
            self._requests["failed"] += 1
            logger.exception("ddim.serve: sampling failed")
            return _error_response(500, f"{type(e).__name__}: {e}")
        self._requests["ok"] += 1
        from starlette.responses import Response

        headers = {"X-DDIM-Seeds": ",".join(map(str, req.seeds)), "X-DDIM-Replica": self._replica,
                   "X-DDIM-Engine-Calls": ",".join(calls), "X-DDIM-Shape": ",".join(map(str, images.shape))}
        if req.format == "npy":
            return Response(encode_npy(images), media_type="application/octet-stream", headers=headers)
        pngs = await self._pngs(req, images)
        if len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers=headers)
        import base64

        return _json_response(dict(format="png", seeds=list(req.seeds), shape=list(images.shape[1:]),
                                   images=[base64.b64encode(p).decode("ascii") for p in pngs],
                                   engine_calls=calls, replica=self._replica), headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# Building the application
# ----------------------------------------------------------------------------------------------------------------


def build_app(model: Any, **options: Any) -> "serve.Application":
    """The Serve application for ``model`` (a path, the file's bytes, or an ObjectRef of them) with the options
    of ``OPTIONS`` (scopes model, replica, deployment) as keywords: ``build_app("m.ddim", replicas=2,
    device="cuda")``. Pass it to ``serve.run``."""
    o = resolve_options(dict(options, model=model if isinstance(model, (str, os.PathLike)) else "<given>"))
    source, name = _model_source(model, o["ship_model"])
    replica = {opt.name: o[opt.name] for opt in OPTIONS if opt.scope == "replica"}
    return DDIMSampler.options(**_deployment_options(o)).bind(source, name, replica)


def app_builder(args: Dict[str, Any]) -> "serve.Application":
    """The application builder for Serve config files and ``serve run ddim.serve:app_builder model=... ...``:
    ``args`` holds the options of ``OPTIONS`` (scopes model, replica, deployment); strings are converted.
    ``ship_model=object-store`` is refused here: the builder's process is short-lived (use inline or a path)."""
    args = dict(args or {})
    if "model" not in args:
        raise ValueError("ddim.serve:app_builder needs the argument 'model' (a model file path)")
    model = args.pop("model")
    ship = str(args.get("ship_model", "path"))
    if ship == "object-store":
        raise ValueError("ship_model=object-store needs a driver that outlives the application (python -m "
                         "ddim.serve, or your own script calling serve.run); from a config file use "
                         "ship_model=inline or a path that exists on every node")
    return build_app(model, **args)


# ----------------------------------------------------------------------------------------------------------------
# The command line: python -m ddim.serve
# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddim.serve",
        description="Serve a ddim model over HTTP with Ray Serve (POST /sample, GET /info, GET /healthz). "
                    "Blocks until Ctrl-C. There is no authentication; see docs/serving.md.")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        default = "" if o.default is None else f" (default: {o.default})"
        if o.kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=o.default, help=o.help + default)
        else:
            p.add_argument(flag, type=str, default=None, required=o.name == "model", metavar=o.name.upper(),
                           choices=o.choices, help=o.help + default)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ddim.serve``: starts (or joins, with --address) Ray, runs the application and blocks until
    Ctrl-C or SIGTERM, then shuts Serve (and a Ray it started) down. Returns the exit status (2: bad options)."""
    ns = _parser().parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    try:
        cli = {o.name: _coerce(o, given.get(o.name, o.default)) for o in OPTIONS if o.scope == "cli"}
        rest = {k: v for k, v in given.items() if _BY_NAME[k].scope != "cli"}
        o = resolve_options(rest)
        if o["ship_model"] == "path" and not os.path.isfile(o["model"]):
            if cli["address"] is None:
                raise ValueError(f"the model file {o['model']!r} does not exist")
            print(f"ddim.serve: warning: {o['model']!r} does not exist here; it must exist on every node that runs "
                  "a replica", file=sys.stderr)
    except (ValueError, TypeError) as e:
        print(f"ddim.serve: error: {e}", file=sys.stderr)
        return 2

    where = f"http://{cli['host']}:{cli['port']}"
    print("ddim.serve: warning: " + NO_AUTH_WARNING.format(where=where)
          + ("" if _is_loopback(cli["host"]) else f" ({cli['host']} is NOT a loopback address)"), file=sys.stderr)

    # SIGTERM (kill, systemd, docker stop) shuts down like Ctrl-C: Serve and the local Ray stop with us.
    signal.signal(signal.SIGTERM, _interrupt)
    init: Dict[str, Any] = dict(namespace="serve")
    if cli["address"] is not None:
        init["address"] = cli["address"]
    else:
        init["include_dashboard"] = cli["dashboard"]
        if cli["object_store_mb"]:
            init["object_store_memory"] = cli["object_store_mb"] * 1024 * 1024
    ray.init(**init)
    try:
        model = o.pop("model")
        app = build_app(model, **o)
        serve.start(http_options={"host": cli["host"], "port": cli["port"]})
        serve.run(app, name=cli["name"], route_prefix=cli["route_prefix"])
        print(f"ddim.serve: {model} ready at {where} ({o['replicas'] if o['max_replicas'] is None else 'autoscaled'}"
              f" replica(s), device {o['device']}); Ctrl-C stops it\n"
              f"  curl -s -X POST {where}{cli['route_prefix'].rstrip('/')}/sample -d '{{\"seed\": 0, \"steps\": 20}}'"
              " -o sample.png", file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("ddim.serve: shutting down", file=sys.stderr)
        return 0
    except Exception as e:  # noqa: BLE001 - one line, then a clean shutdown
        print(f"ddim.serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            if cli["address"] is None:
                serve.shutdown()  # our own local Ray: stop everything
            else:
                serve.delete(cli["name"])  # a shared cluster: remove our application only
        except Exception as e:  # noqa: BLE001 - still disconnect
            print(f"ddim.serve: warning: shutdown: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    # Run the copy imported as ddim.serve, so that Ray pickles DDIMSampler by reference to this module (a class
    # of __main__ would be pickled by value).
    from ddim.serve import main as _main

    sys.exit(_main())
