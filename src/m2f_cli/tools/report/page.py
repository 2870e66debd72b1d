"""The page of ``m2f report``: HTML, inline SVG plots and the gallery's filters, in one string.

Nothing is fetched when the page opens (no CDN, no fonts, no scripts from elsewhere): the plots are
SVG drawn here, the filters and pagination a few lines of inline JavaScript over cards that are
already in the HTML (so the gallery also reads without JavaScript, all cards shown). Every string
that comes from the outputs (paths, labels, errors) is escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from typing import TYPE_CHECKING, Optional
from urllib.parse import quote

from m2f_cli.tools.report.stats import AREA_DECADES, AREA_PER_DECADE, COUNT_BINS, SCORE_BINS

if TYPE_CHECKING:
    from m2f_cli.tools.report.stats import Candidates, Stats

PAGE_SIZE = 48          # gallery cards per page
SMALL_MULTIPLES = 24    # classes with their own score histogram (the most frequent)
BAR_ROWS = 40           # classes in the per-class count chart

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d232a;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#b8c0cc;font-size:13px;word-break:break-all}
main{padding:8px 24px 40px;max-width:1400px}section{margin:22px 0}h2{font-size:17px;margin:0 0 8px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{background:#fff;border:1px solid #dde1e6;border-radius:6px;
padding:8px 14px;min-width:110px}.tile b{display:block;font-size:20px}.tile span{color:#5b6572;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:0 40px;align-items:flex-start}.tile.bad b{color:#b42318}.tile.warn b{color:#b54708}.tile.ok b{color:#067647}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #dde1e6;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#eef0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.path{word-break:break-all}.err{color:#b42318}.note{color:#5b6572;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plot{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px}
.plot h3{font-size:13px;margin:0 0 4px}.plot .note{max-width:400px}.multiples{display:flex;flex-wrap:wrap;gap:8px}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;background:#fff;border:1px solid #dde1e6;
border-radius:6px;padding:8px 12px;margin-bottom:10px}.filters input[type=number]{width:5em}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:10px}
.card{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:6px;overflow:hidden;display:flex;
flex-direction:column}.card .thumb{height:160px;display:flex;align-items:center;justify-content:center;background:#2a3038}
.card img{max-width:100%;max-height:160px;display:block}.card figcaption{padding:5px 8px;font-size:12px}
.card .name{display:block;font-weight:600;word-break:break-all}.card .cls{color:#5b6572}
.card.failed .thumb{background:#fbe9e7;color:#b42318;font-weight:600}
[hidden]{display:none!important}.state-ok{color:#067647}.state-bad{color:#b42318;font-weight:600}
.state-warn{color:#b54708}svg text{font:11px system-ui,sans-serif;fill:#3c4550}
"""

