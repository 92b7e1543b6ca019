"""`edgeact serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE for streaming).

One loaded model, a pool of Sessions over its weights. A request takes the idle session whose
cache shares the longest prefix with its prompt (a conversation's next request finds its earlier
turns there), runs in a worker thread, and gives the session back when it ends, fails, or its
client goes away (checked before every token). Requests beyond the pool wait in a bounded queue;
a full queue answers 503 with Retry-After. Beyond the OpenAI API: per-request `steering`
(vectors by name from --vectors DIR or uploaded, or inline arrays) and `ignore_eos`.
"""

import asyncio
import base64
import collections
import hmac
import importlib.util
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from edgeact.generation import GenerationConfig
from edgeact.session import parse_steering
from edgeact.steering import Steering, as_directions

MAX_STOPS = 4


class ApiError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_busy"}.get(self.status, "invalid_request_error"
                                                                   if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class SessionPool:
    """Sessions over one model; acquire() prefers the longest cached prefix. Event-loop side only."""

    def __init__(self, sessions: list, max_queue: int):
        self.sessions = list(sessions)
        self.idle = list(self.sessions)
        self.waiters: collections.deque = collections.deque()
        self.max_queue = max_queue
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._clock = 0
        self._used: dict[int, int] = {}

    @property
    def busy(self) -> int:
        return len(self.sessions) - len(self.idle)

    async def acquire(self, prompt_ids: list[int]):
        if self.idle and not self.waiters:
            return self._take(prompt_ids)
        if len(self.waiters) >= self.max_queue:
            self.stats["rejected"] += 1
            raise ApiError(503, f"all {len(self.sessions)} sessions are busy and {len(self.waiters)} requests "
                           "are queued: retry shortly", code="server_busy", headers={"Retry-After": "1"})
        entry = (asyncio.get_running_loop().create_future(), prompt_ids)
        self.waiters.append(entry)
        try:
            return await entry[0]
        except asyncio.CancelledError:
            fut = entry[0]
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # handed a session, but the request is gone
            elif entry in self.waiters:
                self.waiters.remove(entry)
            raise

    def _take(self, prompt_ids):
        best = max(self.idle, key=lambda s: (s.common_prefix(prompt_ids), -self._used.get(id(s), 0)))
        self.idle.remove(best)
        return best

    def release(self, session) -> None:
        """Back to the pool, or straight to the longest-waiting request (no newcomer can take it first)."""
        self._clock += 1
        self._used[id(session)] = self._clock
        self.idle.append(session)
        while self.waiters and self.idle:
            fut, ids = self.waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(ids))


class VectorStore:
    """Named steering vectors: {name: {layer: float32 [hidden]}} checked against the model."""

    def __init__(self, num_layers: int, hidden_size: int):
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.vectors: dict[str, dict[int, np.ndarray]] = {}
        self.sources: dict[str, str] = {}

    def load_dir(self, folder) -> None:
        from edgeact.control_vector import load_control_vector

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"--vectors: {folder} is not a folder")
        for path in sorted(folder.glob("*.gguf")):
            self.add(path.stem, load_control_vector(path, self.hidden_size, self.num_layers), "file")

    def add(self, name: str, directions: dict, source: str) -> None:
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError("a vector name is 1-64 letters, digits, '-', '_' or '.'")
        self.vectors[name] = as_directions(directions, self.num_layers, self.hidden_size)
        self.sources[name] = source

    def listing(self) -> list[dict]:
        return [{"name": n, "object": "steering.vector", "source": self.sources[n], "layers": sorted(v),
                 "norms": {str(l): round(float(np.linalg.norm(x)), 4) for l, x in sorted(v.items())}}
                for n, v in sorted(self.vectors.items())]


