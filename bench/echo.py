"""A bare pyzmq ROUTER that decodes each request with msgspec and replies with an Ack.

This is the bus baseline: the same transport, socket pattern and codec as
the tiermem router, without validation limits, sequencing, the log or the
shards. It replies with an encoded `Ack` carrying the request id, so the
tiermem `Client` and the open-loop sender can drive it unchanged.
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.connection import Connection

__all__ = ["EchoServer"]

# Replies are sent NOBLOCK; these marks are far above any client window in
# the suite, so a full pipe would mean a bug in a driver, not load.
_HWM = 200_000
_DRAIN_BATCH = 1000


def _serve(connection: Connection) -> None:
    import msgspec
    import zmq

    from events.codec import MSGPACK, encode_reply
    from events.types import Ack, Request

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    connection.send(f"tcp://127.0.0.1:{port}")
    connection.close()

    decoder = msgspec.msgpack.Decoder(Request)
    replied = 0
    while True:
        sock.poll()
        for _ in range(_DRAIN_BATCH):
            try:
                identity, payload = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            request = decoder.decode(payload)
            replied += 1
            sock.send_multipart(
                [identity, encode_reply(Ack(id=request.id, seq=replied), MSGPACK)],
                zmq.NOBLOCK,
            )


class EchoServer:
    """The echo ROUTER in a child process of its own, on a random 127.0.0.1 port."""

    def __init__(self) -> None:
        self.process: multiprocessing.process.BaseProcess | None = None
        self.endpoint = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 60.0) -> EchoServer:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_serve, args=(sender,), name="bench-echo", daemon=True
        )
        self.process.start()
        sender.close()
        if not receiver.poll(timeout):
            self.stop()
            raise TimeoutError(
                f"the echo server did not report its endpoint within {timeout:.0f}s"
            )
        self.endpoint = receiver.recv()
        receiver.close()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.process = None
