"""The self-contained ``index.html``: run summary, anomaly summary and every figure embedded as base64 PNG.

One file with no external references, so it can be mailed, attached to an issue or opened from a
copied run directory.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from tick_lightning.reporting.anomalies import KINDS, Finding

__all__ = ["render_html"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f3f3f3}.ok{color:#2a7a2a}.bad{color:#b00}.warn{color:#a60}code{font-size:12px}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(v: float, missing: str = "—") -> str:
    return missing if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def _root_cause(table, per_event: int) -> list[str]:
    """The flight recorder's root-cause table: per event, its first ``per_event`` ranked layers."""
    parts = ["<h2>Root cause (flight recorder)</h2>",
             "<p>Per event, the layers whose own gradient norm (or norm input, marked <em>input</em>, where "
             "recorded) deviated first (robust z against the layer's trailing flight steps), the step each started and its lead in steps before the loss / global "
             "gradient norm moved. Every row is in <code>root_cause.csv</code>.</p>"]
    if table is None or table.empty:
        return parts + ["<p class='ok'>No event with flight-recorder coverage had a deviating layer.</p>"]
    parts.append("<table><tr><th>event step</th><th>trigger</th><th>rank</th><th>layer</th><th>start step</th>"
                 "<th>z</th><th>lead (steps)</th></tr>")
    for _, group in table.groupby("event_step", sort=True):
        for row in group.head(per_event).itertuples(index=False):
            parts.append(f"<tr><td>{int(row.event_step)}</td><td>{_e(row.trigger)}</td><td>{int(row.rank)}</td>"
                         f"<td><code>{_e(row.layer)}</code>{' input' if row.series == 'input_absmax' else ''}</td>"
                         f"<td>{int(row.start_step)}</td>"
                         f"<td>{_num(float(row.z))}</td><td>{int(row.lead)}</td></tr>")
        if len(group) > per_event:
            parts.append(f"<tr><td colspan='7'>… {len(group) - per_event} more layers</td></tr>")
    return parts + ["</table>"]


def render_html(summary: list[tuple[str, str]], findings: list[Finding], figures: list[tuple[Path, str]],
                problems: list[str], limit: int = 200, root_cause=None, per_event: int = 10) -> str:
    """The page as a string. ``summary`` is (label, value) rows; ``figures`` (png path, caption) pairs;
    ``root_cause`` the root-cause table (``rules.root_cause.root_cause_table``; None: the run has no flight
    recorder data, no section).

    Example:
        >>> page = render_html([("ticks", "3")], [], [], [])
        >>> "No anomalies found" in page and "<img" not in page
        True
    """
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tick-lightning report</title>",
             f"<style>{_STYLE}</style></head><body><h1>tick-lightning report</h1>", "<h2>Run</h2><table>"]
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    if problems:
        parts.append("<p class='warn'><b>Problems reading the records</b> (the rest was used):</p><ul>")
        parts += [f"<li class='warn'>{_e(p)}</li>" for p in problems]
        parts.append("</ul>")
    parts.append("<h2>Anomalies</h2>")
    if not findings:
        parts.append("<p class='ok'>No anomalies found.</p>")
    else:
        counts: dict[str, int] = {}
        for f in findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        parts.append(f"<p class='bad'>{len(findings)} anomal{'y' if len(findings) == 1 else 'ies'} found:</p><ul>")
        parts += [f"<li><b>{_e(k)}</b> ({_e(KINDS.get(k, k))}): {n}</li>" for k, n in counts.items()]
        parts.append("</ul><table><tr><th>step</th><th>layer</th><th>kind</th><th>value</th><th>reference</th>"
                     "<th>ticks</th><th>detail</th></tr>")
        for f in findings[:limit]:
            steps = str(f.step) if f.last_step == f.step else f"{f.step}–{f.last_step}"
            layer = f"<code>{_e(f.layer)}</code>" if f.layer else "(run)"
            parts.append(f"<tr><td>{steps}</td><td>{layer}</td><td>{_e(f.kind)}</td><td>{_num(f.value, 'nan')}</td>"
                         f"<td>{_num(f.reference)}</td><td>{f.ticks}</td><td>{_e(f.detail)}</td></tr>")
        parts.append("</table>")
        if len(findings) > limit:
            parts.append(f"<p>{len(findings) - limit} more in <code>anomalies.csv</code>.</p>")
    if root_cause is not None:
        parts += _root_cause(root_cause, per_event)
    parts.append("<h2>Figures</h2>")
    for path, caption in figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{_e(Path(path).name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
