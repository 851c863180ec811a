"""A Flask app for the CLI tests (WSGI)."""

import os
import time

from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def home():
    return f"hello from flask {os.getpid()}\n"


@app.route("/slow")
def slow():
    time.sleep(float(request.args.get("s", "1")))
    return f"slow done {os.getpid()}\n"


@app.route("/echo", methods=["POST"])
def echo():
    return request.get_data()
