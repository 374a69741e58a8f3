"""k by load: vLLM's batch-size schedule for k with a MASSV drafter, lossless and replayed.

k by load: vLLM's batch-size schedule for k (`num_speculative_tokens_per_batch_size`) with a
MASSV drafter.

vLLM 0.32's scheduler picks k for each step from the number of scheduled requests
(`vllm/v1/core/sched/scheduler.py`, `dynamic_sd_lookup`) and the V1 runner passes it to the
proposer's `propose(num_speculative_tokens, ...)`; k = 0 still runs the draft prefill, so the
drafter's KV cache stays in sync (`llm_base_proposer.py`, "Dynamic SD decided K=0"). The MASSV
proposer forwards k unchanged. Checked here on the mixed batch (images, chunked prefill), sent
in three waves (all five prompts with max_num_seqs 4, a pair, one alone), with every proposal
recorded in the worker:

* greedy output equals the target alone whatever k each step used;
* every step's k is the schedule's k for its number of scheduled requests (batch 1: 4, batch
  2: 2, 3 or more: 0), and vLLM's per-request draft counts are the recorded proposals;
* on Model Runner V2 too (this module runs in both sessions): MRV2 passes the step's k to the
  speculator (`gpu/model_runner.py::sample_tokens`) and blanks drafts past it;
* every draft token equals the transformers replay's (and every verify step accepts what the
  replay accepts), also after steps that drafted nothing (which vLLM's per-request metrics leave
  out): a drafter KV cache missing the tokens of k = 0 steps would draft from another context.

The drafter: on V1 the M-RoPE sanity drafter (the target's LM, identity projector, the target's
M-RoPE positions), which accepts almost every draft on image prompts, so the replay comparison
bites on images too (>= 0.9 asserted); on Model Runner V2, which refuses M-RoPE MASSV drafters,
the 1-D one (`sanity_1d`, little accepted on images; the 1-D image path on MRV2 is replayed with
a drafter that accepts there in tests/massv/test_massv_testbed.py).
"""

from __future__ import annotations

import pytest

from tests.support import recorders
from tests.support.engine import (IMAGE_PROMPTS, acceptance, engine, generate, mixed_batch,
                                  spec_config, token_ids)
from tests.support.profile import RUNNER
from tests.support.replay import assert_replay_equal

pytestmark = pytest.mark.both_runners

K = 4
DRAFTER = "sanity" if RUNNER == "v1" else "sanity_1d"
SCHEDULE = [[1, 1, 4], [2, 2, 2], [3, 256, 0]]
WAVES = {"all": None, "pair": ("astronaut", "two_images"), "alone": ("gradient_long",)}


def k_for(batch: int) -> int:
    return next(k for lo, hi, k in SCHEDULE if lo <= batch <= hi)


@pytest.fixture(scope="module")
def waves(models):
    spec = {**spec_config(getattr(models, DRAFTER), K), "num_speculative_tokens_per_batch_size": SCHEDULE}
    prompts = mixed_batch(models.target)
    out = {}
    with engine(models.target, spec, env=recorders.ENV) as llm:
        for wave, names in WAVES.items():
            batch = {n: prompts[n] for n in (names or prompts)}
            llm.collective_rpc(recorders.install_recorder)
            outputs = generate(llm, batch)
            record = llm.collective_rpc(recorders.read_record)[0]
            out[wave] = {"prompts": batch, "outputs": outputs, "drafts": record["drafts"],
                         "steps": record["steps"]}
    return out


def proposed_rows(wave: dict, out) -> list[list[int]]:
    """The draft ids proposed for one request per verify step (empty at k = 0): the recorded
    proposals after its prompt, less the last (made in the step that finished the request,
    never verified)."""
    req = out.request_id.split("-")[0]
    return [row for r, in_prefill, row in wave["drafts"]
            if r.split("-")[0] == req and not in_prefill][:-1]


def proposed(wave: dict, out) -> list[int]:
    """Drafts per verify step of one request, zeros included."""
    return [len(row) for row in proposed_rows(wave, out)]


def test_lossless(waves, reference):
    for wave, w in waves.items():
        got = token_ids(w["outputs"])
        assert got == {n: reference[n] for n in got}, wave


def test_k_follows_the_schedule(waves):
    seen = set()
    for wave, w in waves.items():
        assert w["steps"] and all(k == k_for(b) for b, k in w["steps"]), (wave, w["steps"])
        seen |= {k for _, k in w["steps"]}
        for name, out in w["outputs"].items():
            drafted = proposed(w, out)
            print(f"{wave} {name}: drafts per verify step {drafted}")
            assert [d for d in drafted if d] == list(
                out.outputs[0].spec_decode_metrics.per_step_drafted), (wave, name)
    assert seen == {0, 2, 4}
    alone = proposed(waves["alone"], waves["alone"]["outputs"]["gradient_long"])
    assert alone and set(alone) == {4}


def test_replay_equal_after_steps_without_drafts(waves, models):
    total_steps = total_accepted = drafts_after_zero_steps = 0
    for w in waves.values():
        drafts = {n: proposed_rows(w, o) for n, o in w["outputs"].items()}
        for rows in drafts.values():
            first = next((i for i, row in enumerate(rows) if row), None)
            if first:   # drafts that follow steps without drafts
                drafts_after_zero_steps += sum(len(row) for row in rows[first:])
        steps, accepted = assert_replay_equal(models.target, getattr(models, DRAFTER),
                                              w["outputs"], w["prompts"], drafts)
        total_steps, total_accepted = total_steps + steps, total_accepted + accepted
    print(f"{total_accepted} accepted over {total_steps} verify steps; "
          f"{drafts_after_zero_steps} draft tokens equal to the replay's after k = 0 steps")
    assert drafts_after_zero_steps > 0 and total_accepted > 0
    if DRAFTER == "sanity":
        rate = acceptance({f"{wave}:{n}": o for wave, w in waves.items()
                           for n, o in w["outputs"].items() if n in IMAGE_PROMPTS})
        print(f"{DRAFTER}: acceptance on the image prompts {rate:.4f}")
        assert rate >= 0.9
