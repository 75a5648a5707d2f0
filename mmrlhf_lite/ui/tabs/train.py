"""The Train tab: the recipe form (from `recipe.recipe_fields()`), the essentials and the pre-flight beside
Start, two presets, the YAML preview, Save as recipe, and Start.

`TrainHandlers` holds the tab's handlers (what its tests call). Every handler that reads or sets the form
takes or returns a `form.FormValues`, keyed by recipe key; `base.with_form` converts at the page's edge.
Start launches only what the pre-flight accepts (the same check runs again at Start). `build` lays the tab
out and wires its own events; blocks.py wires "Train on this data" and Start's switch to the Live tab.

    python app.py            # Train tab
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import time
from types import SimpleNamespace

import gradio as gr

from .. import essentials, form, jobs
from ..base import KEEP_FORM, UIConfig, log, readable, with_form
from ..form import FormValues, same_value
from ..safety import Refused, inside

_STAMP = re.compile(r"-\d{8}-\d{6}$")  # the time stamp of a suggested run name
SHARDING_CHOICES = [("none (each GPU holds the model: DDP)", jobs.NO_SHARDING),
                    ("FSDP2 (the base sharded over the GPUs)", jobs.FSDP2)]
SHARDING_HELP = ("DDP while one GPU holds the whole model (fastest); FSDP2 when it does not (reward and dpo "
                 "then hold 1/N of the base per GPU)")
SKIP_BAD_ROWS = "Skip bad rows (data.on_error: skip)"


class TrainHandlers:
    def __init__(self, cfg: UIConfig):
        self.cfg = cfg

    # ------------------------------------------------------------------------------------ recipes
    def load(self):
        """Page load: the recipe list, and its default recipe in the form with a suggested run name."""
        recipes = self.recipe_choices()
        if recipes["value"] is None:
            return recipes, KEEP_FORM, gr.skip()
        return (recipes, *self.load_recipe(recipes["value"]))

    def recipe_choices(self):
        choices = [(r, r) for r in form.list_recipes(self.cfg.recipes_root)]
        last = self.last_run_with_recipe()
        if last:
            choices.append((f"last used (run {last})", form.LAST_USED))
        default = "demo.yaml" if any(v == "demo.yaml" for _, v in choices) else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=default)

    def last_run_with_recipe(self) -> str | None:
        runs = [n for n in jobs.list_runs(self.cfg.runs_root) if (self.cfg.runs_root / n / jobs.RECIPE_FILE).exists()]
        if not runs:
            return None
        return max(runs, key=lambda n: (self.cfg.runs_root / n / jobs.RECIPE_FILE).stat().st_mtime)

    @readable
    def load_recipe(self, choice: str | None) -> tuple[FormValues, str]:
        """(the form of a recipe file or of the last run's recipe, a suggested run name)."""
        if choice == form.LAST_USED:
            last = self.last_run_with_recipe()
            if not last:
                raise Refused("no run has a recipe yet")
            path, stem = jobs.run_path(self.cfg.runs_root, last) / jobs.RECIPE_FILE, _STAMP.sub("", last)
        else:
            path = inside(self.cfg.recipes_root, choice, what="recipe")
            if path.suffix != ".yaml" or not path.is_file():
                raise Refused(f"recipe '{choice}' not found under the recipes folder")
            stem = path.stem
        now = form.form_values(form.recipe_tree(path), self.cfg.data_root, path.parent, self.cfg.runs_root)
        return now, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"

    # The form is never replaced behind the user's back: a recipe is loaded when it is picked from the list
    # (not when the list is merely opened and closed), and over edited settings only after asking.
    # `loaded` (a gr.State) is what the form held right after the last load, save or start: edits are
    # the fields that differ from it.
    def remember(self, choice: str | None, run_name: str, now: FormValues):
        """The form as it is now becomes the unedited state (after a load, a save or a start)."""
        return {"choice": choice, "run name": run_name, "form": dict(now)}, gr.update(visible=False)

    @staticmethod
    def edited_keys(loaded: dict | None, run_name: str, now: FormValues) -> list[str]:
        if not loaded or loaded.get("form") is None:
            return []
        name = [] if same_value(loaded.get("run name"), run_name) else ["run name"]
        return name + form.edited_keys(loaded["form"], now)

    @readable
    def choose_recipe(self, choice: str | None, loaded: dict | None, run_name: str, now: FormValues):
        """A recipe picked from the list: load it unless that would discard edits, which it names instead.
        Outputs: the form, the run name, `loaded`, the notice, the "Load (discard my edits)" button."""
        if not choice:
            return KEEP_FORM, gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False)
        edited = self.edited_keys(loaded, run_name, now)
        current = (loaded or {}).get("choice")
        if choice == current and not edited:
            return KEEP_FORM, gr.skip(), gr.skip(), "", gr.update(visible=False)
        if edited:
            label = _choice_label(choice)
            shown = ", ".join(f"`{html.escape(k)}`" for k in edited[:8]) + (
                f" and {len(edited) - 8} more" if len(edited) > 8 else "")
            notice = (f"**Nothing was changed.** The form holds your edits of {html.escape(_choice_label(current))}: "
                      f"{shown}. Keep editing, or load **{html.escape(label)}** with the button below "
                      "(your edits are lost).")
            return KEEP_FORM, gr.skip(), gr.skip(), notice, gr.update(visible=True, value=f"Load {label} (discard my edits)")
        new, name = self.load_recipe(choice)
        return (new, name, {"choice": choice, "run name": name, "form": dict(new)},
                f"Loaded recipe **{html.escape(_choice_label(choice))}**.", gr.update(visible=False))

    # ------------------------------------------------------------------------------------ presets
    @readable
    def preset(self, name: str, loaded: dict | None, now: FormValues):
        """A preset button: apply it, unless it would replace edits, which it names instead. Outputs: the form,
        `loaded`, the notice, the "Apply (discard my edits)" button, the preset waiting for it."""
        conflicts = essentials.preset_conflicts(name, now, (loaded or {}).get("form"), (loaded or {}).get("preset"))
        if conflicts:
            shown = ", ".join(f"`{html.escape(k)}`" for k in conflicts)
            notice = (f"**Nothing was changed.** The preset **{html.escape(name)}** would replace your edits of "
                      f"{shown}. Keep editing, or apply it with the button below (those edits are lost).")
            return (KEEP_FORM, gr.skip(), notice,
                    gr.update(visible=True, value=f"Apply {name} (discard my edits of {', '.join(conflicts)})"), name)
        return self.apply_preset(name, loaded, now)

    @readable
    def apply_preset(self, name: str | None, loaded: dict | None, now: FormValues):
        """Set the preset's keys (the confirmation button, or a preset that replaces no edit)."""
        if not name:
            raise Refused("no preset is waiting to be applied; click a preset button first")
        new, changed = essentials.apply_preset(name, now)
        state = {**(loaded or {}), "preset": essentials.preset_form_values(name)}
        return new, state, essentials.preset_message(name, changed), gr.update(visible=False), None

    def smoke_label(self, now: FormValues):
        """The smoke-test preset's button with the time its run takes on this machine (measured, never
        promised: essentials.preset_label)."""
        try:
            label = essentials.preset_label(essentials.SMOKE, now, data_root=self.cfg.data_root,
                                            runs_root=self.cfg.runs_root,
                                            scratch=essentials.scratch_dir(self.cfg.upload_dir))
        except Exception:  # noqa: BLE001 - a label never takes the tab down
            log.exception("preset label failed")
            label = f"Preset: {essentials.SMOKE}"
        return gr.update(value=label)

    # ------------------------------------------------------------------------------------ preview, pre-flight
    def recipe_yaml(self, run_name: str, now: FormValues) -> str:
        """The read-only preview of what Start will write (keys that differ from the defaults)."""
        return essentials.yaml_preview(now, data_root=self.cfg.data_root, runs_root=self.cfg.runs_root,
                                       run_name=(run_name or "").strip() or None)

    def preflight(self, run_name: str, now: FormValues, processes=1, sharding=jobs.NO_SHARDING):
        t0 = time.time()
        try:
            return essentials.preflight(now, data_root=self.cfg.data_root, runs_root=self.cfg.runs_root,
                                        scratch=essentials.scratch_dir(self.cfg.upload_dir), run_name=run_name,
                                        processes=processes, sharding=sharding or jobs.NO_SHARDING)
        except Exception as exc:  # noqa: BLE001 - the pre-flight never takes the form down
            log.exception("pre-flight failed")
            text = f"{type(exc).__name__}: {exc}"
            return essentials.Preflight(f"**Pre-flight: cannot start.** {html.escape(text)}", False, 0, [text])
        finally:
            log.debug("pre-flight in %.2f s", time.time() - t0)

    def estimate(self, run_name: str, now: FormValues, processes=1, sharding=jobs.NO_SHARDING):
        """The pre-flight beside Start, Start enabled only when it accepts the form, and "Skip bad rows" shown
        only when bad data rows are what stops it."""
        p = self.preflight(run_name, now, processes, sharding)
        skip = gr.update(visible=p.bad_rows > 0,
                         value=f"Skip the {p.bad_rows} bad row(s) (data.on_error: skip)" if p.bad_rows else SKIP_BAD_ROWS)
        return p.markdown, gr.update(interactive=p.can_start), skip

    # ------------------------------------------------------------------------------------ start, save
    @readable
    def start(self, run_name: str, now: FormValues, processes=1, sharding=jobs.NO_SHARDING):
        """Launch the form's recipe in a new run folder, if the pre-flight accepts it (the page's Start is
        disabled otherwise; this is the same check for a request that bypasses it)."""
        try:
            processes = int(processes or 1)
        except (TypeError, ValueError):
            raise Refused(f"processes must be a whole number (one process per GPU), got {processes!r}") from None
        sharding = sharding or jobs.NO_SHARDING
        jobs.check_launch(processes, sharding)
        name = (run_name or "").strip() or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        run = jobs.run_path(self.cfg.runs_root, name)
        if run.exists():
            raise Refused(f"run '{name}' already exists; pick another name (or Resume it in the live view)")
        p = self.preflight(name, now, processes, sharding)
        if not p.can_start:
            raise Refused("the pre-flight does not accept this form: " + "; ".join(p.errors))
        text = form.run_recipe(now, data_root=self.cfg.data_root, runs_root=self.cfg.runs_root, run_dir=run)
        jobs.start_run(self.cfg.runs_root, name, text, processes=processes, sharding=sharding)
        msg = (f"Started **{html.escape(name)}** ({jobs.launch_label(processes, sharding)}) at "
               f"{time.strftime('%H:%M:%S')}: following it in the Live tab.")
        return msg, gr.update(selected="live"), gr.update(choices=jobs.list_runs(self.cfg.runs_root), value=name)

    def start_from_page(self, run_name: str, now: FormValues, processes=1, sharding=jobs.NO_SHARDING):
        """Start as the page's button does it: a refusal is said in the status line (replacing what was there)
        instead of an error over it; the last output is the run started (None: not started), which the
        follow-ups read."""
        try:
            msg, tabs, runs = self.start(run_name, now, processes, sharding)
        except gr.Error as exc:
            return f"**Not started:** {exc.message}", gr.skip(), gr.skip(), None
        return msg, tabs, runs, runs["value"]

    @readable
    def save_recipe(self, name: str, now: FormValues):
        path = form.save_recipe(now, name, recipes_root=self.cfg.recipes_root,
                                data_root=self.cfg.data_root, runs_root=self.cfg.runs_root)
        rel = path.relative_to(self.cfg.recipes_root).as_posix()
        update = self.recipe_choices()
        update["value"] = rel
        return f"Saved recipe **{html.escape(rel)}**.", update


