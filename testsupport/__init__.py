"""Test peers and fixtures shared by test_asyncmail.py, bench/run.py and
reliability/run.py: an SMTP server, an upstream that records report POSTs,
a throw-away Dovecot, hostile request corpora, message builders.  They live
here, not in the test module, so that renaming or regrouping a test breaks
none of the harnesses (standard library only)."""

import base64
import contextlib
import email
import email.policy
import json
import os
import random
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


WAIT = 20.0   # upper bound of every wait; never a duration under test


def wait_until(predicate, timeout=WAIT, message="condition"):
    """Poll ``predicate`` (bounded) until true; fail the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for %s" % message)


class SmtpServer:
    """A real SMTP server on 127.0.0.1:0 (socketserver, one thread per
    connection).  ``script(verb, reply)`` queues a reply for the next use of a
    verb ("DATA" is the reply after the message body, "CONNECT" the
    greeting); the reply "DROP" closes the connection instead.
    ``rcpt_replies[address]`` answers RCPT for one address every time."""

    def __init__(self, ehlo_extensions=("8BITMIME", "PIPELINING", "AUTH PLAIN"),
                 credentials=None, port=0):
        self.credentials = credentials   # (user, password) or None: any AUTH passes
        self.auths = []
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

        self.server = Server(("127.0.0.1", port), Handler)
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
                # "DATA" scripts the reply after the body; "DATA-CMD" the
                # reply to the DATA command itself.
                reply = self._scripted("DATA-CMD" if verb == "DATA" else verb)
                if reply == "DROP":
                    return
                if reply and reply.startswith("STALL:"):   # a server slower than the
                    time.sleep(float(reply[6:]))          # client's timeout
                    reply = None
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
                    if after and after.startswith("STALL:"):   # "STALL:2" or "STALL:2:451 x"
                        seconds, _, after = after[6:].partition(":")
                        time.sleep(float(seconds))
                        after = after or None
                    if after is None or after.startswith("2"):
                        with self.received:
                            self.messages.append({"from": mail_from, "rcpts": list(rcpts),
                                                  "data": b"".join(chunks),
                                                  "connection": connection})
                            self.received.notify_all()
                    write((after or "250 queued").encode() + b"\r\n")
                elif verb == "AUTH":
                    if reply:
                        write(reply.encode() + b"\r\n")
                        continue
                    words = text.split()
                    try:
                        _, user, password = base64.b64decode(words[2]).decode().split("\0")
                    except (IndexError, ValueError):
                        write(b"501 5.5.2 malformed AUTH\r\n")
                        continue
                    with self._lock:
                        self.auths.append(user)
                    ok = self.credentials is None or self.credentials == (user, password)
                    write(b"235 2.7.0 ok\r\n" if ok else b"535 5.7.8 bad credentials\r\n")
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


class QuietHandler(BaseHTTPRequestHandler):
    """The fake servers' request handler: HTTP/1.1 keep-alive without Nagle's
    40 ms delay, and no request logging."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


