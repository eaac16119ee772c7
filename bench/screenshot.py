"""Draw the README's picture of the web page (docs/web-page.png).

An in-process daemon on a clock that walks through the last hour, delivering
a few batches a minute to the test SMTP server (some recipients deferred with
451, some refused with 550), two tenants, one suspended account; then a
headless Chromium (testsupport.start_browser) opens the overview and
screenshots it.  Run from the repository: ``python3 bench/screenshot.py
[OUT.png [#/view]]``.
"""

import logging
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import asyncmail  # noqa: E402
import testsupport  # noqa: E402


class Clock:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


def main(out=os.path.join(ROOT, "docs", "web-page.png"), fragment=""):
    missing = testsupport.browser_unavailable()
    if missing:
        print("cannot draw the page: %s missing" % missing, file=sys.stderr)
        return 1
    directory = tempfile.mkdtemp(prefix="asyncmail-shot-")
    clock = Clock(time.time() - 3600)
    smtp = testsupport.SmtpServer()
    smtp.rcpt_replies["busy@example.net"] = "451 4.7.1 greylisted, try again later"
    smtp.rcpt_replies["nobody@example.org"] = "550 5.1.1 no such user"
    log = logging.getLogger("asyncmail.shot")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    core = asyncmail.AsyncMailCore({"storage": {"db_path": os.path.join(directory, "q.db")},
                                    "server": {"port": "0"},
                                    "delivery": {"retry_delays": "600", "max_retries": "5"}},
                                   test_mode=True, now=clock, logger=log)
    core.start()
    try:
        core.handle_command("add tenant", {"id": "shop", "client_base_url": "http://127.0.0.1:9"})
        for tenant, name in (("default", "newsletter"), ("default", "alerts"), ("shop", "orders")):
            core.handle_command("add account", {"id": name, "host": "127.0.0.1",
                                                "port": smtp.port, "limit_per_hour": 5000,
                                                "password": "never-shown", "tenant_id": tenant})
        rng = random.Random(7)
        serial = 0
        for minute in range(60):
            clock.value += 60
            batch = {"default": [], "shop": []}
            for _ in range(int(6 + 5 * abs(30 - minute) / 30 + rng.randint(0, 6))):
                serial += 1
                tenant, account = rng.choice((("default", "newsletter"), ("default", "alerts"),
                                              ("shop", "orders")))
                to = rng.choice(["ann@example.com", "bob@example.com", "cho@example.com"] * 8
                                + ["busy@example.net", "nobody@example.org"])
                batch[tenant].append({"id": "m%05d" % serial, "account_id": account,
                                      "from": "%s@example.com" % account, "to": to,
                                      "subject": "Order %d confirmed" % serial if tenant == "shop"
                                      else "Weekly digest #%d" % serial, "body": "hello"})
            for tenant, messages in batch.items():
                if messages:
                    core.handle_command("add messages", {"messages": messages,
                                                         "tenant_id": tenant})
            core.handle_command("run now")
        core.handle_command("suspend", {"account_id": "alerts"})
        core.handle_command("add messages", {"messages": [
            {"id": "held-%d" % i, "account_id": "alerts", "from": "alerts@example.com",
             "to": "ops@example.com", "subject": "Disk almost full", "body": "80%"}
            for i in range(12)]})
        browser = testsupport.start_browser(1280, 1180)
        try:
            browser.get("http://127.0.0.1:%d/%s" % (core.http_address[1], fragment))
            deadline = time.time() + 30
            while not browser.execute_script("return document.body.dataset.ready"):
                if time.time() > deadline:
                    raise RuntimeError("the page did not render")
                time.sleep(0.05)
            browser.save_screenshot(out)
        finally:
            browser.quit()
    finally:
        core.stop()
        smtp.close()
    print("wrote %s" % os.path.relpath(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
