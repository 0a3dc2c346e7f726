"""The test service, written the way pymacaron services are: ``python server.py --port 8080``."""

import os

from flask import Flask
from petshop.reporting import report_crash
from pymacaron import API, letsgo

app = Flask(__name__)


def start(port, debug=False):
    here = os.path.dirname(os.path.realpath(__file__))
    api = API(app, port=port, debug=debug, error_reporter=report_crash)
    api.load_apis(os.path.join(here, "apis"))
    api.start()


letsgo(__name__, callback=start)
