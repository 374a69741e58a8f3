"""Offline throughput of speculative decoding methods, side by side in one run (vLLM engine).

Every method runs the same prompts through vLLM's offline engine with the same target:

* ``none``                 -- the target alone (the baseline every speedup refers to);
* ``ngram``                -- vLLM's prompt-lookup proposer;
* ``draft_model:PATH``     -- a stock vLLM draft model (for a text LM: its positions shift after
                              images, because stock vLLM feeds it the target's token layout);
* ``massv:PATH``           -- a MASSV drafter through the plugin's proposer (a drafter made with
                              ``massv init --projector none`` is the fair text-only baseline);
* ``msd:PATH``             -- an MSD drafter (EAGLE-style head, ``massv init --method msd``),
                              served with vLLM's EAGLE proposer (``method: eagle``) through the
                              plugin;
* ``eagle3:PATH``          -- an EAGLE-3 head (speculators ``eagle3`` format, ``massv init
                              --method eagle3``, or vLLM's native EAGLE-3 layout), served by stock
                              vLLM (``method: eagle3``); on an M-RoPE target the plugin gives the
                              head 1-D absolute positions (patch 6, ``vllm_massv.eagle_positions``);
* ``eagle3-stock:PATH``    -- the same head with stock vLLM's positions on an M-RoPE target (the
                              temporal M-RoPE row, and draft KV slots computed from it): the
                              engine is started with ``VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS=1``,
                              to measure what the fix is worth.

For each method and each k (``--k``), one engine is started; inside it every batch size
(``--batch-sizes``: requests kept in flight, continuous batching) and temperature
(``--temperatures``) is run. The k sweep (``--k-sweep``, for ``--sweep-methods``) runs each extra
k at temperature 0 and the ``--sweep-batch-sizes`` (which every method also runs at temperature
0): ``results.md`` then gives the best k per batch size. ``--k-by-batch LABEL=SCHEDULE`` adds
the method ``LABEL (k by batch size)``, served with vLLM's batch-size schedule for k
(``num_speculative_tokens_per_batch_size``: the scheduler picks each step's k from the number of
scheduled requests); its rows carry the k the schedule gives at their batch size.

Reported per run: output tokens/s, request latency p50/p90, τ (vLLM's convention, 1 +
accepted/drafts), acceptance rate, per-position acceptance, speedup over no speculation (same batch
size and temperature) and over the ``--reference`` method (the blind drafter), and the analytic
bound τ/(1 + k·c) (Leviathan et al. 2023, eq. 1 with the drafter's step cost counted k times per
verification) where c = drafter ITL / target ITL, both measured alone at batch 1 in this run. At
batch 1 the counters are read after every request, which gives τ per prompt kind, and the draft cost
inside the speculative loop is estimated as (time per verification step - target ITL) / k, reported
as ``c_in_loop`` (relative to the target ITL): on a CPU with tiny models it includes the proposer's
fixed per-pass overhead. Greedy outputs of every method are compared token by token with no
speculation at the same batch size; a mismatch is reported and makes the run exit with status 1.

Outputs (``--out``): ``results.json`` (every run and setting), ``results.md`` (tables) and PNG
plots (:func:`plots`: τ vs k, speedup vs batch size per temperature, per-position acceptance, τ
per prompt kind; ``--replot results.json`` redraws them without an engine). On the CPU testbed
(``--testbed DIR``, see ``benchmarks/testbed/``) the methods default to the testbed's models.
On a GPU pass real models instead, e.g.::

    python benchmarks/throughput.py --target Qwen/Qwen2.5-VL-7B-Instruct \\
        --method blind=massv:./qwen2.5-1.5b-massv-none --method massv=massv:./massv-drafter \\
        --drafter-lm Qwen/Qwen2.5-1.5B-Instruct --llava-json eval.json --reference blind
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRIC_NAMES = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos",
}


@dataclass(frozen=True)
class Method:
    """One way of decoding: ``kind`` is one of :data:`KINDS`."""

    label: str
    kind: str
    model: str | None = None
    #: vLLM's ``num_speculative_tokens_per_batch_size``: (first batch size, last, k) ranges
    schedule: tuple[tuple[int, int, int], ...] | None = None

    def k_at(self, batch_size: int, k: int) -> int:
        """The k this method drafts at ``batch_size`` (``k`` without a schedule)."""
        if self.schedule is None:
            return k
        return next((kk for lo, hi, kk in self.schedule if lo <= batch_size <= hi),
                    self.schedule[-1][2])

    @classmethod
    def parse(cls, text: str) -> Method:
        """``LABEL=none``, ``LABEL=ngram``, ``LABEL=draft_model:PATH``, ``LABEL=massv:PATH``,
        ``LABEL=msd:PATH``, ``LABEL=eagle3:PATH`` or ``LABEL=eagle3-stock:PATH``.

        Raises:
            ValueError: malformed text or unknown kind.
        """
        label, sep, spec = text.partition("=")
        if not sep or not label:
            raise ValueError(f"--method {text!r}: expected LABEL=SPEC")
        kind, _, model = spec.partition(":")
        if kind in ("none", "ngram"):
            if model:
                raise ValueError(f"--method {text!r}: {kind} takes no model")
            return cls(label, kind)
        if kind in KINDS:
            if not model:
                raise ValueError(f"--method {text!r}: {kind} needs a model path")
            return cls(label, kind, model)
        raise ValueError(f"--method {text!r}: kind must be one of {', '.join(KINDS)}")

    def speculative_config(self, k: int) -> dict[str, Any] | None:
        """vLLM's ``speculative_config`` for ``k`` speculative tokens (None: no speculation);
        with a schedule, k is its largest k and the schedule is added.

        Raises:
            ValueError: the model folder is not of the method's kind (massv/msd block, EAGLE-3
                config).
        """
        spec = self._speculative_config(k)
        if spec is not None and self.schedule is not None:
            spec["num_speculative_tokens"] = max(kk for _, _, kk in self.schedule)
            spec["num_speculative_tokens_per_batch_size"] = [list(e) for e in self.schedule]
        return spec

    def _speculative_config(self, k: int) -> dict[str, Any] | None:
        if self.kind == "none":
            return None
        if self.kind == "ngram":
            return {"method": "ngram", "num_speculative_tokens": k,
                    "prompt_lookup_min": 2, "prompt_lookup_max": 5}
        if self.kind == "msd":
            _require_block(self.model, "msd", "an MSD drafter")
            return {"method": "eagle", "model": self.model, "num_speculative_tokens": k}
        if self.kind in ("eagle3", "eagle3-stock"):
            _require_eagle3(self.model)
            return {"method": "eagle3", "model": self.model, "num_speculative_tokens": k}
        # A MASSV drafter is a draft_model whose config has a `massv` block; the plugin's
        # proposer takes it from there. A stock draft model goes through vLLM unchanged.
        if self.kind == "massv":
            _require_block(self.model, "massv", "a MASSV drafter")
        return {"method": "draft_model", "model": self.model, "num_speculative_tokens": k}

    def engine_env(self) -> dict[str, str]:
        """Environment variables the engine of this method must start with (read by the
        proposer's ``__init__`` in the engine-core process): EAGLE-path methods set the
        stock-positions switch of ``vllm_massv.eagle_positions`` explicitly, on for
        ``eagle3-stock`` and off otherwise, so a variable left in the shell cannot relabel them."""
        if self.kind in ("msd", "eagle3", "eagle3-stock"):
            return {STOCK_POSITIONS_ENV: "1" if self.kind == "eagle3-stock" else "0"}
        return {}


def parse_schedule(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1-1:6,2-8:4,9-256:3"`` -> ((1, 1, 6), (2, 8, 4), (9, 256, 3)): batch sizes 1 to 1 draft
    6 tokens, 2 to 8 draft 4, and so on (vLLM's ``num_speculative_tokens_per_batch_size``; k = 0
    turns speculation off for that range).

    Raises:
        ValueError: malformed text, or a schedule vLLM would refuse (ranges must start at 1,
            not overlap, k >= 0; the rule of ``vllm/v1/spec_decode/dynamic/utils.py``), checked
            here so a bad schedule fails before any engine starts.
    """
    entries = []
    for part in text.split(","):
        rng, sep, k = part.strip().partition(":")
        lo, dash, hi = rng.partition("-")
        try:
            if not sep or not dash:
                raise ValueError
            entries.append((int(lo), int(hi), int(k)))
        except ValueError:
            raise ValueError(f"k schedule {text!r}: expected FIRST-LAST:K[,FIRST-LAST:K...], "
                             "e.g. 1-1:6,2-8:4,9-256:3") from None
    entries.sort()
    if entries[0][0] != 1:
        raise ValueError(f"k schedule {text!r}: the first range must start at batch size 1")
    prev_end = 0
    for lo, hi, k in entries:
        if lo > hi or lo <= prev_end or k < 0:
            raise ValueError(f"k schedule {text!r}: ranges must be increasing, not overlap, "
                             f"and k >= 0 (got {lo}-{hi}:{k})")
        prev_end = hi
    if max(k for _, _, k in entries) < 1:
        raise ValueError(f"k schedule {text!r}: some range must draft (k >= 1)")
    return tuple(entries)


#: Label suffix of a ``--k-by-batch`` method.
SCHEDULE_SUFFIX = " (k by batch size)"
#: Method kinds (:meth:`Method.parse`).
KINDS = ("none", "ngram", "draft_model", "massv", "msd", "eagle3", "eagle3-stock")
#: = ``vllm_massv.eagle_positions.STOCK_POSITIONS_ENV`` (not imported: that module loads vLLM).
STOCK_POSITIONS_ENV = "VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS"


def _require_block(model: str | None, key: str, what: str) -> None:
    config = Path(str(model)) / "config.json"
    if config.is_file() and key not in json.loads(config.read_text()):
        raise ValueError(f"{model} has no `{key}` block in config.json: not {what} "
                         "(use draft_model:PATH for a stock draft model)")


def _require_eagle3(model: str | None) -> None:
    """A local ``model`` folder must hold an EAGLE-3 head: ``speculators_model_type: "eagle3"``
    (speculators format, what ``massv init --method eagle3`` writes) or an ``Eagle3*``
    architecture (vLLM's native layout, e.g. ``Eagle3LlamaForCausalLM``). Hub ids pass through.

    Raises:
        ValueError: a local folder without config.json, or whose config is not EAGLE-3.
    """
    path = Path(str(model))
    if not path.exists():
        return
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{model} has no config.json: not an EAGLE-3 head")
    cfg = json.loads(config.read_text())
    if cfg.get("speculators_model_type") == "eagle3" or any(
            "eagle3" in a.lower() for a in cfg.get("architectures") or []):
        return
    raise ValueError(f"{model} is not an EAGLE-3 head: config.json has speculators_model_type "
                     f"{cfg.get('speculators_model_type')!r} and architectures "
                     f"{cfg.get('architectures')} (expected speculators_model_type 'eagle3', "
                     "e.g. from `massv init --method eagle3`)")


def engine_env(env: dict[str, str]):
    """Set ``env`` for the block (an engine started inside inherits it), then restore it
    (`vllm_massv.testing.scoped_env`)."""
    from vllm_massv.testing import scoped_env

    return scoped_env(env)


@dataclass
class PromptItem:
    """One request: ``inputs`` is what vLLM's ``generate`` accepts; ``kind`` groups results."""

    id: str
    kind: str
    inputs: dict[str, Any]
    has_image: bool


@dataclass
class RunResult:
    method: str
    k: int
    batch_size: int
    temperature: float
    seconds: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p90_s: float
    tau: float | None
    acceptance_rate: float | None
    acceptance_per_position: list[float] | None
    tau_per_kind: dict[str, float] = field(default_factory=dict)
    speedup_vs_none: float | None = None
    speedup_vs_reference: float | None = None
    analytic_bound: float | None = None
    num_drafts: int = 0
    draft_ms_in_loop: float | None = None
    c_in_loop: float | None = None
    greedy_equal: bool | None = None
    greedy_mismatches: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def testbed_prompts(data_dir: Path, n: int, split: str = "test") -> list[PromptItem]:
    """The first ``n`` samples of a testbed split (``benchmarks/testbed/task.py`` output)."""
    from benchmarks.testbed import task

    samples = task.load_split(data_dir, split)[:n]
    if not samples:
        raise ValueError(f"{data_dir} has no {split!r} samples (build it with "
                         "benchmarks/testbed/task.py)")
    return [_chat_item(s.id, s.kind, task.messages(s), task.render(s.scene) if s.has_image
                       else None) for s in samples]


def llava_prompts(path: Path, n: int, image_root: Path | None = None) -> list[PromptItem]:
    """The first ``n`` usable entries of a LLaVA JSON file (kind: ``image`` or ``text``); entries
    with an unreadable image are skipped."""
    from vllm_massv.training.data import load_image, read_llava_json

    items = []
    for rec in read_llava_json(path, image_root=image_root):
        if len(items) >= n:
            break
        images = [load_image(p) for p in rec.images]
        if any(im is None for im in images):
            continue
        items.append(_chat_item(rec.id, "image" if images else "text", rec.messages,
                                images or None))
    return items


def _chat_item(item_id: str, kind: str, messages: list[dict[str, Any]], image: Any) -> PromptItem:
    """``image``: one PIL image, a list of them (in prompt order), or None."""
    inputs: dict[str, Any] = {"messages": messages}
    if image is not None:
        inputs["image"] = image
    return PromptItem(item_id, kind, inputs, image is not None)


def render_prompts(items: list[PromptItem], tokenizer: Any) -> list[PromptItem]:
    """Apply the target's chat template: ``inputs`` becomes ``{"prompt", "multi_modal_data"}``."""
    out = []
    for it in items:
        prompt = tokenizer.apply_chat_template(it.inputs["messages"], tokenize=False,
                                               add_generation_prompt=True)
        inputs: dict[str, Any] = {"prompt": prompt}
        if "image" in it.inputs:
            inputs["multi_modal_data"] = {"image": it.inputs["image"]}
        out.append(PromptItem(it.id, it.kind, inputs, it.has_image))
    return out


# --------------------------------------------------------------------------------------------
# Engine runs
# --------------------------------------------------------------------------------------------


def counters(llm: Any) -> dict[str, Any]:
    """Speculative-decoding counters of an offline engine (zeros without speculation)."""
    out: dict[str, Any] = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    for m in llm.get_metrics():
        name = METRIC_NAMES.get(m.name)
        if name == "accepted_per_pos":
            out[name] = list(m.values)
        elif name:
            out[name] = m.value
    return out


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted")}
    b = before["accepted_per_pos"] or [0] * len(after["accepted_per_pos"])
    d["accepted_per_pos"] = [a - x for a, x in zip(after["accepted_per_pos"], b)]
    return d


def tau_of(delta: dict[str, Any]) -> float | None:
    """Acceptance length, vLLM convention: 1 + accepted / drafts (None without drafts)."""
    return 1 + delta["accepted"] / delta["drafts"] if delta["drafts"] else None


def run_requests(llm: Any, items: list[PromptItem], *, batch_size: int, temperature: float,
                 max_tokens: int, seed: int = 0, per_request: bool = False) -> dict[str, Any]:
    """Run ``items`` keeping ``batch_size`` requests in flight (continuous batching).

    Returns ``{"seconds", "records": [{id, kind, token_ids, latency_s, delta?}], "delta"}`` where
    ``delta`` is the change of the speculative counters; with ``per_request`` (meaningful at
    batch size 1) each record also carries its own counter delta.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    queue = list(enumerate(items))
    inflight: dict[str, tuple[int, float]] = {}
    records: dict[int, dict[str, Any]] = {}
    start_counters = last = counters(llm)
    t0 = time.perf_counter()
    while queue or inflight:
        while queue and len(inflight) < batch_size:
            i, item = queue.pop(0)
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                    seed=None if temperature == 0 else seed + i)
            # outputs carry the id we pass (vLLM adds a suffix only internally)
            rid = f"{i}-{uuid.uuid4().hex[:8]}"
            engine.add_request(rid, item.inputs, params)
            inflight[rid] = (i, time.perf_counter())
        for out in engine.step():
            if not out.finished or out.request_id not in inflight:
                continue
            i, t_in = inflight.pop(out.request_id)
            rec = {"id": items[i].id, "kind": items[i].kind, "has_image": items[i].has_image,
                   "token_ids": list(out.outputs[0].token_ids),
                   "latency_s": time.perf_counter() - t_in}
            if per_request:
                now = counters(llm)
                rec["delta"] = counter_delta(last, now)
                last = now
            records[i] = rec
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "records": [records[i] for i in range(len(items))],
            "delta": counter_delta(start_counters, counters(llm))}


def make_llm(target: str, spec: dict[str, Any] | None, *, max_num_seqs: int,
             engine_args: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs = dict(model=target, max_model_len=2048, max_num_seqs=max_num_seqs, seed=0,
                  disable_log_stats=False, limit_mm_per_prompt={"image": 1, "video": 0},
                  speculative_config=spec)
    kwargs.update(engine_args)
    return LLM(**kwargs)


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def decode_itl(model: str, engine_args: dict[str, Any], prompt: str, tokens: int = 96,
               repeats: int = 3) -> float:
    """Inter-token latency (s) of ``model`` alone at batch 1 (:func:`itl_of` in its own
    engine)."""
    llm = make_llm(model, None, max_num_seqs=1, engine_args=engine_args)
    try:
        return itl_of(llm, prompt, tokens, repeats)
    finally:
        shutdown(llm)


def plain_lm(model: str, out: Path) -> str:
    """``model`` as a directory vLLM serves on its own. A drafter in the speculators format
    (``vllm_massv.speculators``: ``massv init``/``train`` write it) makes vLLM serve its verifier
    with the drafter as draft model instead (one-argument serving), so for such a directory
    ``config.json`` is written to ``out`` without the speculators keys and the other files are
    linked. Other models are returned unchanged."""
    from vllm_massv.speculators import SPECULATORS_KEYS

    src = Path(model)
    config_path = src / "config.json"
    if not config_path.is_file():
        return model
    config = json.loads(config_path.read_text())
    if not any(k in config for k in SPECULATORS_KEYS):
        return model
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    for k in SPECULATORS_KEYS:
        config.pop(k, None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(out)


def itl_of(llm: Any, prompt: str, tokens: int = 96, repeats: int = 3) -> float:
    """Inter-token latency (s) of an engine at batch 1: (total - first token) / (n - 1),
    median of ``repeats`` runs of ``tokens`` tokens (``ignore_eos``) after one warm-up."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt], params, use_tqdm=False)
    itls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        itls.append(((t2 - t1) - (t1 - t0)) / (tokens - 1))
    return statistics.median(itls)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    idx = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[idx]


def summarize(method: str, k: int, batch_size: int, temperature: float,
              run: dict[str, Any]) -> RunResult:
    recs = run["records"]
    n_tokens = sum(len(r["token_ids"]) for r in recs)
    lat = [r["latency_s"] for r in recs]
    delta = run["delta"]
    tau = tau_of(delta)
    # (a schedule's engine counts positions up to its largest k: keep this row's k)
    per_pos = ([a / delta["drafts"] for a in delta["accepted_per_pos"][:k or None]]
               if delta["drafts"] else None)
    per_kind: dict[str, float] = {}
    if recs and "delta" in recs[0]:
        for kind in sorted({r["kind"] for r in recs}):
            drafts = sum(r["delta"]["drafts"] for r in recs if r["kind"] == kind)
            acc = sum(r["delta"]["accepted"] for r in recs if r["kind"] == kind)
            if drafts:
                per_kind[kind] = 1 + acc / drafts
        img = [r for r in recs if r["has_image"]]
        drafts = sum(r["delta"]["drafts"] for r in img)
        if drafts:
            per_kind["all image prompts"] = 1 + sum(r["delta"]["accepted"] for r in img) / drafts
    return RunResult(
        method=method, k=k, batch_size=batch_size, temperature=temperature,
        seconds=run["seconds"], output_tokens=n_tokens, tokens_per_s=n_tokens / run["seconds"],
        latency_p50_s=percentile(lat, 0.5), latency_p90_s=percentile(lat, 0.9), tau=tau,
        acceptance_rate=delta["accepted"] / delta["draft_tokens"] if delta["draft_tokens"]
        else None, acceptance_per_position=per_pos, tau_per_kind=per_kind,
        num_drafts=int(delta["drafts"]))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


#: Target ITL change between the start and the end of a run above which the report warns.
DRIFT_WARN = 0.10


def _drift_lines(meta: dict[str, Any]) -> list[str]:
    """The target's ITL measured first and last in the run (``target_itl_end_ms``): the baseline
    (no speculation) runs first, so a machine that speeds up or slows down during the run skews
    every speedup by about that ratio."""
    start, end = meta.get("target_itl_ms"), meta.get("target_itl_end_ms")
    if not start or not end:
        return []
    drift = end / start - 1
    line = (f"Target ITL at the start / end of the run: {start:.2f} / {end:.2f} ms "
            f"({drift:+.0%}).")
    if abs(drift) > DRIFT_WARN:
        line += (" **The machine's speed drifted by more than "
                 f"{DRIFT_WARN:.0%} during the run: speedups against the baseline (measured "
                 "first) are off by about that much; compare τ, and methods that ran close "
                 "together.**")
    return [line, ""]


def markdown(results: list[RunResult], meta: dict[str, Any]) -> str:
    lines = [f"# Speculative decoding throughput ({meta['device']})", "",
             f"Target `{meta['target']}`; {meta['num_prompts']} prompts "
             f"({meta['num_image_prompts']} with an image), max {meta['max_tokens']} new tokens; "
             f"c = {_f(meta.get('c'), 3)} (drafter ITL {_f(meta.get('drafter_itl_ms'), 2)} ms / "
             f"target ITL {_f(meta.get('target_itl_ms'), 2)} ms, batch 1).", "",
             *_drift_lines(meta),
             "| method | k | batch | temp | tok/s | p50 s | p90 s | τ | accept | per position "
             "| speedup vs none | vs reference | bound τ/(1+kc) | c in loop | greedy = none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pos = " ".join(f"{p:.2f}" for p in r.acceptance_per_position or []) or "-"
        eq = "-" if r.greedy_equal is None else ("yes" if r.greedy_equal else "**NO**")
        lines.append(
            f"| {r.method} | {r.k if r.tau is not None or r.method != 'none' else '-'} | "
            f"{r.batch_size} | {r.temperature:g} | {r.tokens_per_s:.1f} | "
            f"{r.latency_p50_s:.2f} | {r.latency_p90_s:.2f} | {_f(r.tau)} | "
            f"{_f(r.acceptance_rate)} | {pos} | {_f(r.speedup_vs_none, 2, '×')} | "
            f"{_f(r.speedup_vs_reference, 2, '×')} | {_f(r.analytic_bound, 2, '×')} | "
            f"{_f(r.c_in_loop, 3)} | {eq} |")
    lines += best_k_table(results, meta.get("sweep_methods") or [])
    kinds = sorted({k for r in results for k in r.tau_per_kind})
    if kinds:
        lines += ["", "τ per prompt kind (batch 1):", "",
                  "| method | k | temp | " + " | ".join(kinds) + " |",
                  "|---|---|---|" + "---|" * len(kinds)]
        for r in results:
            if r.tau_per_kind:
                lines.append(f"| {r.method} | {r.k} | {r.temperature:g} | " + " | ".join(
                    _f(r.tau_per_kind.get(k)) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def speedup_by_k(results: list[RunResult], method: str) -> dict[int, dict[int, float]]:
    """batch size -> {k: speedup over no speculation} of ``method`` at temperature 0."""
    out: dict[int, dict[int, float]] = {}
    for r in results:
        if r.method == method and r.temperature == 0 and r.speedup_vs_none is not None:
            out.setdefault(r.batch_size, {})[r.k] = r.speedup_vs_none
    return dict(sorted(out.items()))


def schedule_from_sweep(results: list[RunResult], method: str, max_batch: int = 256
                        ) -> tuple[tuple[int, int, int], ...]:
    """A k schedule from a k sweep (``--k-by-batch LABEL=auto``): at each swept batch size b_i
    (temperature 0) the k with the most output tokens/s, for batch sizes b_(i-1)+1 .. b_i (the
    last up to ``max_batch``). One noisy run picks it: close speedups are a coin toss.

    Raises:
        ValueError: ``method`` has no batch size with two or more k measured.
    """
    best: dict[int, int] = {}
    for b in sorted({r.batch_size for r in results if r.method == method}):
        rows = [r for r in results if r.method == method and r.batch_size == b
                and r.temperature == 0]
        if len({r.k for r in rows}) > 1:
            best[b] = max(rows, key=lambda r: r.tokens_per_s).k
    if not best:
        raise ValueError(f"no k sweep of {method!r} to choose k from (give --k-sweep and "
                         "--sweep-methods)")
    out, lo = [], 1
    for i, (b, k) in enumerate(best.items()):
        hi = max_batch if i == len(best) - 1 else b
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], hi, k)
        else:
            out.append((lo, hi, k))
        lo = hi + 1
    return tuple(out)


def best_k_table(results: list[RunResult], sweep_methods: list[str]) -> list[str]:
    """Markdown lines: per k-sweep method, its speedup over no speculation for every k and
    batch size at temperature 0, the best k per batch size, and the method's schedule run
    (``LABEL (k by batch size)``) when there is one. Empty without a sweep."""
    lines: list[str] = []
    for m in sweep_methods:
        table = speedup_by_k(results, m)
        ks = sorted({k for row in table.values() for k in row})
        if len(ks) < 2:
            continue
        sched = speedup_by_k(results, m + SCHEDULE_SUFFIX)
        lines += ["", f"Best k per batch size, {m} (speedup over no speculation, temperature 0; "
                  "one run, so close values are within noise):", "",
                  "| batch | " + " | ".join(f"k={k}" for k in ks) + " | best k |"
                  + (" k by batch size (its k) |" if sched else ""),
                  "|---|" + "---|" * (len(ks) + 1 + bool(sched))]
        for b, row in table.items():
            best = max(row, key=row.get)
            cells = [("**" + _f(row[k], 2, "×") + "**") if k == best else _f(row.get(k), 2, "×")
                     for k in ks]
            extra = ""
            if sched:
                (kb, v), = sched.get(b, {0: None}).items()
                extra = f" {_f(v, 2, '×')} ({kb}) |" if v is not None else " - |"
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {best} |" + extra)
    return lines


#: Plot style: at most this many series per axes (more methods: more panels, each with the
#: reference); every method keeps one colour (tab10) and one marker in every plot.
MAX_SERIES = 7
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


def plots(results: list[RunResult], out: Path, reference: str | None = None) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names.

    * ``tau_vs_k.png``: τ against k (batch 1, T = 0);
    * ``speedup_vs_batch.png``: speedup over no speculation against batch size, one column per
      temperature;
    * ``acceptance_per_position.png``: acceptance rate at each draft position (batch 1, T = 0);
    * ``tau_per_kind.png``: τ per prompt kind, grouped bars (batch 1, T = 0);
    * ``speedup_vs_k.png``: speedup against k, one line per batch size, one panel per method
      with a k sweep; stars: the method's ``(k by batch size)`` run at the k it used.

    With more than :data:`MAX_SERIES` methods each plot gets several rows of panels, every row
    with ``reference`` (the blind drafter) for comparison. Each method's k is its main k (the k
    with the most settings: not a k-sweep point).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [r for r in results if r.tau is not None]
    methods = list(dict.fromkeys(r.method for r in spec))
    if not methods:
        return []
    style = _styles(methods)
    panels = _panels(methods, reference)
    main_k = {m: _main_k([r for r in spec if r.method == m]) for m in methods}

    def main_row(r: RunResult) -> bool:
        """Not a k-sweep point (a schedule run's k changes with the batch size)."""
        return r.k == main_k[r.method] or r.method.endswith(SCHEDULE_SUFFIX)

    def greedy_b1(m: str) -> RunResult | None:
        return next((r for r in spec if r.method == m and r.batch_size == 1
                     and r.temperature == 0 and main_row(r)), None)

    written = []
    # τ against k
    fig, axes = _grid(plt, len(panels), 1)
    for row, group in zip(axes, panels):
        ax = row[0]
        for m in group:
            pts = sorted({(r.k, r.tau) for r in spec if r.method == m and r.batch_size == 1
                          and r.temperature == 0})
            if pts:
                _line(ax, style, m, [p[0] for p in pts], [p[1] for p in pts])
        ks = sorted({r.k for r in spec})
        ax.plot(ks, [k + 1 for k in ks], color="grey", linestyle=":", linewidth=1,
                label="limit k + 1")
        ax.set_xlabel("k (num_speculative_tokens)")
        ax.set_ylabel("τ (tokens per verification step)")
        ax.set_xticks(ks)
        _legend(ax)
    axes[0][0].set_title("Acceptance length τ vs k (batch 1, temperature 0)")
    written.append(_save(fig, out / "tau_vs_k.png"))

    # speedup against batch size, one column per temperature
    temps = sorted({r.temperature for r in spec})
    fig, axes = _grid(plt, len(panels), len(temps), sharey=True)
    for row, group in zip(axes, panels):
        for ax, temp in zip(row, temps):
            for m in group:
                pts = sorted((r.batch_size, r.speedup_vs_none) for r in spec
                             if r.method == m and r.temperature == temp and main_row(r)
                             and r.speedup_vs_none is not None)
                if pts:
                    _line(ax, style, m, [p[0] for p in pts], [p[1] for p in pts],
                          label=m if m.endswith(SCHEDULE_SUFFIX) else f"{m} (k={main_k[m]})")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xticks(sorted({r.batch_size for r in spec}))
            ax.set_xlabel("batch size (requests in flight)")
            ax.set_title(f"temperature {temp:g}" + (" (greedy)" if temp == 0 else ""))
        row[0].set_ylabel("speedup vs no speculation\n(× output tokens/s)")
        _legend(row[-1])
    written.append(_save(fig, out / "speedup_vs_batch.png"))

    # acceptance per draft position
    fig, axes = _grid(plt, len(panels), 1)
    for row, group in zip(axes, panels):
        ax = row[0]
        for m in group:
            r = greedy_b1(m)
            if r is not None and r.acceptance_per_position:
                _line(ax, style, m, list(range(1, len(r.acceptance_per_position) + 1)),
                      r.acceptance_per_position, label=f"{m} (k={r.k})")
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate\n(accepted / drafts)")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(ax)
    axes[0][0].set_title("Acceptance per draft position (batch 1, temperature 0)")
    written.append(_save(fig, out / "acceptance_per_position.png"))

    # τ per prompt kind, grouped bars
    kinds = sorted({kd for r in spec for kd in r.tau_per_kind})
    if kinds:
        fig, axes = _grid(plt, len(panels), 1, width=max(7.0, 0.9 * len(kinds) + 3))
        for row, group in zip(axes, panels):
            ax = row[0]
            rows = [(m, greedy_b1(m)) for m in group]
            rows = [(m, r) for m, r in rows if r is not None and r.tau_per_kind]
            width = 0.8 / max(1, len(rows))
            for j, (m, r) in enumerate(rows):
                xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(kinds))]
                ax.bar(xs, [r.tau_per_kind.get(kd, 0.0) for kd in kinds], width,
                       color=style[m][0], label=f"{m} (k={r.k})", edgecolor="black",
                       linewidth=0.3)
            ax.set_xticks(range(len(kinds)))
            ax.set_xticklabels(kinds, rotation=20, ha="right")
            ax.set_ylabel("τ (tokens per verification step)")
            ax.set_ylim(bottom=1.0)
            _legend(ax)
        axes[0][0].set_title("τ per prompt kind (batch 1, temperature 0)")
        written.append(_save(fig, out / "tau_per_kind.png"))

    # speedup against k, one line per batch size, one panel per swept method
    swept = [m for m in methods if not m.endswith(SCHEDULE_SUFFIX) and len(
        {r.k for r in spec if r.method == m and r.temperature == 0}) > 1]
    if swept:
        fig, axes = _grid(plt, 1, len(swept), sharey=True)
        cmap = matplotlib.colormaps["viridis"]
        for ax, m in zip(axes[0], swept):
            table = speedup_by_k(results, m)
            sched = speedup_by_k(results, m + SCHEDULE_SUFFIX)
            starred = False
            for i, (b, row) in enumerate(table.items()):
                colour = cmap(i / max(1, len(table) - 1) * 0.9)
                ax.plot(sorted(row), [row[k] for k in sorted(row)], color=colour,
                        marker=MARKERS[i % len(MARKERS)], label=f"batch {b}")
                for kb, v in sched.get(b, {}).items():
                    ax.plot([kb], [v], color=colour, marker="*", markersize=13,
                            markeredgecolor="black", linestyle="none",
                            label=f"{m}{SCHEDULE_SUFFIX}\n(star: its k, colour: batch)"
                            if not starred else None)
                    starred = True
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("k (num_speculative_tokens)")
            ax.set_title(m)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0][0].set_ylabel("speedup vs no speculation\n(temperature 0)")
        _legend(axes[0][-1])
        written.append(_save(fig, out / "speedup_vs_k.png"))
    return written