SCRIPT = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('#gallery .card'));
  var $ = function (id) { return document.getElementById(id); };
  var PAGE = %d, page = 0, shown = cards;
  cards.forEach(function (c) { c.inst = JSON.parse(c.getAttribute('data-inst') || '[]'); });
  function num(id, dflt) { var v = parseFloat($(id).value); return isNaN(v) ? dflt : v; }
  function matches(c) {
    var show = $('f-show').value, cls = $('f-class').value, lo = num('f-lo', 0), hi = num('f-hi', 1);
    var failed = c.getAttribute('data-failed') === '1', narrowed = cls !== '' || lo > 0 || hi < 1;
    if (show === 'failed') return failed;
    if (failed) return show === 'all' && !narrowed;
    if (show === 'empty') return c.inst.length === 0;
    if (show === 'instances' && c.inst.length === 0) return false;
    if (!narrowed) return true;
    return c.inst.some(function (i) {
      return (cls === '' || i[0] === cls) && (i[1] === null || (i[1] >= lo && i[1] <= hi));
    });
  }
  function render() {
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.max(0, Math.min(page, pages - 1));
    cards.forEach(function (c) { c.hidden = true; });
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach(function (c) { c.hidden = false; });
    $('f-count').textContent = shown.length + ' of ' + cards.length + ' sampled images match, page ' +
      (page + 1) + ' of ' + pages;
    $('f-prev').disabled = page === 0;
    $('f-next').disabled = page >= pages - 1;
  }
  function apply() { shown = cards.filter(matches); page = 0; render(); }
  ['f-show', 'f-class', 'f-lo', 'f-hi'].forEach(function (id) {
    $(id).addEventListener('input', apply); $(id).addEventListener('change', apply);
  });
  $('f-prev').addEventListener('click', function () { page--; render(); });
  $('f-next').addEventListener('click', function () { page++; render(); });
  $('f-reset').addEventListener('click', function () {
    $('f-show').value = 'all'; $('f-class').value = ''; $('f-lo').value = '0'; $('f-hi').value = '1'; apply();
  });
  apply();
})();
""" % PAGE_SIZE


def e(x) -> str:
    return html.escape(str(x), quote=True)


def href(rel: str) -> str:
    """A relative link to a file whose name comes from the outputs (spaces, #, ? and % quoted)."""
    return e(quote(rel, safe="/.-_~"))


def hex_color(category_id: int) -> str:
    from m2f_cli.model.categories import _color
    return "#%02x%02x%02x" % _color(category_id)


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


# ---------------------------------------------------------------------------------------------
# SVG plots


def histogram_svg(counts: list, ticks: list, color: str = "#4f7cac", width: int = 360, height: int = 130,
                  marker: Optional[float] = None, bar_titles: Optional[list] = None, log: bool = False,
                  behind: Optional[list] = None) -> str:
    """Vertical bars. ticks: (bin position 0..len(counts), text); marker: a dashed line at that
    bin position (the threshold); log: bar heights on a log scale (counts of very unequal sizes);
    behind: a second series drawn in grey behind the bars (all candidates behind the kept ones)."""
    left, bottom, top = 34, 18, 8
    w, h = width - left - 14, height - bottom - top  # room on the right for the last tick's text
    n = max(1, len(counts))
    peak = max(list(counts) + list(behind or []), default=0) or 1
    scale = (lambda c: math.log1p(c) / math.log1p(peak)) if log else (lambda c: c / peak)
    bw = w / n
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">']
    out.append(f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#8a94a0"/>')
    out.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{fmt(peak)}</text>')
    out.append(f'<text x="{left - 4}" y="{top + h}" text-anchor="end">0</text>')
    for i, c in enumerate(behind or []):
        if c:
            bh = max(1.0, scale(c) * h)
            tip = f"{bar_titles[i]}: " if bar_titles else ""
            out.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + h - bh:.1f}" width="{max(0.5, bw - 1):.1f}" '
                       f'height="{bh:.1f}" fill="#cfd4db"><title>{e(tip)}{c:,} candidates</title></rect>')
    for i, c in enumerate(counts):
        if not c:
            continue
        bh = max(1.0, scale(c) * h)
        tip = f"{bar_titles[i]}: " if bar_titles else ""
        out.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + h - bh:.1f}" width="{max(0.5, bw - 1):.1f}" '
                   f'height="{bh:.1f}" fill="{color}"><title>{e(tip)}{c:,}</title></rect>')
    for pos, text in ticks:
        x = left + pos * bw
        out.append(f'<line x1="{x:.1f}" y1="{top + h}" x2="{x:.1f}" y2="{top + h + 3}" stroke="#8a94a0"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle">{e(text)}</text>')
    if marker is not None:
        x = left + marker * bw
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" stroke="#b42318" '
                   f'stroke-dasharray="3,2"><title>threshold</title></line>')
    out.append("</svg>")
    return "".join(out)


