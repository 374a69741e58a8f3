"""Figures and Markdown of ``benchmarks/proposer_cost.py``: the profile's ranges grouped into the
proposer's parts (:data:`GROUPS`), host-sync op counts, ratios and c values
(:func:`summarize`), the report (:func:`markdown`) and a before/after comparison of two result
files (:func:`compare`).
"""

from __future__ import annotations

from typing import Any

#: Profiler range prefix; groups in display order: (range name, label, inside propose()).
RANGE = "massv_pc::"
GROUPS: tuple[tuple[str, str, bool], ...] = (
    ("gather_target_shift0", "target's own image-embedding gather (not drafting)", False),
    ("draft_step", "draft step (runner, total)", False),
    ("prepare", "runner: prepare next tokens / padded inputs", False),
    ("gather_runner_shift1", "runner: image-embedding gather for the drafter (shift 1)", False),
    ("gather_runner_shift0", "runner: image-embedding gather for the drafter (shift 0)", False),
    ("propose", "propose() total", False),
    ("gather_propose_shift0", "image-embedding gather in propose() (shift 0)", True),
    ("mask_remap", "mask remap", True),
    ("first_pass_inputs", "positions / slots first pass (incl. M-RoPE fill)", True),
    ("mrope_fill", "  of which M-RoPE fill", False),
    ("step_positions", "positions / slots draft steps", True),
    ("attn_metadata", "attention metadata", True),
    ("embed", "embeddings (embed_input_ids)", True),
    ("forward", "drafter forwards", True),
    ("sampling", "sampling (logits + argmax)", True),
)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def group_profile(profile: dict, passes: int) -> list[dict[str, Any]]:
    """Rows (group, calls, total ms, ms per pass, share of propose) from a profile's ranges."""
    ranges = profile["ranges"]
    propose_us = ranges.get("propose", {}).get("total_us", 0.0)
    rows = []
    inside = 0.0
    for key, label, in_propose in GROUPS:
        r = ranges.get(key)
        if r is None:
            continue
        if in_propose:
            inside += r["total_us"]
        rows.append({"group": key, "label": label, "calls": r["count"],
                     "total_ms": r["total_us"] / 1e3,
                     "ms_per_pass": r["total_us"] / 1e3 / max(passes, 1),
                     "share_of_propose": r["total_us"] / propose_us if propose_us else None})
    if propose_us:
        other = propose_us - inside
        rows.append({"group": "other", "label": "other (rest of propose())", "calls": None,
                     "total_ms": other / 1e3, "ms_per_pass": other / 1e3 / max(passes, 1),
                     "share_of_propose": other / propose_us})
    return rows


def sync_counts(profile: dict, passes: int) -> dict[str, float]:
    """Host-sync ops per draft step (counted over the whole profile, target included)."""
    counts = {op: 0 for op in SYNC_OPS}
    for o in profile["ops"]:
        if o["op"] in counts:
            counts[o["op"]] += o["count"]
    return {op: c / max(passes, 1) for op, c in counts.items()}


