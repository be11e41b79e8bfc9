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


def render_html(summary: list[tuple[str, str]], findings: list[Finding], figures: list[tuple[Path, str]],
                problems: list[str], limit: int = 200) -> str:
    """The page as a string. ``summary`` is (label, value) rows; ``figures`` (png path, caption) pairs.

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
    parts.append("<h2>Figures</h2>")
    for path, caption in figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{_e(Path(path).name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
