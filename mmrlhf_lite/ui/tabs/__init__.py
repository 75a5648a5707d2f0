"""The web UI's six tabs, one module each: its handlers (a class, what its tests call) and its layout with its
own events (`build`). blocks.py puts them on one page and wires what passes between them.

    python app.py
"""
