"""Tiny MSD drafters for tests: `massv init --method msd` on a tiny Qwen2.5-VL target
(:func:`vllm_massv.testing.build_target`), with weights scaled so that the random head's
attention and MLP matter (a drafter whose layer is ~identity would hide position and KV-slot
errors)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from vllm_massv.msd.init import init_msd_drafter


def build_msd_drafter(target_dir: str | Path, out_dir: str | Path, *, decouple: bool = True,
                      seed: int = 0, weight_scale: float = 5.0) -> Path:
    """An untrained MSD drafter for `target_dir` in `out_dir`: `init_msd_drafter`, then every
    2-D weight multiplied by `weight_scale` (std 0.02 * scale). Returns `out_dir` as a Path."""
    out = init_msd_drafter(target_dir, out_dir, decouple=decouple, seed=seed).out_dir
    state = load_file(out / "model.safetensors")
    state = {k: (v * weight_scale if v.dim() == 2 else v).contiguous() for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


# --- draft recording inside a vLLM worker (for `LLM.collective_rpc`; needs
# --- VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the engine's environment) ---------------------------
def install_draft_recorder(worker) -> None:
    """Record every draft the worker's runner proposes: `(req_id, in_prefill, draft_ids)` per
    request and step, in `runner._massv_draft_log`. `in_prefill` marks steps whose drafts vLLM
    discards (a prompt chunk that does not finish the prompt). `runner._massv_step_log` gets
    `(scheduled requests, k the scheduler chose)` per step (k varies with
    `num_speculative_tokens_per_batch_size`)."""
    runner = worker.model_runner
    if hasattr(runner, "_massv_draft_log"):
        runner._massv_draft_log.clear()
        runner._massv_step_log.clear()
        return
    log: list = []
    steps: list = []
    runner._massv_draft_log, runner._massv_step_log = log, steps
    original = runner.propose_draft_token_ids

    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        steps.append((len(scheduler_output.num_scheduled_tokens),
                      scheduler_output.num_spec_tokens_to_schedule))
        in_prefill = {}
        for req_id in runner.input_batch.req_ids:
            state = runner.requests[req_id]
            n = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            in_prefill[req_id] = state.num_computed_tokens + n < state.num_prompt_tokens
        out = original(scheduler_output, *args, **kwargs)
        rows = out.tolist() if hasattr(out, "tolist") else [list(r) for r in out]
        for req_id, row in zip(runner.input_batch.req_ids, rows):
            log.append((req_id, in_prefill[req_id], [int(t) for t in row]))
        return out

    runner.propose_draft_token_ids = propose_draft_token_ids


def read_draft_log(worker) -> list:
    """The recorded drafts (see :func:`install_draft_recorder`)."""
    return list(worker.model_runner._massv_draft_log)


def read_step_log(worker) -> list:
    """The recorded (scheduled requests, k) per step (see :func:`install_draft_recorder`)."""
    return list(worker.model_runner._massv_step_log)


def cpu_sampler_fix_active(worker) -> bool:
    """Whether the worker's rejection sampler uses the plugin's `expand_batch_to_tokens`."""
    import vllm.v1.sample.rejection_sampler as rs

    from vllm_massv.patches import expand_batch_to_tokens

    return rs.expand_batch_to_tokens is expand_batch_to_tokens


def proposer_class(worker) -> str:
    """The class name of the worker's drafter (proposer)."""
    return type(worker.model_runner.drafter).__name__


# --- transformers replay of MSD drafting ------------------------------------------------------
def twin_drafts(drafter, embed_tokens, lm_head, seq: list[int], hidden, image_embeds,
                prompt_len: int, ctx_len: int, k: int, image_token_id: int,
                decouple: bool | None = None, positions=None, follow: list[int] | None = None,
                row_tokens: dict[int, int] | None = None) -> tuple[list[int], list[float]]:
    """The k greedy drafts vLLM's EAGLE proposer should make for the context `seq[:ctx_len]`,
    computed with the transformers twin (`vllm_massv.msd.hf_model.MsdQwen2Drafter`).

    Rows t = 0..ctx_len-2 take (x_{t+1}, f_t); image rows (next token an image placeholder in the
    prompt) take the image embedding; each draft step appends a row (draft token, the drafter's
    own previous output) at the next position, as `llm_base_proposer.py::propose` chains them.

    Args:
        drafter: `MsdQwen2Drafter` (eval, fp32).
        embed_tokens, lm_head: the target's token embedding and LM head modules.
        seq: the full token sequence (prompt + output); only `seq[:ctx_len]` is read.
        hidden: [>= ctx_len - 1, H] the target's post-norm hidden states along `seq`.
        image_embeds: [n_placeholders, H] the prompt's image embeddings (or None).
        prompt_len: length of the prompt (placeholders count only there).
        ctx_len: tokens known at this step (prompt + accepted output).
        k: drafts to make.
        image_token_id: the image placeholder id.
        decouple: False: the fc mix at every row (the ablation) whatever the drafter's
            `decouple_visual_tokens`; None: as configured.
        positions: [>= ctx_len - 1 + k] int64 RoPE positions of the rows (None: 0, 1, ...).
        follow: draft tokens to feed back instead of the twin's own (e.g. vLLM's drafts, so
            that every draft position is compared on the same inputs).
        row_tokens: {position: token id} next-token overrides for text rows: vLLM 0.32's
            partial-prefill rows (`vllm_massv.testing.eagle3.Eagle3Replay`,
            `chunk_end_overrides`).
    Returns:
        (k draft token ids, k top-1 minus top-2 logit margins).
    """
    import torch

    ids = torch.tensor(seq[1:ctx_len])
    is_image = ids == image_token_id
    is_image[prompt_len - 1:] = False
    for row, tok in (row_tokens or {}).items():
        if row < len(ids) and not is_image[row]:
            ids[row] = tok
    with torch.no_grad():
        emb = embed_tokens(ids)
        if image_embeds is not None and is_image.any():
            emb[is_image] = image_embeds[: int(is_image.sum())].to(emb.dtype)
    rows = None if decouple is False else is_image   # None: the fc mix at every row
    hid = hidden[: ctx_len - 1].to(emb.dtype)
    drafts: list[int] = []
    margins: list[float] = []
    for j in range(k):
        n = emb.shape[0]
        pos = None if positions is None else positions[:n].unsqueeze(0)
        with torch.no_grad():
            o = drafter(emb[None], hid[None], None if rows is None else rows[None],
                        position_ids=pos)[0, -1]
            top = lm_head(o).topk(2)
            tok = int(top.indices[0])
            nxt = tok if follow is None else int(follow[j])
            emb = torch.cat([emb, embed_tokens(torch.tensor([nxt]))])
        drafts.append(tok)
        margins.append(float(top.values[0] - top.values[1]))
        hid = torch.cat([hid, o[None]])
        if rows is not None:
            rows = torch.cat([rows, torch.zeros(1, dtype=torch.bool)])
    return drafts, margins


