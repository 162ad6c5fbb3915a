"""Connections: one acceptor thread reads whole requests, a fixed pool of workers answers them.

Clients are untrusted. A thread per connection (ThreadingHTTPServer) lets 300 half-sent
requests make 300 threads, each held for as long as the client keeps trickling bytes. Here:

- the acceptor (one thread, a selector) accepts, does the TLS handshake and reads each
  request head and body without blocking; a connection costs a file descriptor and its
  buffer, never a thread;
- a request is handed to a worker only once it is complete: its head within HEAD_TIMEOUT of
  its first byte (the TLS handshake included), whatever the pace of the bytes, and its body
  (Content-Length, at most MAX_BODY_BYTES) read and dropped, so bytes in a body are never
  taken for a second request;
- heads over MAX_HEAD_BYTES, a Transfer-Encoding, a bad Content-Length: one error response
  and the connection closed; at `max_connections` open, the one waiting longest is closed;
- N workers answer one request each at a time, with a deadline on writing the response; a
  kept-alive connection goes back to the acceptor to wait for its next request.
"""
from __future__ import annotations

import errno
import logging
import queue
import re
import resource
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    workers: int = 8
    max_connections: int = 512  # lowered to what RLIMIT_NOFILE leaves room for
    head_timeout: float = 10.0  # whole request (head and body), from its first byte
    idle_timeout: float = 60.0  # a kept-alive connection between requests
    write_timeout: float = 10.0  # a whole response
    max_head_bytes: int = 32768  # a scrape's head is well under 1 KiB
    max_body_bytes: int = 8192  # a GET has none; at most this much is read and dropped
    queue: int = 256  # complete requests waiting for a worker


@dataclass(frozen=True)
class Request:
    """A complete request, as handed to a worker: its head (body dropped) and the bytes that
    followed it on the connection (a pipelined next request)."""
    sock: socket.socket
    address: tuple
    head: bytes
    rest: bytes


class _Conn:
    """A connection while the acceptor has it: mutable, acceptor thread only."""
    __slots__ = ("sock", "address", "buf", "since", "deadline", "started", "handshaken",
                 "draining", "drained")

    def __init__(self, sock, address, now, deadline, buf=b"", handshaken=True):
        self.sock = sock
        self.address = address
        self.buf = bytearray(buf)
        self.since = now
        self.deadline = deadline
        self.started = bool(buf)
        self.handshaken = handshaken
        self.draining = False
        self.drained = 0


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
DRAIN_SECONDS = 2.0  # after an error response, input read and dropped (so the client sees
DRAIN_BYTES = 4 << 20  # the response, not a reset), for at most this long or this much


def _reply(code: int, reason: str) -> bytes:
    body = f"{reason.lower()}\n".encode()
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def framing(head: bytes) -> int | tuple[int, str]:
    """The body length a request head declares, or (status, reason) for one this server will
    not read (it then closes the connection)."""
    length = None
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return 501, "Not Implemented"
        if name == b"content-length":
            value = value.strip()
            if not _DIGITS.fullmatch(value) or (length is not None and int(value) != length):
                return 400, "Bad Request"
            length = int(value)
    return length or 0


def _fd_room(wanted: int) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 128))


class _Workers:
    """The fixed pool that answers complete requests, one each at a time, and the way back to
    the acceptor for a kept-alive connection: a list under a lock, and a byte on a socket pair
    whose read end the acceptor's selector watches (it wakes the acceptor)."""

    def __init__(self, handle, limits: ServerLimits, stop: threading.Event):
        self.handle = handle
        self.limits = limits
        self._stop = stop
        self.jobs: queue.Queue = queue.Queue(limits.queue)
        self._back: list[_Conn] = []  # kept-alive connections returned by the workers
        self._back_lock = threading.Lock()
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def threads(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._work, name=f"http-{i}", daemon=True)
                for i in range(self.limits.workers)]

    def end(self) -> None:
        """A None for each worker, as many as the queue has room for (the stop event ends the
        rest at their next request)."""
        for _ in range(self.limits.workers):
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                break

    def close(self) -> None:
        self.wake_r.close()
        self._wake_w.close()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def take_back(self) -> list[_Conn]:
        """In the acceptor: the wake-up bytes dropped, and the connections handed back."""
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._back_lock:
            back, self._back = self._back, []
        return back

    def _work(self) -> None:
        while True:
            req = self.jobs.get()
            if req is None or self._stop.is_set():
                if req is not None:
                    req.sock.close()
                return
            keep = False
            try:
                req.sock.setblocking(True)
                keep = self.handle(req)
            except Exception:  # noqa: BLE001 (one request's failure is that request's)
                log.debug("request from %s failed", req.address[0], exc_info=True)
            if not keep or self._stop.is_set():
                try:
                    req.sock.close()
                except OSError:
                    pass
                continue
            req.sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(req.sock, req.address, now, now + (self.limits.head_timeout if req.rest
                                                             else self.limits.idle_timeout),
                         buf=req.rest)
            with self._back_lock:
                self._back.append(conn)
            self.wake()


