"""Peer: a plain Flask app with prometheus_flask_exporter, one forward per request (bench only).

Run under Gunicorn sync workers: gunicorn -w 2 bench.peers.flask_exporter_app:app
"""
import os

from flask import Flask, jsonify, request
from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

from bench.peers import PlainModel

app = Flask(__name__)
metrics = GunicornPrometheusMetrics(app)
model = PlainModel(threads=int(os.environ.get("BENCH_TORCH_THREADS", "1")))


@app.post("/predict")
def predict():
    body = request.get_json()
    return jsonify(model.predict([(body["address1"], body["address2"])])[0])
