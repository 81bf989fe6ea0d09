"""The evaluation report of a run: plots (PNG), `report.md` and a self-contained `index.html`.

Input is the per-sample score table built by `jobs.score` and a summary dict; output is a
local folder that the stage then uploads next to the run's videos (links are relative, so the
report opens from a file browser or any static host without a server).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

PLOTS = {
    "steps_histogram.png": "Full-compute steps per sample",
    "acceptance_per_step.png": "Speculative acceptance per denoising step",
    "speedup_vs_quality.png": "Speedup against quality",
    "quality_vs_steps.png": "Quality against full-compute steps",
}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        if math.isinf(v):
            return "identical" if v > 0 else "-inf"
        return f"{v:.{digits}f}"
    return str(v)


def quality_column(scores: pd.DataFrame) -> tuple[str | None, str]:
    """The per-sample quality plotted against speed: PSNR to the reference, else a VBench dimension."""
    if "psnr" in scores and scores["psnr"].notna().any():
        return "psnr", "PSNR to the uncached reference (dB)"
    for col in scores.columns:
        if col.startswith("vbench_") and scores[col].notna().any():
            return col, f"VBench {col.removeprefix('vbench_').replace('_', ' ')}"
    return None, ""


def make_plots(scores: pd.DataFrame, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    steps = scores["num_inference_steps"].max()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    used = scores["full_steps_used"]
    ax.hist(used, bins=range(int(used.min()), int(used.max()) + 2), align="left", rwidth=0.85, color="#3b6ea5")
    ax.set_xlabel(f"steps computed in full (of {steps})")
    ax.set_ylabel("samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(PLOTS["steps_histogram.png"])
    fig.tight_layout()
    fig.savefig(out / "steps_histogram.png", dpi=110)
    plt.close(fig)

    patterns = [p for p in scores["step_pattern"] if p]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if patterns:
        n = max(len(p) for p in patterns)
        share = {k: [sum(p[i] == k for p in patterns if i < len(p)) / len(patterns) for i in range(n)]
                 for k in "FSR"}
        x = range(n)
        ax.stackplot(x, share["F"], share["S"], share["R"], labels=["full (scheduled)", "speculative, accepted",
                                                                    "speculative, rejected"],
                     colors=["#9aa5b1", "#2e8b57", "#c0392b"])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title(PLOTS["acceptance_per_step.png"])
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_step.png", dpi=110)
    plt.close(fig)

    col, label = quality_column(scores)
    for name, xcol, xlabel in (("speedup_vs_quality.png", "flops_speedup", "FLOPs speedup vs no caching (x)"),
                               ("quality_vs_steps.png", "full_steps_used", "steps computed in full")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if col is not None:
            y = scores[col].astype(float)
            finite = y.replace([math.inf, -math.inf], float("nan"))
            ax.scatter(scores[xcol], finite, s=18, color="#3b6ea5")
            if finite.isna().all():
                ax.text(0.5, 0.5, "every sample identical to the reference", ha="center", transform=ax.transAxes)
            ax.set_ylabel(label)
        ax.set_xlabel(xlabel)
        ax.set_title(PLOTS[name])
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return list(PLOTS)


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], rows: list[list], raw_cols: frozenset[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{v if i in raw_cols else html.escape(_fmt(v))}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(scores: pd.DataFrame, summary: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The report's tables as (headers, rows), shared by the markdown and the HTML."""
    run_rows = [[k, v] for k, v in summary["run"].items()]
    agg = summary.get("vbench")
    vb_rows = []
    if agg:
        for d in agg["ran"]:
            vb_rows.append([d, agg["means"][d], agg["normalized"][d]])
        vb_rows.append(["Quality score" + (" (partial)" if agg["partial"] else ""), None, agg["quality"]])
        vb_rows.append(["Semantic score" + (" (partial)" if agg["partial"] else ""), None, agg["semantic"]])
        vb_rows.append(["Total" + (" (partial: not computed)" if agg["partial"] else ""), None, agg["total"]])
    fid = summary.get("fidelity")
    fid_rows = [[k, v] for k, v in fid.items()] if fid else []
    cols = [c for c in ("psnr", "ssim", "lpips", "flicker", "adherence_all") if c in scores]
    vb_cols = [c for c in scores.columns if c.startswith("vbench_")]
    sample_headers = ["id", "prompt", "video", "steps in full", "FLOPs speedup", *cols, *vb_cols]
    sample_rows = [[r["id"], r["prompt"], r["id"], r["full_steps_used"], r["flops_speedup"],
                    *[r[c] for c in cols], *[r[c] for c in vb_cols]] for _, r in scores.iterrows()]
    return {"run": (["field", "value"], run_rows),
            "vbench": (["dimension", "raw mean", "normalised"], vb_rows),
            "fidelity": (["measure", "value"], fid_rows),
            "samples": (sample_headers, sample_rows)}


