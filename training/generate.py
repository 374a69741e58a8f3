"""`massv generate`: self-distillation data -- the target VLM answers image prompts through vLLM's
offline engine, and its answers become the drafter's training targets (MASSV §3.2, SDViT).

Output layout (``out_dir``)::

    train/part-{shard:05d}-{chunk:06d}.parquet   one file per finished chunk (rows below)
    summary-{shard:05d}.json                     counts and timings of the shard (updated per chunk)
    images/                                      images a data set stores as bytes (read_dataset)

``datasets.load_dataset("parquet", data_dir=out_dir)`` loads every shard's parts as split
``train`` (the parts sit in ``train/`` so that the summaries and images next to them are not read
as data). Row schema (:func:`row_schema`): ``id``, ``messages`` (JSON of the user turn),
``prompt`` (the chat-formatted text sent to the engine), ``images`` (paths), ``prompt_token_ids``
(as the target saw them, image placeholders expanded), ``response``, ``token_ids`` (the response,
EOS included when it stopped on one), ``finish_reason``, ``reference``, the sampling settings
(``temperature``, ``top_p``, ``max_tokens``, ``seed``, ``target``), and with ``logprobs=k``
``top_logprob_ids``/``top_logprobs`` (the target's top-k per response token, raw log-softmax of its
logits, rank order).

Sharding and resumption: a record belongs to shard ``data.shard_of(id, num_shards)``. A shard's
records are taken in input order, minus the ids already in finished parts (written rows, and the
ids those parts record as skipped, in the Parquet metadata under ``massv``), and cut into chunks of
``shard_size``; chunk numbers continue after the highest finished part. (A chunk whose records were
all skipped leaves a hidden ``train/.part-*.empty.json`` marker instead: `datasets` cannot read an
empty Parquet file.) Each part is written to a hidden temp file and renamed, so an
interrupted run (Ctrl-C, a killed job, ``max_chunks``) loses at most the chunk in flight, and
rerunning the same command finishes the data set with the same rows as an uninterrupted run.
Changing the target or a sampling setting between runs into the same ``out_dir`` is refused.
Sampling is seeded per request (from ``seed`` and the record id), so sampled runs resume exactly
too.

Parallel shards (``massv generate --shards A-B --num-shards N``): one process and one independent
vLLM engine per shard, each on its own devices (:func:`shard_device_envs`); every shard writes only
its own parts and summary, so the guarantees above hold per shard and the union of the shards is
the data set. vLLM 0.32's own offline data parallelism is not used: ``LLM(data_parallel_size>1)``
in one process is refused (``vllm/entrypoints/llm.py``), and the multi-process ``VLLM_DP_*`` mode
of its ``data_parallel_offline.py`` example is refused for dense models such as Qwen2.5-VL and
Gemma3 ("Offline data parallel mode is not supported/useful for dense models",
``vllm/config/parallel.py``); for a dense model that example amounts to one independent engine per
process and per device group, which is what the shards are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training.data import (DEFAULT_MAX_PIXELS, PromptRecord, hash64,
                                      load_image_checked, shard_of)

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "PARTS_DIR",
    "Summary",
    "assign_shard",
    "generate",
    "part_name",
    "request_seed",
    "row_schema",
    "shard_device_envs",
    "shard_records",
]

logger = logging.getLogger(__name__)

#: Sub-folder of ``out_dir`` holding the Parquet parts (a split name `datasets` recognises).
PARTS_DIR = "train"
_PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.parquet$")
_EMPTY_RE = re.compile(r"^\.part-(\d{5})-(\d{6})\.empty\.json$")
_META_KEY = b"massv"
_FORMAT_VERSION = 1

PROMPT_TOO_LONG = "prompt_too_long"
REJECTED = "rejected_by_engine"

#: The data-parallel shard of a record id (re-exported from ``data``).
assign_shard = shard_of


def part_name(shard: int, chunk: int) -> str:
    return f"part-{shard:05d}-{chunk:06d}.parquet"


def request_seed(seed: int, record_id: str) -> int:
    """The per-request sampling seed of a record (independent of batching and resumption)."""
    return hash64(f"{seed}\x00{record_id}") % (2**31 - 1)


def shard_records(records: Iterable[PromptRecord], shard: int, num_shards: int,
                  ) -> list[PromptRecord]:
    """The records of ``shard`` in input order; duplicate ids are an error."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    out, seen = [], set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate record id {r.id!r}: ids must be unique")
        seen.add(r.id)
        if shard_of(r.id, num_shards) == shard:
            out.append(r)
    return out


