"""The apps every server in benches/web.sh serves: hello world, a 1 MiB body streamed in 64 KiB
chunks, and a mix where /slow sleeps 50 ms (standing in for a database call)."""
import time

HELLO = b"Hello, World!"
CHUNK = b"x" * 65536


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [HELLO]


def stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return (CHUNK for _ in range(16))


def mixed(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.05)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [HELLO]
