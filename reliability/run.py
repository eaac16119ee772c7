#!/usr/bin/env python3
"""asyncmail reliability runs: crash loop, hostile input, load.

    python3 reliability/run.py [--quick] [--only crash,fuzz,load] [--json PATH]

Each scenario starts the daemon as its own process (``python3 asyncmail.py
--config ...``), attacks it, and ends with a count of what was lost.  The
SMTP sink, the report upstream and the hostile-request corpus are the ones of
test_asyncmail.py.  Exit status 1 when anything was lost or a 5xx was seen.
"""

import argparse
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import test_asyncmail as support  # noqa: E402  (SmtpServer, Upstream, hostile_requests)


class Daemon:
    """The daemon as users run it; restartable on the same database."""

    def __init__(self, directory, config):
        self.directory = directory
        self.config = os.path.join(directory, "config.ini")
        with open(self.config, "w") as handle:
            handle.write("[storage]\ndb_path = %s\n[server]\nport = 0\n%s"
                         % (os.path.join(directory, "queue.db"), config))
        self.process = None
        self.address = None
        self.log = open(os.path.join(directory, "daemon.log"), "ab")

    def start(self):
        offset = self.log.tell()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNC_MAIL_")}
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "asyncmail.py"), "--config", self.config],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=self.directory)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(self.log.name, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode("utf-8", "replace")
            found = re.search(r"listening on http://([\d.]+):(\d+)", text)
            if found:
                self.address = (found.group(1), int(found.group(2)))
                return self
            if self.process.poll() is not None:
                raise RuntimeError("daemon exited: " + text[-2000:])
            time.sleep(0.01)
        raise RuntimeError("daemon did not start")

    def kill(self, sig=signal.SIGKILL):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    def rss_peak_kb(self):
        try:
            with open("/proc/%d/status" % self.process.pid) as handle:
                return int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1))
        except (OSError, AttributeError):
            return None


def request(address, method, path, body=None, timeout=10):
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        # without api_token the daemon takes only application/json bodies
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def message(mid, **fields):
    return support.message(mid, **fields)


# --------------------------------------------------------------------------
# 1. crash: kill -9 while clients push and the dispatcher delivers
# --------------------------------------------------------------------------

