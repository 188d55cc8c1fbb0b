"""Text generators: one small interface over a local Hugging Face model and an OpenAI-compatible server.

FedCoT's server LLM writes rationales and FDKT's writes synthetic examples; either may be a model fedkt
loads itself or one the user already serves with vLLM or llama.cpp. Algorithms ask a ``TextGenerator``
for text and do not care which.

Model specs (``make_generator(spec)``):

* ``openai:BASE_URL#MODEL``  an OpenAI-compatible server, e.g. ``openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct``
  (vLLM) or ``openai:http://127.0.0.1:8080/v1#model`` (llama.cpp ``llama-server``). ``BASE_URL`` is the
  API root that ``/completions`` hangs off (normally ending in ``/v1``); ``MODEL`` is the ``model`` field
  sent with each request. Without ``#MODEL`` the server's ``GET BASE_URL/models`` must list exactly one.
  The API key is taken from ``FEDKT_OPENAI_API_KEY``, else ``OPENAI_API_KEY`` (sent as
  ``Authorization: Bearer …``); local servers usually need none.
* anything else: a model spec for ``fedkt.models.load_model`` (``builtin:NAME``, a directory, ``.gguf``,
  ``hf:ORG/NAME``), run in-process by ``fedkt.generate``.

The OpenAI client uses only the standard library (``urllib.request``, ``json``). It posts
``{BASE_URL}/completions`` with ``prompt`` as a list of up to ``batch_size`` prompts (servers batch them
internally), ``max_tokens``, ``temperature``, ``top_p``, ``stop`` and ``seed``, and puts the choices
back in prompt order by their ``index``. A server that answers a list with the wrong number of choices
is asked one prompt per request from then on. 429 and 5xx answers and connection failures are retried
with exponential backoff (``Retry-After`` honoured); any other error status raises ``OpenAIError``
naming the URL, the status and the server's message. Texts are cut at the first stop string locally
too, so both backends return the same kind of text whatever the server does with ``stop``.

Temperature 0 means greedy decoding in both backends.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from fedkt.generate import chat_messages, chat_prompt, cut_at_stop, generate, render_plain
from fedkt.models import load_model

OPENAI_PREFIX = "openai:"
API_KEY_ENV = ("FEDKT_OPENAI_API_KEY", "OPENAI_API_KEY")


def is_remote(spec: str) -> bool:
    """``spec`` names an OpenAI-compatible server (``openai:BASE_URL#MODEL``), not a model fedkt loads."""
    return spec.startswith(OPENAI_PREFIX)


@runtime_checkable
class TextGenerator(Protocol):
    """Continues prompts; returns only the new text of each, cut at the first stop string."""

    name: str

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]: ...

    def chat_prompt(self, system: str | None, user: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        """A prompt in this model's chat format (its template, or plain ``User:``/``Assistant:`` text)."""
        ...


class HFGenerator:
    """A local transformers model through ``fedkt.generate`` (batched, KV cache, early stopping)."""

    def __init__(self, model, tok, batch_size: int = 16, top_p: float = 1.0, top_k: int = 0, name: str = "local",
                 desc: str = "generate"):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.top_p, self.top_k, self.name, self.desc = top_p, top_k, name, desc

    def chat_prompt(self, system: str | None, user: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        return chat_prompt(self.tok, system, user, few_shot)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        return generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                        do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                        top_p=self.top_p, top_k=self.top_k, seed=seed, stop=stop, desc=self.desc)


class OpenAIError(RuntimeError):
    """An OpenAI-compatible server refused a request or could not be reached."""


@dataclass(frozen=True)
class OpenAISpec:
    base_url: str
    model: str | None


def parse_openai_spec(spec: str) -> OpenAISpec:
    """``openai:BASE_URL#MODEL`` -> (base URL without trailing slash, model name or None)."""
    if not spec.startswith(OPENAI_PREFIX):
        raise ValueError(f"{spec!r} is not an OpenAI spec; write openai:BASE_URL#MODEL, "
                         f"e.g. openai:http://127.0.0.1:8000/v1#my-model")
    rest = spec[len(OPENAI_PREFIX):]
    base, _, model = rest.partition("#")
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"OpenAI spec {spec!r}: the base URL must start with http:// or https://, "
                         f"e.g. openai:http://127.0.0.1:8000/v1#my-model")
    return OpenAISpec(base, model or None)


def api_key_from_env() -> str | None:
    for var in API_KEY_ENV:
        if os.environ.get(var):
            return os.environ[var]
    return None


class OpenAIGenerator:
    """Completions from an OpenAI-compatible server (vLLM, llama.cpp, …), standard library only.

    ``tokenizer`` (optional, e.g. the served model's tokenizer loaded locally) is used only by
    ``chat_prompt`` to render its chat template; without it chat prompts are plain text.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, batch_size: int = 32,
                 top_p: float = 1.0, timeout: float = 600.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, tokenizer=None):
        self.tokenizer = tokenizer
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.batch_size, self.top_p, self.timeout = batch_size, top_p, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.model = model or self._only_model()
        self.name = f"{OPENAI_PREFIX}{self.base_url}#{self.model}"

    # -- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            wait = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise OpenAIError(f"{method} {url}: the server answered with something that is not JSON: "
                                      f"{raw[:300]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code != 429 and e.code < 500:
                    hint = " (check the API key: FEDKT_OPENAI_API_KEY or OPENAI_API_KEY)" if e.code in (401, 403) \
                        else ""
                    raise OpenAIError(f"{method} {url} failed with HTTP {e.code}: {detail}{hint}") from None
                failure = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after:
                    try:
                        wait = float(retry_after)
                    except ValueError:
                        wait = None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                failure = f"could not connect: {reason}"
            if attempt >= self.max_retries:
                raise OpenAIError(f"{method} {url} failed after {attempt + 1} attempts; last: {failure}. "
                                  f"Is the server running at {self.base_url}?")
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + 0.1 * random.random())
            time.sleep(min(wait, self.max_backoff))
            attempt += 1

    def _only_model(self) -> str:
        listing = self._request("GET", "/models")
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if len(ids) != 1:
            raise OpenAIError(f"{self.base_url}/models lists {len(ids)} models ({ids[:5]}); name one in the spec: "
                              f"openai:{self.base_url}#MODEL")
        return ids[0]

    # -- generation ------------------------------------------------------------------------------
    def chat_prompt(self, system: str | None, user: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        if self.tokenizer is not None:
            return chat_prompt(self.tokenizer, system, user, few_shot)
        return render_plain(chat_messages(system, user, few_shot))

    def _complete(self, prompts: list[str], max_new_tokens: int, stop: Sequence[str], temperature: float,
                  seed: int) -> list[str] | None:
        body: dict[str, Any] = {"model": self.model, "prompt": prompts if len(prompts) > 1 else prompts[0],
                                "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        if stop:
            body["stop"] = list(stop)
        reply = self._request("POST", "/completions", body)
        choices = reply.get("choices")
        if not isinstance(choices, list):
            raise OpenAIError(f"POST {self.base_url}/completions: the reply has no 'choices' list: "
                              f"{json.dumps(reply)[:300]}")
        if len(choices) != len(prompts):
            return None
        ordered: list[str | None] = [None] * len(prompts)
        for pos, ch in enumerate(choices):
            i = ch.get("index", pos)
            if not isinstance(i, int) or not 0 <= i < len(prompts) or ordered[i] is not None:
                return None
            ordered[i] = ch.get("text") or ""
        return [cut_at_stop(t, stop) for t in ordered]  # type: ignore[arg-type]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        stop = [s for s in stop if s]
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            texts = self._complete(chunk, max_new_tokens, stop, temperature, seed)
            if texts is None:  # the server does not batch a prompt list: one prompt per request from now on
                self.batch_size = 1
                texts = []
                for p in chunk:
                    one = self._complete([p], max_new_tokens, stop, temperature, seed)
                    if one is None:
                        raise OpenAIError(f"POST {self.base_url}/completions returned no usable choice for one "
                                          f"prompt; is {self.base_url} an OpenAI-compatible completions API?")
                    texts += one
            out += texts
        return out


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        return e.reason if isinstance(e.reason, str) else ""
    try:
        msg = json.loads(raw)
        if isinstance(msg, dict):
            err = msg.get("error", msg)
            if isinstance(err, dict):
                return str(err.get("message", err))
            return str(err)
    except json.JSONDecodeError:
        pass
    return raw[:500]


def make_generator(spec: str, *, batch_size: int | None = None, top_p: float = 1.0, top_k: int = 0,
                   api_key: str | None = None, timeout: float = 600.0, max_retries: int = 5, backoff: float = 1.0,
                   dtype: str = "float32", desc: str = "generate", tokenizer=None) -> TextGenerator:
    """A generator for ``spec``: ``openai:BASE_URL#MODEL`` or a local model spec (see module docstring)."""
    if is_remote(spec):
        s = parse_openai_spec(spec)
        return OpenAIGenerator(s.base_url, s.model, api_key=api_key, batch_size=batch_size or 32, top_p=top_p,
                               timeout=timeout, max_retries=max_retries, backoff=backoff, tokenizer=tokenizer)

    model, tok = load_model(spec, dtype=dtype)
    return HFGenerator(model, tok, batch_size=batch_size or 16, top_p=top_p, top_k=top_k, name=spec, desc=desc)