def bars_svg(rows: list, width: int = 560) -> str:
    """Horizontal bars: rows of (label, value, colour)."""
    label_w, row_h, top = 150, 18, 4
    bar_w = width - label_w - 70
    peak = max((v for _, v, _ in rows), default=0) or 1
    height = top + row_h * len(rows) + 4
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img">']
    for n, (label, v, color) in enumerate(rows):
        y = top + n * row_h
        bw = max(1.0, v / peak * bar_w) if v else 0
        short = label if len(label) <= 24 else label[:23] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{e(short)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bw:.1f}" height="{row_h - 5}" fill="{color}">'
                   f'<title>{e(label)}: {v:,}</title></rect>')
        out.append(f'<text x="{label_w + bw + 4:.1f}" y="{y + 13}">{v:,}</text>')
    out.append("</svg>")
    return "".join(out)


def score_ticks() -> list:
    return [(i * SCORE_BINS / 5, f"{i / 5:.1f}") for i in range(6)]


def score_titles() -> list:
    return [f"score {i / SCORE_BINS:.2f}–{(i + 1) / SCORE_BINS:.2f}" for i in range(SCORE_BINS)]


# ---------------------------------------------------------------------------------------------
# Sections


def _tile(label: str, value, cls: str = "") -> str:
    return f'<div class="tile {cls}"><b>{e(fmt(value))}</b><span>{e(label)}</span></div>'


def _run_state(manifest: Optional[dict]) -> tuple[str, str]:
    if manifest is None:
        return "unknown (no m2f-run.json)", "warn"
    if manifest.get("interrupted"):
        return f"interrupted (signal {manifest['interrupted']})", "bad"
    if manifest.get("stopped_early"):
        return "stopped (--max-failures reached)", "bad"
    if manifest.get("complete"):
        failed = int(manifest.get("failed") or 0)
        return ("complete", "ok") if not failed else (f"complete ({failed:,} inputs failed)", "warn")
    return "incomplete", "warn"


def _versions(settings: dict) -> str:
    v = sorted({str(s.get("m2f")) for s in settings.values() if s.get("m2f")})
    return ", ".join(v) if v else "unknown (no settings record)"


def summary_section(out: str, stats: Stats, manifest: Optional[dict], settings: dict, failed: int) -> str:
    state, cls = _run_state(manifest)
    m = manifest or {}
    tiles = [_tile("images with outputs", stats.images), _tile("instances", stats.instances),
             _tile("images with no instance", stats.no_instance),
             _tile("failed (last run)", failed, "bad" if failed else "ok"),
             _tile("skipped (last run: already done)", m.get("skipped")),
             _tile("wall time (last run), s", m.get("wall_s")), _tile("images/s (last run)", m.get("images_per_s"))]
    rows = [("last run", f'<span id="run-state" class="state-{cls}">{e(state)}</span>')]
    rows.append(("m2f version of the run", e(_versions(settings))))
    models = ", ".join(f"{m_ or '?'}{f' @ {rev}' if rev else ''} ({n:,} images)"
                       for (m_, rev), n in sorted(stats.models.items(), key=lambda kv: -kv[1]))
    rows.append(("model", e(models or "–")))
    rows.append(("task", e(", ".join(f"{t} ({n:,})" for t, n in stats.tasks.items()) or "–")))
    rows.append(("map threshold", e(", ".join(f"{t:g}" for t in sorted(stats.thresholds)) or "–")))
    if manifest:
        rows.append(("formats", e(", ".join(m.get("formats") or []))))
        rows.append(("last run: inputs / written / skipped / failed / instances",
                     e(" / ".join(fmt(m.get(k)) for k in ("total", "images", "skipped", "failed", "instances")))))
        if m.get("shards"):
            rows.append(("shards", e(m["shards"])))
        stages = m.get("stages") or {}
        if stages:
            rows.append(("seconds per stage", e(", ".join(f"{k} {float(v):.1f}" for k, v in stages.items()))))
    table = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<section id="summary"><h2>Summary</h2><div class="tiles">{"".join(tiles)}</div>'
            f'<table style="margin-top:10px">{table}</table></section>')


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ", ".join(str(x) for x in v) or "–"
        else:
            out[key] = "–" if v is None else str(v)
    return out


