"""Rendering untrusted text: every name and string in a trace (file names, module, tensor, kind
and scalar names, metadata) is data written by whoever made the trace, and goes through one of
these before it reaches a page, a tooltip's code or an export.

- Markdown panes: ``md_escape`` (HTML escaped and Markdown punctuation backslash-escaped, so a
  name can neither open a tag nor a link, emphasis or code span).
- HTML panes and Choices.js labels (Bokeh's MultiChoice renders labels as HTML): ``html_text``.
- JavaScript source (``CustomJSHover`` code): ``js_literal`` (JSON, with ``<``, ``>``, ``&`` and the
  line separators escaped as well, so it is inert even inside a ``<script>`` element).
- Bokeh text (titles, axis and tick labels, legends, Select options, tooltip values) is drawn as
  text, not parsed: plain strings are fine there.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from typing import Any

ROOT_LABEL = "<root>"
_MD_PUNCT = re.compile(r"([!\"#$%'()*+,\-./:;=?@\[\\\]^_`{|}~])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")


def md_escape(text: Any) -> str:
    """``text`` as literal Markdown: shown exactly, interpreted as nothing."""
    s = _LINE_BREAKS.sub(" ", str(text))
    return html.escape(_MD_PUNCT.sub(r"\\\1", s), quote=False)


def html_text(text: Any) -> str:
    """``text`` as literal HTML text or attribute value."""
    return html.escape(str(text), quote=True)


def js_literal(value: Any) -> str:
    """A JavaScript literal of ``value`` (strings, numbers, lists of them)."""
    s = json.dumps(value, ensure_ascii=True)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def module_label(name: str) -> str:
    """How a module path is shown: the root module (path ``""``) as ``<root>``."""
    return name if name else ROOT_LABEL


def common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix shared by every name (``"model.encoder."`` of
    ``model.encoder.layer.0`` and ``model.encoder.layer.1``), ending at a dot; "" if none, or if
    it would leave a name empty."""
    parts = [n.split(".") for n in names if n]
    if len(parts) < 2:
        return ""
    first = parts[0]
    k = 0
    while all(len(p) > k + 1 and p[k] == first[k] for p in parts):
        k += 1
    return ".".join(first[:k]) + "." if k else ""


def short_labels(names: Sequence[str], width: int = 36) -> list[str]:
    """Readable labels for long module paths: the common prefix folded to ``…`` and, for a name
    still longer than ``width``, its middle elided (the last components kept: they tell layers
    apart). The full names belong in a tooltip beside them."""
    pre = common_prefix(names)
    out = []
    for n in names:
        s = module_label(n)
        if pre and n.startswith(pre):
            # keep the prefix's last component for context: "…layer.0.attention"
            keep = pre[:-1].rfind(".") + 1
            s = "…" + n[keep:] if keep else s
        if len(s) > width:
            tail = s[-(width - 1) :]
            cut = tail.find(".")
            s = "…" + (tail[cut:] if 0 <= cut < width // 2 else tail)
        out.append(s)
    # folding must never make two different modules look alike
    if len(set(out)) != len(out):
        return [module_label(n) for n in names]
    return out


__all__ = [
    "ROOT_LABEL",
    "common_prefix",
    "html_text",
    "js_literal",
    "md_escape",
    "module_label",
    "short_labels",
]
