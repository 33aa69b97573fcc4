"""Peer: the same weights behind LitServe with batching on (bench only)."""
import os
import sys

import litserve as ls

from bench.peers import plain_or_onnx


class MGeoAPI(ls.LitAPI):
    def setup(self, device):
        self.model = plain_or_onnx(threads=int(os.environ.get("BENCH_TORCH_THREADS", "2")))

    def decode_request(self, request):
        return request["address1"], request["address2"]

    def predict(self, pairs):  # a list of pairs: LitServe's batch
        return self.model.predict(list(pairs))

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    server = ls.LitServer(MGeoAPI(), accelerator="cpu", max_batch_size=32, batch_timeout=0.002)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False)
