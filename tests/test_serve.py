"""`edgeact serve` through the official openai client: the API, per-request steering, bad requests,
disconnects, the queue. The server runs as the CLI starts it, on a free localhost port."""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
CTX = 512
VEC_LAYERS = "10-14"


def _vectors(folder, hidden: int):
    from edgeact.control_vector import save_control_vector

    rng = np.random.default_rng(7)
    out = {}
    for name in ("cheerful", "gloomy"):
        directions = {l: rng.standard_normal(hidden).astype(np.float32) for l in range(10, 15)}
        save_control_vector(folder / f"{name}.gguf", directions)
        out[name] = directions
    return out


class Served:
    def __init__(self, folder, tmp, extra=()):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from edgeact.cli import main; sys.exit(main())", "serve", str(folder),
             "--port", "0", "--threads", "1", "--ctx-size", str(CTX), "--api-key", KEY, *extra],
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"edgeact serve did not start: {line}{self.proc.stderr.read()}")
        self.base = line.split("http://")[1].split("/v1")[0]
        self.url = f"http://{self.base}"
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def wait_idle(self, **want) -> dict:
        """Poll /health until no session is busy (a bounded wait: the worker notices at its next token)."""
        for _ in range(600):
            h = self.health()
            if h["busy"] == 0 and all(h[k] == v for k, v in want.items()):
                return h
            time.sleep(0.05)
        raise AssertionError(f"sessions still busy: {h}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def model(smollm2_int4_dir):
    import edgeact

    return edgeact.load(smollm2_int4_dir, threads=1, n_ctx=CTX)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("vectors")
    return folder, _vectors(folder, model.config.hidden_size)


@pytest.fixture(scope="module")
def server(smollm2_int4_dir, vectors, tmp_path_factory):
    s = Served(smollm2_int4_dir, tmp_path_factory.mktemp("serve"),
               ["--sessions", "3", "--queue", "0", "--vectors", str(vectors[0]), "--model-name", "smollm2"])
    yield s
    s.close()


MSGS = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["smollm2"]
    h = server.health()
    assert h["status"] == "ok" and h["sessions"] == 3 and len(h["session_memory_bytes"]) == 3


def test_chat_matches_the_python_api_with_usage(server, model):
    r = server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=24)
    want = model.session().chat(MSGS, max_new_tokens=24)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "eos" else "length")
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    assert r.usage.completion_tokens == len(want.ids)
    assert r.usage.total_tokens == len(want.prompt_ids) + len(want.ids)


def test_streaming_equals_non_streaming(server):
    kw = dict(model="smollm2", messages=MSGS, temperature=0, max_tokens=16)
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # completions, streamed
    parts = list(server.client.completions.create(model="smollm2", prompt="The sea is", max_tokens=8,
                                                  temperature=0, stream=True))
    whole = server.client.completions.create(model="smollm2", prompt="The sea is", max_tokens=8, temperature=0)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert whole.usage.completion_tokens == 8


