"""The sandbox's wire formats: service <-> fork server, and fork server <-> worker.

Responsibility: the shape of every byte that crosses a process boundary in the
sandbox, in one place, so the three processes (`pool` in the service,
`forkserver`, `child` in each worker) agree on it:

- The control socket between the service's `Sandbox` (`rstar.sandbox.pool`) and
  the fork server (`rstar.sandbox.forkserver`): length-prefixed JSON frames, a
  4-byte big-endian length then that many bytes of compact JSON (`send_frame`,
  `FrameReader`). Messages, by `op`:

    service -> fork server
      {"op": "run", "id", "code", "wall", "memory", "output", "file_bytes"}
      {"op": "cancel", "id"}
      {"op": "stop"}
    fork server -> service
      {"op": "hello", "pid", "layers", "errors", "landlock_abi", "unprivileged_mode",
       "preloaded", "python", "scratch", "disk_cap"}           once, after the probe
      {"op": "result", "id", "stdout", "stderr", "exit_code", "failure", "duration",
       "truncated"}                                            one per run
      {"op": "stats", "idle", "running", "queued"}             when they change
      {"op": "fatal", "message"}                               before it gives up

- The pipes between the fork server and one worker (`rstar.sandbox.child`): the
  status pipe (worker fd 3) carries one JSON line once the worker has entered its
  isolation layers ({"layers", "errors", "probe", ...}), or {"error"} before the
  worker exits with `EXIT_SETUP_FAILED`; the job pipe (worker fd 0) carries one
  JSON object {"code", "wall", "memory", "file_bytes"} and then EOF (`read_all`,
  `write_all`). The worker's exit status is the rest of the protocol:
  `EXIT_MEMORY` and `EXIT_SETUP_FAILED` have fixed meanings.
- `SAFE_ENV`: the clean environment of the fork server process and of every
  worker (no variable of the service reaches untrusted code).

What it does not do: open sockets or pipes, fork, enforce limits or decide what a
result means (the fork server classifies how a worker ended; the pool turns a
result message into an `ExecutionResult`).
"""

from __future__ import annotations

import json
import os
import socket
import struct

EXIT_MEMORY = 249         # the program raised MemoryError (address-space limit)
EXIT_SETUP_FAILED = 248   # the worker could not enter its isolation layers, read its job or set its limits
SAFE_ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
READ_CHUNK = 65536        # bytes per read from a worker's pipes
_HEADER = struct.Struct(">I")


# ------------------------------------------------------------------ control socket frames
def send_frame(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


class FrameReader:
    """Accumulates bytes and yields complete frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(json.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out


# ------------------------------------------------------------------ worker pipes
def read_all(fd: int) -> bytes:
    """Everything up to EOF from a blocking fd."""
    chunks = []
    while True:
        b = os.read(fd, READ_CHUNK)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to a blocking fd (a short write goes on where it stopped)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
