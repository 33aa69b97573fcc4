"""Peer: a plain Flask app with prometheus_flask_exporter, one forward per request (bench only).

Run under Gunicorn sync workers: gunicorn -w 2 bench.peers.flask_exporter_app:app
"""
import os

from flask import Flask, jsonify, request
from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

from mgeo_service.matcher import Matcher

app = Flask(__name__)
metrics = GunicornPrometheusMetrics(app)
matcher = Matcher(device="cpu", threads=int(os.environ.get("BENCH_TORCH_THREADS", "1")))


@app.post("/predict")
def predict():
    body = request.get_json()
    return jsonify(matcher.predict([(body["address1"], body["address2"])])[0].as_dict())
