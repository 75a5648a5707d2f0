"""The web UI's helpers (app.py is the entry point): a reader of run folders and a job launcher.

    python app.py [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--data-dir data]

safety (paths under roots, names, bind/auth), jobs (start/stop/resume, state from the run folder),
runview (events -> progress, ETA, curves), databrowser (validation report, stats, groups, uploads),
form (the recipe form from recipe.recipe_fields), playground (reward scoring, reward cache), compare
(eval tables, overlaid curves), handlers + blocks (the gradio page). No training logic lives here.
Importing this package does not import gradio: app.py turns analytics off first.
"""
