"""Data CLI: inspect a preference data set, or convert it to another format.

    python -m mmrlhf_lite.data stats PATH [--format F] [--media-root DIR] [--processor MODEL_PATH]
        (also counts the prompts, their images and the rows without a ranking that online rounds can use)
    python -m mmrlhf_lite.data export PATH OUT --to FORMAT [--format F] [--media-root DIR]

`--processor` takes a model folder or a `tiny:qwen2_vl:xs` style path and adds token-length
percentiles (prompt with its image tokens, responses, critiques).
"""
from __future__ import annotations

import argparse
import json
import sys

from .formats import FORMATS
from .media import DEFAULT_MAX_IMAGE_PIXELS
from .writers import WRITERS


def _load(args, prompts: bool = False):
    from .media import set_max_image_pixels
    from .readers import load_groups

    set_max_image_pixels(args.max_image_pixels)

    return load_groups(args.path, fmt=args.format, media_root=args.media_root, on_error=args.on_error,
                       max_frames=args.max_frames, dataset=args.dataset, prompts=prompts)


def cmd_stats(args) -> int:
    from .stats import format_report, group_stats, token_stats

    result = _load(args, prompts=True)  # rows without a ranking are counted as prompts for online rounds
    stats = group_stats(result)
    tokens = None
    if args.processor:
        from ..models.families import detect_family
        from ..models.loading import load_processor, resolve_model_path

        path = resolve_model_path(args.processor)
        tokens = token_stats(result.groups, load_processor(path, detect_family(path)), sample=args.token_sample)
    if args.json:
        print(json.dumps({**stats, "tokens": tokens}, indent=2))
    else:
        print(f"source      {args.path}")
        print(format_report(stats, tokens))
        for w in result.warnings[: args.show_warnings]:
            print(f"  warning: {w}")
    return 0


def cmd_export(args) -> int:
    from .writers import write_groups

    result = _load(args)
    out = write_groups(result.groups, args.out, fmt=args.to, media_root=args.out_media_root)
    print(f"wrote {len(result.groups)} groups as {args.to} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mmrlhf_lite.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("path", help="data file, folder of files, or `datasets` save_to_disk folder")
        p.add_argument("--format", default="auto", choices=FORMATS, help="row format (default: detect)")
        p.add_argument("--media-root", default=None, help="folder relative media paths resolve against "
                       "(default: each data file's folder)")
        p.add_argument("--on-error", default="raise", choices=("raise", "skip"))
        p.add_argument("--dataset", default=None, help="entry of the LLaMA-Factory dataset_info.json at PATH")
        p.add_argument("--max-frames", type=int, default=8, help="frames sampled per video")
        p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="largest image (width x height) opened; 0 = no limit (data.max_image_pixels)")

    s = sub.add_parser("stats", help="print counts (and token lengths with --processor)")
    common(s)
    s.add_argument("--processor", default=None, help="model folder or tiny:<family>[:<size>] for token lengths")
    s.add_argument("--token-sample", type=int, default=1000, help="groups whose prompts are encoded")
    s.add_argument("--show-warnings", type=int, default=10, help="warnings printed (all are counted)")
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    s.set_defaults(func=cmd_stats)

    e = sub.add_parser("export", help="write the groups in another format")
    common(e)
    e.add_argument("out", help="output file: .jsonl, .json or .parquet")
    e.add_argument("--to", required=True, choices=tuple(WRITERS))
    e.add_argument("--out-media-root", default=None, help="write media paths relative to this folder "
                   "(default: the output file's folder)")
    e.set_defaults(func=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DataError
    from .media import MediaError

    try:
        return args.func(args)
    except (DataError, MediaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a readable line, the trace to a file
        from ..train import report_error

        return report_error(exc, ".")


if __name__ == "__main__":
    sys.exit(main())