def draft_mismatches(log: list, outputs: dict, prompts: dict, features, drafter, *,
                     decouple: bool | None = None, temporal_positions: bool = False,
                     tie: float = 1e-2, replay=None,
                     row_tokens: dict[str, dict[int, int]] | None = None) -> dict[str, dict]:
    """Compare the drafts vLLM made (recorded by :func:`install_draft_recorder`) with the
    transformers twin's, step by step along each request's output.

    For verify step n of a request (context = prompt + output[:m_n], m_0 = 1, m_{n+1} = m_n +
    accepted_n + 1), the twin drafts with vLLM's own earlier drafts fed back (`follow`), so every
    draft position is compared on the same inputs. A mismatch where the twin's top-2 logit margin
    is below `tie` is a numerical tie and counted apart.

    Args:
        log: the recorded `(req_id, in_prefill, drafts)` entries.
        outputs: name -> vLLM `RequestOutput` (with `per_request_spec_decode_metrics`).
        prompts: name -> the vLLM prompt dicts (for the images).
        features: `training.features.TargetHiddenStates` of the target.
        drafter: `MsdQwen2Drafter` (eval, fp32).
        decouple: see :func:`twin_drafts`.
        temporal_positions: give the twin stock vLLM's first-pass RoPE positions (the target's
            temporal M-RoPE row, continued by +1 per draft) instead of the absolute index.
        tie: logit margin below which a mismatch is a tie.
        replay: another drafter's replay, called as `replay(seq, states, image_embeds, p,
            ctx_len, k, positions, follow)` with `states` = all of `features`' layers along
            `seq` (e.g. `vllm_massv.testing.eagle3.Eagle3Replay`); default: MSD's
            :func:`twin_drafts` with `drafter`.
    Returns:
        name -> {"steps", "mismatches" (per draft position), "ties", "first"}.
    """
    import torch

    from vllm_massv.hf.modeling_massv_qwen2 import mrope_positions

    result = {}
    for name, out in outputs.items():
        images = prompts[name].get("multi_modal_data", {}).get("image")
        images = [] if images is None else (images if isinstance(images, list) else [images])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq, p = prompt + tokens, len(prompt)
        (hidden, image_embeds), = features([seq], [images], [p])
        positions = None
        if temporal_positions:
            row = mrope_positions(prompt, features.image_token_id,
                                  [features.encoder.grid(im) for im in images])[0]
            positions = torch.cat([row, int(row.max()) + 1 + torch.arange(len(seq) + 16 - p)])
        entries = [e[2] for e in log if e[0].split("-")[0] == out.request_id and not e[1]]
        metrics = out.outputs[0].spec_decode_metrics
        k = max(metrics.per_step_drafted, default=0)
        mismatches, ties, first, m, steps = [0] * k, 0, None, 1, 0
        for n, (accepted, drafted) in enumerate(zip(metrics.per_step_accepted,
                                                    metrics.per_step_drafted)):
            if p + m > len(seq):
                break
            got = entries[n][:drafted]
            if replay is not None:
                fn = replay[name] if isinstance(replay, dict) else replay
                want, margins = fn(seq, hidden, image_embeds if images else None, p, p + m,
                                       drafted, positions, got)
            else:
                want, margins = twin_drafts(drafter, features.embed_tokens, features.lm_head,
                                            seq, hidden[0], image_embeds if images else None, p,
                                            p + m, drafted, features.image_token_id,
                                            decouple=decouple, positions=positions, follow=got,
                                            row_tokens=(row_tokens or {}).get(name))
            steps += 1
            for j in range(drafted):
                if want[j] != got[j]:
                    if margins[j] < tie:
                        ties += 1
                    else:
                        mismatches[j] += 1
                        first = first or (n, j)
            m += accepted + 1
        result[name] = {"steps": steps, "mismatches": mismatches, "ties": ties, "first": first}
    return result
