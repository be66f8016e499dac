"""sauna-supervisor worker shim: runs one WSGI application behind the supervisor's HTTP front.

Shipped inside the sauna-supervisor binary and run with [app].python (CPython >= 3.9, stdlib only).
The supervisor parses HTTP; this process only turns request frames into a WSGI call and the app's
response back into frames (the format is documented in supervisor/src/worker/frame.rs).

Descriptors: 3 is the control channel (the source of this file arrives on it, then "ready" or the
import traceback goes back, then faulthandler writes stack dumps to it on SIGUSR2); 4, 5, ... are
the request slots, one per thread. Each slot carries one request at a time, so a thread waits on
its own slot and needs no locking, queueing or request ids.

Requests reach a slot as offers (supervisor/src/worker/offer.rs): descriptors 4+threads, ... are
the slots' eventfds (semaphore mode, non-blocking) and 4+2*threads is a memfd holding REGIONS
regions of REGION bytes per slot (slot i's at i*REGIONS*REGION). The supervisor copies a whole
REQUEST frame into a region and adds 1 to the slot's eventfd; the thread claims it with a read of
the eventfd (the supervisor may take an unclaimed offer back with a read of its own: whoever reads
first has it) and reads region claims % REGIONS. A request too big for a region comes on the socket
instead, and only to a slot that is idle. The supervisor may offer the next request while the
current one runs, so after each request the thread first tries the eventfd and only then waits,
with poll() on both the eventfd and the socket: never in a blocking recv, which any read of the
socket by the supervisor would wake for nothing. Everything else of a request in service
(READ/DATA, ABORT, the response) goes over the socket. The header's last field is the request's
number on the slot; an ABORT names the request it is for in its arg, so a late one is ignored.
End-of-file on the socket means the slot is closed: the process exits once every slot is.

argv: protocol mode(serve|check|template) kind(wsgi|paste) target threads ring_size [post_fork]

With mode "template" ([web] preload) this process imports the app once for a whole generation and
never serves: descriptor 4 is then a SOCK_SEQPACKET socket on which the supervisor asks for
workers. Each request is "threads ring_size" with the new worker's descriptors attached
(SCM_RIGHTS: control, slots, eventfds, offer memfd, rings, stdout, stderr); the template forks, the
child puts them on 3, 4, ... (and 1, 2) and serves exactly like a spawned worker. The template
answers "F pid" (or "E why"), and "X pid code" when a worker it forked has exited
(waitstatus_to_exitcode). Its `threads` argument is the workers' slot count: it holds their
descriptor numbers with /dev/null during the import, so the app's own files land elsewhere. The
child leads its own process group, dies with the template (PR_SET_PDEATHSIG), re-enables the gc the
template froze, reseeds random and calls post_fork (module:callable) before it reports ready.

With ring_size > 0, descriptors 5+2*threads, ... are the slots' shared body rings (memfds, see
supervisor/src/worker/ring.rs): a big chunk is copied into the ring and announced with a small
SHARED frame instead of being written to the socket, when the ring has room for it.
"""

import faulthandler
import gc
import importlib
import io
import itertools
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

PROTOCOL = 4
HEADER = struct.Struct("<IIBBH")
HLEN = HEADER.size
REQUEST, DATA, ABORT = 1, 2, 3
READY, FAILED, START, BODY, END, ERROR, READ, SHARED = 16, 17, 18, 19, 20, 21, 22, 23
FLAG_PULL = 1
FLAG_TERMINATED = 2
FLAG_END = 1
CONTROL_FD = 3
FIRST_SLOT_FD = 4
TEMPLATE_FD = 4
PR_SET_PDEATHSIG = 1
STACK_SIGNAL = signal.SIGUSR2
RECV_SIZE = 65536
READ_SIZE = 65536
ABORT_CHECK_INTERVAL = 0.05
RING_HEADER = 64
SHARE_FROM = 16384
SHARED_FRAME = struct.Struct("<IIBBHI")
REGION = 65536
REGIONS = 4

_pack = HEADER.pack
_unpack = HEADER.unpack_from
_chain = itertools.chain.from_iterable
# The supervisor refuses a frame over 64 MiB (a corrupt length); bigger bodies go in pieces.
FRAME_BODY_MAX = 16 << 20
# Iterators over a body already in memory: draining them cannot block or wait on the app.
IN_MEMORY_ITERATORS = (type(iter([])), type(iter(())))


