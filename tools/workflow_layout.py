"""Layout of generated workflows: stages in coloured groups left to right, node boxes sized as the frontend draws
them (with room for image previews), notes that fit their text, and a saved view that shows the whole graph.

Pure Python (no ComfyUI): tools/workflow_builder.py passes each node's type, links and estimated height; the geometry
checks at the end are used by tests/test_workflows.py on the saved JSON. Coordinates are LiteGraph's: a node's `pos`
is the top-left of its body, its title bar (TITLE_HEIGHT) sits above `pos`; a group's `bounding` includes its title.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STAGES = ("load", "invert", "edit", "output")
STAGE_TITLES = {"load": "1  Load", "invert": "2  Invert", "edit": "3  Edit", "output": "4  Decode & save"}
STAGE_COLORS = {"load": "#3f789e", "invert": "#8A8", "edit": "#a1309b", "output": "#b58b2a"}
# Node types whose stage is fixed; every other node joins the latest stage among its inputs (a mask preview stays
# with its mask, a decode of the edit stays with the output).
STAGE_OF_TYPE = {
    "CheckpointLoaderSimple": "load", "LoadImage": "load", "ControlNetLoader": "load",
    "AttnEditInvert": "invert", "AttnEditDynamicPromptLearn": "invert",
    "CLIPTextEncode": "edit", "KSampler": "edit", "SamplerCustom": "edit", "VAEEncodeForInpaint": "edit",
    "ControlNetApplyAdvanced": "edit", "ControlNetApply": "edit",
    "VAEDecode": "output", "SaveImage": "output", "AttnEditAttentionPreview": "output",
}
EDIT_PREFIX = "AttnEdit"  # the pack's other nodes edit
# Nodes that show an image in the node after a run (beyond LoadImage's upload preview and OUTPUT_NODEs).
PREVIEW_TYPES = {"AttnEditInvert", "PreviewImage", "SaveImage", "AttnEditAttentionPreview"}

# LiteGraph / ComfyUI frontend 1.27 metrics (px at scale 1), checked with tools/frontend_check.py.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24  # 20 + 4 spacing
MULTILINE_HEIGHT = 72  # a prompt textarea
BODY_MARGIN = 14
TITLE_CHAR_WIDTH, TITLE_MARGIN = 6.4, 48  # frontend 1.27 widens a node to fit its title (measured: ~6.3 px/char + 44)
NODE_WIDTH = 320
PREVIEW_HEIGHT = 300  # a square picture at about the node's width
COLUMN_GAP = 44  # room for links between columns
ROW_GAP = 30  # between one node's body and the next node's title
GROUP_PAD = 16
GROUP_TITLE = 40
GROUP_GAP = 36
SEED_NAMES = ("seed", "noise_seed")  # INT inputs the frontend gives a "control after generate" widget
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
NOTE_CHAR_WIDTH = 5.6  # MarkdownNote text as frontend 1.27 draws it (measured: ~4.9 px per character)
NOTE_LINE_HEIGHT = 11  # (measured: ~9 px)
NOTE_HEADING_HEIGHT = 26  # the first line of a read-me note, as a Markdown heading
NOTE_PAD = 30
NOTE_PARAGRAPH_GAP = 8
NOTE_MIN_HEIGHT = 92  # the frontend's minimum for a MarkdownNote (measured: 88)
# The saved view: the frontend's canvas in a 1600x1000 window (side bar on the left, menu and tabs on top, the
# minimap and canvas toolbar in the bottom-right corner).
# Canvas coordinates (the canvas element starts right of the side bar and below the tabs and menu bar: about
# 1525x920 in a 1600x1000 window).
CANVAS = (10, 10, 1515, 910)  # x0, y0, x1, y1 of the area to fill
MINIMAP_TOP = 640  # the minimap covers x > MINIMAP_LEFT below this y; the graph is fitted above or beside it
MINIMAP_LEFT = 1220
MAX_SCALE = 1.0


@dataclass(frozen=True)
class NodeBox:
    id: int
    type: str
    inputs: tuple[int, ...]
    stage: str | None
    height: int
    preview: bool
    width: int = 0  # 0: NODE_WIDTH


@dataclass(frozen=True)
class NoteBox:
    id: int
    title: str
    text: str
    stage: str | None


@dataclass
class Placed:
    pos: dict[int, list[int]] = field(default_factory=dict)
    size: dict[int, list[int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    view: dict = field(default_factory=dict)


def node_height(spec: dict, cls, linked: set[str], optional_sockets: bool = True) -> int:
    """Body height the frontend gives a node: slot rows, then one row per widget (prompt boxes taller).

    optional_sockets=False leaves unconnected optional sockets out: core nodes gain them between ComfyUI versions
    (Apply ControlNet (Advanced)'s `vae`), and the saved workflow must be the same on every host; ROW_GAP absorbs
    the extra row where the frontend adds it."""
    slots, widgets = 0, 0
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind = s[0] if isinstance(s, list | tuple) else s
            options = s[1] if isinstance(s, list | tuple) and len(s) > 1 and isinstance(s[1], dict) else {}
            is_widget = isinstance(kind, list | tuple) or (kind in ("INT", "FLOAT", "STRING", "BOOLEAN")
                                                            and not options.get("forceInput"))
            if name in linked or (not is_widget and (section == "required" or optional_sockets)):
                slots += 1
                continue
            if not is_widget:
                continue
            widgets += MULTILINE_HEIGHT if options.get("multiline") else WIDGET_HEIGHT
            if options.get("image_upload"):
                widgets += WIDGET_HEIGHT  # the upload button
            if kind == "INT" and (name in SEED_NAMES or options.get("control_after_generate")):
                widgets += WIDGET_HEIGHT  # the frontend's "control after generate" widget
    rows = max(slots, len(cls.RETURN_TYPES))
    return rows * SLOT_HEIGHT + widgets + BODY_MARGIN


def node_width(title: str) -> int:
    """Width of a node: NODE_WIDTH, or wider where the frontend needs it for the title."""
    return max(NODE_WIDTH, math.ceil(len(title) * TITLE_CHAR_WIDTH + TITLE_MARGIN))


def shows_image(type_: str, spec: dict, cls) -> bool:
    """Whether the node draws a picture under its widgets (upload preview, or an output preview after a run)."""
    uploads = any(isinstance(s, list | tuple) and len(s) > 1 and isinstance(s[1], dict) and s[1].get("image_upload")
                  for section in ("required", "optional") for s in spec.get(section, {}).values())
    return uploads or type_ in PREVIEW_TYPES or (getattr(cls, "OUTPUT_NODE", False) and "IMAGE" in str(spec))


def stages_of(boxes: list[NodeBox]) -> dict[int, str]:
    """Stage of each node: its explicit stage, its type's, or the latest stage among its inputs (else "load")."""
    out: dict[int, str] = {}
    for b in boxes:  # nodes are created after their inputs
        own = b.stage or STAGE_OF_TYPE.get(b.type) or (
            "edit" if b.type.startswith(EDIT_PREFIX) else None)
        inherited = max((STAGES.index(out[i]) for i in b.inputs if i in out), default=0)
        out[b.id] = STAGES[max(inherited, STAGES.index(own))] if own else STAGES[inherited]
    return out


def note_height(text: str, width: int, heading: bool = False) -> int:
    """Height a MarkdownNote needs to show `text` (one paragraph per line of `text`) without scrolling at `width`."""
    per_line = max(10, int((width - NOTE_PAD) / NOTE_CHAR_WIDTH))
    paragraphs = text.split("\n")
    if heading:
        paragraphs = paragraphs[1:]
    lines = sum(max(1, math.ceil(len(par) / per_line)) for par in paragraphs)
    return max(NOTE_MIN_HEIGHT, lines * NOTE_LINE_HEIGHT + max(0, len(paragraphs) - 1) * NOTE_PARAGRAPH_GAP
               + NOTE_PAD + (NOTE_HEADING_HEIGHT if heading else 0))


def markdown(text: str, heading: bool = False) -> str:
    """Note text as Markdown: every line of `text` its own paragraph (Markdown joins single newlines); with
    `heading`, the first line is the note's heading."""
    lines = text.split("\n")
    if heading:
        lines[0] = "### " + lines[0]
    return "\n\n".join(lines)


def _columns(stage_boxes: list[NodeBox], max_height: int) -> list[list[NodeBox]]:
    """Columns inside a stage: nodes in creation order (inputs first) fill a column down to `max_height`, then the
    next column starts; a node never sits left of an input from the same stage."""
    columns: list[list[NodeBox]] = [[]]
    used, column_of = 0, {}
    for b in stage_boxes:
        h = box_height(b)
        needs_right = max((column_of[i] for i in b.inputs if i in column_of), default=0)
        if columns[-1] and (used + h > max_height or needs_right > len(columns) - 1):
            columns.append([])
            used = 0
        columns[-1].append(b)
        column_of[b.id] = len(columns) - 1
        used += h + ROW_GAP
    return columns


def box_height(b: NodeBox) -> int:
    """Height of a node as drawn: title, body and the room for its picture."""
    return TITLE_HEIGHT + b.height + (PREVIEW_HEIGHT if b.preview else 0)


def arrange(boxes: list[NodeBox], notes: list[NoteBox], titles: dict[str, str] | None = None) -> Placed:
    """The layout whose saved view shows the whole graph largest: columns of every height (10 px steps) from the tallest node up
    are tried, and the one that fits the screen at the highest scale wins."""
    tallest = max((box_height(b) for b in boxes), default=0)
    best = None
    for max_height in range(tallest, tallest + 2400, 10):  # fine steps: a 40 px window can decide a column break
        placed = _arrange(boxes, notes, titles, max_height)
        if best is None or placed.view["scale"] > best.view["scale"]:
            best = placed
    return best


def _arrange(boxes: list[NodeBox], notes: list[NoteBox], titles: dict[str, str] | None, max_height: int) -> Placed:
    """Place nodes in stage groups (left to right), stage notes on top of their group, the other notes above all."""
    titles = {**STAGE_TITLES, **(titles or {})}
    stage = stages_of(boxes)
    placed = Placed()
    top = 0
    x = 0
    spans = []
    for s in STAGES:
        members = [b for b in boxes if stage[b.id] == s]
        if not members:
            continue
        columns = _columns(members, max_height)
        widths = [max(b.width or NODE_WIDTH for b in column) for column in columns]
        lefts = [x + GROUP_PAD + sum(widths[:c]) + c * COLUMN_GAP for c in range(len(columns))]
        inner = sum(widths) + (len(columns) - 1) * COLUMN_GAP
        y0 = top + GROUP_TITLE
        for note in (n for n in notes if n.stage == s):
            h = note_height(note.text, inner)
            placed.pos[note.id], placed.size[note.id] = [x + GROUP_PAD, y0 + TITLE_HEIGHT], [inner, h]
            y0 += TITLE_HEIGHT + h + ROW_GAP
        bottom = y0
        for c, column in enumerate(columns):
            y = y0
            for b in column:
                placed.pos[b.id] = [lefts[c], y + TITLE_HEIGHT]
                placed.size[b.id] = [widths[c], box_height(b) - TITLE_HEIGHT]
                placed.order.append(b.id)
                y += box_height(b) + ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
        # one spare socket row at the bottom: a core node may show a socket its saved file leaves out
        spans.append((s, x, inner + 2 * GROUP_PAD, bottom + GROUP_PAD + SLOT_HEIGHT))
        x += inner + 2 * GROUP_PAD + GROUP_GAP
    height = max((b for _, _, _, b in spans), default=0) - top
    for s, gx, gw, _ in spans:  # one height for every group: the stages read as one row
        placed.groups.append({"title": titles[s], "bounding": [gx, top, gw, height], "color": STAGE_COLORS[s],
                              "font_size": 24, "flags": {}})
    width = max(x - GROUP_GAP, NODE_WIDTH)
    y = top
    for note in reversed([n for n in notes if n.stage not in STAGES]):  # stacked upwards above the groups
        h = note_height(note.text, width, heading=True)
        y -= h + ROW_GAP
        placed.pos[note.id], placed.size[note.id] = [0, y], [width, h]
        y -= TITLE_HEIGHT
    placed.view = fit_view(graph_bounds(placed))
    return placed


def graph_bounds(placed: Placed) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of every node box (title included) and group."""
    rects = [node_rect(placed.pos[i], placed.size[i]) for i in placed.pos]
    rects += [tuple(g["bounding"]) for g in placed.groups]
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[0] + r[2] for r in rects),
            max(r[1] + r[3] for r in rects))


def node_rect(pos, size) -> tuple[float, float, float, float]:
    """x, y, w, h of a node as drawn, title bar included."""
    return pos[0], pos[1] - TITLE_HEIGHT, size[0], size[1] + TITLE_HEIGHT


def fit_view(bounds, margin: int = 12) -> dict:
    """extra.ds {scale, offset} that shows `bounds` inside the free canvas: the larger of the two fits that keep
    clear of the minimap (the full width above it, or the full height left of it)."""
    x0, y0, x1, y1 = bounds
    w, h = x1 - x0 + 2 * margin, y1 - y0 + 2 * margin
    cx0, cy0, cx1, cy1 = CANVAS
    options = [(cx1 - cx0, MINIMAP_TOP - cy0), (MINIMAP_LEFT - cx0, cy1 - cy0)]
    scale = min(MAX_SCALE, max(min(aw / w, ah / h) for aw, ah in options))
    scale = math.floor(scale * 1000) / 1000
    # screen = (graph + offset) * scale: put the top-left corner at the canvas's top-left
    offset = [cx0 / scale - (x0 - margin), cy0 / scale - (y0 - margin)]
    return {"scale": scale, "offset": [round(offset[0], 1), round(offset[1], 1)]}


def visible_rect(view: dict) -> tuple[float, float, float, float]:
    """Graph-space rectangles the saved view shows clear of the minimap: (x0, y0, x1, y1) for the larger one."""
    s, (ox, oy) = view["scale"], view["offset"]
    cx0, cy0, cx1, cy1 = CANVAS
    return cx0 / s - ox, cy0 / s - oy, cx1 / s - ox, cy1 / s - oy


def overlapping(rects: dict[str, tuple[float, float, float, float]]) -> list[tuple[str, str]]:
    """Pairs of names whose x, y, w, h rectangles overlap."""
    items = list(rects.items())
    out = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a, b))
    return out


def contains(outer, inner) -> bool:
    ox, oy, ow, oh = outer
    ix, iy, iw, ih = inner
    return ox <= ix and oy <= iy and ix + iw <= ox + ow and iy + ih <= oy + oh
