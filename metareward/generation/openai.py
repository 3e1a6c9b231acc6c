"""The OpenAI-compatible backend: any server speaking ``/v1/chat/completions`` (vLLM, SGLang, an API).

Use it with ``metareward generator=openai generator.openai.base_urls=[http://host:8000/v1]
generator.openai.model=<served name> judge.score_from=text meta_judge.winner_from=text``.
The API key is read from the environment variable named by ``generator.openai.api_key_env`` when the
first request is sent; it is sent as a bearer token and never stored.

Requests go through the ``openai`` package's client, one per base URL (pooled keep-alive
connections, retries of 429s, 5xx, timeouts and dropped connections with backoff that honours
``Retry-After``), each on a pool of ``max_in_flight`` threads: that many requests in flight per base
URL, spread round-robin over ``base_urls``. (Measured against a stand-in server, the threads carry
more requests a second than ``AsyncOpenAI`` on one event loop, whose single thread the client's
per-request work saturates first; see the endpoint section of scripts/bench.py.) A 429 pauses the
whole pool, not only the request that got it; ``requests_per_minute`` / ``tokens_per_minute`` pace
every request (that flow control is in :mod:`metareward.generation.pacing`).

Each sample is its own request (``n=1``), so every completion has an exact token count for length
control; sample ``j`` uses a seed derived from the call's seed and ``j``. With a cache directory, each
answer is kept in ``<cache_dir>/openai/`` as one JSON file named by a hash of the request and of the
model (its served name and, where it is a local directory, a fingerprint of its weights), as soon as it
arrives, so a resumed run pays for no call twice. An empty answer is a failed request, never cached.

``next_token_probs`` reads the top log-probabilities of one token from the legacy ``/v1/completions``
endpoint (vLLM serves it), through the same client; ``render`` needs the model's tokenizer in a local
``model_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from openai.types import Completion as TextCompletion
from openai.types.chat import ChatCompletion
from tqdm.auto import tqdm

from metareward.config import GeneratorConfig, ModelConfig
from metareward.generation.base import Completion, Messages, SamplingParams, Usage
from metareward.generation.pacing import Attempts, Pace, PoolPause, retry_after
from metareward.store.records import RecordError, read_json, write_json

log = logging.getLogger(__name__)

# Top log-probabilities asked for per scored position (vLLM's default limit).
TOP_LOGPROBS = 20
# Characters per token, to estimate a prompt's tokens for tokens_per_minute before the server counts them.
CHARS_PER_TOKEN = 4
# Statuses the client retries (its own rule); the rest are refused at once.
RETRIED_STATUSES = (408, 409, 429)


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


def _cache_entry_problem(answer, chat: bool) -> str | None:
    """Why a cached answer cannot be used, or None: a chat answer needs a non-empty text and its
    counts, a scoring answer its top log-probabilities."""
    if not isinstance(answer, dict):
        return f"a JSON {type(answer).__name__}, not an object"
    if not chat:
        return None if isinstance(answer.get("top_logprobs"), dict) else "no top_logprobs"
    text = answer.get("text")
    if not isinstance(text, str) or not text.strip():
        return "no text" if not isinstance(text, str) else "an empty text"
    counts = (answer.get("num_tokens"), answer.get("prompt_tokens"))
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        return "no token counts"
    return None if answer.get("finish_reason") in ("stop", "length") else "no finish_reason"


# A local model's fingerprint reads this many evenly spaced blocks of each weights file.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 16


def model_fingerprint(model_dir: str) -> str:
    """What tells one local model from another in the answer cache (M_1 from M_2, stored under one
    served name): its config and, per weights file, its size and evenly spaced blocks of it (a DPO step
    changes every weight). Reads a few MB whatever the model's size; "" for a model that is only
    served (no local directory)."""
    directory = Path(model_dir)
    if not model_dir or not directory.is_dir():
        return ""
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(directory.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}/{size}".encode())
        with open(weights, "rb") as handle:
            for block in range(FINGERPRINT_BLOCKS):
                handle.seek(size * block // FINGERPRINT_BLOCKS)
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


class OpenAIGenerator:
    def __init__(
        self, model_dir: str, model: ModelConfig, settings: GeneratorConfig, cache_dir: Path | None = None
    ):
        self.settings = settings
        self.api = settings.openai
        self.model_dir = model_dir
        self.trust_remote_code = model.trust_remote_code
        self.served_model = self.api.model or model.path or model_dir
        # Part of every cache key: answers of one model are never read back for another served under
        # the same name.
        self.fingerprint = model_fingerprint(model_dir)
        self.cache = Path(cache_dir) / "openai" if cache_dir is not None and self.api.cache else None
        self.usage = Usage()
        self._turn = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # the Attempts of the request on this thread
        self._clients: dict[str, openai.OpenAI] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pause = PoolPause(self.api.backoff_s)
        self._rpm = Pace(self.api.requests_per_minute) if self.api.requests_per_minute else None
        self._tpm = Pace(self.api.tokens_per_minute) if self.api.tokens_per_minute else None
        self._headers: dict = {}
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
                jobs.setdefault(key, (self._chat, messages, j, params))  # identical samples: asked once
            keys.append(row)
        answers, todo = self._split_cached(jobs)
        self.usage.generate_calls += 1
        self.usage.samples += len(requests) * params.n
        self.usage.cached_samples += len(requests) * params.n - len(todo)
        answers |= self._run(todo, desc or "generate")
        return [[Completion(**answers[key]) for key in row] for row in keys]

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[list[float]]:
        keys, jobs = [], {}
        for text in texts:
            # A candidate's leading space belongs to its token (" 4"), as the HF backend's common prefix
            # finds: the model is asked to continue the text without its trailing spaces.
            prompt = text.rstrip(" ")
            key = self._key("logprobs", prompt, TOP_LOGPROBS)
            keys.append(key)
            jobs.setdefault(key, (self._top_logprobs, prompt))
        answers, todo = self._split_cached(jobs)
        self.usage.scored_texts += len(texts)
        answers |= self._run(todo, "score")
        return [[candidate_prob(answers[key]["top_logprobs"], c) for c in candidates] for key in keys]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients.values():
            client.close()
        self._clients, self._pools = {}, {}

    # -- requests -----------------------------------------------------------------------------------

    def _chat(self, client: openai.OpenAI, messages: Messages, index: int, params: SamplingParams):
        body = {
            "model": self.served_model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": sample_seed(params.seed, index),
            "n": 1,
        }
        url = f"{client.base_url}chat/completions"
        # An empty or null answer is a failed request, asked again (never cached): a server that lost
        # the model or its output says nothing, and nothing is what a judge can least be scored on.
        tries = self.api.max_retries + 1
        for _ in range(tries):
            reply = self._post(client, "/chat/completions", body, ChatCompletion)
            try:
                choice = reply.choices[0]
                text = choice.message.content
                num_tokens = int(reply.usage.completion_tokens)
                prompt_tokens = int(reply.usage.prompt_tokens or 0)
            except (IndexError, TypeError, ValueError, AttributeError):
                raise OpenAIError(
                    f"{url} answered without choices or usage: {self._excerpt(reply)}"
                ) from None
            self._spend(prompt_tokens, num_tokens)
            if text and text.strip():
                break
        else:
            raise OpenAIError(
                f"POST {url} answered with empty content {tries} time{'s' if tries != 1 else ''} "
                f"(generator.openai.max_retries); last: {self._excerpt(reply)}"
            )
        reason = "length" if choice.finish_reason == "length" else "stop"
        return {
            "text": text,
            "num_tokens": num_tokens,
            "finish_reason": reason,
            "prompt_tokens": prompt_tokens,
        }

    def _top_logprobs(self, client: openai.OpenAI, prompt: str) -> dict:
        body = {
            "model": self.served_model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": TOP_LOGPROBS,
            # The rendered prompt already holds the template's special tokens (vLLM would add a BOS).
            "add_special_tokens": False,
        }
        reply = self._post(client, "/completions", body, TextCompletion)
        try:
            top = reply.choices[0].logprobs.top_logprobs[0]
            usage = reply.usage
            self._spend(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
            return {"top_logprobs": {str(token): float(lp) for token, lp in top.items()}}
        except (IndexError, TypeError, ValueError, AttributeError):
            url = f"{client.base_url}completions"
            raise OpenAIError(f"{url} answered without top logprobs: {self._excerpt(reply)}") from None

    def _post(self, client: openai.OpenAI, path: str, body: dict, answer_type):
        # What ``client.chat.completions.create`` / ``client.completions.create`` send, minus their
        # type-directed rewrite of the parameters (a no-op for plain JSON, and a quarter of the client's
        # time per request); the retries, timeouts and typed errors are the client's.
        options = {"headers": self._headers} if self._headers else {}
        reply = client.post(path, body=body, cast_to=answer_type, options=options)
        if not isinstance(reply, answer_type):
            raise OpenAIError(
                f"{client.base_url}{path.lstrip('/')} answered with no JSON: {self._excerpt(reply)}"
            )
        return reply

    def _request(self, base_url: str, call, *args) -> dict:
        """One request through the client of ``base_url`` (on a thread of its pool); failures become an
        OpenAIError naming the URL."""
        client = self._clients[base_url]
        attempts = self._local.attempts = Attempts(tokens=self._estimated_tokens(call, args))
        start = time.monotonic()
        try:
            return call(client, *args)
        except openai.APIStatusError as error:
            url, status = error.response.request.url, error.status_code
            failure = f"HTTP {status} from {url}: {self._excerpt(error.response.content)}"
            if status in RETRIED_STATUSES or status >= 500:
                raise self._gave_up(url, attempts, failure) from None
            raise OpenAIError(failure) from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            failure = f"{type(cause).__name__} from {error.request.url}: {cause}"
            raise self._gave_up(error.request.url, attempts, failure) from None
        except openai.OpenAIError as error:
            raise OpenAIError(f"{base_url}: {type(error).__name__}: {error}") from None
        except json.JSONDecodeError as error:  # the client parses a JSON content type itself
            raise OpenAIError(
                f"{base_url}: the answer is not valid JSON ({error}): {error.doc[:200]!r}"
            ) from None
        finally:
            with self._lock:
                self.usage.requests += 1
                self.usage.retries += max(0, attempts.count - 1)
                self.usage.latencies_s.append(time.monotonic() - start)

    def _gave_up(self, url, attempts: Attempts, failure: str) -> OpenAIError:
        times = f"{attempts.count} time{'s' if attempts.count != 1 else ''}"
        return OpenAIError(f"POST {url} failed {times} (generator.openai.max_retries); last: {failure}")

    def _before_send(self, request) -> None:
        """Every try of every request: waits out the pool's pause and the rate limits, then counts it."""
        attempts = self._local.attempts
        self._pause.wait()
        if self._rpm is not None:
            self._rpm.take(1)
        if self._tpm is not None:
            self._tpm.take(attempts.tokens)
        self._pause.wait()  # a 429 may have come while this one waited for its turn
        attempts.count += 1
        attempts.sent_at = time.monotonic()
        with self._lock:
            self.usage.http_requests += 1

    def _after_answer(self, response) -> None:
        attempts = self._local.attempts
        if response.status_code == 429:
            self._pause.refused(attempts.sent_at, retry_after(response.headers))
        elif response.status_code < 400:
            self._pause.answered(attempts.sent_at)

    def _estimated_tokens(self, call, args) -> float:
        """Tokens a request may count against tokens_per_minute before the server has counted them:
        the prompt's characters / CHARS_PER_TOKEN plus the most it may generate."""
        if call == self._chat:
            messages, _, params = args
            chars = sum(len(str(m.get("content") or "")) for m in messages)
            return chars / CHARS_PER_TOKEN + params.max_new_tokens
        return len(args[0]) / CHARS_PER_TOKEN + 1

    def _spend(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._tpm is not None:
            self._tpm.settle(self._local.attempts.tokens, prompt_tokens + completion_tokens)
        prompt_price = self.api.prompt_price_per_mtok or 0.0
        completion_price = self.api.completion_price_per_mtok or 0.0
        with self._lock:
            self.usage.prompt_tokens += prompt_tokens
            self.usage.generated_tokens += completion_tokens
            self.usage.cost_usd += (prompt_tokens * prompt_price + completion_tokens * completion_price) / 1e6

    def _excerpt(self, raw) -> str:
        """A short, single-line piece of a server's answer, with the API key (if echoed) blanked out."""
        if isinstance(raw, bytes):
            text = raw.decode("utf-8", "replace")
        elif hasattr(raw, "model_dump_json"):
            text = raw.model_dump_json()
        else:
            text = str(raw)
        api_key = os.environ.get(self.api.api_key_env)
        if api_key:
            text = text.replace(api_key, "***")
        return " ".join(text.split())[:300]

    # -- clients and their pools --------------------------------------------------------------------

    def _start(self) -> None:
        """One client and one pool of threads per base URL, made when the first request is sent."""
        api_key = os.environ.get(self.api.api_key_env)
        # Without a key no Authorization header is sent (the client needs some key to start).
        self._headers = {} if api_key else {"Authorization": openai.omit}
        for base_url in dict.fromkeys(url.rstrip("/") for url in self.api.base_urls):
            hooks = {"request": [self._before_send], "response": [self._after_answer]}
            self._clients[base_url] = openai.OpenAI(
                base_url=base_url,
                api_key=api_key or "none",
                max_retries=self.api.max_retries,
                timeout=self.api.timeout_s,
                http_client=openai.DefaultHttpxClient(event_hooks=hooks),
            )
            self._pools[base_url] = ThreadPoolExecutor(self.api.max_in_flight, thread_name_prefix="openai")

    def _run(self, jobs: dict, desc: str) -> dict:
        """Every job (``(call, *args)``) sent on the pools, each answer cached as soon as it arrives;
        after a failure, the requests not yet started are dropped (the answers cached are kept)."""
        if not jobs:
            return {}
        if not self._clients:
            self._start()
        bases = list(self._clients)

        def task(key: str, base_url: str, job: tuple) -> dict:
            answer = self._request(base_url, *job)
            self._cache_put(key, answer)
            return answer

        futures = {}
        for key, job in jobs.items():
            base_url = bases[self._turn % len(bases)]
            self._turn += 1
            futures[key] = self._pools[base_url].submit(task, key, base_url, job)
        bar = tqdm(total=len(futures), desc=desc, unit="req", disable=not self.settings.progress)
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update(1))
        try:
            return {key: future.result() for key, future in futures.items()}
        except OpenAIError as error:
            raise OpenAIError(f"{error} (while answering: {desc})") from None
        finally:
            for future in futures.values():
                future.cancel()
            bar.close()

    # -- cache and tokenizer ------------------------------------------------------------------------

    def _key(self, kind: str, *fields) -> str:
        # The base URL is left out: any server of the pool serves the same model.
        model = [self.served_model, self.fingerprint] if self.fingerprint else [self.served_model]
        text = json.dumps([kind, *model, *fields], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache / key[:2] / f"{key}.json"

    def _split_cached(self, jobs: dict) -> tuple[dict, dict]:
        """(answers found in the cache, jobs still to send). An entry that is no answer of its kind (an
        empty text, a file cut or edited) is removed with a warning naming it, and asked again."""
        found = {}
        if self.cache is not None:
            for key, job in jobs.items():
                path = self._cache_path(key)
                if not path.is_file():
                    continue
                try:
                    answer = read_json(path)
                except RecordError as error:
                    answer, problem = None, str(error)
                else:
                    problem = _cache_entry_problem(answer, chat=job[0] == self._chat)
                if problem:
                    log.warning(
                        "metareward: cache entry %s is unusable (%s); removed and asked again", path, problem
                    )
                    path.unlink(missing_ok=True)
                else:
                    found[key] = answer
        return found, {key: job for key, job in jobs.items() if key not in found}

    def _cache_put(self, key: str, answer: dict) -> None:
        if self.cache is not None:
            write_json(self._cache_path(key), answer)

    @property
    def reads_probabilities(self) -> bool:
        """Whether next-token probabilities can be asked for: they need the rendered prompt, so the
        model's tokenizer in a local ``model_dir`` (and a server with ``/v1/completions`` logprobs)."""
        directory = Path(self.model_dir)
        return any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))

    def _chat_tokenizer(self):
        if self._tokenizer is None:
            if not self.reads_probabilities:
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
