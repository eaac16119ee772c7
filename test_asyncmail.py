"""Tests of asyncmail: real sockets, an injected clock, no sleeps to synchronise.

Stdlib only, except the classes named ``*PeerTests``: they need a peer from
PyPI or Debian (aiosmtpd, moto, smtp-sink, promtool, systemd-analyze), skip
when it is missing, and fail instead when ASYNCMAIL_REQUIRE_PEERS=1.
"""

import base64
import contextlib
import email
import email.policy
import http.client
import io
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, HTTPServer

import asyncmail

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_PEERS = os.environ.get("ASYNCMAIL_REQUIRE_PEERS") == "1"
WAIT = 20.0   # upper bound of every wait; never a duration under test


def require_peer(test, available, what):
    """Skip (or, with ASYNCMAIL_REQUIRE_PEERS=1, fail) when a peer is missing."""
    if available:
        return
    if REQUIRE_PEERS:
        test.fail("required test peer missing: %s" % what)
    test.skipTest("test peer missing: %s (set ASYNCMAIL_REQUIRE_PEERS=1 to fail)" % what)


def wait_until(predicate, timeout=WAIT, message="condition"):
    """Poll ``predicate`` (bounded) until true; fail the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for %s" % message)


class FakeClock:
    """The injected clock: epoch seconds that move only when told to."""

    def __init__(self, start=1_800_000_000.0):
        self.value = start
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            return self.value

    def advance(self, seconds):
        with self._lock:
            self.value += seconds


# --------------------------------------------------------------------------
# A small SMTP server with scriptable replies and drops
# --------------------------------------------------------------------------

class SmtpServer:
    """A real SMTP server on 127.0.0.1:0 (socketserver, one thread per
    connection).  ``script(verb, reply)`` queues a reply for the next use of a
    verb ("DATA" is the reply after the message body, "CONNECT" the
    greeting); the reply "DROP" closes the connection instead.
    ``rcpt_replies[address]`` answers RCPT for one address every time."""

    def __init__(self, ehlo_extensions=("8BITMIME", "PIPELINING")):
        self.messages = []
        self.connections = 0
        self.commands = []
        self.ehlo_extensions = list(ehlo_extensions)
        self.rcpt_replies = {}
        self._scripts = {}
        self._lock = threading.Lock()
        self._sockets = set()
        self.received = threading.Condition(self._lock)
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self):
                outer._serve(self)

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.drop_all()

    def script(self, verb, *replies):
        with self._lock:
            self._scripts.setdefault(verb, []).extend(replies)

    def _scripted(self, verb):
        with self._lock:
            queue = self._scripts.get(verb)
            return queue.pop(0) if queue else None

    def drop_all(self):
        """Close every open client connection from the server side."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def wait_messages(self, count, timeout=WAIT):
        with self.received:
            if not self.received.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError("SMTP server got %d of %d messages"
                                     % (len(self.messages), count))

    def _serve(self, handler):
        sock = handler.connection
        with self._lock:
            self.connections += 1
            connection = self.connections
            self._sockets.add(sock)
        write = handler.wfile.write
        try:
            greeting = self._scripted("CONNECT")
            if greeting == "DROP":
                return
            write((greeting or "220 test ESMTP ready").encode() + b"\r\n")
            mail_from, rcpts = None, []
            while True:
                line = handler.rfile.readline(4096)
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = text[:4].upper()
                with self._lock:
                    self.commands.append((connection, text))
                reply = self._scripted(verb)
                if reply == "DROP":
                    return
                if verb == "EHLO":
                    lines = ["test"] + self.ehlo_extensions
                    out = "".join("250-%s\r\n" % l for l in lines[:-1]) + "250 %s\r\n" % lines[-1]
                    write((reply + "\r\n" if reply else out).encode())
                elif verb == "MAIL":
                    mail_from, rcpts = text[10:].strip().strip("<>"), []
                    write((reply or "250 sender ok").encode() + b"\r\n")
                elif verb == "RCPT":
                    address = text[8:].strip().strip("<>")
                    reply = reply or self.rcpt_replies.get(address)
                    if reply is None or reply.startswith("2"):
                        rcpts.append(address)
                    write((reply or "250 recipient ok").encode() + b"\r\n")
                elif verb == "DATA":
                    if reply:
                        write(reply.encode() + b"\r\n")
                        continue
                    write(b"354 go ahead\r\n")
                    chunks = []
                    while True:
                        data_line = handler.rfile.readline(100000)
                        if not data_line:
                            return
                        if data_line == b".\r\n":
                            break
                        if data_line.startswith(b".."):
                            data_line = data_line[1:]
                        chunks.append(data_line)
                    after = self._scripted("DATA")
                    if after == "DROP":
                        return
                    if after is None or after.startswith("2"):
                        with self.received:
                            self.messages.append({"from": mail_from, "rcpts": list(rcpts),
                                                  "data": b"".join(chunks),
                                                  "connection": connection})
                            self.received.notify_all()
                    write((after or "250 queued").encode() + b"\r\n")
                elif verb == "QUIT":
                    write(b"221 bye\r\n")
                    return
                elif verb in ("RSET", "NOOP", "HELO"):
                    write((reply or "250 ok").encode() + b"\r\n")
                else:
                    write((reply or "502 unknown command").encode() + b"\r\n")
        except OSError:
            return
        finally:
            with self._lock:
                self._sockets.discard(sock)


