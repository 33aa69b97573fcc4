"""The micro-batcher: batching threads on one queue run their forwards side by side."""
import threading

import torch

from mgeo_service.batcher import MicroBatcher


def test_batching_threads_run_forwards_side_by_side_from_one_queue():
    both_in_a_forward = threading.Barrier(2, timeout=30)  # broken unless two forwards overlap

    def forward(encoded):
        both_in_a_forward.wait()
        return torch.tensor([[float(len(ids)), 0.0, 0.0] for ids, _ in encoded])

    batcher = MicroBatcher(forward, max_pairs=1, wait_seconds=0, instrument=False, threads=2)
    answers = {}

    def submit(length):
        answers[length] = batcher.submit([([0] * length, [0] * length)])

    clients = [threading.Thread(target=submit, args=(length,)) for length in (3, 5)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    assert not both_in_a_forward.broken
    assert {length: answer[0, 0].item() for length, answer in answers.items()} == {3: 3.0, 5: 5.0}


def test_one_batching_thread_runs_one_forward_at_a_time():
    running, most = [0], [0]
    lock = threading.Lock()

    def forward(encoded):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.01)
        with lock:
            running[0] -= 1
        return torch.zeros((len(encoded), 3))

    batcher = MicroBatcher(forward, max_pairs=1, wait_seconds=0, instrument=False, threads=1)
    clients = [threading.Thread(target=batcher.submit, args=([([0], [0])],)) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(60)
    assert most[0] == 1