def write_report(scores: pd.DataFrame, summary: dict, out: Path, videos_href: str = "../videos") -> list[str]:
    """Write plots, report.md and index.html into `out`; returns the file names written."""
    plots = make_plots(scores, out)
    tables = sections(scores, summary)
    partial_note = ""
    agg = summary.get("vbench")
    if agg and agg["partial"]:
        partial_note = (f"Partial VBench evaluation: {len(agg['ran'])} of 16 dimensions ran "
                        f"({', '.join(agg['ran'])}); missing dimensions are not counted, Total is not computed.")

    md = [f"# Evaluation report: {summary['run'].get('output', '')}", "", "## Run", "",
          _md_table(*tables["run"]), "", "## VBench", ""]
    md += [partial_note, ""] if partial_note else []
    md += [_md_table(*tables["vbench"]) if tables["vbench"][1] else "VBench was not run.", "",
           "## Fidelity to the uncached reference", "",
           _md_table(*tables["fidelity"]) if tables["fidelity"][1] else "No reference run given.", ""]
    md += [f"## {PLOTS[p]}\n\n![{PLOTS[p]}]({p})\n" for p in plots]
    headers, rows = tables["samples"]
    md_rows = [[r[0], r[1], f"[mp4]({videos_href}/{r[2]}.mp4)", *r[3:]] for r in rows]
    md += ["## Samples", "", _md_table(headers, md_rows), ""]
    (out / "report.md").write_text("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:13px;text-align:left}th{background:#f0f3f6}img{max-width:540px;margin:8px}"
             ".note{background:#fff6d5;padding:8px;border-left:4px solid #e0b000}")
    h_rows = [[html.escape(str(r[0])), html.escape(str(r[1])),
               f'<a href="{html.escape(videos_href)}/{html.escape(str(r[2]))}.mp4">mp4</a>', *r[3:]] for r in rows]
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>SpeCa run report</title>"
              f"<style>{style}</style></head><body>"),
             f"<h1>Evaluation report</h1><p>{html.escape(str(summary['run'].get('output', '')))}</p>",
             "<h2>Run</h2>", _html_table(*tables["run"]), "<h2 id='vbench'>VBench</h2>"]
    if partial_note:
        parts.append(f"<p class='note'>{html.escape(partial_note)}</p>")
    parts.append(_html_table(*tables["vbench"]) if tables["vbench"][1] else "<p>VBench was not run.</p>")
    parts.append("<h2 id='fidelity'>Fidelity to the uncached reference</h2>")
    parts.append(_html_table(*tables["fidelity"]) if tables["fidelity"][1] else "<p>No reference run given.</p>")
    parts.append("<h2>Plots</h2>" + "".join(f"<img src='{p}' alt='{html.escape(PLOTS[p])}'>" for p in plots))
    parts.append("<h2 id='samples'>Samples</h2>" + _html_table(headers, h_rows, raw_cols=frozenset({0, 1, 2})))
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))
    return [*plots, "report.md", "index.html"]