class Server:
    def __init__(self, model, model_id: str, sessions: int = 2, max_queue: int = 16, api_key: str | None = None,
                 max_body: int = 4 << 20, vectors_dir=None, default_max_tokens: int = 512):
        self.model, self.model_id = model, model_id
        self.pool: SessionPool | None = None
        self.n_sessions, self.max_queue = sessions, max_queue
        self.api_key, self.max_body, self.default_max_tokens = api_key, max_body, default_max_tokens
        cfg = model.config
        self.store = VectorStore(cfg.num_layers, cfg.hidden_size)
        if vectors_dir:
            self.store.load_dir(vectors_dir)
        self.n_ctx = model.engine.max_context
        self.created = int(time.time())

    # ---- request parsing
    async def read_json(self, request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise ApiError(413, f"the request body is {size} bytes, more than the limit of {self.max_body}",
                           code="body_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body:
                raise ApiError(413, f"the request body is more than the limit of {self.max_body} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def check_auth(self, request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model {name!r} does not exist here; this server serves {self.model_id!r}",
                           code="model_not_found", param="model")

    def gen_config(self, body: dict, prompt_len: int) -> GenerationConfig:
        def number(key, default, kind=float):
            v = body.get(key, default)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
                raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}",
                               code="invalid_value", param=key)
            if not math.isfinite(v):
                raise ApiError(400, f"{key} must be finite", code="invalid_value", param=key)
            return kind(v)

        room = self.n_ctx - prompt_len
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = min(self.default_max_tokens, room) if max_tokens is None else number("max_tokens", 0, int)
        if max_tokens < 0:
            raise ApiError(400, f"max_tokens must be >= 0, got {max_tokens}", code="invalid_value", param="max_tokens")
        if number("n", 1, int) != 1:
            raise ApiError(400, "only n=1 is supported", code="invalid_value", param="n")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings",
                           code="invalid_value", param="stop")
        seed = body.get("seed")
        if seed is not None:
            seed = number("seed", 0, int)
            if seed < 0:
                raise ApiError(400, "seed must be >= 0", code="invalid_value", param="seed")
        cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=number("temperature", 1.0),
                               top_k=number("top_k", 0, int), top_p=number("top_p", 1.0),
                               repetition_penalty=number("repetition_penalty", 1.0), seed=seed, stop=stops)
        try:
            cfg.validate()
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        return cfg

    def logprobs(self, body: dict, chat: bool) -> tuple[bool, int]:
        """(logprobs wanted, how many top alternatives): chat's logprobs + top_logprobs (0-20),
        completions' logprobs (0-5)."""
        if chat:
            want = body.get("logprobs")
            if want not in (None, True, False):
                raise ApiError(400, "logprobs must be true or false", code="invalid_value", param="logprobs")
            top = body.get("top_logprobs") or 0
            if want and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
                raise ApiError(400, "top_logprobs must be an integer in 0..20", code="invalid_value",
                               param="top_logprobs")
            return bool(want), int(top) if want else 0
        top = body.get("logprobs")
        if top is None:
            return False, 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 5:
            raise ApiError(400, "logprobs must be an integer in 0..5", code="invalid_value", param="logprobs")
        return True, top

    def _token_text(self, i: int) -> str:
        tok = self.model.tokenizer
        return tok.decode([i], skip_special_tokens=False) if tok is not None else str(i)

    def format_logprobs(self, entries: list[dict], chat: bool) -> dict:
        if chat:
            def one(i, lp):
                text = self._token_text(i)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [dict(one(e["id"], e["logprob"]), top_logprobs=[one(i, lp) for i, lp in e["top"]])
                                for e in entries]}
        tokens = [self._token_text(e["id"]) for e in entries]
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist() if tokens else []
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{self._token_text(i): lp for i, lp in e["top"]} for e in entries],
                "text_offset": offsets}

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", code="invalid_value")
        if len(ids) >= self.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} (prompt and reply)",
                           code="context_length_exceeded")

    def steering(self, body: dict):
        req = body.get("steering")
        if req is None:
            return None
        if isinstance(req, dict):
            req = [req]
        if not isinstance(req, list) or len(req) > 16:
            raise ApiError(400, "steering must be a list of at most 16 {vector, scale, layers, mode} objects",
                           code="invalid_steering", param="steering")
        items = []
        for i, item in enumerate(req):
            if not isinstance(item, dict):
                raise ApiError(400, f"steering[{i}] must be an object", code="invalid_steering", param="steering")
            item = dict(item)
            vec = item.get("vector")
            if isinstance(vec, str):
                if vec not in self.store.vectors:
                    raise ApiError(400, f"steering[{i}]: unknown vector {vec!r}; GET /v1/steering/vectors lists "
                                   "them", code="unknown_vector", param="steering")
                item["vector"] = self.store.vectors[vec]
            elif isinstance(vec, dict):
                try:
                    item["vector"] = {int(k): v for k, v in vec.items()}
                except ValueError:
                    raise ApiError(400, f"steering[{i}]: vector keys must be layer numbers", code="invalid_steering",
                                   param="steering") from None
            elif not isinstance(vec, list):
                raise ApiError(400, f"steering[{i}].vector must be a name, an array or {{layer: array}}",
                               code="invalid_steering", param="steering")
            if isinstance(item.get("scale"), dict):  # JSON object keys are strings; layers are numbers
                try:
                    item["scale"] = {int(k): v for k, v in item["scale"].items()}
                except ValueError:
                    raise ApiError(400, f"steering[{i}]: scale keys must be layer numbers", code="invalid_steering",
                                   param="steering") from None
            items.append(item)
        cfg = self.model.config
        try:
            return parse_steering(Steering(cfg.num_layers, cfg.hidden_size), items)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_steering", param="steering") from None

    def constraint(self, body: dict):
        fmt = body.get("response_format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "response_format.type must be text, json_object or json_schema",
                           code="invalid_value", param="response_format")
        if fmt["type"] == "text":
            return None
        schema = {"type": "object"}
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ApiError(400, "response_format.json_schema must be {name, schema}", code="invalid_value",
                               param="response_format")
            schema = spec["schema"]
        from edgeact.grammar import JsonSchemaConstraint

        try:
            return JsonSchemaConstraint(self.model, schema)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_schema", param="response_format") from None

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list", code="invalid_value", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages",
                               code="invalid_value")
            content = m.get("content") or ""
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages",
                                   code="invalid_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", param="messages", code="invalid_value")
            clean.append({"role": m["role"], "content": content})
        if self.model.tokenizer is None or not self.model.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        try:
            return self.model.chat_ids(clean)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value", param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if self.model.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", code="invalid_value",
                               param="prompt")
            return self.model.tokenize(p)
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < self.model.engine.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is out of range", code="invalid_value", param="prompt")
            return p
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                       code="invalid_value", param="prompt")

    # ---- running
    async def run(self, request, body: dict, chat: bool):
        """Validate, queue, generate; a JSONResponse or a StreamingResponse."""
        from fastapi.responses import JSONResponse, StreamingResponse

        self.check_model(body)
        ids = self.chat_prompt(body) if chat else self.completion_prompt(body)
        self.check_prompt(ids)
        cfg = self.gen_config(body, len(ids))
        steering = self.steering(body)
        constraint = self.constraint(body)
        ignore_eos = bool(body.get("ignore_eos", False))
        want_lp, top_lp = self.logprobs(body, chat)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", code="invalid_value", param="stream_options")
        include_usage = bool(options.get("include_usage")) if stream else False
        self.pool.stats["requests"] += 1
        session = await self.pool.acquire(ids)
        job = Job(self, session, ids, cfg, steering, constraint, ignore_eos, want_lp, top_lp)
        job.start()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not stream:
            try:
                text = []
                async for kind, value, entries in job.events():
                    text.append(value)
            except asyncio.CancelledError:
                job.cancel()
                raise
            if job.error is not None:
                raise job.api_error()
            res = job.result
            reply = "".join(text)
            finish = _finish(res["finish_reason"])
            eos = self.model.eos_token_ids
            lp = self.format_logprobs([e for e in job.lp if e["id"] not in eos], chat) if want_lp else None
            choice = ({"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": lp,
                       "finish_reason": finish} if chat else
                      {"index": 0, "text": reply, "logprobs": lp, "finish_reason": finish})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": self.model_id, "choices": [choice],
                                 "usage": job.usage(), "system_fingerprint": None})

        def chunk(delta=None, finish=None, usage=None, empty=False, entries=None):
            lp = self.format_logprobs(entries, chat) if want_lp and entries else None
            if chat:
                choices = [] if empty else [{"index": 0, "delta": delta or {}, "logprobs": lp,
                                             "finish_reason": finish}]
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                       "choices": choices}
            else:
                choices = [] if empty else [{"index": 0, "text": (delta or {}).get("content", ""), "logprobs": lp,
                                             "finish_reason": finish}]
                obj = {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                       "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                async for kind, value, entries in job.events():
                    yield chunk({"content": value}, entries=entries)
                if job.error is not None:
                    yield f"data: {json.dumps(job.api_error().body())}\n\n"
                else:
                    yield chunk({}, _finish(job.result["finish_reason"]))
                    if include_usage:
                        yield chunk(usage=job.usage(), empty=True)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client gone mid-stream: the worker stops before its next token

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}.get(reason, "stop")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class Job:
    """One generation on a worker thread; pieces cross to the event loop through a queue."""

    def __init__(self, server: Server, session, ids, cfg, steering, constraint, ignore_eos, logprobs=False,
                 top_logprobs=0):
        self.server, self.session, self.ids, self.cfg = server, session, ids, cfg
        self.steering, self.constraint, self.ignore_eos = steering, constraint, ignore_eos
        self.lp = [] if logprobs else None
        self.top_lp = top_logprobs
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.result: dict = {}
        self.error: Exception | None = None

    def start(self) -> None:
        threading.Thread(target=self._work, name="edgeact-gen", daemon=True).start()

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        stats = self.server.pool.stats
        gen = None
        outcome = "completed"
        try:
            gen = self.session._stream(self.ids, self.cfg, self.result, self.steering, self.constraint,
                                       self.ignore_eos, self.lp, self.top_lp)
            sent = 0
            while True:
                if self.cancelled.is_set():
                    outcome = "cancelled"
                    break
                try:
                    piece = next(gen)
                except StopIteration:
                    break
                entries = self.lp[sent:] if self.lp is not None else []
                sent += len(entries)
                self._put(("piece", piece if isinstance(piece, str) else str(piece), entries))
        except Exception as e:  # noqa: BLE001 - reported to the client as a JSON error
            self.error, outcome = e, "failed"
        finally:
            if gen is not None:
                gen.close()
            self.loop.call_soon_threadsafe(self._finish, outcome)

    def _finish(self, outcome: str) -> None:
        self.server.pool.stats[outcome] += 1
        self.server.pool.release(self.session)
        self.queue.put_nowait(("end", None, None))

    async def events(self):
        """(kind, text piece, logprob entries of the tokens that made it) until the job ends."""
        while True:
            kind, value, entries = await self.queue.get()
            if kind == "end":
                return
            yield kind, value, entries

    def api_error(self) -> ApiError:
        if isinstance(self.error, ValueError):  # e.g. a bad token id in the prompt
            return ApiError(400, str(self.error), code="invalid_value")
        return ApiError(500, f"generation failed: {type(self.error).__name__}: {self.error}",
                        code="generation_failed")

    def usage(self) -> dict:
        n = len(self.result.get("ids", []))
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n,
                "prompt_tokens_details": {"cached_tokens": self.session.last.get("cached_tokens", 0)}}


