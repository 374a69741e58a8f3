"""EAGLE-3 heads for tests: tiny untrained heads (`massv init --method eagle3` with scaled
weights) and the transformers replay of vLLM's EAGLE-3 drafting (`Eagle3Replay`), used with
`vllm_massv.testing.msd.draft_mismatches` and its worker-side draft recorder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_massv.eagle3.init import init_eagle3_drafter


def build_eagle3_drafter(target_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                         weight_scale: float = 5.0, **kwargs) -> Path:
    """An untrained EAGLE-3 head for `target_dir` in `out_dir`: `init_eagle3_drafter(**kwargs)`,
    then every trainable 2-D weight multiplied by `weight_scale` (so the random layer's attention
    matters: position and KV-slot errors change drafts). Returns `out_dir` as a Path."""
    out = init_eagle3_drafter(target_dir, out_dir, seed=seed, **kwargs).out_dir
    state = load_file(out / "model.safetensors")
    state = {k: (v * weight_scale if v.dim() == 2 and k != "lm_head.weight" else v).contiguous()
             for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


class Eagle3Replay:
    """The greedy drafts vLLM's EAGLE proposer (method `eagle3`) should make, computed with the
    transformers twin (`vllm_massv.eagle3.model.Eagle3Drafter`).

    For a context `seq[:ctx_len]`, rows t = 0..ctx_len-2 take (E(x_{t+1}), fc(a_t)); each draft
    step appends a row (E(draft), the previous output o) at the next position, as
    `llm_base_proposer.py::propose` chains them; every row attends causally to all earlier ones.

    Args:
        drafter: `Eagle3Drafter` (eval, fp32).
        embed_tokens: the target's token embedding module.
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

    def __init__(self, drafter, embed_tokens, row_tokens: dict[int, int] | None = None) -> None:
        self.drafter, self.embed_tokens = drafter, embed_tokens
        self.row_tokens = row_tokens or {}
        self.last_logits: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, seq, states, image_embeds, prompt_len, ctx_len, k, positions=None,
                 follow=None):
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


# --- draft-logit recording inside a vLLM worker (for `LLM.collective_rpc`) ------------------------
def install_logit_recorder(worker) -> None:
    """Record the drafter's logits per proposal: `runner._massv_logit_log` gets, per call of
    `propose_draft_token_ids`, `{req_id: k x [vocab] float32 logits}` (one row per draft step,
    from the drafter's `compute_logits`, in the batch's request order), and
    `runner._massv_chunk_ends` `{req_id: positions}`: the last position of each prompt chunk that
    does not finish the prompt (vLLM 0.32 gives that row the prompt's *last* token as its next
    token, see :class:`Eagle3Replay`). Install after
    `vllm_massv.testing.msd.install_draft_recorder`."""
    runner = worker.model_runner
    if hasattr(runner, "_massv_logit_log"):
        runner._massv_logit_log.clear()
        runner._massv_chunk_ends.clear()
        return
    log: list = []
    chunk_ends: dict = {}
    runner._massv_logit_log, runner._massv_chunk_ends = log, chunk_ends
    model = runner.drafter.model
    compute_logits, propose = model.compute_logits, runner.propose_draft_token_ids
    calls: list = []

    def recording_compute_logits(hidden_states, *args, **kwargs):
        out = compute_logits(hidden_states, *args, **kwargs)
        calls.append(out.detach().float().cpu().clone())
        return out

    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        calls.clear()
        for req_id in runner.input_batch.req_ids:
            state = runner.requests[req_id]
            done = state.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if done < state.num_prompt_tokens:
                chunk_ends.setdefault(req_id, []).append(done - 1)
        out = propose(scheduler_output, *args, **kwargs)
        req_ids = list(runner.input_batch.req_ids)
        log.append({r: [c[i] for c in calls if c.shape[0] > i] for i, r in enumerate(req_ids)})
        return out

    model.compute_logits = recording_compute_logits
    runner.propose_draft_token_ids = propose_draft_token_ids


def read_logit_log(worker) -> list:
    """The recorded drafter logits (see :func:`install_logit_recorder`)."""
    return list(worker.model_runner._massv_logit_log)


def read_chunk_ends(worker) -> dict:
    """The recorded partial-prefill chunk ends (see :func:`install_logit_recorder`)."""
    return {k: list(v) for k, v in worker.model_runner._massv_chunk_ends.items()}


def chunk_end_overrides(chunk_ends: dict, outputs: dict) -> dict[str, dict[int, int]]:
    """Per request name, the `row_tokens` of :class:`Eagle3Replay` that reproduce vLLM's
    partial-prefill rows: {chunk end position: the prompt's last token}, from
    :func:`read_chunk_ends`."""
    ends: dict[str, set] = {}
    for req, positions in chunk_ends.items():
        ends.setdefault(req.split("-")[0], set()).update(positions)
    return {name: {e: int(out.prompt_token_ids[-1]) for e in ends.get(out.request_id, ())}
            for name, out in outputs.items()}


def draft_logprob_diffs(outputs: dict, draft_log: list, logit_log: list, prompts: dict,
                        features, replays: dict, steps: int = 6) -> tuple[float, int, set]:
    """Compare vLLM's draft log-probabilities (recorded by :func:`install_logit_recorder`) with
    the twin's (:class:`Eagle3Replay` per request name, fed vLLM's own earlier drafts) over the
    first `steps` verify steps of each request.

    Returns:
        (max |log p_vllm - log p_twin| over finite entries, draft steps compared, the set of
        finite-entry counts seen).
    Raises:
        AssertionError: vLLM and the twin disagree on which ids are -inf.
    """
    drafts = [e for e in draft_log if not e[1]]
    steps_by_req: dict[str, list] = {}
    for entry in logit_log:
        for req, rows in entry.items():
            steps_by_req.setdefault(req.split("-")[0], []).append(rows)
    worst, compared, finite_counts = 0.0, 0, set()
    for name, out in outputs.items():
        image = prompts[name].get("multi_modal_data", {}).get("image")
        images = [] if image is None else (image if isinstance(image, list) else [image])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq, p = prompt + tokens, len(prompt)
        (states, _), = features([seq], [images], [p])
        mine = [e[2] for e in drafts if e[0].split("-")[0] == out.request_id]
        logged = steps_by_req[out.request_id][-len(mine):]   # the proposals after the prompt
        metrics, m = out.outputs[0].spec_decode_metrics, 1
        replay = replays[name]
        for n, (accepted, drafted) in enumerate(zip(metrics.per_step_accepted,
                                                    metrics.per_step_drafted)):
            if p + m > len(seq) or n >= steps:
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
            m += accepted + 1
    return worst, compared, finite_counts