def test_stop_and_sampling_options(server, model):
    r = server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=24,
                                              stop=[" Paris"])
    want = model.session().chat(MSGS, max_new_tokens=24, stop=[" Paris"])
    assert r.choices[0].message.content == want.text and " Paris" not in want.text
    assert r.choices[0].finish_reason == "stop"
    kw = dict(model="smollm2", messages=MSGS, temperature=0.9, top_p=0.9, seed=11, max_tokens=12)
    a, b = (server.client.chat.completions.create(**kw) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # the seed fixes the draw


def test_conversation_reuses_the_cache(server):
    first = server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=12)
    convo = MSGS + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And of Germany?"}]
    second = server.client.chat.completions.create(model="smollm2", messages=convo, temperature=0, max_tokens=12)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_concurrent_requests_get_their_own_steering(server, model, vectors):
    _, vecs = vectors
    prompts = {"cheerful": "Tell me about your day.", "gloomy": "Describe the weather.", None: "Name a fruit."}
    results = {}

    def ask(name):
        extra = {"steering": [{"vector": name, "scale": 1.0, "layers": VEC_LAYERS}]} if name else {}
        r = server.client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompts[name]}], temperature=0, max_tokens=16,
            extra_body=extra)
        results[name] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(n,)) for n in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, prompt in prompts.items():
        steering = [{"vector": vecs[name], "scale": 1.0, "layers": VEC_LAYERS}] if name else None
        want = model.session().chat([{"role": "user", "content": prompt}], max_new_tokens=16, steering=steering)
        assert results[name] == want.text, name
    plain = model.session().chat([{"role": "user", "content": prompts["cheerful"]}], max_new_tokens=16)
    assert plain.text != results["cheerful"]  # the vector does change the reply
    # inline arrays work the same as the named vector
    inline = {str(l): v.tolist() for l, v in vecs["cheerful"].items()}
    r = server.client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompts["cheerful"]}], temperature=0, max_tokens=16,
        extra_body={"steering": [{"vector": inline, "scale": 1.0, "layers": VEC_LAYERS}]})
    assert r.choices[0].message.content == results["cheerful"]


def test_steering_vectors_list_and_upload(server, vectors, model):
    auth = {"Authorization": f"Bearer {KEY}"}
    names = [v["name"] for v in httpx.get(server.url + "/v1/steering/vectors", headers=auth).json()["data"]]
    assert names == ["cheerful", "gloomy"]
    raw = (vectors[0] / "gloomy.gguf").read_bytes()
    r = httpx.post(server.url + "/v1/steering/vectors", headers=auth,
                   json={"name": "sad", "gguf_base64": base64.b64encode(raw).decode()})
    assert r.status_code == 200 and r.json()["layers"] == list(range(10, 15))
    wide = {"name": "wide", "vectors": {"3": [0.5] * (model.config.hidden_size + 1)}}
    nan = {"name": "nan", "vectors": {"3": ["nan"] * model.config.hidden_size}}
    deep = {"name": "deep", "vectors": {"99": [0.5] * model.config.hidden_size}}
    for bad in (wide, nan, deep, {"name": "x", "gguf_base64": base64.b64encode(b"GGUF nonsense").decode()}):
        r = httpx.post(server.url + "/v1/steering/vectors", headers=auth, json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad["name"]
    names = [v["name"] for v in httpx.get(server.url + "/v1/steering/vectors", headers=auth).json()["data"]]
    assert names == ["cheerful", "gloomy", "sad"]


def _post(server, body=None, path="/v1/chat/completions", key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, headers=headers, content=raw if raw is not None else json.dumps(body))


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, model):
    hidden = model.config.hidden_size
    ok = {"model": "smollm2", "messages": MSGS, "max_tokens": 2, "temperature": 0}
    cases = {
        "malformed JSON": (400, dict(raw=b'{"model": "smollm2", "messages": [')),
        "body over the limit": (413, dict(raw=b'{"x": "' + b"a" * (5 << 20) + b'"}')),
        "unknown model": (404, dict(body={**ok, "model": "gpt-9"})),
        "unknown vector": (400, dict(body={**ok, "steering": [{"vector": "nope"}]})),
        "vector of the wrong width": (400, dict(body={**ok, "steering": [{"vector": [1.0] * (hidden - 1),
                                                                          "layers": "3"}]})),
        "NaN in an inline vector": (400, dict(body={**ok, "steering": [{"vector": ["NaN"] * hidden, "layers": 3}]})),
        "NaN literal": (400, dict(raw=json.dumps(ok)[:-1].encode() + b', "temperature": NaN}')),
        "max_tokens < 0": (400, dict(body={**ok, "max_tokens": -1})),
        "prompt longer than the context": (400, dict(body={**ok, "messages": [
            {"role": "user", "content": "word " * (CTX + 10)}]})),
        "wrong API key": (401, dict(body=ok, key="wrong")),
        "schema the grammar engine rejects": (400, dict(body={**ok, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})),
        "bad temperature": (400, dict(body={**ok, "temperature": -1})),
        "bad messages": (400, dict(body={**ok, "messages": "hi"})),
        "bad stream_options": (400, dict(body={**ok, "stream": True, "stream_options": 3})),
        "scale for a layer the vector lacks": (400, dict(body={**ok, "steering": [
            {"vector": "cheerful", "scale": {"2": 1.0}}]})),
    }
    for what, (status, kw) in cases.items():
        r = _post(server, **kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], what
        assert r.headers["content-type"].startswith("application/json"), what
        # ... and the server still answers
        assert _post(server, ok).status_code == 200, what
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_json_schema_output_parses_and_validates(server):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                               "coastal": {"type": "boolean"}},
              "required": ["city", "population", "coastal"], "additionalProperties": False}
    r = server.client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], temperature=0,
        max_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].finish_reason == "stop"


