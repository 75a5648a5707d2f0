"""What every tab's handlers share: the app's folders (`UIConfig`), readable errors (`readable`), and the
adapter between the page's positional inputs and the recipe form by name (`with_form`).

A handler that reads or sets the recipe form takes and returns a `form.FormValues` (keyed by recipe key);
the page has one input per field, so `with_form` unpacks the fields into a FormValues on the way in and
spreads a returned FormValues over the fields on the way out (`KEEP_FORM`: leave every field as it is).

    python app.py
"""
from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..recipe import RecipeError
from ..runs import RunFolderError
from .form import FIELDS, FormValues
from .safety import Refused

log = logging.getLogger("mmrlhf_lite.ui")
KEEP_FORM = object()  # returned in place of a FormValues: every field of the form stays as it is


@dataclass(frozen=True)
class UIConfig:
    data_root: Path
    runs_root: Path
    recipes_root: Path
    upload_dir: Path
    max_upload_bytes: int
    poll_seconds: float = 1.5  # the Live tab's timer period (app.py --poll-seconds)


def readable(fn):
    """Turn any exception into a gr.Error with a one-line message (HTML-escaped; no stack trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (Refused, RecipeError, RunFolderError, ValueError, FileNotFoundError) as exc:
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page gets a sentence, the log gets the trace
            log.exception("UI handler %s failed", fn.__name__)
            raise gr.Error(html.escape(f"{type(exc).__name__}: {exc}"), print_exception=False) from None
    return wrapper


def with_form(fn, form_at: int | None = None):
    """`fn` as gradio calls it. With `form_at`, the inputs `[*first form_at inputs, *one per form field, *rest]`
    arrive as `fn(*first, FormValues, *rest)`; without, the inputs are passed as they are. In what `fn`
    returns, a FormValues becomes one value per field and KEEP_FORM one `gr.skip()` per field.

    (Not functools.wraps: gradio reads the signature it finds to count inputs, and the page's is positional.)"""
    n = len(FIELDS)

    def call(*args):
        if form_at is not None:
            args = (*args[:form_at], FormValues.from_inputs(args[form_at:form_at + n]), *args[form_at + n:])
        return spread(fn(*args))

    call.__name__ = getattr(fn, "__name__", "handler")
    call.__doc__ = fn.__doc__
    return call


def spread(out):
    """A handler's outputs with a FormValues (or KEEP_FORM) spread over the form's fields."""
    if isinstance(out, FormValues):
        return tuple(out.inputs())
    if out is KEEP_FORM:
        return tuple(gr.skip() for _ in FIELDS)
    if not isinstance(out, tuple):
        return out
    flat: list = []
    for value in out:
        if isinstance(value, FormValues):
            flat += value.inputs()
        elif value is KEEP_FORM:
            flat += [gr.skip()] * len(FIELDS)
        else:
            flat.append(value)
    return tuple(flat)
