"""Transformers replays of vLLM's drafting, one per drafter method, and the comparisons of what
vLLM did with them.

* MASSV (:func:`massv_replay`, :func:`assert_replay_equal`): the hf twin drafts greedily along
  the target's output; vLLM's per-step accepted counts must equal the replay's.
* MSD (:class:`MsdReplay`) and EAGLE-3 (:class:`Eagle3Replay`): the k drafts vLLM's EAGLE
  proposer should make for a context, from the target's hidden states, fed vLLM's own earlier
  drafts; compared draft by draft with what the worker recorded
  (:mod:`tests.support.recorders`) by :func:`draft_mismatches` and :func:`draft_logprob_diffs`.

Both follow the greedy verify walk of :func:`greedy_acceptance`: verify step n of a request sees
the prompt and output[:m_n], m_0 = 1 (the prefill step samples the first output token),
m_{n+1} = m_n + accepted_n + 1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tests.support import recorders
from tests.support.engine import (IMAGE_PROMPTS, acceptance, engine, generate, mixed_batch,
                                  prompt_images, token_ids)
from tests.support.models import TinyModels, copy_model
from tests.support.profile import FP32
from vllm_massv.rope import mrope_positions


# --- shared comparison helpers ---------------------------------------------------------------
def emitted_accepted(per_step_accepted: list[int], num_output_tokens: int) -> list[int]:
    """vLLM's per-step accepted counts, clipped to the tokens the request emitted: a step can
    accept drafts past `max_tokens` (they are verified, then cut), which a replay along the
    emitted output cannot see."""
    out, m = [], 1
    for a in per_step_accepted:
        out.append(min(a, max(num_output_tokens - m, 0)))
        m += a + 1
    return out


def greedy_acceptance(tokens: list[int], drafted_per_step: list[int],
                      propose: Callable[[int, int], list[int]],
                      proposals_out: list | None = None) -> list[int]:
    """Accepted draft count per verify step of greedy speculative decoding along `tokens` (the
    emitted output): `propose(m, drafted)` drafts `drafted` tokens after output[:m]; a draft
    counts until the first one that differs from the emitted token. `proposals_out` gets each
    step's drafts."""
    accepted, m = [], 1
    for drafted in drafted_per_step:
        proposals = propose(m, drafted)
        if proposals_out is not None:
            proposals_out.append(proposals)
        a = matched_drafts(proposals, tokens, m, drafted)
        accepted.append(a)
        m += a + 1
    return accepted


def matched_drafts(proposals: list[int], tokens: list[int], m: int, drafted: int) -> int:
    """How many of a verify step's first `drafted` draft tokens (drafted after output[:m]) equal
    the emitted tokens `tokens[m:]`, up to the first that differs: the greedy accepted count."""
    a = 0
    while a < drafted and m + a < len(tokens) and proposals[a] == tokens[m + a]:
        a += 1
    return a


def verify_steps(out, seq_len: int) -> Iterator[tuple[int, int, int]]:
    """`(n, m, drafted)` for the verify steps of a vLLM `RequestOutput` (per-request spec
    metrics), while the context prompt + output[:m] lies within the `seq_len` known tokens."""
    metrics, p, m = out.outputs[0].spec_decode_metrics, len(out.prompt_token_ids), 1
    for n, (accepted, drafted) in enumerate(zip(metrics.per_step_accepted,
                                                metrics.per_step_drafted)):
        if p + m > seq_len:
            return
        yield n, m, drafted
        m += accepted + 1


def recorded_drafts(log: list, request_id: str) -> list[list[int]]:
    """The drafts the worker recorded for one request after its prompt (steps whose drafts vLLM
    kept), from `read_record(...)["drafts"]`."""
    return [e[2] for e in log if e[0].split("-")[0] == request_id and not e[1]]


def chunk_end_overrides(chunk_ends: dict, outputs: dict) -> dict[str, dict[int, int]]:
    """Per request name, the `row_tokens` of :class:`MsdReplay` / :class:`Eagle3Replay` that
    reproduce vLLM's partial-prefill rows: {chunk end position: the prompt's last token}, from
    `read_record(...)["chunk_ends"]`."""
    ends: dict[str, set] = {}
    for req, positions in chunk_ends.items():
        ends.setdefault(req.split("-")[0], set()).update(positions)
    return {name: {e: int(out.prompt_token_ids[-1]) for e in ends.get(out.request_id, ())}
            for name, out in outputs.items()}


