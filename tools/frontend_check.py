"""Real-frontend check of every shipped workflow: ComfyUI 0.3.64 + frontend 1.27.10 in headless Chromium.

    /work/main/.venv/bin/python tools/frontend_check.py [--only 02_nulltext] [--load-only] [--out DIR]

Not part of CI (it starts a server and a browser; ~1-2 min per workflow on two CPU cores). What it does:
1. Python packages the test venv lacks live in a cache folder filled once with `pip install --target --no-deps`
   (frontend 1.27.10, Playwright, ComfyUI's database deps; the script prints the command when they are missing) and
   are put on PYTHONPATH for the server and this script; nothing is installed into the venv. The browser is Debian's `chromium` (apt-get install -y chromium), driven by Playwright
   through `executable_path` (Playwright's own browser download is not needed).
2. A temporary copy of ComfyUI 0.3.64 (../shared/hosts/comfyui-0.3.64 or $COMFYUI_PATH) gets this pack linked into
   custom_nodes/attention-edit, a second custom node folder with the tiny test loaders (tools/tiny_models.py),
   placeholder files for every checkpoint / adapter name the workflows use (so the frontend's combos hold them),
   a tiny random SAM checkpoint and the example picture at smoke size. The server runs on 127.0.0.1 with --cpu.
3. Per workflow: load through `app.loadGraphData` (the frontend's own loader), record console errors/warnings,
   page errors, node types the frontend does not know, deprecated node types and widget values outside their
   combo lists; measure every node's box as the frontend sized it and report overlaps; convert with
   `app.graphToPrompt()`; swap the checkpoint/adapter loaders for the tiny test loaders and cap step counts (the
   same smoke rules as tools/run_workflow.py; a tiny random model cannot load from a checkpoint file); queue it
   under the page's client id (so the page shows the previews) and wait for completion; measure the boxes again
   (previews shown) and save a 1600x1000 screenshot.
4. The template browser's data: GET /workflow_templates lists the pack's workflows and each has a thumbnail.
Prints a Markdown table (the one recorded in docs/workflows.md) and writes it with the screenshots to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

HOST_DEFAULT = os.path.join(os.path.dirname(REPO), "shared", "hosts", "comfyui-0.3.64")
DEPS_DIR = os.path.join(tempfile.gettempdir(), "attnedit_frontend_check_deps")
# --no-deps: only what the test venv lacks, so the venv's torch/pydantic/... stay the ones in use.
DEPS = ["comfyui-frontend-package==1.27.10", "playwright", "pyee", "greenlet", "alembic", "sqlalchemy", "mako",
        "pydantic-settings", "python-dotenv", "requests", "urllib3", "certifi", "charset-normalizer", "spandrel"]
DEPS_IMPORTS = ["comfyui_frontend_package", "playwright", "pyee", "greenlet", "alembic", "sqlalchemy", "mako",
                "pydantic_settings", "dotenv", "requests", "urllib3", "certifi", "charset_normalizer", "spandrel"]
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1600, "height": 1000}
PACK_FOLDER = "attention-edit"
TINY_LOADERS = {"CheckpointLoaderSimple": "AttnEditTestTinyCheckpoint", "ControlNetLoader": "AttnEditTestTinyAdapter"}
SHIM = '''"""Test loaders for the frontend check (never shipped): tiny random MODEL/CLIP/VAE and T2I-Adapter."""
import sys
sys.path.insert(0, {tools!r})
import tiny_models  # noqa: E402

NODE_CLASS_MAPPINGS = dict(tiny_models.TEST_NODES)
'''


def ensure_deps() -> None:
    """Put DEPS_DIR (the packages this check needs beyond the test venv) on sys.path; refuse, with the one command
    that fills it, when they are missing (the pack never runs an installer itself)."""
    missing = [m for m in DEPS_IMPORTS if not os.path.isdir(os.path.join(DEPS_DIR, m))
               and not os.path.isfile(os.path.join(DEPS_DIR, m + ".py"))]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found in {DEPS_DIR}; fill it once with:\n  "
                         f"{sys.executable} -m pip install --no-deps --target {DEPS_DIR} {' '.join(DEPS)}")
    if DEPS_DIR not in sys.path:
        sys.path.insert(0, DEPS_DIR)
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"error: {CHROMIUM} not found: apt-get update && apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workflow_paths(only: str | None) -> list[str]:
    paths = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
    return [p for p in paths if not only or only in os.path.basename(p)]


def model_names(paths: list[str]) -> dict[str, set[str]]:
    """Model folder -> file names the workflows' loaders ask for (their placeholders)."""
    folders = {"ckpt_name": "checkpoints", "control_net_name": "controlnet", "sam_model": "sams"}
    out: dict[str, set[str]] = {}
    for path in paths:
        with open(path) as f:
            ui = json.load(f)
        for node in ui["nodes"]:
            for value in node.get("widgets_values") or []:
                if not isinstance(value, str):
                    continue
                for key, folder in folders.items():
                    if _widget_value(node, key) == value:
                        out.setdefault(folder, set()).add(value)
    return out