def settings_section(settings: dict) -> str:
    if not settings:
        return ('<section id="settings"><h2>Settings</h2><p class="note">No settings record in .m2f/ '
                '(written by newer m2f versions): the model and threshold above come from the sidecars.</p></section>')
    writers = sorted(settings)
    flat = {w: {"m2f": str(settings[w].get("m2f", "–")), "schema": str(settings[w].get("schema", "–")),
                **_flatten(settings[w].get("settings"))} for w in writers}
    keys = list(dict.fromkeys(k for w in writers for k in flat[w]))
    head = "".join(f"<th>{e(w)}</th>" for w in writers)
    body = "".join(f"<tr><th>{e(k)}</th>" + "".join(f"<td>{e(flat[w].get(k, '–'))}</td>" for w in writers)
                   + "</tr>" for k in keys)
    return (f'<section id="settings"><h2>Settings</h2><p class="note">From .m2f/&lt;writer&gt;.settings.json: '
            f'what each format\'s files were written with.</p>'
            f'<table id="settings-table"><tr><th></th>{head}</tr>{body}</table></section>')


def files_links(names: list) -> str:
    """Links to run-level files in OUT (one level up from report/)."""
    return ", ".join(f'<a href="../{href(n)}">{e(n)}</a>' for n in names)


def gallery_section(cards: list, stats: Stats, failed: int, sample_sizes: dict, failure_files: list) -> str:
    classes = sorted({i.label for c in cards for i in c["items"]})
    opts = "".join(f'<option value="{e(c)}">{e(c)}</option>' for c in classes)
    figs = []
    for c in cards:
        if c["failed"] is not None:
            f = c["failed"]
            figs.append(f'<figure class="card failed" data-failed="1" data-inst="[]" data-name="{e(f["path"])}">'
                        f'<div class="thumb">failed: {e(f["stage"])}</div><figcaption><span class="name path">{e(f["path"])}</span>'
                        f'<span class="err">{e(f["error"])}</span></figcaption></figure>')
            continue
        inst = json.dumps([[i.label, None if i.score is None else round(i.score, 3)] for i in c["items"]],
                          ensure_ascii=False, separators=(",", ":"))
        labels = sorted({i.label for i in c["items"]})
        n = len(c["items"])
        img = (f'<a href="{href(c["full"])}"><img src="{href(c["thumb"])}" loading="lazy" decoding="async" '
               f'alt="{e(c["name"])}"></a>' if c.get("thumb") else "no thumbnail")
        note = f'<span class="note">{e(c["note"])}</span>' if c.get("note") else ""
        figs.append(f'<figure class="card" data-failed="0" data-inst="{e(inst)}" data-name="{e(c["name"])}">'
                    f'<div class="thumb">{img}</div>'
                    f'<figcaption><span class="name" title="{e(c["path"])}">{e(c["name"])}</span>'
                    f'<span class="count">{n} instance{"" if n == 1 else "s"}</span>'
                    f'{": " if labels else ""}<span class="cls">{e(", ".join(labels))}</span>{note}'
                    '</figcaption></figure>')
    shown = sum(1 for c in cards if c["failed"] is None)
    k = sample_sizes["per_stratum"]
    failed_part = f" and {len(cards) - shown:,} of {failed:,} failed inputs" if failed else ""
    note = (f"{shown:,} of {stats.images:,} images{failed_part}: up to {sample_sizes['gallery']:,} picked by a "
            f"hash of their name (the same ones at every rebuild), plus up to {k} per class and per score band "
            f"of 0.1, {2 * k} with no instance and {2 * k} failed inputs, so that rare cases show. "
            f"Every image with no instance is listed in <a href=\"no_instances.txt\">no_instances.txt</a>; "
            + (f"every failure in {files_links(failure_files)}. " if failure_files else "")
            + "Click a thumbnail for the full overlay.")
    filters = (
        '<div class="filters">'
        '<label>show <select id="f-show"><option value="all">all</option><option value="instances">with instances'
        '</option><option value="empty">no instance</option><option value="failed">failed</option></select></label>'
        f'<label>class <select id="f-class"><option value="">any</option>{opts}</select></label>'
        '<label>score from <input id="f-lo" type="number" min="0" max="1" step="0.05" value="0"></label>'
        '<label>to <input id="f-hi" type="number" min="0" max="1" step="0.05" value="1"></label>'
        '<button id="f-reset" type="button">reset</button>'
        '<button id="f-prev" type="button">&larr; prev</button><button id="f-next" type="button">next &rarr;</button>'
        '<span id="f-count" class="note"></span></div>')
    return (f'<section id="gallery-section"><h2>Gallery</h2><p class="note">{note}</p>{filters}'
            f'<div id="gallery">{"".join(figs)}</div></section>')