# --------------------------------------------------------------------------
# An upstream application that records delivery-report POSTs
# --------------------------------------------------------------------------

class Upstream:
    """An HTTP server on 127.0.0.1:0 recording every POST (path, headers,
    JSON body).  ``answers`` is a list of (status, body) to give in turn;
    when empty it answers 200 with a summary.  ``hang`` makes it stall."""

    def __init__(self):
        self.posts = []
        self.answers = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length).decode("utf-8"))
                with outer._lock:
                    outer.posts.append({"path": self.path, "headers": dict(self.headers),
                                        "body": body})
                    outer._lock.notify_all()
                    answer = outer.answers.pop(0) if outer.answers else None
                if outer.hang.is_set():
                    outer.release.wait(WAIT)
                    return
                if answer is None:
                    entries = body.get("delivery_report", [])
                    answer = (200, json.dumps({
                        "sent": sum(1 for e in entries if e.get("sent_ts")),
                        "error": sum(1 for e in entries if e.get("error_ts")),
                        "deferred": 0}))
                status, text = answer
                data = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(socketserver.ThreadingMixIn, HTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/sync" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def entries(self):
        with self._lock:
            return [e for post in self.posts for e in post["body"]["delivery_report"]]


# --------------------------------------------------------------------------
# Helpers to build cores and talk HTTP to them
# --------------------------------------------------------------------------

class Client:
    """A keep-alive HTTP/1.1 client of the daemon."""

    def __init__(self, address, token=None):
        self.conn = http.client.HTTPConnection(address[0], address[1], timeout=WAIT)
        self.token = token

    def close(self):
        self.conn.close()

    def request(self, method, path, body=None, headers=None, raw=False):
        headers = dict(headers or {})
        if self.token and "X-API-Token" not in headers and "Authorization" not in headers:
            headers["X-API-Token"] = self.token
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if raw:
            return response.status, data, response
        return response.status, json.loads(data.decode("utf-8")) if data else None


def raw_exchange(address, data, shutdown=False):
    """Send raw bytes, return the whole raw response (headers + body) as text."""
    sock = socket.create_connection(address, timeout=WAIT)
    try:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return received.decode("latin-1")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return (head + b"\r\n\r\n" + body).decode("utf-8", "replace")
    finally:
        sock.close()


def message(mid, **fields):
    base = {"id": mid, "from": "sender@example.com", "to": ["rcpt@example.org"],
            "subject": "subject " + mid, "body": "body of " + mid}
    base.update(fields)
    return base


class CoreCase(unittest.TestCase):
    """Creates cores on a temporary database, torn down by addCleanup."""

    def make_core(self, config=None, start=True, http=True, clock=None, db=None, **kwargs):
        if db is None:
            directory = tempfile.mkdtemp(prefix="asyncmail-test-")
            self.addCleanup(shutil.rmtree, directory, True)
            db = os.path.join(directory, "queue.db")
        settings = {"storage": {"db_path": db}, "server": {"port": "0"}}
        for section, values in (config or {}).items():
            settings.setdefault(section, {}).update(values)
        self.clock = clock or getattr(self, "clock", None) or FakeClock()
        log = logging.getLogger("asyncmail.test.%s" % id(self))
        log.addHandler(logging.NullHandler())
        log.propagate = False
        core = asyncmail.AsyncMailCore(settings, test_mode=kwargs.pop("test_mode", True),
                                       now=self.clock, logger=log, **kwargs)
        self.db_path = db
        if start:
            core.start(serve_http=http)
            self.addCleanup(core.stop)
        return core

    def client(self, core, token=None):
        client = Client(core.http_address, token)
        self.addCleanup(client.close)
        return client

    def smtp_server(self, **kwargs):
        server = SmtpServer(**kwargs)
        self.addCleanup(server.close)
        return server

    def add_account(self, core, server=None, **fields):
        account = {"id": "acct", "host": "127.0.0.1", "port": server.port if server else 25}
        account.update(fields)
        answer = core.handle_command("add account", account)
        self.assertTrue(answer["ok"], answer)
        return account

    def add(self, core, *messages, **batch):
        batch["messages"] = list(messages)
        answer = core.handle_command("add messages", batch)
        self.assertTrue(answer["ok"], answer)
        return answer

    def record(self, core, mid):
        return core.handle_command("get message", {"id": mid})["message"]

    def run_now(self, core):
        self.assertEqual(core.handle_command("run now"), {"ok": True})


# ==========================================================================
# Configuration
# ==========================================================================

class ConfigTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="asyncmail-config-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, text, name="config.ini"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_defaults(self):
        config = asyncmail.Config()
        self.assertEqual(config.server.host, "127.0.0.1")
        self.assertEqual(config.server.port, 8000)
        self.assertEqual(config.delivery.retry_delays, (60, 300, 900, 3600, 7200))
        self.assertEqual(config.delivery.max_retries, 5)
        self.assertEqual(config.client.batch_size, 1000)
        self.assertIs(config.scheduler.active, True)
        self.assertIsNone(config.scheduler.window)
        self.assertEqual(config.storage.db_path, "asyncmail.db")

    def test_file_then_environment_wins(self):
        path = self.write("[server]\nport = 9001\napi_token = filetoken\n"
                          "[delivery]\nsend_interval_seconds = 0.2\n")
        config = asyncmail.load_config(path, environ={"ASYNC_MAIL_SERVER_PORT": "9002"})
        self.assertEqual(config.server.port, 9002)
        self.assertEqual(config.server.api_token, "filetoken")
        self.assertEqual(config.delivery.send_interval_seconds, 0.2)

    def test_config_from_environment_variable_and_cwd(self):
        path = self.write("[server]\nport = 9003\n", "other.ini")
        self.assertEqual(asyncmail.load_config(None, {"ASYNC_MAIL_CONFIG": path}).server.port,
                         9003)
        self.write("[server]\nport = 9004\n")
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        self.assertEqual(asyncmail.load_config(None, {}).server.port, 9004)
        os.remove("config.ini")
        self.assertEqual(asyncmail.load_config(None, {}).server.port, 8000)

    def test_named_missing_file_is_an_error(self):
        with self.assertRaises(asyncmail.ConfigError):
            asyncmail.load_config(os.path.join(self.dir, "nope.ini"), {})
        with self.assertRaises(asyncmail.ConfigError):
            asyncmail.load_config(None, {"ASYNC_MAIL_CONFIG": os.path.join(self.dir, "x.ini")})

    def test_unknown_and_bad_values_name_the_key(self):
        cases = [
            ("[server]\nprot = 1\n", {}, "server.prot"),
            ("[nonsense]\na = 1\n", {}, "nonsense"),
            ("[server]\nport = http\n", {}, "server.port"),
            ("[server]\nport = 70000\n", {}, "server.port"),
            ("[delivery]\nretry_delays = 1,x\n", {}, "delivery.retry_delays"),
            ("[scheduler]\nactive = maybe\n", {}, "scheduler.active"),
            ("[scheduler]\nwindow = someday 8-9\n", {}, "scheduler.window"),
            ("[scheduler]\ntimezone = Mars/Olympus\n", {}, "scheduler.timezone"),
            ("[client]\nclient_sync_url = ftp://x\n", {}, "client.client_sync_url"),
            ("", {"ASYNC_MAIL_SERVER_NOPE": "1"}, "ASYNC_MAIL_SERVER_NOPE"),
            ("", {"ASYNC_MAIL_DELIVERY_MAX_WORKERS": "0"}, "delivery.max_workers"),
        ]
        for text, environ, key in cases:
            with self.subTest(key=key):
                path = self.write(text)
                with self.assertRaises(asyncmail.ConfigError) as caught:
                    asyncmail.load_config(path, environ)
                self.assertIn(key, str(caught.exception))

    def test_booleans_and_fractional_durations(self):
        for word, value in (("yes", True), ("off", False), ("1", True), ("FALSE", False)):
            config = asyncmail.Config({"scheduler": {"active": word},
                                       "client": {"timeout_seconds": "0.25"}})
            self.assertIs(config.scheduler.active, value)
            self.assertEqual(config.client.timeout_seconds, 0.25)

    def test_non_loopback_host_needs_token(self):
        with self.assertRaises(asyncmail.ConfigError) as caught:
            asyncmail.Config({"server": {"host": "0.0.0.0"}})
        self.assertIn("server.api_token", str(caught.exception))
        asyncmail.Config({"server": {"host": "0.0.0.0", "api_token": "t"}})
        asyncmail.Config({"server": {"host": "::1"}})
        asyncmail.Config({"server": {"host": "localhost"}})

    def test_state_directory_holds_default_database(self):
        config = asyncmail.load_config(None, {"STATE_DIRECTORY": "/var/lib/asyncmail",
                                              "ASYNC_MAIL_CONFIG": self.write("")})
        self.assertEqual(config.storage.db_path, "/var/lib/asyncmail/asyncmail.db")

    def test_s3_credentials_fall_back_to_aws_environment(self):
        config = asyncmail.load_config(self.write(""), {"AWS_ACCESS_KEY_ID": "AKIDX",
                                                        "AWS_SECRET_ACCESS_KEY": "sekrit"})
        self.assertEqual(config.s3.access_key_id, "AKIDX")
        self.assertEqual(config.s3.secret_access_key, "sekrit")
        config = asyncmail.load_config(self.write("[s3]\naccess_key_id = FROMFILE\n"),
                                       {"AWS_ACCESS_KEY_ID": "AKIDX"})
        self.assertEqual(config.s3.access_key_id, "FROMFILE")

    def test_window_parsing_and_wrapping(self):
        import datetime
        window = asyncmail.SendingWindow.parse("fri 22:00-06:00")
        utc = datetime.timezone.utc
        friday_late = datetime.datetime(2026, 11, 20, 23, 0, tzinfo=utc)
        saturday_early = datetime.datetime(2026, 11, 21, 3, 0, tzinfo=utc)
        saturday_noon = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=utc)
        self.assertTrue(window.contains(friday_late))
        self.assertTrue(window.contains(saturday_early))
        self.assertFalse(window.contains(saturday_noon))
        week = asyncmail.SendingWindow.parse("mon-fri 08:00-18:00")
        self.assertTrue(week.contains(datetime.datetime(2026, 11, 20, 9, 0, tzinfo=utc)))
        self.assertFalse(week.contains(saturday_noon))
        self.assertEqual(asyncmail.SendingWindow.parse("sat,sun 10:00-11:00").days, {5, 6})

    def test_sample_config_loads_to_defaults(self):
        sample = asyncmail.load_config(os.path.join(HERE, "config.ini.sample"), {})
        self.assertEqual(sample.describe(), asyncmail.Config().describe())

    def test_sample_config_names_every_key(self):
        with open(os.path.join(HERE, "config.ini.sample")) as handle:
            text = handle.read()
        for section, key in asyncmail.CONFIG_SCHEMA:
            self.assertIn("[%s]" % section, text)
            self.assertRegex(text, r"(?m)^;?\s*%s\s*=" % key)


