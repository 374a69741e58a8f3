"""Functions that run inside a vLLM worker, through `LLM.collective_rpc` (which needs
`VLLM_ALLOW_INSECURE_SERIALIZATION=1` in the engine's environment, :data:`ENV`).

The functions are sent by reference: the worker imports this module, which it finds on the
`sys.path` the test process passes on (pytest's `pythonpath`, the repository root).

* :func:`install_recorder` / :func:`read_record` -- every proposal the worker's runner makes:
  the drafts, the k the scheduler chose, the drafter's logits and the partial-prefill chunk ends.
* :func:`proposer_class`, :func:`cpu_sampler_fix_active`, :func:`vllm_encoder_cache` -- facts
  read from the worker.

vLLM and the plugin are imported inside the functions: they run in the worker, and test
modules that import this one collect without loading vLLM.
"""

from __future__ import annotations

from typing import Any

import torch

#: The engine environment `collective_rpc` with functions needs.
ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def install_recorder(worker) -> None:
    """Record every proposal of the worker's runner into `runner._massv_record` (installed once;
    a second call clears the record). Per call of `propose_draft_token_ids`:

    * "drafts": `(req_id, in_prefill, draft_ids)` per request, in batch order. `in_prefill`
      marks steps whose drafts vLLM discards (a prompt chunk that does not finish the prompt).
    * "steps": `(scheduled requests, k the scheduler chose)` (k varies with
      `num_speculative_tokens_per_batch_size`).
    * "logits": `{req_id: k x [vocab] float32 logits}` (one row per draft step, from the
      drafter model's `compute_logits`).
    * "chunk_ends" `{req_id: positions}`: the last position of each prompt chunk that does not
      finish the prompt (vLLM 0.32 gives that row the prompt's *last* token as its next token,
      see `tests.support.replay.Eagle3Replay`).
    """
    runner = worker.model_runner
    if hasattr(runner, "_massv_record"):
        for value in runner._massv_record.values():
            value.clear()
        return
    drafts: list = []
    steps: list = []
    logits: list = []
    chunk_ends: dict = {}
    runner._massv_record = {"drafts": drafts, "steps": steps, "logits": logits,
                            "chunk_ends": chunk_ends}
    propose = runner.propose_draft_token_ids
    calls: list = []
    model = getattr(runner.drafter, "model", None)
    if model is not None and hasattr(model, "compute_logits"):
        compute_logits = model.compute_logits

        def recording_compute_logits(hidden_states, *args, **kwargs):
            out = compute_logits(hidden_states, *args, **kwargs)
            calls.append(out.detach().float().cpu().clone())
            return out

        model.compute_logits = recording_compute_logits

    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        calls.clear()
        steps.append((len(scheduler_output.num_scheduled_tokens),
                      scheduler_output.num_spec_tokens_to_schedule))
        in_prefill = {}
        for req_id in runner.input_batch.req_ids:
            state = runner.requests[req_id]
            done = state.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            in_prefill[req_id] = done < state.num_prompt_tokens
            if in_prefill[req_id]:
                chunk_ends.setdefault(req_id, []).append(done - 1)
        out = propose(scheduler_output, *args, **kwargs)
        req_ids = list(runner.input_batch.req_ids)
        rows = out.tolist() if hasattr(out, "tolist") else [list(r) for r in out]
        for req_id, row in zip(req_ids, rows):
            drafts.append((req_id, in_prefill[req_id], [int(t) for t in row]))
        logits.append({r: [c[i] for c in calls if c.shape[0] > i] for i, r in enumerate(req_ids)})
        return out

    runner.propose_draft_token_ids = propose_draft_token_ids


def read_record(worker) -> dict[str, Any]:
    """A copy of what :func:`install_recorder` recorded: {"drafts", "steps", "logits",
    "chunk_ends"}."""
    record = worker.model_runner._massv_record
    return {"drafts": list(record["drafts"]), "steps": list(record["steps"]),
            "logits": list(record["logits"]),
            "chunk_ends": {k: list(v) for k, v in record["chunk_ends"].items()}}


def cpu_sampler_fix_active(worker) -> bool:
    """Whether the worker's rejection sampler uses the plugin's `expand_batch_to_tokens`."""
    import vllm.v1.sample.rejection_sampler as rs

    from vllm_massv.patches.v1_cpu_sampler import expand_batch_to_tokens

    return rs.expand_batch_to_tokens is expand_batch_to_tokens


def proposer_class(worker) -> str:
    """The class name of the worker's drafter (proposer)."""
    return type(worker.model_runner.drafter).__name__


def vllm_encoder_cache(worker) -> dict[str, torch.Tensor]:
    """The image embeddings a vLLM worker has cached (what the drafter is handed), by mm hash:
    CPU copies of `GPUModelRunner.encoder_cache`."""
    return {k: v.detach().cpu().clone() for k, v in worker.model_runner.encoder_cache.items()}
