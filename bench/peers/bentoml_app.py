"""Peer: the same weights behind BentoML (bench only), configured as its docs advise for overload:
adaptive batching, ``max_concurrency`` (429 beyond it) and a request ``timeout`` equal to the
clients' deadline. Runs in its own venv (``.venv-bentoml``): BentoML pins its own OpenTelemetry.

Its batchable API takes a list of pairs, so a request body is ``{"pairs": [{...}]}``, one pair
each in the single-pair loads; BentoML batches them across requests.
"""
import os

import bentoml
from pydantic import BaseModel

from bench.peers import PlainModel


class Pair(BaseModel):
    address1: str
    address2: str


@bentoml.service(workers=1, traffic={"timeout": float(os.environ.get("BENCH_TIMEOUT_S", "2")),
                                     "max_concurrency": int(os.environ.get("BENCH_MAX_CONCURRENCY", "64"))})
class MGeo:
    def __init__(self):
        self.model = PlainModel(threads=int(os.environ.get("BENCH_TORCH_THREADS", "2")))

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=2000)
    def predict(self, pairs: list[Pair]) -> list[dict]:
        return self.model.predict([(p.address1, p.address2) for p in pairs])