def shard_device_envs(num_engines: int, tensor_parallel_size: int = 1,
                      environ: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Environment variables that give each of ``num_engines`` engines on this machine its own
    devices: ``tensor_parallel_size`` GPUs each (``CUDA_VISIBLE_DEVICES``, a slice of the visible
    ones) with CUDA, else disjoint CPU cores (``VLLM_CPU_OMP_THREADS_BIND``, one ``|``-separated
    core list per TP rank, format of ``vllm/utils/ompmultiprocessing.py``) when it is unset or
    ``auto``; an explicit CPU binding is left as it is.

    Raises ``MassvConfigError`` when there are fewer GPUs or cores than engines x TP ranks.
    """
    import torch

    env = os.environ if environ is None else environ
    slots = num_engines * tensor_parallel_size
    if torch.cuda.is_available():
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible
                   else [str(i) for i in range(torch.cuda.device_count())])
        if len(devices) < slots:
            raise MassvConfigError(
                f"{num_engines} shards x tensor parallel {tensor_parallel_size} need {slots} "
                f"GPUs; {len(devices)} are visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(
            devices[i * tensor_parallel_size: (i + 1) * tensor_parallel_size])}
            for i in range(num_engines)]
    if env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return [{} for _ in range(num_engines)]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < slots:
        raise MassvConfigError(f"{num_engines} shards x tensor parallel {tensor_parallel_size} "
                               f"need {slots} CPU cores; {len(cores)} are available")
    per = len(cores) // slots
    groups = [",".join(map(str, cores[i * per: (i + 1) * per])) for i in range(slots)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": "|".join(
        groups[i * tensor_parallel_size: (i + 1) * tensor_parallel_size])}
        for i in range(num_engines)]


def row_schema(logprobs: int = 0, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of the generated rows (with the top-k columns when ``logprobs > 0``)."""
    import pyarrow as pa

    fields = [
        ("id", pa.string()), ("messages", pa.string()), ("prompt", pa.string()),
        ("images", pa.list_(pa.string())), ("prompt_token_ids", pa.list_(pa.int32())),
        ("response", pa.string()), ("token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()), ("reference", pa.string()),
        ("temperature", pa.float64()), ("top_p", pa.float64()), ("max_tokens", pa.int64()),
        ("seed", pa.int64()), ("target", pa.string()),
    ]
    if logprobs > 0:
        fields += [("top_logprob_ids", pa.list_(pa.list_(pa.int32()))),
                   ("top_logprobs", pa.list_(pa.list_(pa.float32())))]
    meta = None if metadata is None else {_META_KEY: json.dumps(dict(metadata)).encode()}
    return pa.schema([pa.field(n, t, nullable=(n == "reference")) for n, t in fields],
                     metadata=meta)


@dataclass
class Summary:
    """What one `generate` call did (``*_total``: over all finished parts of the shard)."""

    shard: int
    num_shards: int
    out_dir: str
    target: str
    records: int = 0                 # records of this shard in the input
    written: int = 0                 # rows written by this run
    written_total: int = 0           # rows in this shard's parts
    skipped: dict[str, int] = field(default_factory=dict)        # this run, by reason
    skipped_total: dict[str, int] = field(default_factory=dict)  # recorded in parts + this run
    skipped_reading: dict[str, int] = field(default_factory=dict)  # input entries (all shards)
    chunks_done: int = 0             # chunks processed by this run (a part each, if any rows)
    prompt_tokens: int = 0           # this run
    response_tokens: int = 0         # this run
    seconds: float = 0.0             # wall time of this run, engine start included
    engine_start_seconds: float = 0.0
    generate_seconds: float = 0.0    # time inside the engine (requests in flight)
    response_tokens_per_s: float = 0.0
    complete: bool = False           # every record of the shard is written or skipped
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def reasons(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

        return (
            f"massv generate shard {self.shard}/{self.num_shards} -> {self.out_dir} "
            f"({'complete' if self.complete else 'INCOMPLETE: rerun to resume'})\n"
            f"  written {self.written} this run, {self.written_total} in total "
            f"({self.records} records in the shard)\n"
            f"  skipped this run: {reasons(self.skipped)}; in total: "
            f"{reasons(self.skipped_total)}; while reading the input: "
            f"{reasons(self.skipped_reading)}\n"
            f"  tokens: {self.prompt_tokens} prompt, {self.response_tokens} response\n"
            f"  time: {self.seconds:.1f} s (engine start {self.engine_start_seconds:.1f} s, "
            f"generating {self.generate_seconds:.1f} s), "
            f"{self.response_tokens_per_s:.1f} response tokens/s")


# ----------------------------------------------------------------------------------------------
# Parts on disk
# ----------------------------------------------------------------------------------------------


@dataclass
class _Finished:
    ids: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)   # id -> reason
    rows: int = 0
    last_chunk: int = -1


def _scan_finished(parts_dir: Path, shard: int, settings: Mapping[str, Any]) -> _Finished:
    """Ids written and skipped in this shard's finished parts; stale temp files are removed."""
    import pyarrow.parquet as pq

    done = _Finished()
    if not parts_dir.is_dir():
        return done
    for p in sorted(parts_dir.iterdir()):
        if p.name.startswith(f".part-{shard:05d}-") and ".tmp-" in p.name:
            p.unlink(missing_ok=True)  # a chunk that was being written when a run stopped
            continue
        m = _PART_RE.match(p.name)
        empty = _EMPTY_RE.match(p.name)
        if not (m or empty) or int((m or empty).group(1)) != shard:  # type: ignore[union-attr]
            continue
        if m:
            meta_raw = (pq.read_schema(p).metadata or {}).get(_META_KEY)
            meta = json.loads(meta_raw) if meta_raw else {}
        else:
            meta = json.loads(p.read_text())
        old = meta.get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise MassvConfigError(
                f"{p} was generated with other settings ({changes}); resume with the same "
                f"settings or write to a new output directory")
        ids = pq.read_table(p, columns=["id"]).column("id").to_pylist() if m else []
        done.ids.update(ids)
        done.rows += len(ids)
        done.skipped.update(meta.get("skipped", {}))
        done.last_chunk = max(done.last_chunk, int((m or empty).group(2)))  # type: ignore
    return done


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name.lstrip('.')}.tmp-{os.getpid()}")


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_part(parts_dir: Path, shard: int, chunk: int, rows: list[dict[str, Any]],
                schema: pa.Schema) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    final = parts_dir / part_name(shard, chunk)
    tmp = _tmp_name(final)
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------
# Engine side
# ----------------------------------------------------------------------------------------------


class _ChatFormatter:
    """The target's chat template (processor's first, as vLLM's ``LLM.chat`` does, else the
    tokenizer's), rendering ``{"type": "image"}`` items as the model's image placeholders."""

    def __init__(self, model: str, trust_remote_code: bool = False, fallback: Any = None):
        self._holder = None
        try:
            from transformers import AutoProcessor

            proc = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            if getattr(proc, "chat_template", None):
                self._holder = proc
        except Exception:  # noqa: BLE001 -- no processor: fall back to the tokenizer
            pass
        if self._holder is None:
            if fallback is None:
                from transformers import AutoTokenizer

                fallback = AutoTokenizer.from_pretrained(model,
                                                         trust_remote_code=trust_remote_code)
            self._holder = fallback

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        return self._holder.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)