def scenario_crash(options):
    quick = options.quick
    total, kills_wanted = (2000, 20) if quick else (10000, 25)
    directory = tempfile.mkdtemp(prefix="asyncmail-crash-")
    smtp = support.SmtpServer()
    upstream = support.Upstream()
    daemon = Daemon(directory, "[delivery]\nsend_interval_seconds = 0.05\n"
                               "retry_delays = 1\nmax_retries = 1000\n"
                               "[client]\nclient_sync_url = %s\nsync_interval_seconds = 1\n"
                    % upstream.url).start()
    state = {"address": daemon.address}
    lock = threading.Lock()
    request(daemon.address, "POST", "/account",
            {"id": "a", "host": "127.0.0.1", "port": smtp.port, "batch_size": 50})
    accepted, resends = set(), [0]
    ids = ["c%05d" % i for i in range(total)]
    batches = [ids[i:i + 50] for i in range(0, total, 50)]
    pushing = threading.Event()
    pushing.set()

    def client(my_batches):
        for batch in my_batches:
            for _ in range(1000):
                with lock:
                    address = state["address"]
                try:
                    status, body = request(address, "POST", "/commands/add-messages",
                                           {"messages": [message(i) for i in batch]})
                except (OSError, http.client.HTTPException, ValueError):
                    resends[0] += 1
                    time.sleep(0.05)
                    continue
                if status == 200 or (status == 400 and "detail" in body):
                    rejected = body["rejected"] if status == 200 else body["detail"]["rejected"]
                    refused = {r["id"] for r in rejected if r["reason"] != "duplicate id"}
                    with lock:
                        accepted.update(i for i in batch if i not in refused)
                    break
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(batches[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    rng = random.Random(1)
    kills = 0
    while kills < kills_wanted:
        time.sleep(rng.uniform(0.1, 0.6))
        daemon.kill(signal.SIGKILL)
        kills += 1
        daemon.start()
        with lock:
            state["address"] = daemon.address
    for thread in threads:
        thread.join(300)
    deadline = time.monotonic() + (120 if quick else 600)
    while time.monotonic() < deadline:
        status, body = request(daemon.address, "GET", "/status")
        queue = body["queue"]
        reported = {e["id"] for e in upstream.entries() if e.get("sent_ts") or e.get("error_ts")}
        if queue["pending"] + queue["deferred"] + queue["sending"] == 0 and \
                accepted <= reported:
            break
        time.sleep(0.2)
    delivered = [support.parse_mail(m["data"])["Subject"].split()[-1] for m in smtp.messages]
    unique = set(delivered)
    finals = {e["id"] for e in upstream.entries() if e.get("sent_ts") or e.get("error_ts")}
    daemon.kill(signal.SIGTERM)
    smtp.close()
    upstream.close()
    shutil.rmtree(directory, True)
    if len(accepted) != total:
        raise RuntimeError("harness: only %d of %d messages were ever accepted"
                           % (len(accepted), total))
    result = {"scenario": "crash", "messages": total, "accepted": len(accepted),
              "kills": kills, "client_resends": resends[0], "delivered_unique": len(unique),
              "lost": len(accepted - unique), "duplicates": len(delivered) - len(unique),
              "reports_lost": len(accepted - finals), "5xx": 0}
    result["thrown"] = "%d messages, 4 clients, kill -9 x%d" % (total, kills)
    return result


# --------------------------------------------------------------------------
# 2. fuzz: hostile requests at every endpoint, slowloris clients alongside
# --------------------------------------------------------------------------

def scenario_fuzz(options):
    quick = options.quick
    count = 2000 if quick else 12000
    directory = tempfile.mkdtemp(prefix="asyncmail-fuzz-")
    daemon = Daemon(directory, "[scheduler]\nactive = false\n"
                               "[delivery]\nsmtp_timeout_seconds = 0.5\n").start()
    request(daemon.address, "POST", "/account", {"id": "acct", "host": "127.0.0.1", "port": 9})
    slow = []
    for _ in range(20):   # slowloris: connections that never finish their headers
        sock = socket.create_connection(daemon.address)
        sock.sendall(b"POST /commands/add-messages HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    server_errors, unanswered, accepted = 0, 0, set()
    for label, raw in support.hostile_requests(seed=4242, count=count):
        status, response = support.send_hostile(daemon.address, raw)
        if status is None:
            unanswered += 1
            continue
        if status >= 500:
            server_errors += 1
            print("5xx:", label, response[:300], file=sys.stderr)
        head, _, body = response.partition(b"\r\n\r\n")
        if status == 200 and b"queued" in body[:100]:
            answer = json.loads(body[:int(re.search(rb"(?i)content-length: (\d+)",
                                                    head).group(1))])
            sent = json.loads(raw.partition(b"\r\n\r\n")[2])["messages"]
            rejected = {r["id"] for r in answer["rejected"]}
            accepted.update(m["id"] for m in sent if isinstance(m, dict)
                            and isinstance(m.get("id"), str) and m["id"] not in rejected)
    started = time.monotonic()
    status, _ = request(daemon.address, "GET", "/status", timeout=1)
    status_seconds = time.monotonic() - started
    _, body = request(daemon.address, "GET", "/messages?limit=10000")
    queued = {m["id"] for m in body["messages"]}
    for sock in slow:
        sock.close()
    alive = daemon.process.poll() is None
    daemon.kill(signal.SIGTERM)
    shutil.rmtree(directory, True)
    return {"scenario": "fuzz", "requests": count, "5xx": server_errors,
            "unanswered": unanswered, "crashed": not alive, "status_after_s": status_seconds,
            "accepted": len(accepted), "lost": len(accepted - queued),
            "unexpected_in_queue": len(queued - accepted), "duplicates": 0,
            "thrown": "%d hostile requests + 20 slowloris connections" % count}


# --------------------------------------------------------------------------
# 3. load: 64 clients mixing intake, listing and status while delivery runs
# --------------------------------------------------------------------------

def scenario_load(options):
    quick = options.quick
    seconds = 10 if quick else options.load_seconds
    directory = tempfile.mkdtemp(prefix="asyncmail-load-")
    smtp = support.SmtpServer()
    daemon = Daemon(directory, "[delivery]\nsend_interval_seconds = 0.05\n").start()
    request(daemon.address, "POST", "/account",
            {"id": "a", "host": "127.0.0.1", "port": smtp.port, "batch_size": 500})
    latencies, failures, accepted = [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(number):
        rng = random.Random(number)
        conn = http.client.HTTPConnection(*daemon.address, timeout=30)
        sequence = 0
        while time.monotonic() < stop_at:
            choice = rng.random()
            if choice < 0.5:
                ids = ["l%d-%d-%d" % (number, sequence, i) for i in range(rng.choice((1, 10)))]
                sequence += 1
                method, path = "POST", "/commands/add-messages"
                body = json.dumps({"messages": [message(i) for i in ids]})
            elif choice < 0.75:
                method, path, body, ids = "GET", "/messages?active_only=true&limit=50", None, []
            else:
                method, path, body, ids = "GET", "/status", None, []
            started = time.perf_counter()
            try:
                conn.request(method, path, body=body,
                             headers={"Content-Type": "application/json"} if body else {})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)
                conn.close()
                conn = http.client.HTTPConnection(*daemon.address, timeout=30)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if status != 200:
                    failures.append((method, path, status))
                elif ids:
                    accepted.extend(ids)
        conn.close()

    samples = []

    def sample_rss():   # VmRSS every 2 s: bounded means it levels off
        while time.monotonic() < stop_at:
            try:
                with open("/proc/%d/status" % daemon.process.pid) as handle:
                    samples.append(int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1)))
            except (OSError, AttributeError):
                pass
            time.sleep(2)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(64)]
    threads.append(threading.Thread(target=sample_rss))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    rss = daemon.rss_peak_kb()
    half = len(samples) // 2
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        queue = request(daemon.address, "GET", "/status")[1]["queue"]
        if queue["pending"] + queue["deferred"] + queue["sending"] == 0:
            break
        time.sleep(0.2)
    delivered = {support.parse_mail(m["data"])["Subject"].split()[-1] for m in smtp.messages}
    daemon.kill(signal.SIGTERM)
    smtp.close()
    shutil.rmtree(directory, True)
    latencies.sort()
    return {"scenario": "load", "clients": 64, "seconds": seconds, "requests": len(latencies),
            "failed": len(failures), "failures_sample": failures[:5],
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "rss_peak_mb": rss / 1024.0 if rss else None,
            "rss_mb_first_half_max": max(samples[:half]) / 1024.0 if half else None,
            "rss_mb_second_half_max": max(samples[half:]) / 1024.0 if half else None,
            "rss_mb_samples": [round(kb / 1024.0, 1) for kb in samples],
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"), "accepted": len(accepted),
            "lost": len(set(accepted) - delivered), "duplicates": 0, "5xx": sum(
                1 for f in failures if isinstance(f[2], int) and f[2] >= 500),
            "thrown": "64 clients x %d s: intake, listing, status" % seconds}


SCENARIOS = {"crash": scenario_crash, "fuzz": scenario_fuzz, "load": scenario_load}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (CI)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated names")
    parser.add_argument("--load-seconds", type=int, default=60,
                        help="duration of the load scenario (default 60)")
    parser.add_argument("--json", default=os.path.join(HERE, "results",
                                                       "latest-quick.json"
                                                       if "--quick" in sys.argv
                                                       else "latest.json"))
    args = parser.parse_args()
    results = []
    for name in args.only.split(","):
        started = time.monotonic()
        result = SCENARIOS[name](args)
        result["wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| scenario | what was thrown at it | lost | duplicates | 5xx |")
    print("|---|---|---|---|---|")
    bad = False
    for r in results:
        lost = r["lost"] + r.get("reports_lost", 0) + r.get("unanswered", 0) + \
            r.get("unexpected_in_queue", 0) + r.get("failed", 0)
        bad = bad or lost > 0 or r["5xx"] > 0 or r.get("crashed")
        print("| %s | %s | %d%s | %d | %d |" % (
            r["scenario"], r["thrown"], r["lost"],
            " (+%d reports)" % r["reports_lost"] if r.get("reports_lost") else "",
            r["duplicates"], r["5xx"]))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                   "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "results": results}, handle, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