# --- MASSV -----------------------------------------------------------------------------------
def massv_replay(drafter, prompt_ids, output_ids, image_embeds, drafted_per_step,
                 proposals_out: list | None = None, image_grids=None,
                 follow: list[int] | None = None, tie: float = 0.0,
                 ties_out: list | None = None) -> list[int]:
    """Accepted draft count per verify step of greedy speculative decoding, simulated with a
    transformers drafter (`vllm_massv.drafters.massv.hf_model`) along the target's output: what
    vLLM's per-request `spec_decode_metrics.per_step_accepted` must equal. `proposals_out` gets
    each step's draft token ids.

    An M-RoPE drafter (`massv.positions == "mrope"`) gets the target's M-RoPE positions of the
    prompt (`vllm_massv.rope.mrope_positions` over `image_grids`, one (t, h, w) per image in
    merged-token units) and text positions continuing from their maximum + 1 after it, as vLLM
    gives the target (`models/qwen2_5_vl.py::get_mrope_input_positions`).

    `follow` (vLLM's accepted counts, for engines whose numerics differ from fp32 eager: compiled,
    TP = 2): walk vLLM's verify steps instead of the replay's own, and where a step's count
    differs, accept vLLM's only if the drafter's decision at the first differing draft was a
    near-tie in the replay -- the logit gap between the replay's argmax and the emitted token
    (the replay missed it) or between its top two (the replay hit it, vLLM's drafter did not)
    is below `tie`. Each such step is appended to `ties_out` as (step, draft position, gap)."""
    mrope = drafter.massv_config.positions == "mrope"
    prompt_pos = None
    if mrope:
        prompt_pos = mrope_positions(list(prompt_ids), drafter.massv_config.image_token_id,
                                     list(image_grids or []))

    def propose(m: int, drafted: int, rows: list | None = None) -> list[int]:
        ctx = list(prompt_ids) + list(output_ids[:m])
        proposals: list[int] = []
        for _ in range(drafted):
            ids = torch.tensor([ctx + proposals])
            # image positions are the prompt's placeholders only (generated text may contain the
            # placeholder token id; vLLM does not treat it as an image position either)
            mask = (ids == drafter.massv_config.image_token_id)
            mask[:, len(prompt_ids):] = False
            kwargs = {}
            if mrope:
                start = int(prompt_pos.max()) + 1 if len(prompt_ids) else 0
                tail = start + torch.arange(ids.shape[1] - len(prompt_ids))
                kwargs["position_ids"] = torch.cat(
                    [prompt_pos, tail.expand(3, -1)], dim=1).unsqueeze(1)
            with torch.no_grad():
                logits = drafter(input_ids=ids, image_embeds=image_embeds, image_mask=mask,
                                 **kwargs).logits
            if rows is not None:
                rows.append(logits[0, -1].float())
            proposals.append(int(logits[0, -1].argmax()))
        return proposals

    tokens = list(output_ids)
    if follow is None:
        return greedy_acceptance(tokens, drafted_per_step, propose, proposals_out)
    accepted, m = [], 1
    for n, (drafted, vllm_a) in enumerate(zip(drafted_per_step, follow)):
        rows: list = []
        proposals = propose(m, drafted, rows)
        if proposals_out is not None:
            proposals_out.append(proposals)
        a = matched_drafts(proposals, tokens, m, drafted)
        if a != vllm_a:
            j = min(a, vllm_a)
            row = rows[j]
            if a < vllm_a:   # the replay missed the emitted token, vLLM's drafter drafted it
                gap = float(row.max() - row[tokens[m + j]])
            else:            # the replay drafted the emitted token, vLLM's drafter did not
                top2 = row.topk(2).values
                gap = float(top2[0] - top2[1])
            if gap < tie:
                if ties_out is not None:
                    ties_out.append((n, j, gap))
                a = vllm_a
        accepted.append(a)
        m += vllm_a + 1
    return accepted