def _load_chunk(records: list[PromptRecord], max_pixels: int | None,
                ) -> list[tuple[PromptRecord, list[Any] | None, str | None]]:
    out = []
    for r in records:
        images, reason = [], None
        for path in r.images:
            img, reason = load_image_checked(path, max_pixels)
            if img is None:
                images = None
                break
            images.append(img)
        out.append((r, images, reason))
    return out


def _top_logprobs(position: Mapping[int, Any], k: int) -> tuple[list[int], list[float]]:
    """The top-``k`` (rank 1..k) entries of one position's logprobs, in rank order (vLLM adds the
    sampled token, which may rank lower; it is dropped unless it is in the top k)."""
    ranked = sorted(((lp.rank if lp.rank is not None else math.inf, -lp.logprob, tid, lp.logprob)
                     for tid, lp in position.items()))
    top = [(tid, lp) for rank, _, tid, lp in ranked if rank <= k][:k]
    return [t for t, _ in top], [lp for _, lp in top]


def _run_requests(llm: Any, items: list[tuple[PromptRecord, str, list[Any]]], make_params: Any,
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """Enqueue one request per item (a request the engine refuses -- prompt too long, an image
    the processor cannot take -- is skipped with a reason), then run them all.
    Returns ({record id: RequestOutput}, {record id: skip reason})."""
    from vllm.outputs import RequestOutput

    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover
        EngineDeadError = RuntimeError  # type: ignore[assignment,misc]  # noqa: N806

    by_request: dict[str, str] = {}
    skipped: dict[str, str] = {}
    try:
        for record, prompt, images in items:
            inp: dict[str, Any] = {"prompt": prompt}
            if images:
                inp["multi_modal_data"] = {"image": images}
            try:
                (req_id,) = llm.enqueue([inp], make_params(record), use_tqdm=False)
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001 -- the engine refused this one request
                msg = str(e)
                too_long = ("maximum model length" in msg or "maximum context length" in msg)
                skipped[record.id] = PROMPT_TOO_LONG if too_long else REJECTED
                logger.warning("massv generate: skipping %s (%s): %s", record.id,
                               skipped[record.id], msg[:300])
                continue
            by_request[str(req_id)] = record.id  # internal id: "<external>-<random>"
        outputs = llm.wait_for_completion(RequestOutput, use_tqdm=False) if by_request else []
    except BaseException:
        if by_request:  # leave a shared engine clean (Ctrl-C, an engine error)
            try:
                llm.llm_engine.abort_request(list(by_request), internal=True)
            except Exception:  # noqa: BLE001
                pass
        raise
    by_external = {req.split("-", 1)[0]: rid for req, rid in by_request.items()}
    results = {}
    for out in outputs:
        rid = by_external.get(str(out.request_id).split("-", 1)[0])
        if rid is None:
            raise RuntimeError(f"unexpected vLLM output for request {out.request_id!r} "
                               "(was the engine used by someone else meanwhile?)")
        results[rid] = out
    return results, skipped


# ----------------------------------------------------------------------------------------------
# generate(): the engine holder, the chunk runner and the row builder
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RequestSettings:
    """What every request of a `generate` call shares (and every row records)."""

    target: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    logprobs: int

    def params(self, record: PromptRecord) -> Any:
        """The record's ``vllm.SamplingParams`` (seeded per record when sampling)."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
            seed=None if self.temperature == 0 else request_seed(self.seed, record.id),
            logprobs=self.logprobs if self.logprobs > 0 else None)


class _Engine:
    """The vLLM engine of a `generate` call and the target's chat formatter, started at first
    use. An ``llm`` passed in is used as it is and never shut down; one started here is shut down
    by :meth:`shutdown`."""

    def __init__(self, llm: Any, request: _RequestSettings, max_images: int,
                 engine_kwargs: Mapping[str, Any] | None) -> None:
        self.llm, self._owned = llm, llm is None
        self._request, self._max_images = request, max_images
        self._engine_kwargs = dict(engine_kwargs or {})
        self.formatter: _ChatFormatter | None = None
        self.start_seconds = 0.0

    def start(self) -> Any:
        """The engine (started on the first call); :attr:`formatter` is set as well."""
        if self.llm is None:
            from vllm import LLM

            t0 = time.perf_counter()
            kwargs: dict[str, Any] = {"model": self._request.target, "seed": self._request.seed,
                                      "limit_mm_per_prompt": {"image": max(1, self._max_images),
                                                              "video": 0}}
            if self._request.logprobs > 20:
                kwargs["max_logprobs"] = self._request.logprobs
            kwargs.update(self._engine_kwargs)
            self.llm = LLM(**kwargs)
            self.start_seconds = time.perf_counter() - t0
        if self.formatter is None:
            mc = self.llm.model_config
            fallback = None
            try:
                fallback = self.llm.get_tokenizer()
            except Exception:  # noqa: BLE001
                pass
            self.formatter = _ChatFormatter(mc.tokenizer or mc.model,
                                            trust_remote_code=bool(mc.trust_remote_code),
                                            fallback=fallback)
        return self.llm

    def shutdown(self) -> None:
        """Shut down an engine started here (errors ignored: the run is ending)."""
        if self._owned and self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.llm = None


def _row(record: PromptRecord, prompt: str, output: Any, request: _RequestSettings
         ) -> dict[str, Any]:
    """The Parquet row (:func:`row_schema`) of one finished request (a ``vllm.RequestOutput``),
    with the top-k columns when ``request.logprobs > 0``."""
    comp = output.outputs[0]
    row = {
        "id": record.id,
        "messages": json.dumps(record.messages, ensure_ascii=False),
        "prompt": prompt,
        "images": list(record.images),
        "prompt_token_ids": list(output.prompt_token_ids or []),
        "response": comp.text,
        "token_ids": list(comp.token_ids),
        "finish_reason": str(comp.finish_reason),
        "reference": record.reference,
        "temperature": float(request.temperature), "top_p": float(request.top_p),
        "max_tokens": int(request.max_tokens), "seed": int(request.seed),
        "target": request.target,
    }
    if request.logprobs > 0:
        ids_k, lps_k = [], []
        for pos in comp.logprobs or []:
            i_, l_ = _top_logprobs(pos or {}, request.logprobs)
            ids_k.append(i_)
            lps_k.append(l_)
        row["top_logprob_ids"], row["top_logprobs"] = ids_k, lps_k
    return row


class _ChunkRunner:
    """Runs one chunk: its loadable records through the engine (``batch_size`` requests at a
    time), their rows into a Parquet part (or a hidden empty marker when none is left), and the
    token, time and row counts into ``summary``."""

    def __init__(self, engine: _Engine, request: _RequestSettings, *, parts_dir: Path,
                 shard: int, settings: Mapping[str, Any], batch_size: int | None,
                 summary: Summary, pbar: Any) -> None:
        self.engine, self.request = engine, request
        self.parts_dir, self.shard, self.settings = parts_dir, shard, settings
        self.batch_size, self.summary, self.pbar = batch_size, summary, pbar
        self._schema: pa.Schema | None = None

    def __call__(self, chunk_no: int, chunk: list[PromptRecord],
                 loaded: list[tuple[PromptRecord, list[Any] | None, str | None]]
                 ) -> dict[str, str]:
        """Process chunk ``chunk_no`` (``loaded``: :func:`_load_chunk` of ``chunk``); returns
        its skipped records {id: reason}."""
        skipped: dict[str, str] = {}
        items = []
        for record, images, reason in loaded:
            if images is None:
                skipped[record.id] = reason  # type: ignore[assignment]
            else:
                items.append((record, images))
        outputs: dict[str, Any] = {}
        prompts: dict[str, str] = {}
        if items:
            prompts = self._prompts(items)
            outputs = self._generate(items, prompts, skipped)
        self.pbar.update(len(chunk) - len(items))
        rows = [_row(record, prompts[record.id], outputs[record.id], self.request)
                for record, _ in items if outputs.get(record.id) is not None]
        self._write(chunk_no, rows, skipped)
        return skipped

    def _prompts(self, items: list[tuple[PromptRecord, list[Any]]]) -> dict[str, str]:
        self.engine.start()
        self.summary.engine_start_seconds = self.engine.start_seconds
        return {r.id: self.engine.formatter(r.messages) for r, _ in items}  # type: ignore[misc]

    def _generate(self, items: list[tuple[PromptRecord, list[Any]]], prompts: dict[str, str],
                  skipped: dict[str, str]) -> dict[str, Any]:
        """{record id: RequestOutput}; records the engine refuses are added to ``skipped``."""
        summary, outputs = self.summary, {}
        step = self.batch_size or len(items)
        for b in range(0, len(items), step):
            batch = [(r, prompts[r.id], imgs) for r, imgs in items[b:b + step]]
            t0 = time.perf_counter()
            results, refused = _run_requests(self.engine.llm, batch, self.request.params)
            summary.generate_seconds += time.perf_counter() - t0
            outputs.update(results)
            skipped.update(refused)
            summary.response_tokens += sum(len(o.outputs[0].token_ids) for o in results.values())
            summary.prompt_tokens += sum(len(o.prompt_token_ids or []) for o in results.values())
            self.pbar.update(len(batch))
            if summary.generate_seconds > 0:
                self.pbar.set_postfix_str(
                    f"{summary.response_tokens / summary.generate_seconds:.0f} tok/s")
        return outputs

    def _write(self, chunk_no: int, rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
        meta = {"settings": self.settings, "shard": self.shard, "chunk": chunk_no,
                "skipped": skipped}
        if rows:
            if self._schema is None:
                self._schema = row_schema(self.request.logprobs)
            _write_part(self.parts_dir, self.shard, chunk_no, rows,
                        self._schema.with_metadata({_META_KEY: json.dumps(meta).encode()}))
            self.summary.written += len(rows)
            self.summary.written_total += len(rows)
        else:  # no rows (every record skipped): a hidden marker, as `datasets` reads no empty
            # Parquet file
            _atomic_write_json(
                self.parts_dir / f".part-{self.shard:05d}-{chunk_no:06d}.empty.json", meta)


def _update_summary(summary: Summary, path: Path, skipped_run: Counter, skipped_done: Counter,
                    t_start: float, complete: bool) -> None:
    """Fill in the totals and rates of ``summary`` and write it to ``path``."""
    summary.skipped = dict(sorted(skipped_run.items()))
    summary.skipped_total = dict(sorted((skipped_done + skipped_run).items()))
    summary.seconds = time.perf_counter() - t_start
    summary.response_tokens_per_s = (summary.response_tokens / summary.generate_seconds
                                     if summary.generate_seconds > 0 else 0.0)
    summary.complete = complete
    _atomic_write_json(path, summary.to_dict())


def generate(records: Iterable[PromptRecord], target: str | os.PathLike | None,
             out_dir: str | os.PathLike, *, temperature: float = 0.0, top_p: float = 1.0,
             max_tokens: int = 256, seed: int = 0, logprobs: int = 0, shard: int = 0,
             num_shards: int = 1, shard_size: int = 256, batch_size: int | None = None,
             max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
             engine_kwargs: Mapping[str, Any] | None = None, llm: Any = None,
             max_chunks: int | None = None, read_skipped: Mapping[str, int] | None = None,
             progress: bool = True, verbose: bool = True) -> Summary:
    """Generate the target's answers to ``records`` (this shard's share) into ``out_dir``.

    Args:
        records: prompts (:mod:`vllm_massv.training.data` readers); ids must be unique.
        target: the target model (directory or hub name) for ``vllm.LLM``; with ``llm`` given it
            only names the target in the rows (default: the engine's model).
        temperature, top_p, max_tokens: sampling (greedy by default). ``seed``: per-request seeds
            derive from it and the record id (:func:`request_seed`).
        logprobs: keep the target's top-k log-probabilities per response token (0: none).
        shard, num_shards: this worker's share of the records (:func:`assign_shard`).
        shard_size: records per chunk; one Parquet part per chunk.
        batch_size: requests handed to the engine at once within a chunk (default: the chunk).
        max_image_pixels: larger images are downsized (:func:`data.load_image`); training must
            load images with the same limit (recorded in the parts' metadata and the summary).
        engine_kwargs: extra ``vllm.LLM`` arguments (dtype, max_model_len, ...).
        llm: an existing ``vllm.LLM`` to use instead of starting one (it is not shut down).
            Without it, an engine is started at the first chunk that has a loadable record (a
            finished data set is re-checked without one) and shut down at the end.
        max_chunks: stop cleanly after this many chunks in this call (time-boxed or preemptible
            jobs, tests; rerun to resume). The summary then says ``complete=False``. Ctrl-C or a
            killed process is safe as well: finished parts are kept, the chunk in flight is
            redone by the next run.
        read_skipped: counts of input entries the reader skipped, reported in the summary.
        progress: show a tqdm bar. verbose: print the summary at the end.

    Returns:
        The :class:`Summary` (also written to ``summary-{shard:05d}.json``). Records whose images
        fail to load, or that the engine refuses, are skipped and counted by reason.

    Raises:
        ValueError: ``shard_size`` < 1, neither ``target`` nor ``llm``, a bad shard or duplicate
            record ids.
        MassvConfigError: ``out_dir`` holds parts generated with other settings.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if target is None and llm is None:
        raise ValueError("generate needs a target model or an llm")
    if target is None:
        target = llm.model_config.model
    target = str(target)
    out = Path(out_dir)
    parts_dir = out / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)

    settings = {"target": target, "temperature": float(temperature), "top_p": float(top_p),
                "max_tokens": int(max_tokens), "seed": int(seed), "logprobs": int(logprobs),
                "num_shards": int(num_shards), "image_max_pixels": max_image_pixels,
                "format_version": _FORMAT_VERSION}
    mine = shard_records(records, shard, num_shards)
    done = _scan_finished(parts_dir, shard, settings)
    remaining = [r for r in mine if r.id not in done.ids and r.id not in done.skipped]
    chunks = [remaining[i:i + shard_size] for i in range(0, len(remaining), shard_size)]

    summary = Summary(shard=shard, num_shards=num_shards, out_dir=str(out), target=target,
                      records=len(mine), written_total=done.rows,
                      skipped_reading=dict(read_skipped or {}), settings=settings)
    skipped_run: Counter = Counter()
    skipped_done = Counter(done.skipped.values())
    summary_path = out / f"summary-{shard:05d}.json"

    request = _RequestSettings(target=target, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, seed=seed, logprobs=logprobs)
    engine = _Engine(llm, request, max((len(r.images) for r in remaining), default=1),
                     engine_kwargs)
    pbar = tqdm(total=len(mine), initial=len(mine) - len(remaining), unit="sample",
                desc=f"massv generate {shard}/{num_shards}", disable=not progress,
                dynamic_ncols=True)
    run_chunk = _ChunkRunner(engine, request, parts_dir=parts_dir, shard=shard,
                             settings=settings, batch_size=batch_size, summary=summary, pbar=pbar)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="massv-images")
    stopped_early = False
    try:
        pending: Future | None = (pool.submit(_load_chunk, chunks[0], max_image_pixels)
                                  if chunks else None)
        for c, chunk in enumerate(chunks):
            if max_chunks is not None and summary.chunks_done >= max_chunks:
                stopped_early = True
                break
            loaded = pending.result()  # type: ignore[union-attr]
            pending = (pool.submit(_load_chunk, chunks[c + 1], max_image_pixels)
                       if c + 1 < len(chunks) else None)  # prefetch while generating
            skipped = run_chunk(done.last_chunk + 1 + c, chunk, loaded)
            skipped_run.update(skipped.values())
            summary.chunks_done += 1
            _update_summary(summary, summary_path, skipped_run, skipped_done, t_start,
                            complete=False)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        pbar.close()
        engine.shutdown()
    _update_summary(summary, summary_path, skipped_run, skipped_done, t_start,
                    complete=not stopped_early)
    if verbose:
        print(summary)
    return summary
