"""Template-browser thumbnails: workflows/<name>.jpg next to each workflow (ComfyUI serves a custom node's
example workflows and `<name>.jpg` thumbnails from its workflows folder; frontend 1.27 asks for `.jpg`).

Honest by construction: the thumbnail shows the example INPUT picture, the mask box the workflow draws (if any) and
the edit it asks for (source -> target words, read from the workflow's prompts); never a result. Pure PIL, no
ComfyUI; called by tools/build_workflows.py.
"""

from __future__ import annotations

import difflib
import os
import re
import textwrap

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 320)
PICTURE = 288
BACKGROUND = (32, 32, 36)
MASK_COLOUR = (255, 70, 70)
TEXT = (235, 235, 235)
MUTED = (170, 170, 180)
TITLE_CHARS = 80  # what fits beside the picture
SHORT_LABEL = 12  # a shorter text before ":" is a name that needs its explanation
PROMPT_WORDS = 4  # a widget string with at least this many words is a prompt


def _inputs(node: dict, names: list[str]) -> dict:
    """widgets_values of a UI node zipped with the widget names (skipping seed controls and upload entries)."""
    values, out = list(node.get("widgets_values") or []), {}
    for name in names:
        if not values:
            break
        out[name] = values.pop(0)
        if values and values[0] in ("fixed", "randomize", "increment", "decrement", "image"):
            values.pop(0)
    return out


def mask_box(ui: dict) -> tuple[float, float, float, float] | None:
    """The white box a workflow composes with SolidMask + MaskComposite, as fractions (x, y, w, h) of the canvas."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    for n in ui["nodes"]:
        if n["type"] != "MaskComposite":
            continue
        src = {i["name"]: by_id[links[i["link"]][1]] for i in n["inputs"] if i.get("link") in links}
        if src.get("destination", {}).get("type") != "SolidMask" or src.get("source", {}).get("type") != "SolidMask":
            continue
        _, cw, ch = src["destination"]["widgets_values"][:3]
        _, bw, bh = src["source"]["widgets_values"][:3]
        x, y = n["widgets_values"][:2]
        return x / cw, y / ch, bw / cw, bh / ch
    return None


def edit_text(ui: dict) -> str:
    """The edit a workflow asks for: the words that change from its first prompt (the photo's caption) to the first
    different prompt after it, or its edit text."""
    prompts = []
    for n in ui["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        values = [v for v in (n.get("widgets_values") or []) if isinstance(v, str)]
        if n["type"] == "AttnEditInstantEdit" and values:
            return f'edit text: "{values[0]}"'
        prompts += [v for v in values if len(v.split()) >= PROMPT_WORDS]
    for target in prompts[1:]:
        a, b = prompts[0].split(), target.split()
        old, new = [], []
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
            if op != "equal":
                old += a[i1:i2]
                new += b[j1:j2]
        if old and new:
            return f"{' '.join(old)}  ->  {' '.join(new)}"
        if new:
            return f"adds: {' '.join(new)}"
    if any("remove object" in (n.get("widgets_values") or []) for n in ui["nodes"]):
        return "removes the masked object"
    weights = [v for n in ui["nodes"] if n["type"] not in ("Note", "MarkdownNote")
               for v in (n.get("widgets_values") or []) if isinstance(v, str) and re.fullmatch(r"\w+=[\d.]+", v)]
    if weights:
        return "re-weights " + ", ".join(weights)
    if prompts:
        return f'prompt: "{prompts[-1]}"'
    return ""


def render(ui: dict, example: str, title: str, path: str) -> None:
    """Write the thumbnail JPEG for one workflow."""
    canvas = Image.new("RGB", SIZE, BACKGROUND)
    picture = Image.open(example).convert("RGB").resize((PICTURE, PICTURE), Image.LANCZOS)
    margin = (SIZE[1] - PICTURE) // 2
    canvas.paste(picture, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    box = mask_box(ui)
    if box:
        x, y, w, h = margin + box[0] * PICTURE, margin + box[1] * PICTURE, box[2] * PICTURE, box[3] * PICTURE
        draw.rectangle([x, y, x + w, y + h], outline=MASK_COLOUR, width=3)
    left = margin * 2 + PICTURE
    width_chars = 17
    big, small = ImageFont.load_default(size=20), ImageFont.load_default(size=15)
    y = margin
    for line in textwrap.wrap(title, width_chars)[:5]:
        draw.text((left, y), line, fill=TEXT, font=big)
        y += 26
    y += 10
    lines = [("input photo" + (" + mask" if box else ""), MUTED)]
    change = edit_text(ui)
    if change:
        lines += [(part, TEXT) for part in textwrap.wrap(change, 22)[:4]]
    for text, colour in lines:
        draw.text((left, y), text, fill=colour, font=small)
        y += 20
    canvas.save(path, quality=88)


def title_of(name: str, ui: dict) -> str:
    """A readable title: the workflow's number and the heading of its read-me note."""
    for n in ui["nodes"]:
        text = str((n.get("widgets_values") or [""])[0]) if n["type"] in ("Note", "MarkdownNote") else ""
        if text.startswith("### "):
            head = text[4:].split("\n")[0].split(" (")[0].rstrip(".")
            label = head.split(":")[0]
            if ":" in head and (len(label) >= SHORT_LABEL or len(head) > TITLE_CHARS):
                head = label  # "CPAM background change: the cat ..." -> the label; "EmbCtrl: colour change" stays
            return f"{name[:2]}  {head}"
    return name


def write_all(workflows: dict[str, dict], folder: str, example: str) -> list[str]:
    paths = []
    for name, ui in workflows.items():
        path = os.path.join(folder, f"{name}.jpg")
        render(ui, example, title_of(name, ui), path)
        paths.append(path)
    return paths
