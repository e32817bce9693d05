"""The Ray-free part of ``ddim.serve``: requests, the per-replica engine, image encoding.

Nothing here imports Ray, so it can be used (and tested) on its own:

* ``Limits`` and ``parse_request``: a JSON-like dict to a validated ``SampleRequest``. Field types and the
  server's limits are checked here; the sampling parameters themselves (steps, eta, spacing, steps_offset, the
  clip options) are checked by the engine's own ``ddim.Scheduler``, whose message is what the caller sees. All
  of it happens before a request joins a batch, so a bad request never reaches the engine.
* ``Engine``: one model, ``ddim.Session`` objects of batch sizes 1, 2, 4, ... up to ``max_batch`` created
  lazily, and ONE worker thread that owns them (a Session serves one thread at a time). ``submit`` queues work
  items (a request's settings and some of its seeds); whenever the worker is free it takes the oldest item's
  settings and every pending item with the same settings, up to ``max_batch`` images, so batches that formed
  while the engine was busy merge. ``run_batch`` covers a group greedily with the largest sessions that fit
  (7 images: 4 + 2 + 1, nothing padded) and returns one result per item: its images, or the error that
  stopped it (``partial="pad"`` instead runs one padded call of the next size). A failed engine call is
  retried item by item, so one bad item does not fail its batch.
* ``float_to_bytes``, ``encode_png``, ``encode_npy``: the output formats. ``float_to_bytes`` is the ``ddim``
  command-line tool's conversion (tools/ddim/png.cpp), bit for bit: v = (x + 1) / 2 clamped to [0, 1],
  byte = floor(v * 255 + 0.5) in double precision, NaN -> 0. The PNG writer is zlib + struct only.
"""

from __future__ import annotations

import io
import itertools
import struct
import threading
import warnings
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import ddim

__all__ = [
    "FORMATS", "Engine", "ItemResult", "Limits", "RequestError", "SampleRequest", "WorkItem", "encode_npy",
    "decode_png", "encode_png", "float_to_bytes", "images_in", "plan_calls", "PARTIAL_MODES", "parse_request", "session_sizes", "cover", "split_seeds",
]

SEED_MAX = 2**64 - 1
FORMATS = ("png", "npy")

# Request fields: name -> what it must be (for messages).
_FIELDS = {
    "seed": "an integer in [0, 2^64)",
    "seeds": "a non-empty list of integers in [0, 2^64)",
    "steps": "an integer",
    "eta": "a number",
    "spacing": "a string (leading, trailing, linspace, uniform, quadratic, log) or null",
    "clip_sample": "true, false or null",
    "set_alpha_to_one": "true, false or null",
    "steps_offset": "an integer or null",
    "use_clipped_model_output": "true or false",
    "format": "'png' or 'npy'",
}


