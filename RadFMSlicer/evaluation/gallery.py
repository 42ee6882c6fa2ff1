"""``RUN/index.html``: one self-contained page to find and inspect failures, offline.

Everything is inline (CSS, script, thumbnails as base64 JPEG, one per distinct montage), so
the file can be mailed, archived next to the run or opened from a USB stick; a click on a
thumbnail opens the full-size montage from the run folder. The table sorts by any column and
filters by task, by each extra manifest column and by text, and shows :data:`PAGE_ROWS` cases
a page, so a run of 10,000 cases opens and sorts at once; a click on a case opens what the
model received (the ``radfm preview`` montage), the answer beside the reference with a
word-level diff (``difflib``), the scores and the provenance. A comparison page shows two
runs' answers side by side with their score deltas.
"""

import base64
import difflib
import html
import io
import json
import os
from pathlib import Path

from PIL import Image

from .. import storage
from ..imaging import describe_window
from ..session import DISCLAIMER
from .metrics import case_score, score_keys, table

THUMB_WIDTH = 960  # px; the montage is downscaled to this for the page (its 64 px tiles stay near full size)
THUMB_QUALITY = 80
PAGE_ROWS = 200  # cases in the table at once: the browser lays out a page, not the whole run


def word_diff(reference: str, answer: str) -> list[list[str]]:
    """``[[op, text], ...]`` from reference to answer, op ``=``, ``-`` (only in reference) or ``+`` (only in answer)."""
    ref, ans = reference.split(), answer.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=ans, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(["=", " ".join(ref[i1:i2])])
            continue
        if i2 > i1:
            out.append(["-", " ".join(ref[i1:i2])])
        if j2 > j1:
            out.append(["+", " ".join(ans[j1:j2])])
    return out