def _styles(methods: list[str]) -> dict[str, tuple[Any, str]]:
    """method -> (tab10 colour, marker), fixed by the method's order in the run."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: (cmap(i % 10), MARKERS[(i + i // 10) % len(MARKERS)])
            for i, m in enumerate(methods)}


def _panels(methods: list[str], reference: str | None) -> list[list[str]]:
    """Methods split into groups of at most :data:`MAX_SERIES`, the reference in every group."""
    if len(methods) <= MAX_SERIES:
        return [methods]
    ref = [reference] if reference in methods else []
    others = [m for m in methods if m not in ref]
    n = math.ceil(len(others) / (MAX_SERIES - len(ref)))
    size = math.ceil(len(others) / n)
    return [ref + others[i:i + size] for i in range(0, len(others), size)]


def _main_k(rows: list[RunResult]) -> int:
    ks = [r.k for r in rows]
    return max(dict.fromkeys(ks), key=ks.count)


def _grid(plt: Any, nrows: int, ncols: int, sharey: bool = False, width: float | None = None):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width or 4.2 * ncols + 3, 3.4 * nrows),
                             squeeze=False, sharey=sharey)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _line(ax: Any, style: dict[str, tuple[Any, str]], method: str, xs: list[Any],
          ys: list[Any], label: str | None = None) -> None:
    colour, marker = style[method]
    ax.plot(xs, ys, color=colour, marker=marker, markersize=6, linewidth=1.5,
            label=label or method)


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def testbed_methods(paths: dict[str, Path]) -> list[Method]:
    """The testbed's methods (:func:`benchmarks.testbed.assets.ensure` paths)."""
    models = paths["models"]
    methods = [Method("none", "none"), Method("ngram", "ngram"),
               Method("blind (stock draft_model)", "draft_model", str(paths["blind-stock"])),
               Method("blind (projector none)", "massv", str(paths["drafter-blind"])),
               Method("blind distilled (no image)", "massv", str(models / "drafter-distilled")),
               Method("MASSV phase 1", "massv", str(models / "drafter-phase1")),
               Method("MASSV", "massv", str(models / "drafter-massv"))]
    if (models / "drafter-massv-mrope").is_dir():
        methods.append(Method("MASSV (M-RoPE positions)", "massv",
                              str(models / "drafter-massv-mrope")))
    if (models / "drafter-msd").is_dir():
        methods.append(Method("MSD", "msd", str(models / "drafter-msd")))
    if (models / "drafter-eagle3").is_dir():
        methods += [Method("EAGLE-3", "eagle3", str(models / "drafter-eagle3")),
                    Method("EAGLE-3 (stock vLLM positions)", "eagle3-stock",
                           str(models / "drafter-eagle3"))]
    return methods


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--target", help="target VLM (default with --testbed: its padded target)")
    p.add_argument("--method", action="append", default=[], metavar="LABEL=SPEC",
                   help="none | ngram | draft_model:PATH | massv:PATH | msd:PATH | eagle3:PATH | "
                        "eagle3-stock:PATH (repeatable; default with --testbed: every testbed "
                        "method)")
    p.add_argument("--reference", default=None,
                   help="label of the method speedups are also measured against (default: the "
                        "first massv method, on the testbed the blind LM with projector none)")
    p.add_argument("--drafter-lm", default=None,
                   help="model whose batch-1 ITL gives c (default: the reference's model)")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--testbed", type=Path, default=None,
                     help="testbed folder (models/ and data/; see benchmarks/testbed/README.md)")
    src.add_argument("--llava-json", type=Path, default=None)
    src.add_argument("--image-root", type=Path, default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", default="4", help="comma-separated k values (default 4)")
    p.add_argument("--k-sweep", default="",
                   help="extra k values run at temperature 0 and the sweep batch sizes only "
                        "(e.g. 1,2,3,5,6)")
    p.add_argument("--sweep-methods", default="",
                   help="comma-separated labels the k sweep runs for (default: all spec methods)")
    p.add_argument("--sweep-batch-sizes", default="1",
                   help="batch sizes of the k sweep (default 1); every method also runs them "
                        "at temperature 0, so each has a speedup there (e.g. 1,4,8,16)")
    p.add_argument("--k-by-batch", action="append", default=[], metavar="LABEL=SCHEDULE",
                   help="also run method LABEL with vLLM's batch-size schedule for k, e.g. "
                        "'MASSV=1-1:6,2-8:4,9-256:3' (batch sizes 1-1 draft 6 tokens, ...), or "
                        "'MASSV=auto': the best k per sweep batch size measured in this run "
                        "(runs last; repeatable)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "throughput")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument (VALUE parsed as JSON when it parses)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only redraw the plots of an earlier run's results.json into --out "
                        "(no engine)")
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.platforms import current_platform

    engine_args: dict[str, Any] = {}
    if current_platform.is_cpu():
        engine_args.update(dtype="float32", enforce_eager=True, block_size=32)
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            engine_args[key] = json.loads(value)
        except json.JSONDecodeError:
            engine_args[key] = value
    return engine_args


def resolve(args: argparse.Namespace) -> tuple[str, list[Method], list[PromptItem]]:
    """Target, methods and prompts from the arguments (``SystemExit`` with a message on error)."""
    from transformers import AutoTokenizer

    methods = [Method.parse(m) for m in args.method]
    if args.testbed is not None:
        from benchmarks.testbed import assets

        paths = assets.ensure(args.testbed)
        target = args.target or str(paths["target"])
        methods = methods or testbed_methods(paths)
        items = testbed_prompts(paths["data"], args.num_prompts)
    elif args.llava_json is not None:
        if not args.target or not methods:
            raise SystemExit("--llava-json needs --target and at least one --method")
        target = args.target
        items = llava_prompts(args.llava_json, args.num_prompts, args.image_root)
    else:
        raise SystemExit("give --testbed DIR or --llava-json FILE (see --help)")
    if not any(m.kind == "none" for m in methods):
        methods.insert(0, Method("none", "none"))
    for item in args.k_by_batch:
        label, sep, text = item.partition("=")
        base = next((m for m in methods if m.label == label), None)
        if not sep or base is None or base.kind in ("none", "ngram"):
            raise SystemExit(f"--k-by-batch {item!r}: expected LABEL=SCHEDULE with LABEL one of "
                             f"the drafter methods: {[m.label for m in methods if m.model]}")
        try:
            schedule = None if text.strip() == "auto" else parse_schedule(text)
        except ValueError as e:
            raise SystemExit(f"--k-by-batch: {e}") from None
        methods.append(Method(label + SCHEDULE_SUFFIX, base.kind, base.model, schedule))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"duplicate method labels: {labels}")
    tokenizer = AutoTokenizer.from_pretrained(target)
    return target, methods, render_prompts(items, tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every method, stock ones included, gets the CPU rejection-sampler fix (vllm_massv.patches,
    # patch 5): without it, stock methods at temperature > 0 verify against garbage on CPU.
    os.environ.setdefault("VLLM_MASSV_FIX_CPU_SAMPLER", "1")
    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        names = plots([RunResult(**r) for r in data["results"]], args.out,
                      data["meta"].get("reference"))
        print(f"wrote {', '.join(names)} to {args.out}")
        return 0
    from tqdm import tqdm

    target, methods, items = resolve(args)
    engine_args = _engine_args(args)
    ks, sweep = _ints(args.k), [k for k in _ints(args.k_sweep) if k not in _ints(args.k)]
    batch_sizes, temps = _ints(args.batch_sizes), [float(t) for t in args.temperatures.split(",")]
    sweep_batches = _ints(args.sweep_batch_sizes)
    settings_all = [(b, t) for t in temps for b in batch_sizes] + [
        (b, 0.0) for b in sweep_batches if (b, 0.0) not in {(b, t) for t in temps
                                                             for b in batch_sizes}]
    spec_methods = [m for m in methods if m.kind != "none"]
    reference = args.reference or next((m.label for m in spec_methods if m.kind == "massv"),
                                       None)
    sweep_labels = ([s.strip() for s in args.sweep_methods.split(",") if s.strip()]
                    or [m.label for m in spec_methods])
    plan: list[tuple[Method, int, list[tuple[int, float]]]] = []
    for m in methods:
        if m.kind == "none":
            plan.append((m, 0, settings_all))
            continue
        scheduled = m.label.endswith(SCHEDULE_SUFFIX)
        for k in ks[:1] if scheduled else ks:
            plan.append((m, k, settings_all))
        if m.label in sweep_labels and not scheduled:
            plan += [(m, k, [(b, 0.0) for b in sweep_batches]) for k in sweep]
    args.out.mkdir(parents=True, exist_ok=True)

    # c: the drafter's and the target's inter-token latency, each alone at batch 1.
    ref_method = next((m for m in methods if m.label == reference), None)
    drafter_lm = args.drafter_lm or (ref_method.model if ref_method else None)
    text_prompt = next((it.inputs["prompt"] for it in items if not it.has_image),
                       items[0].inputs["prompt"])
    meta: dict[str, Any] = {"target": target, "num_prompts": len(items),
                            "num_image_prompts": sum(it.has_image for it in items),
                            "max_tokens": args.max_tokens, "engine_args": engine_args,
                            "methods": [{**asdict(m), "engine_env": m.engine_env()}
                                        for m in methods], "reference": reference,
                            "sweep_methods": [m.label for m in methods if m.label in sweep_labels
                                              and sweep and not m.label.endswith(SCHEDULE_SUFFIX)]}
    meta["device"] = _device_name()
    bar = tqdm(total=len(plan) + (3 if drafter_lm else 0), disable=args.no_progress,
               desc="engines")
    if drafter_lm:
        t_itl = decode_itl(target, engine_args, text_prompt)
        bar.update()
        with tempfile.TemporaryDirectory() as tmp:  # the drafter alone, not its verifier
            d_itl = decode_itl(plain_lm(drafter_lm, Path(tmp) / "drafter"), engine_args,
                               text_prompt)
        bar.update()
        meta.update(target_itl_ms=t_itl * 1e3, drafter_itl_ms=d_itl * 1e3, c=d_itl / t_itl,
                    drafter_lm=drafter_lm)

    results: list[RunResult] = []
    outputs: dict[tuple[str, int, int], list[list[int]]] = {}
    max_seqs = max(batch_sizes + sweep_batches)
    failures: list[str] = []
    for method, k, settings in plan:
        if method.label.endswith(SCHEDULE_SUFFIX) and method.schedule is None:
            base = method.label[:-len(SCHEDULE_SUFFIX)]
            try:   # `LABEL=auto`: the best k per batch size measured so far in this run
                method = replace(method, schedule=schedule_from_sweep(results, base))
            except ValueError as e:
                failures.append(f"{method.label}: {e}")
                bar.update()
                continue
            meta.setdefault("k_by_batch_auto", {})[method.label] = method.schedule
        bar.set_postfix_str(f"{method.label} k={k}")
        with engine_env(method.engine_env()):   # the engine-core process inherits it at start
            try:
                llm = make_llm(target, method.speculative_config(k), max_num_seqs=max_seqs,
                               engine_args=engine_args)
            except Exception as e:  # one broken method must not lose the others' results
                failures.append(f"{method.label} k={k}: {type(e).__name__}: {e}"[:2000])
                bar.update()
                continue
            try:
                run_requests(llm, items[:2], batch_size=2, temperature=0.0, max_tokens=8)
                for b, temp in settings:
                    run = run_requests(llm, items, batch_size=b, temperature=temp,
                                       max_tokens=args.max_tokens, per_request=b == 1)
                    k_b = method.k_at(b, k)
                    res = summarize(method.label, k_b, b, temp, run)
                    if temp == 0:
                        outputs[(method.label, k_b, b)] = [r["token_ids"] for r in run["records"]]
                    results.append(res)
            finally:
                shutdown(llm)
        bar.update()
    if drafter_lm:   # the target's ITL again: how much the machine drifted during the run
        meta["target_itl_end_ms"] = decode_itl(target, engine_args, text_prompt) * 1e3
        bar.update()
    bar.close()

    meta["failures"] = failures
    _compare(results, outputs, items, meta, reference)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    md = markdown(results, meta)
    (args.out / "results.md").write_text(md)
    meta["plots"] = plots(results, args.out, reference)
    print(md)
    bad = [r for r in results if r.greedy_equal is False]
    for r in bad:
        print(f"GREEDY MISMATCH: {r.method} k={r.k} batch {r.batch_size}: "
              f"{', '.join(r.greedy_mismatches[:5])}", file=sys.stderr)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"wrote {args.out}/results.json, results.md and {len(meta['plots'])} plots")
    return 1 if bad or failures else 0


def _compare(results: list[RunResult], outputs: dict[tuple[str, int, int], list[list[int]]],
             items: list[PromptItem], meta: dict[str, Any], reference: str | None) -> None:
    """Fill speedups, analytic bounds and the greedy-equality verdicts in place."""
    base = {(r.batch_size, r.temperature): r for r in results if r.method == "none"}
    ref = {(r.k, r.batch_size, r.temperature): r for r in results if r.method == reference}
    c = meta.get("c")
    for r in results:
        b = base.get((r.batch_size, r.temperature))
        if b is not None and r.method != "none":
            r.speedup_vs_none = r.tokens_per_s / b.tokens_per_s
        rr = ref.get((r.k, r.batch_size, r.temperature))
        if rr is not None and r.method != reference:
            r.speedup_vs_reference = r.tokens_per_s / rr.tokens_per_s
        if c is not None and r.tau is not None:
            r.analytic_bound = r.tau / (1 + r.k * c)
        t_itl = meta.get("target_itl_ms")
        if r.batch_size == 1 and r.num_drafts and t_itl and r.k:
            # One request at a time: each verification step costs one target step (k+1 tokens
            # cost about one decode step here) plus k draft passes; the rest is the draft cost.
            step_ms = r.seconds * 1e3 / r.num_drafts
            r.draft_ms_in_loop = (step_ms - t_itl) / r.k
            r.c_in_loop = r.draft_ms_in_loop / t_itl
        if r.temperature == 0 and r.method != "none":
            mine = outputs.get((r.method, r.k, r.batch_size))
            theirs = outputs.get(("none", 0, r.batch_size))
            if mine is not None and theirs is not None:
                bad = [items[i].id for i, (a, o) in enumerate(zip(mine, theirs)) if a != o]
                r.greedy_equal = not bad
                r.greedy_mismatches = bad


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