def _widget_value(node: dict, name: str):
    """The value of a named widget of a UI node (from the live node definitions)."""
    import workflow_api

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(node["type"])
    if cls is None:
        return None
    values = list(node.get("widgets_values") or [])
    for widget, options, control in workflow_api.widget_names(cls.INPUT_TYPES()):
        if not values:
            return None
        value = values.pop(0)
        if widget == name:
            return value
        if control:
            values.pop(0)
        if options.get("image_upload"):
            values.pop(0)
    return None


def prepare_host(root: str, host_src: str, paths: list[str]) -> str:
    """A temporary ComfyUI copy with the pack, the test loaders, placeholder models and the smoke picture."""
    import comfy_host

    comfy_host.boot()
    import tiny_models

    host = os.path.join(root, "ComfyUI")
    top_level = {"custom_nodes", "models", "input", "output", "user", "temp"}  # made fresh below
    shutil.copytree(host_src, host, ignore=lambda d, names: [n for n in names if n == "__pycache__" or (
        os.path.samefile(d, host_src) and n in top_level)])
    custom = os.path.join(host, "custom_nodes")
    os.makedirs(custom)
    os.symlink(REPO, os.path.join(custom, PACK_FOLDER))
    os.makedirs(os.path.join(custom, "attnedit_frontend_check_loaders"))
    with open(os.path.join(custom, "attnedit_frontend_check_loaders", "__init__.py"), "w") as f:
        f.write(SHIM.format(tools=TOOLS))
    for folder, names in model_names(paths).items():
        os.makedirs(os.path.join(host, "models", folder), exist_ok=True)
        for name in names:
            if folder == "sams":
                tiny_models.write_tiny_sam(os.path.join(host, "models", folder), name)
            else:  # placeholder: the frontend lists it; the queued prompt loads the tiny model instead
                open(os.path.join(host, "models", folder, name), "wb").close()
    os.makedirs(os.path.join(host, "input"))
    tiny_models.write_smoke_image(os.path.join(REPO, "workflows", "assets", "attention_edit_example.jpg"),
                                  os.path.join(host, "input", "attention_edit_example.jpg"))
    settings = os.path.join(host, "user", "default")
    os.makedirs(settings)
    with open(os.path.join(settings, "comfy.settings.json"), "w") as f:
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.InstalledVersion": "1.27.10"}, f)
    return host


