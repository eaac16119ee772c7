#!/usr/bin/env python3
"""Benchmark harness for asyncmail (standard library only).

    python3 bench/run.py [--quick] [--only NAME,...] [--json PATH] [--profile DIR]

Starts ``asyncmail.py`` as a separate process exactly as users do
(``python3 asyncmail.py --config <tmp ini>``, ``[server] port = 0``, the port
read from the "listening on http://127.0.0.1:PORT" log line), drives it over
keep-alive ``http.client`` connections, and delivers to a local SMTP sink
(Postfix's ``smtp-sink`` when installed, else an aiosmtpd subprocess).  Every
process it starts is stopped in ``finally`` blocks and again at exit.

Scenarios: intake, single, dispatch, latency, scale, footprint, reports, pull,
tenants, bounces (see bench/README.md).  Every target is a ratio to a
reference measured in the same run (``json.loads`` + ``executemany`` for
intake, a bare ``http.server`` echo, ``run.py _echo``, for single and
footprint, the raw smtplib loop for dispatch, pull and the tenants' pull, the
daemon itself at 1k queued for scale and with 1 tenant for the tenants'
intake, a raw imaplib loop for bounces); absolute figures are printed beside
the ratios but not judged.  bounces needs Dovecot 2.3 and root (it uses
testsupport's fixture) and is skipped with a message without them.
Prints each figure with its target and verdict, then a Markdown table;
writes raw numbers and machine info as JSON.

``--profile DIR`` runs every daemon under a per-thread cProfile wrapper
(``python3 -m cProfile`` alone only sees the main thread, which just waits)
and leaves one ``.prof`` plus a ``.txt`` summary per daemon start in DIR.
Figures taken under the profiler are slower than normal; use them only to
see where the time goes.
"""

import argparse
import atexit
import contextlib
import datetime
import http.client
import http.server
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DAEMON = os.path.join(ROOT, "asyncmail.py")
SMTP_SINK = "/usr/sbin/smtp-sink"
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")
SCENARIOS = ("intake", "single", "dispatch", "latency", "scale", "footprint", "reports",
             "pull", "tenants", "bounces", "page")

# ---------------------------------------------------------------------------
# sizes: (quick, full)
# ---------------------------------------------------------------------------
SIZES = {
    "intake_batches": (16, 16),         # 1000-message batches per client mode and round
    "intake_rounds": (1, 3),            # the median round is reported
    "single_seconds": (3.0, 10.0),       # per server (daemon, echo)
    "single_slices": (3, 5),            # alternating daemon / echo slices
    "dispatch_n": (3000, 10000),
    "latency_per_account": (24, 100),   # x 8 accounts
    "scale_big": (100000, 1000000),
    "scale_probe_batches": (8, 20),     # intake probe (4 threads) = dispatch probe
    "footprint_starts": (9, 9),
    "reports_n": (3000, 10000),
    "pull_n": (5000, 5000),             # the Genropy issue's site: 5,000 messages
    "tenants_sites": (4, 4),            # tenants' pull flow: sites, one tenant each
    "tenants_per_site": (2000, 2000),   # messages each site holds
    "tenants_intake_batches": (16, 16),  # 1000-message batches per daemon and round
    "tenants_intake_rounds": (5, 9),     # the median of the rounds' ratios is judged
    "bounces_n": (1000, 1000),          # one poll reads at most 1,000 (MAX_PER_CYCLE)
    "bounces_rounds": (5, 9),           # daemon and raw IMAP loop take turns
    "page_big": (100000, 1000000),      # the web page at 1,000 queued, then at this
    "page_rounds": (5, 7),              # page loads per view and size; the median counts
}
PICK = 0  # 0 quick, 1 full; set in main()


def size(name):
    return SIZES[name][PICK]


# ---------------------------------------------------------------------------
# process bookkeeping: every child is stopped at exit, whatever happens
# ---------------------------------------------------------------------------
_CHILDREN = []
_TMPDIRS = []
_CLEANUP_LOCK = threading.Lock()


def _stop_process(proc, timeout=10.0, sig=signal.SIGTERM):
    """SIGTERM (or ``sig``), wait up to ``timeout``, then SIGKILL.  Returns the
    exit code (None if it could not be reaped)."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
    except OSError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            proc.kill()
        except OSError:
            pass
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            return None


def _cleanup():
    with _CLEANUP_LOCK:
        children, _CHILDREN[:] = list(_CHILDREN), []
        tmpdirs, _TMPDIRS[:] = list(_TMPDIRS), []
    for proc in reversed(children):
        _stop_process(proc, timeout=5.0)
    for path in tmpdirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)   # unwinds through finally blocks, then atexit


def spawn(cmd, **kwargs):
    proc = subprocess.Popen(cmd, **kwargs)
    with _CLEANUP_LOCK:
        _CHILDREN.append(proc)
    return proc


def forget(proc):
    with _CLEANUP_LOCK:
        if proc in _CHILDREN:
            _CHILDREN.remove(proc)


def make_tmpdir(tag):
    path = tempfile.mkdtemp(prefix="asyncmail-bench-%s-" % tag)
    with _CLEANUP_LOCK:
        _TMPDIRS.append(path)
    return path


def drop_tmpdir(path):
    shutil.rmtree(path, ignore_errors=True)
    with _CLEANUP_LOCK:
        if path in _TMPDIRS:
            _TMPDIRS.remove(path)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, interval=0.02):
    """Call ``predicate`` until it returns a true value or ``timeout`` passes;
    returns (value, elapsed seconds)."""
    start = time.perf_counter()
    deadline = start + timeout
    value = predicate()
    while not value and time.perf_counter() < deadline:
        time.sleep(interval)
        value = predicate()
    return value, time.perf_counter() - start


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid):
    """utime + stime of a live process in seconds (0 when unreadable)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_snapshot():
    """(wall, machine busy CPU s, this harness + its children CPU s).  The
    difference of two snapshots tells how much CPU other processes took,
    which skews every figure on a 2-core machine."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:9]]
        busy = (sum(values) - values[3] - values[4]) / _HZ
    except (OSError, ValueError):
        busy = None
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    with _CLEANUP_LOCK:
        live = [proc.pid for proc in _CHILDREN if proc.returncode is None]
    mine += sum(_proc_cpu(pid) for pid in live)
    return time.perf_counter(), busy, mine


def foreign_cores(before, after):
    """Average CPU cores used by processes outside this harness between two
    snapshots (None when /proc/stat is unreadable)."""
    if before[1] is None or after[1] is None or after[0] <= before[0]:
        return None
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def vm_kb(pid, key):
    """VmHWM / VmRSS of a process in kB (None when unreadable)."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------
class Api:
    """One keep-alive connection to the daemon.  ``token``: sent as
    ``X-API-Token`` (the ``[server] api_token``, or a tenant's API key)."""

    def __init__(self, port, timeout=120.0, token=None):
        self.port = port
        self.timeout = timeout
        self.token = token
        self._conn = None

    def _connection(self):
        if self._conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def call(self, method, path, body=None):
        """(status, body bytes).  ``body``: bytes, or an object sent as JSON."""
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["X-API-Token"] = self.token
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # the daemon closes keep-alive connections idle for 30 s: like any
                # HTTP client, retry once on a fresh connection (safe here: a
                # resent add-messages batch only meets "duplicate id")
                self.close()
                if not reused or attempt == 2:
                    raise
            except (http.client.HTTPException, OSError):
                self.close()
                raise
        if response.will_close:
            self.close()
        return response.status, data

    def json(self, method, path, body=None):
        status, data = self.call(method, path, body)
        try:
            return status, json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            return status, data

    def ok(self, method, path, body=None):
        status, answer = self.json(method, path, body)
        if status != 200:
            raise RuntimeError("%s %s -> %s %r" % (method, path, status, answer))
        return answer

    def status(self):
        return self.ok("GET", "/status")["queue"]

    def metric(self, name):
        status, data = self.call("GET", "/metrics")
        if status != 200:
            raise RuntimeError("GET /metrics -> %s" % status)
        total = 0.0
        for line in data.decode("utf-8").splitlines():
            if line.startswith(name) and (line[len(name):len(name) + 1] in (" ", "{")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------
# the daemon
# ---------------------------------------------------------------------------
LISTENING = re.compile(r"listening on http://\[?([0-9a-fA-F.:]+)\]?:(\d+)")


class Daemon:
    """``python3 asyncmail.py --config <tmp ini>`` in its own temp directory.
    With ``[server] api_token`` in ``settings``, its ``api()`` clients send
    that token."""

    def __init__(self, tag, settings=None, profile_dir=None):
        self.tag = tag
        self.dir = make_tmpdir(tag)
        self.db = os.path.join(self.dir, "q.db")
        self.ini = os.path.join(self.dir, "asyncmail.ini")
        self.profile_dir = profile_dir
        conf = {"server": {"host": "127.0.0.1", "port": "0"},
                "storage": {"db_path": self.db}}
        for section, values in (settings or {}).items():
            conf.setdefault(section, {}).update({k: str(v) for k, v in values.items()})
        self.token = conf["server"].get("api_token")
        with open(self.ini, "w") as handle:
            for section, values in conf.items():
                handle.write("[%s]\n" % section)
                for key, value in values.items():
                    handle.write("%s = %s\n" % (key, value))
                handle.write("\n")
        self.proc = None
        self.port = None
        self.lines = deque(maxlen=200)
        self.problems = 0        # ERROR/CRITICAL/Traceback lines seen
        self.warnings = 0
        self._ready = threading.Event()
        self._reader = None
        self.spawned_at = None
        self.ready_at = None

    def start(self, timeout=30.0):
        cmd = [sys.executable, DAEMON, "--config", self.ini]
        if self.profile_dir:
            os.makedirs(self.profile_dir, exist_ok=True)
            out = os.path.join(self.profile_dir, "%s-%s.prof" % (
                self.tag, time.strftime("%H%M%S")))
            cmd = [sys.executable, os.path.abspath(__file__), "_profiled", out,
                   PROFILE_CLOCK, "--"] + cmd[1:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNC_MAIL_")}
        self.spawned_at = time.perf_counter()
        self.proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=self.dir, env=env)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name="stderr-%s" % self.tag)
        self._reader.start()
        deadline = time.perf_counter() + timeout
        while not self._ready.wait(0.005):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError("daemon did not start (exit %s):\n%s" % (
                    self.proc.returncode, "\n".join(self.lines)))
        self.ready_at = time.perf_counter()
        return self

    def _read_stderr(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                self.problems += 1
            elif " WARNING " in line:
                self.warnings += 1
            if self.port is None:
                found = LISTENING.search(line)
                if found:
                    self.port = int(found.group(2))
                    self._ready.set()

    def api(self, timeout=120.0, token=None):
        """A client with ``token`` (a tenant's key), else the admin token if any."""
        return Api(self.port, timeout, token or self.token)

    def vm(self, key="VmHWM"):
        return vm_kb(self.proc.pid, key) if self.proc else None

    def stop(self, timeout=None):
        if self.proc is None:
            return None
        if timeout is None:
            timeout = 120.0 if self.profile_dir else 40.0
        code = _stop_process(self.proc, timeout)
        forget(self.proc)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def close(self):
        self.stop()
        drop_tmpdir(self.dir)

    def __enter__(self):
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc):
        self.close()


def add_account(api, account_id, port, **extra):
    account = {"id": account_id, "host": "127.0.0.1", "port": port}
    account.update(extra)
    api.ok("POST", "/account", account)


