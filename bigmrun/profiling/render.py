"""Render a profile (collapsed stacks) as an interactive SVG flamegraph or speedscope JSON.

How the flamegraph works
------------------------
Like Brendan Gregg's FlameGraph.pl (and inferno): stacks are folded into a tree (the
children of a frame sorted by name), a synthetic ``all`` frame at the bottom holds every
sample, and each frame is a rectangle whose width is its share of the samples and whose
height is its depth; a frame's tooltip (``<title>``) gives its samples and percentage.
Frames narrower than :data:`MIN_WIDTH_PX` at full size are left out (as FlameGraph.pl
does), so huge profiles stay small.

The SVG is self-contained (no network resources) and is laid out server-side, so it
reads without scripts. An embedded script adds: click a frame to zoom into it (its
ancestors stay, dimmed, and clicking one zooms back out), "Reset Zoom", a search box
(a regular expression; matching frames turn purple and the share of samples they
cover is shown; ``Ctrl-F`` or ``/`` focuses it), and the hovered frame's details
along the bottom. Each frame's ``<g>`` carries its geometry in samples and depth
(``data-x``, ``data-w``, ``data-d``) and its name (``data-n``); the script only re-lays
those out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .stacks import split_frame, total

#: Width of the SVG in pixels.
WIDTH = 1200
#: Height of one frame.
FRAME_HEIGHT = 16
FONT_SIZE = 12
#: Average glyph width as a fraction of the font size (for label truncation).
FONT_WIDTH = 0.59
#: Frames narrower than this (in pixels, unzoomed) are left out.
MIN_WIDTH_PX = 0.1
PAD = 10
TOP = 62     # title, subtitle, controls
BOTTOM = 28  # details line

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(s: str) -> str:
    s = _XML_BAD.sub("?", s)
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


class _Node:
    __slots__ = ("children", "name", "value")

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0
        self.children: dict[str, _Node] = {}


def _tree(stacks: Mapping[tuple[str, ...], int]) -> _Node:
    root = _Node("all")
    for stack, n in stacks.items():
        if n <= 0:
            continue
        root.value += n
        node = root
        for frame in stack:
            child = node.children.get(frame)
            if child is None:
                child = node.children[frame] = _Node(frame)
            child.value += n
            node = child
    return root


def _color(name: str, labels: frozenset[str], depth: int) -> str:
    """FlameGraph.pl-like "hot" palette, stable per name; native code blue-ish;
    machine labels and ``all`` grey."""
    if depth == 0 or name in labels:
        return "rgb(190,190,200)"
    h = hashlib.blake2b(name.encode(errors="replace"), digest_size=3).digest()
    v1, v2, v3 = h[0] / 255, h[1] / 255, h[2] / 255
    fn, file, _ = split_frame(name)
    if file is None or not file.endswith(".py") or fn.startswith("0x"):
        return f"rgb({int(80 + 60 * v1)},{int(140 + 60 * v2)},{int(200 + 55 * v3)})"
    return f"rgb({int(205 + 50 * v3)},{int(230 * v1)},{int(55 * v2)})"


def _label(name: str, width_px: float) -> str:
    chars = int(width_px / (FONT_SIZE * FONT_WIDTH))
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def flamegraph_svg(stacks: Mapping[tuple[str, ...], int], title: str = "Flame Graph",
                   subtitle: str = "", labels: Iterable[str] = (),
                   unit: str = "samples") -> str:
    """An interactive SVG flamegraph of ``stacks`` (see the module notes).

    ``labels`` names root frames that are labels rather than code (the machine names of
    a by-machine profile): they are drawn grey.
    """
    root = _tree(stacks)
    label_set = frozenset(labels)
    grand = max(root.value, 1)
    inner = WIDTH - 2 * PAD
    min_samples = MIN_WIDTH_PX * grand / inner
    # Lay out: (node, depth, x in samples), depth-first, children sorted by name.
    placed: list[tuple[_Node, int, int]] = []
    max_depth = 0
    todo: list[tuple[_Node, int, int]] = [(root, 0, 0)]
    while todo:
        node, depth, x = todo.pop()
        placed.append((node, depth, x))
        max_depth = max(max_depth, depth)
        offsets = []
        cx = x
        for name in sorted(node.children):
            child = node.children[name]
            if child.value >= min_samples:
                offsets.append((child, depth + 1, cx))
            cx += child.value
        todo.extend(reversed(offsets))
    height = TOP + (max_depth + 1) * FRAME_HEIGHT + BOTTOM
    base = height - BOTTOM  # the bottom edge of the "all" frame
    out = [
        '<?xml version="1.0" standalone="no"?>\n',
        f'<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'data-total="{root.value}" data-unit="{_esc(unit)}">\n',
        "<style>\n"
        "text { font-family: Verdana, sans-serif; font-size: 12px; fill: rgb(0,0,0); }\n"
        "#title { font-size: 17px; text-anchor: middle; }\n"
        "#subtitle { text-anchor: middle; fill: rgb(90,90,90); }\n"
        ".ctl { cursor: pointer; fill: rgb(40,40,160); }\n"
        ".ctl.off { opacity: 0.3; cursor: default; }\n"
        "g.f { cursor: pointer; }\n"
        "g.f:hover rect { stroke: rgb(0,0,0); stroke-width: 0.5; }\n"
        "g.f text { pointer-events: none; font-size: 12px; }\n"
        "g.f.dim rect { opacity: 0.5; }\n"
        "g.f.hide { display: none; }\n"
        "</style>\n",
        f'<rect class="background" x="0" y="0" width="{WIDTH}" height="{height}" '
        'fill="rgb(250,248,240)"/>\n',
        f'<text id="title" x="{WIDTH / 2:.0f}" y="22">{_esc(title)}</text>\n',
        f'<text id="subtitle" x="{WIDTH / 2:.0f}" y="40">{_esc(subtitle)}</text>\n',
        f'<text id="unzoom" class="ctl off" x="{PAD}" y="40">Reset Zoom</text>\n',
        f'<foreignObject x="{WIDTH - PAD - 330}" y="26" width="250" height="22">'
        '<input xmlns="http://www.w3.org/1999/xhtml" id="search" type="search" '
        'placeholder="Search (regular expression)" '
        'style="width:240px;font:12px Verdana,sans-serif"/></foreignObject>\n',
        f'<text id="matched" x="{WIDTH - PAD}" y="40" text-anchor="end"> </text>\n',
        f'<text id="details" x="{PAD}" y="{height - 10}"> </text>\n',
        '<g id="frames">\n',
    ]
    scale = inner / grand
    for node, depth, x in placed:
        w_px = node.value * scale
        x_px = PAD + x * scale
        y = base - (depth + 1) * FRAME_HEIGHT
        pct = 100.0 * node.value / grand
        name = node.name
        tip = f"{name} ({node.value:,} {unit}, {pct:.2f}%)"
        out.append(
            f'<g class="f" data-x="{x}" data-w="{node.value}" data-d="{depth}" '
            f'data-n="{_esc(name)}"><title>{_esc(tip)}</title>'
            f'<rect x="{x_px:.2f}" y="{y}" width="{w_px:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'rx="2" ry="2" fill="{_color(name, label_set, depth)}"/>'
            f'<text x="{x_px + 3:.2f}" y="{y + FRAME_HEIGHT - 4.5:.1f}">'
            f'{_esc(_label(name, w_px - 6))}</text></g>\n')
    out.append("</g>\n")
    out.append(_SCRIPT.replace("@PAD@", str(PAD)).replace("@INNER@", str(inner))
               .replace("@FH@", str(FRAME_HEIGHT)).replace("@BASE@", str(base))
               .replace("@CW@", str(FONT_SIZE * FONT_WIDTH)))
    out.append("</svg>\n")
    return "".join(out)


_SCRIPT = r"""<script type="text/ecmascript"><![CDATA[
(function () {
  "use strict";
  var PAD = @PAD@, INNER = @INNER@, FH = @FH@, BASE = @BASE@, CW = @CW@;
  var svg = document.documentElement;
  var TOTAL = +svg.getAttribute("data-total") || 1, UNIT = svg.getAttribute("data-unit");
  var frames = Array.prototype.slice.call(document.querySelectorAll("g.f"));
  var info = frames.map(function (g) {
    return {g: g, x: +g.getAttribute("data-x"), w: +g.getAttribute("data-w"),
            d: +g.getAttribute("data-d"), n: g.getAttribute("data-n"),
            rect: g.querySelector("rect"), text: g.querySelector("text"),
            fill: g.querySelector("rect").getAttribute("fill")};
  });
  var details = document.getElementById("details");
  var unzoom = document.getElementById("unzoom");
  var matched = document.getElementById("matched");
  var search = document.getElementById("search");
  var zoomed = null;
  function label(name, px) {
    var chars = Math.floor(px / CW);
    if (chars < 3) return "";
    return name.length <= chars ? name : name.slice(0, chars - 2) + "..";
  }
  function place(f, x0, w0) {
    var scale = INNER / w0;
    var x = PAD + (f.x - x0) * scale, w = f.w * scale;
    if (x < PAD) { w -= PAD - x; x = PAD; }
    if (x + w > PAD + INNER) w = PAD + INNER - x;
    f.rect.setAttribute("x", x.toFixed(2));
    f.rect.setAttribute("width", Math.max(w, 0).toFixed(2));
    f.text.setAttribute("x", (x + 3).toFixed(2));
    f.text.textContent = label(f.n, w - 6);
  }
  function zoom(z) {
    zoomed = z;
    var x0 = z ? z.x : 0, w0 = z ? z.w : TOTAL, d0 = z ? z.d : 0;
    info.forEach(function (f) {
      var inside = f.x >= x0 && f.x + f.w <= x0 + w0 && f.d >= d0;
      var ancestor = f.d < d0 && f.x <= x0 && f.x + f.w >= x0 + w0;
      f.g.classList.toggle("hide", !(inside || ancestor));
      f.g.classList.toggle("dim", ancestor);
      if (inside || ancestor) place(f, x0, w0);
    });
    unzoom.classList.toggle("off", !z);
    if (search.value) find(search.value);
  }
  function find(term) {
    var re = null;
    if (term) {
      try { re = new RegExp(term); } catch (e) {
        re = new RegExp(term.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
      }
    }
    var spans = [];
    info.forEach(function (f) {
      var hit = re !== null && re.test(f.n);
      f.rect.setAttribute("fill", hit ? "rgb(230,0,230)" : f.fill);
      if (hit && !f.g.classList.contains("hide") && !f.g.classList.contains("dim"))
        spans.push([f.x, f.x + f.w]);
    });
    if (re === null) { matched.textContent = " "; return; }
    spans.sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
    var sum = 0, end = -1;
    spans.forEach(function (s) {
      if (s[0] >= end) { sum += s[1] - s[0]; end = s[1]; }
      else if (s[1] > end) { sum += s[1] - end; end = s[1]; }
    });
    var of = zoomed ? zoomed.w : TOTAL;
    matched.textContent = "Matched: " + (100 * sum / of).toFixed(1) + "%";
  }
  info.forEach(function (f) {
    f.g.addEventListener("click", function () { zoom(f.d === 0 ? null : f); });
    f.g.addEventListener("mouseover", function () {
      details.textContent = f.g.querySelector("title").textContent;
    });
    f.g.addEventListener("mouseout", function () { details.textContent = " "; });
  });
  unzoom.addEventListener("click", function () { if (zoomed) zoom(null); });
  search.addEventListener("input", function () { find(search.value); });
  window.addEventListener("keydown", function (e) {
    if ((e.ctrlKey && e.keyCode === 70) || (e.key === "/" && document.activeElement !== search)) {
      e.preventDefault(); search.focus();
    } else if (e.key === "Escape") { search.value = ""; find(""); }
  });
})();
]]></script>
"""


def speedscope(stacks: Mapping[tuple[str, ...], int], name: str = "bigmrun profile",
               exporter: str = "bigmrun") -> dict[str, Any]:
    """A speedscope file (https://www.speedscope.app/file-format-schema.json) holding one
    "sampled" profile: each distinct stack is one sample whose weight is its count
    (``unit`` "none": the weights are sample counts)."""
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    for stack, n in sorted(stacks.items()):
        if n <= 0:
            continue
        ids = []
        for frame in stack:
            i = index.get(frame)
            if i is None:
                fn, file, line = split_frame(frame)
                entry: dict[str, Any] = {"name": fn}
                if file is not None:
                    entry["file"] = file
                if line is not None:
                    entry["line"] = line
                i = index[frame] = len(frames)
                frames.append(entry)
            ids.append(i)
        samples.append(ids)
        weights.append(n)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": [{
            "type": "sampled",
            "name": name,
            "unit": "none",
            "startValue": 0,
            "endValue": total(stacks),
            "samples": samples,
            "weights": weights,
        }],
        "name": name,
        "activeProfileIndex": 0,
        "exporter": exporter,
    }


__all__ = ["flamegraph_svg", "speedscope"]