def create_app(server: Server):
    """The FastAPI application (routes, JSON errors, the session pool made on startup)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        if server.pool is None:
            from edgeact.session import Session

            model = server.model  # the first session runs on the model's own engine, idle otherwise
            sessions = [Session(model, engine=model.engine)] + [model.session() for _ in range(server.n_sessions - 1)]
            server.pool = SessionPool(sessions, server.max_queue)
            mib = [f"{x.memory_bytes / 2**20:.0f}" for x in sessions]
            print(f"edgeact serve: session memory {', '.join(mib)} MiB (the weights are shared)", file=sys.stderr,
                  flush=True)
            if model.tokenizer is not None and importlib.util.find_spec("llguidance") is not None:
                from edgeact.grammar import _ll_tokenizer

                await asyncio.to_thread(_ll_tokenizer, model)  # once, not in a request's time
        yield

    app = FastAPI(title="edgeact", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}", code="internal_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        pool = server.pool
        return {"status": "ok", "model": server.model_id, "sessions": len(pool.sessions), "busy": pool.busy,
                "queued": len(pool.waiters), "n_ctx": server.n_ctx,
                "session_memory_bytes": [s.memory_bytes for s in pool.sessions], **pool.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "edgeact"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_auth(request)
        return await server.run(request, await server.read_json(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_auth(request)
        return await server.run(request, await server.read_json(request), chat=False)

    @app.get("/v1/steering/vectors")
    async def list_vectors(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": server.store.listing()}

    @app.post("/v1/steering/vectors")
    async def add_vector(request: Request):
        """{"name": ..., "gguf_base64": <a llama.cpp control vector file>} or {"name": ..., "vectors":
        {layer: [hidden floats]}}; checked against the model (layers, width, finite values)."""
        server.check_auth(request)
        body = await server.read_json(request)
        name = body.get("name")
        try:
            if "gguf_base64" in body:
                directions = _gguf_directions(body["gguf_base64"], server.store)
            elif isinstance(body.get("vectors"), dict):
                directions = {int(k): v for k, v in body["vectors"].items()}
            else:
                raise ValueError("send gguf_base64 (a control-vector GGUF) or vectors ({layer: [floats]})")
            server.store.add(name, directions, "uploaded")
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), code="invalid_vector") from None
        return {"object": "steering.vector", **next(v for v in server.store.listing() if v["name"] == name)}

    return app


def _gguf_directions(data, store: VectorStore) -> dict:
    from edgeact.control_vector import load_control_vector

    if not isinstance(data, str):
        raise ValueError("gguf_base64 must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise ValueError("gguf_base64 is not valid base64") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.gguf"
        path.write_bytes(raw)
        try:
            return load_control_vector(path, store.hidden_size, store.num_layers)
        except ValueError as e:
            raise ValueError(str(e).replace(str(path), "the uploaded vector")) from None