# ---------------------------------------------------------------------------
# SMTP sinks
# ---------------------------------------------------------------------------
class Sink:
    """Postfix smtp-sink (delay 0 or whole seconds) or an aiosmtpd subprocess
    (``delay`` seconds in handle_DATA, fractional allowed)."""

    def __init__(self, delay=0.0, prefer_postfix=True):
        self.delay = delay
        self.use_postfix = (prefer_postfix and os.access(SMTP_SINK, os.X_OK)
                            and float(delay).is_integer())
        self.kind = None
        self.port = None
        self.proc = None

    def start(self):
        if self.use_postfix:
            self._start_postfix()
        else:
            self._start_aiosmtpd()
        return self

    def _start_postfix(self):
        for _ in range(5):   # the probed port may be taken meanwhile: retry
            port = free_port()
            cmd = [SMTP_SINK]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            if self.delay:
                cmd += ["-w", str(int(self.delay))]
            cmd += ["127.0.0.1:%d" % port, "256"]
            proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
            if wait_until(lambda: proc.poll() is not None or _smtp_banner(port), 5.0)[0] \
                    and proc.poll() is None:
                self.proc, self.port, self.kind = proc, port, "postfix smtp-sink"
                return
            _stop_process(proc, 2)
            forget(proc)
        raise RuntimeError("smtp-sink did not start")

    def _start_aiosmtpd(self):
        cmd = [sys.executable, os.path.abspath(__file__), "_aiosmtpd", "--delay", str(self.delay)]
        self.proc, self.port = spawn_with_port(
            cmd, "aiosmtpd sink did not start (is aiosmtpd installed?)")
        self.kind = "aiosmtpd (delay %gs)" % self.delay if self.delay else "aiosmtpd"

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None

    def __enter__(self):
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc):
        self.stop()


def spawn_with_port(cmd, failure, timeout=20.0):
    """Start a ``run.py _subcommand`` child that prints "PORT n" once it
    listens and exits when its stdin closes.  Returns (process, port)."""
    proc = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL)
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    found = re.match(rb"PORT (\d+)", box[0] if box else b"")
    if not found:
        _stop_process(proc, 2)
        forget(proc)
        raise RuntimeError(failure)
    return proc, int(found.group(1))


def stop_child(proc):
    """Close the stdin of a spawn_with_port child (its signal to exit), then stop it."""
    if proc is None:
        return
    if proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass
    _stop_process(proc, 5)
    forget(proc)


def _smtp_banner(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(512).startswith(b"220")
    except OSError:
        return False


def aiosmtpd_main(delay):
    """``run.py _aiosmtpd --delay S``: an SMTP sink on 127.0.0.1:0 that waits
    ``delay`` seconds in DATA; prints "PORT n"; exits when stdin closes."""
    import asyncio
    import logging
    from aiosmtpd.smtp import SMTP
    logging.disable(logging.CRITICAL)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            if delay:
                await asyncio.sleep(delay)
            return "250 2.0.0 Ok: queued"

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(Handler(), hostname="bench-sink", ident="bench-sink"),
        "127.0.0.1", 0))
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)

    def on_stdin():
        if not os.read(sys.stdin.fileno(), 4096):
            loop.stop()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
    return 0


# ---------------------------------------------------------------------------
# the reference HTTP server: a bare http.server JSON echo in its own process
# ---------------------------------------------------------------------------
ECHO_ANSWER = {"ok": True, "queued": 1, "rejected": [], "duplicates": []}


