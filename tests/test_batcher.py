"""The micro-batcher: forwards side by side from one queue, admission by measured rate, deadlines."""
import threading
import time

import pytest
import torch

from mgeo_service.batcher import ForwardRate, MicroBatcher, Rejected, _Job
from mgeo_service.connection import ClientWatch

HOUR = 3600.0


def submit(batcher, encoded, deadline_seconds=HOUR, client=None):
    return batcher.submit(len(encoded), lambda: encoded, time.perf_counter() + deadline_seconds, client)


def pair(length=3):
    return ([0] * length, [0] * length)


def test_batching_threads_run_forwards_side_by_side_from_one_queue():
    both_in_a_forward = threading.Barrier(2, timeout=30)  # broken unless two forwards overlap

    def forward(encoded):
        both_in_a_forward.wait()
        return torch.tensor([[float(len(ids)), 0.0, 0.0] for ids, _ in encoded])

    batcher = MicroBatcher(forward, max_pairs=1, wait_seconds=0, instrument=False, threads=2)
    answers = {}

    def client(length):
        answers[length] = submit(batcher, [pair(length)])

    clients = [threading.Thread(target=client, args=(length,)) for length in (3, 5)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    assert not both_in_a_forward.broken
    assert {length: answer[0][0] for length, answer in answers.items()} == {3: 3.0, 5: 5.0}


def test_a_forward_holds_at_most_the_token_budget_and_stops_collecting_at_it():
    sizes = []

    def forward(encoded):
        sizes.append([len(ids) for ids, _ in encoded])
        return torch.tensor([[float(len(ids)), 0.0, 0.0] for ids, _ in encoded])

    # A long wait: only the token budget can end the collection before it.
    batcher = MicroBatcher(forward, max_pairs=64, wait_seconds=HOUR, instrument=False, max_tokens=100)
    answer = submit(batcher, [pair(40), pair(30), pair(50), pair(20)])
    assert sorted(sizes) == [[20, 30, 40], [50]]  # length-sorted, 90 tokens, then what did not fit
    assert [row[0] for row in answer] == [40.0, 30.0, 50.0, 20.0]  # each pair its own row, in order


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
    clients = [threading.Thread(target=submit, args=(batcher, [pair()])) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    assert most[0] == 1


class GatedForward:
    """A forward that holds its batching thread until released, and records what it computed."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()
        self.computed = []

    def __call__(self, encoded):
        self.entered.set()
        assert self.release.wait(60)
        self.computed.extend(len(ids) for ids, _ in encoded)
        return torch.zeros((len(encoded), 3))


def occupy(batcher, forward):
    """Starts one request whose forward holds the only batching thread; returns its thread."""
    thread = threading.Thread(target=submit, args=(batcher, [pair(2)]))
    thread.start()
    assert forward.entered.wait(30)
    return thread


def test_a_job_whose_deadline_passes_while_queued_never_reaches_the_forward():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1)
    busy = occupy(batcher, forward)
    with pytest.raises(Rejected) as refused:
        submit(batcher, [pair(7)], deadline_seconds=0.05)  # answered at its deadline, not after the forward
    assert refused.value.reason == "deadline_exceeded" and not forward.release.is_set()
    forward.release.set()
    busy.join(30)
    assert submit(batcher, [pair(4)]) == [[0.0, 0.0, 0.0]]  # the thread serves on
    assert forward.computed == [2, 4]  # the expired pairs (7 tokens) were never computed


def test_a_job_found_expired_when_its_forward_starts_is_dropped_there():
    """The batching thread checks too: a request thread woken late must not get its pairs computed."""
    batcher = MicroBatcher(lambda encoded: torch.zeros((len(encoded), 3)), max_pairs=32, wait_seconds=0,
                           instrument=False)
    batcher._admit(2, time.perf_counter() + HOUR)
    late, live = _Job([pair()], time.perf_counter() - 1, None), _Job([pair()], time.perf_counter() + HOUR, None)
    assert batcher._start([late, live]) == [live]
    assert late.done.is_set() and late.error.reason == "deadline_exceeded"
    assert (batcher._queued_pairs, batcher._running_pairs) == (0, 1)


def test_a_client_that_goes_while_queued_leaves_at_once_and_is_never_computed():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1)
    busy = occupy(batcher, forward)
    leaving, staying = ClientWatch(), ClientWatch()
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_outcome(batcher, [pair(6)] * 3, client=leaving)))
    waiter.start()
    other = threading.Thread(target=lambda: outcome.append(_outcome(batcher, [pair(5)], client=staying)))
    other.start()
    wait_until(lambda: batcher._queued_pairs == 4)
    leaving.set_gone()  # while the forward ahead still holds: its place frees now, not at its turn
    waiter.join(30)
    assert outcome == ["client_gone"] and batcher._queued_pairs == 1 and batcher._requests == 2
    forward.release.set()
    for thread in (busy, other):
        thread.join(30)
    assert sorted(outcome) == ["client_gone", "served"]
    assert 6 not in forward.computed and 5 in forward.computed


def test_a_client_gone_before_its_request_was_queued_is_never_computed():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1)
    forward.release.set()
    gone = ClientWatch()
    gone.set_gone()
    assert _outcome(batcher, [pair(7)], client=gone) == "client_gone"
    assert 7 not in forward.computed and batcher._queued_pairs == 0


def _outcome(batcher, encoded, deadline_seconds=HOUR, client=None) -> str:
    try:
        submit(batcher, encoded, deadline_seconds, client)
        return "served"
    except Rejected as exc:
        return exc.reason


def test_admission_refuses_what_the_measured_rate_cannot_finish_by_the_deadline():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1)
    batcher.rate.observe(200, 1.0)  # 200 pairs/s, one forward 1 s
    busy = occupy(batcher, forward)
    queued = [threading.Thread(target=submit, args=(batcher, [pair()] * 40)) for _ in range(5)]
    for thread in queued:  # 200 pairs waiting: 1 s of work ahead, plus a forward
        thread.start()
    wait_until(lambda: batcher._queued_pairs == 200)
    with pytest.raises(Rejected) as refused:
        submit(batcher, [pair()], deadline_seconds=1.5)  # needs 201/200 + 1 = 2.005 s
    assert refused.value.reason == "overloaded" and refused.value.retry_after == 2  # 201 pairs busy: ceil(1.005)
    encoded = []
    with pytest.raises(Rejected):
        batcher.submit(1, lambda: encoded.append("tokenised") or [pair()], time.perf_counter() + 1.5)
    assert encoded == []  # refused before tokenising
    admitted = threading.Thread(target=submit, args=(batcher, [pair()], 60.0))  # a later deadline fits
    admitted.start()
    wait_until(lambda: batcher._queued_pairs == 201)
    forward.release.set()
    for thread in [busy, admitted, *queued]:
        thread.join(30)
    assert batcher._queued_pairs == 0 and batcher._running_pairs == 0


def test_full_is_the_refusal_any_new_request_would_get_now():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1, max_requests=3)
    batcher.rate.observe(200, 1.0)  # 200 pairs/s, one forward 1 s
    assert batcher.full(0.001) is None  # idle: it always tries
    busy = occupy(batcher, forward)
    queued = threading.Thread(target=submit, args=(batcher, [pair()] * 200))
    queued.start()
    wait_until(lambda: batcher._queued_pairs == 200)
    assert batcher.full(1.5).reason == "overloaded"  # one more pair: 201/200 + 1 s > 1.5 s
    assert batcher.full(60) is None  # a request with a later deadline would be admitted
    third = threading.Thread(target=submit, args=(batcher, [pair()], 60.0))
    third.start()
    wait_until(lambda: batcher._requests == 3)
    assert batcher.full(60).retry_after == 2  # three requests held, the most it takes: full whatever the deadline
    forward.release.set()
    for thread in (busy, queued, third):
        thread.join(30)
    assert batcher.full(0.001) is None and batcher._requests == 0


def test_an_idle_worker_admits_whatever_the_rate_says():
    batcher = MicroBatcher(lambda encoded: torch.zeros((len(encoded), 3)), max_pairs=32, wait_seconds=0,
                           instrument=False)
    batcher.rate.observe(1, 100.0)  # a rate so slow that any wait would refuse
    assert submit(batcher, [pair()], deadline_seconds=0.5) == [[0.0, 0.0, 0.0]]


def test_a_worker_that_went_idle_measures_its_rate_afresh():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_pairs=32, wait_seconds=0, instrument=False, threads=1, max_requests=2)
    batcher.rate.observe(1, 100.0)  # measured under a flood: so slow that any wait would refuse
    busy = occupy(batcher, forward)
    assert batcher.full(1.5).reason == "overloaded"
    forward.release.set()
    busy.join(30)
    wait_until(lambda: batcher.rate.pairs_per_second is None)  # idle: the flood's rate is forgotten
    forward.entered.clear()
    forward.release.clear()
    busy = occupy(batcher, forward)
    assert batcher.full(1.5) is None  # a burst after idle is admitted while its first forward measures
    queued = threading.Thread(target=submit, args=(batcher, [pair()]))
    queued.start()
    wait_until(lambda: batcher._requests == 2)
    assert batcher.full(HOUR).reason == "overloaded"  # bounded still by max_requests
    forward.release.set()
    for thread in (busy, queued):
        thread.join(30)
    assert batcher._requests == 0


def test_forward_rate_follows_the_forwards():
    rate = ForwardRate()
    rate.observe(10, 0.1)
    assert (rate.pairs_per_second, rate.forward_seconds) == (100.0, 0.1)
    for _ in range(50):
        rate.observe(40, 0.1)
    assert rate.pairs_per_second == pytest.approx(400, rel=1e-3)
    assert rate.seconds_until_done(pairs_ahead=700, pairs=100, threads=2) == pytest.approx(1.1, rel=1e-3)


def wait_until(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)