def _thumbnail(path: Path) -> str | None:
    """The montage as a data URI, downscaled to :data:`THUMB_WIDTH` (None if it is missing)."""
    if not path.is_file():
        return None
    image = Image.open(path).convert("RGB")
    if image.width > THUMB_WIDTH:
        image = image.resize((THUMB_WIDTH, round(image.height * THUMB_WIDTH / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class Thumbnails:
    """The page's thumbnails: each montage file drawn once however many cases show it (a run asks
    many questions of one scan), identical pictures sharing one id."""

    def __init__(self, page_dir: Path):
        self.page_dir = page_dir
        self.ids: dict[str, str] = {}  # data URI -> id
        self.of_file: dict[Path, str | None] = {}

    def view(self, path: Path) -> dict:
        """``{"thumb": id or None, "full": the montage's path from the page}``."""
        if path not in self.of_file:
            uri = _thumbnail(path)
            self.of_file[path] = None if uri is None else self.ids.setdefault(uri, f"t{len(self.ids)}")
        return {"thumb": self.of_file[path], "full": Path(os.path.relpath(path, self.page_dir)).as_posix()}

    def table(self) -> dict:
        return {key: uri for uri, key in self.ids.items()}


def _case_view(record: dict, run_dir: Path, thumbs: Thumbnails, images: bool = True) -> dict:
    """What the page needs of one case record; thumbnails shared by id.

    ``images=False`` leaves the montages out (no thumbnail made, ``images`` empty): run B of a
    comparison, whose answers the page shows but whose montages it never does.
    """
    views = []
    for seen in (record.get("seen") or []) if images else []:
        views.append({"label": seen.get("label"), "role": seen.get("role"), "source": seen.get("source"),
                      "shape": seen.get("shape"), "window": describe_window(seen["window"]) if seen.get("window") else None,
                      **(thumbs.view(run_dir / seen["preview_png"]) if seen.get("preview_png") else {"thumb": None})})
    provenance = record.get("provenance") or {}
    looked = provenance.get("attention")
    if images and looked and looked.get("thumbnail"):
        views.append({"label": looked["label"], "role": "attention", "source": looked["file"], "shape": None,
                      "window": None, **thumbs.view(run_dir / looked["thumbnail"])})
    return {
        "id": record["id"], "task": record["task"], "question": record.get("question"),
        "reference": record.get("reference", ""), "answer": record.get("answer"), "error": record.get("error"),
        "scores": {k: v for k, v in (record.get("scores") or {}).items() if isinstance(v, (int, float))},
        "score": case_score(record.get("scores")), "extra": record.get("extra") or {},
        "diff": word_diff(record.get("reference", ""), record["answer"]) if "answer" in record else [],
        "images": views, "prompt": record.get("prompt"), "case_s": record.get("case_s"),
        "model": provenance.get("model"), "timing": provenance.get("timing"), "settings": provenance.get("settings"),
    }


def write_gallery(run_dir: "str | Path", records: list[dict], summary: dict, out: "str | Path | None" = None,
                  compare: dict | None = None, other_records: list[dict] | None = None) -> Path:
    """Write the page for one run (``records`` from ``cases.jsonl``), or for a comparison.

    ``compare`` (from :func:`~RadFMSlicer.evaluation.compare.compare_runs`) and
    ``other_records`` (run B's cases) turn it into the side-by-side view.
    """
    run_dir = Path(run_dir)
    out = Path(out or run_dir / "index.html")
    thumbs = Thumbnails(out.parent.absolute())
    cases = [_case_view(r, run_dir.absolute(), thumbs) for r in records]
    if compare is not None:
        b_dir = Path(compare["b"]["run"])
        b_cases = {r["id"]: _case_view(r, b_dir, thumbs, images=False) for r in other_records or []}
        deltas = {c["id"]: c["delta"] for c in compare["per_case"]}
        for case in cases:
            b = b_cases.get(case["id"])
            case["b"] = None if b is None else {k: b[k] for k in ("answer", "error", "scores", "score", "diff", "model")}
            case["delta"] = case_score(deltas.get(case["id"]))
    keys = list(compare["metrics"]) if compare else score_keys([c["scores"] for c in cases])
    names = {"a": run_dir.name, "b": Path(compare["b"]["run"]).name} if compare else None
    data = {"summary": summary, "cases": cases, "thumbs": thumbs.table(), "page_rows": PAGE_ROWS,
            "metric_table": table(), "metric_keys": keys, "names": names,
            "compare": compare and {k: compare[k] for k in ("a", "b", "cases", "metrics")},
            "disclaimer": DISCLAIMER}
    payload = json.dumps(data).replace("</", "<\\/")
    title = (f"RadFM comparison: {run_dir.name} vs {Path(compare['b']['run']).name}" if compare
             else f"RadFM evaluation: {run_dir.name}")
    page = PAGE.replace("{{title}}", html.escape(title)).replace("{{data}}", payload)
    storage.write_text(out, page)
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:12px 20px}
header h1{font-size:18px;margin:0 0 4px}
.note{background:#fff3cd;color:#664d03;padding:8px 20px;border-bottom:1px solid #e6d8a5}
.disclaimer{color:#c7ccd6;font-size:12px}
main{padding:12px 20px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e3e6eb;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;cursor:pointer;user-select:none;white-space:nowrap}
table.summary{width:auto}.summary td{padding-right:24px}th.num{text-align:right}
th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}
tr.case:hover{background:#f0f4ff;cursor:pointer}
tr.failed td{color:#a11}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{background:#fde2e1}.good{background:#dcf5e3}
.controls{display:flex;gap:12px;flex-wrap:wrap;align-items:center;margin:8px 0 12px}
.controls label{font-size:13px}
.detail td{background:#fafbfc}
.detail .cols{display:flex;gap:18px;flex-wrap:wrap}
.detail .col{flex:1 1 320px;min-width:280px}
.detail .seen{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:10px}
.detail .seen figure{margin:0;max-width:100%}
.detail img{max-width:100%;border:1px solid #ccd;display:block;margin:4px 0}
.pager{display:flex;gap:8px;align-items:center;margin:8px 0}
.diff del{background:#fdd;text-decoration:line-through;color:#900}
.diff ins{background:#dfd;text-decoration:none;color:#060}
pre{white-space:pre-wrap;background:#f0f1f4;padding:6px;font-size:12px;margin:4px 0}
.summary td,.summary th{cursor:default}
h2{font-size:15px;margin:16px 0 6px}
.muted{color:#667}
</style></head>
<body>
<header><h1 id="title"></h1><div id="provenance" class="disclaimer"></div><div id="disclaimer" class="disclaimer"></div></header>
<div id="note" class="note" hidden></div>
<main>
<h2>Scores (mean and 95% bootstrap interval)</h2><table class="summary" id="summary"></table>
<h2>Cases <span id="count" class="muted"></span></h2>
<div class="controls" id="controls"><label>Task <select id="f-task"><option value="">all</option></select></label>
<label>Search <input id="f-text" type="search" placeholder="id, answer, reference"></label></div>
<table id="cases"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<div class="pager"><button id="prev">&larr; previous</button><span id="page" class="muted"></span><button id="next">next &rarr;</button></div>
</main>
<script type="application/json" id="data">{{data}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const C = D.compare, cases = D.cases, extraKeys = [...new Set(cases.flatMap(c => Object.keys(c.extra)))].sort();
const el = (tag, attrs = {}, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "text") e.textContent = v; else e.setAttribute(k, v); }
  kids.forEach(k => e.append(k)); return e; };
const fmt = (v, d = 1) => v === null || v === undefined ? "" : (typeof v === "number" ? v.toFixed(d) : String(v));
// a metric's value as the table of metrics says (every score 0-100 but RadCliQ; its decimals)
const T = D.metric_table, K = D.metric_keys, label = k => T[k] ? T[k].label : k;
const metricText = (k, v, sign = false) => v === null || v === undefined ? "" : !T[k] ? fmt(v)
  : ((sign && v > 0) ? "+" : "") + v.toFixed(T[k].digits);
const N = D.names;
document.getElementById("title").textContent = document.title;
document.getElementById("disclaimer").textContent = D.disclaimer;
const model = C ? `A: ${C.a.run} (${C.a.dtype}${C.a.quantization ? ", " + C.a.quantization : ""})  vs  B: ${C.b.run} (${C.b.dtype}${C.b.quantization ? ", " + C.b.quantization : ""})`
  : `model ${(D.summary.model || {}).checkpoint} (${(D.summary.model || {}).dtype}), manifest ${D.summary.manifest}`;
document.getElementById("provenance").textContent = model;
if (D.summary.note) { const n = document.getElementById("note"); n.hidden = false; n.textContent = "Note: " + D.summary.note; }
// summary table
(function summary() {
  const t = document.getElementById("summary");
  if (C) {
    t.append(el("tr", {}, ...["metric", "cases", `A (${N.a})`, `B (${N.b})`, "B - A", "95% paired CI",
      "p (approximate randomization)", "scores changed"].map((h, i) => el("th", {text: h, class: i ? "num" : ""}))));
    for (const [m, s] of Object.entries(C.metrics))
      t.append(el("tr", {}, el("td", {text: label(m)}), el("td", {class: "num", text: s.n}), el("td", {class: "num", text: metricText(m, s.mean_a)}),
        el("td", {class: "num", text: metricText(m, s.mean_b)}), el("td", {class: "num", text: metricText(m, s.delta, true)}),
        el("td", {class: "num", text: `[${metricText(m, s.ci95[0], true)}, ${metricText(m, s.ci95[1], true)}]`}),
        el("td", {class: "num", text: fmt(s.p, 4)}), el("td", {class: "num", text: s.changed})));
    return;
  }
  const groups = [["overall", D.summary.metrics.overall], ...Object.entries(D.summary.metrics.by_task)];
  t.append(el("tr", {}, ...["group", "cases", ...K.map(label)].map((h, i) => el("th", {text: h, class: i ? "num" : ""}))));
  for (const [name, g] of groups) {
    const cell = m => g[m] ? `${metricText(m, g[m].mean)} [${metricText(m, g[m].ci95[0])}, ${metricText(m, g[m].ci95[1])}]` : "";
    t.append(el("tr", {}, el("td", {text: name}), el("td", {class: "num", text: g.cases}),
      ...K.map(m => el("td", {class: "num", text: cell(m)}))));
  }
  const f = D.summary.cases; t.append(el("tr", {}, el("td", {colspan: K.length + 2, class: "muted",
    text: `${f.answered} answered, ${f.failed} failed${f.not_run ? ", " + f.not_run + " not run" : ""}; every score 0-100`})));
  for (const text of D.summary.metric_notes || []) t.append(el("tr", {}, el("td", {colspan: K.length + 2, class: "muted", text: "Note: " + text})));
})();
// columns: [label, value(case), numeric, metric key (its values shown as the table of metrics says)]
const cols = [["id", c => c.id, false], ["task", c => c.task, false]];
const answerOf = c => c.error ? "FAILED: " + c.error : c.answer;
if (C) cols.push([`score A (${N.a})`, c => c.score, true], [`score B (${N.b})`, c => c.b && c.b.score, true], ["B - A", c => c.delta, true],
  ["answers", c => !c.b ? "" : (c.b.answer === c.answer ? "same" : "differ"), false]);
else cols.push(["score", c => c.score, true], ...K.map(k => [label(k), c => c.scores[k], true, k]));
extraKeys.forEach(k => cols.push([k, c => c.extra[k], false]));
if (C) cols.push([`answer A (${N.a})`, answerOf, false], [`answer B (${N.b})`, c => !c.b ? "" : answerOf(c.b), false]);
else cols.push(["answer", answerOf, false]);
let sortCol = 2, sortDir = 1;  // worst first
const head = document.getElementById("head");
cols.forEach(([label, , numeric], i) => { const th = el("th", {text: label, "data-col": i, class: numeric ? "num" : ""});
  th.onclick = () => { sortDir = sortCol === i ? -sortDir : 1; sortCol = i; pageNo = 0; render(); }; head.append(th); });
const filters = {task: document.getElementById("f-task"), text: document.getElementById("f-text")};
[...new Set(cases.map(c => c.task))].sort().forEach(t => filters.task.append(el("option", {value: t, text: t})));
for (const k of extraKeys) {
  const s = el("select", {"data-key": k}, el("option", {value: "", text: "all"}));
  [...new Set(cases.map(c => c.extra[k]).filter(v => v !== undefined).map(String))].sort().forEach(v => s.append(el("option", {value: v, text: v})));
  document.getElementById("controls").append(el("label", {text: k + " "}, s)); filters[k] = s;
}
let pageNo = 0;
Object.values(filters).forEach(f => f.addEventListener("input", () => { pageNo = 0; render(); }));
document.getElementById("prev").onclick = () => { pageNo--; render(); };
document.getElementById("next").onclick = () => { pageNo++; render(); };
const open = new Set();
function diffView(diff) { const p = el("div", {class: "diff"});
  for (const [op, text] of diff) { p.append(op === "=" ? text : el(op === "-" ? "del" : "ins", {text}), " "); } return p; }
function detail(c) {
  const cols = el("div", {class: "cols"});
  const seen = el("div", {class: "seen"});
  for (const im of c.images) { const fig = el("figure", {}, el("figcaption", {class: "muted", text: `${im.label} (${im.role}): ${im.source}`
      + (im.shape ? `, tensor ${JSON.stringify(im.shape)}` : "") + (im.window ? `, window ${im.window}` : "")}));
    if (im.thumb) fig.append(el("a", {href: im.full, target: "_blank", title: "open the full-size montage"},
      el("img", {src: D.thumbs[im.thumb], alt: "model input montage"})));
    seen.append(fig); }
  if (!c.images.length) seen.append(el("div", {class: "muted", text: "nothing: the case failed before the model ran"}));
  const text = el("div", {class: "col"});
  if (c.question) text.append(el("b", {text: "Question"}), el("pre", {text: c.question}));
  text.append(el("b", {text: "Reference"}), el("pre", {text: c.reference}));
  if (c.error) text.append(el("b", {text: "Error"}), el("pre", {text: c.error}));
  const answers = C ? [[`A (${N.a})`, c], [`B (${N.b})`, c.b || {}]] : [["", c]];
  for (const [name, a] of answers) {
    if (a.answer === undefined || a.answer === null) { if (name) text.append(el("b", {text: `Answer ${name}: not answered` + (a.error ? " (" + a.error + ")" : "")})); continue; }
    text.append(el("b", {text: `Answer ${name}`.trim()}), el("pre", {text: a.answer}),
      el("b", {text: "Word diff, reference to answer (struck: missing from the answer; green: added)"}), diffView(a.diff),
      el("div", {class: "muted", text: "scores: " + Object.entries(a.scores).map(([k, v]) => `${label(k)} ${metricText(k, v)}`).join(", ")}));
  }
  const prov = el("div", {class: "col"}, el("b", {text: "Provenance"}),
    el("pre", {text: JSON.stringify({model: c.model, settings: c.settings, timing: c.timing, case_s: c.case_s, extra: c.extra}, null, 1)}));
  if (c.prompt) prov.append(el("b", {text: "Prompt"}), el("pre", {text: c.prompt}));
  cols.append(text, prov);
  return el("div", {}, el("b", {text: "What the model received (click a picture for the full-size montage)"}), seen, cols);
}
function render() {
  const q = filters.text.value.toLowerCase();
  const shown = cases.filter(c => (!filters.task.value || c.task === filters.task.value)
    && extraKeys.every(k => !filters[k].value || String(c.extra[k]) === filters[k].value)
    && (!q || [c.id, c.answer, c.reference, c.error].some(v => v && String(v).toLowerCase().includes(q))));
  const [, value, numeric] = cols[sortCol];
  shown.sort((a, b) => { const x = value(a), y = value(b);
    if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
    return (numeric ? x - y : String(x).localeCompare(String(y))) * sortDir; });
  head.querySelectorAll("th").forEach((th, i) => { th.classList.toggle("asc", i === sortCol && sortDir > 0);
    th.classList.toggle("desc", i === sortCol && sortDir < 0); });
  const body = document.getElementById("body"); body.replaceChildren();
  const pages = Math.max(1, Math.ceil(shown.length / D.page_rows));
  pageNo = Math.min(Math.max(pageNo, 0), pages - 1);
  const first = pageNo * D.page_rows, page = shown.slice(first, first + D.page_rows);
  document.getElementById("prev").disabled = pageNo === 0;
  document.getElementById("next").disabled = pageNo === pages - 1;
  document.getElementById("page").textContent = shown.length ? `cases ${first + 1}-${first + page.length} of ${shown.length}, page ${pageNo + 1} of ${pages}` : "";
  for (const c of page) {
    const tr = el("tr", {class: "case" + (c.error ? " failed" : ""), "data-id": c.id});
    cols.forEach(([heading, v, numeric, key]) => { const x = v(c);
      const td = el("td", {class: numeric ? "num" : "", text: key ? metricText(key, x) : numeric ? fmt(x) : (x === undefined || x === null ? "" : String(x).slice(0, 120))});
      if (heading === "B - A" && x) td.classList.add(x < 0 ? "bad" : "good"); tr.append(td); });
    tr.onclick = () => { open.has(c.id) ? open.delete(c.id) : open.add(c.id); render(); };
    body.append(tr);
    if (open.has(c.id)) body.append(el("tr", {class: "detail"}, el("td", {colspan: cols.length}, detail(c))));
  }
  document.getElementById("count").textContent = `(${shown.length} of ${cases.length} shown; click a column to sort, a case to open it)`;
}
render();
</script></body></html>
"""
