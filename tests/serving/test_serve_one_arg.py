"""One-argument serving (`vllm serve DRAFTER`) through the OpenAI server on the CPU testbed.

One-argument serving through the OpenAI server on the trained CPU testbed:
`vllm serve benchmarks/testbed/models/drafter-massv` (the drafter's speculators_config names the
target and k) against the two-argument form `vllm serve TARGET --speculative-config massv.json`.
Both servers run `vllm serve` itself, one after the other; the same held-out testbed questions
(with images, greedy) must give token-identical answers and identical speculative-decoding
counters on `/metrics` (so the same τ), and the one-argument server must use the MASSV proposer.

A third server serves the trained testbed EAGLE-3 head the same way, with stock vLLM's speculators
path (`vllm serve benchmarks/testbed/models/drafter-eagle3`: method eagle3): its answers
must equal the MASSV servers' token for token (both lossless, so both are the target's greedy
answers).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import serve_demo
from vllm_massv.testing import ApiServer, ServerStartError

pytestmark = pytest.mark.slow

MAX_TOKENS = 48


EAGLE3 = serve_demo.DRAFTER.parent / "drafter-eagle3"


def _serve(two_arguments: bool, log, drafter=serve_demo.DRAFTER) -> dict:
    srv: ApiServer = serve_demo.server(two_arguments, log=log, drafter=drafter)
    srv.startup_timeout = 300
    try:
        with srv:
            model = serve_demo.served_model(srv.url)
            answers = [serve_demo.ask(srv.url, model, messages, MAX_TOKENS)
                       for _, messages in serve_demo.testbed_questions()]
            stats = serve_demo.spec_decode_stats(srv.url)
    except ServerStartError as e:
        pytest.fail(str(e), pytrace=False)
    return {"cmd": srv.cmd, "model": model, "stats": stats, "log": srv.log.read_text(),
            "answers": [(a.choices[0].message.content, getattr(a.choices[0], "token_ids", None))
                        for a in answers]}


@pytest.fixture(scope="module")
def one_arg(tmp_path_factory) -> dict:
    return _serve(False, tmp_path_factory.mktemp("one_arg") / "server.log")


@pytest.fixture(scope="module")
def two_arg(one_arg, tmp_path_factory) -> dict:
    return _serve(True, tmp_path_factory.mktemp("two_arg") / "server.log")


def test_one_argument_serves_target_with_massv(one_arg) -> None:
    cfg = json.loads((serve_demo.ROOT / serve_demo.DRAFTER / "config.json").read_text())
    k = cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    assert one_arg["cmd"][1:3] == ["serve", str(serve_demo.DRAFTER)]
    assert "--speculative-config" not in one_arg["cmd"]
    assert "MASSV proposer active" in one_arg["log"]
    stats = one_arg["stats"]
    print(f"one argument: tau {stats['tau']:.2f}, {stats['drafts']} drafts, "
          f"{stats['accepted_tokens']} accepted")
    assert stats["drafts"] > 0 and stats["draft_tokens"] == k * stats["drafts"]
    assert stats["tau"] > 2.0  # the trained MASSV drafter on the questions it was trained for
    assert all(text and ids for text, ids in one_arg["answers"])


def test_one_argument_equals_two_argument_form(one_arg, two_arg) -> None:
    assert "--speculative-config" in two_arg["cmd"]
    assert one_arg["answers"] == two_arg["answers"]
    for key in ("drafts", "draft_tokens", "accepted_tokens"):
        assert one_arg["stats"][key] == two_arg["stats"][key], key


@pytest.fixture(scope="module")
def eagle3_one_arg(two_arg, tmp_path_factory) -> dict:
    return _serve(False, tmp_path_factory.mktemp("eagle3") / "server.log", drafter=EAGLE3)


def test_one_argument_eagle3_head_is_lossless(one_arg, eagle3_one_arg) -> None:
    """`vllm serve drafter-eagle3` (stock vLLM, method eagle3 from the speculators block, k = 4)
    answers exactly as the MASSV servers do, and the trained head is accepted."""
    assert eagle3_one_arg["cmd"][1:3] == ["serve", str(EAGLE3)]
    assert "MASSV proposer active" not in eagle3_one_arg["log"]
    stats = eagle3_one_arg["stats"]
    print(f"EAGLE-3 one argument: tau {stats['tau']:.2f}, {stats['drafts']} drafts")
    assert stats["drafts"] > 0 and stats["draft_tokens"] == 4 * stats["drafts"]
    assert stats["tau"] > 2.0
    assert eagle3_one_arg["answers"] == one_arg["answers"]