class ClientDisconnected(OSError):
    """The HTTP client went away while the app was reading the request body."""


class FileWrapper:
    """wsgi.file_wrapper: iterates a file-like object in blocks; real files are sent with
    os.sendfile straight from the page cache to the supervisor's socket."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        size = self.blksize
        while True:
            block = read(size)
            if not block:
                return
            yield block


class PullInput(io.RawIOBase):
    """The part of a large request body that the supervisor keeps (in memory or a temporary
    file) until the app asks for it: each read is one READ frame answered by one DATA frame."""

    def __init__(self, slot):
        self.slot = slot
        self.eof = False

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.eof:
            return 0
        slot = self.slot
        slot.send(_pack(0, len(buffer), READ, 0, 0))
        while True:
            kind, _flags, arg, payload = slot.recv_frame()
            if kind == DATA:
                break
            if kind == ABORT and arg == slot.seq:
                slot.aborted = True
        if not payload:
            self.eof = True
            if slot.aborted:
                raise ClientDisconnected("the client disconnected")
            return 0
        size = len(payload)
        buffer[:size] = payload
        return size


class Slot:
    """One request slot: a socket to the front and the state of the request it is serving."""

    def __init__(self, fd, app, base, ring_fd=None, ring_size=0, offer_fd=None, offers=None, region=0):
        self.sock = socket.socket(fileno=fd)
        self.offer_fd = offer_fd
        self.offers = offers
        self.region = region
        self.claims = 0
        # The number of the request in service, and of the last frame read from the socket.
        self.seq = 0
        self.frame_seq = 0
        # poll, not a blocking recv: the supervisor reading this socket wakes every thread
        # blocked in recv on it (no event filter), while poll only wakes for what it asked.
        self.waiter = select.poll()
        if offer_fd is not None:
            self.waiter.register(offer_fd, select.POLLIN)
        self.waiter.register(fd, select.POLLIN)
        self.reader = select.poll()
        self.reader.register(fd, select.POLLIN)
        self.ring = None
        if ring_fd is not None:
            self.ring_map = mmap.mmap(ring_fd, RING_HEADER + ring_size)
            os.close(ring_fd)
            view = memoryview(self.ring_map)
            # The supervisor's release counter: an aligned 4-byte word, read with one load.
            self.released = view[:4].cast("I")
            self.ring = view[RING_HEADER:]
            self.ring_size = ring_size
            self.written = 0
        self.sock.setblocking(True)
        self.pending = b""
        # One receive buffer per slot: sock.recv(n) would allocate (and for large n mmap and
        # munmap) n bytes on every call, which costs more than the rest of a small request.
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.app = app
        self.base = base
        self.aborted = False
        self.status = None
        self.headers = None
        self.sent = False

    def send(self, data):
        self.sock.sendall(data)

    def send_body(self, chunk):
        """Sends a body chunk: through the shared ring when it is big and fits, else inline."""
        size = len(chunk)
        if size > FRAME_BODY_MAX:
            view = memoryview(chunk)
            for at in range(0, size, FRAME_BODY_MAX):
                self.send_body(view[at:at + FRAME_BODY_MAX])
            return
        frames = self.share(chunk, size)
        if frames is not None:
            self.sock.sendall(frames)
            return
        self.sendv([_pack(size, 0, BODY, 0, 0), chunk], HLEN + size)

    def share(self, chunk, size):
        """Copies a big chunk into the ring and returns the SHARED frames announcing it; None
        (nothing copied) when it is small, there is no ring or the ring has no room."""
        ring = self.ring
        if ring is None or size < SHARE_FROM:
            return None
        ring_size = self.ring_size
        written = self.written
        if ((written - self.released[0]) & 0xFFFFFFFF) + size > ring_size:
            return None
        at = written & (ring_size - 1)
        if at + size <= ring_size:
            # Straight from the app's object: no memoryview of it, no slice of it.
            ring[at:at + size] = chunk
            frames = SHARED_FRAME.pack(4, at, SHARED, 0, 0, size)
        else:
            first = ring_size - at
            view = memoryview(chunk)
            ring[at:] = view[:first]
            ring[:size - first] = view[first:]
            frames = SHARED_FRAME.pack(4, at, SHARED, 0, 0, first)
            frames += SHARED_FRAME.pack(4, 0, SHARED, 0, 0, size - first)
        # Only once the copy succeeded (a str from the app raises above): the supervisor expects
        # each chunk where the last announced one ended.
        self.written = (written + size) & 0xFFFFFFFF
        return frames

    def sendv(self, parts, total):
        """Sends `parts` (`total` bytes together) in one sendmsg when the socket takes them."""
        sent = self.sock.sendmsg(parts)
        if sent < total:
            self.sock.sendall(b"".join(parts)[sent:])

    def receive(self, flags=0):
        if not flags:
            self.reader.poll()
        size = self.sock.recv_into(self.buffer, RECV_SIZE, flags)
        if not size:
            raise EOFError
        return self.view[:size].tobytes()

    def recv_frame(self):
        data = self.pending
        while len(data) < HLEN:
            data += self.receive()
        size, arg, kind, flags, seq = _unpack(data)
        end = HLEN + size
        if len(data) < end:
            whole = bytearray(end)
            have = len(data)
            whole[:have] = data
            view = memoryview(whole)
            recv_into = self.sock.recv_into
            while have < end:
                got = recv_into(view[have:], end - have)
                if not got:
                    raise EOFError
                have += got
            self.pending = b""
            self.frame_seq = seq
            return kind, flags, arg, bytes(view[HLEN:])
        self.pending = data[end:]
        self.frame_seq = seq
        return kind, flags, arg, data[HLEN:end]

    def claim(self):
        """Serves the next offered request if there is one the supervisor has not taken back."""
        if self.offer_fd is None:
            return False
        try:
            os.read(self.offer_fd, 8)
        except BlockingIOError:
            return False
        at = self.region + (self.claims % REGIONS) * REGION
        self.claims += 1
        size, arg, _kind, flags, seq = _unpack(self.offers, at)
        start = at + HLEN
        self.handle(flags, arg, self.offers[start:start + min(size, REGION - HLEN)], seq)
        return True

    def serve(self):
        """Serves requests until the supervisor closes the slot."""
        wait = self.waiter.poll
        claim = self.claim
        sock_fd = self.sock.fileno()
        try:
            while True:
                if not self.pending:
                    # Under load the next request is already offered: no sleep between the two.
                    if claim():
                        continue
                    if all(fd != sock_fd for fd, _events in wait()):
                        continue
                kind, flags, arg, payload = self.recv_frame()
                if kind == REQUEST:
                    self.handle(flags, arg, payload, self.frame_seq)
                # A stray ABORT (the response had ended before it arrived) is dropped here.
        except (EOFError, ConnectionError):
            return

    def handle(self, flags, env_len, payload, seq):
        self.seq = seq
        it = iter(payload[:env_len].decode("latin-1").split("\0"))
        # The front never sends a base key, so starting from a copy of the base (cheaper than
        # merging it in afterwards) gives the same environ.
        environ = self.base.copy()
        environ.update(zip(it, it))
        body = payload[env_len:]
        if flags & FLAG_PULL:
            environ["wsgi.input"] = io.BufferedReader(PullInput(self), READ_SIZE)
        else:
            environ["wsgi.input"] = io.BytesIO(body)
        if flags & FLAG_TERMINATED:
            # Werkzeug checks presence, not truth; only chunked requests get the key.
            environ["wsgi.input_terminated"] = True
        self.status = None
        self.headers = None
        self.sent = False
        self.aborted = False
        result = None
        try:
            result = self.app(environ, self.start_response)
            self.respond(result)
        except (EOFError, ConnectionError):
            raise
        except BaseException as error:  # noqa: BLE001 - any app failure must become a response
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            self.fail(environ)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    self.log_exception(environ, "close() of the response iterable failed")

    def head(self):
        status = self.status
        if status is None:
            raise AssertionError("the application returned without calling start_response()")
        return "\0".join((status, *_chain(self.headers))).encode("latin-1")

    def respond(self, result):
        if type(result) is list or type(result) is tuple:
            body = b"".join(result)
            if self.sent:
                if body:
                    self.send_body(body)
                self.send(_pack(0, 0, END, 0, 0))
            else:
                self.send_whole(body)
            return
        try:
            single = len(result) == 1
        except (TypeError, AttributeError):
            single = False
        if single and not self.sent:
            self.send_whole(b"".join(result))
            return
        if isinstance(result, FileWrapper) and self.send_file(result):
            return
        chunks = iter(result)
        if type(chunks) in IN_MEMORY_ITERATORS and not self.sent:
            # Django's HttpResponse has no len() but iterates over a list it already holds: all
            # of it is there, so it goes out as one frame instead of a streamed head, body and end.
            self.send_whole(b"".join(chunks))
            return
        clock = time.monotonic
        next_check = clock() + ABORT_CHECK_INTERVAL
        for chunk in chunks:
            if not chunk:
                continue
            if self.sent:
                # Looking for an Abort costs a system call, so a fast stream looks every 50 ms.
                if self.aborted or clock() >= next_check:
                    if self.client_gone():
                        return
                    next_check = clock() + ABORT_CHECK_INTERVAL
                self.send_body(chunk)
            else:
                self.write_first(chunk)
        if self.sent:
            self.send(_pack(0, 0, END, 0, 0))
        else:
            head = self.head()
            self.send(_pack(len(head), len(head), START, FLAG_END, 0) + head)

    def send_file(self, wrapper):
        """Sends a real file with os.sendfile; False when it is not a regular file."""
        filelike = wrapper.filelike
        try:
            fd = filelike.fileno()
            position = filelike.tell()
            size = os.fstat(fd).st_size - position
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        if size <= 0 or self.sent:
            return False
        head = self.head()
        self.send(_pack(len(head), len(head), START, 0, 0) + head)
        self.sent = True
        out = self.sock.fileno()
        while size > 0:
            step = min(size, 1 << 30)
            self.send(_pack(step, 0, BODY, 0, 0))
            offset = position
            remaining = step
            while remaining > 0:
                done = os.sendfile(out, fd, offset, remaining)
                if done == 0:
                    raise RuntimeError("the file shrank while it was being sent")
                offset += done
                remaining -= done
            position += step
            size -= step
        self.send(_pack(0, 0, END, 0, 0))
        return True

    def client_gone(self):
        """True once the front said the client disconnected; checked between streamed chunks."""
        if self.aborted:
            self.send(_pack(0, 0, END, 0, 0))
            return True
        try:
            data = self.receive(socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self.pending += data
        while len(self.pending) >= HLEN:
            _size, arg, kind, _flags, _seq = _unpack(self.pending)
            if kind != ABORT:
                return False
            self.pending = self.pending[HLEN:]
            if arg == self.seq:
                self.aborted = True
                self.send(_pack(0, 0, END, 0, 0))
                return True
        return False

    def send_whole(self, body):
        """Sends the head and a complete body: one frame that ends the response, when it fits."""
        if len(body) > FRAME_BODY_MAX:
            self.write_first(body)
            self.send(_pack(0, 0, END, 0, 0))
            return
        head = self.head()
        size = len(head) + len(body)
        self.sendv([_pack(size, len(head), START, FLAG_END, 0), head, body], HLEN + size)

    def write_first(self, chunk):
        if len(chunk) > FRAME_BODY_MAX:
            view = memoryview(chunk)
            self.write_first(view[:FRAME_BODY_MAX])
            self.send_body(view[FRAME_BODY_MAX:])
            return
        head = self.head()
        # A big first chunk goes through the ring like the rest: the START frame carries the
        # head alone and the SHARED frame follows it in the same write.
        shared = self.share(chunk, len(chunk))
        if shared is not None:
            self.sock.sendall(_pack(len(head), len(head), START, 0, 0) + head + shared)
        else:
            size = len(head) + len(chunk)
            self.sendv([_pack(size, len(head), START, 0, 0), head, chunk], HLEN + size)
        self.sent = True

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data):
        if self.status is None:
            raise AssertionError("write() called before start_response()")
        if not data:
            return
        if self.sent:
            self.send_body(data)
        else:
            self.write_first(data)

    def log_exception(self, environ, what):
        method = environ.get("REQUEST_METHOD", "?")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        sys.stderr.write("%s while serving %s %s\n%s" % (what, method, path, traceback.format_exc()))
        sys.stderr.flush()

    def fail(self, environ):
        self.log_exception(environ, "the application raised an exception")
        if self.sent:
            self.send(_pack(0, 0, ERROR, 0, 0))
            return
        body = b"Internal Server Error\n"
        head = "500 Internal Server Error\0Content-Type\0text/plain; charset=utf-8".encode("latin-1")
        size = len(head) + len(body)
        self.sendv([_pack(size, len(head), START, FLAG_END, 0), head, body], HLEN + size)


def report(kind, payload):
    control = CONTROL_FD
    data = _pack(len(payload), 0, kind, 0, 0) + payload
    while data:
        written = os.write(control, data)
        data = data[written:]


def setup_paste_logging(path):
    """Applies the ini file's [loggers] like `pserve` does, so Pyramid apps log as configured."""
    try:
        with open(path, encoding="utf-8") as handle:
            has_loggers = any(line.strip() == "[loggers]" for line in handle)
    except OSError:
        return
    if has_loggers:
        import logging.config

        here = os.path.dirname(os.path.abspath(path))
        logging.config.fileConfig(path, {"__file__": os.path.abspath(path), "here": here}, False)


