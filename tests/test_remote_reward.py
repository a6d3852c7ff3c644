"""`reward.remote`: a reward service over real HTTP on 127.0.0.1 that times out, answers 5xx and refuses bad
tokens; retries with backoff, failed answers left out of the loss (never scored as 0) and counted, too many failures
end the run in one paragraph, and the bearer token never written anywhere."""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tests.ppo_jobs import iterations_of, ppo_job
from tuneyard.launch.config import job_from_dict
from tuneyard.launch.run_job import run_job
from tuneyard.rlhf.config import PpoSection, RemoteReward, RewardSection
from tuneyard.rlhf.ppo import algorithms as algo
from tuneyard.rlhf.ppo.experience import RewardScorer, RolloutScores, estimate_advantages
from tuneyard.rlhf.ppo.prompts import Prompt
from tuneyard.rlhf.ppo.rollout import Rollout, Sample
from tuneyard.rlhf.ppo.scoring import RewardCallFailed
from tuneyard.rlhf.remote_reward import RemoteRewardClient
from tuneyard.training.errors import TrainingFailed, UserError

TOKEN = "s3cret-token-9f8e7d"

# what the server does with one request: None answers {"reward": ...}; "timeout" sleeps past the client's timeout;
# "503", "401" answer that status; "garbage" answers 200 with no number
Behaviour = Callable[[str, int], str | None]