def _choice_label(choice: str | None) -> str:
    if choice == form.LAST_USED:
        return "the last used recipe"
    return choice or "the form's defaults"


def when_inputs_change(fn, n_out: int):
    """`fn` for the page's edit events, taking first a gr.State with the digest of the inputs of its last call
    from this page and returning it last: when the inputs are the same again, nothing is computed and every
    output is left as it is (gr.skip()). A text box's `change` fires again with the same value (seen: the run
    name's, with nothing edited, after the page's first pre-flight), and each repeat was a whole pre-flight
    (it reads the data) and a redraw of its outputs."""
    def call(last, *args):
        key = hashlib.sha1(json.dumps(args, sort_keys=True, default=repr).encode()).hexdigest()
        if key == last:
            return (*[gr.skip()] * n_out, last)
        out = fn(*args)
        return (*(out if isinstance(out, tuple) else (out,)), key)
    return call


def _input(spec: form.FieldSpec):
    common = {"label": spec.key, "info": spec.info, "elem_id": "f-" + spec.key.replace(".", "-")}
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "multi":
        return gr.CheckboxGroup(choices=list(spec.choices), value=list(spec.default), **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=spec.default, precision=0 if spec.kind == "int" else None, **common)
    if spec.kind == "list":
        return gr.Textbox(value=", ".join(spec.default), **common)
    return gr.Textbox(value=spec.default or "", **common)