class RequestError(ddim.InvalidArgumentError):
    """A request the server refuses before sampling: ``status`` is the HTTP status (400, or 413 for a body over
    the size limit). Also a ``ddim.InvalidArgumentError`` (and a ``ValueError``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps `status` across pickling (Ray sends exceptions to the caller)
        return (type(self), (str(self), self.status))


@dataclass(frozen=True)
class Limits:
    """What one replica accepts. ``max_seeds``: images per request; ``max_steps``: DDIM steps per request;
    ``max_body_bytes``: HTTP request body; ``default_steps``: steps when a request names none."""

    max_seeds: int = 16
    max_steps: int = 1000
    max_body_bytes: int = 64 * 1024
    default_steps: int = 50

    def __post_init__(self) -> None:
        for name in ("max_seeds", "max_steps", "max_body_bytes", "default_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) exceeds max_steps ({self.max_steps})")


@dataclass(frozen=True)
class SampleRequest:
    """A validated request. ``settings`` is the batching key: requests run in one engine call only when their
    settings are equal. None in a field means the model's default (already resolved in ``settings``)."""

    seeds: Tuple[int, ...]
    steps: int
    eta: float = 0.0
    spacing: Optional[str] = None
    clip_sample: Optional[bool] = None
    set_alpha_to_one: Optional[bool] = None
    steps_offset: Optional[int] = None
    use_clipped_model_output: bool = False
    format: str = "png"
    settings: Tuple[Any, ...] = ()

    def sample_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``Session.sample`` besides ``steps`` and ``seeds``."""
        return dict(eta=self.eta, spacing=self.spacing, clip_sample=self.clip_sample,
                    set_alpha_to_one=self.set_alpha_to_one, steps_offset=self.steps_offset,
                    use_clipped_model_output=self.use_clipped_model_output)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_error(name: str, value: Any) -> RequestError:
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return RequestError(f"'{name}' must be {_FIELDS[name]}, got {shown}")


def _seed(name: str, value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise _type_error(name, value)
    return int(value)


def _optional_bool(body: Dict[str, Any], name: str) -> Optional[bool]:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _type_error(name, value)
    return value


def parse_request(body: Any, limits: Limits, scheduler: "ddim.Scheduler", channels: int,
                  schedule: Optional[Dict[str, Any]] = None) -> SampleRequest:
    """Validates a request (a dict, e.g. parsed JSON) against the limits and the model's scheduler.

    Raises ``RequestError`` (status 400) naming the field, or carrying the engine's own message for a sampling
    parameter the engine rejects (steps 0, eta < 0, an unknown spacing, a steps_offset out of range, ...).
    ``schedule`` (``Model.schedule``) resolves omitted options to the model's defaults in the batching key.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object, got {type(body).__name__}")
    unknown = sorted(str(k) for k in body if k not in _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(repr(k) for k in unknown)}; accepted: "
                           f"{', '.join(_FIELDS)}")

    if ("seed" in body) == ("seeds" in body):
        raise RequestError("give exactly one of 'seed' (one image) or 'seeds' (a list, one image per seed)")
    if "seed" in body:
        seeds: Tuple[int, ...] = (_seed("seed", body["seed"]),)
    else:
        raw = body["seeds"]
        if not isinstance(raw, list) or not raw:
            raise _type_error("seeds", raw)
        if len(raw) > limits.max_seeds:
            raise RequestError(f"'seeds' has {len(raw)} entries; this server allows at most {limits.max_seeds} "
                               "per request")
        seeds = tuple(_seed("seeds", s) for s in raw)

    steps = body.get("steps", limits.default_steps)
    if not _is_int(steps):
        raise _type_error("steps", steps)
    if steps > limits.max_steps:
        raise RequestError(f"'steps' is {steps}; this server allows at most {limits.max_steps}")

    eta = body.get("eta", 0.0)
    if not _is_number(eta):
        raise _type_error("eta", eta)
    eta = float(eta)

    spacing = body.get("spacing")
    if spacing is not None and not isinstance(spacing, str):
        raise _type_error("spacing", spacing)
    clip_sample = _optional_bool(body, "clip_sample")
    set_alpha_to_one = _optional_bool(body, "set_alpha_to_one")
    steps_offset = body.get("steps_offset")
    if steps_offset is not None and not _is_int(steps_offset):
        raise _type_error("steps_offset", steps_offset)
    use_clipped = body.get("use_clipped_model_output", False)
    if not isinstance(use_clipped, bool):
        raise _type_error("use_clipped_model_output", use_clipped)

    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise _type_error("format", fmt)
    if fmt == "png" and channels not in (1, 3):
        raise RequestError(f"this model makes {channels}-channel images; PNG needs 1 or 3 channels, ask for "
                           "format 'npy'")

    # The engine's own checks (the same code Session.sample runs first), with its messages.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "spacing X gives fewer distinct timesteps": not an error
            timesteps = scheduler.timesteps(steps, spacing=spacing, steps_offset=steps_offset)
        scheduler.coefficients(timesteps, eta, use_clipped_model_output=use_clipped, clip_sample=clip_sample,
                               set_alpha_to_one=set_alpha_to_one)
    except (ddim.InvalidArgumentError, ddim.UnsupportedError) as e:
        raise RequestError(str(e)) from None

    sched = schedule or {}
    settings = (
        steps, eta,
        spacing if spacing is not None else sched.get("timestep_spacing"),
        clip_sample if clip_sample is not None else sched.get("clip_sample"),
        set_alpha_to_one if set_alpha_to_one is not None else sched.get("set_alpha_to_one"),
        steps_offset if steps_offset is not None else sched.get("steps_offset"),
        use_clipped,
    )
    return SampleRequest(seeds=seeds, steps=steps, eta=eta, spacing=spacing, clip_sample=clip_sample,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                         use_clipped_model_output=use_clipped, format=fmt, settings=settings)


# ----------------------------------------------------------------------------------------------------------------
# Batching arithmetic
# ----------------------------------------------------------------------------------------------------------------


def session_sizes(max_batch: int) -> List[int]:
    """The session batch sizes a replica keeps: powers of two below ``max_batch``, and ``max_batch`` itself."""
    if not _is_int(max_batch) or not 1 <= max_batch <= ddim.MAX_BATCH:
        raise ValueError(f"max_batch must be an integer in [1, {ddim.MAX_BATCH}], got {max_batch!r}")
    sizes = [1 << k for k in range(max_batch.bit_length()) if (1 << k) < max_batch]
    return sizes + [max_batch]