def summarize(result: dict[str, Any], k: int) -> dict[str, Any]:
    """Ratios, in-loop c, pass c, stand-alone c and bound fractions (in place, returned)."""
    t_itl = result["none"]["itl_ms"]
    c_alone = result["drafter_itl_ms"] / t_itl
    result["c_standalone"] = c_alone
    none_tps = {r["batch_size"]: r["tokens_per_s"] for r in result["none"]["runs"]}
    none_ids = {r["batch_size"]: r["token_ids"] for r in result["none"]["runs"]}
    for v in result["variants"]:
        for r in v["runs"]:
            if r["prompts"] == "text":
                b = r["batch_size"]
                r["speedup_vs_none"] = r["tokens_per_s"] / none_tps[b]
                if "token_ids" in r:
                    r["greedy_equal_none"] = r["token_ids"] == none_ids[b]
                if r["tau"]:
                    r["bound"] = r["tau"] / (1 + k * c_alone)
                    r["bound_fraction"] = r["speedup_vs_none"] / r["bound"]
            if r["batch_size"] == 1 and r["num_drafts"]:
                step_ms = r["seconds"] * 1e3 / r["num_drafts"]
                r["c_in_loop"] = (step_ms - t_itl) / k / t_itl
                r["c_pass"] = r["draft_step"]["mean_ms"] / k / t_itl
        passes = v["profile_text"]["ranges"].get("propose", {}).get("count", 0)
        v["profile_text_groups"] = group_profile(v["profile_text"], passes)
        v["profile_text_syncs_per_pass"] = sync_counts(v["profile_text"], passes)
        if "profile_image" in v:
            p = v["profile_image"]["ranges"].get("propose", {}).get("count", 0)
            v["profile_image_groups"] = group_profile(v["profile_image"], p)
            v["profile_image_syncs_per_pass"] = sync_counts(v["profile_image"], p)
    by = {v["variant"]: v for v in result["variants"]}
    ratios = []
    for base in ("stock-proposer", "stock-arch"):
        if "massv" in by and base in by:
            for rm, rs in zip(by["massv"]["runs"], by[base]["runs"]):
                if rm["prompts"] == rs["prompts"] == "text":
                    ratios.append({"vs": base, "batch_size": rm["batch_size"],
                                   "propose_mean": rm["propose"]["mean_ms"]
                                   / rs["propose"]["mean_ms"],
                                   "propose_median": rm["propose"]["median_ms"]
                                   / rs["propose"]["median_ms"],
                                   "draft_step_mean": rm["draft_step"]["mean_ms"]
                                   / rs["draft_step"]["mean_ms"]})
    result["ratios"] = ratios
    return result


