"""Locust scenarios for DAS Serve: /vqa, /nlvr2, /retrieval/texts and /retrieval/images.

Run from the repository root (``make loadtest`` does this for you, with a service it starts):

    locust -f loadtests/locustfile.py --headless -u 4 -r 2 -t 30s --host http://localhost:3000 \
        --csv loadtests/results/loadtest --html loadtests/results/loadtest.html

Each simulated user picks an endpoint by weight, sends a request drawn from ``loadtests.payloads``
(varied image sizes, shapes and formats; short to over-long texts; 2-20 retrieval candidates), and
counts the request as failed unless it gets a 200 whose JSON has the fields the README promises
(plan, flops, latency, and a ranking over exactly the candidates sent). Settings, all optional:

    LOADTEST_WEIGHTS       endpoint weights, default "vqa=4,nlvr2=2,retrieval_texts=2,retrieval_images=1"
                           (0 leaves an endpoint out)
    LOADTEST_CANDIDATES    retrieval candidates per request, "LOW-HIGH", default "2-20"
    LOADTEST_WAIT          seconds each user waits between requests, "LOW-HIGH", default "0.1-0.5"
    LOADTEST_SEED          seed of the image pool and of every user's choices, default 0
    LOADTEST_POOL          how many images the pool holds, default 32
    LOADTEST_RESPONSE_LOG  a file to append one JSON line per response to (endpoint, start and end
                           wall-clock times, status, plan); the hot-swap scenario checks it
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

from locust import FastHttpUser, between, events

from loadtests.payloads import DEFAULT_WEIGHTS, Body, PayloadMix, image_pool, parse_range, parse_weights

PLAN_TASK = {"/vqa": "vqa", "/nlvr2": "nlvr2", "/retrieval/texts": "retrieval", "/retrieval/images": "retrieval"}


def _setting(name: str, default: str, parse):
    try:
        return parse(os.environ.get(name, default))
    except ValueError as exc:
        raise SystemExit(f"loadtests/locustfile.py: {name}: {exc}") from None


def check_response(endpoint: str, status: int, body: Any, sent: Body) -> str | None:
    """Why this response is a failure, or None if it is what the README promises."""
    if status != 200:
        return f"HTTP {status}: {str(body)[:200]}"
    if not isinstance(body, dict):
        return "the response is not a JSON object"
    plan = body.get("plan")
    if not isinstance(plan, dict) or not {"task", "name", "version", "skipped_layers"} <= plan.keys():
        return f"no plan info in the response: {str(body)[:200]}"
    if plan["task"] != PLAN_TASK[endpoint]:
        return f"{endpoint} answered with a {plan['task']} plan"
    if not isinstance(body.get("flops"), dict) or "latency_ms" not in body:
        return "no flops or latency_ms in the response"
    if endpoint == "/vqa" and not body.get("answers"):
        return "no answers"
    if endpoint == "/nlvr2" and not isinstance(body.get("label"), bool):
        return "no boolean label"
    if endpoint.startswith("/retrieval/"):
        indices = sorted(entry.get("index") for entry in body.get("ranking", []))
        if indices != list(range(sent.candidates)):
            return f"the ranking covers {indices}, not the {sent.candidates} candidates sent"
    return None


WEIGHTS = _setting("LOADTEST_WEIGHTS", DEFAULT_WEIGHTS, parse_weights)
SEED = _setting("LOADTEST_SEED", "0", int)
MIX = PayloadMix(image_pool(_setting("LOADTEST_POOL", "32", int), SEED),
                 _setting("LOADTEST_CANDIDATES", "2-20", lambda text: parse_range(text, int)))
RESPONSE_LOG_PATH = os.environ.get("LOADTEST_RESPONSE_LOG")
_response_log = open(RESPONSE_LOG_PATH, "a", buffering=1) if RESPONSE_LOG_PATH else None  # one line per write


@events.quit.add_listener  # after the users stopped (``quitting`` fires before they finish)
def _close_response_log(**_kwargs) -> None:
    if _response_log is not None:
        _response_log.close()


class DASUser(FastHttpUser):
    """One client of the service: requests one after another with a short think time between."""

    wait_time = between(*_setting("LOADTEST_WAIT", "0.1-0.5", parse_range))
    _numbers = itertools.count()

    def on_start(self) -> None:
        """One request to every endpoint in the mix, in random order, so that even a short run covers
        them all; then the weighted choice takes over."""
        self.rng = random.Random(f"{SEED}:{next(self._numbers)}")  # user N makes the same requests every run
        first_round = list(dict.fromkeys(self.tasks))  # Locust expands weights into repeats
        self.rng.shuffle(first_round)
        for send in first_round:
            send(self)

    def _post(self, endpoint: str, sent: Body) -> None:
        started = time.time()
        with self.client.post(endpoint, data=sent.data, headers={"Content-Type": sent.content_type},
                              catch_response=True, name=endpoint) as response:
            try:
                body = response.json()
            except (ValueError, TypeError):
                body = response.text
            problem = check_response(endpoint, response.status_code, body, sent)
            if problem:
                response.failure(problem)
            else:
                response.success()
        if _response_log is not None:
            plan = body.get("plan") if isinstance(body, dict) else None
            _response_log.write(json.dumps({"endpoint": endpoint, "started": started, "finished": time.time(),
                                            "status": response.status_code, "ok": problem is None, "plan": plan}) + "\n")

    def vqa(self) -> None:
        self._post("/vqa", MIX.vqa(self.rng))

    def nlvr2(self) -> None:
        self._post("/nlvr2", MIX.nlvr2(self.rng))

    def retrieval_texts(self) -> None:
        self._post("/retrieval/texts", MIX.retrieval_texts(self.rng))

    def retrieval_images(self) -> None:
        self._post("/retrieval/images", MIX.retrieval_images(self.rng))

    tasks = {function: WEIGHTS[name] for name, function in
             (("vqa", vqa), ("nlvr2", nlvr2), ("retrieval_texts", retrieval_texts), ("retrieval_images", retrieval_images))
             if WEIGHTS[name] > 0}