class ConnectionServer:
    """Listens on `address`; `handle(request) -> bool` runs in a worker and says whether the
    connection stays open. `tls()` gives the SSL context for a new connection (None: plain);
    it is asked at every accept, so a re-read web config applies to the next connection."""

    def __init__(self, address, handle, tls=lambda: None, limits: ServerLimits = ServerLimits()):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(address)
            self.listener.listen(128)
        except OSError:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        self.tls = tls
        self.limits = limits
        self.max_connections = _fd_room(limits.max_connections)
        self.server_address = self.listener.getsockname()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._workers = _Workers(handle, limits, self._stop)
        self._threads: list[threading.Thread] = []
        self._accept_paused_until = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._workers.wake_r, selectors.EVENT_READ, "wake")
        self._threads.append(threading.Thread(target=self._accept_loop, name="http", daemon=True))
        self._threads += self._workers.threads()
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._workers.wake()
        self._workers.end()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))  # a worker stuck writing is a daemon
        for conn in list(self._conns.values()):
            self._close(conn)
        self.listener.close()
        self._workers.close()

    # -- the acceptor ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                self._sel.register(self.listener, selectors.EVENT_READ, "listen")
            soonest = min((c.deadline for c in self._conns.values()), default=now + 1.0)
            try:
                events = self._sel.select(max(0.0, min(1.0, soonest - now)))
            except OSError:
                continue
            for key, _ in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._progress(key.data)
                except Exception:  # noqa: BLE001 (the acceptor serves everyone: it must not end)
                    log.exception("connection handling")
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            self._expire(time.monotonic())

    def _accept(self) -> None:
        for _ in range(64):  # at most this many per wake-up, then look at the others
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._evict_oldest():
                        self._sel.unregister(self.listener)
                        self._accept_paused_until = time.monotonic() + 0.1
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if len(self._conns) >= self.max_connections:
                self._evict_oldest()
            sock.setblocking(False)
            now = time.monotonic()
            handshaken = True
            try:
                ctx = self.tls()
            except Exception:  # noqa: BLE001 (a config re-read must not stop accepting)
                log.exception("web config")
                ctx = None
            if ctx is not None:
                try:
                    sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError):
                    sock.close()
                    continue
                handshaken = False
            # a new connection's request (a TLS client's handshake first) is due within the
            # head deadline from accept; only a kept-alive one may wait for its next request
            conn = _Conn(sock, address, now, now + self.limits.head_timeout, handshaken=handshaken)
            conn.started = True
            self._add(conn, selectors.EVENT_READ)

    def _add(self, conn: _Conn, events: int) -> None:
        try:
            self._sel.register(conn.sock, events, conn)
        except (ValueError, OSError):
            conn.sock.close()
            return
        self._conns[conn.sock.fileno()] = conn

    def _evict_oldest(self) -> bool:
        if not self._conns:
            return False
        oldest = min(self._conns.values(), key=lambda c: c.since)
        log.debug("closing the connection from %s: %d open", oldest.address[0], len(self._conns))
        self._close(oldest)
        return True

    def _take_back(self) -> None:
        for conn in self._workers.take_back():
            if len(self._conns) >= self.max_connections:
                self._evict_oldest()
            self._add(conn, selectors.EVENT_READ)
            if conn.buf:  # a pipelined request already read
                self._progress(conn, read=False)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if conn.started and conn.handshaken and not conn.draining:
                self._refuse(conn, 408, "Request Timeout")
            else:
                self._close(conn)

    def _refuse(self, conn: _Conn, code: int, reason: str) -> None:
        """An error response (best effort: it is small and the socket's buffer is empty),
        then the client's input dropped for a while, so that it reads the response."""
        try:
            conn.sock.send(_reply(code, reason))
        except (OSError, ssl.SSLError):
            self._close(conn)
            return
        conn.draining = True
        conn.buf.clear()
        conn.deadline = time.monotonic() + DRAIN_SECONDS

    def _progress(self, conn: _Conn, read: bool = True) -> None:
        sock = conn.sock
        if not conn.handshaken:
            try:
                sock.do_handshake()
                conn.handshaken = True
            except ssl.SSLWantReadError:
                self._sel.modify(sock, selectors.EVENT_READ, conn)
                return
            except ssl.SSLWantWriteError:
                self._sel.modify(sock, selectors.EVENT_WRITE, conn)
                return
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", conn.address[0], e)
                self._close(conn)
                return
            self._sel.modify(sock, selectors.EVENT_READ, conn)
        while read:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                self._sel.modify(sock, selectors.EVENT_WRITE, conn)
                break
            except (ssl.SSLError, OSError):
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            if conn.draining:
                conn.drained += len(data)
                if conn.drained > DRAIN_BYTES:
                    self._close(conn)
                    return
                continue
            if not conn.started:
                conn.started = True
                conn.since = time.monotonic()
                conn.deadline = conn.since + self.limits.head_timeout
            conn.buf += data
            if len(conn.buf) > self.limits.max_head_bytes + self.limits.max_body_bytes:
                break
        if conn.draining:
            return
        self._maybe_complete(conn)

    def _maybe_complete(self, conn: _Conn) -> None:
        buf = conn.buf
        end = _HEAD_END.search(buf, 0, self.limits.max_head_bytes + 4)
        if end is None:
            if len(buf) > self.limits.max_head_bytes:
                self._refuse(conn, 431, "Request Header Fields Too Large")
            return
        head = bytes(buf[:end.end()])
        length = framing(head)
        if isinstance(length, tuple):
            self._refuse(conn, *length)
            return
        if length > self.limits.max_body_bytes:
            self._refuse(conn, 413, "Content Too Large")
            return
        if len(buf) < end.end() + length:
            return  # the body is still coming, within the same deadline
        rest = bytes(buf[end.end() + length:])
        del self._conns[conn.sock.fileno()]
        self._sel.unregister(conn.sock)
        try:
            self._workers.jobs.put_nowait(Request(conn.sock, conn.address, head, rest))
        except queue.Full:
            self._conns[conn.sock.fileno()] = conn
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            self._refuse(conn, 503, "Service Unavailable")


class ResponseWriter:
    """The wfile of a worker's request: every write within one deadline for the response."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock = sock
        self.deadline = time.monotonic() + seconds

    def write(self, data) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("response deadline passed")
        self.sock.settimeout(left)
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass
