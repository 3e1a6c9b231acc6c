"""The OpenAI-compatible backend: any server speaking ``/v1/chat/completions`` (vLLM, SGLang, an API).

Use it with ``metareward generator=openai generator.openai.base_urls=[http://host:8000/v1]
generator.openai.model=<served name> judge.score_from=text meta_judge.winner_from=text``.
The API key is read at request time from the environment variable named by
``generator.openai.api_key_env``; it is sent as a bearer token and never stored.

Each sample is its own request (``n=1``), so every completion has an exact token count for
length control; sample ``j`` uses a seed derived from the call's seed and ``j``. Requests run
on a pool of ``max_concurrency`` threads, spread round-robin over ``base_urls``; 429s, 5xx,
timeouts and dropped connections are retried with exponential backoff (or ``Retry-After``).
With a cache directory, each answer is kept in ``<cache_dir>/openai/`` as one JSON file named
by a hash of the request, so a resumed run pays for no call twice.

``next_token_probs`` reads the top log-probabilities of one token from the legacy
``/v1/completions`` endpoint (vLLM serves it); ``render`` needs the model's tokenizer in a
local ``model_dir``.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation.base import Completion, Messages, SamplingParams, Usage
from metareward.records import read_json, write_json

# Top log-probabilities asked for per scored position (vLLM's default limit).
TOP_LOGPROBS = 20
# Errors worth another try: the connection dropped, timed out or was cut mid-answer.
TRANSIENT_ERRORS = (TimeoutError, ConnectionError, http.client.HTTPException)


class OpenAIError(RuntimeError):
    """A request the server refused, or one that kept failing; the message names the URL."""


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request sampled with ``seed`` (31 bits, accepted everywhere)."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def candidate_prob(top_logprobs: dict[str, float], candidate: str) -> float:
    """Probability of the next token being ``candidate``; tokens are compared without their
    leading whitespace (" 4" and "4" both count as "4"), a candidate outside the top ones is 0."""
    want = candidate.lstrip()
    return min(1.0, sum(math.exp(lp) for token, lp in top_logprobs.items() if token.lstrip() == want))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class OpenAIGenerator:
    def __init__(
        self, model_dir: str, model: ModelConfig, settings: GeneratorConfig, cache_dir: Path | None = None
    ):
        self.settings = settings
        self.api = settings.openai
        self.model_dir = model_dir
        self.trust_remote_code = model.trust_remote_code
        self.served_model = self.api.model or model.path or model_dir
        self.cache = Path(cache_dir) / "openai" if cache_dir is not None and self.api.cache else None
        self.usage = Usage()
        self._lock = threading.Lock()
        self._turn = 0
        self._pool = ThreadPoolExecutor(max_workers=self.api.max_concurrency, thread_name_prefix="openai")
        self._opener = urllib.request.build_opener()
        self._tokenizer = None

    # -- the protocol -------------------------------------------------------------------------------

    def render(self, messages: Messages) -> str:
        return self._chat_tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def generate(
        self, requests: list[Messages], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        keys, jobs = [], {}
        for messages in requests:
            row = []
            for j in range(params.n):
                key = self._key(
                    "chat", messages, params.temperature, params.top_p, params.max_new_tokens, params.seed, j
                )
                row.append(key)
                jobs.setdefault(key, (messages, j))  # identical samples are asked for once
            keys.append(row)
        answers, todo = self._split_cached(jobs)
        with self._lock:
            self.usage.generate_calls += 1
            self.usage.samples += len(requests) * params.n
            self.usage.cached_samples += len(requests) * params.n - len(todo)
        answers |= self._run(todo, lambda job: self._chat(job[0], job[1], params), desc or "generate")
        return [[Completion(**answers[key]) for key in row] for row in keys]

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        keys, jobs = [], {}
        for text in texts:
            # A candidate's leading space belongs to its token (" 4"), as the HF backend's common prefix
            # finds: the model is asked to continue the text without its trailing spaces.
            prompt = text.rstrip(" ")
            key = self._key("logprobs", prompt, TOP_LOGPROBS)
            keys.append(key)
            jobs.setdefault(key, prompt)
        answers, todo = self._split_cached(jobs)
        with self._lock:
            self.usage.scored_texts += len(texts)
        answers |= self._run(todo, self._top_logprobs, "score")
        return [[candidate_prob(answers[key]["top_logprobs"], c) for c in candidates] for key in keys]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- requests -----------------------------------------------------------------------------------

    def _chat(self, messages: Messages, index: int, params: SamplingParams) -> dict:
        body = {
            "model": self.served_model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": sample_seed(params.seed, index),
            "n": 1,
        }
        url, reply = self._post("/chat/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["message"].get("content") or ""
            num_tokens = int(reply["usage"]["completion_tokens"])
            prompt_tokens = int(reply["usage"].get("prompt_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise OpenAIError(f"{url} answered without choices or usage: {self._excerpt(reply)}") from None
        self._spend(prompt_tokens, num_tokens)
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return {"text": text, "num_tokens": num_tokens, "finish_reason": reason}

    def _top_logprobs(self, prompt: str) -> dict:
        body = {
            "model": self.served_model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": TOP_LOGPROBS,
            # The rendered prompt already holds the template's special tokens (vLLM would add a BOS).
            "add_special_tokens": False,
        }
        url, reply = self._post("/completions", body)
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            usage = reply.get("usage") or {}
            self._spend(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
            return {"top_logprobs": {str(token): float(lp) for token, lp in top.items()}}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise OpenAIError(f"{url} answered without top logprobs: {self._excerpt(reply)}") from None

    def _post(self, path: str, body: dict) -> tuple[str, dict]:
        """POST ``body`` as JSON to ``path`` of the next base URL; retries transient failures."""
        data = json.dumps(body).encode()
        attempts = self.api.max_retries + 1
        failure = ""
        for attempt in range(attempts):
            url = self._next_base_url() + path
            headers = {"Content-Type": "application/json"}
            api_key = os.environ.get(self.api.api_key_env)
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with self._lock:
                self.usage.http_requests += 1
            wait = None
            try:
                with self._opener.open(request, timeout=self.api.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                detail = self._excerpt(self._error_body(error))
                if error.code != 429 and error.code < 500:
                    raise OpenAIError(f"HTTP {error.code} from {url}: {detail}") from None
                failure = f"HTTP {error.code} from {url}: {detail}"
                wait = _retry_after(error.headers.get("Retry-After"))
            except urllib.error.URLError as error:
                if not isinstance(error.reason, TRANSIENT_ERRORS):
                    raise OpenAIError(f"cannot reach {url}: {error.reason}") from None
                failure = f"{type(error.reason).__name__} from {url}: {error.reason}"
            except TRANSIENT_ERRORS as error:
                failure = f"{type(error).__name__} from {url}: {error}"
            else:
                try:
                    return url, json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise OpenAIError(f"{url} answered with no JSON: {self._excerpt(raw)}") from None
            if attempt + 1 < attempts:
                # Jitter keeps a pool of threads from retrying in lockstep.
                backoff = self.api.backoff_s * 2**attempt * (1 + random.random() / 4)
                time.sleep(backoff if wait is None else wait)
        raise OpenAIError(
            f"POST {path} failed {attempts} times (generator.openai.max_retries); last: {failure}"
        )

    def _next_base_url(self) -> str:
        with self._lock:
            base = self.api.base_urls[self._turn % len(self.api.base_urls)]
            self._turn += 1
        return base.rstrip("/")

    def _spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        prompt_price = self.api.prompt_price_per_mtok or 0.0
        completion_price = self.api.completion_price_per_mtok or 0.0
        with self._lock:
            self.usage.prompt_tokens += prompt_tokens
            self.usage.generated_tokens += completion_tokens
            self.usage.cost_usd += (prompt_tokens * prompt_price + completion_tokens * completion_price) / 1e6

    @staticmethod
    def _error_body(error: urllib.error.HTTPError) -> bytes:
        try:
            return error.read()
        except (OSError, http.client.HTTPException):
            return b""

    def _excerpt(self, raw) -> str:
        """A short, single-line piece of a server's answer, with the API key (if echoed) blanked out."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else json.dumps(raw)
        api_key = os.environ.get(self.api.api_key_env)
        if api_key:
            text = text.replace(api_key, "***")
        return " ".join(text.split())[:300]

    def _run(self, jobs: dict, call: Callable, desc: str) -> dict:
        """``call(job)`` for every job on the pool, each answer cached as soon as it arrives."""
        if not jobs:
            return {}

        def task(key: str, job) -> dict:
            answer = call(job)
            self._cache_put(key, answer)
            return answer

        futures = {key: self._pool.submit(task, key, job) for key, job in jobs.items()}
        bar = tqdm(total=len(futures), desc=desc, unit="req", disable=not self.settings.progress)
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update(1))
        try:
            return {key: future.result() for key, future in futures.items()}
        finally:
            # After a failure, requests not yet started are dropped; answers already cached are kept.
            for future in futures.values():
                future.cancel()
            bar.close()

    # -- cache and tokenizer ------------------------------------------------------------------------

    def _key(self, kind: str, *fields) -> str:
        # The base URL is left out: any server of the pool serves the same model.
        text = json.dumps([kind, self.served_model, *fields], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache / key[:2] / f"{key}.json"

    def _split_cached(self, jobs: dict) -> tuple[dict, dict]:
        """(answers found in the cache, jobs still to send)."""
        found = {}
        if self.cache is not None:
            for key in jobs:
                path = self._cache_path(key)
                if path.is_file():
                    found[key] = read_json(path)
        return found, {key: job for key, job in jobs.items() if key not in found}

    def _cache_put(self, key: str, answer: dict) -> None:
        if self.cache is not None:
            write_json(self._cache_path(key), answer)

    def _chat_tokenizer(self):
        if self._tokenizer is None:
            directory = Path(self.model_dir)
            if not any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
                raise OpenAIError(
                    f"generator=openai: no tokenizer in {self.model_dir!r} to render the chat template; "
                    "with a model that is only served, set judge.score_from=text and "
                    "meta_judge.winner_from=text (the probability fallbacks need the rendered prompt)"
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_dir, trust_remote_code=self.trust_remote_code
            )
        return self._tokenizer