def echo_main():
    """``run.py _echo``: the request path with nothing of asyncmail in it.
    A stock ThreadingHTTPServer (HTTP/1.1 keep-alive, Nagle off, as the
    daemon) that reads a POST body, ``json.loads`` it and answers a small
    JSON like the daemon's add-messages answer; GET answers ``{"ok":true}``.
    Prints "PORT n"; exits when stdin closes."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            messages = payload.get("messages") if isinstance(payload, dict) else None
            answer = dict(ECHO_ANSWER, queued=len(messages) if isinstance(messages, list) else 0)
            self._answer(json.dumps(answer, separators=(",", ":")).encode("utf-8"))

        def do_GET(self):
            self._answer(b'{"ok":true}')

        def _answer(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    print("PORT %d" % server.server_address[1], flush=True)
    while os.read(sys.stdin.fileno(), 4096):
        pass
    server.shutdown()
    server.server_close()
    return 0


class Echo:
    """``run.py _echo`` as its own process (started like the daemon: a fresh
    ``python3 <script>``); spawned_at / ready_at bracket its start-up."""

    def __init__(self):
        self.proc = None
        self.port = None
        self.spawned_at = None
        self.ready_at = None

    def start(self):
        cmd = [sys.executable, os.path.abspath(__file__), "_echo"]
        self.spawned_at = time.perf_counter()
        self.proc, self.port = spawn_with_port(cmd, "the echo server did not start")
        self.ready_at = time.perf_counter()
        return self

    def vm(self, key="VmHWM"):
        return vm_kb(self.proc.pid, key) if self.proc else None

    def stop(self):
        stop_child(self.proc)
        self.proc = None

    def __enter__(self):
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------
_LINE = "Benchmark body: ordinary words to make an ordinary one kilobyte text."
BODY = "\n".join([_LINE] * 13) + "\n"     # 13 x 71 = 923 characters
SENDER = "Bench <bench@example.com>"
RCPT = "rcpt@example.org"
SUBJECT = "Benchmark message"
_FIXED = ',"from":%s,"to":[%s],"subject":%s,"body":%s' % (
    json.dumps(SENDER), json.dumps(RCPT), json.dumps(SUBJECT), json.dumps(BODY))


SEQUENTIAL_IDS = False      # --sequential-ids
PROFILE_CLOCK = "wall"      # --profile-clock
_SEQUENCE = itertools.count(1)
_RUN_TAG = uuid.uuid4().hex[:8]


def message_json(account_id=None, deferred_ts=None, tenant_id=None):
    """One message as JSON text with a fresh id: random (uuid4 hex, as
    applications make them; the id index then takes random inserts) or, with
    --sequential-ids, increasing.  ``tenant_id``: the tenant it is posted
    to (a tenant's client names it in every message)."""
    if SEQUENTIAL_IDS:
        text = '{"id":"%s-%012d"' % (_RUN_TAG, next(_SEQUENCE))
    else:
        text = '{"id":"%s"' % uuid.uuid4().hex
    if account_id is not None:
        text += ',"account_id":"%s"' % account_id
    if deferred_ts is not None:
        text += ',"deferred_ts":%d' % deferred_ts
    if tenant_id is not None:
        text += ',"tenant_id":"%s"' % tenant_id
    return text + _FIXED + "}"


def batch_bytes(count, account_id=None, deferred_ts=None, tenant_id=None):
    return ('{"messages":[%s]}' % ",".join(
        message_json(account_id, deferred_ts, tenant_id)
        for _ in range(count))).encode("utf-8")


def raw_mime():
    """The message the daemon would build, for the raw smtplib ceiling."""
    import email.policy
    import email.utils
    from email.message import EmailMessage
    policy = email.policy.SMTP.clone(cte_type="7bit", max_line_length=78)
    mime = EmailMessage(policy=policy)
    mime["From"] = SENDER
    mime["To"] = RCPT
    mime["Subject"] = SUBJECT
    mime["Date"] = email.utils.formatdate(usegmt=True)
    mime["Message-ID"] = "<%s@example.com>" % uuid.uuid4().hex
    mime.set_content(BODY, subtype="plain", charset="utf-8")
    return mime.as_bytes(policy=policy)


def post_batches(port, n_batches, threads, make=None, prebuilt=None, timeout=600.0,
                 token=None, path="/commands/add-messages"):
    """POST add-messages batches from ``threads`` keep-alive clients.

    ``prebuilt``: list of bodies (encoded before the clock starts); else
    ``make(i)`` builds batch i on the fly.  ``token`` and ``path``: a
    tenant's key and ``...?tenant_id=X``.  Returns (elapsed s, accepted).
    """
    lock = threading.Lock()
    state = {"next": 0, "accepted": 0, "errors": []}
    barrier = threading.Barrier(threads + 1)
    deadline = time.perf_counter() + timeout

    def client():
        api = Api(port, token=token)
        try:
            api.call("GET", "/status")   # connect (and spawn the server thread) early
            barrier.wait(30)
            while time.perf_counter() < deadline:
                with lock:
                    index = state["next"]
                    if index >= n_batches or state["errors"]:
                        return
                    state["next"] += 1
                body = prebuilt[index] if prebuilt is not None else make(index)
                status, answer = api.json("POST", path, body)
                if status != 200:
                    raise RuntimeError("add-messages -> %s %r" % (status, str(answer)[:300]))
                with lock:
                    state["accepted"] += answer["queued"]
        except Exception as exc:   # reported by the caller
            with lock:
                state["errors"].append(repr(exc))
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            api.close()

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(30)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for worker in workers:
        worker.join(max(0.0, deadline - time.perf_counter()) + 5)
    elapsed = time.perf_counter() - start
    if state["errors"]:
        raise RuntimeError("intake failed: %s" % state["errors"][0])
    if state["next"] < n_batches:
        raise RuntimeError("intake timed out after %d of %d batches" % (state["next"], n_batches))
    return elapsed, state["accepted"]


def wait_sent(api, target, timeout, interval=0.02, failed_before=0):
    """Poll GET /status every ``interval`` until sent >= target (plus new
    errors, so a failing sink does not hang); returns (queue, elapsed).
    ``failed_before``: messages already in ``error`` that are not the
    sink's doing (scale's failed probe-err messages)."""
    box = {}

    def done():
        queue = api.status()
        box["q"] = queue
        return queue["sent"] + queue["error"] - failed_before >= target

    ok, elapsed = wait_until(done, timeout, interval)
    if not ok:
        raise RuntimeError("timed out waiting for %d sent: %r" % (target, box.get("q")))
    if box["q"]["error"] != failed_before:
        raise RuntimeError("%d message(s) failed: %r" % (box["q"]["error"] - failed_before,
                                                          box["q"]))
    return box["q"], elapsed


def timed_requests(api, method, path, count):
    samples = []
    for _ in range(2):
        api.call(method, path)
    for _ in range(count):
        start = time.perf_counter()
        status, _ = api.call(method, path)
        samples.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError("%s %s -> %s" % (method, path, status))
    return samples


def pct(samples, q):
    """q-th percentile (0-100), linear interpolation."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def fmt(value, unit="", digits=0):
    if value is None:
        return "n/a"
    text = "{:,.{d}f}".format(value, d=digits)
    return text + (" " + unit if unit else "")


def verdict(ok):
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------
# scenarios: each returns {"rows": [(label, figure, target, verdict)], "raw": {...}}
# ---------------------------------------------------------------------------
class Context:
    def __init__(self, quick, profile_dir):
        self.quick = quick
        self.profile_dir = profile_dir
        self.results = {}    # scenario name -> its result (later scenarios may reuse)

    def daemon(self, tag, settings=None):
        return Daemon(tag, settings, self.profile_dir)


SUSPENDED = {"scheduler": {"active": "false"}}


_ASYNCMAIL = []


def asyncmail_module():
    """The measured ``asyncmail.py`` imported as a module (not run), for its
    schema and insert statement: the intake reference pays for the same
    indexes and triggers as the daemon."""
    if not _ASYNCMAIL:
        import importlib.util
        spec = importlib.util.spec_from_file_location("asyncmail_bench_schema", DAEMON)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _ASYNCMAIL.append(module)
    return _ASYNCMAIL[0]


class IntakeReference:
    """What intake costs without asyncmail: the POSTed batch bodies ->
    ``json.loads`` -> the rows the daemon inserts (the 12 columns of
    SQL_INSERT_MESSAGE, payload = compact ``json.dumps`` of the message,
    tenant ``default``) ->
    ``executemany`` into a database with the daemon's schema (indexes and
    triggers), WAL, ``synchronous=FULL``, one transaction per batch.  No
    validation, no HTTP, no duplicate check: that is the daemon's own work.
    Runs in the harness process, in a temp directory on the same file system
    as the daemons' databases."""

    def __init__(self, account_id):
        module = asyncmail_module()
        self.account_id = account_id
        self.insert = module.SQL_INSERT_MESSAGE
        self.dir = make_tmpdir("intake-ref")
        self.conn = sqlite3.connect(os.path.join(self.dir, "ref.db"), isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        for version in range(1, module.SCHEMA_VERSION + 1):   # every migration step
            statements = getattr(module, "SQL_SCHEMA_V%d" % version)
            self.conn.execute("BEGIN IMMEDIATE")
            for statement in statements:
                self.conn.execute(statement)
            self.conn.execute("COMMIT")

    def run(self, bodies):
        """Insert every batch; returns (elapsed s, messages)."""
        conn, insert, account_id = self.conn, self.insert, self.account_id
        dumps = json.dumps
        count = 0
        start = time.perf_counter()
        for body in bodies:
            now = time.time()
            rows = []
            for message in json.loads(body)["messages"]:
                deferred_ts = message.get("deferred_ts")
                rows.append((message["id"], message.get("account_id") or account_id,
                             message.get("priority", 2),
                             "deferred" if deferred_ts else "pending", now, deferred_ts,
                             message["subject"], dumps(message["to"]),
                             "<%s@example.com>" % message["id"],
                             dumps(message, separators=(",", ":")), "default",
                             message.get("batch_code")))
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")
            count += len(rows)
        return time.perf_counter() - start, count

    def close(self):
        self.conn.close()
        drop_tmpdir(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# intake: daemon msg/s >= INTAKE_RATIO x the reference's
INTAKE_RATIO = 0.35
INTAKE_CHUNK = 4     # batches per turn (reference, then daemon)


def scenario_intake(ctx):
    n = size("intake_batches")
    rounds = size("intake_rounds")
    raw = {"batch_messages": 1000, "batches_per_round": n, "rounds": rounds,
           "note": "a fresh daemon (empty queue) per client count",
           "reference": "json.loads + executemany of the same bodies, same schema, WAL, "
                        "synchronous=FULL, one transaction per batch (harness process, "
                        "fresh database per client count)"}
    rows = []
    for threads in (1, 4):
        # a fresh queue for each client count: the id index grows with every
        # batch (see scale), so the second mode would otherwise start behind
        with ctx.daemon("intake%d" % threads, SUSPENDED) as daemon, \
                IntakeReference("intake") as reference:
            api = daemon.api()
            add_account(api, "intake", 9)
            warm = [batch_bytes(1000) for _ in range(2)]
            post_batches(daemon.port, 2, 2, prebuilt=warm)
            reference.run(warm)
            runs = []
            for _ in range(rounds):
                bodies = [batch_bytes(1000) for _ in range(n)]   # encoded before the clock
                # reference and daemon take turns, INTAKE_CHUNK batches each,
                # so a burst of other processes' work hits both alike
                elapsed = accepted = ref_elapsed = ref_count = cpu = 0
                for first in range(0, n, INTAKE_CHUNK):
                    chunk = bodies[first:first + INTAKE_CHUNK]
                    took, count = reference.run(chunk)
                    ref_elapsed += took
                    ref_count += count
                    cpu0 = _proc_cpu(daemon.proc.pid)
                    took, count = post_batches(daemon.port, len(chunk), threads, prebuilt=chunk)
                    cpu += _proc_cpu(daemon.proc.pid) - cpu0
                    elapsed += took
                    accepted += count
                runs.append({"messages": accepted, "seconds": elapsed,
                             "msg_per_s": accepted / elapsed,
                             "daemon_cpu_ms_per_1000": cpu / accepted * 1e6,
                             "reference_seconds": ref_elapsed,
                             "reference_msg_per_s": ref_count / ref_elapsed})
            rate = statistics.median(r["msg_per_s"] for r in runs)
            ref_rate = statistics.median(r["reference_msg_per_s"] for r in runs)
            ratio = rate / ref_rate
            raw["threads_%d" % threads] = {
                "rounds": runs, "msg_per_s": rate, "reference_msg_per_s": ref_rate,
                "ratio": ratio, "queue": api.status(),
                "peak_rss_kb": daemon.vm(), "daemon_error_lines": daemon.problems}
            api.close()
        rows.append(("intake, %d client%s" % (threads, "s" if threads > 1 else ""),
                     "%s = %.0f%% of ref %s" % (fmt(rate, "msg/s"), ratio * 100,
                                                fmt(ref_rate, "msg/s")),
                     ">= %.0f%% of ref" % (INTAKE_RATIO * 100), verdict(ratio >= INTAKE_RATIO)))
    return {"rows": rows, "raw": raw}


def drive_single(port, seconds, threads, server_pid=None, warmup=20):
    """One-message add-messages POSTs from ``threads`` keep-alive clients
    for ``seconds`` (after ``warmup`` untimed requests each), each body a
    fresh ``batch_bytes(1)``.  Returns (latency samples in s, elapsed s, CPU s
    of ``server_pid`` meanwhile)."""
    barrier = threading.Barrier(threads + 1)
    latencies = [[] for _ in range(threads)]
    errors = []
    stop_at = [time.perf_counter() + 3600]   # placeholder until the barrier opens

    def client(slot):
        conn = Api(port)
        try:
            for _ in range(warmup):
                conn.call("POST", "/commands/add-messages", batch_bytes(1))
            barrier.wait(30)
            mine = latencies[slot]
            for _ in range(200000):   # bound; the deadline ends it first
                body = batch_bytes(1)
                start = time.perf_counter()
                status, _ = conn.call("POST", "/commands/add-messages", body)
                end = time.perf_counter()
                if status != 200:
                    raise RuntimeError("add-messages -> %s" % status)
                mine.append(end - start)
                if end >= stop_at[0]:
                    return
        except Exception as exc:
            errors.append(repr(exc))
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    cpu0 = _proc_cpu(server_pid) if server_pid else 0.0
    stop_at[0] = start + seconds
    for worker in workers:
        worker.join(seconds + 60)
    elapsed = time.perf_counter() - start
    cpu = (_proc_cpu(server_pid) - cpu0) if server_pid else 0.0
    if errors:
        raise RuntimeError("single failed: %s" % errors[0])
    return [s for per in latencies for s in per], elapsed, cpu


def latency_summary(samples, elapsed, cpu):
    return {"requests": len(samples), "elapsed": elapsed,
            "req_per_s": len(samples) / elapsed,
            "p50_ms": pct(samples, 50) * 1e3, "p90_ms": pct(samples, 90) * 1e3,
            "p99_ms": pct(samples, 99) * 1e3, "max_ms": max(samples) * 1e3,
            "mean_ms": statistics.fmean(samples) * 1e3,
            "cpu_us_per_request": cpu / len(samples) * 1e6,
            "cpu_cores": cpu / elapsed}


# single: daemon req/s >= SINGLE_RATE x the echo's, daemon p50 <= SINGLE_P50 x the echo's
SINGLE_RATE = 0.3
SINGLE_P50 = 4.0


def scenario_single(ctx):
    """The daemon and the bare http.server echo, both running, driven in
    alternating slices by the same 8-client loop with the same bodies, so
    both see the same machine (other processes come and go)."""
    seconds = size("single_seconds")
    slices = size("single_slices")
    threads = 8
    raw = {"threads": threads, "seconds": seconds, "slices": slices,
           "reference": "bare http.server JSON echo (run.py _echo), same client loop"}
    pooled = {"daemon": [[], 0.0, 0.0], "echo": [[], 0.0, 0.0]}
    with ctx.daemon("single", SUSPENDED) as daemon, Echo() as echo:
        api = daemon.api()
        add_account(api, "single", 9)
        api.close()
        servers = (("echo", echo.port, echo.proc.pid), ("daemon", daemon.port, daemon.proc.pid))
        for _ in range(slices):
            for name, port, pid in servers:
                samples, elapsed, cpu = drive_single(port, seconds / slices, threads, pid)
                pooled[name][0].extend(samples)
                pooled[name][1] += elapsed
                pooled[name][2] += cpu
        raw["daemon_error_lines"] = daemon.problems
    for name, (samples, elapsed, cpu) in pooled.items():
        raw[name] = latency_summary(samples, elapsed, cpu)
    ours, ref = raw["daemon"], raw["echo"]
    # the keys of earlier runs, for comparison across commits
    for key in ("requests", "elapsed", "req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                "mean_ms"):
        raw[key] = ours[key]
    raw["daemon_cpu_us_per_request"] = ours["cpu_us_per_request"]
    raw["daemon_cpu_cores"] = ours["cpu_cores"]
    rate_ratio = ours["req_per_s"] / ref["req_per_s"]
    p50_ratio = ours["p50_ms"] / ref["p50_ms"]
    raw.update({"req_per_s_ratio": rate_ratio, "p50_ratio": p50_ratio})
    rows = [("single, p50 / p99 latency",
             "%s / %s ms; echo %s / %s ms; p50 %.2fx" % (
                 fmt(ours["p50_ms"], digits=2), fmt(ours["p99_ms"], digits=1),
                 fmt(ref["p50_ms"], digits=2), fmt(ref["p99_ms"], digits=1), p50_ratio),
             "p50 <= %gx echo" % SINGLE_P50, verdict(p50_ratio <= SINGLE_P50)),
            ("single, requests/s (8 clients)",
             "%s = %.0f%% of echo %s" % (fmt(ours["req_per_s"], "req/s"), rate_ratio * 100,
                                         fmt(ref["req_per_s"], "req/s")),
             ">= %.0f%% of echo" % (SINGLE_RATE * 100), verdict(rate_ratio >= SINGLE_RATE))]
    return {"rows": rows, "raw": raw}


def raw_ceiling(port, count, rounds=3):
    """A plain smtplib loop: ``count`` messages over one reused connection,
    split into ``rounds`` timed rounds.  Returns (median rate, [rates],
    message bytes).  Loopback ping-pong speed on a small VM swings with CPU
    idle states, hence the rounds."""
    import smtplib
    data = raw_mime()
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    rates = []
    try:
        smtp.ehlo()
        for _ in range(min(100, count)):    # warm-up
            smtp.sendmail("bench@example.com", [RCPT], data)
        per_round = max(1, count // rounds)
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(per_round):
                smtp.sendmail("bench@example.com", [RCPT], data)
            rates.append(per_round / (time.perf_counter() - start))
    finally:
        try:
            smtp.quit()
        except Exception:
            smtp.close()
    return statistics.median(rates), rates, len(data)


def measure_dispatch(api, n, already_sent, timeout, failed_before=0):
    """Activate, time until sent reaches already_sent + n, suspend again."""
    start = time.perf_counter()
    api.ok("POST", "/commands/activate")
    queue, _ = wait_sent(api, already_sent + n, timeout, failed_before=failed_before)
    elapsed = time.perf_counter() - start
    api.ok("POST", "/commands/suspend")
    return n / elapsed, elapsed, queue


def scenario_dispatch(ctx):
    n = size("dispatch_n")
    raw = {"messages": n}
    with Sink() as sink:
        raw["sink"] = sink.kind
        ceiling, rounds, mime_bytes = raw_ceiling(sink.port, n)
        raw.update({"raw_msg_per_s": ceiling, "raw_rounds_msg_per_s": rounds,
                    "raw_message_bytes": mime_bytes})
        with ctx.daemon("dispatch", SUSPENDED) as daemon:
            api = daemon.api()
            add_account(api, "one", sink.port, batch_size=1000)
            post_batches(daemon.port, n // 1000, 2, make=lambda i: batch_bytes(1000))
            cpu0 = _proc_cpu(daemon.proc.pid)
            rate, elapsed, queue = measure_dispatch(api, n, 0, max(120.0, n / 20.0))
            cpu = _proc_cpu(daemon.proc.pid) - cpu0
            raw.update({"daemon_msg_per_s": rate, "daemon_seconds": elapsed, "queue": queue,
                        "daemon_cpu_us_per_message": cpu / n * 1e6,
                        "daemon_cpu_cores": cpu / elapsed,
                        "daemon_error_lines": daemon.problems})
            api.close()
    ratio = raw["daemon_msg_per_s"] / ceiling
    raw["ratio"] = ratio
    rows = [("dispatch, 1 account",
             "%s = %.0f%% of raw %s" % (fmt(raw["daemon_msg_per_s"], "msg/s"), ratio * 100,
                                        fmt(ceiling, "msg/s")),
             ">= 50% of raw", verdict(ratio >= 0.5))]
    return {"rows": rows, "raw": raw}


def scenario_latency(ctx):
    per_account = size("latency_per_account")
    accounts = 8
    workers = 4
    delay = 0.05
    n = per_account * accounts
    raw = {"accounts": accounts, "max_workers": workers, "sink_delay_s": delay, "messages": n}
    # smtp-sink's -w takes whole seconds only, so the 50 ms sink is aiosmtpd
    with Sink(delay=delay) as sink:
        raw["sink"] = sink.kind
        with ctx.daemon("latency", SUSPENDED) as daemon:
            api = daemon.api()
            bodies = []
            for i in range(accounts):
                add_account(api, "acct%d" % i, sink.port)
            for i in range(accounts):
                bodies.append(batch_bytes(per_account, account_id="acct%d" % i))
            post_batches(daemon.port, len(bodies), 2, prebuilt=bodies)
            rate, elapsed, queue = measure_dispatch(api, n, 0, max(120.0, n / 5.0))
            raw.update({"msg_per_s": rate, "seconds": elapsed, "queue": queue,
                        "daemon_error_lines": daemon.problems})
            api.close()
    ideal = workers / delay
    raw["ideal_msg_per_s"] = ideal
    raw["ratio"] = rate / ideal
    rows = [("latency, 8 accounts, 50 ms sink",
             "%s = %.0f%% of ideal %d msg/s" % (fmt(rate, "msg/s", 1), 100 * rate / ideal,
                                                 ideal),
             ">= 80% of ideal (4 x 20/s)", verdict(rate >= 0.8 * ideal))]
    return {"rows": rows, "raw": raw}


# scale: rates at the big size >= SCALE_RATE_RATIO x those at 1k; GET /status
# and /metrics medians at the big size <= SCALE_REQUEST_RATIO x those at 1k;
# the operator calls (one account's failed messages listed, one account's
# scheduled messages retried) at the big size >= SCALE_OPERATOR_RATIO x the
# speed at 1k (time at 1k / time at the big size), as the issue set it
SCALE_RATE_RATIO = 0.8
SCALE_REQUEST_RATIO = 4.0
SCALE_OPERATOR_RATIO = 0.9
PROBE_ERR_ACCOUNT = "probe-err"     # deleted with force: its messages fail
PROBE_ERR_MESSAGES = 100
PROBE_RETRY_ACCOUNT = "probe"       # exists only while the retry rounds run
PROBE_RETRY_MESSAGES = 1000
PROBE_RETRY_ROUNDS = 3
DISCARD_PORT = 9                    # nothing is ever sent: the daemon is suspended
LIST_ERRORS_PATH = "/messages?status=error&account_id=%s&limit=100" % PROBE_ERR_ACCOUNT


def seed_failed(api, account_id, n):
    """n messages in ``error`` for ``account_id``, the way an operator gets
    them: queue them for an account, then DELETE it with force ("account
    deleted"; the messages keep their account_id).  Returns the error count."""
    add_account(api, account_id, DISCARD_PORT)
    answer = api.ok("POST", "/commands/add-messages", batch_bytes(n, account_id=account_id))
    if answer["queued"] != n:
        raise RuntimeError("probe-err intake queued %r of %d" % (answer["queued"], n))
    api.ok("DELETE", "/account/%s?force=true" % account_id)
    failed = api.status()["error"]
    if failed != n:
        raise RuntimeError("%d messages in error after the forced delete, not %d" % (failed, n))
    return failed


def time_list_errors(api, failed):
    """Median, min and max ms of 20 ``GET /messages?status=error&account_id=X&limit=100``
    (after one untimed call that checks the answer is those messages)."""
    answer = api.ok("GET", LIST_ERRORS_PATH)
    messages = answer["messages"]
    if len(messages) != min(100, failed) or any(
            m["status"] != "error" or m["account_id"] != PROBE_ERR_ACCOUNT for m in messages):
        raise RuntimeError("GET %s did not list the %d failed messages" % (
            LIST_ERRORS_PATH, failed))
    samples = timed_requests(api, "GET", LIST_ERRORS_PATH, 20)
    return {"median": statistics.median(samples) * 1e3, "min": min(samples) * 1e3,
            "max": max(samples) * 1e3}


def time_retry(api, far, rounds=PROBE_RETRY_ROUNDS, n=PROBE_RETRY_MESSAGES):
    """ms of ``POST /commands/retry {"account_id": probe, "include_scheduled":
    true}`` over n client-scheduled messages, in ``rounds`` rounds.  Each round
    queues the n messages (deferred to ``far``), times the retry, checks that
    they wait as pending (the daemon is suspended: none claimed, tried or
    failed), then deletes them by id, so the queue is as it was before.  The
    account is added first and deleted last: the dispatch probes and the next
    backlog load (messages without account_id) see the one account they did."""
    add_account(api, PROBE_RETRY_ACCOUNT, DISCARD_PORT)
    samples = []
    for _ in range(rounds):
        body = batch_bytes(n, account_id=PROBE_RETRY_ACCOUNT, deferred_ts=far)
        ids = [m["id"] for m in json.loads(body.decode("utf-8"))["messages"]]
        answer = api.ok("POST", "/commands/add-messages", body)
        if answer["queued"] != n:
            raise RuntimeError("retry probe queued %r of %d" % (answer["queued"], n))
        before = api.status()
        command = {"account_id": PROBE_RETRY_ACCOUNT, "include_scheduled": True}
        start = time.perf_counter()
        answer = api.ok("POST", "/commands/retry", command)
        samples.append((time.perf_counter() - start) * 1e3)
        if answer["affected"] != n:
            raise RuntimeError("retry affected %r, not %d" % (answer["affected"], n))
        after = api.status()
        expected = dict(before, pending=before["pending"] + n, deferred=before["deferred"] - n)
        if any(after.get(k) != v for k, v in expected.items()):
            raise RuntimeError("after retry the queue is %r, expected %r" % (after, expected))
        answer = api.ok("POST", "/commands/delete-messages", {"ids": ids})
        if answer["removed"] != n or answer["not_found"] or answer.get("being_sent"):
            raise RuntimeError("delete of the retried probe: %r" % {
                k: (v if not isinstance(v, list) else len(v)) for k, v in answer.items()})
    api.ok("DELETE", "/account/%s" % PROBE_RETRY_ACCOUNT)   # 409 if anything were left
    return {"median": statistics.median(samples), "rounds": samples}


def scenario_scale(ctx):
    big = size("scale_big")
    probe_batches = size("scale_probe_batches")
    sizes = (1000, big)
    far = int(time.time()) + 10 * 365 * 86400
    raw = {"sizes": list(sizes), "probe_messages": probe_batches * 1000,
           "id_kind": "sequential" if SEQUENTIAL_IDS else "uuid4 hex",
           "backlog": "deferred_ts +10 years, same account",
           "operator_probes": {
               "error_account": PROBE_ERR_ACCOUNT, "error_messages": PROBE_ERR_MESSAGES,
               "list_path": LIST_ERRORS_PATH, "list_requests": 20,
               "retry_account": PROBE_RETRY_ACCOUNT, "retry_messages": PROBE_RETRY_MESSAGES,
               "retry_rounds": PROBE_RETRY_ROUNDS,
               "when": "at each size after the dispatch probe; ratio = ms at 1k / ms at big"}}
    if ctx.quick:
        print("  (--quick: big queue is %s messages instead of 1,000,000)" % fmt(big))
    with Sink() as sink:
        raw["sink"] = sink.kind
        with ctx.daemon("scale", SUSPENDED) as daemon:
            api = daemon.api()
            add_account(api, "bulk", sink.port, batch_size=1000)
            # once, before the first size: failed messages of one account for
            # GET /messages?status=error&account_id=X; they stay in the queue,
            # so the dispatch probes count them as already failed
            failed = seed_failed(api, PROBE_ERR_ACCOUNT, PROBE_ERR_MESSAGES)
            loaded = 0
            sent = 0
            for queued in sizes:
                step = {}
                batches = (queued - loaded) // 1000
                elapsed, accepted = post_batches(
                    daemon.port, batches, 4,
                    make=lambda i: batch_bytes(1000, deferred_ts=far),
                    timeout=max(600.0, batches * 2.0))
                loaded = queued
                step["backlog_load"] = {"messages": accepted, "seconds": elapsed,
                                        "msg_per_s": accepted / elapsed if elapsed else None}
                if batches >= 50:
                    print("  loaded %s deferred messages in %.1f s (%s)" % (
                        fmt(accepted), elapsed, fmt(accepted / elapsed, "msg/s")))
                status_s = timed_requests(api, "GET", "/status", 20)
                metrics_s = timed_requests(api, "GET", "/metrics", 20)
                step["status_ms"] = {"median": statistics.median(status_s) * 1e3,
                                     "max": max(status_s) * 1e3}
                step["metrics_ms"] = {"median": statistics.median(metrics_s) * 1e3,
                                      "max": max(metrics_s) * 1e3}
                bodies = [batch_bytes(1000) for _ in range(probe_batches)]
                elapsed, accepted = post_batches(daemon.port, probe_batches, 4, prebuilt=bodies)
                step["intake_msg_per_s"] = accepted / elapsed
                rate, elapsed, queue = measure_dispatch(api, accepted, sent,
                                                        max(120.0, accepted / 20.0),
                                                        failed_before=failed)
                sent += accepted
                step["dispatch_msg_per_s"] = rate
                step["queue_after"] = queue
                step["rss_hwm_kb"] = daemon.vm()
                step["db_bytes"] = sum(os.path.getsize(daemon.db + ext) for ext in
                                       ("", "-wal") if os.path.exists(daemon.db + ext))
                if queued == big:   # footprint's big-queue RSS, read before the operator calls
                    raw["rss_hwm_kb_big"] = daemon.vm()
                    raw["rss_kb_big_now"] = daemon.vm("VmRSS")
                # the operator calls come last at each size, so the intake and
                # dispatch probes above see the queue they always did
                step["list_errors_ms"] = time_list_errors(api, failed)
                step["retry_ms"] = time_retry(api, far)
                raw[str(queued)] = step
                print("  %s queued: intake %s, dispatch %s, status %.2f ms, metrics %.2f ms, "
                      "list errors %.2f ms, retry %.1f ms" % (
                          fmt(queued), fmt(step["intake_msg_per_s"], "msg/s"),
                          fmt(rate, "msg/s"), step["status_ms"]["median"],
                          step["metrics_ms"]["median"], step["list_errors_ms"]["median"],
                          step["retry_ms"]["median"]))
            raw["rss_hwm_kb_after_operator_calls"] = daemon.vm()
            raw["loader_clients"] = 4
            raw["daemon_error_lines"] = daemon.problems
            api.close()
    small, large = raw["1000"], raw[str(big)]
    label_big = "1M" if big == 1000000 else fmt(big)
    rows = []
    for key, name in (("intake_msg_per_s", "intake"), ("dispatch_msg_per_s", "dispatch")):
        ratio = large[key] / small[key]
        raw[key.replace("_msg_per_s", "_ratio")] = ratio
        rows.append(("scale, %s at 1k -> %s queued" % (name, label_big),
                     "%s -> %s (%.0f%%)" % (fmt(small[key]), fmt(large[key], "msg/s"),
                                            ratio * 100),
                     ">= %.0f%% of 1k" % (SCALE_RATE_RATIO * 100),
                     verdict(ratio >= SCALE_RATE_RATIO)))
    for key, name in (("status_ms", "GET /status"), ("metrics_ms", "GET /metrics")):
        # the same daemon's own answer at 1k is the reference: what must not
        # happen is a request that grows with the queue (a count or a scan)
        ratio = large[key]["median"] / small[key]["median"]
        raw[key.replace("_ms", "_ratio")] = ratio
        rows.append(("scale, %s median at 1k / %s" % (name, label_big),
                     "%.2f / %.2f ms (%.2fx)" % (small[key]["median"], large[key]["median"],
                                                 ratio),
                     "<= %gx of 1k" % SCALE_REQUEST_RATIO, verdict(ratio <= SCALE_REQUEST_RATIO)))
    for key, name in (("list_errors_ms", "GET /messages?status=error&account_id=X"),
                      ("retry_ms", "retry %s of one account" % fmt(PROBE_RETRY_MESSAGES))):
        # speed at the big size as a share of the speed at 1k: an index seek
        # stays near 1, a scan of the queue falls with its size
        speed = small[key]["median"] / large[key]["median"]
        raw[key.replace("_ms", "_speed_ratio")] = speed
        rows.append(("scale, %s at 1k / %s" % (name, label_big),
                     "%.2f / %.2f ms (speed %.2fx)" % (small[key]["median"],
                                                       large[key]["median"], speed),
                     "speed at %s >= %gx at 1k" % (label_big, SCALE_OPERATOR_RATIO),
                     verdict(speed >= SCALE_OPERATOR_RATIO)))
    return {"rows": rows, "raw": raw}


def _first_200(server, path):
    """GET ``path`` on a just-started daemon or echo; the ms from its spawn
    to the ready line and to that first 200.  Returns (ms dict, Api)."""
    api = Api(server.port)
    status, _ = api.call("GET", path)
    first_200 = time.perf_counter()
    if status != 200:
        api.close()
        raise RuntimeError("GET %s -> %s" % (path, status))
    return {"log_line_ms": (server.ready_at - server.spawned_at) * 1e3,
            "first_200_ms": (first_200 - server.spawned_at) * 1e3}, api


def _idle_hwm(server, api, paths):
    """VmHWM / VmRSS (kB) after 20 GETs of ``paths[0]`` and one of each
    other path, and a second of rest."""
    for _ in range(20):
        api.call("GET", paths[0])
    for path in paths[1:]:
        api.call("GET", path)
    time.sleep(1.0)
    return server.vm(), server.vm("VmRSS")


# footprint: daemon start-up <= FOOTPRINT_STARTUP x the echo's; peak RSS idle
# <= FOOTPRINT_IDLE_RSS x the echo's idle RSS, with the big queue <= FOOTPRINT_BIG_RSS x
FOOTPRINT_STARTUP = 2.5
FOOTPRINT_IDLE_RSS = 1.6
FOOTPRINT_BIG_RSS = 3.5


def scenario_footprint(ctx):
    starts = size("footprint_starts")
    raw = {"starts": [], "echo_starts": [],
           "reference": "bare http.server JSON echo (run.py _echo): spawn to first 200, "
                        "idle VmHWM"}
    idle_hwm = echo_hwm = None
    for i in range(starts):
        # daemon and echo take turns, so both starts see the same machine
        daemon = ctx.daemon("footprint%d" % i)
        try:
            daemon.start()
            times, api = _first_200(daemon, "/status")
            raw["starts"].append(times)
            if i == starts - 1:
                idle_hwm, raw["idle_rss_kb"] = _idle_hwm(daemon, api, ("/status", "/metrics"))
            api.close()
        finally:
            daemon.close()
        with Echo() as echo:
            times, api = _first_200(echo, "/status")
            raw["echo_starts"].append(times)
            if i == starts - 1:
                echo_hwm, raw["echo_idle_rss_kb"] = _idle_hwm(echo, api, ("/status",))
            api.close()
    startup = statistics.median(s["first_200_ms"] for s in raw["starts"])
    echo_startup = statistics.median(s["first_200_ms"] for s in raw["echo_starts"])
    raw["startup_median_ms"] = startup
    raw["echo_startup_median_ms"] = echo_startup
    raw["idle_hwm_kb"] = idle_hwm
    raw["echo_idle_hwm_kb"] = echo_hwm
    big_hwm, big_note = None, None
    scale = ctx.results.get("scale")
    if scale and scale.get("raw", {}).get("rss_hwm_kb_big"):
        big_hwm = scale["raw"]["rss_hwm_kb_big"]
        raw["big_rss_now_kb"] = scale["raw"].get("rss_kb_big_now")
        big_note = "from scale (%s queued by 4 clients)" % fmt(scale["raw"]["sizes"][-1])
    else:
        count = size("scale_big")
        far = int(time.time()) + 10 * 365 * 86400
        with ctx.daemon("footprint-big", SUSPENDED) as daemon:
            api = daemon.api()
            add_account(api, "bulk", 9)
            post_batches(daemon.port, count // 1000, 4,
                         make=lambda i: batch_bytes(1000, deferred_ts=far),
                         timeout=max(600.0, count / 500.0))
            for _ in range(20):
                api.call("GET", "/status")
            api.call("GET", "/metrics")
            big_hwm = daemon.vm()
            raw["big_rss_now_kb"] = daemon.vm("VmRSS")
            api.close()
        big_note = "own load (%s queued by 4 clients)" % fmt(count)
    raw["big_hwm_kb"] = big_hwm
    raw["big_note"] = big_note
    mb = lambda kb: kb / 1024.0 if kb is not None else None
    ratio = lambda kb: kb / echo_hwm if kb and echo_hwm else None
    startup_ratio = startup / echo_startup
    idle_ratio, big_ratio = ratio(idle_hwm), ratio(big_hwm)
    raw.update({"startup_ratio": startup_ratio, "idle_rss_ratio": idle_ratio,
                "big_rss_ratio": big_ratio})
    rows = [("footprint, start-up to first 200",
             "%s ms; echo %s ms (medians of %d); %.2fx" % (
                 fmt(startup, digits=0), fmt(echo_startup, digits=0), starts, startup_ratio),
             "<= %gx echo" % FOOTPRINT_STARTUP, verdict(startup_ratio <= FOOTPRINT_STARTUP)),
            ("footprint, peak RSS idle / big queue",
             "%s / %s MB; echo %s MB; %s / %sx" % (
                 fmt(mb(idle_hwm), digits=1), fmt(mb(big_hwm), digits=1),
                 fmt(mb(echo_hwm), digits=1), fmt(idle_ratio, digits=2),
                 fmt(big_ratio, digits=2)),
             "<= %gx / %gx echo" % (FOOTPRINT_IDLE_RSS, FOOTPRINT_BIG_RSS),
             verdict(idle_ratio is not None and big_ratio is not None
                     and idle_ratio <= FOOTPRINT_IDLE_RSS and big_ratio <= FOOTPRINT_BIG_RSS))]
    return {"rows": rows, "raw": raw}


class _LocalServer:
    """An http.server on 127.0.0.1:0 that serves while the ``with`` block runs."""

    def _serve(self, handler):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Upstream(_LocalServer):
    """The delivery-report endpoint: answers 503 or 200 (with a JSON summary)."""

    def __init__(self):
        state = self
        self.lock = threading.Lock()
        self.mode = 503
        self.entries = 0
        self.posts = 0
        self.refused_posts = 0
        self.last_at = None

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with state.lock:
                    mode = state.mode
                if mode != 200:
                    with state.lock:
                        state.refused_posts += 1
                    self._answer(503, b'{"ok":false}')
                    return
                count = len(json.loads(body.decode("utf-8")).get("delivery_report") or [])
                with state.lock:
                    state.entries += count
                    state.posts += 1
                    state.last_at = time.perf_counter()
                self._answer(200, json.dumps({"ok": True, "sent": count, "error": 0,
                                              "deferred": 0}).encode())

            def _answer(self, code, body):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._serve(Handler)



def scenario_reports(ctx):
    n = size("reports_n")
    raw = {"messages": n, "client_batch_size": 1000}
    with Sink() as sink, _Upstream() as upstream:
        raw["sink"] = sink.kind
        settings = {"client": {"client_sync_url": "http://127.0.0.1:%d/sync" % upstream.port}}
        settings.update(SUSPENDED)
        with ctx.daemon("reports", settings) as daemon:
            api = daemon.api()
            add_account(api, "rep", sink.port, batch_size=1000)
            post_batches(daemon.port, n // 1000, 2, make=lambda i: batch_bytes(1000))
            # upstream answers 503; this delivery's rate is the reference
            dispatch, _, _ = measure_dispatch(api, n, 0, max(120.0, n / 20.0))
            raw["dispatch_msg_per_s"] = dispatch
            raw["refused_posts_while_delivering"] = upstream.refused_posts
            with upstream.lock:
                upstream.mode = 200
            start = time.perf_counter()
            api.ok("POST", "/commands/run-now")
            _, posted_s = wait_until(lambda: upstream.entries >= n, max(120.0, n / 50.0), 0.005)
            acked, _ = wait_until(
                lambda: api.metric("asyncmail_report_entries_total") >= n, 60.0, 0.02)
            acked_s = time.perf_counter() - start
            if upstream.entries < n or not acked:
                raise RuntimeError("only %d of %d entries reached the upstream" % (
                    upstream.entries, n))
            raw.update({"entries_received": upstream.entries, "posts": upstream.posts,
                        "posted_seconds": posted_s, "acked_seconds": acked_s,
                        "entries_per_s": n / acked_s,
                        "daemon_error_lines": daemon.problems})
            api.close()
    # The brief gives no target; "reports keep up with delivery" is judged
    # against the delivery this scenario ran (same daemon, sink and size),
    # so the row has its reference whether or not dispatch ran too.
    rate = raw["entries_per_s"]
    dispatch = raw["dispatch_msg_per_s"]
    ratio = rate / dispatch
    other = ctx.results.get("dispatch", {}).get("raw", {}).get("daemon_msg_per_s")
    if other:
        raw["dispatch_scenario_msg_per_s"] = other
    raw["ratio"] = ratio
    raw["target"] = ">= 1x its dispatch"
    rows = [("reports, entries posted + acked",
             "%s = %.1fx its dispatch %s" % (fmt(rate, "entries/s"), ratio,
                                             fmt(dispatch, "msg/s")),
             raw["target"], verdict(ratio >= 1.0))]
    return {"rows": rows, "raw": raw}


class _GenropySite(_LocalServer):
    """A Genropy site's sync endpoint (SPEC 9): applies each report, then,
    before answering, hands up to 1000 pending messages over by calling
    add-messages back on the daemon.

    Without ``tenant`` it is the site of the ``[client]`` section (the
    default tenant): it answers ``{...}::JS``.  With ``tenant`` it is
    today's client, registered as that tenant: it wants ``Authorization:
    Bearer <sync_token>`` on every report (else 401), calls add-messages
    with its tenant key (``api_key``, set once registered) and
    ``?tenant_id=``, names the tenant in every message, and answers pure
    JSON ``{"ok": true, "queued": n}``.  A report entry of another tenant,
    a refused report or add-messages answer is recorded in ``errors``
    (and ends the wait on ``done``): ``check()`` raises it.  Made with
    ``armed=False`` it hands nothing over (and answers ``queued`` 0) until
    ``armed`` is set, so the heartbeat its registration brings does not
    start the flow before the clock."""

    BATCH = 1000
    SYNC_PATH = "/proxy_sync"

    def __init__(self, n, tenant=None, account_id="pull", sync_token=None, armed=True):
        state = self
        self.lock = threading.Lock()
        self.pending = ["r%d" % i for i in range(n)]
        self.sent = set()
        self.syncs = 0
        self.daemon_port = None
        self.done = threading.Event()
        self.n = n
        self.tenant = tenant
        self.account_id = account_id
        self.sync_token = sync_token
        self.api_key = None
        self.errors = []
        self.armed = armed       # hands messages over only once armed
        self.done_at = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if state.tenant is None:
                    data = (json.dumps(state.sync(json.loads(body.decode("utf-8"))))
                            + "::JS").encode()
                    self._answer(200, "text/plain", data)
                    return
                if self.headers.get("Authorization") != "Bearer %s" % state.sync_token:
                    state.fail("a report without tenant %s's bearer token" % state.tenant)
                    self._answer(401, "application/json", b'{"ok": false}')
                    return
                try:
                    answer = state.sync(json.loads(body.decode("utf-8")))
                except Exception as exc:
                    state.fail(repr(exc))
                    self._answer(500, "application/json", b'{"ok": false}')
                    return
                self._answer(200, "application/json", json.dumps(answer).encode())

            def _answer(self, code, content_type, data):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._serve(Handler)

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.port

    def fail(self, problem):
        with self.lock:
            self.errors.append(problem)
        self.done.set()

    def check(self):
        if self.errors:
            raise RuntimeError("site %s: %s" % (self.tenant or "default", self.errors[0]))

    def sync(self, body):
        sent = 0
        with self.lock:
            self.syncs += 1
            for item in body.get("delivery_report") or []:
                if self.tenant is not None and item.get("tenant_id") != self.tenant:
                    raise RuntimeError("tenant %s got a report entry of tenant %r" % (
                        self.tenant, item.get("tenant_id")))
                store, record = item["id"].split(":", 1)
                if item.get("sent_ts"):
                    self.sent.add(record)
                    sent += 1
            if self.armed:
                batch, self.pending = self.pending[:self.BATCH], self.pending[self.BATCH:]
            else:
                batch = []
            if len(self.sent) >= self.n and not self.done.is_set():
                self.done_at = time.perf_counter()
                self.done.set()
        if batch:
            messages = [{"id": "store1:" + record, "account_id": self.account_id,
                         "subject": SUBJECT, "from": SENDER, "priority": None,
                         "to": [RCPT], "body": BODY, "content_type": "plain",
                         "headers": {"message_date": "2026-11-30"}} for record in batch]
            path = "/commands/add-messages"
            if self.tenant is not None:
                for message in messages:
                    message["tenant_id"] = self.tenant
                path += "?tenant_id=" + self.tenant
            api = Api(self.daemon_port, token=self.api_key)
            try:
                answer = api.ok("POST", path, {"messages": messages})
            finally:
                api.close()
            if answer["rejected"]:
                raise RuntimeError("the daemon rejected %r" % answer["rejected"][:3])
            if self.tenant is not None and answer["queued"] != len(batch):
                raise RuntimeError("the daemon queued %r of %d (duplicates %r)" % (
                    answer["queued"], len(batch), answer.get("duplicates", [])[:3]))
        if self.tenant is None:
            return {"sent": sent, "error": 0, "deferred": 0}
        return {"ok": True, "queued": len(batch)}



def scenario_pull(ctx):
    """Genropy's pull flow end to end: the site holds N messages and hands
    over 1000 per sync from inside the report POST; the clock runs from
    run-now until the site has heard "sent" for all N.  Compared with the raw
    smtplib loop to the same sink, measured in the same scenario."""
    n = size("pull_n")
    raw = {"messages": n, "site_batch": _GenropySite.BATCH}
    with Sink() as sink, _GenropySite(n) as site:
        raw["sink"] = sink.kind
        ceiling, _, _ = raw_ceiling(sink.port, n)
        raw["raw_msg_per_s"] = ceiling
        settings = {"client": {"client_sync_url": "http://127.0.0.1:%d/proxy_sync" % site.port,
                               "sync_interval_seconds": 3600}}
        with ctx.daemon("pull", settings) as daemon:
            site.daemon_port = daemon.port
            api = daemon.api()
            add_account(api, "pull", sink.port, batch_size=1000)
            start = time.perf_counter()
            api.ok("POST", "/commands/run-now")
            if not site.done.wait(max(120.0, n / 20.0)):
                raise RuntimeError("the site heard of %d of %d sends" % (len(site.sent), n))
            elapsed = time.perf_counter() - start
            raw.update({"seconds": elapsed, "msg_per_s": n / elapsed, "syncs": site.syncs,
                        "daemon_error_lines": daemon.problems})
            api.close()
    ratio = raw["msg_per_s"] / ceiling
    raw["ratio"] = ratio
    rows = [("pull flow, Genropy site, %s messages" % fmt(n),
             "%s = %.0f%% of raw %s" % (fmt(raw["msg_per_s"], "msg/s"), ratio * 100,
                                        fmt(ceiling, "msg/s")),
             ">= 33% of raw", verdict(ratio >= 1 / 3.0))]
    return {"rows": rows, "raw": raw}


# ---------------------------------------------------------------------------
# tenants: the pull flow of several sites at once, and intake with many registered
# ---------------------------------------------------------------------------
TENANTS_ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex   # [server] api_token
TENANTS_INTAKE_RATIO = 0.90     # intake with 100 tenants >= this x with 1
TENANTS_MANY = 100              # tenants registered on the second intake daemon
TENANTS_INTAKE_ID = "t000"      # the tenant both intake daemons are fed through
TENANTS_CHUNK = 2               # batches per turn (one daemon, then the other)
PULL_RATIO = 1 / 3.0            # the one-tenant pull row's target (of raw)


def register_tenant(api, tenant_id, base_url, sync_path, sync_token, account_port,
                    account_id="main", **account):
    """Register a tenant as the admin (bearer ``client_auth``), then its
    account with the key that came back, ``tenant_id`` in the body as
    Genropy sends it.  Returns the tenant's API key."""
    answer = api.ok("POST", "/tenant", {
        "id": tenant_id, "client_base_url": base_url, "client_sync_path": sync_path,
        "client_auth": {"method": "bearer", "token": sync_token}})
    if not answer.get("created") or not answer.get("api_key"):
        raise RuntimeError("POST /tenant %s -> %r" % (tenant_id, answer))
    tenant_api = Api(api.port, token=answer["api_key"])
    try:
        add_account(tenant_api, account_id, account_port, tenant_id=tenant_id, **account)
    finally:
        tenant_api.close()
    return answer["api_key"]


def problem_lines(daemon, limit=5):
    """The daemon's last ERROR/CRITICAL/Traceback log lines (for the JSON)."""
    found = [line for line in list(daemon.lines)
             if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
    return found[-limit:]


def tenants_pull(ctx):
    """Genropy's pull flow for several sites at once, each its own tenant
    (today's client: tenant key, ``?tenant_id=``, pure JSON answers) with
    its own account ``main``, all to the same sink.  Every site holds
    ``per`` messages and hands over 1000 per sync from inside its report
    POST; the clock runs from the admin's run-now (all tenants) until every
    site has heard "sent" for all of its messages.  The sites are armed
    only after each has answered the heartbeat its registration brings, so
    the flow starts with the clock.  Reference: the raw smtplib loop to the
    same sink, measured here."""
    sites_n = size("tenants_sites")
    per = size("tenants_per_site")
    total = sites_n * per
    raw = {"tenants": sites_n, "messages_per_tenant": per, "messages": total,
           "site_batch": _GenropySite.BATCH}
    sites = [_GenropySite(per, tenant="site%d" % i, account_id="main",
                          sync_token=uuid.uuid4().hex, armed=False) for i in range(sites_n)]
    settings = {"server": {"api_token": TENANTS_ADMIN_TOKEN},
                "client": {"sync_interval_seconds": 3600}}
    with Sink() as sink, contextlib.ExitStack() as stack:
        for site in sites:
            stack.enter_context(site)
        raw["sink"] = sink.kind
        ceiling, rounds, _ = raw_ceiling(sink.port, total)
        raw.update({"raw_msg_per_s": ceiling, "raw_rounds_msg_per_s": rounds})
        with ctx.daemon("tenants-pull", settings) as daemon:
            api = daemon.api()
            for site in sites:
                site.daemon_port = daemon.port
                site.api_key = register_tenant(api, site.tenant, site.base_url,
                                               site.SYNC_PATH, site.sync_token, sink.port,
                                               batch_size=1000)
            heard, _ = wait_until(lambda: all(site.syncs for site in sites), 30.0)
            for site in sites:
                site.check()
            if not heard:
                raise RuntimeError("no registration heartbeat reached %s" % ", ".join(
                    site.tenant for site in sites if not site.syncs))
            syncs_before = sum(site.syncs for site in sites)
            cpu0 = _proc_cpu(daemon.proc.pid)
            start = time.perf_counter()
            for site in sites:
                site.armed = True
            api.ok("POST", "/commands/run-now")
            deadline = start + max(120.0, total / 20.0)
            for site in sites:
                site.done.wait(max(0.0, deadline - time.perf_counter()))
            elapsed = time.perf_counter() - start
            cpu = _proc_cpu(daemon.proc.pid) - cpu0
            for site in sites:
                site.check()
                if len(site.sent) < per:
                    raise RuntimeError("site %s heard of %d of %d sends" % (
                        site.tenant, len(site.sent), per))
            status = api.ok("GET", "/status")
            raw.update({"seconds": elapsed, "msg_per_s": total / elapsed,
                        "syncs": sum(site.syncs for site in sites) - syncs_before,
                        "site_seconds": {site.tenant: site.done_at - start for site in sites},
                        "daemon_cpu_us_per_message": cpu / total * 1e6,
                        "queue": status["queue"], "queue_by_tenant": status.get("tenants"),
                        "daemon_error_lines": daemon.problems,
                        "daemon_problem_lines": problem_lines(daemon)})
            api.close()
    ratio = raw["msg_per_s"] / ceiling
    raw["ratio"] = ratio
    pull = ctx.results.get("pull", {}).get("raw", {})
    one = pull.get("ratio")
    if one:
        raw.update({"pull_ratio": one, "pull_msg_per_s": pull["msg_per_s"],
                    "msg_per_s_vs_pull": raw["msg_per_s"] / pull["msg_per_s"]})
        target, goal = ">= 1 tenant's %.0f%% of raw" % (one * 100), one
        versus = "; 1 tenant %.0f%% (%s)" % (one * 100, fmt(pull["msg_per_s"], "msg/s"))
    else:
        target, goal, versus = ">= 33% of raw", PULL_RATIO, ""
    raw["target"] = target
    row = ("pull flow, %d tenants \u00d7 %s messages" % (sites_n, fmt(per)),
           "%s = %.0f%% of raw %s%s" % (fmt(raw["msg_per_s"], "msg/s"), ratio * 100,
                                        fmt(ceiling, "msg/s"), versus),
           target, verdict(ratio >= goal))
    return row, raw


def tenants_intake(ctx):
    """Intake into one tenant (its key, ``?tenant_id=``, 1000-message
    batches with ``tenant_id`` in every message, one client) on a daemon
    with 1 tenant registered and on one with TENANTS_MANY registered, each
    with an account; the daemons are suspended, so nothing dispatches.  The
    two run side by side and take turns, TENANTS_CHUNK batches each (who
    goes first alternates), posting the same bodies (the ids are per
    daemon), so both grow the same id index and see the same machine.
    Each round gives a ratio of the two rates; the figure is the median
    of those ratios (the medians of the rates are printed beside it: a
    round's pair shares the machine's speed of the moment, and the rates
    fall from round to round as the index grows).  Every registered tenant's
    sync URL is a local upstream answering 200; its registration
    heartbeats are waited for before the clock, and sync_interval_seconds
    = 3600 keeps further ones out of the rounds."""
    n = size("tenants_intake_batches")
    rounds = size("tenants_intake_rounds")
    raw = {"batch_messages": 1000, "batches_per_round": n, "rounds": rounds,
           "threads": 1, "tenant": TENANTS_INTAKE_ID, "many": TENANTS_MANY}
    settings = {"server": {"api_token": TENANTS_ADMIN_TOKEN},
                "client": {"sync_interval_seconds": 3600}}
    settings.update(SUSPENDED)
    path = "/commands/add-messages?tenant_id=%s" % TENANTS_INTAKE_ID
    with _Upstream() as upstream, \
            ctx.daemon("tenants-intake1", settings) as one, \
            ctx.daemon("tenants-intake%d" % TENANTS_MANY, settings) as many:
        upstream.mode = 200
        base_url = "http://127.0.0.1:%d" % upstream.port
        sides = []
        for label, daemon, count in (("1", one, 1), (str(TENANTS_MANY), many, TENANTS_MANY)):
            api = daemon.api()
            keys = [register_tenant(api, "t%03d" % i, base_url, "/sync/t%03d" % i,
                                    uuid.uuid4().hex, 9) for i in range(count)]
            api.close()
            sides.append({"label": label, "daemon": daemon, "tenants": count, "key": keys[0],
                          "rates": []})
        registered = 1 + TENANTS_MANY
        heard, _ = wait_until(lambda: upstream.posts >= registered, 60.0)
        raw["registration_heartbeats"] = upstream.posts
        if not heard:
            raise RuntimeError("%d of %d registration heartbeats arrived" % (
                upstream.posts, registered))
        time.sleep(1.0)   # let the last report jobs finish
        for side in sides:   # what each costs at rest (the reporter's cycles)
            side["cpu0"] = _proc_cpu(side["daemon"].proc.pid)
        time.sleep(2.0)
        for side in sides:
            side["idle_cpu_cores"] = (_proc_cpu(side["daemon"].proc.pid) - side["cpu0"]) / 2.0
        warm = [batch_bytes(1000, "main", tenant_id=TENANTS_INTAKE_ID) for _ in range(2)]
        for side in sides:
            post_batches(side["daemon"].port, 2, 1, prebuilt=warm, token=side["key"],
                         path=path)
        turn = 0
        for _ in range(rounds):
            bodies = [batch_bytes(1000, "main", tenant_id=TENANTS_INTAKE_ID)
                      for _ in range(n)]   # encoded before the clock
            for side in sides:
                side["seconds"] = side["accepted"] = side["cpu"] = 0
            for first in range(0, n, TENANTS_CHUNK):
                chunk = bodies[first:first + TENANTS_CHUNK]
                for side in (sides if turn % 2 == 0 else sides[::-1]):
                    pid = side["daemon"].proc.pid
                    cpu0 = _proc_cpu(pid)
                    took, count = post_batches(side["daemon"].port, len(chunk), 1,
                                               prebuilt=chunk, token=side["key"], path=path)
                    side["cpu"] += _proc_cpu(pid) - cpu0
                    if count != 1000 * len(chunk):
                        raise RuntimeError("%s tenant(s): %d of %d messages queued" % (
                            side["label"], count, 1000 * len(chunk)))
                    side["seconds"] += took
                    side["accepted"] += count
                turn += 1
            for side in sides:
                side["rates"].append({"msg_per_s": side["accepted"] / side["seconds"],
                                      "seconds": side["seconds"],
                                      "daemon_cpu_ms_per_1000":
                                          side["cpu"] / side["accepted"] * 1e6})
        for side in sides:
            daemon = side["daemon"]
            api = daemon.api(token=side["key"])
            queue = api.ok("GET", "/status?tenant_id=%s" % TENANTS_INTAKE_ID)["queue"]
            api.close()
            raw["tenants_%s" % side["label"]] = {
                "tenants": side["tenants"], "rounds": side["rates"],
                "msg_per_s": statistics.median(r["msg_per_s"] for r in side["rates"]),
                "idle_cpu_cores": side["idle_cpu_cores"], "queue": queue,
                "peak_rss_kb": daemon.vm(), "daemon_error_lines": daemon.problems,
                "daemon_problem_lines": problem_lines(daemon)}
    alone, crowded = raw["tenants_1"], raw["tenants_%d" % TENANTS_MANY]
    ratios = [b["msg_per_s"] / a["msg_per_s"]
              for a, b in zip(alone["rounds"], crowded["rounds"])]
    ratio = statistics.median(ratios)
    raw.update({"round_ratios": ratios, "ratio": ratio,
                "ratio_of_median_rates": crowded["msg_per_s"] / alone["msg_per_s"]})
    row = ("intake with %d tenants registered" % TENANTS_MANY,
           "%s vs %s with 1 tenant, rounds' median %.3fx" % (
               fmt(crowded["msg_per_s"], "msg/s"), fmt(alone["msg_per_s"], "msg/s"), ratio),
           ">= %.2fx of 1 tenant" % TENANTS_INTAKE_RATIO, verdict(ratio >= TENANTS_INTAKE_RATIO))
    return row, raw


def scenario_tenants(ctx):
    """Tenants (issue 18): several Genropy sites pulling at once, each its
    own tenant, against the raw smtplib loop (and the one-tenant pull row
    when it ran); and intake on a daemon with 100 tenants registered
    against one with 1."""
    pull_row, pull_raw = tenants_pull(ctx)
    intake_row, intake_raw = tenants_intake(ctx)
    return {"rows": [pull_row, intake_row], "raw": {"pull": pull_raw, "intake": intake_raw}}


# ---------------------------------------------------------------------------
# bounces: the collector reading a throw-away Dovecot (fixture from the tests)
# ---------------------------------------------------------------------------
BOUNCES_TARGET = 0.40        # daemon's best round >= this x the raw IMAP loop's best round
BOUNCES_WARMUP = 100         # a first, untimed round of each (logins, the email package)
BOUNCES_FOLDER = "Bounces"   # what the daemon reads
REFERENCE_FOLDER = "Reference"
VERP_BASE = "bounces@example.com"
_TESTS = []


def test_fixtures():
    """The testsupport package beside asyncmail.py, for its Dovecot fixture
    and bounce_dsn (the tests use the same ones)."""
    if not _TESTS:
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        import testsupport
        _TESTS.append(testsupport)
    return _TESTS[0]


def raw_imap_loop(server, folder):
    """The IMAP work the collector does, without asyncmail: log in over
    implicit TLS, SELECT, UID SEARCH UNSEEN, one UID FETCH of the sizes,
    then per message UID FETCH BODY.PEEK[] and UID STORE +FLAGS.SILENT
    (\\Seen), log out.  Returns (messages read, seconds)."""
    import imaplib
    import ssl
    start = time.perf_counter()
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.imaps_port,
                             ssl_context=ssl.create_default_context(cafile=server.ca_file))
    try:
        imap.login(server.user, server.password)
        imap.select(folder)
        uids = imap.uid("SEARCH", None, "UNSEEN")[1][0].split()
        imap.uid("FETCH", b",".join(uids), "(RFC822.SIZE)")
        for uid in uids:
            typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            if typ != "OK" or not isinstance(data[0], tuple):
                raise RuntimeError("FETCH %s: %s %r" % (uid, typ, data[:1]))
            imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Seen)")
    finally:
        imap.logout()
    return len(uids), time.perf_counter() - start


def scenario_bounces(ctx):
    """N bounces in a Dovecot folder, matched by VERP to N messages the
    daemon delivered to the sink: bounces/s from run-now until
    asyncmail_bounces_total reaches N, against the raw IMAP loop over a copy
    of the same N messages, in turns (see bench/README.md)."""
    tests = test_fixtures()
    reason = tests.dovecot_unavailable()
    if reason:
        print("  SKIPPED: needs %s" % reason, flush=True)
        return {"rows": [("bounces", "skipped: needs %s" % reason, "-", "SKIP")],
                "raw": {"skipped": reason}}
    n, rounds = size("bounces_n"), size("bounces_rounds")
    module = asyncmail_module()
    raw = {"bounces_per_round": n, "rounds": rounds, "daemon_per_s": [], "raw_imap_per_s": []}
    server = tests.Dovecot()
    with _CLEANUP_LOCK:   # stopped at exit too, whatever happens
        _CHILDREN.append(server.process)
    try:
        for folder in (BOUNCES_FOLDER, REFERENCE_FOLDER):
            server.append(folder)   # created empty
        settings = dict(SUSPENDED, bounces=dict(
            server.bounces_config(BOUNCES_FOLDER), verp_address=VERP_BASE,
            poll_interval_seconds=3600))   # only run-now polls
        with Sink() as sink, ctx.daemon("bounces", settings) as daemon:
            raw["sink"] = sink.kind
            api = daemon.api()
            add_account(api, "bounce", sink.port, batch_size=1000)
            total = BOUNCES_WARMUP + n * rounds
            post_batches(daemon.port, -(-total // 1000), 2,
                         make=lambda i: batch_bytes(min(1000, total - 1000 * i)))
            measure_dispatch(api, total, 0, max(120.0, total / 20.0))
            db = sqlite3.connect("file:%s?mode=ro" % daemon.db, uri=True)
            try:   # the rows and the VERP key make each bounce match one message
                key = bytes.fromhex(db.execute(
                    "SELECT value FROM settings WHERE name = 'verp_key'").fetchone()[0])
                pks = [pk for pk, in db.execute(
                    "SELECT pk FROM messages WHERE status = 'sent' ORDER BY pk")]
            finally:
                db.close()
            bounces = [tests.bounce_dsn(
                [(RCPT, "failed", "5.1.1", "550 5.1.1 <%s>: user unknown" % RCPT)],
                verp=module.verp_sender(VERP_BASE, module.verp_token(key, pk)))
                for pk in pks]
            raw["bounce_bytes"] = len(bounces[0])
            start = time.perf_counter()   # what parsing alone costs (not judged)
            for message in bounces[:n]:
                module.parse_bounce(message, VERP_BASE)
            raw["parse_only_per_s"] = n / (time.perf_counter() - start)
            done_before, end = 0, BOUNCES_WARMUP
            while done_before < len(bounces):
                batch, timed = bounces[done_before:end], done_before > 0
                server.deliver(REFERENCE_FOLDER, batch)
                read, seconds = raw_imap_loop(server, REFERENCE_FOLDER)
                if read != len(batch):
                    raise RuntimeError("the raw loop read %d of %d" % (read, len(batch)))
                if timed:
                    raw["raw_imap_per_s"].append(read / seconds)
                server.deliver(BOUNCES_FOLDER, batch)
                start = time.perf_counter()
                api.ok("POST", "/commands/run-now")
                done, _ = wait_until(
                    lambda: api.metric("asyncmail_bounces_total") >= end, 120.0, 0.02)
                seconds = time.perf_counter() - start
                if not done:
                    raise RuntimeError("asyncmail_bounces_total stayed below %d" % end)
                if timed:
                    raw["daemon_per_s"].append(len(batch) / seconds)
                done_before, end = end, end + n
            for name in ("asyncmail_bounces_unmatched_total", "asyncmail_bounces_skipped_total"):
                raw[name] = api.metric(name)
                if raw[name]:
                    raise RuntimeError("%s = %d" % (name, raw[name]))
            raw["daemon_error_lines"] = daemon.problems
            api.close()
    finally:
        process = server.process
        server.close()
        forget(process)
    # Interference only ever slows a round, and the two took turns: each
    # side's fastest round is the nearest to its quiet-machine speed (the
    # medians' ratio spread twice as wide here).
    rate, reference = max(raw["daemon_per_s"]), max(raw["raw_imap_per_s"])
    ratio = rate / reference
    raw.update({"daemon_bounces_per_s": rate, "raw_imap_msg_per_s": reference, "ratio": ratio,
                "median_ratio": statistics.median(raw["daemon_per_s"])
                / statistics.median(raw["raw_imap_per_s"])})
    rows = [("bounces, %s from Dovecot, best of %d" % (fmt(n), rounds),
             "%s = %.0f%% of raw IMAP %s" % (fmt(rate, "bounces/s"), ratio * 100,
                                             fmt(reference, "msg/s")),
             ">= %.0f%% of raw IMAP" % (BOUNCES_TARGET * 100), verdict(ratio >= BOUNCES_TARGET))]
    return {"rows": rows, "raw": raw}


# ---------------------------------------------------------------------------
# page: the web page in headless Chromium at 1,000 and at 1,000,000 queued
# ---------------------------------------------------------------------------
PAGE_RATIO = 2.0    # a view at the big queue within 2x its time at 1,000
PAGE_VIEWS = (("first paint (overview)", "/"),
              ("filtered page (status + account)", "/#/messages?status=deferred&account_id=bulk"),
              ("search, no match in a window", "/#/messages?search=nobody-matches-this"))


def load_page(browser, url):
    """Load ``url`` fresh; the page's own milliseconds from navigation to
    its first render of data (``data-ready``, set after the API answered
    and the view was drawn)."""
    browser.get("about:blank")
    browser.get(url)
    deadline = time.perf_counter() + 60.0
    while time.perf_counter() < deadline:
        ready = browser.execute_script("return document.body && document.body.dataset.ready")
        if ready:
            return float(ready)
        time.sleep(0.01)
    raise RuntimeError("the page at %s did not render within 60 s" % url)


def scenario_page(ctx):
    tests = test_fixtures()
    missing = tests.browser_unavailable()
    if missing:
        return {"rows": [("page", "SKIPPED: %s" % missing, "-", "SKIP")],
                "raw": {"missing": missing}}
    big, rounds = size("page_big"), size("page_rounds")
    far = int(time.time()) + 10 * 365 * 86400
    raw = {"sizes": [1000, big], "rounds": rounds, "backlog": "deferred_ts +10 years, one account",
           "browser": "headless Chromium via WebDriver", "measure": "data-ready (ms from "
           "navigation start to the first render of data, as the page reports it)"}
    browser = tests.start_browser()
    try:
        with ctx.daemon("page", SUSPENDED) as daemon:
            api = daemon.api()
            add_account(api, "bulk", 9)
            base = "http://127.0.0.1:%d" % daemon.port
            loaded = 0
            for queued in (1000, big):
                batches = (queued - loaded) // 1000
                post_batches(daemon.port, batches, 4,
                             make=lambda i: batch_bytes(1000, deferred_ts=far),
                             timeout=max(600.0, batches * 2.0))
                loaded = queued
                step = {}
                for label, path in PAGE_VIEWS:
                    load_page(browser, base + path)      # warm: the first load is not counted
                    samples = [load_page(browser, base + path) for _ in range(rounds)]
                    step[label] = {"median_ms": statistics.median(samples), "samples": samples}
                raw[str(queued)] = step
                print("  %s queued: %s" % (fmt(queued), ", ".join(
                    "%s %.1f ms" % (label.split(" (")[0], step[label]["median_ms"])
                    for label, _ in PAGE_VIEWS)))
            api.close()
    finally:
        browser.quit()
    rows = []
    for label, _ in PAGE_VIEWS:
        small, large = raw["1000"][label]["median_ms"], raw[str(big)][label]["median_ms"]
        ratio = large / small
        raw.setdefault("ratios", {})[label] = ratio
        rows.append(("page, " + label, "%.1f ms at %s vs %.1f ms at 1k; %.2fx" % (
            large, fmt(big), small, ratio), "<= %gx the 1k time" % PAGE_RATIO,
            verdict(ratio <= PAGE_RATIO)))
    return {"rows": rows, "raw": raw}


RUNNERS = {"intake": scenario_intake, "single": scenario_single,
           "dispatch": scenario_dispatch, "latency": scenario_latency,
           "scale": scenario_scale, "footprint": scenario_footprint,
           "reports": scenario_reports, "pull": scenario_pull, "tenants": scenario_tenants,
           "bounces": scenario_bounces, "page": scenario_page}


# ---------------------------------------------------------------------------
# profiling wrapper: ``run.py _profiled OUT.prof -- asyncmail.py --config X``
# ---------------------------------------------------------------------------
def profiled_main(out, clock, argv):
    """Run the daemon with a cProfile per thread; merge them into OUT at exit.
    ``clock`` "cpu" times each thread's CPU (time.thread_time: waits for
    locks, the GIL, sockets and fsync cost nothing), "wall" elapsed time."""
    import cProfile
    import pstats
    import runpy
    finished = []
    lock = threading.Lock()
    original_run = threading.Thread.run
    timer = time.thread_time if clock == "cpu" else time.perf_counter

    def run(self):
        prof = cProfile.Profile(timer)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()
            with lock:
                finished.append(prof)

    threading.Thread.run = run
    sys.argv = list(argv)
    main_prof = cProfile.Profile(timer)
    code = 0
    main_prof.enable()
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        with lock:
            for prof in finished:
                stats.add(prof)
        stats.dump_stats(out)
        with open(out[:-5] + ".txt" if out.endswith(".prof") else out + ".txt", "w") as handle:
            handle.write("threads profiled: %d (+ main); clock: %s\n" % (len(finished), clock))
            for key in ("tottime", "cumulative"):
                summary = pstats.Stats(out, stream=handle)
                summary.sort_stats(key).print_stats(40)
            summary = pstats.Stats(out, stream=handle)
            summary.sort_stats("cumulative").print_stats("asyncmail.py", 40)
    return code


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def machine_info(quick):
    info = {"python": sys.version.split()[0], "python_full": sys.version,
            "sqlite": sqlite3.sqlite_version, "nproc": os.cpu_count(),
            "platform": platform.platform(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "smtp_sink": os.access(SMTP_SINK, os.X_OK)}
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["asyncmail_commit"] = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["asyncmail_commit"] = None
    try:
        info["asyncmail_uncommitted_changes"] = bool(subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "asyncmail.py"],
            capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["asyncmail_uncommitted_changes"] = None
    import hashlib
    with open(DAEMON, "rb") as handle:
        source = handle.read()
    info["asyncmail_sha256"] = hashlib.sha256(source).hexdigest()
    found = re.search(rb'^__version__ = "([^"]+)"', source, re.M)
    info["asyncmail_version"] = found.group(1).decode() if found else None
    return info


def markdown(rows):
    lines = ["| scenario | figure | target | verdict |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| %s |" % " | ".join(str(cell).replace("|", "\\|") for cell in row))
    return "\n".join(lines)


def write_json(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="asyncmail benchmark harness")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (about a minute); scale uses 100,000 not 1,000,000")
    parser.add_argument("--only", metavar="NAME,...",
                        help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--json", metavar="PATH", default=DEFAULT_JSON,
                        help="results file (default bench/results/latest.json)")
    parser.add_argument("--sequential-ids", action="store_true",
                        help="increasing message ids instead of random uuid4 ids")
    parser.add_argument("--wait-quiet", metavar="SECONDS", type=float, default=0.0,
                        help="first wait up to SECONDS for other processes to use < 0.15 "
                             "CPU cores (measured over 2 s windows)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run daemons under a per-thread cProfile; .prof/.txt in DIR")
    parser.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                        help="cProfile timer: wall time (default) or each thread's CPU time")
    args = parser.parse_args(argv)
    names = list(SCENARIOS)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in SCENARIOS]
        if unknown:
            parser.error("unknown scenario(s): %s (choose from %s)"
                         % (", ".join(unknown), ", ".join(SCENARIOS)))
        names = [name for name in SCENARIOS if name in wanted]
    args.names = names
    return args


def main(argv):
    global PICK, SEQUENTIAL_IDS, PROFILE_CLOCK
    if argv[:1] == ["_aiosmtpd"]:
        return aiosmtpd_main(float(argv[argv.index("--delay") + 1]) if "--delay" in argv
                             else 0.0)
    if argv[:1] == ["_echo"]:
        return echo_main()
    if argv[:1] == ["_profiled"]:
        return profiled_main(argv[1], argv[2], argv[argv.index("--") + 1:])
    args = parse_args(argv)
    PICK = 0 if args.quick else 1
    SEQUENTIAL_IDS = args.sequential_ids
    PROFILE_CLOCK = args.profile_clock
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if not os.path.exists(DAEMON):
        print("asyncmail.py not found at %s" % DAEMON, file=sys.stderr)
        return 2
    ctx = Context(args.quick, os.path.abspath(args.profile) if args.profile else None)
    info = machine_info(args.quick)
    info["message_ids"] = "sequential" if args.sequential_ids else "uuid4 hex (random)"
    print("asyncmail bench (%s) - Python %s, SQLite %s, %s CPUs, %s, load %s" % (
        "quick" if args.quick else "full", info["python"], info["sqlite"], info["nproc"],
        info["platform"], info.get("loadavg")))
    if args.profile:
        print("PROFILING: figures are slowed by cProfile; profiles in %s" % ctx.profile_dir)
    if args.wait_quiet > 0:
        deadline = time.perf_counter() + args.wait_quiet
        for _ in range(int(args.wait_quiet / 2) + 1):
            before = cpu_snapshot()
            time.sleep(2.0)
            other = foreign_cores(before, cpu_snapshot())
            if other is None or other < 0.15 or time.perf_counter() > deadline:
                break
            print("  waiting for a quiet machine: other processes use %.2f cores" % other,
                  flush=True)
        info["foreign_cpu_cores_at_start"] = other
    all_rows = []
    busy_scenarios = []
    failed = False
    started = time.perf_counter()
    output = {"machine": info, "scenarios": {}}
    try:
        for name in args.names:
            print("\n== %s" % name, flush=True)
            before = cpu_snapshot()
            try:
                result = RUNNERS[name](ctx)
            except Exception as exc:
                failed = True
                result = {"rows": [(name, "ERROR: %s" % str(exc)[:200], "-", "ERROR")],
                          "raw": {"error": repr(exc)}}
            after = cpu_snapshot()
            result["seconds"] = after[0] - before[0]
            result["foreign_cpu_cores"] = foreign_cores(before, after)
            ctx.results[name] = result
            output["scenarios"][name] = {"seconds": result["seconds"],
                                         "foreign_cpu_cores": result["foreign_cpu_cores"],
                                         "raw": result["raw"],
                                         "rows": [list(row) for row in result["rows"]]}
            for label, figure, target, mark in result["rows"]:
                print("  %-42s %-40s target %-24s %s" % (label, figure, target, mark))
            other = result["foreign_cpu_cores"]
            print("  (%.1f s; other processes used %s CPU cores on average%s)" % (
                result["seconds"], "n/a" if other is None else "%.2f" % other,
                " - figures skewed" if other is not None and other > 0.25 else ""),
                flush=True)
            if other is not None and other > 0.25:
                busy_scenarios.append(name)
            all_rows.extend(result["rows"])
    finally:
        total = time.perf_counter() - started
        output["total_seconds"] = total
        output["markdown"] = markdown(all_rows)
        output["busy_scenarios"] = busy_scenarios
        if all_rows:
            print("\n" + output["markdown"])
            if busy_scenarios:
                print("\nWARNING: other processes used > 0.25 CPU cores during: %s"
                      % ", ".join(busy_scenarios))
            print("\ntotal %.1f s (%s)" % (total, "quick" if args.quick else "full"))
            write_json(args.json, output)
            print("results: %s" % os.path.relpath(os.path.abspath(args.json)))
        _cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        _cleanup()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