def load_app(kind, target):
    if kind == "paste":
        try:
            from paste.deploy import loadapp
        except ImportError:
            raise ImportError(
                "[app].paste needs PasteDeploy in the environment of [app].python: "
                "pip install PasteDeploy"
            ) from None
        path, _, name = target.partition("#")
        path = os.path.abspath(path)
        setup_paste_logging(path)
        return loadapp("config:" + path + ("#" + name if name else ""))
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    app = module
    for part in (attribute or "application").split("."):
        app = getattr(app, part)
    if not callable(app):
        raise TypeError("%s is not callable (got %r)" % (target, type(app).__name__))
    return app


def resolve_callable(target):
    """`module:callable` imported and looked up (the post_fork hook)."""
    module_name, _, attribute = target.partition(":")
    found = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    if not callable(found):
        raise TypeError("%s is not callable (got %r)" % (target, type(found).__name__))
    return found


def serve(app, threads, ring_size):
    """Reports ready and serves the request slots until the supervisor closes them all."""
    report(READY, ("%d\0%d\0%s" % (os.getpid(), PROTOCOL, sys.version.split()[0])).encode())
    faulthandler.register(STACK_SIGNAL, file=CONTROL_FD, all_threads=True)
    base = {
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": threads > 1,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    }
    offers_fd = FIRST_SLOT_FD + 2 * threads
    offers = mmap.mmap(offers_fd, REGIONS * REGION * threads, access=mmap.ACCESS_READ)
    os.close(offers_fd)
    slots = [
        Slot(
            FIRST_SLOT_FD + index,
            app,
            base,
            FIRST_SLOT_FD + 2 * threads + 1 + index if ring_size else None,
            ring_size,
            FIRST_SLOT_FD + threads + index,
            offers,
            REGIONS * REGION * index,
        )
        for index in range(threads)
    ]
    helpers = [threading.Thread(target=slot.serve, name="sauna-slot", daemon=True) for slot in slots[1:]]
    for helper in helpers:
        helper.start()
    slots[0].serve()
    # The supervisor closes each slot when its last request is done (recycle, stop): exit only
    # once every slot is closed, so no request still running on another thread is cut off.
    for helper in helpers:
        helper.join()
    return 0


class Template:
    """The preloaded process of one generation: forks workers on request and reports their exits."""

    def __init__(self, app, hook):
        import ctypes

        self.app = app
        self.hook = hook
        self.pid = os.getpid()
        # Loaded here, before any fork, so that a child sets its parent-death signal without
        # importing anything.
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.requests = socket.socket(fileno=TEMPLATE_FD)
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self):
        try:
            return self.serve_requests()
        except ConnectionError:
            # The supervisor let go of this generation while we answered it.
            return 0

    def serve_requests(self):
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self.wake_write)
        # poll, not select: the app may have opened more than FD_SETSIZE files at import.
        poller = select.poll()
        poller.register(self.requests, select.POLLIN)
        poller.register(self.wake_read, select.POLLIN)
        requests_fd = self.requests.fileno()
        while True:
            readable = {fd for fd, _events in poller.poll()}
            if self.wake_read in readable:
                try:
                    while os.read(self.wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
                self.reap()
            if requests_fd in readable:
                message, fds, _flags, _address = socket.recv_fds(self.requests, 256, 1024)
                if not message:
                    # The supervisor let go of this generation: its workers die with us.
                    return 0
                self.fork(message, fds)

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.requests.send(b"X %d %d" % (pid, os.waitstatus_to_exitcode(status)))

    def fork(self, message, fds):
        try:
            threads, ring_size = (int(field) for field in message.split())
        except ValueError:
            for fd in fds:
                os.close(fd)
            self.requests.send(b"E malformed fork request %r" % message[:64])
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as error:
            for fd in fds:
                os.close(fd)
            self.requests.send(b"E " + str(error).encode("utf-8", "replace"))
            return
        if pid == 0:
            code = 1
            try:
                code = self.become_worker(fds, threads, ring_size)
            except BaseException:  # noqa: BLE001 - a child must never return into the template loop
                try:
                    report(FAILED, traceback.format_exc().encode("utf-8", "replace"))
                except OSError:
                    traceback.print_exc()
            finally:
                os._exit(code)
        # Set on both sides of the fork, so the group exists before the supervisor hears the pid.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        self.requests.send(b"F %d" % pid)

    def become_worker(self, fds, threads, ring_size):
        """In the child: own process group, death with the template, the worker's descriptors."""
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        if self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != self.pid:
            os._exit(1)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.requests.close()
        os.close(self.wake_read)
        os.close(self.wake_write)
        *channels, out, err = fds
        # First above every target number, so that no dup2 below overwrites a received one.
        floor = CONTROL_FD + len(channels) + 1
        high = [fcntl_dup(fd, floor) for fd in fds]
        for fd in fds:
            os.close(fd)
        *channels, out, err = high
        os.dup2(out, 1)
        os.dup2(err, 2)
        for number, fd in enumerate(channels, CONTROL_FD):
            os.dup2(fd, number)
        for fd in high:
            os.close(fd)
        gc.enable()
        random.seed()
        if self.hook is not None:
            self.hook()
        return serve(self.app, threads, ring_size)


def fcntl_dup(fd, floor):
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def reserve_worker_descriptors(threads):
    """Holds the numbers a forked worker's slots, eventfds, offer memfd and rings will take (after
    4, the template's request socket) with /dev/null, so that files the app opens at import get
    other numbers and are not overwritten in the worker."""
    placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    end = FIRST_SLOT_FD + 3 * threads + 1
    for number in range(TEMPLATE_FD + 1, end):
        try:
            os.fstat(number)
        except OSError:
            os.dup2(placeholder, number, inheritable=False)
    if placeholder >= end:
        os.close(placeholder)


def thread_report():
    """Threads running after the import, which a fork does not carry into the workers."""
    names = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
    try:
        count = len(os.listdir("/proc/self/task")) - 1
    except OSError:
        count = len(names)
    return "%d\0%s" % (max(count, len(names)), ",".join(names))


def main(argv):
    protocol, mode, kind, target, threads, ring_size = argv[:6]
    post_fork = argv[6] if len(argv) > 6 else ""
    threads = int(threads)
    ring_size = int(ring_size)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if int(protocol) != PROTOCOL:
        report(FAILED, ("shim speaks protocol %d, supervisor %s" % (PROTOCOL, protocol)).encode())
        return 1
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if mode == "template":
        reserve_worker_descriptors(threads)
        # No collection while importing leaves no freed holes in pages the workers will share;
        # the workers collect again (gc.enable in the child).
        gc.disable()
    try:
        app = load_app(kind, target)
        hook = resolve_callable(post_fork) if post_fork else None
    except BaseException:  # noqa: BLE001 - SystemExit and SyntaxError at import are failures too
        report(FAILED, traceback.format_exc().encode("utf-8", "replace"))
        return 1
    if mode == "check":
        report(READY, ("%d\0%d\0%s" % (os.getpid(), PROTOCOL, sys.version.split()[0])).encode())
        return 0
    if mode == "template":
        # Everything imported so far moves to the permanent generation: no collection in a
        # worker writes to the pages holding it, so they stay shared.
        gc.freeze()
        template = Template(app, hook)
        info = "%d\0%d\0%s\0%s" % (os.getpid(), PROTOCOL, sys.version.split()[0], thread_report())
        report(READY, info.encode("utf-8", "replace"))
        return template.run()
    return serve(app, threads, ring_size)


sys.exit(main(sys.argv[1:]))