def build(h: TrainHandlers) -> SimpleNamespace:
    inputs: dict[str, gr.components.Component] = {}

    def row_of(keys):
        with gr.Row():
            for key in keys:
                inputs[key] = _input(form.FIELD_BY_KEY[key])

    with gr.Tab("2 · Train", id="train") as tab:
        # (inside the tab: a component made between the tabs becomes a tab of its own)
        yaml_seen, estimate_seen = gr.State(None), gr.State(None)  # the page's last form (when_inputs_change)
        with gr.Row(elem_classes="mm-offscreen"):  # the API's preview and pre-flight, out of sight
            api_yaml = gr.Button("recipe YAML (API)", elem_id="api-recipe-yaml", elem_classes="mm-offscreen")
            api_estimate = gr.Button("pre-flight (API)", elem_id="api-estimate", elem_classes="mm-offscreen")
        with gr.Row():
            recipe_dd = gr.Dropdown(label="Recipe (recipes/ or the last one used)", choices=[], elem_id="recipe",
                                    allow_custom_value=True, scale=2)
            run_name = gr.Textbox(label="Run name (a new folder under the runs root)", elem_id="run-name", scale=2)
            processes = gr.Number(label="Processes (GPUs; > 1 launches torchrun, docs/distributed.md)", value=1,
                                  precision=0, minimum=1, elem_id="processes", scale=1)
            sharding = gr.Radio(SHARDING_CHOICES, value=jobs.NO_SHARDING, label="Sharding (with Processes > 1)",
                                info=SHARDING_HELP, interactive=False, elem_id="sharding", scale=2)
        # the essentials and the pre-flight beside Start; every other setting is folded below
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="train-essentials"):
                gr.Markdown("**Essentials** (every other setting is in the closed sections below)")
                row_of(("model.path", "data.path", "data.demo.groups"))
                row_of(("run.stages", "model.lora_r"))
                row_of(("reward.train.max_steps", "reward.train.epochs", "reward.train.learning_rate"))
                row_of(("dpo.train.max_steps", "dpo.train.epochs", "dpo.train.learning_rate"))
            with gr.Column(scale=2, elem_id="train-side"):
                start = gr.Button("Start", variant="primary", interactive=False, elem_id="start")
                with gr.Row():
                    presets = [gr.Button(f"Preset: {name}", size="sm", elem_id=f"preset-{i}")
                               for i, name in enumerate(essentials.PRESETS)]
                status = gr.Markdown(elem_id="train-status")
                load = gr.Button("Load the recipe (discard my edits)", visible=False, variant="stop",
                                 elem_id="recipe-load")
                preset_apply = gr.Button("Apply the preset (discard my edits)", visible=False, variant="stop",
                                         elem_id="preset-apply")
                estimate = gr.Markdown("**Pre-flight**: ...", elem_id="train-estimate")
                skip_bad = gr.Button(SKIP_BAD_ROWS, visible=False, size="sm", elem_id="skip-bad-rows")
        preview = gr.Textbox(label="Recipe YAML that Start will run: only the keys whose values differ from the "
                                   "defaults (read-only; updated as the form changes)",
                             interactive=False, lines=12, max_lines=40, elem_id="train-yaml")
        with gr.Row():
            save_name = gr.Textbox(label="Save the form as recipe (name)", elem_id="save-name", scale=3)
            save = gr.Button("Save as recipe", elem_id="save-recipe", scale=1)
        loaded = gr.State(None)  # the form right after the last load/save/start (see TrainHandlers.choose_recipe)
        pending = gr.State(None)  # the preset waiting for "Apply (discard my edits)"
        for section in dict.fromkeys(s.section for s in form.FIELDS):   # every recipe section, in recipe order
            specs = [s for s in form.FIELDS if s.section == section and s.key not in essentials.ESSENTIALS]
            with gr.Accordion(f"{section} ({len(specs)} more settings)", open=False, elem_id=f"section-{section}"):
                for i in range(0, len(specs), 3):
                    with gr.Row():
                        for spec in specs[i:i + 3]:
                            inputs[spec.key] = _input(spec)
    form_inputs = [inputs[s.key] for s in form.FIELDS]
    # the demo set's settings only matter (and only show) while data.path is `demo`
    demo_inputs = [inputs[s.key] for s in form.FIELDS if s.key.startswith("data.demo.")]
    # (`multiple`: the preview's handler is this trigger's one `always_last`, blocks.check_one_always_last)
    inputs["data.path"].change(lambda path: [gr.update(visible=(path or "").strip() == "demo")] * len(demo_inputs),
                               inputs["data.path"], demo_inputs, api_name=False, show_progress="hidden",
                               trigger_mode="multiple")
    remember = (with_form(h.remember, form_at=2), [recipe_dd, run_name, *form_inputs], [loaded, load])
    # only a pick from the list loads (opening the list and clicking elsewhere fires `input`, not `select`)
    chosen = recipe_dd.select(with_form(h.choose_recipe, form_at=3), [recipe_dd, loaded, run_name, *form_inputs],
                              [*form_inputs, run_name, loaded, status, load], api_name=False)
    loaded_dep = load.click(with_form(h.load_recipe), recipe_dd, [*form_inputs, run_name], api_name="load_recipe")
    loaded_dep.success(*remember, api_name=False).then(lambda: "", None, status, api_name=False)
    save.click(with_form(h.save_recipe, form_at=1), [save_name, *form_inputs], [status, recipe_dd],
               api_name="save_recipe").success(*remember, api_name=False)
    # presets set a few keys, and over edits of those keys ask first (like picking another recipe)
    preset_out = [*form_inputs, loaded, status, preset_apply, pending]
    preset_deps = [button.click(with_form(lambda loaded_, now, n=name: h.preset(n, loaded_, now), form_at=1),
                                [loaded, *form_inputs], preset_out, api_name=False)
                   for button, name in zip(presets, essentials.PRESETS)]
    applied = preset_apply.click(with_form(h.apply_preset, form_at=2), [pending, loaded, *form_inputs], preset_out,
                                 api_name=False)
    launch_inputs = [run_name, *form_inputs, processes, sharding]
    estimate_out = [estimate, start, skip_bad]
    estimate_fn = with_form(h.estimate, form_at=1)
    yaml_fn = with_form(h.recipe_yaml, form_at=1)

    # the YAML preview and the pre-flight follow the form: each edit (`input`: typing, picking), and after
    # every change made for the user (a recipe load, a preset, "Train on this data", the page load), chained
    # as `refresh` (`change` events would fire once per field on every recipe load: ~90 round trips)
    # (the pre-flight's events run one at a time beside the page's other events, which they never hold up:
    # planning a recipe reads its data)
    preflight = {"concurrency_id": "preflight", "concurrency_limit": 1}

    def refresh(dep):
        return dep.then(yaml_fn, [run_name, *form_inputs], preview, api_name=False, show_progress="hidden").then(
            estimate_fn, launch_inputs, estimate_out, api_name=False, show_progress="minimal", **preflight)

    # the smoke test's measured time for the recipe just loaded (its own queue: it plans the preset's recipe
    # once a run of that model was timed here, and never holds up the pre-flight)
    label_event = dict(fn=with_form(h.smoke_label, form_at=0), inputs=form_inputs, outputs=presets[0], api_name=False,
                       show_progress="hidden", concurrency_id="preset-label", concurrency_limit=1)

    def relabel(dep):
        return dep.then(**label_event)

    # (a text box's `input` misses text set at once, as by a paste or a browser's autofill: `change` for those)
    def edited(components):
        return [c.change if isinstance(c, gr.Textbox) else c.input for c in components]

    # the page's edits: computed once per distinct form (when_inputs_change); the API's calls: always.
    # One `always_last` handler per trigger (blocks.check_one_always_last): the pre-flight follows the preview in
    # a chain instead of listening to the same edits, since two such handlers on one trigger re-fire each other
    # without end in gradio's page (docs/ui.md, "Event loops")
    page_estimate = dict(fn=when_inputs_change(estimate_fn, 3), inputs=[estimate_seen, *launch_inputs],
                         outputs=[*estimate_out, estimate_seen], api_name=False, trigger_mode="always_last",
                         show_progress="minimal", **preflight)
    gr.on(edited([run_name, *form_inputs]), when_inputs_change(yaml_fn, 1), [yaml_seen, run_name, *form_inputs],
          [preview, yaml_seen], api_name=False, trigger_mode="always_last", show_progress="hidden",
          ).then(**page_estimate)
    api_yaml.click(yaml_fn, [run_name, *form_inputs], preview, api_name="recipe_yaml", show_progress="hidden")
    # sharding only means something over several processes: off (and back to "none") with one
    processes.change(lambda n: gr.update(interactive=(n or 1) > 1) if (n or 1) > 1 else
                     gr.update(interactive=False, value=jobs.NO_SHARDING), processes, sharding,
                     api_name=False, show_progress="hidden").then(**page_estimate)
    sharding.input(**page_estimate)
    api_estimate.click(estimate_fn, launch_inputs, estimate_out, api_name="estimate", show_progress="minimal",
                       **preflight)
    for dep in (chosen, loaded_dep, applied, *preset_deps):
        refresh(dep)
    for dep in (chosen, loaded_dep):
        relabel(dep)
    tab.select(**label_event)  # a run may have finished since
    # the pre-flight's one-click way past bad data rows: the key it names, then the pre-flight again
    refresh(skip_bad.click(lambda: "skip", None, inputs["data.on_error"], api_name="skip_bad_rows"))
    return SimpleNamespace(tab=tab, form=form_inputs, inputs=inputs, recipe=recipe_dd, run_name=run_name,
                           start=start, status=status, loaded=loaded, load=load, processes=processes,
                           sharding=sharding, presets=presets, launch_inputs=launch_inputs, refresh=refresh,
                           relabel=relabel, remember=remember)
