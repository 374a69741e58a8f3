"""Functions that run inside a vLLM worker, through `LLM.collective_rpc` (which needs
`VLLM_ALLOW_INSECURE_SERIALIZATION=1` in the engine's environment, :data:`ENV`).

The functions are sent by reference: the worker imports this module, which it finds on the
`sys.path` the test process passes on (pytest's `pythonpath`, the repository root).

* :func:`install_recorder` / :func:`read_record` -- every proposal the worker's runner makes:
  the drafts, the k the scheduler chose, the drafter's logits and the partial-prefill chunk ends
  (V1's proposer or Model Runner V2's speculator).
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
      finish the prompt (vLLM 0.32's V1 runner gives that row the prompt's *last* token as its
      next token, see `tests.support.replay.Eagle3Replay`); empty on Model Runner V2, which
      gives it the true next prompt token.
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
    calls: list = []
    if is_model_runner_v2(runner):
        _record_mrv2_speculator(runner.speculator, runner._massv_record, calls)
        return
    propose = runner.propose_draft_token_ids
    model = getattr(runner.drafter, "model", None)
    _record_logits(model, calls)

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


def is_model_runner_v2(runner) -> bool:
    """Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`) has a `speculator`; V1 a
    `drafter`."""
    return hasattr(runner, "speculator") and not hasattr(runner, "drafter")


def _record_logits(model, calls: list) -> None:
    if model is None or not hasattr(model, "compute_logits"):
        return
    compute_logits = model.compute_logits

    def recording_compute_logits(hidden_states, *args, **kwargs):
        out = compute_logits(hidden_states, *args, **kwargs)
        calls.append(out.detach().float().cpu().clone())
        return out

    model.compute_logits = recording_compute_logits


def _record_mrv2_speculator(speculator, record: dict, calls: list) -> None:
    """:func:`install_recorder` on Model Runner V2: wraps `speculator.propose`, which the runner
    calls once per step with the step's `InputBatch` and the k the scheduler chose
    (`num_speculative_tokens`; the runner blanks drafts past k, `sample_tokens`)."""
    propose = speculator.propose
    _record_logits(getattr(speculator, "model", None), calls)

    def recording_propose(input_batch, *args, num_speculative_tokens=None, dummy_run=False,
                          **kwargs):
        if dummy_run:
            return propose(input_batch, *args, num_speculative_tokens=num_speculative_tokens,
                           dummy_run=dummy_run, **kwargs)
        calls.clear()
        n = input_batch.num_reqs
        k = (speculator.num_speculative_steps if num_speculative_tokens is None
             else num_speculative_tokens)
        record["steps"].append((n, k))
        req_ids = list(input_batch.req_ids[:n])
        done = input_batch.num_computed_tokens_np[:n] + input_batch.num_scheduled_tokens[:n]
        # "chunk_ends" stays empty: MRV2 gives a partial-prefill chunk's last row the true next
        # prompt token (`req_states.next_prefill_tokens`,
        # `gpu/spec_decode/target_dependent_ar/speculator.py::_prepare_prefill_inputs_kernel`),
        # so no row needs V1's override.
        in_prefill = {req_id: bool(done[i] < input_batch.prefill_len_np[i])
                      for i, req_id in enumerate(req_ids)}
        out = propose(input_batch, *args, num_speculative_tokens=num_speculative_tokens,
                      dummy_run=dummy_run, **kwargs)
        for req_id, row in zip(req_ids, out[:, :k].tolist()):
            record["drafts"].append((req_id, in_prefill[req_id], [int(t) for t in row]))
        record["logits"].append({r: [c[i] for c in calls if c.shape[0] > i]
                                 for i, r in enumerate(req_ids)})
        return out

    speculator.propose = recording_propose


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
    """The class name of the worker's drafter (V1 proposer or Model Runner V2 speculator)."""
    runner = worker.model_runner
    return type(runner.speculator if is_model_runner_v2(runner) else runner.drafter).__name__


def vllm_encoder_cache(worker) -> dict[str, torch.Tensor]:
    """The image embeddings a vLLM worker has cached (what the drafter is handed), by mm hash:
    CPU copies of `GPUModelRunner.encoder_cache` (V1: a dict; Model Runner V2:
    `EncoderCache.encoder_outputs`, `vllm/v1/worker/gpu/mm/encoder_cache.py`)."""
    cache = worker.model_runner.encoder_cache  # MRV2: an EncoderCache with `encoder_outputs`
    outputs = getattr(cache, "encoder_outputs", cache)
    return {k: v.detach().cpu().clone() for k, v in outputs.items()}