PARTIAL_MODES = ("cover", "pad")


def plan_calls(n: int, sizes: Sequence[int], partial: str = "cover") -> List[Tuple[int, int]]:
    """The engine calls for n images as (session size, real images) pairs. ``cover``: greedy, largest first,
    nothing padded (7 with sizes 1, 2, 4, 8: 4 + 2 + 1). ``pad``: full calls of the largest size, then ONE call
    of the smallest size that holds the rest, padded (7: one call of 8 with 1 padding image)."""
    if partial == "cover":
        return [(s, s) for s in cover(n, sizes)]
    if partial != "pad":
        raise ValueError(f"partial must be one of {', '.join(PARTIAL_MODES)}, got {partial!r}")
    largest = max(sizes)
    out = [(largest, largest)] * (n // largest)
    rest = n % largest
    if rest:
        out.append((min(s for s in sizes if s >= rest), rest))
    return out


def cover(n: int, sizes: Sequence[int]) -> List[int]:
    """Greedy cover of n images by session sizes, largest first (sizes contain 1): 7 with (1, 2, 4, 8) is
    [4, 2, 1]. Nothing is padded: every image computed is one somebody asked for."""
    out: List[int] = []
    for size in sorted(sizes, reverse=True):
        while n >= size:
            out.append(size)
            n -= size
    if n:
        raise ValueError("sizes must contain 1")
    return out


@dataclass(frozen=True)
class WorkItem:
    """One unit of batching: a request and some of its seeds (a request with more seeds than ``max_batch`` is
    split into several items). ``len(item)`` counts images, which is what a batch's size is measured in."""

    request: SampleRequest
    seeds: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.seeds)


def split_seeds(request: SampleRequest, max_batch: int) -> List[WorkItem]:
    """The work items of a request: its seeds in chunks of at most ``max_batch``."""
    s = request.seeds
    return [WorkItem(request, s[i:i + max_batch]) for i in range(0, len(s), max_batch)]


def images_in(items: Iterable[WorkItem]) -> int:
    """``serve.batch``'s ``batch_size_fn``: a batch's size is its number of images, not of calls."""
    return sum(len(item) for item in items)


@dataclass
class ItemResult:
    """What one work item got: ``images`` (len(item), C, H, W) float32 and, per image, the id of the engine
    call that made it (``calls``); or ``error``, the exception that stopped it."""

    images: Optional[np.ndarray] = None
    calls: List[str] = field(default_factory=list)
    error: Optional[BaseException] = None


# ----------------------------------------------------------------------------------------------------------------
# The engine of one replica
# ----------------------------------------------------------------------------------------------------------------


