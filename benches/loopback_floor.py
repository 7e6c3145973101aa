#!/usr/bin/env python3
"""What moving bytes through loopback TCP costs on this machine, with no
protocol at all: one connection, a sender writing WRITE-byte chunks and a
receiver reading READ-byte chunks, both processes' CPU seconds from
getrusage. A lower bound for an xDS sync's transport cost (one hot
connection, not thousands).

Envoy advertises no SETTINGS_MAX_FRAME_SIZE (so 16,384-byte DATA frames) and
h2 writes one frame per writev: the 16 KiB row is what a fleet sync pays.

    benches/loopback_floor.py [GIB] [WRITE] [READ]     default: 4 16393 16393
"""
import os
import resource
import socket
import sys
import time


def main() -> None:
    total = int(float(sys.argv[1] if len(sys.argv) > 1 else 4) * (1 << 30))
    write = int(sys.argv[2]) if len(sys.argv) > 2 else 16393  # a 16 KiB frame + its 9-byte header
    read = int(sys.argv[3]) if len(sys.argv) > 3 else write
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk, sent = b"x" * write, 0
        while sent < total:
            sent += conn.send(chunk)
        conn.close()
        os._exit(0)
    conn, _ = listener.accept()
    started, got, buf = time.time(), 0, bytearray(read)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    os.waitpid(pid, 0)
    wall = time.time() - started
    me, child = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + child.ru_utime + child.ru_stime
    gib = got / (1 << 30)
    print(
        f"{gib:.1f} GiB in {write}-byte writes / {read}-byte reads: wall {wall:.1f} s, "
        f"receiver {me.ru_utime:.1f} user + {me.ru_stime:.1f} sys, sender {child.ru_utime:.1f} user + {child.ru_stime:.1f} sys "
        f"-> {gib / cpu:.2f} GiB per CPU-second"
    )


if __name__ == "__main__":
    main()
