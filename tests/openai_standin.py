"""A stand-in OpenAI-compatible server for the endpoint backend's tests and for scripts/bench.py: a real
HTTP server on 127.0.0.1 whose answers follow from each request, given after a fixed delay, with faults
injected on demand and a log of when each request arrived and was answered.

    server = StandInServer(delay_s=0.3)   # then generator.openai.base_urls=[server.url]
    with stand_in_process(delay_s=0.3) as (url, stats):   # the same, in a process of its own
        ...
    .venv/bin/python -m tests.openai_standin 0.3          # prints its URL, serves until stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from aiohttp import web


def chat_answer(body: dict) -> dict:
    """Words of the last message, then the sampling settings, cut at max_tokens (one word, one token)."""
    messages = body["messages"]
    content = messages[-1]["content"]
    words = [*content.split(), f"seed={body['seed']}", f"t={body['temperature']}", f"p={body['top_p']}"]
    cut = len(words) > body["max_tokens"]
    words = words[: body["max_tokens"]]
    reason = "length" if cut else ("eos" if "eos" in content else "stop")
    prompt_tokens = sum(len(m["content"].split()) for m in messages)
    return {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        },
    }


def completion_answer(body: dict) -> dict:
    """One greedy token with top logprobs: " 4" and "4" after a score cue, " A" / " B" otherwise."""
    if body["prompt"].endswith("Score:"):
        top = {" 4": math.log(0.6), "4": math.log(0.1), " 3": math.log(0.2), " x": math.log(0.1)}
    else:
        top = {" A": math.log(0.7), " B": math.log(0.2), " C": math.log(0.1)}
    token = max(top, key=top.get)
    return {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": token,
                "logprobs": {"tokens": [token], "token_logprobs": [top[token]], "top_logprobs": [top]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": 1, "total_tokens": 0},
    }


class StandInServer:
    """A stand-in OpenAI-compatible server (aiohttp's, on an event loop thread of its own). Faults are
    used up one per request, before answering: first those in ``faults_for[content]`` (requests whose
    last message is ``content``), then ``faults``: "429", "429-retry-after" (Retry-After: 0),
    "429-retry-after=S" (Retry-After: S), "503", "400" (its body echoes the Authorization header),
    "drop" (closes the connection without answering), "cut-json" (a JSON body cut short), "empty" and
    "null" (a chat answer whose content is "" or null), "slow" (answers after ``slow_s`` more). ``log``
    has, per request in arrival order, its ``content``, ``status`` (None when dropped) and the
    ``time.monotonic()`` it ``arrived`` and was ``answered``. With ``gather=G`` the first requests are
    held (at most ``gather_timeout_s``) until G are in flight at once, so a client that can keep G in
    flight is seen to do so however slowly a busy machine lets it send them."""

    def __init__(
        self,
        answer_chat=chat_answer,
        delay_s: float = 0.0,
        slow_s: float = 0.5,
        gather: int = 0,
        gather_timeout_s: float = 30.0,
    ):
        self.answer_chat = answer_chat
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.gather = gather
        self.gather_timeout_s = gather_timeout_s
        self.gathered = asyncio.Event()
        self.faults: list[str] = []
        self.faults_for: dict[str, list[str]] = {}
        self.received: list[tuple[str, dict, dict]] = []  # (path, headers, body), in arrival order
        self.log: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stand-in", daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"

    @property
    def bodies(self) -> list[dict]:
        return [body for _, _, body in self.received]

    def busy_seconds(self) -> float:
        """Request-seconds spent serving: divided by the wall time, the mean number of requests in flight."""
        return sum(entry["answered"] - entry["arrived"] for entry in list(self.log) if entry["answered"])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/{route:.*}", self._handle)
        app.router.add_get("/stats", self._stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # Hundreds of clients connect at once: a deep backlog keeps their connections from being dropped.
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        return runner

    async def _stats(self, request: web.Request) -> web.Response:
        answered = [entry for entry in self.log if entry["answered"]]
        return web.json_response(
            {
                "requests": len(self.log),
                "busy_seconds": self.busy_seconds(),
                "max_in_flight": self.max_in_flight,
                "first_arrival": min((entry["arrived"] for entry in self.log), default=None),
                "last_answer": max((entry["answered"] for entry in answered), default=None),
            }
        )

    def _next_fault(self, body: dict) -> str | None:
        messages = body.get("messages")
        own = self.faults_for.get(messages[-1]["content"]) if messages else None
        if own:
            return own.pop(0)
        return self.faults.pop(0) if self.faults else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body.get("messages")
        entry = {
            "content": messages[-1]["content"] if messages else body.get("prompt"),
            "arrived": time.monotonic(),
            "answered": None,
            "status": None,
        }
        self.received.append((request.path, dict(request.headers), body))
        self.log.append(entry)
        fault = self._next_fault(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.max_in_flight >= self.gather:
            self.gathered.set()
        try:
            response = await self._answer(request, fault, body)
            entry["status"] = response.status
            return response
        finally:
            self.in_flight -= 1
            entry["answered"] = time.monotonic()

    async def _answer(self, request: web.Request, fault: str | None, body: dict) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gathered.wait(), self.gather_timeout_s)
        await asyncio.sleep(self.delay_s)
        if fault == "drop":
            request.transport.close()
            raise asyncio.CancelledError  # nothing more is written on the closed connection
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429)
        if fault is not None and fault.startswith("429-retry-after"):
            wait = fault.partition("=")[2] or "0"
            error = {"error": {"message": "rate limited"}}
            return web.json_response(error, status=429, headers={"Retry-After": wait})
        if fault == "cut-json":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if fault == "503":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if fault == "400":
            auth = request.headers.get("Authorization", "")
            error = {"error": {"message": f"unknown field 'seed' (auth: {auth})"}}
            return web.json_response(error, status=400)
        if request.path == "/v1/chat/completions":
            answer = self.answer_chat(body)
            if fault in ("empty", "null"):
                answer["choices"][0]["message"]["content"] = "" if fault == "empty" else None
            return web.json_response(answer)
        if request.path == "/v1/completions":
            return web.json_response(completion_answer(body))
        return web.json_response({"error": {"message": f"no route {request.path}"}}, status=404)


@contextlib.contextmanager
def stand_in_process(delay_s: float):
    """A stand-in server answering after ``delay_s`` in a child process, so that it takes no CPU time
    (nor the GIL) from the client measured; yields its URL and a function returning its ``/stats``."""
    command = [sys.executable, "-m", "tests.openai_standin", str(delay_s)]
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        url = child.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"the stand-in server did not start ({' '.join(command)})")

        def stats() -> dict:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as answer:
                return json.loads(answer.read())

        yield url, stats
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    server = StandInServer(delay_s=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
    print(server.url, flush=True)
    threading.Event().wait()