def start_server(host: str, port: int, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([DEPS_DIR, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    log = open(log_path, "w")  # noqa: SIM115  (the server writes to it until it stops)
    proc = subprocess.Popen(["nice", "-n", "5", sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1",
                             "--port", str(port), "--disable-auto-launch"], cwd=host, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"error: ComfyUI exited early; see {log_path}")
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: ComfyUI did not answer in 600 s; see {log_path}")


def http_json(url: str, data: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


GEOMETRY_JS = """() => {
  const g = window.app.graph;
  const nodes = g._nodes.map(n => ({id: n.id, type: n.type, title: n.title, box: Array.from(n.boundingRect),
    imgs: (n.imgs || []).length, min: Array.from(n.computeSize())}));
  const groups = (g._groups || g.groups || []).map(gr => ({title: gr.title, box: Array.from(gr._bounding || gr.bounding)}));
  return {nodes, groups};
}"""

CHECK_JS = """(defs) => {
  const g = window.app.graph, out = {unknown: [], deprecated: [], bad_values: []};
  for (const n of g._nodes) {
    const def = defs[n.type];
    if (!def) { if (!['Note', 'MarkdownNote', 'Reroute'].includes(n.type)) out.unknown.push(n.type); continue; }
    if (def.deprecated) out.deprecated.push(n.type);
    for (const w of n.widgets || []) {
      const opts = w.options && w.options.values;
      if (Array.isArray(opts) && opts.length && !opts.includes(w.value))
        out.bad_values.push(`${n.type}.${w.name}=${JSON.stringify(w.value)}`);
    }
  }
  return out;
}"""


def overlaps(geometry: dict) -> list[str]:
    out = []
    nodes = geometry["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append(f"{a['title']}/{b['title']}")
    return out


def outside_groups(geometry: dict) -> list[str]:
    """Nodes (not notes) that lie in no group."""
    out = []
    for n in geometry["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        x, y, w, h = n["box"]
        if not any(gx <= x and gy <= y and x + w <= gx + gw and y + h <= gy + gh
                   for gx, gy, gw, gh in (g["box"] for g in geometry["groups"])):
            out.append(n["title"])
    return out


def smoke_prompt(output: dict) -> dict:
    """The frontend's API prompt with the tiny loaders and smoke caps (as tools/run_workflow.py does headless)."""
    import tiny_models

    for node in output.values():
        if node["class_type"] in TINY_LOADERS:
            node["class_type"] = TINY_LOADERS[node["class_type"]]
    tiny_models.cap_for_smoke(output)
    return output


def check_workflow(page, base: str, path: str, defs: dict, shots: str, timeout: float, load_only: bool) -> dict:
    name = os.path.splitext(os.path.basename(path))[0]
    messages: list[str] = []
    on_console = lambda m: messages.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None  # noqa: E731
    on_error = lambda e: messages.append(f"pageerror: {e}")  # noqa: E731
    page.on("console", on_console)
    page.on("pageerror", on_error)
    with open(path) as f:
        ui = json.load(f)
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [ui, name])
    page.wait_for_timeout(1500)
    row = {"workflow": name, **page.evaluate(CHECK_JS, defs)}
    loaded = page.evaluate(GEOMETRY_JS)
    row["overlaps_loaded"] = overlaps(loaded)
    row["outside_groups"] = outside_groups(loaded)
    row["status"] = "loaded"
    if not load_only:
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        client = page.evaluate("() => window.comfyAPI?.api?.api?.clientId || window.app.api?.clientId || null")
        queued = http_json(base + "/prompt", {"prompt": smoke_prompt(prompt), "client_id": client})
        pid, start = queued["prompt_id"], time.time()
        row["status"] = "timeout"
        while time.time() - start < timeout:
            hist = http_json(f"{base}/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                status = hist[pid]["status"]
                row["status"] = "completed" if status.get("status_str") == "success" else "error"
                if row["status"] == "error":
                    row["error"] = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                break
            time.sleep(2)
        row["seconds"] = round(time.time() - start)
        page.wait_for_timeout(2500)  # previews arrive over the websocket and are drawn
    after = page.evaluate(GEOMETRY_JS)
    row["overlaps_after"] = overlaps(after)
    row["geometry"] = after
    page.screenshot(path=os.path.join(shots, f"{name}.png"))
    page.remove_listener("console", on_console)
    page.remove_listener("pageerror", on_error)
    row["console"] = messages
    return row


def table(rows: list[dict]) -> str:
    lines = ["| workflow | loaded | unknown / deprecated nodes | bad widget values | console errors / warnings | "
             "overlaps (loaded / after run) | outside groups | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| `{r['workflow']}` | yes | {len(r['unknown'])} / {len(r['deprecated'])} | {len(r['bad_values'])} | "
            f"{len(r['console'])} | {len(r['overlaps_loaded'])} / {len(r['overlaps_after'])} | "
            f"{len(r['outside_groups'])} | {r['status']}" + (f" ({r['seconds']} s)" if "seconds" in r else "") + " |")
    return "\n".join(lines)


def check_templates(base: str, names: list[str]) -> list[str]:
    problems = []
    listed = http_json(base + "/workflow_templates").get(PACK_FOLDER, [])
    for name in names:
        if name not in listed:
            problems.append(f"{name}: not listed by /workflow_templates")
            continue
        try:
            urllib.request.urlopen(f"{base}/api/workflow_templates/{PACK_FOLDER}/{name}.jpg", timeout=10)
        except OSError as err:
            problems.append(f"{name}.jpg: {err}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="check only workflows whose file name contains this")
    p.add_argument("--load-only", action="store_true", help="load and measure, do not queue")
    p.add_argument("--out", default=os.path.join(REPO, "out", "frontend_check"), help="screenshots + report")
    p.add_argument("--timeout", type=float, default=600, help="seconds per queued workflow")
    args = p.parse_args(argv)
    host_src = os.environ.get("COMFYUI_PATH", HOST_DEFAULT)
    if not os.path.isfile(os.path.join(host_src, "main.py")):
        print(f"error: no ComfyUI at {host_src} (set COMFYUI_PATH)", file=sys.stderr)
        return 2
    ensure_deps()
    from playwright.sync_api import sync_playwright

    paths = workflow_paths(args.only)
    os.makedirs(args.out, exist_ok=True)
    rows, server = [], None
    with tempfile.TemporaryDirectory(prefix="attnedit_frontend_") as root:
        host = prepare_host(root, host_src, paths)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            server = start_server(host, port, os.path.join(args.out, "server.log"))
            defs = http_json(base + "/object_info")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(base, wait_until="networkidle")
                page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady !== false",
                                       timeout=120000)
                page.wait_for_timeout(3000)
                for path in paths:
                    print("checking", os.path.basename(path), flush=True)
                    rows.append(check_workflow(page, base, path, defs, args.out, args.timeout, args.load_only))
                browser.close()
            template_problems = check_templates(base, [os.path.splitext(os.path.basename(q))[0] for q in paths])
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report = table(rows)
    report += "\n\nTemplate browser: " + ("; ".join(template_problems) if template_problems else
                                          f"all {len(paths)} workflows listed, each with its thumbnail.")
    print(report)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "details.json"), "w") as f:
        json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["unknown"] or r["deprecated"] or r["bad_values"] or r["console"]
           or r["overlaps_after"] or r["outside_groups"] or r["status"] not in ("completed", "loaded")]
    return 1 if bad or template_problems else 0


if __name__ == "__main__":
    sys.exit(main())