def assert_replay_equal(target: Path, drafter_dir: Path, outputs: dict[str, Any],
                        prompts: dict[str, dict], drafts: dict[str, list] | None = None,
                        tie: float | None = None, max_ties: int = 0) -> tuple[int, int]:
    """Every request's per-step accepted counts (vLLM) equal the transformers replay of its
    drafter (:func:`massv_replay`, image features from the transformers vision tower), fp32
    eager: what a TP = 1 eager engine gives (tests/massv/test_reference_1d.py); with `drafts`
    (request name -> the draft ids vLLM proposed per verify step, empty where k = 0) also every
    draft token, and the steps without drafts that vLLM's per-request metrics leave out are put
    back from it. With `tie` (engines whose numerics differ from fp32 eager), a step may differ
    from the replay only at a near-tie of the drafter (`massv_replay`'s `follow` mode), at most
    `max_ties` times over all requests. Returns (verify steps, accepted drafts) over all
    requests; tau = 1 + accepted / steps."""
    from transformers import AutoProcessor

    from vllm_massv.drafters.massv.hf_model import drafter_class
    from vllm_massv.training.features import TargetImageEncoder

    processor = AutoProcessor.from_pretrained(target)
    encoder = TargetImageEncoder(target)
    drafter = drafter_class(drafter_dir).from_pretrained(drafter_dir, dtype=torch.float32).eval()
    total_steps = total_accepted = ties = 0
    for name, prompt in prompts.items():
        images = prompt_images(prompt) or None
        inputs = processor(text=[prompt["prompt"]], images=images, return_tensors="pt")
        out = outputs[name]
        assert inputs["input_ids"][0].tolist() == list(out.prompt_token_ids), name
        embeds = encoder.encode(images) if images else None
        metrics, tokens = out.outputs[0].spec_decode_metrics, list(out.outputs[0].token_ids)
        drafted, accepted = list(metrics.per_step_drafted), list(metrics.per_step_accepted)
        if drafts is not None:
            assert [len(row) for row in drafts[name] if row] == drafted, name
            vllm_accepted = iter(accepted)
            drafted = [len(row) for row in drafts[name]]
            accepted = [next(vllm_accepted) if d else 0 for d in drafted]
        proposals: list = []
        grids = [encoder.grid(im) for im in images] if images else []
        got = emitted_accepted(accepted, len(tokens))
        found: list = []
        expected = massv_replay(drafter, out.prompt_token_ids, tokens, embeds, drafted, proposals,
                                image_grids=grids, follow=None if tie is None else got,
                                tie=tie or 0.0, ties_out=found)
        for step, pos, gap in found:
            print(f"{name}: verify step {step}, draft {pos}: near-tie of the drafter "
                  f"(logit gap {gap:.2e} < {tie}), vLLM's count kept")
        ties += len(found)
        assert got == expected, name
        if drafts is not None:
            assert drafts[name] == proposals, name
        total_steps += len(expected)
        total_accepted += sum(expected)
    assert ties <= max_ties, f"{ties} near-tie steps (at most {max_ties} allowed)"
    return total_steps, total_accepted


def check_engine_mode(label: str, models: TinyModels, drafter_dir: Path, outputs: dict[str, Any],
                      mode_reference: dict[str, list[int]], reference: dict[str, list[int]],
                      image_floor: float | None = None, tie: float = 1e-3) -> None:
    """A MASSV engine in a non-default mode (TP = 2, compiled) on the mixed batch: lossless
    against the target alone *in the same mode* (the mode's own numerics may flip a near-tie of
    the target's argmax against TP = 1 eager, with or without speculation), and every verify
    step accepts what the transformers replay accepts (:func:`assert_replay_equal`), i.e. the
    same tau as the TP = 1 eager engine -- except at most one step where the drafter's choice
    was a near-tie (logit gap < `tie`) that the mode's numerics may flip like the target's. With
    `image_floor`, the drafter must also accept at
    least that share of its drafts on the image prompts, so that the replay comparison has
    something to compare there (a drafter that accepts nothing on images would match a replay
    of a broken image path just as well)."""
    assert token_ids(outputs) == mode_reference
    same = [n for n in reference if reference[n] == mode_reference[n]]
    print(f"{label} target alone vs TP=1 eager target alone: {len(same)}/{len(reference)} "
          "outputs identical")
    steps, accepted = assert_replay_equal(models.target, drafter_dir, outputs,
                                          mixed_batch(models.target), tie=tie, max_ties=1)
    print(f"{label}: {accepted} accepted over {steps} verify steps, "
          f"tau {1 + accepted / steps:.3f}, every step equal to the TP=1 eager replay")
    assert accepted > 0
    if image_floor is not None:
        rate = acceptance(outputs, IMAGE_PROMPTS)
        print(f"{label}: acceptance on the image prompts {rate:.4f} (floor {image_floor})")
        assert rate >= image_floor


