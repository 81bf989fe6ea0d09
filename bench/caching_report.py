"""The caching benchmark's goals, markdown report and plots, from its rows (also `--render` from a run's JSON)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from bench.flop_count import HUNYUAN_DEPTH
from bench.method import FAMILIES
from bench.speca_rows import DEFAULT_KEY

FLOOR_MEAN_DB = 32.0  # the quality floor: mean PSNR to the uncached clips ...
FLOOR_WORST_DB = 26.0  # ... and the worst clip's
FAILURE_PSNR_DB = 25.0  # a clip below this is a structural failure (and see bench.caching.failure_rule)
SPEEDUP_GOAL = 1.25  # the default preset's FLOPs speedup / each peer family's best above the floor, at both depths
DEFAULT_SPEEDUP_GOAL = 2.5  # the default preset's FLOPs speedup at the model's depth, above the floor
DEFAULT_STRETCH_60 = 5.0  # stretch: the default's FLOPs speedup projected to 60 blocks (the paper's regime)
WALL_SHARE_GOAL = 0.8  # the default preset's wall speedup / its FLOPs speedup
PSNR_CAP_DB = 100.0  # identical clips (inf dB) count as this in means
PLOT_PSNR_CAP_DB = 60.0


def under_floor(row: dict) -> bool:
    return row["error"] is None and row["psnr"] >= FLOOR_MEAN_DB and row["psnr_worst"] >= FLOOR_WORST_DB


DEPTHS = {"flops_speedup": "at the model's depth", "flops_speedup_60": f"projected to {HUNYUAN_DEPTH} blocks"}


def goals(rows: list[dict]) -> dict:
    """The issue's goals, computed from the rows: the default preset against every peer family's best row above
    the floor (and SpeCa's best row, for reference), the default's own bars, batch 8 against batch 1."""
    ok = [r for r in rows if r["error"] is None]

    def best(candidates: list[dict], key: str) -> dict | None:
        fit = [r for r in candidates if under_floor(r)]
        return max(fit, key=lambda r: r[key]) if fit else None

    default = next((r for r in ok if r["key"] == DEFAULT_KEY), None)
    fit_default = default if default is not None and under_floor(default) else None
    out: dict = {"depths": {}}
    peers = list(dict.fromkeys(r["family"] for r in rows if r["kind"] in ("peer", "baseline")))
    for key in DEPTHS:
        speca = best([r for r in ok if r["kind"] == "speca"], key)
        table = []
        for family in peers:
            b = best([r for r in ok if r["family"] == family], key)
            ratio = fit_default[key] / b[key] if fit_default and b else None
            table.append({"family": family, "best_method": b["method"] if b else None,
                          "best_speedup": b[key] if b else None, "ratio": ratio,
                          "ratio_speca_best": speca[key] / b[key] if speca and b else None,
                          "beaten": fit_default is not None and (b is None or ratio >= SPEEDUP_GOAL),
                          "ran": any(r["family"] == family for r in ok)})
        out["depths"][key] = {"default_speedup": fit_default[key] if fit_default else None,
                              "speca_best_method": speca["method"] if speca else None,
                              "speca_best_speedup": speca[key] if speca else None, "peers": table,
                              "met": fit_default is not None and bool(table) and all(p["beaten"] for p in table)}
    out["default"] = None if default is None else {
        "method": default["method"], "above_floor": fit_default is not None, "psnr": default["psnr"],
        "psnr_worst": default["psnr_worst"], "speedup": default["flops_speedup"],
        "speedup_60": default["flops_speedup_60"], "failures": len(default["failures"]),
        "wall_share": default["wall_share"],
        "stretch_met": default["flops_speedup_60"] >= DEFAULT_STRETCH_60,
        "met": fit_default is not None and default["flops_speedup"] >= DEFAULT_SPEEDUP_GOAL
        and not default["failures"] and default["wall_share"] is not None and default["wall_share"] >= WALL_SHARE_GOAL}
    alone = next((r for r in ok if r["key"] == DEFAULT_KEY + "-b1"), None)
    out["batch"] = None if default is None or alone is None else {
        "same": sum(a == b for a, b in zip(default["patterns"], alone["patterns"])), "of": len(default["patterns"])}
    return out


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and PSNR, by increasing speedup."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front[::-1]


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Speedup vs mean PSNR and vs the worst clip's PSNR, one panel each, with the floor's lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(fig)
    markers = "os^vDP*Xh<>"
    plotted = [r for r in rows if r["error"] is None and r["kind"] != "reference"]
    for panel, (field, floor, label) in enumerate((("psnr", FLOOR_MEAN_DB, "mean PSNR"),
                                                   ("psnr_worst", FLOOR_WORST_DB, "worst clip's PSNR"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, family in enumerate(dict.fromkeys(r["family"] for r in plotted)):
            pts = [(r["flops_speedup"], min(r[field], PLOT_PSNR_CAP_DB)) for r in plotted if r["family"] == family]
            ax.scatter(*zip(*pts), marker=markers[i % len(markers)], color=f"C{i}", label=FAMILIES[family], alpha=0.8)
            ax.plot(*zip(*pareto_front(pts)), color=f"C{i}", lw=1.2)
        ax.axhline(floor, ls="--", color="grey", lw=1, label=f"floor {floor:.0f} dB")
        ax.set_xlabel("FLOPs speedup over no cache (counted, this model's depth)")
        ax.set_ylabel(f"{label} to the uncached clips (dB; capped at {PLOT_PSNR_CAP_DB:.0f})")
        ax.set_title(f"Speedup vs {label}; lines: each family's Pareto front")
        ax.grid(alpha=0.3)
        if panel == 0:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _steps_histogram(full: list[int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in sorted(Counter(full).items()))


def _speedup(value) -> str:
    return _fmt(value, ".2f") + ("x" if value is not None else "")


def _db(value) -> str:
    return "inf" if value is not None and math.isinf(value) else _fmt(value, ".1f")


def _prompt(failure) -> str:
    return failure if isinstance(failure, str) else failure["prompt"]


def _failure(failure, flips: Counter) -> str:
    """One failing clip for the report; JSON written before 2026-12-01 13:40 kept only the prompt."""
    if isinstance(failure, str):
        return f"{failure} [{flips[failure]}]"
    why = ", ".join(failure["flipped"]) or "none"
    return f"{failure['prompt']} ({_db(failure['psnr'])} dB; {why}) [{flips[failure['prompt']]}]"


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    g = goals(rows)
    plot = out.with_name(out.stem + "_pareto.png")
    out.with_suffix(".json").write_text(json.dumps({**meta, "goals": g, "rows": rows}, indent=2))
    plot_pareto(rows, plot)
    title = "the bundled tiny model" if meta["model"] == "bundled" else f"`{meta['model']}`"
    floor = f"mean PSNR >= {FLOOR_MEAN_DB:.0f} dB and worst clip >= {FLOOR_WORST_DB:.0f} dB"
    lines = [
        f"# Caching methods on {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model_desc']}  ",
        (f"Machine: {meta['machine']}. One process; the same {meta['prompts']} held-out "
         f"{meta.get('prompt_set', 'evaluation')} prompts, seeds and "
         f"{meta['steps']} steps for every method; PSNR / SSIM against the uncached clips.  "),
        f"Plot: `{plot.name}`; every figure below, per-sample PSNRs too: `{out.with_suffix('.json').name}`.",
        "",
        "## Goals",
        "",
        f"Quality floor: {floor} to the uncached clips. A structural failure: "
        + meta.get("failure_rule", f"a clip under {FAILURE_PSNR_DB:.0f} dB, or one the tiny world's scorer judges "
                   "otherwise than its uncached clip") + ".",
        "",
    ]
    all_met = True
    for n, (key, where) in enumerate(DEPTHS.items(), start=1):
        d = g["depths"][key]
        all_met &= d["met"]
        dflt = _speedup(d["default_speedup"]) if d["default_speedup"] is not None else "not above the floor"
        best = (f"{d['speca_best_speedup']:.2f}x ({d['speca_best_method']})" if d["speca_best_method"]
                else "none above the floor")
        lines += [
            (f"Goal 1{'ab'[n - 1]}, FLOPs {where}: the default preset (`{DEFAULT_KEY}`, above the floor) is >= "
             f"{SPEEDUP_GOAL}x every peer family's best row above the floor: **{'met' if d['met'] else 'NOT met'}**. "
             f"The default: {dflt}; SpeCa's best row: {best}."),
            "",
            (f"| peer | its best row above the floor, FLOPs speedup {where} | default / peer best | >= {SPEEDUP_GOAL}x "
             "| SpeCa best / peer best |"),
            "|---|---|---|---|---|",
        ]
        for p in d["peers"]:
            pb = (f"{p['best_speedup']:.2f}x ({p['best_method']})" if p["best_method"]
                  else ("no row above the floor" if p["ran"] else "did not run"))
            lines.append(f"| {FAMILIES[p['family']]} | {pb} | {_fmt(p['ratio'], '.2f')} | "
                         f"{'yes' if p['beaten'] else 'no'} | {_fmt(p.get('ratio_speca_best'), '.2f')} |")
        lines.append("")
    lines.append("A peer family with no row above the floor counts as beaten when the default preset is above it.")
    lines.append("")
    dflt = g["default"]
    if dflt is None:
        lines += [f"Goal 2 (the default preset, `{DEFAULT_KEY}`): did not run.", ""]
        all_met = False
    else:
        all_met &= dflt["met"]
        lines += [(f"Goal 2, the default preset ({dflt['method']}): above the floor at >= {DEFAULT_SPEEDUP_GOAL}x "
                   f"FLOPs at the model's depth, zero structural failures and a wall speedup at batch 8 >= "
                   f"{WALL_SHARE_GOAL:.0%} of its FLOPs speedup: **{'met' if dflt['met'] else 'NOT met'}** "
                   f"({'above' if dflt['above_floor'] else 'not above'} the floor: mean {_db(dflt['psnr'])} / worst "
                   f"{_db(dflt['psnr_worst'])} dB; {_speedup(dflt['speedup'])}; {dflt['failures']} failures; "
                   f"wall / FLOPs speedup {_fmt(dflt['wall_share'], '.0%')}). Stretch, >= {DEFAULT_STRETCH_60:.0f}x "
                   f"projected to {HUNYUAN_DEPTH} blocks: {'met' if dflt['stretch_met'] else 'not met'} "
                   f"({_speedup(dflt['speedup_60'])})."), ""]
    if g["batch"] is not None:
        same = g["batch"]["same"] == g["batch"]["of"]
        all_met &= same
        lines += [(f"Goal 3, batch 8 and batch 1 give each sample the same step pattern (default preset): "
                   f"**{'met' if same else 'NOT met'}** ({g['batch']['same']} of {g['batch']['of']} samples)."), ""]
    # The reading is written by hand from a run's numbers and kept beside the report, so a rerun keeps it; a goal not
    # met asks for one.
    analysis = out.with_name(f"{out.stem}_analysis.md")
    if analysis.is_file() or not all_met:
        text = analysis.read_text().strip() if analysis.is_file() else "_To be written._"
        lines += ["## Analysis", "", f"(`{analysis.name}`, written from the run it names.)", "", text, ""]
    lines += [
        "## Results",
        "",
        ("| method | key | FLOPs speedup | at 60 blocks | wall speedup | PSNR mean | p10 | worst | clips < "
         f"{FLOOR_WORST_DB:.0f} dB | SSIM | SSIM worst | structural failures | adherence (all 4) | cache MB "
         "| full steps min/mean/max |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"] is not None:
            text = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['method']} | `{r['key']}` | error: {text} |" + " |" * 12)
            continue
        full = (f"{r['full_steps_min']}/{r['full_steps_mean']:.1f}/{r['full_steps_max']}" if r["full_steps"]
                else "n/a")
        mark = "" if r["kind"] == "reference" else (" (floor)" if under_floor(r) else "")
        near = r.get("flips_on_threshold") or 0
        lines.append(f"| {r['method']}{mark} | `{r['key']}` | {_speedup(r['flops_speedup'])} | "
                     f"{_speedup(r['flops_speedup_60'])} | {_speedup(r['wall_speedup'])} | {_db(r['psnr'])} | "
                     f"{_db(r['psnr_p10'])} | {_db(r['psnr_worst'])} | "
                     f"{sum(p < FLOOR_WORST_DB for p in r['psnr_all'])} | {r['ssim']:.3f} | {r['ssim_worst']:.3f} | "
                     f"{len(r['failures'])}{f' (+{near} on a threshold)' if near else ''} | "
                     f"{100 * r['adherence_all']:.0f}% | {r['cache_mb']:.2f} | {full} |")
    lines += ["", "(floor): the row is above the quality floor. Structural failures: see the rule above; '+n on a "
              "threshold': clips with a verdict turned where the uncached clip was within the scorer's margin "
              "(not failures).", ""]
    ablations = [r for r in rows if r["error"] is None and r.get("ablation")]
    if ablations:
        lines += ["## SpeCa ablations", "",
                  "Each row changes one thing against the default preset (or names the paper's method).", "",
                  "| row | what changes | FLOPs speedup | at 60 blocks | PSNR mean | worst | structural failures |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['key']}` | {r['ablation']} | {_speedup(r['flops_speedup'])} | "
                  f"{_speedup(r['flops_speedup_60'])} | {_db(r['psnr'])} | {_db(r['psnr_worst'])} | "
                  f"{len(r['failures'])} |" for r in ablations]
        lines.append("")
    failing = [r for r in rows if r["error"] is None and r["kind"] != "reference" and r["failures"]]
    if failing:
        flips = Counter(_prompt(f) for r in failing for f in r["failures"])
        methods = sum(r["error"] is None and r["kind"] != "reference" for r in rows)
        lines += ["## Structural failures", "",
                  "Each failing clip: its PSNR to the uncached clip and the attributes the scorer judged otherwise "
                  f"(none: under {FAILURE_PSNR_DB:.0f} dB only); [n] = failing clips with that prompt over all "
                  f"{methods} methods.", ""]
        lines += [f"- {r['method']}: " + "; ".join(_failure(f, flips) for f in r["failures"]) for r in failing]
        lines.append("")
    speca_rows = [r for r in rows if r["error"] is None and r["full_steps"]]
    if speca_rows:
        lines += ["Full steps per sample (SpeCa): full-step count (x number of samples).", ""]
        lines += [f"- {r['method']}: {_steps_histogram(r['full_steps'])}" for r in speca_rows]
    families = {r["family"] for r in rows}
    notes = [
        ("FLOPs: every nn.Linear and attention call inside the double- and single-stream blocks, counted while "
         "the method runs (text encoders, token refiner, embeddings and VAE are the same for all methods and left "
         "out)."),
        (f"At 60 blocks: the counted per-block FLOPs projected to HunyuanVideo's {HUNYUAN_DEPTH} blocks "
         "(`projected_fraction`): a block that ran its attention at every call (SpeCa's verified blocks, on all "
         "tokens or a token subset; FirstBlockCache's and "
         "DBCache's compute blocks) stays one block, a fixed cost; the other blocks' mean share stands for the rest. "
         "Methods that skip whole steps or part of every block keep their share."),
        (f"Wall speedup: the denoising loop only; median of {meta['repeats']} uninstrumented generation(s) per "
         "method, run in rounds over all methods in this process; a ratio to the uncached reference."),
        (f"PSNR mean counts identical clips (inf dB) as {PSNR_CAP_DB:.0f} dB; p10 is a sample's value (the lower "
         "one, no interpolation). SSIM: torchmetrics, per frame. "
         "Cache MB: SpeCa's own peak feature cache per batch; for the peers the peak bytes of the tensors their "
         "states hold (all cache contexts)."),
        ("The pipeline runs true CFG as two transformer calls per step (cache contexts `cond` / `uncond`). "
         "The peers run at batch 8; FirstBlockCache, MagCache and cache-dit decide to skip for the whole batch."),
    ]
    if "cache-dit" in families:
        notes.append("cache-dit: DBCache through `cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...), "
                     "calibrator_config=TaylorSeerCalibratorConfig(...))` with `enable_separate_cfg=True` (CFG runs "
                     "as two calls); its HunyuanVideo adapter caches each block list separately, so Fn / Bn blocks of "
                     "both lists always run (two fixed blocks per call at 60 blocks for F1B0). Settings were chosen "
                     "on calibration prompts (`bench/cache_dit_peer.py`).")
    if "fastercache" in families:
        notes.append("FasterCache: attention skipping only (`is_guidance_distilled=True`, spatial skip range "
                     "and timestep range per row, weight 0.5, as diffusers' own HunyuanVideo test configures it). Its CFG cache "
                     "(approximating the unconditional branch) expects [uncond, cond] stacked in one batch; with the "
                     "two separate calls it splits the conditional batch in halves and fails (the 'with its CFG "
                     "cache' row, when run), so the other rows leave it off.")
    if "pab" in families:
        notes.append("PAB: spatial attention only (skip range and timestep range per row): HunyuanVideo's attention modules are "
                     "joint self-attention, so PAB's cross-attention and temporal ranges have nothing to act on. Its "
                     "default identifiers also match the token refiner's attention, which it skips too (outside the "
                     "counted blocks).")
    if families & {"pab", "fastercache"}:
        notes.append("PAB and FasterCache keep one state per hooked module, not per cache context, so as shipped "
                     "the cond and uncond calls share an iteration counter and an attention cache (one branch reuses "
                     "the other's attention). Rows marked 'per-branch state' run the same hooks with one state per "
                     "cache context (`per_branch_state` here); both variants count towards the peer's best.")
    if meta["mag_ratios"] is not None:
        notes.append(f"MagCache: ratios from diffusers' calibration mode (`MagCacheConfig(calibrate=True)`) on "
                     f"{len(meta['calibration_prompts'])} prompts that are not evaluation prompts, averaged over "
                     f"prompts and both CFG branches; threshold, max_skip_steps and retention_ratio per row (skips beyond "
                     f"diffusers' default 3, which caps it near 2.5x). Ratios: "
                     f"{', '.join(f'{x:.4f}' for x in meta['mag_ratios'])}.")
    notes.append("The peers' settings span each family from <= 1.2x FLOPs to where it leaves the floor; they were "
                 "chosen on calibration prompts, never evaluation prompts (`bench/peers.py`, "
                 "`bench/cache_dit_peer.py`; figures in `peer_frontier_calibration.md`).")
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