class Engine:
    """One model, its sessions and the single worker thread that runs them.

    ``submit(items)`` (any thread) queues work items and returns futures; the worker runs the queue in batches of
    one settings key and at most ``max_batch`` images. ``run_batch`` is the synchronous core and must run on the
    worker thread (``engine.executor``). The counters (``stats()``) may be read from any thread.
    ``session_factory(model, batch)`` makes a session; the default is ``ddim.Session(model, device=device,
    batch=batch, threads=threads, precision=precision)``.
    """

    def __init__(self, model: "ddim.Model", *, device: str = "cpu", threads: int = 1, precision: str = "auto",
                 max_batch: int = 8, partial: str = "cover", label: str = "engine",
                 session_factory: Optional[Callable[[Any, int], Any]] = None) -> None:
        plan_calls(1, [1], partial)  # checks the name
        self.partial = partial
        self.model = model
        self.device = device
        self.threads = threads
        self.precision = precision
        self.sizes = session_sizes(max_batch)
        self.max_batch = max_batch
        self.label = label
        info = model.info
        # The images a request gets: a latent model's decoded images (its sessions decode), else the samples.
        factor = info.latent_factor if info.decoder else 1
        channels = info.image_channels if info.decoder else info.in_channels
        self.shape = (channels, info.height * factor, info.width * factor)
        self._factory = session_factory or self._make_session
        self._sessions: Dict[int, Any] = {}  # batch size -> Session; touched on the worker thread only
        self._lock = threading.Lock()
        self._counters = dict(engine_calls=0, images=0, padded_images=0, batches=0, items=0, failed_calls=0,
                              retried_items=0)
        self._unhealthy: Optional[str] = None
        self.backend: Optional[str] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddim-engine")
        self._pending: "deque[Tuple[WorkItem, Future]]" = deque()  # submitted, not yet started (under _lock)
        self._draining = False

    # -- sessions (worker thread) ----------------------------------------------------------------------------

    def _make_session(self, model: "ddim.Model", batch: int) -> "ddim.Session":
        return ddim.Session(model, device=self.device, batch=batch, threads=self.threads, precision=self.precision)

    def _session(self, size: int) -> Any:
        s = self._sessions.get(size)
        if s is None:
            s = self._factory(self.model, size)
            self._sessions[size] = s
            if self.backend is None:
                self.backend = str(getattr(s, "backend", self.device))
        return s

    def warm_up(self, sizes: Optional[Sequence[int]] = None) -> None:
        """Creates the sessions of these sizes now (default: size 1) on the worker thread; raises what fails."""
        for size in sizes or (1,):
            self.executor.submit(self._session, size).result()

    # -- sampling (worker thread) ----------------------------------------------------------------------------

    def _sample(self, request: SampleRequest, seeds: Sequence[int]) -> Tuple[np.ndarray, List[str]]:
        parts, calls, pos = [], [], 0
        kwargs = request.sample_kwargs()
        for size, real in plan_calls(len(seeds), self.sizes, self.partial):
            chunk = [int(s) for s in seeds[pos:pos + real]]
            chunk += [chunk[-1]] * (size - real)  # padding (partial="pad"): any seed, the image is dropped
            session = self._session(size)
            try:
                out = session.sample(request.steps, seeds=chunk, **kwargs)
            except ddim.DeviceLostError as e:
                # The session (and likely the device) is unusable: report unhealthy so Serve replaces us.
                self._sessions.clear()
                self._unhealthy = f"device lost: {e}"
                raise
            except BaseException:
                with self._lock:
                    self._counters["failed_calls"] += 1
                raise
            with self._lock:
                self._counters["engine_calls"] += 1
                self._counters["images"] += real
                self._counters["padded_images"] += size - real
                call_id = f"{self.label}:{self._counters['engine_calls']}"
            parts.append(np.asarray(out, dtype=np.float32)[:real])
            calls.extend([call_id] * real)
            pos += real
        images = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return images, calls

    def run_batch(self, items: Sequence[WorkItem]) -> List[ItemResult]:
        """Runs a batch of work items; never raises (each item's error is in its result)."""
        with self._lock:
            self._counters["batches"] += 1
            self._counters["items"] += len(items)
        results = [ItemResult() for _ in items]
        groups: Dict[Tuple[Any, ...], List[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.request.settings, []).append(i)
        for indices in groups.values():
            request = items[indices[0]].request
            seeds = list(itertools.chain.from_iterable(items[i].seeds for i in indices))
            try:
                images, calls = self._sample(request, seeds)
            except Exception as e:  # noqa: BLE001 - reported per item below
                if len(indices) == 1 or self._unhealthy:
                    for i in indices:
                        results[i].error = e
                    continue
                # Retry alone, so that only the items that fail by themselves get an error.
                with self._lock:
                    self._counters["retried_items"] += len(indices)
                for i in indices:
                    try:
                        results[i].images, results[i].calls = self._sample(items[i].request, items[i].seeds)
                    except Exception as e2:  # noqa: BLE001
                        results[i].error = e2
                continue
            pos = 0
            for i in indices:
                n = len(items[i])
                results[i].images = images[pos:pos + n]
                results[i].calls = calls[pos:pos + n]
                pos += n
        return results

    # -- the engine's queue (submit from any thread) ----------------------------------------------------------

    def submit(self, items: Sequence[WorkItem]) -> List["Future[ItemResult]"]:
        """Queues work items for the worker thread; one future per item, resolved with its ``ItemResult``.

        When the worker becomes free it takes the OLDEST pending item's settings and every pending item with the
        same settings, oldest first, up to ``max_batch`` images, and runs them as one batch (``run_batch``). So
        batches that formed while the engine was busy are merged, and each engine call is one settings group.
        A cancelled future's item is dropped before it runs."""
        futures: List[Future] = []
        with self._lock:
            for item in items:
                if len(item) > self.max_batch:
                    raise ValueError(f"a work item of {len(item)} images exceeds max_batch {self.max_batch}")
                f: Future = Future()
                self._pending.append((item, f))
                futures.append(f)
            if not self._draining and self._pending:
                self._draining = True
                self.executor.submit(self._drain)
        return futures

    def _take(self) -> List[Tuple[WorkItem, Future]]:
        """The next batch from the pending queue (under _lock): the oldest live item's settings, up to max_batch."""
        while self._pending and not self._pending[0][1].set_running_or_notify_cancel():
            self._pending.popleft()  # cancelled by its caller
        if not self._pending:
            return []
        first = self._pending.popleft()
        key, taken, kept, n = first[0].request.settings, [first], deque(), len(first[0])
        while self._pending:
            item, f = self._pending.popleft()
            if item.request.settings == key and n + len(item) <= self.max_batch:
                if f.set_running_or_notify_cancel():
                    taken.append((item, f))
                    n += len(item)
            else:
                kept.append((item, f))
        self._pending = kept
        return taken

    def _drain(self) -> None:
        while True:
            with self._lock:
                taken = self._take()
                if not taken:
                    self._draining = False
                    return
            try:
                results = self.run_batch([item for item, _ in taken])
                for (_, f), r in zip(taken, results):
                    f.set_result(r)
            except BaseException as e:  # noqa: BLE001 - run_batch does not raise; never leave a caller waiting
                for _, f in taken:
                    if not f.done():
                        f.set_exception(e)
                if not isinstance(e, Exception):
                    with self._lock:
                        self._draining = False
                    raise

    # -- state (any thread) ----------------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            out: Dict[str, Any] = dict(self._counters)
        out["sessions"] = sorted(self._sessions)
        return out

    def health_error(self) -> Optional[str]:
        """None when healthy, else why not (a lost device; a dead worker thread)."""
        if self._unhealthy:
            return self._unhealthy
        if getattr(self.executor, "_shutdown", False):
            return "the engine's worker thread was shut down"
        return None

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self._sessions.clear()


# ----------------------------------------------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------------------------------------------


def float_to_bytes(x: Any) -> np.ndarray:
    """Model space [-1, 1] to bytes, exactly as the ddim CLI writes PNGs: v = (x + 1) / 2 clamped to [0, 1],
    byte = floor(v * 255 + 0.5) in double precision (no fused multiply-add), NaN -> 0. Same shape, uint8."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        b = np.floor(((x + 1.0) * 0.5) * 255.0 + 0.5)
        b = np.where(x >= 1.0, 255.0, b)
        b = np.where(x > -1.0, b, 0.0)  # also NaN
    return b.astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: Any, text: Optional[Dict[str, str]] = None) -> bytes:
    """One image (C, H, W) in model space (float) or bytes (uint8) as an 8-bit PNG: C = 1 grayscale, C = 3 RGB.
    ``text``: tEXt chunks (Latin-1 keys of 1..79 printable characters)."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[0] not in (1, 3) or a.shape[1] < 1 or a.shape[2] < 1:
        raise ValueError(f"encode_png needs one (C, H, W) image with C = 1 or 3, got shape {a.shape}")
    pixels = a if a.dtype == np.uint8 else float_to_bytes(a)
    c, h, w = pixels.shape
    rows = np.ascontiguousarray(pixels.transpose(1, 2, 0)).reshape(h, w * c)
    raw = np.zeros((h, w * c + 1), dtype=np.uint8)  # filter byte 0 (None) per row
    raw[:, 1:] = rows
    out = [b"\x89PNG\r\n\x1a\n",
           _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        k = key.encode("latin-1")
        if not 1 <= len(k) <= 79 or any(ch < 32 or ch > 126 for ch in k):
            raise ValueError(f"PNG text keyword {key!r} is invalid (1-79 printable characters)")
        out.append(_chunk(b"tEXt", k + b"\x00" + str(value).encode("latin-1", "replace")))
    out.append(_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def decode_png(data: bytes) -> np.ndarray:
    """The pixels (C, H, W) uint8 of an 8-bit grayscale or RGB, non-interlaced PNG with filter-0 rows or any
    other filter (enough to read back what encode_png and the ddim CLI write)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or color not in (0, 2) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, color type {color}, interlace {interlace})")
    c = 1 if color == 0 else 3
    raw = zlib.decompress(b"".join(idat))
    stride = w * c
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        for i in range(stride):
            a = cur[i - c] if i >= c else 0
            b = prev[i]
            d = prev[i - c] if i >= c else 0
            if f == 0:
                p = 0
            elif f == 1:
                p = a
            elif f == 2:
                p = b
            elif f == 3:
                p = (a + b) // 2
            elif f == 4:
                q = a + b - d
                pa, pb, pc = abs(q - a), abs(q - b), abs(q - d)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else d)
            else:
                raise ValueError(f"unknown PNG filter {f}")
            cur[i] = (line[i] + p) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(h, w, c).transpose(2, 0, 1).copy()


def encode_npy(images: np.ndarray) -> bytes:
    """A float32 (N, C, H, W) array as the bytes of a .npy file (numpy.load reads it; no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()