def plots_section(stats: Stats, candidates: Optional[Candidates] = None) -> str:
    by_count = sorted(stats.classes.items(), key=lambda kv: (-kv[1].count, kv[0]))
    parts = []
    if by_count:
        rows = [(label, c.count, hex_color(c.category_id)) for label, c in by_count[:BAR_ROWS]]
        more = f'<p class="note">and {len(by_count) - BAR_ROWS} more classes (table below)</p>' \
            if len(by_count) > BAR_ROWS else ""
        parts.append(f'<div class="plot"><h3>Instances per class</h3>{bars_svg(rows)}{more}</div>')
    threshold = min(stats.thresholds) if stats.thresholds else None
    marker = None if threshold is None else threshold * SCORE_BINS
    behind = candidates.scores if candidates else None
    legend = (f'<p class="note">Colour: the {sum(stats.scores):,} instances kept in the maps; grey behind: '
              f'all <span id="candidates">{candidates.count:,}</span> detections in predictions_bbox.json '
              f'(COCO results, usually kept down to score 0): what a lower threshold would add.</p>'
              if candidates else "")
    log = candidates is not None  # thousands of low-score candidates next to tens of kept instances
    svg = histogram_svg(stats.scores, score_ticks(), marker=marker, bar_titles=score_titles(), behind=behind, log=log)
    parts.append(f'<div class="plot"><h3>Scores, all classes ({"log scale; " if log else ""}dashed: the map '
                 f'threshold)</h3>{svg}'
                 f'{legend}</div>')
    count_ticks = [(i + 0.5, str(i)) for i in range(0, COUNT_BINS - 1, 2)] + [(COUNT_BINS - 0.5, f"{COUNT_BINS - 1}+")]
    count_titles = [f"{i} instances" for i in range(COUNT_BINS - 1)] + [f"{COUNT_BINS - 1}+ instances"]
    parts.append(f'<div class="plot"><h3>Instances per image</h3>'
                 f'{histogram_svg(stats.per_image, count_ticks, color="#6a8f5a", bar_titles=count_titles)}</div>')
    nb = AREA_DECADES * AREA_PER_DECADE
    area_ticks = [(d * AREA_PER_DECADE, "1" if d == AREA_DECADES else f"1e-{AREA_DECADES - d}")
                  for d in range(AREA_DECADES + 1)]
    area_titles = [f"area {10 ** (i / AREA_PER_DECADE - AREA_DECADES):.1e}–"
                   f"{10 ** ((i + 1) / AREA_PER_DECADE - AREA_DECADES):.1e} of the image" for i in range(nb)]
    sizes = ", ".join(f"{k} {v:,}" for k, v in stats.coco_sizes.items())
    parts.append(f'<div class="plot"><h3>Mask area / image area (log scale)</h3>'
                 f'{histogram_svg(stats.areas, area_ticks, color="#9a6fb0", bar_titles=area_titles)}'
                 f'<p class="note">COCO sizes (pixels &lt; 32², &lt; 96², larger): {e(sizes)}</p></div>')
    multiples = []
    for label, c in by_count[:SMALL_MULTIPLES]:
        svg = histogram_svg(c.scores, score_ticks(), color=hex_color(c.category_id), width=240, height=100,
                            marker=marker, bar_titles=score_titles(),
                            behind=candidates.per_class.get(c.category_id) if candidates else None, log=log)
        scale = ", log scale" if log else ""
        multiples.append(f'<div class="plot"><h3>{e(label)} ({c.count:,}{scale})</h3>{svg}</div>')
    extra = (f'<p class="note">{len(by_count) - SMALL_MULTIPLES} less frequent classes: see the table.</p>'
             if len(by_count) > SMALL_MULTIPLES else "")
    rows = "".join(f'<tr><td><span style="color:{hex_color(c.category_id)}">■</span> {e(label)}</td>'
                   f'<td class="num">{c.category_id}</td><td class="num">{c.count:,}</td>'
                   f'<td class="num">{c.images:,}</td>'
                   f'<td class="num">{fmt(c.score_sum / c.scored if c.scored else None, 3)}</td></tr>'
                   for label, c in by_count)
    table = ('<table id="class-table"><tr><th>class</th><th>category id</th><th>instances</th><th>images</th>'
             f'<th>mean score</th></tr>{rows}</table>')
    return (f'<section id="plots"><h2>Classes, scores, sizes</h2><div class="plots">{"".join(parts)}</div>'
            f'<h2 style="margin-top:16px">Score per class</h2><div class="multiples">{"".join(multiples)}</div>{extra}'
            f'<div style="margin-top:12px">{table}</div></section>')


