"""`python -m trainer view RUN_DIR`: a web page to look at what the policy did in a run.

`app.py` serves it (FastAPI, reading the run folder on every request); `static/` holds the page
(plain HTML, JS and CSS: nothing is fetched from anywhere else, so it works offline).
"""