class RewardServer:
    """A real HTTP reward service on 127.0.0.1: `behaviour(key, attempt)` decides each request (key: the request's
    prompt and response; attempt: the client's X-Attempt, from 1), `reward(body)` the score. It keeps every
    request and, per X-Request-Id (one answer), each attempt's outcome."""

    def __init__(self, behaviour: Behaviour, reward: Callable[[dict], float] = lambda body: 1.0, sleep_s: float = 1.0):
        self.behaviour, self.reward, self.sleep_s = behaviour, reward, sleep_s
        self.log: list[tuple[str, int, str, str | None, dict]] = []  # key, attempt, outcome, auth, body
        self.answers: dict[str, list[tuple[int, str, str]]] = {}  # X-Request-Id: (attempt, key, outcome)s
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps([body["prompt"], body["response"]])
                attempt = int(self.headers["X-Attempt"])
                auth = self.headers.get("Authorization")
                outcome = "401" if auth != f"Bearer {TOKEN}" else (server.behaviour(key, attempt) or "ok")
                with server.lock:
                    server.log.append((key, attempt, outcome, auth, body))
                    server.answers.setdefault(self.headers["X-Request-Id"], []).append((attempt, key, outcome))
                if outcome == "timeout":
                    time.sleep(server.sleep_s)
                    return
                if outcome in ("503", "401", "500"):
                    self.send_response(int(outcome))
                    self.end_headers()
                    return
                payload = b"not json" if outcome == "garbage" else json.dumps({"reward": server.reward(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/score"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(behaviour: Behaviour, **kwargs) -> RewardServer:
        servers.append(RewardServer(behaviour, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("REWARD_TOKEN", TOKEN)
    return "REWARD_TOKEN"


def client(server: RewardServer, token_env: str | None, **settings) -> RemoteRewardClient:
    section = {"url": server.url, "timeout_s": 0.3, "retries": 2, "backoff_s": 0.05, "token_env": token_env}
    return RemoteRewardClient(RemoteReward(**{**section, **settings}))


def test_timeouts_and_5xx_are_retried_with_the_token_and_the_third_attempt_scores(serve, token):
    server = serve(lambda key, attempt: {1: "503", 2: "timeout"}.get(attempt), reward=lambda body: 0.75, sleep_s=5.0)
    started = time.monotonic()
    score = client(server, token).score([{"role": "user", "content": "q"}], "a", {"answer": "a"})
    assert (score.reward, score.attempts) == (0.75, 3)
    assert [outcome for _, _, outcome, _, _ in server.log] == ["503", "timeout", "ok"]
    assert all(auth == f"Bearer {TOKEN}" for _, _, _, auth, _ in server.log)
    assert server.log[-1][4] == {
        "prompt": [{"role": "user", "content": "q"}],
        "response": "a",
        "metadata": {"answer": "a"},
    }
    # one timeout (0.3 s) and two backoffs (0.05 s, 0.1 s), not the server's 5 s sleep
    assert 0.45 < time.monotonic() - started < 3.0


def test_a_call_that_keeps_failing_has_no_reward_and_names_its_last_error(serve, token):
    server = serve(lambda key, attempt: "503")
    score = client(server, token).score([], "a", {})
    assert (score.reward, score.attempts, score.error) == (None, 3, "HTTP 503 Service Unavailable")
    server = serve(lambda key, attempt: "timeout")
    assert client(server, token, retries=1).score([], "a", {}).error == "timed out after 0.3 s"


def test_a_refused_token_or_an_answer_without_a_number_is_not_retried(serve, token, monkeypatch):
    server = serve(lambda key, attempt: None)
    score = client(server, None).score([], "a", {})  # no token sent: the server answers 401
    assert (score.reward, score.attempts, score.error) == (None, 1, "HTTP 401 Unauthorized")
    server = serve(lambda key, attempt: "garbage")
    score = client(server, token).score([], "a", {})
    assert (score.reward, score.attempts) == (None, 1) and score.error.startswith("the answer b'not json' is not")
    monkeypatch.delenv("REWARD_TOKEN")
    with pytest.raises(UserError) as error:
        client(server, token)
    assert str(error.value).startswith("reward.remote.token_env names REWARD_TOKEN, which is not set")


def samples_of(answers: list[str]) -> list[Sample]:
    """Two prompts, two answers each."""
    prompts = [
        Prompt([{"role": "user", "content": f"Say the last word: w{i}"}], [5 + i], {"answer": f"w{i}"}) for i in (0, 1)
    ]
    return [Sample(prompts[i // 2], [7, 8], True, version=3, text=text) for i, text in enumerate(answers)]


def test_failed_answers_get_no_reward_and_too_many_end_the_run_without_the_token(serve, token):
    """The reward functions' scores plus the service's at its weight; an answer whose call failed is nan (no
    reward); over max_failed_frac the scorer stops in one paragraph naming the endpoint and the last error."""
    server = serve(lambda key, attempt: "503" if ' fail"' in key else None, reward=lambda body: 2.0)
    ppo = PpoSection(advantage="grpo", samples_per_prompt=2, rollout_batch_size=2, mini_batch_size=4)
    remote = {"url": server.url + f"?key={TOKEN}", "weight": 0.5, "timeout_s": 0.3}
    remote |= {"retries": 1, "backoff_s": 0.01, "token_env": token, "max_failed_frac": 0.25}
    section = RewardSection(functions=[{"name": "last_word_exact"}], remote=remote)
    samples = samples_of(["w0", "x", "w1", "w1 fail"])
    RewardScorer(section, None, ppo).score(samples)
    rewards = [s.reward for s in samples]
    assert rewards[:3] == [2.0, 1.0, 2.0] and rewards[3] != rewards[3]  # nan
    assert server.log[0][4]["metadata"] == {"answer": "w0", "finished": True, "tokens": 2, "version": 3}
    with pytest.raises(RewardCallFailed) as failure:
        RewardScorer(section, None, ppo).score(samples_of(["w0 fail", "x", "w1", "w1 fail"]))
    message = str(failure.value)
    assert message.startswith(
        f"reward.remote: 2 of 4 answers got no reward from {server.url} after 2 attempts each, over "
        "reward.remote.max_failed_frac (0.25); the last error: HTTP 503 Service Unavailable."
    ), message
    assert TOKEN not in message and "\n" not in message
    with pytest.raises(ValueError, match="reward.remote.url carries credentials"):
        RemoteReward(url=f"https://user:{TOKEN}@example.org/score")


def test_an_answer_without_a_reward_is_in_neither_the_loss_nor_its_groups_baseline():
    """GRPO, RLOO, Dr. GRPO: a group of three with one unscored answer has the two others' advantages as a group of
    two; the unscored answer's tokens leave the action mask. A group left with one scored answer has no comparison."""
    nan = float("nan")
    scores = torch.tensor([1.0, nan, 0.0, 0.5, 0.5, 1.0, nan, nan, 1.0])
    for estimator in ("grpo", "rloo", "dr_grpo"):
        got = algo.group_relative_scores(scores, 3, estimator)
        pair = algo.group_relative_scores(torch.tensor([1.0, 0.0]), 2, estimator)
        trio = algo.group_relative_scores(torch.tensor([0.5, 0.5, 1.0]), 3, estimator)
        torch.testing.assert_close(got, torch.cat([pair[:1], torch.zeros(1), pair[1:], trio, torch.zeros(3)]))
    assert algo.informative_groups(scores, 3).tolist() == [True, True, False]

    p, q = Prompt([], [5, 6]), Prompt([], [7])
    samples = [Sample(p, [1, 2, 9], True, 0, ""), Sample(p, [1, 9], True, 0, "")]
    samples += [Sample(q, [3, 9], True, 0, ""), Sample(q, [4, 4, 9], True, 0, "")]
    rollout = Rollout.of(samples, pad_id=0)
    zeros = torch.zeros(4, 3)
    ppo = PpoSection(advantage="grpo", samples_per_prompt=2, rollout_batch_size=2, mini_batch_size=4)
    experience = estimate_advantages(
        rollout, RolloutScores(torch.tensor([1.0, nan, 0.0, 1.0]), zeros, zeros, zeros, None), ppo, 0.0
    )
    assert experience.batch["action_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert experience.batch["advantages"].isfinite().all()
    assert experience.batch["advantages"][0].abs().sum() == 0  # alone in its group: no comparison


def flaky(key: str, attempt: int) -> str | None:
    """6% of answers fail every attempt (503 and 500), and another 10% their first attempt only (timeouts and 503):
    decided by the answer's text and the attempt's number, so the same whatever order requests arrive in."""
    bucket = zlib.crc32(key.encode()) % 50
    if bucket < 3:
        return "503" if bucket % 2 else "500"
    if bucket < 8 and attempt == 1:
        return "timeout" if bucket % 2 else "503"
    return None


@pytest.mark.integration
def test_a_ppo_run_on_a_flaky_service_counts_its_failures_and_never_writes_the_token(
    ray_session, sft_base, tmp_path, serve, token
):
    """GRPO on a service that scores every answer 1.0 but times out or answers 5xx on some: the run completes, each
    iteration's reward is exactly 1.0 (a failed answer scored as 0 would pull it down), reward_failures adds up to
    the answers the server failed on every attempt, and the token is in no file the run wrote. Then with every call
    failing the run ends in one paragraph."""
    server = serve(flaky, sleep_s=3.0)
    retries = 1
    # an attempt has 2 s: the server answers at once unless told to time out, and the roles load both cores meanwhile
    remote = {"url": server.url, "timeout_s": 2.0, "retries": retries, "backoff_s": 0.05, "token_env": token}
    job = ppo_job(
        tmp_path,
        sft_base,
        "flaky",
        ppo={"iterations": 6, "advantage": "grpo"},
        reward={"functions": [], "remote": {**remote, "max_failed_frac": 0.5}},
    )
    run_dir = run_job(job_from_dict(job), show_progress=False).run_dir
    rows = iterations_of(run_dir)
    assert len(rows) == 6 and all(r["reward"] == 1.0 for r in rows), [r["reward"] for r in rows]
    # the answers the server failed on every attempt (it made retries + 1 of them), and those a retry scored
    attempts = [sorted(tries) for tries in server.answers.values()]
    lost = [tries for tries in attempts if flaky(tries[0][1], retries + 1) is not None]
    assert all([a for a, _, _ in tries] == [1, 2] and tries[-1][2] != "ok" for tries in lost)
    assert sum(r["reward_failures"] for r in rows) == len(lost) > 0
    assert any(tries[0][2] == "timeout" and tries[-1][2] == "ok" for tries in attempts)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    server = serve(lambda key, attempt: "503")
    job = ppo_job(
        tmp_path,
        sft_base,
        "down",
        ppo={"iterations": 2, "advantage": "grpo"},
        reward={"functions": [], "remote": {**remote, "url": server.url}},
        training={"max_failures": 0},
    )
    with pytest.raises(TrainingFailed) as failure:
        run_job(job_from_dict(job), show_progress=False)
    message = str(failure.value)
    count = len(server.answers)  # the first iteration's answers
    assert f"reward.remote: {count} of {count} answers got no reward from {server.url} after 2 attempts each" in message
    assert "the last error: HTTP 503 Service Unavailable" in message and TOKEN not in message
