#!/usr/bin/env python3
"""What moving bytes through loopback TCP costs on this machine, with no
protocol at all: a sender process writing WRITE-byte chunks and a receiver
process reading READ-byte chunks, both processes' CPU seconds from
getrusage. A lower bound for an xDS sync's transport cost.

Envoy advertises no SETTINGS_MAX_FRAME_SIZE (so 16,384-byte DATA frames) and
h2 writes one frame per writev: the 16 KiB row is what a fleet sync pays.

With CONNECTIONS above 1 the bytes are spread evenly over that many
connections, as a fleet's sync spreads them (each side drives its sockets
with epoll, and the receiver's SO_RCVBUF is RCVBUF bytes, as `meshpilot
load --recv-buffer` sets it). The kernel's part (sys) is the figure to
compare: this script's own user time grows with the connection count.

    benches/loopback_floor.py [GIB] [WRITE] [READ] [CONNECTIONS] [RCVBUF]
    default: 4 16393 16393 1 0 (0: the kernel's autotuning)
"""
import os
import resource
import select
import socket
import sys
import time


def main() -> None:
    total = int(float(sys.argv[1] if len(sys.argv) > 1 else 4) * (1 << 30))
    write = int(sys.argv[2]) if len(sys.argv) > 2 else 16393  # a 16 KiB frame + its 9-byte header
    read = int(sys.argv[3]) if len(sys.argv) > 3 else write
    connections = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    rcvbuf = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    if connections > 1:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < connections + 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 64), hard))
    listener = socket.socket()
    if rcvbuf:
        # (Accepted connections take the listener's, set before the handshake.)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        listener.close()
        send(port, total, write, connections)
        os._exit(0)
    conns = []
    while len(conns) < connections:
        conn, _ = listener.accept()
        conns.append(conn)
    started = time.time()
    got = receive(conns, read)
    os.waitpid(pid, 0)
    wall = time.time() - started
    me, child = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + child.ru_utime + child.ru_stime
    gib = got / (1 << 30)
    shape = f"{write}-byte writes / {read}-byte reads" + (f" over {connections} connections" if connections > 1 else "")
    print(
        f"{gib:.1f} GiB in {shape}: wall {wall:.1f} s, "
        f"receiver {me.ru_utime:.1f} user + {me.ru_stime:.1f} sys, sender {child.ru_utime:.1f} user + {child.ru_stime:.1f} sys "
        f"-> {gib / cpu:.2f} GiB per CPU-second, {gib / (me.ru_stime + child.ru_stime):.2f} per kernel CPU-second"
    )


def send(port: int, total: int, write: int, connections: int) -> None:
    chunk = b"x" * write
    if connections == 1:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        while sent < total:
            sent += conn.send(chunk)
        conn.close()
        return
    left, socks = {}, {}
    for _ in range(connections):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        socks[conn.fileno()] = conn
        left[conn.fileno()] = total // connections
    poll = select.epoll(connections)
    for fd in socks:
        poll.register(fd, select.EPOLLOUT)
    while left:
        for fd, _ in poll.poll():
            conn, n = socks[fd], left[fd]
            try:
                while n > 0:
                    n -= conn.send(chunk if n >= write else chunk[:n])
            except BlockingIOError:
                pass
            if n > 0:
                left[fd] = n
            else:
                poll.unregister(fd)
                conn.close()
                del left[fd]


def receive(conns: list, read: int) -> int:
    buf, got = bytearray(read), 0
    if len(conns) == 1:
        while True:
            n = conns[0].recv_into(buf)
            if not n:
                return got
            got += n
    socks = {}
    poll = select.epoll(len(conns))
    for conn in conns:
        conn.setblocking(False)
        socks[conn.fileno()] = conn
        poll.register(conn.fileno(), select.EPOLLIN)
    while socks:
        for fd, _ in poll.poll():
            conn = socks[fd]
            try:
                while True:
                    n = conn.recv_into(buf)
                    if not n:
                        poll.unregister(fd)
                        conn.close()
                        del socks[fd]
                        break
                    got += n
            except BlockingIOError:
                pass
    return got


if __name__ == "__main__":
    main()
