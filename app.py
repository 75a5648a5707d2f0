"""Web UI: from a preference file to a trained critique reward model and an MM-DPO adapter.

    python app.py [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--data-dir data]

Thin on purpose: every job is `python -m mmrlhf_lite.train` on a recipe written into its run folder,
and the page reads the run folders (mmrlhf_lite/ui/). Local by default; `--host 0.0.0.0` needs
`--auth user:password` (or MMRLHF_UI_AUTH). Analytics are off and uploads stay in `--upload-dir`
(default `.gradio_tmp/` in this folder): the app makes no outside network request.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--runs-dir", default="runs", help="runs root: one folder per training run (default runs)")
    ap.add_argument("--data-dir", default="data", help="data root: files the UI may read and where uploads go "
                    "(default data)")
    ap.add_argument("--recipes-dir", default=str(HERE / "recipes"), help="recipes offered in the Train tab")
    ap.add_argument("--upload-dir", default=str(HERE / ".gradio_tmp"),
                    help="gradio's temp folder for uploads and served images (default .gradio_tmp/ here)")
    ap.add_argument("--max-upload-mb", type=float, default=512, help="largest upload accepted (default 512 MB)")
    ap.add_argument("--poll-seconds", type=float, default=1.5,
                    help="how often the Live tab asks for news while a run is active (default 1.5 s)")
    ap.add_argument("--auth", default=None, help="user:password login (required with a non-local --host); "
                    "or set MMRLHF_UI_AUTH")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.poll_seconds > 0:
        print(f"error: --poll-seconds must be a positive number of seconds, not {args.poll_seconds}", file=sys.stderr)
        return 2
    # nothing that imports gradio may run before these two lines
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(Path(args.upload_dir).resolve())
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from mmrlhf_lite.ui.safety import AUTH_ENV, Refused, check_bind, parse_auth

    try:
        auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
        note = check_bind(args.host, auth)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    roots = {name: Path(p).resolve() for name, p in (("data", args.data_dir), ("runs", args.runs_dir),
                                                     ("upload", args.upload_dir))}
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)

    from mmrlhf_lite.ui.blocks import LAUNCH_KWARGS, build_app, queue
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.serving import stop_services_at_exit

    cfg = UIConfig(data_root=roots["data"], runs_root=roots["runs"], recipes_root=Path(args.recipes_dir).resolve(),
                   upload_dir=roots["upload"], max_upload_bytes=int(args.max_upload_mb * 2**20),
                   poll_seconds=args.poll_seconds)
    print(f"mmrlhf-lite UI: {note}\n  data root: {cfg.data_root}\n  runs root: {cfg.runs_root}\n"
          f"  uploads:   {cfg.upload_dir} (limit {args.max_upload_mb:g} MB)", flush=True)
    app = build_app(cfg)
    stop_services_at_exit()  # the reward-model services started from the page end with the app (SIGTERM too)
    queue(app)
    app.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, inbrowser=False,
               max_file_size=cfg.max_upload_bytes, allowed_paths=[], show_error=False, quiet=False,
               **LAUNCH_KWARGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
