"""A remote reward or verifier service (`reward.remote`): one HTTP POST per answer, retried with backoff.

The request is JSON: {"prompt": [messages], "response": "the answer's text", "metadata": {the prompt row's other
columns, "finished", "tokens", "version"}}, with `Authorization: Bearer <token>` when `token_env` names a variable,
`X-Request-Id` (the same for every attempt at one answer) and `X-Attempt` (1, 2, ...); the answer is
{"reward": number}. A timeout, a lost connection, HTTP 429 or 5xx is retried (`retries` times, the
k-th after backoff_s x 2^(k-1)); any other status or an answer without a finite number is not. A call that fails
after its retries has no reward: the answer is left out of the loss and counted, never scored as 0 (which would
teach the policy that the answer was wrong). The token is read once, sent only in the header, and removed from any
error text.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

from tuneyard.rlhf.config import RemoteReward
from tuneyard.training.errors import UserError

RETRIED_STATUS = {429, 500, 502, 503, 504}


@dataclass
class RemoteScore:
    """One answer's call: its reward (None when it failed after its retries), its attempts, and the last error."""

    reward: float | None
    attempts: int
    error: str | None = None


def shown_url(url: str) -> str:
    """The endpoint as messages name it: without its query (which may carry a key)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class RemoteRewardClient:
    """Calls `reward.remote`'s endpoint for one answer at a time (thread-safe: each call opens its own request)."""

    def __init__(self, section: RemoteReward) -> None:
        self.section = section
        self.url = shown_url(section.url)
        self.token = None
        if section.token_env is not None:
            self.token = os.environ.get(section.token_env)
            if not self.token:
                raise UserError(
                    f"reward.remote.token_env names {section.token_env}, which is not set (or empty) in the "
                    "environment of the process that runs the job; export it there, or remove token_env"
                )

    def redacted(self, text: str) -> str:
        """`text` in one paragraph, without the token."""
        text = " ".join(text.split())[:300]
        return text.replace(self.token, "***") if self.token else text

    def score(self, prompt: list[dict], response: str, metadata: dict) -> RemoteScore:
        """The service's reward for one answer, after at most 1 + retries attempts."""
        body = json.dumps({"prompt": prompt, "response": response, "metadata": metadata}).encode()
        # one id for every attempt at this answer, so a service can tell a retry from a new answer
        headers = {"Content-Type": "application/json", "X-Request-Id": uuid.uuid4().hex}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        section = self.section
        error = None
        for attempt in range(1, section.retries + 2):
            if attempt > 1:
                time.sleep(section.backoff_s * 2 ** (attempt - 2))
            attempt_headers = {**headers, "X-Attempt": str(attempt)}
            request = urllib.request.Request(section.url, data=body, headers=attempt_headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=section.timeout_s) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                if exc.code in RETRIED_STATUS:
                    continue
                return RemoteScore(None, attempt, self.redacted(error))
            except (TimeoutError, OSError) as exc:  # URLError is an OSError; a read past timeout_s a TimeoutError
                reason = getattr(exc, "reason", exc)
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                error = f"{type(reason).__name__}: {reason}"
                if timed_out:
                    error = f"timed out after {section.timeout_s:g} s"
                continue
            try:
                reward = json.loads(raw)["reward"]
                if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                error = f'the answer {raw[:100]!r} is not {{"reward": <finite number>}}'
                return RemoteScore(None, attempt, self.redacted(error))
            return RemoteScore(float(reward), attempt)
        return RemoteScore(None, section.retries + 1, self.redacted(error or "no answer"))
