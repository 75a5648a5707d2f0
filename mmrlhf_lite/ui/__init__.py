"""The web UI's helpers (app.py is the entry point): a reader of run folders and a job launcher.

    python app.py [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--data-dir data]

The work, without gradio: safety (paths under roots, names, bind/auth), jobs (start/stop/resume, rename,
delete, state from the run folder), runview (events -> progress, ETA, curves), databrowser and datanav
(validation report, stats, groups, uploads), form (the recipe form from recipe.recipe_fields, by name:
FormValues), essentials (presets, the pre-flight, the YAML preview), playground (reward scoring, reward
cache), serving (the reward-model services the playground starts and stops), compare and evalcard (eval
tables, overlaid curves, recipe differences), policy (chat, export).
The page: tabs/ (one module per tab: its handlers and layout), base (what the tabs share), blocks (the
six tabs on one page and the wiring between them). No training logic lives here. Importing this package
does not import gradio: app.py turns analytics off first.
"""