class CommandLineTests(unittest.TestCase):
    """The CLI as an admin runs it: a real process."""

    def run_cli(self, *args, env=None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ASYNC_MAIL_")}
        environ.update(env or {})
        return subprocess.run([sys.executable, os.path.join(HERE, "asyncmail.py")] + list(args),
                              capture_output=True, text=True, env=environ, timeout=WAIT,
                              cwd=tempfile.gettempdir())

    def test_version(self):
        result = self.run_cli("--version")
        self.assertEqual(result.returncode, 0)
        self.assertIn(asyncmail.__version__, result.stdout)

    def test_bad_config_exits_78_naming_the_key(self):
        result = self.run_cli("--check-config", env={"ASYNC_MAIL_SERVER_PORT": "x"})
        self.assertEqual(result.returncode, 78)
        self.assertIn("server.port", result.stderr)
        result = self.run_cli(env={"ASYNC_MAIL_SERVER_HOST": "0.0.0.0"})
        self.assertEqual(result.returncode, 78)
        self.assertIn("server.api_token", result.stderr)

    def test_check_config_masks_secrets(self):
        result = self.run_cli("--check-config", env={
            "ASYNC_MAIL_SERVER_API_TOKEN": "tok-very-secret",
            "ASYNC_MAIL_CLIENT_CLIENT_SYNC_PASSWORD": "pw-very-secret"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("server.api_token = ********", result.stdout)
        self.assertNotIn("very-secret", result.stdout + result.stderr)
        self.assertIn("delivery.max_retries = 5", result.stdout)

    def test_help_is_readable(self):
        result = self.run_cli("--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("--check-config", result.stdout)


# ==========================================================================
# Store
# ==========================================================================

class StoreTests(CoreCase):

    def test_database_and_wal_are_private(self):
        core = self.make_core(http=False)
        self.add_account(core)
        self.add(core, message("m1"))
        for suffix in ("", "-wal", "-shm"):
            path = self.db_path + suffix
            if os.path.exists(path):
                self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)

    def test_reopen_keeps_every_accepted_message(self):
        core = self.make_core(start=False)
        self.add_account(core)
        self.add(core, *[message("m%d" % i) for i in range(50)])
        core.stop()
        again = self.make_core(db=self.db_path, start=False)
        self.addCleanup(again.stop)
        self.assertEqual(again.handle_command("status")["queue"]["pending"], 50)
        ids = [r["id"] for r in again.handle_command("list messages", {})["messages"]]
        self.assertEqual(ids, ["m%d" % i for i in range(50)])

    def test_schema_version_is_recorded(self):
        core = self.make_core(start=False)
        core.stop()
        import sqlite3
        conn = sqlite3.connect(self.db_path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0],
                         asyncmail.SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_dispatch_query_uses_an_index(self):
        core = self.make_core(start=False)
        self.addCleanup(core.stop)
        import sqlite3
        conn = sqlite3.connect(self.db_path)
        self.addCleanup(conn.close)
        for sql, args in ((asyncmail.SQL_CLAIM_SELECT, ("a", 3, 10)),
                          (asyncmail.SQL_PROMOTE_DUE, (1.0,)),
                          (asyncmail.SQL_HAS_PENDING, ("a", 3)),
                          (asyncmail.SQL_OLDEST_ACTIVE, ("pending",))):
            plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            self.assertIn("USING", plan, sql)
            self.assertNotIn("SCAN messages", plan.replace("USING", "").split("USING")[0]
                             if "SCAN messages USING" not in plan else "", sql)


# ==========================================================================
# The HTTP API
# ==========================================================================

class ApiTests(CoreCase):

    def setUp(self):
        self.core = self.make_core()
        self.http = self.client(self.core)
        self.add_account(self.core)

    def post(self, path, body=None):
        return self.http.request("POST", path, body if body is not None else {})

    def test_status(self):
        status, body = self.http.request("GET", "/status")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"ok": True, "active": True, "version": asyncmail.__version__,
                                "queue": {"pending": 0, "deferred": 0, "sending": 0,
                                          "sent": 0, "error": 0}})

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        for _ in range(20):
            status, _ = self.http.request("GET", "/status")
            self.assertEqual(status, 200)
        sock = self.http.conn.sock
        self.assertIsNotNone(sock)

    def test_unknown_path_and_wrong_method(self):
        self.assertEqual(self.http.request("GET", "/nope")[0], 404)
        status, body = self.http.request("GET", "/commands/run-now")
        self.assertEqual(status, 405)
        self.assertFalse(body["ok"])
        status, body = self.post("/commands/frobnicate")
        self.assertEqual((status, body), (404, {"ok": False, "error": "unknown command"}))
        status, _, response = self.http.request("PUT", "/status", raw=True)
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("Allow"), "GET")

    def test_unknown_http_method_is_405_not_501(self):
        status, body = self.http.request("BREW", "/status")
        self.assertEqual(status, 405)
        self.assertFalse(body["ok"])

    def test_body_not_json_or_not_object(self):
        for body in (b"{bad", b"[1, 2]", b"\xff\xfe", b"NaN", b'{"messages": Infinity}',
                     b"[" * 100000, b'{"messages": [' + b"9" * 5000 + b"]}"):
            with self.subTest(body=body[:20]):
                status, answer = self.post("/commands/add-messages", body)
                self.assertEqual(status, 400)
                self.assertFalse(answer["ok"])
                self.assertTrue(answer["error"])

    def test_body_too_large_is_413(self):
        core = self.make_core({"server": {"max_request_bytes": "2048"}})
        client = self.client(core)
        status, body = client.request("POST", "/commands/add-messages", b"x" * 5000)
        self.assertEqual(status, 413)
        self.assertFalse(body["ok"])

    def test_bad_content_length(self):
        for value in ("abc", "-5", "1" * 30):
            with self.subTest(value=value):
                reply = raw_exchange(self.core.http_address, (
                    "POST /commands/run-now HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: %s\r\n\r\n" % value).encode())
                self.assertTrue(reply.startswith("HTTP/1.1 400"), reply)
                self.assertIn('"ok":false', reply)

    def test_short_body_gets_an_answer_not_a_hang(self):
        reply = raw_exchange(self.core.http_address,
                             b"POST /commands/add-messages HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 100\r\n\r\n{\"messages\": [", shutdown=True)
        self.assertTrue(reply.startswith("HTTP/1.1 400"), reply)

    def test_chunked_body_is_accepted(self):
        body = json.dumps({"messages": [message("chunked")]}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10])
                          for i in range(0, len(body), 10))
        reply = raw_exchange(self.core.http_address,
                             b"POST /commands/add-messages HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 200"), reply)
        self.assertEqual(self.record(self.core, "chunked")["status"], "pending")

    def test_garbage_request_line_gets_json_4xx(self):
        reply = raw_exchange(self.core.http_address, b"\x16\x03\x01garbage\r\n\r\n")
        self.assertRegex(reply, r"^HTTP/1\.[01] 4\d\d")
        self.assertIn('"ok":false', reply)

    def test_add_messages_partial_acceptance(self):
        status, body = self.post("/commands/add-messages", {"messages": [
            message("ok1"), message("bad1", to=[]), message("ok2", priority="high"),
            message("bad2", subject="x\r\nBcc: victim@example.com")]})
        self.assertEqual(status, 200)
        self.assertEqual(body["queued"], 2)
        self.assertEqual([r["id"] for r in body["rejected"]], ["bad1", "bad2"])
        self.assertIn("CR or LF", body["rejected"][1]["reason"])
        self.assertEqual(self.record(self.core, "ok2")["priority"], 1)

    def test_all_rejected_is_400_with_detail(self):
        status, body = self.post("/commands/add-messages", {"messages": [message("b", to="")]})
        self.assertEqual(status, 400)
        self.assertFalse(body["ok"])
        self.assertEqual(body["detail"]["rejected"][0]["id"], "b")
        self.assertIn("error", body["detail"])

    def test_batch_shape_errors(self):
        for payload in ({}, {"messages": "x"}, {"messages": [message("a")] * 1001},
                        {"messages": [message("a")], "default_priority": 9}):
            with self.subTest(payload=str(payload)[:40]):
                status, body = self.post("/commands/add-messages", payload)
                self.assertEqual(status, 400)
                self.assertIn("rejected", body["detail"])

    def test_duplicate_ids_in_batch_and_queue(self):
        status, body = self.post("/commands/add-messages",
                                 {"messages": [message("d1"), message("d1")]})
        self.assertEqual((status, body["queued"]), (200, 1))
        self.assertEqual(body["rejected"], [{"id": "d1", "reason": "duplicate id"}])
        status, body = self.post("/commands/add-messages",
                                 {"messages": [message("d1"), message("d2")]})
        self.assertEqual((status, body["queued"]), (200, 1))
        self.assertEqual(body["rejected"], [{"id": "d1", "reason": "duplicate id"}])
        status, body = self.post("/commands/add-messages", {"messages": [message("d1")]})
        self.assertEqual(status, 400)
        self.assertEqual(body["detail"]["rejected"], [{"id": "d1", "reason": "duplicate id"}])

    def test_priorities_default_and_batch_default(self):
        self.post("/commands/add-messages", {"messages": [
            message("p-none"), message("p-low", priority="low"), message("p-0", priority=0)]})
        self.post("/commands/add-messages", {"default_priority": "immediate",
                                             "messages": [message("p-batch")]})
        got = {mid: self.record(self.core, mid)["priority"]
               for mid in ("p-none", "p-low", "p-0", "p-batch")}
        self.assertEqual(got, {"p-none": 2, "p-low": 3, "p-0": 0, "p-batch": 0})

    def test_deferred_ts_makes_a_message_deferred(self):
        later = self.clock() + 3600
        self.post("/commands/add-messages", {"messages": [
            message("later", deferred_ts=later), message("past", deferred_ts=1000)]})
        self.assertEqual(self.record(self.core, "later")["status"], "deferred")
        self.assertEqual(self.record(self.core, "later")["deferred_ts"], later)
        self.assertEqual(self.record(self.core, "past")["status"], "pending")

    def test_field_validation(self):
        bad = {
            "no id": {"id": None},
            "long id": {"id": "x" * 257},
            "control in id": {"id": "a\nb"},
            "missing from": {"from": None},
            "bad from": {"from": "not an address"},
            "from injection": {"from": "a@b.com\r\nBcc: x@y.com"},
            "garbage after address": {"to": "a@b.com garbage"},
            "non-string recipient": {"to": [42]},
            "bad cc": {"cc": ["ok@x.com", "broken@"]},
            "bcc injection": {"bcc": "x@y.com\nSubject: hi"},
            "missing subject": {"subject": None},
            "subject not string": {"subject": 5},
            "missing body": {"body": None},
            "content_type": {"content_type": "rtf"},
            "headers not object": {"headers": ["x"]},
            "header injection": {"headers": {"X-Tag": "a\r\nBcc: evil@x.com"}},
            "bad header name": {"headers": {"Bad Name": "v"}},
            "reserved header": {"headers": {"Bcc": "evil@x.com"}},
            "priority": {"priority": 7},
            "priority name": {"priority": "urgent"},
            "priority bool": {"priority": True},
            "deferred_ts string": {"deferred_ts": "tomorrow"},
            "deferred_ts negative": {"deferred_ts": -1},
            "deferred_ts huge": {"deferred_ts": 10 ** 30},
            "unknown account": {"account_id": "ghost"},
            "message_id": {"message_id": "no at sign"},
            "reply_to": {"reply_to": "x"},
            "return_path": {"return_path": "nope"},
            "attachments not list": {"attachments": {}},
            "attachment two sources": {"attachments": [
                {"filename": "a.txt", "content": "aGk=", "url": "http://x/a"}]},
            "attachment no source": {"attachments": [{"filename": "a.txt"}]},
            "attachment bad base64": {"attachments": [{"filename": "a.txt", "content": "@@@"}]},
            "attachment ftp": {"attachments": [{"filename": "a", "url": "ftp://x/a"}]},
            "attachment filename CRLF": {"attachments": [
                {"filename": "a\r\n.txt", "content": "aGk="}]},
            "attachment path": {"attachments": [{"filename": "../../etc/passwd",
                                                 "content": "aGk="}]},
            "attachment s3 no key": {"attachments": [{"filename": "a", "s3": {"bucket": "b"}}]},
            "attachment mime": {"attachments": [{"filename": "a", "content": "aGk=",
                                                 "mime_type": "text"}]},
        }
        for name, fields in bad.items():
            with self.subTest(name=name):
                msg = message("v-" + name.replace(" ", "-"))
                msg.update(fields)
                if msg["id"] is None:
                    del msg["id"]
                if msg.get("from", 1) is None:
                    del msg["from"]
                for key in ("subject", "body"):
                    if key in msg and msg[key] is None:
                        del msg[key]
                status, body = self.post("/commands/add-messages", {"messages": [msg]})
                self.assertEqual(status, 400, body)
                self.assertTrue(body["detail"]["rejected"][0]["reason"])

    def test_valid_field_forms_are_accepted(self):
        good = [
            message("g1", to="a@x.com, \"Doe, John\" <j@x.com>", cc="c@x.com",
                    bcc=["b@x.com"], reply_to="r@x.com", return_path="bounce@x.com"),
            message("g2", **{"from": "Jörg Müller <jorg@bücher.de>"}, subject="Grüße ✓"),
            message("g3", content_type="html", body="<b>hi</b>", body_text="hi",
                    headers={"X-Campaign": "42"}, message_id="<abc@x.com>"),
            message("g4", attachments=[
                {"filename": "a.txt", "content": "aGVsbG8=\n", "mime_type": "text/plain"},
                {"filename": "b.pdf", "url": "https://example.com/b.pdf"},
                {"filename": "c.bin", "s3": {"bucket": "my-bucket", "key": "dir/c d.bin",
                                             "region": "eu-west-1"}}]),
            message("g5", priority="immediate", deferred_ts=1234567890.5),
            message("g6", account_id="acct"),
        ]
        status, body = self.post("/commands/add-messages", {"messages": good})
        self.assertEqual((status, body["rejected"]), (200, []))
        self.assertEqual(self.record(self.core, "g1")["to"],
                         ["a@x.com", '"Doe, John" <j@x.com>'])

    def test_no_account_without_default(self):
        core = self.make_core()
        answer = core.handle_command("add messages", {"messages": [message("x")]})
        self.assertFalse(answer["ok"])
        self.assertIn("account", answer["detail"]["rejected"][0]["reason"])
        self.add_account(core, id="one")
        self.add_account(core, id="two")
        answer = core.handle_command("add messages", {"messages": [message("x")]})
        self.assertFalse(answer["ok"])
        routed = self.make_core({"delivery": {"default_account": "two"}})
        self.add_account(routed, id="one")
        self.add_account(routed, id="two")
        self.add(routed, message("y"))
        self.assertEqual(self.record(routed, "y")["account_id"], "two")

    def test_list_messages_active_only_limit_offset(self):
        self.post("/commands/add-messages", {"messages": [message("l%d" % i) for i in range(5)]})
        self.core.store.mark_failed({"pk": 1, "id": "l0", "account_id": "acct",
                                     "priority": 2}, self.clock(), "test")
        status, body = self.http.request("GET", "/messages")
        self.assertEqual([m["id"] for m in body["messages"]], ["l0", "l1", "l2", "l3", "l4"])
        record = body["messages"][0]
        self.assertEqual(set(record), {"id", "account_id", "priority", "status", "created_ts",
                                       "deferred_ts", "sent_ts", "error_ts", "error",
                                       "retry_count", "reported_ts", "subject", "to",
                                       "refused"})
        status, body = self.http.request("GET", "/messages?active_only=true&limit=2&offset=1")
        self.assertEqual([m["id"] for m in body["messages"]], ["l2", "l3"])
        for query in ("limit=-1", "limit=abc", "offset=x", "active_only=perhaps",
                      "limit=99999999999999999999999"):
            with self.subTest(query=query):
                self.assertEqual(self.http.request("GET", "/messages?" + query)[0], 400)

    def test_get_message(self):
        self.post("/commands/add-messages", {"messages": [message("a/b c")]})
        status, body = self.http.request("GET", "/messages/a%2Fb%20c")
        self.assertEqual((status, body["message"]["id"]), (200, "a/b c"))
        self.assertEqual(self.http.request("GET", "/messages/missing")[0], 404)

    def test_delete_messages(self):
        self.post("/commands/add-messages", {"messages": [message("x1"), message("x2")]})
        status, body = self.post("/commands/delete-messages", {"ids": ["x1", "zz", "x1"]})
        self.assertEqual(body, {"ok": True, "removed": 1, "not_found": ["zz"]})
        self.assertEqual(self.http.request("GET", "/status")[1]["queue"]["pending"], 1)
        for bad in ({}, {"ids": "x2"}, {"ids": [1]}):
            self.assertEqual(self.post("/commands/delete-messages", bad)[0], 400)

    def test_cleanup_messages(self):
        self.post("/commands/add-messages", {"messages": [message("c1"), message("c2")]})
        self.core.store.mark_failed({"pk": 1, "id": "c1", "account_id": "acct",
                                     "priority": 2}, self.clock(), "test")
        self.clock.advance(100)
        status, body = self.post("/commands/cleanup-messages", {"older_than_seconds": 200})
        self.assertEqual(body, {"ok": True, "removed": 0})
        status, body = self.post("/commands/cleanup-messages", {"older_than_seconds": 50})
        self.assertEqual(body, {"ok": True, "removed": 1})
        self.assertEqual(self.post("/commands/cleanup-messages",
                                   {"older_than_seconds": "soon"})[0], 400)
        self.assertEqual(self.http.request("GET", "/status")[1]["queue"]["pending"], 1)

    def test_accounts_never_show_password(self):
        status, body = self.post("/account", {"id": "secret", "host": "smtp.example.com",
                                              "port": 465, "user": "u", "password": "hunter2"})
        self.assertEqual((status, body), (200, {"ok": True}))
        status, body = self.http.request("GET", "/accounts")
        self.assertNotIn("hunter2", json.dumps(body))
        shown = [a for a in body["accounts"] if a["id"] == "secret"][0]
        self.assertNotIn("password", shown)
        self.assertTrue(shown["use_ssl"])
        self.assertEqual(shown["ttl"], 300)

    def test_account_validation(self):
        for bad in ({"host": "x"}, {"id": "a"}, {"id": "a", "host": "x", "port": 0},
                    {"id": "a", "host": "x", "use_tls": True, "use_ssl": True},
                    {"id": "a", "host": "x", "limit_per_hour": -1},
                    {"id": "a", "host": "x", "password": "a\r\nb"},
                    {"id": "a", "host": "x", "colour": "blue"}):
            with self.subTest(bad=bad):
                status, body = self.post("/account", bad)
                self.assertEqual(status, 400)
                self.assertFalse(body["ok"])

    def test_delete_account(self):
        self.assertEqual(self.http.request("DELETE", "/account/ghost")[0], 404)
        self.post("/account", {"id": "busy", "host": "127.0.0.1"})
        self.post("/commands/add-messages", {"messages": [message("b1", account_id="busy")]})
        status, body = self.http.request("DELETE", "/account/busy")
        self.assertEqual(status, 409)
        status, body = self.http.request("DELETE", "/account/busy?force=true")
        self.assertEqual((status, body), (200, {"ok": True}))
        record = self.record(self.core, "b1")
        self.assertEqual((record["status"], record["error"]), ("error", "account deleted"))
        self.post("/account", {"id": "idle", "host": "127.0.0.1"})
        self.assertEqual(self.http.request("DELETE", "/account/idle")[0], 200)

    def test_suspend_and_activate(self):
        self.assertEqual(self.post("/commands/suspend")[1], {"ok": True, "active": False})
        self.assertFalse(self.http.request("GET", "/status")[1]["active"])
        self.assertEqual(self.post("/commands/activate")[1], {"ok": True, "active": True})
        self.assertEqual(self.post("/commands/suspend", {"account_id": "acct"})[1],
                         {"ok": True, "active": False, "account_id": "acct"})
        self.assertTrue(self.http.request("GET", "/status")[1]["active"])
        self.assertEqual(self.post("/commands/suspend", {"account_id": "ghost"})[0], 404)

    def test_handle_command_unknown(self):
        self.assertEqual(self.core.handle_command("frobnicate", {}),
                         {"ok": False, "error": "unknown command"})

    def test_metrics_endpoint(self):
        status, data, response = self.http.request("GET", "/metrics", raw=True)
        self.assertEqual(status, 200)
        self.assertTrue(response.getheader("Content-Type").startswith("text/plain; version=0.0.4"))
        self.assertIn(b'asyncmail_sent_total{account_id="acct"} 0', data)