def failures_section(failed: int, stages: dict, rows: list, files: list) -> str:
    if not failed:
        return '<section id="failures"><h2>Failures</h2><p>No failed inputs in the last run.</p></section>'
    by_stage = ", ".join(f"{k}: {v:,}" for k, v in sorted(stages.items()))
    more = (f'<p class="note">The first {len(rows):,} of {failed:,}; all in {files_links(files)}.</p>'
            if failed > len(rows) else "")
    body = "".join(f'<tr><td class="path">{e(r["path"])}</td><td>{e(r["stage"])}</td>'
                   f'<td class="err">{e(r["error"])}</td></tr>'
                   for r in rows)
    return (f'<section id="failures"><h2>Failures ({failed:,}; {e(by_stage)})</h2>{more}'
            f'<table id="failure-table"><tr><th>path</th><th>stage</th><th>error</th></tr>{body}</table></section>')


def render_page(out: str, source: str, stats: Stats, manifest: Optional[dict], settings: dict, cards: list,
                failed: int, failed_stages: dict, failure_rows: list, sample_sizes: dict,
                failure_files: list = (), candidates: Optional[Candidates] = None) -> str:
    """The whole index.html."""
    from m2f_cli.version import __version__
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    src = {"sidecars": "the PNG sidecars", "jsonl": "predictions.jsonl (no PNG maps: boxes only)"}[source]
    nav = " · ".join(f'<a style="color:#b8c0cc" href="#{a}">{t}</a>' for a, t in
                     (("summary", "summary"), ("settings", "settings"), ("gallery-section", "gallery"),
                      ("plots", "classes and scores"), ("failures", "failures")))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>m2f report: {e(out)}</title><style>{CSS}</style></head><body>'
        f'<header><h1>m2f report</h1><div class="sub">{e(out)}</div>'
        f'<div class="sub">built {e(when)} by m2f {e(__version__)} from {e(src)} · {nav}</div></header><main>'
        f'<div class="row">{summary_section(out, stats, manifest, settings, failed)}{settings_section(settings)}</div>'
        f'{gallery_section(cards, stats, failed, sample_sizes, list(failure_files))}{plots_section(stats, candidates)}'
        f'{failures_section(failed, failed_stages, failure_rows, list(failure_files))}'
        f'</main><script>{SCRIPT}</script></body></html>\n')