def test_disconnect_frees_the_session_and_a_full_pool_answers_503(server):
    before = server.wait_idle()
    body = {"model": "smollm2", "messages": MSGS, "max_tokens": CTX - 64, "temperature": 0, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    streams = []
    with httpx.Client(timeout=60) as c:
        for _ in range(3):  # hold all three sessions
            cm = c.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers)
            resp = cm.__enter__()
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # generation is under way
            streams.append((cm, lines))
        r = _post(server, {**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        for cm, _ in streams:
            cm.__exit__(None, None, None)  # the client goes away mid-stream
    h = server.wait_idle(cancelled=before["cancelled"] + 3)
    assert h["busy"] == 0
    r = server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=4)
    assert r.choices[0].message.content


def test_session_pool_queue_is_bounded_and_fair():
    from edgeact.server import ApiError, SessionPool

    class Fake:
        def __init__(self, ids):
            self.ids = ids

        def common_prefix(self, ids):
            return next((i for i, (a, b) in enumerate(zip(self.ids, ids)) if a != b), min(len(self.ids), len(ids)))

    async def scenario():
        pool = SessionPool([Fake([1, 2, 3]), Fake([7, 8])], max_queue=1)
        a = await pool.acquire([7, 8, 9])
        assert a.ids == [7, 8]  # the longest cached prefix
        b = await pool.acquire([7, 8, 9])
        waiter = asyncio.ensure_future(pool.acquire([1]))
        await asyncio.sleep(0)
        assert len(pool.waiters) == 1
        with pytest.raises(ApiError) as e:
            await pool.acquire([1])
        assert e.value.status == 503
        pool.release(b)
        assert pool.idle == []  # handed to the waiter at once: a newcomer cannot take it first
        gone = asyncio.ensure_future(pool.acquire([1]))  # ... it queues instead
        await asyncio.sleep(0)
        assert (await waiter) is b
        assert len(pool.waiters) == 1
        gone.cancel()  # a request that leaves the queue leaves no trace in it
        await asyncio.gather(gone, return_exceptions=True)
        assert not pool.waiters
        pool.release(a)
        pool.release(b)
        assert pool.busy == 0

    asyncio.run(scenario())


def test_logprobs(server, model):
    r = server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    # greedy: the chosen token is the most likely one, and its logprob is the model's log softmax
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
    logits = model.forward(model.chat_ids(MSGS))[-1].astype(np.float64)
    want = logits.max() - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    assert content[0].logprob == pytest.approx(want, abs=1e-3)
    streamed = list(server.client.chat.completions.create(model="smollm2", messages=MSGS, temperature=0, max_tokens=6,
                                                          logprobs=True, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(tokens) == r.choices[0].message.content
    bad = _post(server, {"model": "smollm2", "messages": MSGS, "logprobs": True, "top_logprobs": 99})
    assert bad.status_code == 400
