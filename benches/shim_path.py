"""What the worker shim costs per request, without the process switches around it.

Runs the shim's real request path in one process: an offer in a memfd region and a count on an
eventfd (as the front makes them), the slot's claim, the WSGI call of hello world and the reply
with sendmsg on a socketpair (drained every 64 requests). Unlike req/s on a shared 2-core host,
these figures repeat within a few percent, so they show what a change to the shim's hot path is
worth. It also prints its parts: the two system calls, and the Python without them.

    .venv/bin/python benches/shim_path.py [REQUESTS]
"""

import mmap
import os
import socket
import sys
import time
import types

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "supervisor", "src", "web",
                    "worker", "shim.py")


def load_shim():
    """The shim as a module, without running its main()."""
    with open(SHIM, encoding="utf-8") as source:
        text = source.read()
    entry = "sys.exit(main(sys.argv[1:]))"
    if entry not in text:
        sys.exit("%s no longer ends with %r: update this benchmark" % (SHIM, entry))
    shim = types.ModuleType("shim")
    exec(compile(text.replace(entry, ""), SHIM, "exec"), shim.__dict__)  # noqa: S102
    return shim


ENVIRON = {
    "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "45678", "wsgi.url_scheme": "http",
    "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*",
}
HELLO = b"Hello, World!"


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [HELLO]


def per_call(action, requests):
    """Best of three runs, in µs per call."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(requests):
            action()
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    return best


def main():
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    shim = load_shim()
    raw = "\0".join(part for pair in ENVIRON.items() for part in pair).encode("latin-1")
    frame = shim.HEADER.pack(len(raw), len(raw), shim.REQUEST, 0, 1) + raw
    size = shim.REGIONS * shim.REGION
    memfd = os.memfd_create("shim-path")
    os.ftruncate(memfd, size)
    writer = mmap.mmap(memfd, size)
    for region in range(shim.REGIONS):
        writer[region * shim.REGION:region * shim.REGION + len(frame)] = frame
    offers = mmap.mmap(memfd, size, access=mmap.ACCESS_READ)
    eventfd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
    ours, front = socket.socketpair()
    front.setblocking(False)
    base = {"wsgi.version": (1, 0), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
            "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.file_wrapper": shim.FileWrapper}
    slot = shim.Slot(ours.detach(), hello, base, None, 0, eventfd, offers, 0)
    served = [0]

    def drain():
        try:
            while front.recv(1 << 20):
                pass
        except BlockingIOError:
            pass

    def one_request():
        os.eventfd_write(eventfd, 1)
        if not slot.claim():
            sys.exit("the slot did not claim its offer")
        served[0] += 1
        if served[0] % 64 == 0:
            drain()

    def offer_and_claim_count():
        os.eventfd_write(eventfd, 1)
        os.read(eventfd, 8)

    reply = [shim.HEADER.pack(60, 47, shim.START, shim.FLAG_END, 0), b"x" * 47, HELLO]

    def sendmsg():
        slot.sock.sendmsg(reply)
        served[0] += 1
        if served[0] % 64 == 0:
            drain()

    class NoSocket:
        """Takes every reply at once: what is left of the path is the shim's Python."""

        def sendmsg(self, parts):
            return sum(map(len, parts))

        def sendall(self, data):
            pass

    payload = frame[shim.HLEN:]

    def handle_without_syscalls():
        slot.handle(0, len(raw), payload, 1)

    per_call(one_request, requests // 10)  # warm-up
    print("python %s, %d requests per run, best of 3" % (sys.version.split()[0], requests))
    print("whole path (claim, environ, app, reply): %.2f µs/request" % per_call(one_request, requests))
    print("  eventfd write + read (the harness's offer and the claim): %.2f µs"
          % per_call(offer_and_claim_count, requests))
    print("  sendmsg of a hello-world reply: %.2f µs" % per_call(sendmsg, requests))
    real_socket, slot.sock = slot.sock, NoSocket()
    print("  the same without its system calls (environ, app, head, frames): %.2f µs"
          % per_call(handle_without_syscalls, requests))
    slot.sock = real_socket


if __name__ == "__main__":
    main()
