"""A Flask app rendering a small Jinja2 template (templates/page.html): bench/realistic.py's WSGI row.

    GET / -> an HTML page, title "Items", a list of 10 items
"""

from __future__ import annotations

from flask import Flask, render_template

app = Flask(__name__)  # templates from bench/apps/templates, next to this file

ITEMS = [
    {"name": f"item {i}", "price": 9.5 + i, "tags": ["new", "sale"] if i % 3 == 0 else []} for i in range(10)
]


@app.get("/")
def page() -> str:
    total = sum(item["price"] for item in ITEMS)
    return render_template("page.html", title="Items", items=ITEMS, total=total)