class _LocalHttpServer(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


def serve_locally(handler, port=0):
    """An HTTP server on 127.0.0.1 (port 0: any free one), serving in a
    daemon thread; the caller shuts it down."""
    server = _LocalHttpServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server


class Upstream:
    """An HTTP server on 127.0.0.1:0 recording every POST (path, headers,
    JSON body).  ``answers`` is a list of (status, body) to give in turn;
    when empty it answers 200 with a summary.  ``hang`` makes it stall."""

    def __init__(self, port=0):
        self.posts = []
        self.answers = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Condition()
        outer = self

        class Handler(QuietHandler):
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
                status, text = answer[0], answer[1]
                data = text.encode("utf-8")
                self.send_response(status)
                for name, value in (answer[2] if len(answer) > 2 else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = serve_locally(Handler, port)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d/sync" % self.port

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def entries(self):
        with self._lock:
            return [e for post in self.posts for e in post["body"]["delivery_report"]]


def message(mid, **fields):
    base = {"id": mid, "from": "sender@example.com", "to": ["rcpt@example.org"],
            "subject": "subject " + mid, "body": "body of " + mid}
    base.update(fields)
    return base


def parse_mail(data):
    return email.message_from_bytes(data, policy=email.policy.default)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificate(directory):
    """A self-signed certificate for 127.0.0.1/localhost (openssl CLI)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=WAIT)
    return cert, key


def hostile_requests(seed, count):
    """A deterministic corpus of malformed and hostile HTTP requests (raw
    bytes), at every endpoint.  Yields (label, bytes)."""
    rng = random.Random(seed)
    paths = ["/status", "/metrics", "/accounts", "/account", "/account/acct", "/messages",
             "/messages/x", "/commands/add-messages", "/commands/delete-messages",
             "/commands/cleanup-messages", "/commands/run-now", "/commands/suspend",
             "/commands/activate", "/commands/../../etc/passwd", "/messages/%00%ff",
             "/messages/..%2F..%2Fetc", "/" + "a" * 5000, "/account/%E2%9C%93",
             "/messages?limit=-1", "/messages?limit=1e9&offset=NaN", "/messages?active_only=%00",
             # tenants
             "/tenant", "/tenant/x", "/tenant/%00", "/tenants", "/health", "/health?x=%ff",
             "/messages?tenant_id=*", "/messages?tenant_id=%00", "/status?tenant_id=" + "t" * 300,
             "/commands/add-messages?tenant_id=nobody", "/account?tenant_id=default",
             "/commands/delete-messages?tenant_id=*", "/messages?batch_code=%0d%0a"]
    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW",
               "get", "POST /x", ""]
    scalars = [None, True, False, 0, -1, 2 ** 63, -2 ** 63, 10 ** 400, 1e308, -1e308, 0.5,
               "", "x" * 300, "a\r\nBcc: evil@x.com", "\x00", "\ud800", "☃", [], {}, "1",
               "immediate", "<script>", "../../etc/passwd", "C:\\\\boot.ini"]

    def value(depth=0):
        kind = rng.random()
        if depth > 3 or kind < 0.5:
            return rng.choice(scalars)
        if kind < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        keys = ["id", "from", "to", "cc", "bcc", "subject", "body", "priority", "deferred_ts",
                "attachments", "headers", "account_id", "messages", "ids", "host", "port",
                "filename", "content", "url", "s3", "older_than_seconds", "reply_to",
                "content_type", "message_id", "limit_per_minute", "use_tls", "ttl",
                "tenant_id", "batch_code", "client_base_url", "client_sync_path",
                "client_attachment_path", "client_auth", "method", "storage_path",
                "fetch_mode", "content_md5"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 6))}

    def message_like():
        msg = {"id": rng.choice(["ok-%d" % rng.randint(0, 10 ** 9), value()]),
               "from": rng.choice(["a@b.com", "bad", value()]),
               "to": rng.choice([["x@y.com"], "x@y.com, z@w.org", [], value()]),
               "subject": rng.choice(["s", "s\r\nX-Injected: 1", value()]),
               "body": rng.choice(["b", value()])}
        for key in rng.sample(["priority", "deferred_ts", "attachments", "headers", "cc",
                               "bcc", "account_id", "reply_to", "return_path"], 3):
            if rng.random() < 0.5:
                msg[key] = value()
        if rng.random() < 0.2:
            msg["attachments"] = [{"filename": rng.choice(["a.txt", "../x", "a\r\nb", value()]),
                                   rng.choice(["content", "url", "s3", "storage_path"]): value()}]
        return msg

    def valid_message():
        return {"id": "valid-%d" % rng.randint(0, 10 ** 12), "from": "a@b.com",
                "to": rng.choice([["x@y.com"], "x@y.com, \"Q, R\" <q@r.org>"]),
                "subject": rng.choice(["ok", "Grüße ✓"]), "body": "b",
                "priority": rng.choice([0, 1, 2, 3, "low", "high"])}

    for index in range(count):
        kind = rng.randrange(12)
        method = rng.choice(["POST"] * 4 + methods)
        path = rng.choice(paths)
        # what the daemon serves without api_token: a local Host and JSON bodies
        headers = {"Host": "127.0.0.1", "Content-Type": "application/json"}
        if kind == 0:
            batch = [message_like() if rng.random() < 0.5 else valid_message()
                     for _ in range(rng.randint(1, 5))]
            body = json.dumps({"messages": batch}, default=str).encode("utf-8", "surrogatepass")
            method, path = "POST", "/commands/add-messages"
        elif kind == 1:
            body = json.dumps(value(), default=str).encode("utf-8", "surrogatepass")
        elif kind == 2:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        elif kind == 3:
            body = b"[" * rng.randint(1000, 200000) + b"]"
        elif kind == 4:
            body = b'{"messages": [' + b"9" * rng.randint(1000, 50000) + b"]}"
        elif kind == 5:
            body = json.dumps({"ids": [value() for _ in range(5)]}, default=str).encode(
                "utf-8", "surrogatepass")
        elif kind == 6:   # lying Content-Length (shorter than claimed: client closes)
            body = b'{"messages": []}'
            headers["Content-Length"] = str(len(body) + rng.randint(1, 50))
        elif kind == 7:
            body = b"{}"
            headers["Content-Length"] = rng.choice(["-1", "abc", "1" * 40, "0x10", " 2"])
        elif kind == 8:
            body = b"{}"
            headers["Transfer-Encoding"] = rng.choice(["chunked", "gzip", "chunked, chunked"])
        elif kind == 9:
            body = json.dumps(message_like(), default=str).encode("utf-8", "surrogatepass")
        elif kind == 10:
            headers["X-Huge"] = "h" * rng.randint(10000, 70000)
            body = b""
        else:
            body = b'{"id": "acct", "host": ' + json.dumps(value(), default=str).encode() + b"}"
            path = "/account"
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(body))
        if kind == 8 and "chunked" in headers.get("Transfer-Encoding", ""):
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if rng.random() < 0.5 else body
        head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join(
            "%s: %s\r\n" % item for item in headers.items()) + "\r\n"
        yield "%d:%s %s" % (index, method, path[:40]), head.encode("latin-1", "replace") + body


def send_hostile(address, raw, timeout=10.0):
    """Send one raw request on a fresh connection (half-closing after it, so
    lying lengths end) and return the status code, or None when the server
    closed without answering."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        sock.close()
    if not received.startswith(b"HTTP/1."):
        return None, received
    return int(received[9:12]), received


DOVECOT = "/usr/sbin/dovecot"


DOVECOT_CONFIG = """\
base_dir = %(dir)s/run
state_dir = %(dir)s/state
log_path = %(dir)s/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = %(ssl)s
%(ssl_files)s
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = %(uid)d
mail_location = maildir:~/Maildir
auth_failure_delay = 0
passdb {
  driver = passwd-file
  args = %(dir)s/users
}
userdb {
  driver = passwd-file
  args = %(dir)s/users
}
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service imap-login {
  inet_listener imap {
    port = %(imap_port)d
  }
  inet_listener imaps {
    port = %(imaps_port)d
    ssl = yes
  }
}
"""


def dovecot_unavailable():
    """Why a throw-away Dovecot cannot run here, or None when it can."""
    import pwd
    if not os.access(DOVECOT, os.X_OK):
        return "dovecot (apt-get install dovecot-imapd)"
    if os.geteuid() != 0:
        return "dovecot (its master must start as root)"
    try:
        pwd.getpwnam("dovecot"), pwd.getpwnam("dovenull")
    except KeyError:
        return "dovecot (its dovecot and dovenull users are missing)"
    version = subprocess.run([DOVECOT, "--version"], stdout=subprocess.PIPE,
                             timeout=WAIT).stdout.decode().strip()
    if not version.startswith("2.3."):   # 2.4 changed the configuration format
        return "dovecot 2.3 (found %s)" % version
    return None


class Dovecot:
    """A throw-away Dovecot 2.3 IMAP server on 127.0.0.1: a temporary
    directory with a self-signed certificate, a passwd-file with one user
    and a configuration, ``dovecot -F`` run as a child of this process (so
    it is reaped at once: stopping takes about a second), free ports.

    ``imaps_port`` is implicit TLS; ``imap_port`` plain, offering STARTTLS
    unless ``tls=False`` (then ``ssl = no``: no TLS at all).  ``ca_file``
    is the certificate (None without TLS).  Not thread-safe."""

    user = "bounces"
    password = "s3cret-bounces"
    ATTEMPTS = 5   # a probed port can be taken before dovecot binds it

    def __init__(self, tls=True):
        import pwd
        self.tls = tls
        self.process = None
        self.directory = tempfile.mkdtemp(prefix="asyncmail-dovecot-")
        try:
            os.chmod(self.directory, 0o711)   # the mail process (uid dovecot) passes through
            owner = pwd.getpwnam("dovecot")
            home = os.path.join(self.directory, "home")
            os.mkdir(home)
            os.chown(home, owner.pw_uid, owner.pw_gid)
            with open(os.path.join(self.directory, "users"), "w") as users:
                users.write("%s:{PLAIN}%s:%d:%d::%s::\n"
                            % (self.user, self.password, owner.pw_uid, owner.pw_gid, home))
            self.ca_file = make_certificate(self.directory)[0] if tls else None
            self._start(owner.pw_uid)
        except BaseException:
            self.close()
            raise

    def _start(self, uid):
        conf = os.path.join(self.directory, "dovecot.conf")
        ssl_files = ("ssl_cert = <%s/cert.pem\nssl_key = <%s/key.pem"
                     % (self.directory, self.directory)) if self.tls else ""
        for _ in range(self.ATTEMPTS):
            self.imap_port, self.imaps_port = free_port(), free_port()
            with open(conf, "w") as handle:
                handle.write(DOVECOT_CONFIG % {
                    "dir": self.directory, "ssl": "required" if self.tls else "no",
                    "ssl_files": ssl_files, "uid": uid,
                    "imap_port": self.imap_port, "imaps_port": self.imaps_port})
            shutil.rmtree(os.path.join(self.directory, "run"), ignore_errors=True)
            output = os.path.join(self.directory, "dovecot.out")
            with open(output, "wb") as out:   # a file: children would hold a pipe open
                self.process = subprocess.Popen([DOVECOT, "-F", "-c", conf],
                                                stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT)
            deadline = time.monotonic() + WAIT
            while self.process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(
                        ("127.0.0.1", self.imap_port), timeout=1) as probe:
                    if probe.recv(64).startswith(b"* OK"):   # auth is up too
                        return
                time.sleep(0.02)   # polling another process: nothing to wait on
            with open(output, errors="replace") as handle:
                text = handle.read()
            self._stop()
            if "Address already in use" not in text:
                raise RuntimeError("dovecot did not start: %s %s" % (text, self.log_text()))
        raise RuntimeError("dovecot found no free ports in %d attempts" % self.ATTEMPTS)

    def _stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()    # the master stops its children, then itself
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self.process = None

    def close(self):
        """Stop the instance (about a second) and remove its directory."""
        self._stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self):
        """What dovecot logged so far (a login line says "TLS" when encrypted)."""
        with contextlib.suppress(FileNotFoundError), \
                open(os.path.join(self.directory, "dovecot.log"), errors="replace") as handle:
            return handle.read()
        return ""

    def connect(self):
        """A logged-in imaplib client over implicit TLS (plain without TLS)."""
        import imaplib
        import ssl
        if self.tls:
            imap = imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port,
                                     ssl_context=ssl.create_default_context(cafile=self.ca_file))
        else:
            imap = imaplib.IMAP4("127.0.0.1", self.imap_port)
        imap.login(self.user, self.password)
        return imap

    def append(self, folder, *messages):
        """Store messages, unseen, in ``folder`` (created when missing), over
        one connection."""
        imap = self.connect()
        try:
            imap.create(folder)   # NO when it exists: fine
            for raw in messages:
                status, data = imap.append(folder, None, None, raw)
                if status != "OK":
                    raise RuntimeError("APPEND failed: %r" % (data,))
        finally:
            imap.logout()

    def deliver(self, folder, messages):
        """Store many messages, unseen, in an existing ``folder`` the way a
        delivery agent does: a file each in its Maildir's new/ (much faster
        than APPEND; Dovecot reads them at the next SELECT)."""
        import pwd
        owner = pwd.getpwnam("dovecot")
        maildir = os.path.join(self.directory, "home", "Maildir", "." + folder)
        for raw in messages:
            # a unique name; S= and W= (the sizes with CRLF line ends) spare Dovecot reading it
            name = "%d.%s.asyncmail-test,S=%d,W=%d" % (time.time(), os.urandom(8).hex(),
                                                        len(raw), len(raw))
            path = os.path.join(maildir, "tmp", name)
            with open(path, "wb") as handle:
                handle.write(raw)
            os.chown(path, owner.pw_uid, owner.pw_gid)
            os.rename(path, os.path.join(maildir, "new", name))

    def count(self, folder, criteria="ALL"):
        """How many messages of ``folder`` match an IMAP SEARCH."""
        imap = self.connect()
        try:
            imap.select(folder, readonly=True)
            status, data = imap.search(None, criteria)
            if status != "OK":
                raise RuntimeError("SEARCH %s failed: %r" % (criteria, data))
            return len(data[0].split())
        finally:
            imap.logout()

    def bounces_config(self, folder):
        """The [bounces] settings (SPEC 8) that read ``folder`` here."""
        return {"imap_host": "127.0.0.1", "folder": folder,
                "imap_port": str(self.imaps_port if self.tls else self.imap_port),
                "imap_ssl": "true" if self.tls else "false", "imap_ca_file": self.ca_file or "",
                "imap_user": self.user, "imap_password": self.password}


