"""TextGenerator backends: the OpenAI-compatible client against a stub server on 127.0.0.1; the local one."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedkt.text_generators import (HFGenerator, OpenAIError, OpenAIGenerator, TextGenerator, make_generator,
                            parse_openai_spec)


class Stub:
    """Records requests; answers from `script` (a list of (status, body, headers)) first, then completions."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, object, dict]] = []
        self.models = ["stub-model"]
        self.batching = True


def make_handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep test output clean
            pass

        def _send(self, status: int, body, headers: dict | None = None):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def _record(self, body):
            stub.requests.append({"method": self.command, "path": self.path, "body": body,
                                  "auth": self.headers.get("Authorization")})

        def do_GET(self):
            self._record(None)
            if self.path.endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": m} for m in stub.models]})
            self._send(404, {"error": {"message": "no such path"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._record(body)
            if stub.script:
                return self._send(*stub.script.pop(0))
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            if not stub.batching:
                prompts = prompts[:1]
            # choices in reverse order, each with its index: the client must put them back in prompt order
            choices = [{"index": i, "text": f"ans({p}) END tail", "finish_reason": "length"}
                       for i, p in enumerate(prompts)][::-1]
            self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices})

    return Handler


@pytest.fixture()
def stub():
    s = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(s))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s.base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield s
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_spec_forms():
    assert parse_openai_spec("openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B") == \
        parse_openai_spec("openai:http://127.0.0.1:8000/v1/#Qwen/Qwen2.5-7B")
    s = parse_openai_spec("openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B")
    assert (s.base_url, s.model) == ("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B")
    assert parse_openai_spec("openai:https://host/v1").model is None
    with pytest.raises(ValueError, match="http:// or https://"):
        parse_openai_spec("openai:127.0.0.1:8000/v1#m")


def test_batches_prompts_and_forwards_settings(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("FEDKT_OPENAI_API_KEY", "sk-test")
    g = make_generator(f"openai:{stub.base}#my-llm", batch_size=2, backoff=0.0)
    assert isinstance(g, TextGenerator) and g.name == f"openai:{stub.base}#my-llm"
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    out = g.generate(prompts, max_new_tokens=7, stop=[" END", "\n\n"], temperature=0.7, seed=11)
    assert out == [f"ans({p})" for p in prompts]  # in prompt order, cut at the stop string
    assert [r["path"] for r in stub.requests] == ["/v1/completions"] * 3
    assert [r["body"]["prompt"] for r in stub.requests] == [["p0", "p1"], ["p2", "p3"], "p4"]
    for r in stub.requests:
        b = r["body"]
        assert (b["model"], b["max_tokens"], b["temperature"], b["seed"], b["stop"]) == \
            ("my-llm", 7, 0.7, 11, [" END", "\n\n"])
        assert "top_p" not in b
        assert r["auth"] == "Bearer sk-test"


def test_no_key_no_header_and_no_stop_field(stub, monkeypatch):
    for var in ("FEDKT_OPENAI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    g = OpenAIGenerator(stub.base, "m")
    assert g.generate(["x"], max_new_tokens=3) == ["ans(x) END tail"]
    assert stub.requests[0]["auth"] is None and "stop" not in stub.requests[0]["body"]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-plain")
    OpenAIGenerator(stub.base, "m").generate(["x"])
    assert stub.requests[1]["auth"] == "Bearer sk-plain"


def test_model_from_the_models_listing(stub):
    g = make_generator(f"openai:{stub.base}")
    assert g.model == "stub-model" and stub.requests[0]["path"] == "/v1/models"
    stub.models = ["a", "b"]
    with pytest.raises(OpenAIError, match="lists 2 models"):
        make_generator(f"openai:{stub.base}")


def test_retries_500_then_succeeds(stub):
    stub.script = [(500, {"error": {"message": "engine busy"}}, {}),
                   (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})]
    g = OpenAIGenerator(stub.base, "m", backoff=0.01, max_retries=3)
    assert g.generate(["a", "b"], stop=[" END"]) == ["ans(a)", "ans(b)"]
    assert len(stub.requests) == 3
    assert stub.requests[0]["body"] == stub.requests[2]["body"]  # the same request, retried


def test_gives_up_after_max_retries(stub):
    stub.script = [(503, {"error": {"message": "overloaded"}}, {})] * 3
    g = OpenAIGenerator(stub.base, "m", backoff=0.01, max_retries=2)
    with pytest.raises(OpenAIError, match=r"/v1/completions failed after 3 attempts; last: HTTP 503: overloaded"):
        g.generate(["a"])
    assert len(stub.requests) == 3


def test_400_is_a_clear_error_without_retry(stub):
    stub.script = [(400, {"error": {"message": "max_tokens is too large"}}, {})]
    g = OpenAIGenerator(stub.base, "m", backoff=0.01)
    with pytest.raises(OpenAIError) as e:
        g.generate(["a"], max_new_tokens=10**6)
    assert str(e.value) == f"POST {stub.base}/completions failed with HTTP 400: max_tokens is too large"
    assert len(stub.requests) == 1
    stub.script = [(401, b"bad key", {})]
    with pytest.raises(OpenAIError, match="HTTP 401: bad key .*OPENAI_API_KEY"):
        g.generate(["a"])


def test_unreachable_server_names_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "m", backoff=0.01, max_retries=1)
    with pytest.raises(OpenAIError, match=rf"POST http://127.0.0.1:{port}/v1/completions failed after 2 attempts; "
                                          rf"last: could not connect"):
        g.generate(["a"])


def test_server_without_list_prompts_falls_back_to_one_per_request(stub):
    stub.batching = False
    g = OpenAIGenerator(stub.base, "m", batch_size=4)
    assert g.generate(["a", "b", "c"], stop=[" END"]) == ["ans(a)", "ans(b)", "ans(c)"]
    assert [r["body"]["prompt"] for r in stub.requests] == [["a", "b", "c"], "a", "b", "c"]
    assert g.batch_size == 1


def test_chat_prompt_plain_without_tokenizer(stub):
    g = OpenAIGenerator(stub.base, "m")
    assert g.chat_prompt("Sys.", "Q?", [("q", "a")]) == "Sys.\n\nUser: q\nAssistant: a\nUser: Q?\nAssistant:"


def test_local_generator_wraps_generate(model_dirs, tok):
    from fedkt.generate import generate

    g = make_generator(str(model_dirs["slm"]), batch_size=3)
    assert isinstance(g, HFGenerator) and isinstance(g, TextGenerator)
    prompts = ["Question: Which planet", "The answer is", "rain"]
    assert g.generate(prompts, max_new_tokens=6) == generate(g.model, g.tok, prompts, max_new_tokens=6)
    sampled = g.generate(prompts, max_new_tokens=6, temperature=0.9, seed=5)
    assert sampled == generate(g.model, g.tok, prompts, max_new_tokens=6, do_sample=True, temperature=0.9, seed=5)
    assert g.chat_prompt(None, "hi") == "User: hi\nAssistant:"
