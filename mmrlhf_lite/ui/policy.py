"""The Policy tab's work (no gradio here): which runs have an aligned policy, the loaded `generate.PolicyChat`,
a conversation kept turn by turn for both models, the chat as the page shows it, the critique cards, and the
export with its download.

A conversation is a list of turns `{"images": [...], "question": ..., "base": ..., "policy": ...}`; each
model is asked with its own earlier answers (`generate.Turn`), so the base and the aligned policy each hold
their own side of the same conversation. Export writes `<runs root>/<run>/export/<policy|reward>-<adapter|
merged>/` with `mmrlhf_lite.export` (an earlier export of the same kind is replaced); an adapter is offered
as a .zip download, a merged model (gigabytes for a real base) never: the message says where it is.

    python app.py            # Policy tab
"""
from __future__ import annotations

import html
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .jobs import RECIPE_FILE, folder_size, list_runs, run_path
from .safety import Refused

MAX_IMAGES = 8
DOWNLOAD_LIMIT = 2**30  # an export larger than this is never offered as a download (say where it is)
_chat: dict = {}
_chat_lock = threading.Lock()


def policy_runs(runs_root: str | os.PathLike) -> list[str]:
    """Runs whose dpo stage saved an aligned policy."""
    return [n for n in list_runs(runs_root) if (Path(runs_root) / n / "dpo" / "final" / "adapter_config.json").exists()]


def toy_notice(runs_root, run_name: str | None) -> str:
    """The tiny-model warning for a run whose base is `tiny:*` (empty otherwise)."""
    import yaml

    from ..generate import TOY_NOTICE, is_toy

    if not run_name:
        return ""
    try:
        tree = yaml.safe_load((run_path(runs_root, run_name) / RECIPE_FILE).read_text()) or {}
    except (OSError, Refused, yaml.YAMLError):
        return ""
    path = str((tree.get("model") or {}).get("path") or "")
    return ("⚠ " + TOY_NOTICE.format(path=html.escape(path))) if is_toy(path) else ""


def load_chat(run: Path):
    """The run's PolicyChat, loaded once and kept for the next question (one run at a time)."""
    from ..generate import PolicyChat

    adapter = run / "dpo" / "final" / "adapter_model.safetensors"
    if not adapter.exists():
        raise Refused(f"run '{run.name}' has no aligned policy yet (its `dpo` stage has not finished)")
    key = (str(run), adapter.stat().st_mtime_ns)
    with _chat_lock:
        if _chat.get("key") != key:
            _chat.clear()
            _chat.update(key=key, chat=PolicyChat.from_run(run))
        return _chat["chat"]


def history(turns: list[dict], which: str):
    """One model's side of the conversation so far, as `generate.Turn`s."""
    from ..generate import Turn

    return [Turn(t["question"], t[which], list(t["images"])) for t in turns]


def chat_messages(turns: list[dict], which: str) -> list[dict]:
    """One model's side of the conversation as the page's chat shows it: each question with the images sent
    with it (the pictures themselves), then the model's answer."""
    out = []
    for t in turns:
        out.append({"role": "user", "content": [*({"path": p} for p in t["images"]), t["question"]]})
        if t.get(which):
            out.append({"role": "assistant", "content": t[which]})
    return out


def scores_html(results: list[dict], turn: int | None = None) -> str:
    cards = []
    for label, r in zip(("Base model", "Aligned policy"), results):
        crit = html.escape(r["critique"]) if r["critique"] else "<em>(no critique: the run scores without one)</em>"
        cards.append(f"<div class='mm-card'><div class='mm-card-head'><b>{label}</b> · score <b>{r['score']:.4f}</b></div>"
                     f"<div class='mm-card-critique'>Critique: {crit}</div></div>")
    best = max(range(len(results)), key=lambda i: results[i]["score"])
    which = f" of turn {turn}" if turn else ""
    return (f"<div class='mm-cards' data-best='{best}'>" + "".join(cards) + "</div>"
            f"<p style='font-size:13px'>Scores{which} from this run's critique reward model (higher is better).</p>")


def export(runs_root: str | os.PathLike, run_name: str, what: str, merge: bool, download_dir: str | os.PathLike,
           progress=print) -> tuple[str, list[Path]]:
    """Export a run's policy or reward model; (the message as Markdown, the files offered to download: a .zip
    of an adapter export below DOWNLOAD_LIMIT, nothing for a merged model)."""
    from ..export import ExportError, export_model

    if what not in ("policy", "reward"):
        raise Refused("export the policy or the reward model")
    run = run_path(runs_root, run_name)
    to = run / "export" / f"{what}-{'merged' if merge else 'adapter'}"
    try:
        out = export_model(run, what, to, merge=bool(merge), overwrite=True, progress=progress)
    except ExportError as exc:
        raise Refused(str(exc)) from None
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    size = folder_size(out)
    load = (f'AutoModelForImageTextToText.from_pretrained("{out}")' if merge else
            f'PeftModel.from_pretrained(base, "{out}")')
    lines = [f"Exported the {what} of **{html.escape(run_name)}** "
             f"({'merged, bf16 safetensors' if merge else 'LoRA adapter'}, {size / 2**20:.1f} MB: {html.escape(files)}) to",
             "", _code(str(out)), "", "Load it (its README.md is the model card):", "", _code(load)]
    downloads: list[Path] = []
    if merge:
        lines += ["", "A merged model is not offered as a download (a real base is gigabytes): copy it from the "
                      "folder above."]
    elif size > DOWNLOAD_LIMIT:
        lines += ["", f"At {size / 2**30:.1f} GB it is not offered as a download: copy it from the folder above."]
    else:
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=str(download_dir)))
        downloads.append(Path(shutil.make_archive(str(folder / f"{run_name}-{what}-adapter"), "zip", out)))
        lines += ["", "The adapter is below as a .zip to download."]
    return "\n".join(lines), downloads


def _code(text: str) -> str:
    """`text` as a Markdown code block (shown as is, copied as is: no HTML escaping inside)."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text}\n{fence}"