class AuthTests(CoreCase):

    def setUp(self):
        self.core = self.make_core({"server": {"api_token": "s3cret-token"}})

    def test_every_endpoint_needs_the_token(self):
        anonymous = self.client(self.core)
        for method, path in (("GET", "/status"), ("GET", "/metrics"), ("GET", "/accounts"),
                             ("GET", "/messages"), ("GET", "/messages/x"),
                             ("POST", "/commands/run-now"), ("POST", "/account"),
                             ("DELETE", "/account/x"), ("GET", "/nope")):
            with self.subTest(path=path):
                status, body = anonymous.request(method, path)
                self.assertEqual(status, 401)
                self.assertEqual(body, {"ok": False, "error": "Invalid or missing API token"})

    def test_wrong_token_and_both_header_forms(self):
        client = self.client(self.core)
        self.assertEqual(client.request("GET", "/status", headers={"X-API-Token": "nope"})[0], 401)
        self.assertEqual(client.request("GET", "/status",
                                        headers={"Authorization": "Bearer nope"})[0], 401)
        self.assertEqual(client.request("GET", "/status",
                                        headers={"X-API-Token": "s3cret-token"})[0], 200)
        self.assertEqual(client.request("GET", "/status",
                                        headers={"Authorization": "Bearer s3cret-token"})[0], 200)

    def test_unauthorised_post_with_body_still_gets_an_answer(self):
        client = self.client(self.core)
        status, body = client.request("POST", "/commands/add-messages",
                                      {"messages": [message("x")]})
        self.assertEqual(status, 401)