def prompt_logprobs_vs_transformers(drafter_dir: Path, prompt: str, top: int = 5):
    """Serve a MASSV drafter as a plain text model with prompt logprobs and compare them with its
    transformers twin (`vllm_massv.drafters.massv.hf_model`), fp32. Returns (the vLLM output, the largest
    |vLLM - transformers| logprob over vLLM's top-`top` entries of every position)."""
    from vllm import SamplingParams

    from vllm_massv.drafters.massv.hf_model import drafter_class
    from vllm_massv.speculators import SPECULATORS_KEYS

    with tempfile.TemporaryDirectory() as tmp:
        # without its speculators block: vLLM would serve the drafter's verifier instead
        plain = copy_model(drafter_dir, Path(tmp) / "drafter",
                           lambda c: [c.pop(k, None) for k in SPECULATORS_KEYS])
        with engine(plain, max_model_len=512, limit_mm_per_prompt=None, **FP32) as llm:
            out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=top),
                               use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    drafter = drafter_class(drafter_dir).from_pretrained(drafter_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(drafter(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    worst = max(abs(lp.logprob - logp[i - 1, token].item())
                for i in range(1, len(ids)) for token, lp in out.prompt_logprobs[i].items())
    return out, worst


# --- MSD and EAGLE-3 (EAGLE-style proposers) ---------------------------------------------------
def run_msd(target: Path, drafter: Path, env: dict | None = None, rerun: bool = False,
            k: int = 3) -> dict:
    """Serve an MSD `drafter` for `target` (`{"method": "eagle"}`, `k` speculative tokens) on the
    mixed batch with the worker recorder. Returns {"outputs", "log" (recorded drafts), "rows"
    (:func:`chunk_end_overrides`), "proposer", "cpu_sampler_fix"}; with `rerun`, the image
    prompts run a second time in the same engine (prefix-cache hits) into "rerun" ({"outputs",
    "log", "rows"})."""
    with engine(target, {"method": "eagle", "model": str(drafter), "num_speculative_tokens": k},
                env={**recorders.ENV, **(env or {})}) as llm:
        llm.collective_rpc(recorders.install_recorder)
        outputs = generate(llm, mixed_batch(target))
        record = llm.collective_rpc(recorders.read_record)[0]
        result = {"outputs": outputs, "log": record["drafts"], "logits": record["logits"],
                  "rows": chunk_end_overrides(record["chunk_ends"], outputs),
                  "proposer": llm.collective_rpc(recorders.proposer_class)[0],
                  "cpu_sampler_fix": llm.collective_rpc(recorders.cpu_sampler_fix_active)[0]}
        if rerun:
            llm.collective_rpc(recorders.install_recorder)   # clears the record
            prompts = {n: p for n, p in mixed_batch(target).items() if n in IMAGE_PROMPTS}
            rerun = generate(llm, prompts)
            record = llm.collective_rpc(recorders.read_record)[0]
            rows = chunk_end_overrides(record["chunk_ends"], rerun)
            for name, out in rerun.items():
                # Prefix-cache hits reuse the first run's draft KV too, rows written with that
                # run's partial-prefill overrides included.
                cached = out.num_cached_tokens or 0
                rows[name] = {**{pos: tok for pos, tok in result["rows"][name].items()
                                 if pos < cached}, **rows[name]}
            result["rerun"] = {"outputs": rerun, "log": record["drafts"],
                               "logits": record["logits"], "rows": rows}
        return result


class MsdReplay:
    """The greedy drafts vLLM's EAGLE proposer should make with an MSD drafter, computed with the
    transformers twin (`vllm_massv.drafters.msd.hf_model.MsdQwen2Drafter`).

    For a context `seq[:ctx_len]`, rows t = 0..ctx_len-2 take (x_{t+1}, f_t); image rows (next
    token an image placeholder in the prompt) take the image embedding; each draft step appends a
    row (draft token, the drafter's own previous output) at the next position, as
    `llm_base_proposer.py::propose` chains them.

    Args:
        drafter: `MsdQwen2Drafter` (eval, fp32).
        features: the target's `training.features.TargetHiddenStates` (its `embed_tokens`,
            `lm_head` and `image_token_id` are used).
        decouple: False: the fc mix at every row (the ablation) whatever the drafter's
            `decouple_visual_tokens`; None: as configured.
        row_tokens: {position: token id} next-token overrides for text rows: vLLM 0.32's
            partial-prefill rows (:func:`chunk_end_overrides`, see :class:`Eagle3Replay`).
    Call: `(seq, states [>= 1, >= ctx_len - 1, H] (the target's post-norm hidden states along
    `seq`, first layer used), image_embeds [n_placeholders, H] or None, prompt_len, ctx_len, k,
    positions [>= ctx_len - 1 + k] int64 RoPE positions or None (0, 1, ...), follow)` -> (k draft
    ids, k top-1 minus top-2 logit margins). `follow`: draft tokens to feed back instead of the
    twin's own (vLLM's drafts, so that every draft position is compared on the same inputs). The
    k [vocab] logit rows of the last call are in `last_logits`.
    """

    def __init__(self, drafter, features, decouple: bool | None = None,
                 row_tokens: dict[int, int] | None = None) -> None:
        self.drafter, self.decouple = drafter, decouple
        self.last_logits: list[torch.Tensor] = []
        self.embed_tokens, self.lm_head = features.embed_tokens, features.lm_head
        self.image_token_id = features.image_token_id
        self.row_tokens = row_tokens or {}

    @torch.no_grad()
    def __call__(self, seq, states, image_embeds, prompt_len, ctx_len, k, positions=None,
                 follow=None) -> tuple[list[int], list[float]]:
        ids = torch.tensor(seq[1:ctx_len])
        is_image = ids == self.image_token_id
        is_image[prompt_len - 1:] = False
        for row, tok in self.row_tokens.items():
            if row < len(ids) and not is_image[row]:
                ids[row] = tok
        emb = self.embed_tokens(ids)
        if image_embeds is not None and is_image.any():
            emb[is_image] = image_embeds[: int(is_image.sum())].to(emb.dtype)
        rows = None if self.decouple is False else is_image   # None: the fc mix at every row
        hid = states[0][: ctx_len - 1].to(emb.dtype)
        drafts: list[int] = []
        margins: list[float] = []
        self.last_logits = []
        for j in range(k):
            n = emb.shape[0]
            pos = None if positions is None else positions[:n].unsqueeze(0)
            o = self.drafter(emb[None], hid[None], None if rows is None else rows[None],
                             position_ids=pos)[0, -1]
            logits = self.lm_head(o)
            self.last_logits.append(logits)
            top = logits.topk(2)
            tok = int(top.indices[0])
            nxt = tok if follow is None else int(follow[j])
            emb = torch.cat([emb, self.embed_tokens(torch.tensor([nxt]))])
            drafts.append(tok)
            margins.append(float(top.values[0] - top.values[1]))
            hid = torch.cat([hid, o[None]])
            if rows is not None:
                rows = torch.cat([rows, torch.zeros(1, dtype=torch.bool)])
        return drafts, margins


class Eagle3Replay:
    """The greedy drafts vLLM's EAGLE proposer (method `eagle3`) should make, computed with the
    transformers twin (`vllm_massv.drafters.eagle3.hf_model.Eagle3Drafter`).

    For a context `seq[:ctx_len]`, rows t = 0..ctx_len-2 take (E(x_{t+1}), fc(a_t)); each draft
    step appends a row (E(draft), the previous output o) at the next position, as
    `llm_base_proposer.py::propose` chains them; every row attends causally to all earlier ones.

    Args:
        drafter: `Eagle3Drafter` (eval, fp32).
        features: the target's `training.features.TargetHiddenStates` (its `embed_tokens` is
            used).
        row_tokens: next-token overrides {position: token id} (see below).
    Call: `(seq, states [n_aux + 1, >= ctx_len - 1, H] (aux layers in id order, then the final
    one, as `TargetHiddenStates(layers=aux - 1 ..., FINAL)` returns), image_embeds (unused: the
    head takes none), prompt_len, ctx_len, k, positions [>= ctx_len - 1 + k] or None, follow)`
    -> (k draft ids in the target vocabulary, k top-1 minus top-2 logit margins); the k
    [vocab] logit rows (target vocabulary, -inf outside a reduced draft vocabulary) of the last
    call are in `last_logits`.

    Quirk of vLLM 0.32 reproduced with `row_tokens` ({position: token id}): with chunked
    prefill, the last row of every chunk that does not finish the prompt gets the prompt's last
    token as its next token (`llm_base_proposer.py::prepare_next_token_ids_padded` takes the
    "backup" token at `num_tokens_no_spec - 1`, the end of the whole prompt, not the token after
    the chunk), and that row's draft KV stays in the cache for the rest of the request.
    """

    def __init__(self, drafter, features, row_tokens: dict[int, int] | None = None) -> None:
        self.drafter, self.embed_tokens = drafter, features.embed_tokens
        self.row_tokens = row_tokens or {}
        self.last_logits: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, seq, states, image_embeds, prompt_len, ctx_len, k, positions=None,
                 follow=None) -> tuple[list[int], list[float]]:
        d = self.drafter
        n_aux = d.cfg.num_aux
        aux = states[:n_aux, : ctx_len - 1].permute(1, 0, 2).reshape(ctx_len - 1, -1).float()
        hid = d.combine_hidden_states(aux)
        ids = list(seq[1:ctx_len])
        for row, tok in self.row_tokens.items():
            if row < len(ids):
                ids[row] = tok
        emb = self.embed_tokens(torch.tensor(ids)).float()
        drafts, margins = [], []
        self.last_logits = []
        for j in range(k):
            n = emb.shape[0]
            pos = None if positions is None else positions[:n].unsqueeze(0)
            o = d.causal_forward(hid[None], emb[None], pos)[0, -1]
            logits = d.target_logits(d.logits(o))
            self.last_logits.append(logits)
            top = logits.topk(2)
            tok = int(top.indices[0])
            nxt = tok if follow is None else int(follow[j])
            drafts.append(tok)
            margins.append(float(top.values[0] - top.values[1]))
            emb = torch.cat([emb, self.embed_tokens(torch.tensor([nxt])).float()])
            hid = torch.cat([hid, o[None]])
        return drafts, margins


def draft_mismatches(log: list, outputs: dict, prompts: dict, features, replays, *,
                     temporal_positions: bool = False, tie: float = 1e-2,
                     logit_log: list | None = None) -> dict[str, dict]:
    """Compare the drafts vLLM made (recorded in the worker) with a replay's, step by step along
    each request's output.

    At every verify step the replay drafts with vLLM's own earlier drafts fed back (`follow`),
    so every draft position is compared on the same inputs. A mismatch where the replay's top-2
    logit margin is below `tie` is a numerical tie and counted apart.

    Args:
        log: the recorded `(req_id, in_prefill, drafts)` entries (`read_record(...)["drafts"]`).
        outputs: name -> vLLM `RequestOutput` (with `per_request_spec_decode_metrics`).
        prompts: name -> the vLLM prompt dicts (for the images).
        features: `training.features.TargetHiddenStates` of the target (the layers the replays
            read).
        replays: a :class:`MsdReplay` / :class:`Eagle3Replay`, or name -> one.
        temporal_positions: give the replay stock vLLM's first-pass RoPE positions (the target's
            temporal M-RoPE row, continued by +1 per draft) instead of the absolute index.
        tie: logit margin below which a mismatch is a tie.
        logit_log: the drafter logits the worker recorded (`read_record(...)["logits"]`); with
            it "logit_diff" is the largest |vLLM logit - replay logit| over every compared
            draft position (finite entries), so a caller can require the two computations to
            agree numerically everywhere, not only in their argmax.
    Returns:
        name -> {"steps", "mismatches" (per draft position), "ties", "first", "logit_diff"}.
    """
    logged_by_req: dict[str, list] = {}
    for entry in logit_log or []:
        for req, rows in entry.items():
            logged_by_req.setdefault(req.split("-")[0], []).append(rows)
    result = {}
    for name, out in outputs.items():
        images = prompt_images(prompts[name])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq, p = prompt + tokens, len(prompt)
        (states, image_embeds), = features([seq], [images], [p])
        positions = None
        if temporal_positions:
            row = mrope_positions(prompt, features.image_token_id,
                                  [features.encoder.grid(im) for im in images])[0]
            positions = torch.cat([row, int(row.max()) + 1 + torch.arange(len(seq) + 16 - p)])
        entries = recorded_drafts(log, out.request_id)
        replay = replays[name] if isinstance(replays, dict) else replays
        k = max(out.outputs[0].spec_decode_metrics.per_step_drafted, default=0)
        logged = (logged_by_req.get(out.request_id.split("-")[0], [])[-len(entries):]
                  if logit_log is not None else None)
        mismatches, ties, first, steps, worst = [0] * k, 0, None, 0, 0.0
        for n, m, drafted in verify_steps(out, len(seq)):
            got = entries[n][:drafted]
            want, margins = replay(seq, states, image_embeds if images else None, p, p + m,
                                   drafted, positions, got)
            steps += 1
            for j in range(drafted):
                measured = 0.0
                if logged is not None:
                    twin = replay.last_logits[j]
                    vllm = logged[n][j][: twin.shape[0]]
                    finite = torch.isfinite(twin) & torch.isfinite(vllm)
                    measured = float((twin[finite] - vllm[finite]).abs().max())
                    worst = max(worst, measured)
                if want[j] != got[j]:
                    if margins[j] < tie:
                        ties += 1
                    else:
                        mismatches[j] += 1
                        first = first or (n, j)
        result[name] = {"steps": steps, "mismatches": mismatches, "ties": ties, "first": first,
                        "logit_diff": worst}
    return result


def draft_logprob_diffs(outputs: dict, draft_log: list, logit_log: list, prompts: dict,
                        features, replays: dict, steps: int = 6) -> tuple[float, int, set]:
    """Compare vLLM's draft log-probabilities (recorded in the worker) with the twin's
    (:class:`Eagle3Replay` per request name, fed vLLM's own earlier drafts) over the first
    `steps` verify steps of each request.

    Returns:
        (max |log p_vllm - log p_twin| over finite entries, draft steps compared, the set of
        finite-entry counts seen).
    Raises:
        AssertionError: vLLM and the twin disagree on which ids are -inf.
    """
    steps_by_req: dict[str, list] = {}
    for entry in logit_log:
        for req, rows in entry.items():
            steps_by_req.setdefault(req.split("-")[0], []).append(rows)
    worst, compared, finite_counts = 0.0, 0, set()
    for name, out in outputs.items():
        images = prompt_images(prompts[name])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq, p = prompt + tokens, len(prompt)
        (states, _), = features([seq], [images], [p])
        mine = recorded_drafts(draft_log, out.request_id)
        logged = steps_by_req[out.request_id][-len(mine):]   # the proposals after the prompt
        replay = replays[name]
        for n, m, drafted in verify_steps(out, len(seq)):
            if n >= steps:
                break
            replay(seq, states, None, p, p + m, drafted, None, mine[n][:drafted])
            for j in range(drafted):
                want = torch.log_softmax(replay.last_logits[j], -1)
                got = torch.log_softmax(logged[n][j][: want.shape[0]], -1)
                finite = torch.isfinite(want)
                assert torch.equal(finite, torch.isfinite(got)), (name, n, j)
                finite_counts.add(int(finite.sum()))
                worst = max(worst, float((want[finite] - got[finite]).abs().max()))
                compared += 1
    return worst, compared, finite_counts