def _f(x: Any, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# MASSV proposer cost ({m['label']}, {m['device']})", "",
             (f"Target `{m['target']}`, k = {m['k']}, {m['num_text_prompts']} text-only prompts "
             f"({m['num_image_prompts']} image prompts for the MASSV variants), max "
             f"{m['max_tokens']} new tokens, greedy; fp32, enforce_eager. Target ITL "
             f"{_f(result['none']['itl_ms'])} ms, drafter ITL (alone) "
             f"{_f(result['drafter_itl_ms'])} ms: stand-alone c = {_f(result['c_standalone'], 3)}."),
             "", f"Command: `{m['command']}`", "",
             ("## Time per draft pass (propose() = one pass of k tokens; draft step = the runner's "
             "whole `propose_draft_token_ids`)"), "",
             ("| variant | proposer | prompts | batch | passes | propose mean ms | median ms | "
             "draft step mean ms | τ | tok/s | speedup vs none | c in loop | c pass | "
             "bound τ/(1+kc) | bound fraction | greedy = none |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        for r in v["runs"]:
            eq = r.get("greedy_equal_none")
            lines.append(
                f"| {v['variant']} | {v['proposer']} | {r['prompts']} | {r['batch_size']} | "
                f"{r['propose']['n']} | {_f(r['propose']['mean_ms'])} | "
                f"{_f(r['propose']['median_ms'])} | {_f(r['draft_step']['mean_ms'])} | "
                f"{_f(r['tau'])} | {_f(r['tokens_per_s'], 1)} | {_f(r.get('speedup_vs_none'))} | "
                f"{_f(r.get('c_in_loop'), 3)} | {_f(r.get('c_pass'), 3)} | {_f(r.get('bound'))} | "
                f"{_f(r.get('bound_fraction'))} | {'-' if eq is None else ('yes' if eq else 'NO')} |")
    lines += ["", "## MASSV / stock (text-only prompts)", "",
              "| vs | batch | propose mean | propose median | draft step mean |", "|---|---|---|---|---|"]
    for r in result["ratios"]:
        lines.append(f"| {r['vs']} | {r['batch_size']} | {_f(r['propose_mean'])}× | "
                     f"{_f(r['propose_median'])}× | {_f(r['draft_step_mean'])}× |")
    for v in result["variants"]:
        for which in ("text", "image"):
            rows = v.get(f"profile_{which}_groups")
            if not rows:
                continue
            passes = v[f"profile_{which}"]["ranges"].get("propose", {}).get("count", 0)
            syncs = v[f"profile_{which}_syncs_per_pass"]
            lines += ["", (f"## Profile: {v['variant']} ({v['proposer']}), {which} prompts, "
                      f"batch 1, {passes} passes (torch.profiler, CPU; ranges add overhead)"), "",
                      "| part | calls | total ms | ms per pass | share of propose() |",
                      "|---|---|---|---|---|"]
            for r in rows:
                share = r["share_of_propose"]
                lines.append(f"| {r['label']} | {r['calls'] if r['calls'] is not None else '-'} | "
                             f"{_f(r['total_ms'])} | {_f(r['ms_per_pass'], 3)} | "
                             f"{'-' if share is None else f'{share * 100:.1f}%'} |")
            lines.append("")
            lines.append("Host-sync ops per pass (whole step, target included): " + ", ".join(
                f"`{op}` {c:.1f}" for op, c in syncs.items()))
    return "\n".join(lines) + "\n"


#: range names of the first version of this script (before the proposer reused the runner's
#: gather, shift 0 was gathered by the target and inside propose())
_OLD_KEYS = {"gather_shift1": "gather_runner_shift1"}


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown before/after tables of two result files (same variants and settings)."""
    lines = [f"# MASSV proposer cost: {before['meta']['label']} vs {after['meta']['label']}", "",
             (f"Stand-alone c: {_f(before['c_standalone'], 3)} / {_f(after['c_standalone'], 3)}; "
             f"target ITL {_f(before['none']['itl_ms'])} / {_f(after['none']['itl_ms'])} ms."), "",
             ("| variant | prompts | batch | propose mean ms | propose median ms | "
             "draft step mean ms | c in loop | c pass | bound fraction |"),
             "|---|---|---|---|---|---|---|---|---|"]
    runs_a = {(v["variant"], r["prompts"], r["batch_size"]): r
              for v in after["variants"] for r in v["runs"]}
    for v in before["variants"]:
        for rb in v["runs"]:
            ra = runs_a.get((v["variant"], rb["prompts"], rb["batch_size"]))
            if ra is None:
                continue

            def ba(get, d=2, rb=rb, ra=ra):
                return f"{_f(get(rb), d)} → {_f(get(ra), d)}"
            lines.append(
                f"| {v['variant']} | {rb['prompts']} | {rb['batch_size']} | "
                f"{ba(lambda r: r['propose']['mean_ms'])} | "
                f"{ba(lambda r: r['propose']['median_ms'])} | "
                f"{ba(lambda r: r['draft_step']['mean_ms'])} | "
                f"{ba(lambda r: r.get('c_in_loop'), 3)} | {ba(lambda r: r.get('c_pass'), 3)} | "
                f"{ba(lambda r: r.get('bound_fraction'))} |")
    lines += ["", "| MASSV / | batch | propose mean | propose median | draft step mean |",
              "|---|---|---|---|---|"]
    ratios_a = {(r["vs"], r["batch_size"]): r for r in after["ratios"]}
    for rb in before["ratios"]:
        ra = ratios_a.get((rb["vs"], rb["batch_size"]))
        if ra is not None:
            lines.append(f"| {rb['vs']} | {rb['batch_size']} | " + " | ".join(
                f"{_f(rb[key])}× → {_f(ra[key])}×"
                for key in ("propose_mean", "propose_median", "draft_step_mean")) + " |")
    var_a = {v["variant"]: v for v in after["variants"]}
    for v in before["variants"]:
        va = var_a.get(v["variant"])
        for which in ("text", "image"):
            key_g = f"profile_{which}_groups"
            if va is None or key_g not in v or key_g not in va:
                continue
            gb = {_OLD_KEYS.get(r["group"], r["group"]): r for r in v[key_g]}
            ga = {r["group"]: r for r in va[key_g]}
            lines += ["", f"Profile {v['variant']}, {which} prompts: ms per pass (before → after)",
                      "", "| part | before | after |", "|---|---|---|"]
            for key, label, _ in (*GROUPS, ("other", "other (rest of propose())", True)):
                if key in gb or key in ga:
                    lines.append(f"| {label} | {_f(gb.get(key, {}).get('ms_per_pass'), 3)} | "
                                 f"{_f(ga.get(key, {}).get('ms_per_pass'), 3)} |")
    return "\n".join(lines) + "\n"
