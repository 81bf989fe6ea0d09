"""The evaluation report of a run: plots (PNG), frame strips (JPEG), `report.md` and `index.html`.

Input is the per-sample score table built by `jobs.score`, its summary dict and the frame strips
of the clips; output is a local folder that the stage then uploads next to the run's videos
(links are relative, so the report opens from a file browser or any static host, no server).

The page is built for the question a reviewer brings to it: can this run ship? It leads with the
clips most likely to be wrong (lowest PSNR to the reference, else lowest VBench score), each as a
strip of frames beside the reference's, with its step pattern; then the run's cost, the tables
and plots, and every sample in a table that sorts and pages in the browser (a few lines of
inline script, no CDN), so a run of 10^4 samples stays a light page. `report.md` holds the same
content without the images.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

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
STEP_NAMES = {"F": "full (scheduled)", "S": "speculative, accepted", "R": "speculative, rejected and recomputed"}


@dataclass
class ReportInputs:
    """What the report shows beyond the score table.

    Args:
        strips: JPEG frame strip per sample id (see `jobs.strips`); only the gallery's are written.
        reference_strips: the reference clip's strip per sample id.
        gallery: how many clips the gallery shows, worst first (0: no gallery).
        reference_videos_href: where the page finds the reference's MP4s, or None when a browser
            cannot open them (an s3:// reference).
        table_page: rows per page of the per-sample table.
    """

    strips: dict[str, bytes] = field(default_factory=dict)
    reference_strips: dict[str, bytes] = field(default_factory=dict)
    gallery: int = 48
    reference_videos_href: str | None = None
    table_page: int = 100


# ---- numbers for people --------------------------------------------------------------------------------------


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _seconds(v: float) -> str:
    if v < 1:
        return f"{1000 * v:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"


def _bytes(v: float) -> str:
    unit, size = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if abs(v) >= s), ("B", 1))
    return f"{v / size:.1f} {unit}" if size > 1 else f"{int(v)} B"


_KINDS: dict[str, Callable[[float], str]] = {
    "x": lambda v: f"{v:.2f}x", "pct": lambda v: f"{100 * v:.1f}%", "ssim": lambda v: f"{v:.4f}",
    "f1": lambda v: f"{v:.1f}", "f4": lambda v: f"{v:.4f}", "int": lambda v: f"{int(v):,}",
    "rate": lambda v: f"{v:,.1f} per hour",
    "s": _seconds, "bytes": _bytes,
}


def fmt(v, kind: str = "") -> str:
    """One value as a person reads it: `kind` is x (speedup), pct, db, ssim, s (seconds), bytes, int, rate, f4."""
    if _missing(v):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if kind == "db":
        return "identical" if math.isinf(v) and v > 0 else f"{v:.2f} dB"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if kind in _KINDS:
        return _KINDS[kind](v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


RUN_FIELDS = (  # summary["run"] key, label, kind
    ("output", "output", ""), ("model", "model", ""), ("samples", "samples scored", "int"),
    ("speca", "SpeCa", ""), ("FLOPs speedup (run)", "FLOPs speedup vs no caching", "x"),
    ("FLOPs saved", "FLOPs saved", "pct"), ("mean steps in full", "mean steps computed in full", "f1"),
    ("steps per sample", "denoising steps per sample", "int"), ("device", "device", ""),
    ("device seconds per video (mean)", "device seconds per video (mean)", "s"),
    ("device seconds per video (p90)", "device seconds per video (p90)", "s"),
    ("peak memory per rank (max)", "peak memory per rank (max)", "bytes"),
    ("SpeCa cache per batch (max)", "SpeCa feature cache per batch (max)", "bytes"),
    ("samples per hour", "throughput (last generate call)", "rate"), ("wall seconds", "wall time", "s"),
    ("reference", "reference run", ""),
)
FIDELITY_KINDS = {"PSNR": "db", "SSIM": "ssim", "LPIPS": "f4", "videos identical": "int"}


def _fidelity_kind(key: str) -> str:
    return next((k for prefix, k in FIDELITY_KINDS.items() if key.startswith(prefix)), "")


def _flatten(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in config.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", "off" if v is None and k == "speca" else v))
    return rows


def _config_value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return fmt(v) if isinstance(v, bool) else str(v)  # settings exactly as given


# ---- which clips to look at first ----------------------------------------------------------------------------


def quality_column(scores: pd.DataFrame) -> tuple[str, str, str]:
    """The per-sample quality that orders the review and is plotted against speed (higher is better), as
    (column, axis label, name in a sentence): PSNR to the reference, else a VBench dimension, else our weight-free
    temporal-flickering score."""
    if "psnr" in scores and scores["psnr"].notna().any():
        return "psnr", "PSNR to the uncached reference (dB)", "PSNR to the uncached reference"
    for col in scores.columns:
        if col.startswith("vbench_") and scores[col].notna().any():
            name = f"VBench {col.removeprefix('vbench_').replace('_', ' ')}"
            return col, name, name
    return "flicker", "temporal flickering score (weight-free, ours)", "temporal flickering score (ours)"


def review_order(scores: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The samples worst first (ties by id), and the order said in words."""
    col, _, name = quality_column(scores)
    ordered = (scores.assign(_key=scores[col].astype(float)).sort_values(["_key", "id"], na_position="last",
                                                                         kind="stable").drop(columns="_key"))
    return ordered.reset_index(drop=True), f"lowest {name} first"


def _scorer_verdict(row: pd.Series) -> str | None:
    """The tiny world's scorer on this clip: None when it did not run, else 'pass' or the attributes it failed."""
    if "adherence_all" not in row or _missing(row["adherence_all"]):
        return None
    if row["adherence_all"]:
        return "pass"
    failed = [k.removeprefix("adherence_") for k, v in row.items()
              if k.startswith("adherence_") and k != "adherence_all" and not _missing(v) and not v]
    return "fails " + ", ".join(failed)


def _flags(row: pd.Series) -> list[tuple[str, bool]]:
    """Badges of a clip as (text, alarming): the scorer failing a clip whose reference passes is what caching broke
    (alarming); a reference that fails too is the model's own miss, shown but not counted against the run."""
    verdict = _scorer_verdict(row)
    if verdict is None:
        return []
    ref = row.get("reference_adherence_all")
    if _missing(ref):
        return [] if verdict == "pass" else [(f"scorer {verdict}", True)]
    if verdict == "pass":
        return [] if ref else [("the reference fails the scorer, this clip passes", False)]
    return [(f"scorer {verdict}; the reference passes", True)] if ref else [(f"scorer {verdict} (the reference too)",
                                                                             False)]


def flagged(row: pd.Series) -> bool:
    return any(alarming for _, alarming in _flags(row))


# ---- plots ---------------------------------------------------------------------------------------------------


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
        ax.stackplot(range(n), share["F"], share["S"], share["R"],
                     labels=[STEP_NAMES["F"], STEP_NAMES["S"], "speculative, rejected"],
                     colors=["#9aa5b1", "#2e8b57", "#c0392b"])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1)
    ax.set_title(PLOTS["acceptance_per_step.png"])
    fig.tight_layout()
    fig.savefig(out / "acceptance_per_step.png", dpi=110)
    plt.close(fig)

    col, label, _ = quality_column(scores)
    for name, xcol, xlabel in (("speedup_vs_quality.png", "flops_speedup", "FLOPs speedup vs no caching (x)"),
                               ("quality_vs_steps.png", "full_steps_used", "steps computed in full")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        finite = scores[col].astype(float).replace([math.inf, -math.inf], float("nan"))
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


# ---- tables shared by the markdown and the page --------------------------------------------------------------


def sample_columns(scores: pd.DataFrame) -> list[tuple[str, str, Callable[[object], str]]]:
    """(column, header, formatter) of the per-sample table, for the columns this run has."""
    steps = int(scores["num_inference_steps"].max())
    cols = [("review", "#", lambda v: str(v)), ("id", "id", str), ("prompt", "prompt", str),
            ("psnr", "PSNR", lambda v: fmt(v, "db")), ("ssim", "SSIM", lambda v: fmt(v, "ssim")),
            ("lpips", "LPIPS", lambda v: fmt(v, "f4"))]
    cols += [(c, "VBench " + c.removeprefix("vbench_").replace("_", " "), lambda v: fmt(v, "f4"))
             for c in scores.columns if c.startswith("vbench_")]
    cols += [("flicker", "flicker score (ours)", lambda v: fmt(v, "f4")),
             ("adherence_all", "scorer", lambda v: "n/a" if _missing(v) else ("pass" if v else "fail")),
             ("flops_speedup", "FLOPs speedup", lambda v: fmt(v, "x")),
             ("full_steps_used", "steps in full", lambda v: f"{int(v)} / {steps}"),
             ("spec_accepted", "drafted", lambda v: fmt(v, "int")),
             ("device_seconds", "device time", lambda v: fmt(v, "s"))]
    return [c for c in cols if c[0] in scores or c[0] == "review"]


def _sort_key(v):
    """What the page sorts by: numbers as numbers (identical-to-reference PSNR as a large number), missing as null."""
    if _missing(v):
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and math.isinf(v):
        return 1e300 if v > 0 else -1e300
    return v.item() if hasattr(v, "item") else v


def _device_word(device: str) -> str:
    kinds = {d.strip().split(":")[0] for d in device.split(",")}
    return {frozenset({"cuda"}): "GPU", frozenset({"cpu"}): "CPU"}.get(frozenset(kinds), "device")


def run_rows(summary: dict) -> list[tuple[str, str]]:
    run = summary["run"]
    word = _device_word(str(run.get("device", "")))
    rows = [(label.replace("device seconds", f"{word} seconds"), fmt(run[key], kind)) for key, label, kind in RUN_FIELDS
            if key in run]
    return rows + [(k, fmt(v)) for k, v in run.items() if k not in {f[0] for f in RUN_FIELDS}]


def _vbench_rows(summary: dict) -> list[tuple[str, str, str]]:
    agg = summary.get("vbench")
    if not agg:
        return []
    note = " (partial)" if agg["partial"] else ""
    rows = [(d, fmt(agg["means"][d], "f4"), fmt(agg["normalized"][d], "pct")) for d in agg["ran"]]
    return rows + [("Quality score" + note, "", fmt(agg["quality"], "pct")),
                   ("Semantic score" + note, "", fmt(agg["semantic"], "pct")),
                   ("Total" + (" (partial: not computed)" if agg["partial"] else ""), "", fmt(agg["total"], "pct"))]


def fidelity_rows(summary: dict) -> list[tuple[str, str]]:
    return [(k, fmt(v, _fidelity_kind(k))) for k, v in (summary.get("fidelity") or {}).items()]


def _weight_free_rows(summary: dict) -> list[tuple[str, str]]:
    return [(k, fmt(v, "pct" if "adherence" in k else "f4")) for k, v in (summary.get("weight_free") or {}).items()]


def _headline(summary: dict, scores: pd.DataFrame) -> list[tuple[str, str]]:
    """The few numbers a reviewer wants before anything else."""
    run = summary["run"]
    tiles = [(fmt(run.get("FLOPs speedup (run)"), "x"), "FLOPs speedup"), (fmt(run.get("FLOPs saved"), "pct"),
                                                                          "FLOPs saved")]
    fid = summary.get("fidelity")
    if fid:
        tiles.append((fmt(fid["PSNR dB (mean over videos)"], "db"), "mean PSNR to reference"))
        tiles.append((fmt(fid["PSNR dB (worst video)"], "db"), "worst clip PSNR"))
    if "adherence_all" in scores:
        label = ("clips the scorer fails, reference passes" if "reference_adherence_all" in scores
                 else "clips the scorer fails")
        tiles.append((fmt(sum(flagged(r) for _, r in scores.iterrows()), "int"), label))
    tiles.append((fmt(run.get("device seconds per video (mean)"), "s"),
                  f"{_device_word(str(run.get('device', '')))} time per video"))
    if not _missing(run.get("samples per hour")):
        tiles.append((f"{run['samples per hour']:,.0f}", "samples per hour"))
    return tiles


def _md_table(headers: list[str], rows: list) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def _html_table(headers: list[str], rows: list, attrs: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def strip_name(sample_id: str, reference: bool = False) -> str:
    """File of a clip's strip inside the report folder; hashed, since ids need not be valid file names."""
    digest = hashlib.sha1(sample_id.encode()).hexdigest()[:16]
    return f"strips/{digest}{'-ref' if reference else ''}.jpg"


# ---- the page ------------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#1d232a}
h1{margin-bottom:0}.sub{color:#5b6570;margin-top:.2em;word-break:break-all}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #d5dbe1;padding:4px 8px;font-size:13px;
text-align:left;vertical-align:top}th{background:#eef2f6}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:1em 0}.tile{background:#f4f7fa;border-radius:6px;
padding:10px 14px;min-width:120px}.tile b{display:block;font-size:22px}.tile span{color:#5b6570;font-size:12px}
.note{background:#fff6d5;padding:8px;border-left:4px solid #e0b000}
.plots img{max-width:540px;margin:8px}
.gallery{display:grid;grid-template-columns:1fr;gap:12px}
.card{border:1px solid #d5dbe1;border-radius:6px;padding:10px}.card.flagged{border-color:#c0392b;
box-shadow:0 0 0 1px #c0392b}.card .head{display:flex;gap:8px;align-items:baseline;flex-wrap:wrap}
.rank{font-weight:bold;color:#5b6570}.metric{font-size:13px}.prompt{font-size:13px;color:#3d4650;margin:4px 0}
.badge{background:#c0392b;color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}.badge.mild{background:#7d8790}
.strips{display:flex;gap:10px;flex-wrap:wrap}figure{margin:4px 0}figcaption{font-size:12px;color:#5b6570}
figure img{height:72px;image-rendering:pixelated;border:1px solid #d5dbe1}.nostrip{font-size:12px;color:#8a949e}
.pat{display:flex;margin-top:6px}.pat i{width:8px;height:12px;margin-right:1px}
i.F{background:#9aa5b1}i.S{background:#2e8b57}i.R{background:#c0392b}
.legend i{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px}
#samples td{white-space:nowrap}#samples td:nth-child(3){white-space:normal;min-width:220px}
#samples th{cursor:pointer;user-select:none}#samples th.asc::after{content:" \\25B2"}
#samples th.desc::after{content:" \\25BC"}#pager button{margin:0 4px}
"""

# Sorting and paging of the per-sample table: the rows live as JSON in the page, one page is in the DOM at a time,
# so 10^4 samples stay light. `#sort=psnr` / `#sort=-psnr` (descending) and `&page=N` make a view linkable.
_SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById("samples-data").textContent);
  const table = document.getElementById("samples"), body = table.tBodies[0], pager = document.getElementById("pager");
  const heads = Array.from(table.tHead.rows[0].cells);
  let order = data.rows.map((_, i) => i), page = 0, sortCol = -1, desc = false;
  function cmp(a, b) {
    const x = data.keys[a][sortCol], y = data.keys[b][sortCol];
    if (x === y) return a - b;
    if (x === null) return 1;
    if (y === null) return -1;
    const c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
    return desc ? -c : c;
  }
  function render() {
    const pages = Math.max(1, Math.ceil(order.length / data.page));
    page = Math.min(Math.max(page, 0), pages - 1);
    body.replaceChildren();
    for (const i of order.slice(page * data.page, (page + 1) * data.page)) {
      const tr = body.insertRow();
      data.rows[i].forEach((text, j) => {
        const td = tr.insertCell();
        if (j === data.link) {
          const a = document.createElement("a");
          a.href = data.href[i]; a.textContent = text; td.appendChild(a);
        } else td.textContent = text;
      });
    }
    heads.forEach((th, j) => th.className = j === sortCol ? (desc ? "desc" : "asc") : "");
    const first = order.length ? page * data.page + 1 : 0, last = Math.min(order.length, (page + 1) * data.page);
    pager.querySelector("span").textContent =
      `rows ${first}-${last} of ${order.length.toLocaleString("en-US")} (page ${page + 1} of ${pages})`;
  }
  function sortBy(key, descending) {
    sortCol = data.cols.indexOf(key); desc = descending;
    order = data.rows.map((_, i) => i);
    if (sortCol >= 0) order.sort(cmp);
  }
  function fromHash() {
    const p = new URLSearchParams(location.hash.slice(1)), s = p.get("sort") || "review";
    sortBy(s.replace(/^-/, ""), s.startsWith("-"));
    page = (parseInt(p.get("page"), 10) || 1) - 1;
    render();
  }
  function toHash() {
    const key = sortCol >= 0 ? data.cols[sortCol] : "review";
    history.replaceState(null, "", `#sort=${desc ? "-" : ""}${key}&page=${page + 1}`);
  }
  heads.forEach((th, j) => th.addEventListener("click", () => {
    sortBy(data.cols[j], j === sortCol ? !desc : false); page = 0; render(); toHash();
  }));
  pager.querySelector(".prev").addEventListener("click", () => { page--; render(); toHash(); });
  pager.querySelector(".next").addEventListener("click", () => { page++; render(); toHash(); });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""


def _pattern_html(pattern: str) -> str:
    cells = "".join(f'<i class="{c}" title="step {i + 1}: {STEP_NAMES.get(c, c)}"></i>' for i, c in enumerate(pattern))
    return f'<div class="pat" aria-label="step pattern {html.escape(pattern)}">{cells}</div>'


def _card(rank: int, row: pd.Series, inputs: ReportInputs, videos_href: str, written: set[str]) -> str:
    sid = str(row["id"])
    video = f"{videos_href}/{quote(sid)}.mp4"
    metrics = []
    if "psnr" in row:
        metrics.append(f"PSNR {fmt(row['psnr'], 'db')}")
    if "ssim" in row:
        metrics.append(f"SSIM {fmt(row['ssim'], 'ssim')}")
    metrics += [f"{c.removeprefix('vbench_').replace('_', ' ')} {fmt(row[c], 'f4')}"
                for c in row.index if c.startswith("vbench_")]
    metrics.append(f"{fmt(row['flops_speedup'], 'x')} FLOPs")
    metrics.append(f"{int(row['full_steps_used'])} of {int(row['num_inference_steps'])} steps in full")
    flags = _flags(row)

    def figure(name: str, href: str | None, caption: str) -> str:
        if name not in written:
            return f'<figure><div class="nostrip">no frames</div><figcaption>{caption}</figcaption></figure>'
        img = f'<img src="{name}" alt="{html.escape(caption)} frames of {html.escape(sid)}" loading="lazy">'
        if href:
            img = f'<a href="{html.escape(href)}">{img}</a>'
        return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"

    ref_href = (f"{inputs.reference_videos_href}/{quote(sid)}.mp4" if inputs.reference_videos_href else None)
    figs = figure(strip_name(sid), video, "this run")
    if inputs.reference_strips:
        figs += figure(strip_name(sid, reference=True), ref_href, "reference (uncached)")
    return (f'<div class="card{" flagged" if flagged(row) else ""}" id="g{rank}" data-id="{html.escape(sid)}">'
            f'<div class="head"><span class="rank">#{rank}</span><a href="{html.escape(video)}">{html.escape(sid)}</a>'
            f'<span class="metric">{html.escape(" · ".join(metrics))}</span>'
            + "".join(f'<span class="badge{"" if alarming else " mild"}">{html.escape(text)}</span>'
                      for text, alarming in flags) +
            f'</div><div class="prompt">{html.escape(str(row["prompt"]))}</div><div class="strips">{figs}</div>'
            f'{_pattern_html(str(row["step_pattern"] or ""))}</div>')


def _json_script(obj) -> str:
    """JSON safe inside <script>: no '</' can close the element early."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def write_report(scores: pd.DataFrame, summary: dict, out: Path, inputs: ReportInputs | None = None,
                 videos_href: str = "../videos") -> list[str]:
    """Write plots, strips, report.md and index.html into `out`; returns the file names written (relative)."""
    inputs = inputs or ReportInputs()
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(scores, out)
    ordered, order_text = review_order(scores)
    ordered.insert(0, "review", range(1, len(ordered) + 1))
    shown = ordered.head(inputs.gallery)

    written: set[str] = set()
    for sid in shown["id"]:
        for strips, ref in ((inputs.strips, False), (inputs.reference_strips, True)):
            if sid in strips:
                name = strip_name(str(sid), reference=ref)
                (out / name).parent.mkdir(exist_ok=True)
                (out / name).write_bytes(strips[sid])
                written.add(name)

    n = len(ordered)
    gallery_text = (f"The {len(shown):,} of {n:,} samples to look at first, {order_text}; the other "
                    f"{n - len(shown):,} are in the table below." if n > len(shown) else
                    f"All {n:,} samples, {order_text}.")
    columns = sample_columns(ordered)
    cells = [[f(r[c]) for c, _, f in columns] for _, r in ordered.iterrows()]
    run_table, vb_rows, fid_rows = run_rows(summary), _vbench_rows(summary), fidelity_rows(summary)
    wf_rows = _weight_free_rows(summary)
    config_rows = [(k, _config_value(v)) for k, v in _flatten(summary.get("config") or {})]
    partial_note = ""
    agg = summary.get("vbench")
    if agg and agg["partial"]:
        partial_note = (f"Partial VBench evaluation: {len(agg['ran'])} of 16 dimensions ran "
                        f"({', '.join(agg['ran'])}); missing dimensions are not counted, Total is not computed.")
    title = str(summary["run"].get("output", ""))

    # report.md: the same content, no images.
    md = [f"# Evaluation report: {title}", "",
          " · ".join(f"**{v}** {k}" for v, k in _headline(summary, scores)), "", "## Look at these first", "",
          gallery_text, ""]
    if len(shown):
        md.append(_md_table(["#", "id", *[h for c, h, _ in columns if c not in ("review", "id", "prompt")],
                             "flags", "step pattern", "video", "reference video"],
                            [[r["review"], r["id"], *[f(r[c]) for c, _, f in columns if c not in ("review", "id",
                                                                                                  "prompt")],
                              "; ".join(text for text, _ in _flags(r)) or "-", f"`{r['step_pattern']}`",
                              f"[mp4]({videos_href}/{quote(str(r['id']))}.mp4)",
                              f"[mp4]({inputs.reference_videos_href}/{quote(str(r['id']))}.mp4)"
                              if inputs.reference_videos_href else "-"] for _, r in shown.iterrows()]))
    md += ["", "## Run and cost", "", _md_table(["field", "value"], run_table), "", "## VBench", ""]
    md += [partial_note, ""] if partial_note else []
    md += [_md_table(["dimension", "raw mean", "normalised"], vb_rows) if vb_rows else "VBench was not run.", "",
           "## Fidelity to the uncached reference", "",
           _md_table(["measure", "value"], fid_rows) if fid_rows else "No reference run given.", "",
           "## Weight-free checks", "", _md_table(["measure", "value"], wf_rows), ""]
    md += [f"## {PLOTS[p]}\n\n![{PLOTS[p]}]({p})\n" for p in plots]
    md += ["## Samples", "", f"All {n:,} samples, {order_text}.", "",
           _md_table([h for _, h, _ in columns],
                     [[c[0], f"[{c[1]}]({videos_href}/{quote(str(sid))}.mp4)", *c[2:]]
                      for c, sid in zip(cells, ordered["id"])]), "",
           "## Configuration", "", _md_table(["setting", "value"], config_rows), ""]
    (out / "report.md").write_text("\n".join(md))

    # index.html
    keys = [c for c, _, _ in columns]
    data = {"cols": keys, "page": inputs.table_page, "link": keys.index("id"), "rows": cells,
            "keys": [[_sort_key(r[c]) for c in keys] for _, r in ordered.iterrows()],
            "href": [f"{videos_href}/{quote(str(s))}.mp4" for s in ordered["id"]]}
    first_page = [[html.escape(v) if j != data["link"] else
                   f'<a href="{html.escape(data["href"][i])}">{html.escape(v)}</a>' for j, v in enumerate(row)]
                  for i, row in enumerate(cells[:inputs.table_page])]
    table_head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    table_body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in first_page)
    legend = "".join(f'<i class="{c}"></i>{html.escape(name)}' for c, name in STEP_NAMES.items())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Run report: "
        f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation report</h1><p class='sub'>{html.escape(title)}</p>",
        "<div class='tiles'>" + "".join(f"<div class='tile'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>"
                                         for v, k in _headline(summary, scores)) + "</div>",
        f"<h2 id='gallery'>Look at these first</h2><p>{html.escape(gallery_text)}</p>",
    ]
    if len(shown):
        parts.append(f"<p class='legend'>Step pattern:{legend}</p><div class='gallery'>"
                     + "".join(_card(int(r["review"]), r, inputs, videos_href, written) for _, r in shown.iterrows())
                     + "</div>")
    parts += ["<h2 id='run'>Run and cost</h2>", _html_table(["field", "value"], run_table),
              "<h2 id='vbench'>VBench</h2>"]
    if partial_note:
        parts.append(f"<p class='note'>{html.escape(partial_note)}</p>")
    parts.append(_html_table(["dimension", "raw mean", "normalised"], vb_rows) if vb_rows
                 else "<p>VBench was not run.</p>")
    parts.append("<h2 id='fidelity'>Fidelity to the uncached reference</h2>")
    parts.append(_html_table(["measure", "value"], fid_rows) if fid_rows else "<p>No reference run given.</p>")
    parts += ["<h2 id='weight-free'>Weight-free checks</h2>", _html_table(["measure", "value"], wf_rows)]
    parts.append("<h2>Plots</h2><div class='plots'>"
                 + "".join(f"<img src='{p}' alt='{html.escape(PLOTS[p])}'>" for p in plots) + "</div>")
    parts += [f"<h2 id='samples-title'>Samples</h2><p>All {n:,} samples, {html.escape(order_text)}; "
              "click a column to sort, click again to reverse.</p>",
              "<div id='pager'><button class='prev'>&lsaquo; previous</button><span></span>"
              "<button class='next'>next &rsaquo;</button></div>",
              f"<table id='samples'><thead><tr>{table_head}</tr></thead><tbody>{table_body}</tbody></table>",
              "<noscript><p>Sorting and paging need JavaScript; report.md lists every sample.</p></noscript>",
              "<h2 id='config'>Configuration</h2>", _html_table(["setting", "value"], config_rows),
              f"<script id='samples-data' type='application/json'>{_json_script(data)}</script>",
              f"<script>{_SCRIPT}</script></body></html>"]
    (out / "index.html").write_text("\n".join(parts))
    return [*plots, *sorted(written), "report.md", "index.html"]