def bounce_dsn(recipients, verp=None, original=None, to="shop@example.com"):
    """An RFC 3464 report as wire bytes: ``recipients`` is [(address,
    action, status, diagnostic)]; ``verp`` the address it was delivered to
    (Delivered-To); ``original`` the returned headers (text/rfc822-headers)."""
    blocks = "".join("\nFinal-Recipient: rfc822; %s\nAction: %s\nStatus: %s\n%s"
                     % (address, action, status,
                        "Diagnostic-Code: smtp; %s\n" % diagnostic if diagnostic else "")
                     for address, action, status, diagnostic in recipients)
    returned = ("--b0\nContent-Type: text/rfc822-headers\n\n%s\n" % original.strip()
                if original else "")
    text = ("%sFrom: MAILER-DAEMON@mx.example.net\nTo: %s\nSubject: Undelivered Mail\n"
            "MIME-Version: 1.0\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=b0\n\n"
            "--b0\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
            "--b0\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n"
            "%s\n%s--b0--\n" % ("Delivered-To: %s\n" % verp if verp else "", to, blocks,
                                returned))
    return text.replace("\n", "\r\n").encode("utf-8")


# --------------------------------------------------------------------------
# A headless Chromium driven through WebDriver (selenium), for the web page
# --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_unavailable():
    """Why a headless Chromium cannot be driven here, or None when it can."""
    try:
        import selenium.webdriver   # noqa: F401 (only its presence is asked)
    except ImportError:
        return "selenium (pip install selenium)"
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        return "chromium and chromedriver (apt-get install chromium chromium-driver)"
    return None


def start_browser(width=1280, height=1000):
    """A headless Chromium (its own throw-away profile); quit() it after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=%d,%d" % (width, height),
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
