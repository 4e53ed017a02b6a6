"""The server's worker client against a real worker process: outputs that arrive faster than
the event loop reads them all reach their requests, in order."""

import asyncio
import json
import subprocess
import sys
import time

import pytest
import zmq

from pagoda.engine.worker import pack, run_worker, unpack
from pagoda.server.errors import APIError
from pagoda.server.worker_client import WorkerClient


class Counter:
    """A worker whose step gives each waiting request its next number, one message a step:
    without a model, its steps follow each other as fast as the loop sends them."""

    governor = None

    def __init__(self) -> None:
        self.waiting: dict[str, list[int]] = {}  # request id -> [next, count]

    def info(self) -> dict:
        return {}

    def add(self, request_id: str, count: int) -> None:
        self.waiting[request_id] = [0, count]

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.waiting.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[list]:
        outputs = []
        for request_id, state in list(self.waiting.items()):
            number, count = state
            outputs.append([request_id, number, number == count - 1])
            state[0] += 1
            if state[0] == count:
                del self.waiting[request_id]
        return outputs

    def stats(self) -> dict:
        return {"waiting": len(self.waiting)}

    def take_rejected(self) -> list:
        return []


def run_counter(input_addr: str, output_addr: str, log_settings) -> None:
    run_worker(Counter, input_addr, output_addr, log_settings)


async def _numbers(client: WorkerClient, request_id: str, count: int) -> list[int]:
    return [o[1] async for o in client.stream(request_id, [count], lambda o: o[2])]


async def _stall_loop(until: asyncio.Event) -> None:
    """Block the event loop now and then, as a busy server does, so that messages pile up
    between its reads."""
    while not until.is_set():
        time.sleep(0.02)
        await asyncio.sleep(0.005)


def test_outputs_that_pile_up_all_reach_their_requests_in_order():
    async def main() -> None:
        client = WorkerClient("counter", run_counter, ())
        await client.start()
        try:
            done = asyncio.Event()
            staller = asyncio.create_task(_stall_loop(done))
            counts = [2000, 1500, 1, 3000, 700, 2500]
            results = await asyncio.wait_for(
                asyncio.gather(*(_numbers(client, f"r{i}", n) for i, n in enumerate(counts))),
                timeout=120,
            )
            done.set()
            await staller
            assert results == [list(range(n)) for n in counts]
            assert client.num_in_flight == 0
            # the client still reads after the burst: a request sent now is answered
            assert await asyncio.wait_for(_numbers(client, "after", 3), timeout=30) == [0, 1, 2]
        finally:
            await client.shutdown()

    asyncio.run(main())


class PickyClient(WorkerClient):
    """Reads the outputs of requests named "bad..." as a server of another version would: it
    cannot."""

    def decode_output(self, fields: list) -> list:
        if fields[0].startswith("bad"):
            raise TypeError("an output of 3 fields, where this server reads 4")
        return fields


def test_an_output_the_server_cannot_read_fails_its_request_and_no_other():
    async def main() -> None:
        client = PickyClient("counter", run_counter, ())
        await client.start()
        try:
            good = asyncio.create_task(_numbers(client, "good", 3000))
            with pytest.raises(APIError, match="cannot read: an output of 3 fields") as caught:
                await asyncio.wait_for(_numbers(client, "bad", 5), timeout=30)
            assert caught.value.status == 500
            assert await asyncio.wait_for(good, timeout=60) == list(range(3000))
            assert await asyncio.wait_for(_numbers(client, "after", 3), timeout=30) == [0, 1, 2]
        finally:
            await client.shutdown()

    asyncio.run(main())


CRASHING_WORKER = """
import sys
from pagoda.engine.worker import run_worker
from pagoda.logs import LogSettings

class Crashing:
    governor = None
    def info(self): return {}
    def add(self, request_id, *payload): self.work = True
    def abort(self, request_ids): pass
    def has_work(self): return getattr(self, "work", False)
    def step(self): raise RuntimeError("a step that fails")
    def stats(self): return {}
    def take_rejected(self): return []

run_worker(Crashing, sys.argv[1], sys.argv[2], LogSettings(format="json"))
"""


def test_a_worker_that_fails_logs_its_traceback_in_the_log_format(tmp_path):
    context = zmq.Context()
    inbox, outbox = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    inbox.bind(f"ipc://{tmp_path}/in")
    outbox.bind(f"ipc://{tmp_path}/out")
    args = [sys.executable, "-c", CRASHING_WORKER, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"]
    worker = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        assert outbox.poll(60_000) and unpack(outbox.recv())[0] == "ready"
        inbox.send(pack(["add", "r", 1]))
        _, stderr = worker.communicate(timeout=60)
    finally:
        worker.kill()
        context.destroy(linger=0)
    assert worker.returncode == 1
    lines = [json.loads(line) for line in stderr.splitlines()]  # each one JSON, no raw text
    failed = next(line for line in lines if line["message"].startswith("the worker failed"))
    assert failed["level"] == "ERROR" and "RuntimeError: a step that fails" in failed["exception"]
