#!/usr/bin/env python3
"""asyncmail: a durable mail queue daemon with a small REST API.

Applications POST messages to the HTTP API; asyncmail stores them in SQLite
(committed to disk before the request is answered), delivers them through
per-account SMTP relays with priorities, scheduling, rate limits, retries and
connection reuse, and POSTs delivery reports back to the application.

Threads (each named, owned by AsyncMailCore, stopped by an Event, joined with a
bound):

- ``asyncmail-http``: the accept loop of the HTTP server; each client
  connection gets its own daemon thread (``ThreadingMixIn``).
- ``asyncmail-dispatcher``: finds due messages and hands each account's work to
  a bounded pool (``asyncmail-smtp-N``), so accounts deliver in parallel while
  one account's messages go in order over its reused connection.
- ``asyncmail-reporter``: starts each tenant's report exchanges on a small
  pool (``asyncmail-report-N``, at most one per tenant, so one slow site
  holds up no other) and purges reported, finished messages.
- ``asyncmail-bounces`` (only with a ``[bounces]`` mailbox): polls it over
  IMAP and records the bounces it finds.

The same file is the admin's CLI (``asyncmail.py queue``, ``retry``...), which
talks to the running daemon through its API.

Tenants: one daemon serves many applications (Genropy sites), each with its
own API key, accounts, message ids, report URL and attachment endpoint.
Requests without a tenant, and the ``[client]`` section, are the default
tenant, whose API is the single-tenant one unchanged.

Exit codes: 0 on a clean stop (SIGTERM/SIGINT), 1 on an unexpected error
(the CLI: the API refused), 69 (EX_UNAVAILABLE: the CLI found no daemon), 75
(EX_TEMPFAIL: another asyncmail holds the database), 78 (EX_CONFIG) on a
configuration error (a db_path whose directory does not exist included).

Standard library only; CPython 3.8 or newer. ``certifi`` is used for the CA
bundle when importable.
"""

__version__ = "0.1.0"

__all__ = [
    # the daemon
    "AsyncMailCore", "Config", "load_config", "main",
    # the store and the shapes that cross its boundary
    "Store", "MessageKey", "Claim", "Attempt", "Outcome", "IntakeRow", "SentMessage",
    "Selector", "Verp",
    # accounts, tenants, messages
    "validate_account", "ignored_account_fields", "public_account", "validate_tenant",
    "public_tenant", "validate_message", "ignored_message_fields", "message_view",
    "build_mime", "envelope",
    # attachments
    "AttachmentFetcher", "AttachmentEndpoint", "sigv4_sign",
    # bounces
    "verp_token", "verp_pk", "verp_sender", "verp_token_of", "parse_bounce", "BounceReport",
    "RecipientStatus", "bounce_type", "status_meaning",
    # delivery, reports, the API
    "Metrics", "SendingWindow", "SmtpRelay", "SmtpReply", "RateLimiter", "ReportTarget",
    "Caller", "Route",
    # errors
    "AsyncmailError", "ConfigError", "StoreError", "AlreadyRunningError", "ApiError",
    "ValidationError", "NotFoundError", "ConflictError", "DeliveryError", "TemporaryError",
    "PermanentError", "SmtpTemporaryError", "SmtpPermanentError", "ImapError",
    "BounceParseError",
]

import argparse
import base64
import binascii
import collections
import contextlib
import datetime
import email.errors
import email.utils
import fcntl
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

try:  # zoneinfo arrived in 3.9; on 3.8 only UTC and fixed offsets are accepted
    import zoneinfo as _zoneinfo
except ImportError:  # pragma: no cover - exercised on 3.8 only
    _zoneinfo = None


# ####################################################################### #
# #########################  Constants and SQL  ######################### #
# ####################################################################### #

EX_CONFIG = 78          # sysexits.h: configuration error
EX_UNAVAILABLE = 69     # sysexits.h: the CLI found no daemon answering
EX_TEMPFAIL = 75        # sysexits.h: another asyncmail holds the database
MAX_BATCH_MESSAGES = 1000   # SPEC: larger add-messages batches are refused
MAX_DELETE_IDS = 10000      # bounds one delete-messages transaction
MAX_ID_CHARS = 256
MAX_LIST_LIMIT = 10000      # GET /messages page size ceiling
MAX_SEARCH_CHARS = 200      # the search text of GET /messages
MAX_IGNORED_SHOWN = 100     # unknown account fields named in one answer or log line
MAX_SUPPRESS_DAYS = 36500   # a suppression of a hundred years is "for good" already
REQUEST_IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may sit idle
REQUEST_BODY_DEADLINE = 60.0  # seconds to receive a whole request body
MAX_CONNECTIONS = 512   # concurrent HTTP connections (one thread each); more get 503
CLAIM_CHUNK = 20        # messages claimed (and their outcomes committed) together
MAX_HEADER_LINE = 65536  # as http.server: longer header lines get 431 ...
MAX_HEADERS = 100        # ... and so do more header lines than this
MAX_CHUNK_LINE = 1024    # a chunk-size line with its (ignored) extensions
LARGE_BODY_BYTES = 256 * 1024   # requests larger than this are parsed ...
LARGE_BODY_CONCURRENCY = 1      # ... at most this many at a time (bounds peak memory)
LOOK_UP_EVERY = 2.0   # worker loops look up at least this often (systemd watchdog)
STATUS_EVERY = 10.0     # seconds between systemd STATUS= updates
SQLITE_BUSY_TIMEOUT_MS = 15000
STORE_CONNECTIONS = 8   # pooled SQLite connections (more threads wait for one)
SQL_CHUNK = 500         # stays under SQLite's historic 999-variable limit
LATEST_TS = 253402300799    # 9999-12-31T23:59:59Z: later deferred_ts is garbage
# Mail limits, checked before any pattern runs so that no parser sees more.
MAX_LOCAL_PART = 64     # RFC 5321 4.5.3.1.1: octets of a local part
MAX_DOMAIN = 253        # RFC 5321 allows 255 octets; a DNS name has 253 in text form
MAX_ADDR_SPEC = 254     # RFC 5321 4.5.3.1.3: a path is 256 octets including its < >
MAX_MAIL_LINE = 998     # RFC 5322 2.1.1: octets of one line of a message
MAX_ADDRESS_CHARS = MAX_MAIL_LINE - len("Reply-To: ")   # an address fits one header line
MAX_MIME_TYPE_CHARS = 255   # RFC 6838 4.2: type and subtype names are at most 127 each
MAX_HEADER_NAME = 76    # RFC 5322 2.1.1: a line should fit 78 characters, the name and ": " too
MAX_RFC_MESSAGE_ID = 250    # a Message-ID a client may give (and a bounce may quote)
MAX_FILENAME_CHARS = 255    # what file systems keep of a name
MAX_S3_KEY = 1024           # S3: an object key is at most 1024 bytes
MAX_CREDENTIAL_CHARS = 1024     # a tenant's client_auth user, password or token
# How much of a client's value, or of a foreign text, an error or a log line
# quotes: enough to recognise it, never a flood.
QUOTE_CHARS = 80
QUOTE_TEXT_CHARS = 200

PRIORITY_NAMES = {"immediate": 0, "high": 1, "medium": 2, "low": 3}
STATUSES = ("pending", "deferred", "held", "sending", "sent", "error")
ACTIVE_STATUSES = ("pending", "deferred", "held", "sending")
FINISHED_STATUSES = ("sent", "error")
# operator commands (SPEC 7) and the statuses each applies to
COMMAND_STATUSES = {"retry": ("deferred",), "requeue": ("error",),
                    "hold": ("pending", "deferred"), "release": ("held",),
                    "delete": STATUSES}
ATTEMPTS_KEPT = 20      # per message, besides its first attempt
PURGE_BATCH = 500       # finished messages deleted per transaction by the retention purge
DAY = 86400.0           # the longest rate window, and how long the send log is kept
RUN_NOW_SLACK = 10.0    # seconds a test-mode run-now allows the store beyond network timeouts
# What a delete may still do to a message claimed by this process (Store._claims)
_CLAIMED = "claimed"          # its SMTP transaction has not begun: a delete stops it
_ON_WIRE = "on the wire"      # its transaction has begun: it ends as the relay says
_WITHDRAWN = "withdrawn"      # deleted or failed since its claim: never to be sent
_DOOMED = "deleted on the wire"   # deleted during its transaction: gone unless sent
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
# Tenants (one daemon for many Genropy sites).  Requests without a tenant,
# and the [client] section, are the default tenant.
DEFAULT_TENANT = "default"
ALL_TENANTS = "*"           # the admin's tenant_id for "every tenant"
# A tenant's message ids, account ids and suppressed addresses live in the
# same columns as the default tenant's, as ``tenant<US>name``: ids never hold
# control characters, so the key is unambiguous, and a database of one
# tenant keeps its bare ids (no migration of rows, no second code path).
TENANT_SEP = "\x1f"
MAX_BATCH_CODE = 64         # Genropy's batch_code column
TENANT_KEY_BYTES = 32       # secrets.token_urlsafe(32): 43 characters
MAX_CACHED_ATTACHMENT_BYTES = 64 * 1024 * 1024   # endpoint attachments kept by content_md5

SCHEMA_VERSION = 6

# Schema version 1.  Messages move pending -> sending -> sent/error, or to
# deferred (waiting for deferred_ts) and back to pending when due, the way
# Postfix moves mail between its deferred and active queues: finding the next
# due message never has to look at messages scheduled for later.
SQL_SCHEMA_V1 = (
    """CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        updated_ts REAL NOT NULL)""",
    """CREATE TABLE messages (
        pk INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        priority INTEGER NOT NULL,
        status TEXT NOT NULL,
        created_ts REAL NOT NULL,
        deferred_ts REAL,
        sent_ts REAL,
        error_ts REAL,
        error TEXT,
        retry_count INTEGER NOT NULL DEFAULT 0,
        reported_ts REAL,
        subject TEXT NOT NULL,
        recipients TEXT NOT NULL,
        refused TEXT,
        message_id TEXT NOT NULL,
        payload TEXT NOT NULL)""",
    # the dispatcher: next pending message of one account, by priority then age
    "CREATE INDEX messages_dispatch ON messages (status, account_id, priority, pk)",
    # promotion of deferred messages whose time has come
    "CREATE INDEX messages_wait ON messages (status, deferred_ts)",
    # age of the oldest unfinished message (metrics)
    "CREATE INDEX messages_age ON messages (status, created_ts)",
    # retention purge of reported, finished messages
    "CREATE INDEX messages_reported ON messages (reported_ts) WHERE reported_ts IS NOT NULL",
    # report events: state changes waiting to be acknowledged by the upstream
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        message_pk INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        priority INTEGER NOT NULL,
        kind TEXT NOT NULL,
        sent_ts REAL,
        error_ts REAL,
        error TEXT,
        deferred_ts REAL,
        reason TEXT,
        refused TEXT)""",
    "CREATE INDEX events_message ON events (message_pk)",
    # successful sends, for the per-account rate windows (pruned after a day)
    """CREATE TABLE send_log (
        account_id TEXT NOT NULL,
        ts REAL NOT NULL)""",
    "CREATE INDEX send_log_account ON send_log (account_id, ts)",
    # queue depth per status, kept by triggers so /status never counts rows
    """CREATE TABLE queue_counts (
        status TEXT PRIMARY KEY,
        n INTEGER NOT NULL)""",
    "INSERT INTO queue_counts (status, n) VALUES "
    "('pending', 0), ('deferred', 0), ('sending', 0), ('sent', 0), ('error', 0)",
    """CREATE TRIGGER messages_count_insert AFTER INSERT ON messages BEGIN
        UPDATE queue_counts SET n = n + 1 WHERE status = NEW.status; END""",
    """CREATE TRIGGER messages_count_delete AFTER DELETE ON messages BEGIN
        UPDATE queue_counts SET n = n - 1 WHERE status = OLD.status; END""",
    """CREATE TRIGGER messages_count_update AFTER UPDATE OF status ON messages
        WHEN OLD.status <> NEW.status BEGIN
        UPDATE queue_counts SET n = n - 1 WHERE status = OLD.status;
        UPDATE queue_counts SET n = n + 1 WHERE status = NEW.status; END""",
)

# Schema version 2: pruning the send log by age no longer scans it.
SQL_SCHEMA_V2 = (
    "CREATE INDEX send_log_ts ON send_log (ts)",
)

# Schema version 3: the time of a message's last change, for the record's
# updated_at (NULL until the first change: created_ts stands in).
SQL_SCHEMA_V3 = (
    "ALTER TABLE messages ADD COLUMN updated_ts REAL",
)

# Schema version 4: operator control.  ``held`` messages (postsuper -h);
# why a message is deferred (NULL: the client's own schedule, which retry
# leaves alone); listings by account from an index; the attempt history.
SQL_SCHEMA_V4 = (
    "INSERT INTO queue_counts (status, n) VALUES ('held', 0)",
    "ALTER TABLE messages ADD COLUMN deferred_reason TEXT",
    "CREATE INDEX messages_account ON messages (status, account_id, created_ts)",
    """CREATE TABLE attempts (
        seq INTEGER PRIMARY KEY,
        message_pk INTEGER NOT NULL,
        ts REAL NOT NULL,
        duration REAL NOT NULL,
        relay TEXT NOT NULL,
        outcome TEXT NOT NULL,
        code INTEGER,
        text TEXT,
        refused TEXT)""",
    "CREATE INDEX attempts_message ON attempts (message_pk, seq)",
    # the history goes with its message, whichever way the message goes
    """CREATE TRIGGER messages_attempts_delete AFTER DELETE ON messages BEGIN
        DELETE FROM attempts WHERE message_pk = OLD.pk; END""",
)

# Schema version 5: bounces (SPEC 8).  A per-database key for VERP tokens;
# the bounces a message collected (one per recipient and kind); suppressed
# recipients; the bounce fields of a report event; and the RFC Message-ID
# of sent messages, for matching a bounce that carries no VERP token (sent
# only: intake does not pay for it).
SQL_SCHEMA_V5 = (
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO settings (name, value) VALUES ('verp_key', lower(hex(randomblob(16))))",
    """CREATE TABLE bounces (
        seq INTEGER PRIMARY KEY,
        message_pk INTEGER NOT NULL,
        recipient TEXT NOT NULL,
        type TEXT NOT NULL,
        status TEXT NOT NULL,
        diagnostic TEXT,
        ts REAL NOT NULL)""",
    "CREATE UNIQUE INDEX bounces_message ON bounces (message_pk, recipient, type)",
    """CREATE TRIGGER messages_bounces_delete AFTER DELETE ON messages BEGIN
        DELETE FROM bounces WHERE message_pk = OLD.pk; END""",
    """CREATE TABLE suppressions (
        address TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_ts REAL NOT NULL,
        expires_ts REAL)""",
    "CREATE INDEX suppressions_expiry ON suppressions (expires_ts)",
    "ALTER TABLE events ADD COLUMN bounce TEXT",
    "CREATE INDEX messages_sent_rfc_id ON messages (message_id) WHERE status = 'sent'",
)

# Schema version 6: tenants (one daemon for many Genropy sites).  A tenant's
# rows carry its id in ``tenant`` (and their keys its TENANT_SEP prefix);
# queue depth is counted per tenant; a message may carry a ``batch_code``
# (a campaign, which suspend can hold).
SQL_SCHEMA_V6 = (
    """CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_ts REAL NOT NULL,
        updated_ts REAL NOT NULL)""",
    "ALTER TABLE messages ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
    "ALTER TABLE messages ADD COLUMN batch_code TEXT",
    # a tenant's listings, as messages_age serves the whole queue's
    "CREATE INDEX messages_tenant ON messages (tenant, status, created_ts)",
    "ALTER TABLE events ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
    "CREATE INDEX events_tenant ON events (tenant, seq)",
    "ALTER TABLE accounts ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
    """CREATE TABLE tenant_counts (
        tenant TEXT NOT NULL,
        status TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (tenant, status)) WITHOUT ROWID""",
    "INSERT INTO tenant_counts (tenant, status, n) SELECT 'default', status, n FROM queue_counts",
    "DROP TRIGGER messages_count_insert",
    "DROP TRIGGER messages_count_delete",
    "DROP TRIGGER messages_count_update",
    "DROP TABLE queue_counts",
    # a tenant's rows are made when it registers (SQL_TENANT_COUNTS): the
    # triggers only ever update
    """CREATE TRIGGER messages_count_insert AFTER INSERT ON messages BEGIN
        UPDATE tenant_counts SET n = n + 1
        WHERE tenant = NEW.tenant AND status = NEW.status; END""",
    """CREATE TRIGGER messages_count_delete AFTER DELETE ON messages BEGIN
        UPDATE tenant_counts SET n = n - 1
        WHERE tenant = OLD.tenant AND status = OLD.status; END""",
    """CREATE TRIGGER messages_count_update AFTER UPDATE OF status ON messages
        WHEN OLD.status <> NEW.status BEGIN
        UPDATE tenant_counts SET n = n - 1 WHERE tenant = OLD.tenant AND status = OLD.status;
        UPDATE tenant_counts SET n = n + 1 WHERE tenant = NEW.tenant AND status = NEW.status;
        END""",
)

SQL_INSERT_MESSAGE = (
    "INSERT INTO messages (id, account_id, priority, status, created_ts,"
    " deferred_ts, subject, recipients, message_id, payload, tenant, batch_code)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# Resubmitting an id whose message failed is a new attempt (Genropy's
# "Retry send"): the failed row and its unsent events make room for it.
SQL_FAILED_KEYS = "SELECT pk, id FROM messages WHERE status = 'error' AND id IN ({marks})"
SQL_DELETE_EVENTS_OF = "DELETE FROM events WHERE message_pk IN ({marks})"
SQL_DELETE_PKS = "DELETE FROM messages WHERE pk IN ({marks})"
# Tenants.
SQL_TENANT_COUNTS = (
    "INSERT OR IGNORE INTO tenant_counts (tenant, status, n) VALUES " + ", ".join(
        "(?, '%s', 0)" % status for status in STATUSES))
SQL_INSERT_TENANT = (
    "INSERT INTO tenants (id, settings, key_hash, created_ts, updated_ts) VALUES (?, ?, ?, ?, ?)")
SQL_UPDATE_TENANT = "UPDATE tenants SET settings = ?, key_hash = ?, updated_ts = ? WHERE id = ?"
SQL_TENANT_EXISTS = "SELECT 1 FROM tenants WHERE id = ?"
SQL_LIST_TENANTS = "SELECT id, settings, key_hash, created_ts, updated_ts FROM tenants ORDER BY id"
SQL_DELETE_TENANT = "DELETE FROM tenants WHERE id = ?"
SQL_TENANT_MESSAGE_KEYS = "SELECT pk, id FROM messages WHERE tenant = ?"
SQL_DELETE_TENANT_MESSAGES = "DELETE FROM messages WHERE tenant = ?"
SQL_DELETE_TENANT_EVENTS = "DELETE FROM events WHERE tenant = ?"
SQL_DELETE_TENANT_ACCOUNTS = "DELETE FROM accounts WHERE tenant = ?"
SQL_DELETE_TENANT_SENDS = "DELETE FROM send_log WHERE account_id >= ? AND account_id < ?"
SQL_DELETE_TENANT_SUPPRESSIONS = "DELETE FROM suppressions WHERE address >= ? AND address < ?"
SQL_DELETE_TENANT_COUNTS = "DELETE FROM tenant_counts WHERE tenant = ?"
SQL_EXISTING_IDS = "SELECT id FROM messages WHERE id IN ({marks})"
SQL_DELETE_KEYS = (
    "SELECT pk, id, account_id, priority FROM messages WHERE id IN ({marks})")
# delete-messages by selector: one status at a time, in (created_ts, pk)
# order from messages_tenant / messages_account / messages_age, a batch per
# transaction so that intake never waits long
SQL_DELETE_SELECTED = (
    "SELECT pk, id, account_id, priority, created_ts FROM messages WHERE status = ?{where}"
    " AND (created_ts, pk) > (?, ?) ORDER BY created_ts, pk LIMIT ?")
SQL_INSERT_DELETED_EVENT = (
    "INSERT INTO events (message_pk, message_id, account_id, priority, kind, tenant)"
    " VALUES (?, ?, ?, ?, 'deleted', ?)")
SQL_RECORD_COLUMNS = (
    "id, account_id, priority, status, created_ts, deferred_ts, sent_ts,"
    " error_ts, error, retry_count, reported_ts, subject, recipients, refused,"
    " updated_ts, tenant, batch_code, payload")
SQL_GET_MESSAGE = "SELECT " + SQL_RECORD_COLUMNS + " FROM messages WHERE id = ?"
# GET /messages, put together by Store.list_messages from these pieces.  One
# arm per wanted status, each read in (created_ts, pk) order from
# messages_age (status, created_ts) or messages_account (status, account_id,
# created_ts), merged by SQLite's UNION ALL merge: no sort, no scan, and a
# page reads about as many rows as it returns, whatever the queue's size.
SQL_LIST_COLUMNS = "pk, " + SQL_RECORD_COLUMNS
SQL_LIST_ARM = "SELECT {columns} FROM messages WHERE status = ?"
SQL_LIST_TENANT = " AND tenant = ?"
SQL_LIST_ACCOUNT = " AND account_id = ?"
SQL_LIST_BATCH = " AND +batch_code = ?"
SQL_LIST_SINCE = " AND created_ts >= ?"
SQL_LIST_UNTIL = " AND created_ts < ?"
SQL_LIST_AFTER = {"oldest": " AND (created_ts, pk) > (?, ?)",
                  "newest": " AND (created_ts, pk) < (?, ?)"}
SQL_LIST_ORDER = {"oldest": " ORDER BY created_ts, pk LIMIT ? OFFSET ?",
                  "newest": " ORDER BY created_ts DESC, pk DESC LIMIT ? OFFSET ?"}
# With id_prefix the range of the unique id index drives, in id order (the
# other filters are checked on each row; ``+status`` keeps the planner off
# the status indexes, which would need a sort).
SQL_LIST_BY_ID = ("SELECT {columns} FROM messages"
                  " WHERE id >= ? AND id < ? AND +status IN ({marks})")
SQL_LIST_BY_ID_TENANT = " AND +tenant = ?"
SQL_LIST_BY_ID_ACCOUNT = " AND +account_id = ?"
SQL_LIST_BY_ID_AFTER = {"oldest": " AND id > ?", "newest": " AND id < ?"}
SQL_LIST_BY_ID_ORDER = {"oldest": " ORDER BY id LIMIT ? OFFSET ?",
                        "newest": " ORDER BY id DESC LIMIT ? OFFSET ?"}
# A search (recipient, subject, id) looks at one window of the listing at a
# time, SEARCH_WINDOW messages in the listing's order, and answers what
# matched there: a page costs the same whatever the queue's size, and the
# cursor goes on from the window's end (lower() folds ASCII letters only).
SEARCH_WINDOW = 5000
SQL_SEARCH_COLUMNS = "pk, id, created_ts, subject, recipients"   # never the payload
SQL_SEARCH = ("SELECT pk FROM ({listing}) WHERE instr(lower(subject), lower(?)) > 0"
              " OR instr(lower(recipients), lower(?)) > 0 OR instr(lower(id), lower(?)) > 0")
SQL_RECORDS_BY_PK = "SELECT " + SQL_LIST_COLUMNS + " FROM messages WHERE pk IN ({marks})"
SQL_SEARCH_ORDER = {("time", "oldest"): " ORDER BY created_ts, pk LIMIT ?",
                    ("time", "newest"): " ORDER BY created_ts DESC, pk DESC LIMIT ?",
                    ("id", "oldest"): " ORDER BY id LIMIT ?",
                    ("id", "newest"): " ORDER BY id DESC LIMIT ?"}
# An account's queue depth for the web page, counted in messages_account up
# to a cap (exact counts per tenant come from tenant_counts).
SQL_ACCOUNT_DEPTH = ("SELECT count(*) FROM (SELECT 1 FROM messages"
                     " WHERE status = ? AND account_id = ? LIMIT ?)")
SQL_MESSAGE_ATTEMPTS = (
    "SELECT ts, duration, relay, outcome, code, text, refused FROM attempts"
    " WHERE message_pk = (SELECT pk FROM messages WHERE id = ?) ORDER BY seq")
SQL_INSERT_ATTEMPT = (
    "INSERT INTO attempts (message_pk, ts, duration, relay, outcome, code, text, refused)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# keep a message's first attempt and its last ATTEMPTS_KEPT: the first says
# how it began, the last what it does now (two index seeks when there is
# nothing to trim, as for nearly every message)
SQL_TRIM_ATTEMPTS = (
    "DELETE FROM attempts WHERE message_pk = :pk"
    " AND seq > (SELECT MIN(seq) FROM attempts WHERE message_pk = :pk)"
    " AND seq < (SELECT seq FROM attempts WHERE message_pk = :pk"
    " ORDER BY seq DESC LIMIT 1 OFFSET :kept - 1)")
# Bounces and suppressions (SPEC 8).
SQL_SETTING = "SELECT value FROM settings WHERE name = ?"
SQL_SENT_BY_PK = (
    "SELECT pk, id, account_id, priority, sent_ts, payload FROM messages"
    " WHERE pk = ? AND status = 'sent'")
SQL_SENT_BY_RFC_ID = (
    "SELECT pk, id, account_id, priority, sent_ts, payload FROM messages"
    " WHERE message_id = ? AND status = 'sent'")
SQL_INSERT_BOUNCE = (
    "INSERT OR IGNORE INTO bounces (message_pk, recipient, type, status, diagnostic, ts)"
    " VALUES (?, ?, ?, ?, ?, ?)")
SQL_MESSAGE_BOUNCES = (
    "SELECT recipient, type, status, diagnostic, ts FROM bounces"
    " WHERE message_pk = (SELECT pk FROM messages WHERE id = ?) ORDER BY seq")
SQL_INSERT_BOUNCE_EVENT = (
    "INSERT INTO events (message_pk, message_id, account_id, priority, kind, sent_ts,"
    " error_ts, error, bounce, tenant) VALUES (?, ?, ?, ?, 'bounce', ?, ?, ?, ?, ?)")
SQL_UPSERT_SUPPRESSION = (
    "INSERT OR REPLACE INTO suppressions (address, reason, created_ts, expires_ts)"
    " VALUES (?, ?, ?, ?)")
SQL_SUPPRESSED = (
    "SELECT address, reason, created_ts FROM suppressions WHERE address IN ({marks})"
    " AND (expires_ts IS NULL OR expires_ts > ?)")
SQL_LIST_SUPPRESSIONS = (
    "SELECT address, reason, created_ts, expires_ts FROM suppressions"
    " WHERE expires_ts IS NULL OR expires_ts > ? ORDER BY address")
SQL_DELETE_SUPPRESSION = (
    "DELETE FROM suppressions WHERE address = ? AND (expires_ts IS NULL OR expires_ts > ?)")
SQL_PRUNE_SUPPRESSIONS = "DELETE FROM suppressions WHERE expires_ts <= ?"
SQL_COUNT_SUPPRESSIONS = "SELECT COUNT(*) FROM suppressions"

# Operator commands (SPEC 7).  ``{where}`` is the selector: ``id IN (...)``,
# ``account_id = ?``, ``status = ?`` or ``1``; each command also names the
# statuses it applies to, so a selector can only narrow it.
SQL_SELECTOR_IDS = ("SELECT id, status, account_id IN (SELECT id FROM accounts) FROM messages"
                    " WHERE id IN ({marks})")
SQL_RETRY = (
    "UPDATE messages SET status = 'pending', deferred_ts = NULL, deferred_reason = NULL,"
    " updated_ts = ? WHERE status = 'deferred' AND {scheduled} AND {where}")
SQL_RETRY_NOT_SCHEDULED = "deferred_reason IS NOT NULL"   # NULL: the client's own schedule
# the WHERE of each selector kind but ids (an unknown kind is an error)
_SELECTOR_WHERE = {"account_id": "account_id = ?", "status": "status = ?", "all": "1"}
SQL_REQUEUE_EVENTS = (
    "INSERT INTO events (message_pk, message_id, account_id, priority, kind, deferred_ts,"
    " reason, tenant) SELECT pk, id, account_id, priority, 'pending', ?, 'requeued', tenant"
    " FROM messages WHERE status = 'error' AND account_id IN (SELECT id FROM accounts)"
    " AND {reporting} AND {where}")
SQL_REPORTING_TENANTS = "tenant <> 'default'"   # without [client] client_sync_url
SQL_REQUEUE = (
    "UPDATE messages SET status = 'pending', retry_count = 0, error = NULL, error_ts = NULL,"
    " reported_ts = NULL, deferred_ts = NULL, deferred_reason = NULL, updated_ts = ?"
    " WHERE status = 'error' AND account_id IN (SELECT id FROM accounts) AND {where}")
SQL_HOLD = (
    "UPDATE messages SET status = 'held', updated_ts = ?"
    " WHERE status IN ('pending', 'deferred') AND {where}")
SQL_RELEASE_HELD = (
    "UPDATE messages SET status = CASE WHEN deferred_ts > ? THEN 'deferred'"
    " ELSE 'pending' END, updated_ts = ? WHERE status = 'held' AND {where}")
SQL_QUEUE_COUNTS = "SELECT tenant, status, n FROM tenant_counts"
SQL_OLDEST_ACTIVE = (
    "SELECT MIN(created_ts) FROM messages WHERE status = ?")
SQL_UPSERT_ACCOUNT = (
    "INSERT OR REPLACE INTO accounts (id, settings, updated_ts, tenant) VALUES (?, ?, ?, ?)")
SQL_LIST_ACCOUNTS = "SELECT settings FROM accounts ORDER BY id"
SQL_GET_ACCOUNT = "SELECT settings FROM accounts WHERE id = ?"   # existence check
SQL_ACCOUNT_IDS = "SELECT id FROM accounts"
SQL_DELETE_ACCOUNT = "DELETE FROM accounts WHERE id = ?"
SQL_ACCOUNT_ACTIVE_MESSAGES = (
    "SELECT pk, id, priority FROM messages WHERE status = ? AND account_id = ?")
# Only finished messages ever get a reported_ts, so the partial index alone
# finds them (a status filter here made SQLite walk every finished message).
SQL_PURGE_REPORTED = (
    "DELETE FROM messages WHERE pk IN (SELECT pk FROM messages INDEXED BY messages_reported"
    " WHERE reported_ts IS NOT NULL AND reported_ts <= ? {tenant} LIMIT ?)")
# events.message_id holds the client's id (MessageKey.ref), not the RFC
# Message-ID that messages.message_id holds: a name from schema version 1.
SQL_INSERT_EVENT = (
    "INSERT INTO events (message_pk, message_id, account_id, priority, kind,"
    " sent_ts, error_ts, error, deferred_ts, reason, refused, tenant)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQL_PENDING_EVENTS = (
    "SELECT seq, message_pk, message_id, account_id, priority, kind, sent_ts,"
    " error_ts, error, deferred_ts, reason, refused, bounce FROM events"
    " WHERE tenant = ? ORDER BY seq LIMIT ?")
SQL_HAS_EVENTS = "SELECT 1 FROM events WHERE tenant = ? LIMIT 1"
SQL_EVENT_BACKLOG = "SELECT tenant, COUNT(*) FROM events GROUP BY tenant"
SQL_DELETE_EVENTS = "DELETE FROM events WHERE seq IN ({marks})"
SQL_MARK_REPORTED = (
    "UPDATE messages SET reported_ts = ?, updated_ts = ? WHERE pk IN ({marks})"
    " AND status IN ('sent', 'error')")
SQL_FAIL_MESSAGE = (   # force-deleting an account fails its unfinished messages
    "UPDATE messages SET status = 'error', error_ts = :now, updated_ts = :now,"
    " error = :error, reported_ts = :reported WHERE pk = :pk")
# Delivery outcomes apply only to a message still claimed: one deleted, or
# failed by a forced account deletion meanwhile, keeps that state, except that
# a relay's acceptance is the truth and wins over "account deleted".
SQL_SENT_MESSAGE = (
    "UPDATE messages SET status = 'sent', sent_ts = :now, updated_ts = :now,"
    " refused = :refused, reported_ts = :reported, error = NULL, error_ts = NULL"
    " WHERE pk = :pk AND status IN ('sending', 'error')")
SQL_FAIL_CLAIMED = (
    "UPDATE messages SET status = 'error', error_ts = :now, updated_ts = :now,"
    " error = :error, reported_ts = :reported WHERE pk = :pk AND status = 'sending'")
SQL_DEFER_MESSAGE = (
    "UPDATE messages SET status = 'deferred', deferred_ts = :until, updated_ts = :now,"
    " error = :error, retry_count = :retry_count, deferred_reason = :reason"
    " WHERE pk = :pk AND status = 'sending'")
# Claiming (pending -> sending) and giving a claim back are not changes of the
# record that anyone sees, so they leave updated_ts alone.
SQL_RELEASE_MESSAGE = "UPDATE messages SET status = 'pending' WHERE pk = ? AND status = 'sending'"
SQL_RECOVER_SENDING = "UPDATE messages SET status = 'pending' WHERE status = 'sending'"
SQL_PROMOTE_DUE = (
    "UPDATE messages SET status = 'pending', updated_ts = :now"
    " WHERE status = 'deferred' AND deferred_ts <= :now")
SQL_HAS_PENDING = (
    "SELECT 1 FROM messages WHERE status = 'pending' AND account_id = ?"
    " AND priority <= ?{held} LIMIT 1")
SQL_CLAIM_SELECT = (
    "SELECT pk, id, account_id, priority, retry_count, payload, recipients, created_ts"
    " FROM messages WHERE status = 'pending' AND account_id = ? AND priority <= ?{held}"
    " ORDER BY priority, pk LIMIT ?")
# campaigns on hold (suspend with batch_code) are skipped by the claim
SQL_CLAIM_HELD_BATCHES = " AND (batch_code IS NULL OR batch_code NOT IN ({marks}))"
SQL_CLAIM_UPDATE = "UPDATE messages SET status = 'sending' WHERE pk IN ({marks})"
SQL_INSERT_SEND = "INSERT INTO send_log (account_id, ts) VALUES (?, ?)"
SQL_SENDS_SINCE = "SELECT ts FROM send_log WHERE account_id = ? AND ts > ? ORDER BY ts"
SQL_PRUNE_SEND_LOG = "DELETE FROM send_log WHERE ts <= ?"


# ####################################################################### #
# ##############################  Errors  ############################### #
# ####################################################################### #

class AsyncmailError(Exception):
    """Root of every error asyncmail raises on purpose."""


class ConfigError(AsyncmailError):
    """A configuration value is missing, unknown or malformed.

    ``key`` names the offending ``section.key`` when there is one.
    """

    def __init__(self, message, key=None):
        super().__init__("%s: %s" % (key, message) if key else message)
        self.key = key


class StoreError(AsyncmailError):
    """The SQLite store failed (disk full, locked past the busy timeout...)."""


class AlreadyRunningError(StoreError):
    """Another process holds the database's lock file (``pid``: the one it
    wrote there, or None)."""

    def __init__(self, message, pid=None):
        super().__init__(message)
        self.pid = pid


class ApiError(AsyncmailError):
    """A request that cannot be honoured; ``status`` is its HTTP status code
    and ``detail`` an optional JSON-able object added to the answer."""

    status = 400

    def __init__(self, message, detail=None, status=None):
        super().__init__(message)
        self.detail = detail
        if status is not None:
            self.status = status


class ValidationError(ApiError):
    """The request body or a field of it is malformed (HTTP 400)."""


class NotFoundError(ApiError):
    """The path, command, message or account does not exist (HTTP 404)."""
    status = 404


class ConflictError(ApiError):
    """The request conflicts with the queue's state (HTTP 409)."""
    status = 409


class DeliveryError(AsyncmailError):
    """A step of delivering one message failed.

    ``smtp_code`` is an SMTP server's reply code when one said so,
    ``http_status`` an attachment server's status; ``account_level`` says
    that the relay itself failed (connect, TLS, AUTH), so the account's
    other messages should wait instead of trying too.
    """

    def __init__(self, message, smtp_code=None, account_level=False, http_status=None):
        super().__init__(message)
        self.smtp_code = smtp_code
        self.account_level = account_level
        self.http_status = http_status


class TemporaryError(DeliveryError):
    """Worth retrying: SMTP 4xx, network, an attachment server's 5xx."""


class PermanentError(DeliveryError):
    """Failed for good: SMTP 5xx, an attachment that is gone or too large."""


class ImapError(AsyncmailError):
    """The bounce mailbox refused a command, or imaplib refused what the
    mailbox said."""


class BounceParseError(AsyncmailError):
    """A message in the bounce mailbox that cannot be parsed safely (more
    MIME nesting or longer Content-Type fields than the limits allow, or the
    email package gave up on it)."""


class SmtpTemporaryError(TemporaryError):
    """An SMTP relay's 4xx, or a connection that failed, timed out or dropped."""


class SmtpPermanentError(PermanentError):
    """An SMTP relay's 5xx."""


_SMTP_ERRORS = (SmtpTemporaryError, SmtpPermanentError)


def _smtp_error(message, temporary, account_level=False, smtp_code=None):
    """The SMTP error of the right class for a failure."""
    cls = SmtpTemporaryError if temporary else SmtpPermanentError
    return cls(message, smtp_code=smtp_code, account_level=account_level)


# ####################################################################### #
# ###########################  Small helpers  ########################### #
# ####################################################################### #

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")   # C0 and DEL; TAB is folding space
_CRLF = re.compile(r"[\r\n]")
_ASCII_DIGITS = re.compile(r"[0-9]+")   # str.isdigit would accept "²", which int refuses
# Every character str.splitlines() breaks on: the email package refuses all of
# them in a header value, so a single-line field that holds one cannot be sent.
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# Validation patterns are used with fullmatch only: "$" also matches before a
# final newline, which let "Bcc\n" pass for a header name.
_HEADER_NAME = re.compile(r"[!-9;-~]+")   # RFC 5322 ftext: printable, no colon
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(
    r'%s+(?:\.%s+)*|"(?:[^"\\\r\n]|\\[^\r\n])*"' % (_ATEXT, _ATEXT))
_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[A-Za-z0-9:.]+\]")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}
_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SECRET_KEYS = frozenset(["api_token", "client_sync_password", "client_sync_token",
                          "secret_access_key", "session_token", "password",
                          "imap_password"])


def _parse_bool(value):
    """True/False from a bool or one of true/false/yes/no/on/off/1/0.

    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError("expected a boolean (true/false/yes/no/on/off/1/0)")


def _is_number(value):
    """A JSON number that is finite (bools are not numbers here; a 400-digit
    integer is a number, though math.isfinite would overflow on it)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _parse_priority(value):
    """0..3 from a number, a digit string or a name (immediate/high/medium/low).

    Raises ValueError otherwise.
    """
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITY_NAMES:
            return PRIORITY_NAMES[name]
        if name.isdigit() and len(name) == 1:
            value = int(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    raise ValueError("priority must be 0-3 or immediate/high/medium/low")


def _split_addresses(text):
    """Split a comma-separated address list, respecting quotes and <...>."""
    parts, current, quoted, angle, escaped = [], [], False, False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"' and not angle:
            quoted = not quoted
        elif char == "<" and not quoted:
            angle = True
        elif char == ">" and not quoted:
            angle = False
        elif char == "," and not quoted and not angle:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _check_addr_spec(addr):
    """Return ``addr`` (domain IDNA-encoded) if it is a valid addr-spec.

    The RFC 5321 length limits are checked before any pattern or codec runs
    (IDNA's punycode is quadratic in a label's length).  Raises ValueError
    naming what is wrong.
    """
    if "@" not in addr:
        raise ValueError("invalid address %r: no @" % addr[:QUOTE_CHARS])
    if len(addr) > MAX_ADDR_SPEC:
        raise ValueError("invalid address %r...: longer than %d characters"
                         % (addr[:QUOTE_CHARS], MAX_ADDR_SPEC))
    local, _, domain = addr.rpartition("@")
    if len(local) > MAX_LOCAL_PART:
        raise ValueError("invalid address %r: local part longer than %d characters"
                         % (addr[:QUOTE_CHARS], MAX_LOCAL_PART))
    if len(domain) > MAX_DOMAIN:   # IDNA never makes a name shorter
        raise ValueError("invalid address %r: domain longer than %d characters"
                         % (addr[:QUOTE_CHARS], MAX_DOMAIN))
    try:
        ascii_domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError("invalid address %r: bad domain" % addr) from exc
    if not local.isascii():
        raise ValueError("invalid address %r: a non-ASCII local part needs SMTPUTF8, "
                         "which asyncmail does not speak" % addr)
    if not _LOCAL_PART.fullmatch(local):
        raise ValueError("invalid address %r" % addr)
    if len(ascii_domain) > MAX_DOMAIN or not _DOMAIN.fullmatch(ascii_domain):
        raise ValueError("invalid address %r" % addr)
    if len(local) + 1 + len(ascii_domain) > MAX_ADDR_SPEC:
        raise ValueError("invalid address %r: longer than %d characters once encoded"
                         % (addr, MAX_ADDR_SPEC))
    return local + "@" + ascii_domain


def _is_quoted_string(text):
    """Whether ``text`` is exactly one RFC 5322 quoted-string: ``"..."`` with
    every inner ``"`` and ``\\`` escaped by a backslash.  One pass."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return False
    index, end = 1, len(text) - 1
    while index < end:
        if text[index] == "\\":
            index += 2
        elif text[index] == '"':
            return False
        else:
            index += 1
    return index == end   # a final backslash would have escaped the closing quote


def _format_address(name, addr):
    """``Name <addr>`` (name quoted when needed) or the bare address."""
    if not name:
        return addr
    if re.search(r'[()<>\[\]:;@\\,."]', name):
        name = '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')
    return "%s <%s>" % (name, addr)


def _parse_address(text):
    """Parse one ``addr``, ``<addr>`` or ``Name <addr>`` into (name, addr).

    The name is a quoted-string or text without ``<>"``.  Linear in the
    input, which is refused unparsed beyond MAX_ADDRESS_CHARS (it could not
    fit one header line).  Raises ValueError for anything else, including
    CR/LF (header injection).
    """
    if not isinstance(text, str):
        raise ValueError("address must be a string")
    if len(text) > MAX_ADDRESS_CHARS:
        raise ValueError("address %r... is longer than %d characters"
                         % (text[:40], MAX_ADDRESS_CHARS))
    if _CONTROL_CHARS.search(text):
        raise ValueError("address contains a control character (CR/LF?)")
    stripped = text.strip()
    opening = stripped.rfind("<")   # the address itself holds no < or >
    if stripped.endswith(">") and opening >= 0 and ">" not in stripped[opening:-1]:
        name = stripped[:opening].strip()
        if _is_quoted_string(name):
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        elif any(char in name for char in '<>"'):
            name = None
        if name is not None:
            addr = _check_addr_spec(stripped[opening + 1:-1].strip())
            if len(_format_address(name, addr)) > MAX_ADDRESS_CHARS:
                raise ValueError("address %r... is longer than %d characters once quoted"
                                 % (text[:40], MAX_ADDRESS_CHARS))
            return name, addr
    return "", _check_addr_spec(stripped)


def _parse_address_list(value, field):
    """Addresses from a list of strings or one comma-separated string.

    Returns a list of (name, addr); raises ValueError naming ``field``.
    """
    if isinstance(value, str):
        items = [part for part in _split_addresses(value) if part.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError("%s must be a list of addresses or a comma-separated string" % field)
    parsed = []
    for item in items:
        try:
            parsed.append(_parse_address(item))
        except ValueError as exc:
            raise ValueError("%s: %s" % (field, exc)) from exc
    return parsed


def _is_host(text):
    """A DNS name (IDNA allowed) or an IPv4/IPv6 address."""
    if len(text) > MAX_DOMAIN:   # before IDNA, which never makes a name shorter
        return False
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        pass
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return (bool(ascii_name) and len(ascii_name) <= MAX_DOMAIN
            and bool(_DOMAIN.fullmatch(ascii_name)) and not ascii_name.startswith("["))


def _is_loopback_host(host):
    """True for loopback names and addresses (127.0.0.0/8, ::1)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _redact_url(url):
    """The URL without user:password (safe for logs)."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += ":%d" % parts.port
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts._replace(query=""))


def _mask(key, value):
    """A printable value with secrets masked (and user-info cut from URLs)."""
    if key in _SECRET_KEYS and value:
        return "********"
    if isinstance(value, str) and "://" in value and "@" in value:
        return _redact_url(value)
    return value


def _ssl_context(account):
    """A client TLS context: verified against ``ca_file`` if the account
    names one, else the system store plus certifi when importable."""
    import ssl
    if account.get("ca_file"):
        context = ssl.create_default_context(cafile=account["ca_file"])
    else:
        context = ssl.create_default_context()
        try:
            import certifi
            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    if not account.get("tls_verify", True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _LazyTls:
    """The verified client TLS context (the system store plus certifi) that
    the reporter and the attachment fetcher share, built at its first use:
    loading the CAs costs milliseconds that a daemon which never speaks
    https should not pay at start-up.  Thread-safe (an SSLContext may be
    shared)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._context = None

    def get(self):
        with self._lock:
            if self._context is None:
                self._context = _ssl_context({"tls_verify": True})
            return self._context


def _prefix_end(prefix):
    """The least string greater than every string that starts with
    ``prefix`` (code-point order, which is SQLite's BINARY order of UTF-8),
    for an index range ``id >= prefix AND id < end``."""
    for index in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[index]) + 1
        if code == 0xD800:          # no surrogates in UTF-8
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:index] + chr(code)
    return "\U0010ffff" * (MAX_ID_CHARS + 1)   # longer than any id


_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _scoped(tenant, name):
    """The store key of ``name`` (a message id, an account id, a suppressed
    address) in ``tenant``: the bare name in the default tenant, else
    ``tenant<US>name`` (see TENANT_SEP)."""
    return name if tenant == DEFAULT_TENANT else tenant + TENANT_SEP + name


def _unscoped(key):
    """(tenant, name) of a store key made by ``_scoped``."""
    tenant, sep, name = key.partition(TENANT_SEP)
    return (tenant, name) if sep else (DEFAULT_TENANT, key)


def _tenant_of(key):
    return _unscoped(key)[0]


def _name_of(key):
    return _unscoped(key)[1]


def _tenant_range(tenant):
    """[low, high) of the store keys of a named tenant."""
    low = tenant + TENANT_SEP
    return low, _prefix_end(low)


def _shown_key(key):
    """A store key for a log line: ``tenant/name``, or the bare name."""
    return key.replace(TENANT_SEP, "/")


def _iso(ts):
    """Epoch seconds as ISO 8601 UTC, to the second."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _auth_headers(user=None, password=None, token=None):
    """The ``Authorization`` header of a client's credentials: bearer when
    there is a token, else basic when there is a user, else none."""
    if token:
        return {"Authorization": "Bearer " + token}
    if user:
        pair = "%s:%s" % (user, password or "")
        return {"Authorization": "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")}
    return {}


def _key_digest(key):
    """The SHA-256 (hex) of an API key: all that is kept of a tenant's key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


# -- Field parsers: one family for config keys, account fields, message
# fields and queries.  Each takes a value as it arrives (a JSON value, or the
# text of an ini file or a query) and returns it normalised, or raises
# ValueError saying what it must be; the caller names the field (ConfigError
# with its key, a 400 with its name).

_WHOLE_TEXT = re.compile(r"[+-]?[0-9]{1,19}")      # int() of this is bounded
_DECIMAL_TEXT = re.compile(r"[+-]?[0-9]{1,19}(?:\.[0-9]{1,9})?(?:[eE][+-]?[0-9]{1,3})?")


def _range_text(low, high, unit=""):
    if low is not None and high is not None:
        return " %g-%g%s" % (low, high, unit)
    if low is not None:
        return " of at least %g%s" % (low, unit)
    return " of at most %g%s" % (high, unit) if high is not None else ""


def _whole(low=None, high=None):
    """A whole number in [low, high] (None: unbounded): an int, not a bool,
    or its digits as text."""
    def parse(value):
        if isinstance(value, str) and _WHOLE_TEXT.fullmatch(value.strip()):
            value = int(value.strip())
        if (not isinstance(value, int) or isinstance(value, bool)
                or (low is not None and value < low) or (high is not None and value > high)):
            raise ValueError("must be a whole number%s" % _range_text(low, high))
        return value
    return parse


def _seconds(low=0, high=None, allow_zero=True, text=True):
    """A finite number of seconds in [low, high] (zero only with
    ``allow_zero``): a number, or (with ``text``) its decimal text."""
    def parse(value):
        if text and isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value.strip()):
            value = float(value.strip())
        if (not _is_number(value) or (isinstance(value, float) and not math.isfinite(value))
                or value < low or (high is not None and value > high)
                or (value == 0 and not allow_zero)):
            raise ValueError("must be %s seconds%s" % (
                "a number of" if allow_zero else "a positive number of",
                _range_text(low if low else None, high)))
        return value
    return parse


def _choice(*choices):
    """One of ``choices`` (text, compared lower-cased)."""
    def parse(value):
        word = str(value).strip().lower()
        if word not in choices:
            raise ValueError("must be %s" % " or ".join(choices))
        return word
    return parse


def _check_text(value, field, required=False, max_chars=None, single_line=False):
    """A string field: None when absent and optional; ValueError otherwise."""
    if value is None:
        if required:
            raise ValueError("%s is required" % field)
        return None
    if not isinstance(value, str):
        raise ValueError("%s must be a string" % field)
    if single_line and _CRLF.search(value):
        raise ValueError("%s must not contain CR or LF" % field)
    line_break = _LINE_BREAKS.search(value) if single_line else None
    if line_break:   # VT, FF, NEL, U+2028...: the email package refuses them too
        raise ValueError("%s must not contain a line break (U+%04X)"
                         % (field, ord(line_break.group())))
    control = _HEADER_CONTROLS.search(value) if single_line else None
    if control:      # they would reach the header raw: RFC 5322 has no place for them
        raise ValueError("%s must not contain a control character (U+%04X)"
                         % (field, ord(control.group())))
    if "\x00" in value:
        raise ValueError("%s must not contain NUL" % field)
    if max_chars is not None and len(value) > max_chars:
        raise ValueError("%s is longer than %d characters" % (field, max_chars))
    return value


def _check_identifier(value, field):
    """An id: 1-256 characters, no control characters."""
    if not isinstance(value, str) or not value:
        raise ValueError("%s must be a non-empty string" % field)
    if len(value) > MAX_ID_CHARS:
        raise ValueError("%s is longer than %d characters" % (field, MAX_ID_CHARS))
    if _CONTROL_CHARS.search(value):
        raise ValueError("%s must not contain control characters" % field)
    return value


_EPOCH = _seconds(0, LATEST_TS, text=False)     # a JSON number of epoch seconds
_EPOCH_TEXT = _seconds(0, LATEST_TS)             # ... or, in a query, its text


def _check_timestamp(value, field):
    """An epoch timestamp field (a JSON number, 0..LATEST_TS) or None."""
    if value is None:
        return None
    try:
        return _EPOCH(value)
    except ValueError as exc:
        raise ValueError("%s must be epoch seconds (a number between 0 and %d)"
                         % (field, LATEST_TS)) from exc


# ####################################################################### #
# ###########################  Configuration  ########################### #
# ####################################################################### #

def _conf_str(value):
    return str(value)


def _conf_delays(value):
    """retry_delays: a comma list (or a list) of seconds, at least one."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [item for item in str(value).split(",") if item.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of seconds")
    parse = _seconds()
    return tuple(parse(item) for item in items)


def _conf_level(value):
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _conf_url(value):
    """An http(s) URL with a host and no credentials in it (the sync URL,
    the S3 endpoint), or empty."""
    url = str(value).strip()
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        if "@" in parts.netloc:
            raise ValueError("credentials do not belong in the URL (they would reach "
                             "logs); use client_sync_user/client_sync_password or "
                             "client_sync_token")
        try:
            parts.port
        except ValueError as exc:
            raise ValueError("invalid port") from exc
    return url


class _FixedOffset(datetime.tzinfo):
    """A fixed UTC offset, the zone 3.8 can offer without zoneinfo."""

    def __init__(self, minutes, name):
        self._offset = datetime.timedelta(minutes=minutes)
        self._name = name

    def utcoffset(self, dt):
        return self._offset

    def dst(self, dt):
        return datetime.timedelta(0)

    def tzname(self, dt):
        return self._name


def _conf_timezone(value):
    """A time zone for the sending window: UTC, a fixed offset (+02:00), or (Python 3.9+) an
    IANA name."""
    name = str(value).strip() or "UTC"
    if name.upper() in ("UTC", "Z", "GMT"):
        return _FixedOffset(0, "UTC")
    offset = re.fullmatch(r"(?:UTC)?([+-])([0-9]{2}):?([0-9]{2})", name)
    if offset:
        minutes = int(offset.group(2)) * 60 + int(offset.group(3))
        if minutes > 18 * 60:
            raise ValueError("offset out of range")
        return _FixedOffset(minutes if offset.group(1) == "+" else -minutes, name)
    if _zoneinfo is None:
        raise ValueError("named zones need Python 3.9+ (zoneinfo); "
                         "on this Python use UTC or a fixed offset like +02:00")
    try:
        return _zoneinfo.ZoneInfo(name)
    except (ValueError, _zoneinfo.ZoneInfoNotFoundError) as exc:
        raise ValueError("unknown time zone %r" % name) from exc


class SendingWindow:
    """``DAYS HH:MM-HH:MM``: the days and hours when priorities 2-3 may go.

    An end before the start wraps past midnight and belongs to the start day
    (``fri 22:00-06:00`` covers Saturday 03:00); equal start and end mean the
    whole day.
    """

    def __init__(self, days, start, end, text):
        self.days, self.start, self.end, self.text = days, start, end, text

    @classmethod
    def parse(cls, text):
        """A window from its text, or None for an empty text; ValueError if bad."""
        text = str(text).strip()
        if not text:
            return None
        match = re.fullmatch(
            r"(\S+)\s+([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})", text)
        if not match:
            raise ValueError("expected 'DAYS HH:MM-HH:MM', e.g. 'mon-fri 08:00-18:00'")
        days = set()
        for part in match.group(1).lower().split(","):
            first, _, last = part.partition("-")
            if first not in _DAY_NAMES or (last and last not in _DAY_NAMES):
                raise ValueError("unknown day in %r (use mon..sun)" % part)
            begin, stop = _DAY_NAMES.index(first), _DAY_NAMES.index(last or first)
            day = begin
            while True:
                days.add(day)
                if day == stop:
                    break
                day = (day + 1) % 7
        hours = [int(match.group(i)) for i in (2, 3, 4, 5)]
        if hours[0] > 23 or hours[2] > 24 or hours[1] > 59 or hours[3] > 59:
            raise ValueError("bad time of day in %r" % text)
        return cls(frozenset(days), hours[0] * 60 + hours[1], hours[2] * 60 + hours[3], text)

    def contains(self, moment):
        """Whether the aware datetime ``moment`` falls inside the window."""
        minute = moment.hour * 60 + moment.minute
        day = moment.weekday()
        if self.start == self.end:
            return day in self.days
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


def _conf_window(value):
    return SendingWindow.parse(value)


def _conf_address(value):
    """An addr-spec (the VERP base address), or empty."""
    text = str(value).strip()
    if text:
        _check_addr_spec(text)
        if "+" in text.rpartition("@")[0]:
            raise ValueError("the VERP base address must not contain '+' (it separates the token)")
    return text


# (section, key) -> (parser, default as written in config.ini)
CONFIG_SCHEMA = {
    ("storage", "db_path"): (_conf_str, "asyncmail.db"),
    ("server", "host"): (_conf_str, "127.0.0.1"),
    ("server", "port"): (_whole(0, 65535), "8000"),
    ("server", "api_token"): (_conf_str, ""),
    ("server", "max_request_bytes"): (_whole(1024), "33554432"),
    ("client", "client_sync_url"): (_conf_url, ""),
    ("client", "client_sync_user"): (_conf_str, ""),
    ("client", "client_sync_password"): (_conf_str, ""),
    ("client", "client_sync_token"): (_conf_str, ""),
    ("client", "batch_size"): (_whole(1), "1000"),
    ("client", "timeout_seconds"): (_seconds(allow_zero=False), "30"),
    ("client", "sync_interval_seconds"): (_seconds(allow_zero=False), "300"),
    ("scheduler", "active"): (_parse_bool, "true"),
    ("scheduler", "timezone"): (_conf_timezone, "UTC"),
    ("scheduler", "window"): (_conf_window, ""),
    ("delivery", "send_interval_seconds"): (_seconds(allow_zero=False), "1"),
    ("delivery", "test_mode"): (_parse_bool, "false"),
    ("delivery", "default_priority"): (_parse_priority, "2"),
    ("delivery", "delivery_report_retention_seconds"): (_seconds(), "604800"),
    ("delivery", "max_retries"): (_whole(0), "5"),
    ("delivery", "retry_delays"): (_conf_delays, "60,300,900,3600,7200"),
    ("delivery", "max_workers"): (_whole(1, 256), "4"),
    ("delivery", "smtp_timeout_seconds"): (_seconds(allow_zero=False), "30"),
    ("delivery", "default_account"): (_conf_str, ""),
    ("attachments", "max_bytes"): (_whole(1), "26214400"),
    ("attachments", "timeout_seconds"): (_seconds(allow_zero=False), "30"),
    ("attachments", "allow_private_urls"): (_parse_bool, "false"),
    ("s3", "region"): (_conf_str, "us-east-1"),
    ("s3", "endpoint_url"): (_conf_url, ""),
    ("s3", "access_key_id"): (_conf_str, ""),
    ("s3", "secret_access_key"): (_conf_str, ""),
    ("s3", "session_token"): (_conf_str, ""),
    ("bounces", "imap_host"): (_conf_str, ""),
    ("bounces", "imap_port"): (_whole(1, 65535), "993"),
    ("bounces", "imap_ssl"): (_parse_bool, "true"),
    ("bounces", "imap_plain"): (_parse_bool, "false"),
    ("bounces", "imap_tls_verify"): (_parse_bool, "true"),
    ("bounces", "imap_ca_file"): (_conf_str, ""),
    ("bounces", "imap_user"): (_conf_str, ""),
    ("bounces", "imap_password"): (_conf_str, ""),
    ("bounces", "folder"): (_conf_str, "INBOX"),
    ("bounces", "poll_interval_seconds"): (_seconds(allow_zero=False), "60"),
    ("bounces", "verp_address"): (_conf_address, ""),
    ("bounces", "after"): (_choice("mark_seen", "delete"), "mark_seen"),
    ("bounces", "suppress_days"): (_seconds(), "30"),
    ("logging", "level"): (_conf_level, "INFO"),
    ("logging", "delivery_activity"): (_parse_bool, "false"),
    ("logging", "format"): (_choice("text", "json"), "text"),
}

_S3_ENV_FALLBACK = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "region": "AWS_REGION",
}


class _Section:
    """Read-only attribute view of one configuration section."""

    def __init__(self, values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError("configuration is read-only")


class Config:
    """The effective configuration: ``config.delivery.max_retries`` and so on.

    Build it with ``Config(overrides)`` where ``overrides`` maps section ->
    key -> value (strings as in the ini file, or already typed values);
    everything not given takes its default.  Raises ConfigError naming
    ``section.key`` for unknown keys and bad values.
    """

    def __init__(self, overrides=None, state_directory=None, sources=()):
        """``sources`` says where the overrides came from (for
        ``--check-config``): lines such as ``file /etc/asyncmail/config.ini``."""
        self.sources = tuple(sources)
        raw = {key: default for key, (_, default) in CONFIG_SCHEMA.items()}
        for section, values in (overrides or {}).items():
            if not isinstance(values, dict):
                raise ConfigError("expected a mapping of keys", key=section)
            for key, value in values.items():
                if (section, key) not in CONFIG_SCHEMA:
                    raise ConfigError("unknown setting", key="%s.%s" % (section, key))
                raw[(section, key)] = value
        typed = {}
        for (section, key), value in raw.items():
            parser = CONFIG_SCHEMA[(section, key)][0]
            try:
                typed[(section, key)] = parser(value)
            except (ValueError, TypeError, OverflowError) as exc:
                raise ConfigError("bad value %r: %s" % (_mask(key, value), exc),
                                  key="%s.%s" % (section, key)) from exc
        db_path = typed[("storage", "db_path")]
        if state_directory and not os.path.isabs(db_path):
            typed[("storage", "db_path")] = os.path.join(state_directory, db_path)
        self._raw = raw
        for section in sorted({s for s, _ in CONFIG_SCHEMA}):
            setattr(self, section, _Section(
                {k: v for (s, k), v in typed.items() if s == section}))
        host = self.server.host
        if not _is_loopback_host(host) and not self.server.api_token:
            raise ConfigError("a non-loopback host (%r) needs server.api_token" % host,
                              key="server.api_token")

    def describe(self):
        """``[(section, key, printable value)]`` with secrets masked."""
        rows = []
        for section, key in CONFIG_SCHEMA:
            value = getattr(getattr(self, section), key)
            if isinstance(value, tuple):
                value = ",".join("%g" % v for v in value)
            elif isinstance(value, SendingWindow):
                value = value.text
            elif isinstance(value, datetime.tzinfo):
                value = str(self._raw[(section, key)]) or "UTC"
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, float):
                value = "%g" % value
            rows.append((section, key, _mask(key, "" if value is None else str(value))))
        return rows


# whitespace then ";" or "#": what an ini reader that knows inline comments cuts
_INLINE_COMMENT = re.compile(r"\s[;#]")


def load_config(path=None, environ=None):
    """The configuration from the ini file and the environment.

    The file is ``path``, else ``$ASYNC_MAIL_CONFIG``, else ``config.ini`` in
    the working directory (missing: all defaults; a named file that is missing
    is an error).  Files ``<section>.<key>`` in ``$CREDENTIALS_DIRECTORY``
    (systemd LoadCredential=) win over the file, and
    ``ASYNC_MAIL_<SECTION>_<KEY>`` variables win over both;
    ``[s3]`` credentials fall back to the standard ``AWS_*`` variables.
    Raises ConfigError.
    """
    import configparser
    environ = os.environ if environ is None else environ
    named = path or environ.get("ASYNC_MAIL_CONFIG")
    path = named or "config.ini"
    overrides, sources = {}, []
    if os.path.exists(path):
        sources.append("file %s" % os.path.abspath(path))
        parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
        parser.optionxform = str
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError("cannot read %s: %s" % (path, exc)) from exc
        known_sections = {s for s, _ in CONFIG_SCHEMA}
        for section in parser.sections():
            if section not in known_sections:
                raise ConfigError("unknown section in %s" % path, key=section)
            for key, value in parser.items(section):
                if (section, key) not in CONFIG_SCHEMA:
                    raise ConfigError("unknown setting in %s" % path,
                                      key="%s.%s" % (section, key))
                if _INLINE_COMMENT.search(value):
                    # configparser keeps "x ; note" as the value: refuse it rather
                    # than cut a secret that holds " ;" or " #" without a word
                    raise ConfigError(
                        "in %s the value holds an inline comment (%r): put comments on "
                        "lines of their own (a value with ' ;' or ' #' in it can come "
                        "from the environment or a credential)"
                        % (path, _mask(key, value)), key="%s.%s" % (section, key))
                overrides.setdefault(section, {})[key] = value
    elif named:
        raise ConfigError("configuration file %s does not exist" % path)
    else:
        sources.append("no file (%s does not exist: defaults)" % os.path.abspath(path))
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.isdir(credentials):
        # systemd LoadCredential=section.key:/path: secrets outside config.ini
        for name in sorted(os.listdir(credentials)):
            section, _, key = name.partition(".")
            if (section, key) in CONFIG_SCHEMA:
                try:
                    with open(os.path.join(credentials, name), encoding="utf-8") as handle:
                        overrides.setdefault(section, {})[key] = handle.read().rstrip("\r\n")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError("cannot read credential %s: %s" % (name, exc),
                                      key=name) from exc
                sources.append("credential %s (%s)" % (name, credentials))
    env_names = {"ASYNC_MAIL_%s_%s" % (s.upper(), k.upper()): (s, k) for s, k in CONFIG_SCHEMA}
    for name, value in environ.items():
        if not name.startswith("ASYNC_MAIL_") or name == "ASYNC_MAIL_CONFIG":
            continue
        if name not in env_names:
            raise ConfigError("unknown environment variable %s" % name, key=name)
        section, key = env_names[name]
        overrides.setdefault(section, {})[key] = value
        sources.append("environment %s" % name)
    for key, variable in _S3_ENV_FALLBACK.items():
        if key not in overrides.get("s3", {}) and environ.get(variable):
            overrides.setdefault("s3", {})[key] = environ[variable]
            sources.append("environment %s (s3.%s)" % (variable, key))
    return Config(overrides, state_directory=environ.get("STATE_DIRECTORY"),
                  sources=sources)


# ####################################################################### #
# ##########################  Store (SQLite)  ########################### #
# ####################################################################### #

class MessageKey(collections.namedtuple("MessageKey", "pk ref account_id priority")):
    """A message as outcomes and report events name it: ``pk`` its row,
    ``ref`` the id its client gave it (never the RFC Message-ID, which is in
    the payload)."""

    __slots__ = ()


class Claim(collections.namedtuple(
        "Claim", MessageKey._fields + ("retry_count", "payload", "recipients", "created_ts"))):
    """A message claimed for delivery (status ``sending``): its key fields,
    ``retry_count`` so far, ``payload`` (the normalised message as JSON), and
    for the delivery log its ``recipients`` (the To addresses as JSON) and
    ``created_ts``."""

    __slots__ = ()

    def message(self):
        """The normalised message this claim is for (its payload decoded)."""
        return json.loads(self.payload)


class Attempt(collections.namedtuple("Attempt", "ts duration relay code text refused")):
    """One delivery attempt for the message's history: when, how long, over
    which relay (host:port), the SMTP reply code and text, and the
    recipients refused while others were accepted."""

    __slots__ = ()


class Outcome(collections.namedtuple(
        "Outcome", "kind claim ts until reason error retry_count refused attempt account_down")):
    """What became of one claimed message, made by the constructors below
    and applied by Store.record_outcomes in one place.

    ``kind``: ``sent`` (at ``ts``, ``refused`` recipients), ``error``
    (failed for good, made by ``failed``), ``deferred`` (until ``until`` for
    ``reason``, with
    ``error`` and the new ``retry_count``) or ``released`` (back to pending,
    never attempted).  ``attempt`` is the Attempt behind it, if any;
    ``account_down`` says the relay itself failed, so the account's other
    messages wait (the dispatcher's business, not the store's).
    """

    __slots__ = ()
    # the message's status that each kind leaves (released: back to pending),
    # and an attempt's ``outcome`` in the history
    KINDS = ("sent", "error", "deferred", "released")

    @classmethod
    def sent(cls, claim, ts, refused=None, attempt=None):
        return cls("sent", claim, ts, None, None, None, None, refused or None, attempt, False)

    @classmethod
    def failed(cls, claim, ts, error, attempt=None):
        return cls("error", claim, ts, None, None, error, None, None, attempt, False)

    @classmethod
    def deferred(cls, claim, ts, until, reason, error=None, retry_count=None, attempt=None):
        retries = claim.retry_count if retry_count is None else retry_count
        return cls("deferred", claim, ts, until, reason, error, retries, None, attempt, False)

    @classmethod
    def released(cls, claim):
        return cls("released", claim, None, None, None, None, None, None, None, False)


class SentMessage(collections.namedtuple("SentMessage", "key sent_ts recipients")):
    """A sent message as a bounce finds it: its MessageKey, when it was sent,
    and its envelope recipients lower-cased (a set)."""

    __slots__ = ()


class Selector(collections.namedtuple("Selector", "kind value")):
    """What an operator command acts on (SPEC 7): ``ids`` (a list of ids, or
    of store keys once scoped), ``account_id``, ``status``, or ``all``
    (value None)."""

    __slots__ = ()
    KINDS = ("ids", "account_id", "status", "all")


class Verp(collections.namedtuple("Verp", "base key")):
    """VERP envelope senders: ``base`` (``[bounces] verp_address``) and the
    database's secret ``key`` for the tokens."""

    __slots__ = ()


class IntakeRow(collections.namedtuple(
        "IntakeRow", "key account_key priority status created_ts deferred_ts subject"
        " recipients rfc_message_id payload tenant batch_code")):
    """One accepted message as Store.insert_messages stores it, in
    SQL_INSERT_MESSAGE order: ``key`` and ``account_key`` are store keys
    (see ``_scoped``), ``payload`` the normalised message as JSON."""

    __slots__ = ()

    @classmethod
    def of(cls, message, tenant, now):
        """The row of a message as validate_message normalised it, accepted
        at ``now`` into ``tenant``: deferred while its ``deferred_ts`` is
        ahead, else pending."""
        deferred_ts = message["deferred_ts"]
        status = "deferred" if deferred_ts is not None and deferred_ts > now else "pending"
        recipients = [_format_address(*pair) for pair in message["to"]]
        return cls(_scoped(tenant, message["id"]), _scoped(tenant, message["account_id"]),
                   message["priority"], status, now, deferred_ts, message["subject"],
                   json.dumps(recipients), message["message_id"],
                   json.dumps(message, separators=(",", ":")), tenant, message["batch_code"])


class _IntakeRequest:
    """One add-messages batch waiting for a group commit."""

    __slots__ = ("rows", "duplicates", "orphans", "replaced", "error", "done")

    def __init__(self, rows):
        self.rows, self.duplicates, self.orphans, self.replaced = rows, set(), set(), set()
        self.error, self.done = None, False


class Store:
    """The SQLite queue.  All SQL of asyncmail runs through this class.

    Connections: a pool of at most STORE_CONNECTIONS, one checked out per
    operation (never two by one thread at once), so any thread may call any
    method; SQLite's own locking (WAL, a busy timeout,
    ``BEGIN IMMEDIATE`` for every write) serialises writers.  Intake commits
    with ``synchronous=FULL`` (a 200 means the batch is on disk); delivery
    bookkeeping commits with ``synchronous=NORMAL``: a power cut can only roll
    those back to an earlier state, which at-least-once delivery tolerates.

    Every ``sqlite3.Error`` is turned into StoreError here and nowhere else.
    """

    def __init__(self, path, reporting=True):
        """Open (creating and migrating) the database at ``path``.  With
        ``reporting`` false no report events are kept and finished messages
        count as reported at once.  Raises StoreError."""
        self.path = path
        self.reporting = reporting
        self._pool = queue.LifoQueue()
        self._all = []
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        # each connection has its own page cache: bound them, not the threads
        self._slots = threading.BoundedSemaphore(STORE_CONNECTIONS)
        self._intake_leader = threading.Lock()
        self._intake = []
        # This process's claimed messages by pk (see claim and begin_send):
        # what a delete may still stop, and what it must leave to the relay.
        self._claims = {}
        self._claims_lock = threading.Lock()
        self._suppression_count = None   # rows in suppressions; None: count again
        self._closed = False
        self._lock_fd = None
        if path != ":memory:":
            self._lock_fd = self._take_lock(path)
            try:
                self._create_private_file(path)
            except StoreError:
                self.close()
                raise
        try:
            with self._connection() as conn:
                self._migrate(conn)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _take_lock(path):
        """Hold ``<path>.lock`` (flock, exclusive) for the store's life and
        write this process's pid in it, as Postfix's master.lock: a second
        daemon on the same database would "recover" the first one's claims
        and send them again.  Returns the lock's descriptor; raises
        AlreadyRunningError, or StoreError when the file cannot be made (a
        missing directory is never created: a mistyped db_path must not
        start on an empty queue)."""
        lock_path = path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError("cannot create %s: %s" % (lock_path, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = None
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).split()[0])
            os.close(fd)
            raise AlreadyRunningError("database %s is in use: asyncmail is already running "
                                      "(pid %s)" % (path, pid if pid else "unknown"), pid) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return fd

    @staticmethod
    def _create_private_file(path):
        """Create the database file mode 0600 before SQLite opens it (SQLite
        gives its -wal and -shm files the same mode)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StoreError("cannot create database %s: %s" % (path, exc)) from exc

    @contextlib.contextmanager
    def _connection(self, durable=True):
        """Check a connection out of the pool for one operation."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self._slots.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000.0):
            raise StoreError("no database connection free")
        try:
            try:
                conn, mode = self._pool.get_nowait()
            except queue.Empty:
                conn, mode = self._open_connection(), "FULL"
            wanted = "FULL" if durable else "NORMAL"
            if mode != wanted:
                conn.execute("PRAGMA synchronous = " + wanted)
                mode = wanted
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.rollback()
                self._pool.put((conn, mode))
        except sqlite3.Error as exc:
            raise StoreError("database error: %s" % exc) from exc
        finally:
            self._slots.release()

    def _open_connection(self):
        """A new pooled connection: WAL, the busy timeout, FULL sync (the intake's)."""
        conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000.0,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = %d" % SQLITE_BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self, durable=True):
        """A write transaction (BEGIN IMMEDIATE): commits on success, rolls
        back on any exception.

        Writers of this process queue on ``_writer`` first.  SQLite admits one
        writer at a time anyway, but its busy handler makes the others
        sleep-poll with growing back-off: under many concurrent writers some
        waited seconds (p99 1.3 s at 64 clients).  A queue wakes the next
        writer the moment the last one commits.
        """
        # the lock before a connection: writers waiting their turn must not
        # hold the pooled connections that readers need meanwhile
        with self._writer, self._connection(durable) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def _migrate(self, conn):
        """Bring the schema to SCHEMA_VERSION, one version step per
        transaction, keeping every row.  A newer database is refused."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError("database %s has schema version %d; this asyncmail "
                             "knows up to %d" % (self.path, version, SCHEMA_VERSION))
        steps = {1: SQL_SCHEMA_V1, 2: SQL_SCHEMA_V2, 3: SQL_SCHEMA_V3, 4: SQL_SCHEMA_V4,
                 5: SQL_SCHEMA_V5, 6: SQL_SCHEMA_V6}
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            for statement in steps[target]:
                conn.execute(statement)
            conn.execute("PRAGMA user_version = %d" % target)
            conn.commit()

    def close(self):
        """Close every connection and release the lock file; later calls
        raise StoreError."""
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
            lock_fd, self._lock_fd = self._lock_fd, None
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if lock_fd is not None:
            os.close(lock_fd)    # releases the flock

    # -- intake -------------------------------------------------------------

    def insert_messages(self, messages, now, tenant=DEFAULT_TENANT):
        """Insert messages durably, skipping ids that are already queued.

        ``messages`` are what validate_message returns, no id twice, for
        ``tenant`` at ``now``; they are stored as IntakeRows.  Returns (keys already
        present, keys whose account was deleted meanwhile, keys that replaced
        a failed message): the first two are not inserted.  A key whose
        message ended in error is a new attempt: the failed row, its history
        and its unsent events make room for the new one.  Raises StoreError;
        blocks until the rows are committed.

        Group commit: concurrent callers share one transaction and one fsync.
        Whoever holds ``_intake_leader`` commits every request queued so far;
        the others find theirs done when they get the mutex.
        """
        request = _IntakeRequest([IntakeRow.of(m, tenant, now) for m in messages])
        with self._lock:
            self._intake.append(request)
        with self._intake_leader:
            if not request.done:
                with self._lock:
                    group, self._intake = self._intake, []
                self._commit_intake(group)
        if request.error is not None:
            raise request.error
        return request.duplicates, request.orphans, request.replaced

    def _commit_intake(self, group):
        """Commit every request of ``group`` in one transaction; each gets
        its duplicates, orphans and replacements, or the error that failed
        them all.  Whatever ends it, no request is left looking committed
        when it is not."""
        committed = False
        try:
            with self._transaction(durable=True) as conn:
                keys = [row.key for request in group for row in request.rows]
                taken, failed = set(), {}
                for start in range(0, len(keys), SQL_CHUNK):
                    chunk = keys[start:start + SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    taken.update(row[0] for row in conn.execute(
                        SQL_EXISTING_IDS.format(marks=marks), chunk))
                    if taken:
                        failed.update((key, pk) for pk, key in conn.execute(
                            SQL_FAILED_KEYS.format(marks=marks), chunk))
                accounts = {row[0] for row in conn.execute(SQL_ACCOUNT_IDS)}
                inserts, replaced = [], []
                for request in group:
                    for row in request.rows:
                        if row.account_key not in accounts:   # deleted since validation
                            request.orphans.add(row.key)
                        elif row.key in failed:
                            replaced.append(failed.pop(row.key))
                            request.replaced.add(row.key)
                            inserts.append(row)
                        elif row.key in taken:
                            request.duplicates.add(row.key)
                        else:
                            taken.add(row.key)
                            inserts.append(row)
                for start in range(0, len(replaced), SQL_CHUNK):
                    chunk = replaced[start:start + SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(SQL_DELETE_EVENTS_OF.format(marks=marks), chunk)
                    conn.execute(SQL_DELETE_PKS.format(marks=marks), chunk)
                conn.executemany(SQL_INSERT_MESSAGE, inserts)
            committed = True
        except Exception as exc:
            # every request of the group failed with its transaction: each
            # caller raises it (a StoreError is a 503; anything else is a bug,
            # logged with its traceback where the request is handled)
            for request in group:
                request.error = exc
            if not isinstance(exc, StoreError):
                raise
        finally:
            for request in group:
                if not committed and request.error is None:   # KeyboardInterrupt...
                    request.error = StoreError("intake interrupted before its commit")
                request.done = True

    # -- reading ------------------------------------------------------------

    @staticmethod
    def _record(row):
        """A message record; ``payload`` is the normalised message (a dict)
        for the caller to present, ``updated_ts`` the time of its last change."""
        record = dict(zip(("id", "account_id", "priority", "status", "created_ts",
                           "deferred_ts", "sent_ts", "error_ts", "error", "retry_count",
                           "reported_ts", "subject", "to", "refused", "updated_ts",
                           "tenant_id", "batch_code", "payload"), row))
        record["to"] = json.loads(record["to"])
        record["refused"] = json.loads(record["refused"]) if record["refused"] else None
        record["payload"] = json.loads(record["payload"])
        if record["updated_ts"] is None:
            record["updated_ts"] = record["created_ts"]
        return record

    def get_message(self, key):
        """The record of one message, or None."""
        with self._connection() as conn:
            row = conn.execute(SQL_GET_MESSAGE, (key,)).fetchone()
        return self._record(row) if row else None

    @staticmethod
    def listing_query(statuses, account_id=None, since=None, until=None, id_prefix=None,
                      order="oldest", after=None, limit=1000, offset=0, tenant=None,
                      batch_code=None, columns=SQL_LIST_COLUMNS):
        """(sql, parameters) of one page of GET /messages: the messages in
        ``statuses`` (created in [since, until)) in (created_ts, pk) order,
        or in id order with ``id_prefix``; ``after`` is the keyset cursor
        (created_ts, pk), or an id with ``id_prefix``.  ``tenant`` (None:
        every tenant) narrows to one tenant; ``account_id`` and ``id_prefix``
        are store keys, so they name a tenant already.  Every combination is
        served from an index (the store tests pin the plans).  ``columns``:
        what each row holds (a search reads only SQL_SEARCH_COLUMNS)."""
        if account_id is not None:
            tenant = None    # the account's key holds its tenant
        if id_prefix is not None:
            marks = ",".join("?" * len(statuses))
            sql = SQL_LIST_BY_ID.format(columns=columns, marks=marks)
            params = [id_prefix, _prefix_end(id_prefix)] + list(statuses)
            for clause, value in ((SQL_LIST_BY_ID_TENANT, tenant),
                                  (SQL_LIST_BY_ID_ACCOUNT, account_id),
                                  (SQL_LIST_BATCH, batch_code),
                                  (SQL_LIST_SINCE, since), (SQL_LIST_UNTIL, until),
                                  (SQL_LIST_BY_ID_AFTER[order], after)):
                if value is not None:
                    sql += clause
                    params.append(value)
            return sql + SQL_LIST_BY_ID_ORDER[order], params + [limit, offset]
        arms, params = [], []
        for status in statuses:
            arm, arm_params = SQL_LIST_ARM.format(columns=columns), [status]
            for clause, value in ((SQL_LIST_TENANT, tenant), (SQL_LIST_ACCOUNT, account_id),
                                  (SQL_LIST_BATCH, batch_code), (SQL_LIST_SINCE, since),
                                  (SQL_LIST_UNTIL, until)):
                if value is not None:
                    arm += clause
                    arm_params.append(value)
            if after is not None:
                arm += SQL_LIST_AFTER[order]
                arm_params.extend(after)
            arms.append(arm)
            params.extend(arm_params)
        return " UNION ALL ".join(arms) + SQL_LIST_ORDER[order], params + [limit, offset]

    def list_messages(self, statuses, **query):
        """One page of records (see ``listing_query``); each record also
        carries ``pk`` for the caller's cursor."""
        sql, params = self.listing_query(statuses, **query)
        with self._connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        records = []
        for row in rows:
            record = self._record(row[1:])
            record["pk"] = row[0]
            records.append(record)
        return records

    def search_messages(self, statuses, text, **query):
        """A search within one SEARCH_WINDOW of the listing (``query`` as for
        ``listing_query``): (the records whose subject, To addresses or id
        hold ``text``, at most ``limit``; the last record of a full window,
        where a next search goes on from, or None when the listing ended)."""
        limit, offset = query.pop("limit", 1000), query.pop("offset", 0)
        listing, params = self.listing_query(statuses, limit=SEARCH_WINDOW, offset=offset,
                                             columns=SQL_SEARCH_COLUMNS, **query)
        by = "id" if query.get("id_prefix") is not None else "time"
        sql = (SQL_SEARCH.format(listing=listing)
               + SQL_SEARCH_ORDER[(by, query.get("order", "oldest"))])
        edge, edge_params = self.listing_query(statuses, limit=1,
                                               offset=offset + SEARCH_WINDOW - 1,
                                               columns=SQL_SEARCH_COLUMNS, **query)
        with self._connection() as conn:
            found = [row[0] for row in conn.execute(sql, params + [text, text, text, limit])]
            last = conn.execute(edge, edge_params).fetchone()
            rows = {}
            for start in range(0, len(found), 500):   # within any SQLite's 999 variables
                part = found[start:start + 500]
                rows.update((row[0], row) for row in conn.execute(
                    SQL_RECORDS_BY_PK.format(marks=",".join("?" * len(part))), part))
        records = []
        for pk in found:
            if pk in rows:     # (deleted between the two reads: left out)
                record = self._record(rows[pk][1:])
                record["pk"] = pk
                records.append(record)
        edge_record = None if last is None else {"pk": last[0], "id": last[1],
                                                 "created_ts": last[2]}
        return records, edge_record

    def account_depth(self, key, statuses, cap):
        """``{status: n}`` of one account's messages, each n at most ``cap``."""
        with self._connection() as conn:
            return {status: conn.execute(SQL_ACCOUNT_DEPTH, (status, key, cap)).fetchone()[0]
                    for status in statuses}

    def attempts(self, key):
        """The SMTP attempts recorded for a message, oldest first."""
        keys = ("ts", "duration", "relay", "outcome", "code", "text", "refused")
        with self._connection() as conn:
            rows = conn.execute(SQL_MESSAGE_ATTEMPTS, (key,)).fetchall()
        attempts = [dict(zip(keys, row)) for row in rows]
        for attempt in attempts:
            attempt["refused"] = json.loads(attempt["refused"]) if attempt["refused"] else None
        return attempts

    def queue_counts(self, tenant=None):
        """``{status: n}`` of one tenant (None: of them all) from the
        trigger-maintained counters (no row scan)."""
        counts = dict.fromkeys(STATUSES, 0)
        for name, by_status in self.tenant_queue_counts().items():
            if tenant is None or name == tenant:
                for status, n in by_status.items():
                    counts[status] = counts.get(status, 0) + n
        return counts

    def tenant_queue_counts(self):
        """``{tenant: {status: n}}`` from the counters."""
        with self._connection() as conn:
            rows = conn.execute(SQL_QUEUE_COUNTS).fetchall()
        counts = {}
        for tenant, status, n in rows:
            counts.setdefault(tenant, {})[status] = n
        return counts

    def event_backlog(self):
        """``{tenant: report events not yet acknowledged}``."""
        with self._connection() as conn:
            return dict(conn.execute(SQL_EVENT_BACKLOG).fetchall())

    def oldest_active_created_ts(self):
        """created_ts of the oldest unfinished message, or None (index seeks)."""
        with self._connection() as conn:
            found = [conn.execute(SQL_OLDEST_ACTIVE, (status,)).fetchone()[0]
                     for status in ACTIVE_STATUSES]
        found = [ts for ts in found if ts is not None]
        return min(found) if found else None

    # -- deletion -----------------------------------------------------------

    def delete_messages(self, keys):
        """Delete messages by store key, with their unsent report events; each
        is reported as deleted (``"status": "deleted"``).

        A claimed message that is deleted is never sent (begin_send refuses
        it).  One whose SMTP transaction has begun cannot be called back: it
        goes when that transaction ends, unless the relay accepted it (then
        it is sent, and reported so); a temporary failure never brings it
        back.  Returns (keys not found, keys on the wire).
        """
        with self._transaction(durable=True) as conn:
            existing, being_sent = set(), []
            for start in range(0, len(keys), SQL_CHUNK):
                chunk = keys[start:start + SQL_CHUNK]
                rows = conn.execute(SQL_DELETE_KEYS.format(
                    marks=",".join("?" * len(chunk))), chunk).fetchall()
                existing.update(row[1] for row in rows)
                being_sent.extend(self._delete_rows(conn, [MessageKey(*row) for row in rows]))
        return [key for key in keys if key not in existing], being_sent

    def delete_selected(self, kind, value, tenant=None):
        """Delete the messages a selector names (("account_id", key),
        ("status", s) or ("all", None): with the last, the messages not yet
        sent or failed) of ``tenant`` (None: every tenant), PURGE_BATCH per
        transaction, as ``delete_messages`` does.  Returns (how many were
        deleted, keys on the wire).  Raises ValueError for another kind."""
        if kind == "status":
            statuses, where, args = [value], "", []
        elif kind == "account_id":
            statuses, where, args = ACTIVE_STATUSES, " AND account_id = ?", [value]
        elif kind == "all":
            statuses, where, args = ACTIVE_STATUSES, "", []
        else:
            raise ValueError("unknown selector kind %r" % (kind,))
        if tenant is not None and kind != "account_id":
            where, args = where + " AND tenant = ?", args + [tenant]
        sql = SQL_DELETE_SELECTED.format(where=where)
        removed, being_sent = 0, []
        for status in statuses:
            after = (-1.0, -1)
            while True:
                with self._transaction(durable=True) as conn:
                    rows = conn.execute(sql, [status] + args + list(after)
                                        + [PURGE_BATCH]).fetchall()
                    if rows:
                        on_wire = self._delete_rows(conn, [MessageKey(*r[:4]) for r in rows])
                        removed += len(rows) - len(on_wire)
                        being_sent.extend(on_wire)
                if len(rows) < PURGE_BATCH:
                    break
                after = (rows[-1][4], rows[-1][0])
        return removed, being_sent

    def _delete_rows(self, conn, keys):
        """Delete these messages (MessageKeys) but those on the wire, which
        are doomed instead; returns the store keys of those."""
        on_wire = set(self._withdraw_claims([(k.pk, k.ref) for k in keys], doom=True))
        self._remove(conn, [k for k in keys if k.ref not in on_wire])
        return [k.ref for k in keys if k.ref in on_wire]

    def _remove(self, conn, gone):
        """Delete these messages (MessageKeys) and their unsent events, and
        report each as deleted."""
        for start in range(0, len(gone), SQL_CHUNK):
            chunk = gone[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            pks = [k.pk for k in chunk]
            conn.execute(SQL_DELETE_EVENTS_OF.format(marks=marks), pks)
            conn.execute(SQL_DELETE_PKS.format(marks=marks), pks)
        for key in gone:
            self._deleted_event(conn, key)

    def _deleted_event(self, conn, key):
        tenant = _tenant_of(key.account_id)
        if self._reports(tenant):
            conn.execute(SQL_INSERT_DELETED_EVENT,
                         (key.pk, key.ref, key.account_id, key.priority, tenant))

    # -- bounces and suppressions (SPEC 8) ---------------------------------

    def setting(self, name):
        """A value of the settings table (``verp_key``), or None."""
        with self._connection() as conn:
            row = conn.execute(SQL_SETTING, (name,)).fetchone()
        return row[0] if row else None

    def find_sent(self, pk=None, rfc_message_id=None):
        """A sent message by row or by its RFC Message-ID: a SentMessage, or
        None."""
        sql, arg = ((SQL_SENT_BY_PK, pk) if pk is not None
                    else (SQL_SENT_BY_RFC_ID, rfc_message_id))
        with self._connection() as conn:
            row = conn.execute(sql, (arg,)).fetchone()
        if row is None:
            return None
        payload = json.loads(row[5])
        recipients = {addr.lower() for field in ("to", "cc", "bcc") for _, addr in payload[field]}
        return SentMessage(MessageKey(*row[:4]), row[4], recipients)

    def record_bounce(self, key, sent_ts, bounce, suppress_until):
        """Add one bounce (a dict: recipient, type hard|soft, status,
        diagnostic, ts, and error for a hard one) to a sent message, report
        it, and for a hard bounce with ``suppress_until`` (0: for good)
        suppress the recipient.  A bounce the message already has (same
        recipient and type) changes nothing.  Returns whether it was new."""
        with self._transaction(durable=False) as conn:
            if not conn.execute(SQL_INSERT_BOUNCE, (
                    key.pk, bounce["recipient"], bounce["type"], bounce["status"],
                    bounce["diagnostic"], bounce["ts"])).rowcount:
                return False
            hard = bounce["type"] == "hard"
            tenant = _tenant_of(key.account_id)
            if self._reports(tenant):
                conn.execute(SQL_INSERT_BOUNCE_EVENT, (
                    key.pk, key.ref, key.account_id, key.priority,
                    None if hard else sent_ts, bounce["ts"] if hard else None,
                    bounce.get("error") if hard else None, json.dumps(bounce), tenant))
            if hard and suppress_until is not None:
                self._suppress(conn, tenant, bounce["recipient"],
                               "hard bounce %s" % _iso(bounce["ts"])[:10], bounce["ts"],
                               suppress_until or None)
        return True

    def bounces(self, key):
        """The bounces of a message, oldest first."""
        keys = ("recipient", "type", "status", "diagnostic", "ts")
        with self._connection() as conn:
            return [dict(zip(keys, row))
                    for row in conn.execute(SQL_MESSAGE_BOUNCES, (key,))]

    def _suppress(self, conn, tenant, address, reason, now, until):
        conn.execute(SQL_UPSERT_SUPPRESSION, (_scoped(tenant, address.lower()), reason, now,
                                              until))
        self._suppression_count = None   # counted again at the next look-up

    def suppress(self, address, reason, now, until, tenant=DEFAULT_TENANT):
        """Suppress ``address`` (compared lower-cased) for ``tenant`` until
        ``until`` (None: until deleted)."""
        with self._transaction(durable=True) as conn:
            self._suppress(conn, tenant, address, reason, now, until)

    def unsuppress(self, address, now, tenant=DEFAULT_TENANT):
        """Lift a suppression in force; False when there was none."""
        with self._transaction(durable=True) as conn:
            removed = conn.execute(SQL_DELETE_SUPPRESSION,
                                   (_scoped(tenant, address.lower()), now)).rowcount
        self._suppression_count = None
        return bool(removed)

    def suppressions(self, now, tenant=DEFAULT_TENANT):
        """The suppressions of ``tenant`` in force, by address."""
        keys = ("address", "reason", "created_ts", "expires_ts")
        with self._connection() as conn:
            found = [dict(zip(keys, row))
                     for row in conn.execute(SQL_LIST_SUPPRESSIONS, (now,))]
        shown = []
        for item in found:
            owner, item["address"] = _unscoped(item["address"])
            if owner == tenant:
                shown.append(item)
        return shown

    def suppressed(self, addresses, now, tenant=DEFAULT_TENANT):
        """``{address: (reason, created_ts)}`` of the given addresses that
        are suppressed now for ``tenant`` (compared lower-cased).  With no
        suppression at all (the usual case) no query runs."""
        if self._suppression_count is None:
            with self._connection() as conn:
                self._suppression_count = conn.execute(SQL_COUNT_SUPPRESSIONS).fetchone()[0]
        if not self._suppression_count or not addresses:
            return {}
        wanted = {_scoped(tenant, address.lower()): address for address in addresses}
        names, found = list(wanted), {}
        with self._connection() as conn:
            for start in range(0, len(names), SQL_CHUNK):
                chunk = names[start:start + SQL_CHUNK]
                for address, reason, created in conn.execute(
                        SQL_SUPPRESSED.format(marks=",".join("?" * len(chunk))), chunk + [now]):
                    found[wanted[address]] = (reason, created)
        return found

    def prune_suppressions(self, now):
        with self._transaction(durable=False) as conn:
            removed = conn.execute(SQL_PRUNE_SUPPRESSIONS, (now,)).rowcount
        if removed:
            self._suppression_count = None
        return removed

    # -- operator control (SPEC 7) -----------------------------------------

    def operate(self, command, selector, now, include_scheduled=False, tenant=None):
        """Apply an operator command (``retry``, ``requeue``, ``hold``,
        ``release``) to the messages a selector names, in one transaction.

        ``selector`` is ("ids", [key, ...]), ("account_id", key), ("status",
        s) or ("all", None), keys as ``_scoped`` makes them; ``tenant`` (None:
        every tenant) narrows the last two.  Returns (affected, keys not
        found, keys found but not in a status the command applies to); the
        last two only for an ids selector.  ``requeue`` reports each message
        as a new state change.  Raises ValueError for an unknown selector.
        """
        kind, value = selector
        with self._transaction(durable=True) as conn:
            if kind != "ids":
                if kind not in _SELECTOR_WHERE:
                    raise ValueError("unknown selector kind %r" % (kind,))
                where, args = _SELECTOR_WHERE[kind], [] if kind == "all" else [value]
                if tenant is not None and kind != "account_id":
                    where, args = where + " AND tenant = ?", args + [tenant]
                return self._operate(conn, command, where, args, now, include_scheduled), [], []
            found, affected = {}, 0
            for start in range(0, len(value), SQL_CHUNK):
                chunk = value[start:start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update((row[0], row[1:]) for row in conn.execute(
                    SQL_SELECTOR_IDS.format(marks=marks), chunk))
                affected += self._operate(conn, command, "id IN (%s)" % marks, chunk, now,
                                          include_scheduled)
        not_found = [i for i in value if i not in found]
        applies = COMMAND_STATUSES[command]
        skipped = [i for i in value if i in found and (
            found[i][0] not in applies or (command == "requeue" and not found[i][1]))]
        return affected, not_found, skipped

    def _operate(self, conn, command, where, args, now, include_scheduled):
        """Run one operator command's SQL for ``where`` (a selector's clause and its
        arguments); returns the rows it changed.  Raises ValueError for an unknown command."""
        if command == "retry":
            scheduled = "1" if include_scheduled else SQL_RETRY_NOT_SCHEDULED
            return conn.execute(SQL_RETRY.format(scheduled=scheduled, where=where),
                                [now] + args).rowcount
        if command == "requeue":
            conn.execute(SQL_REQUEUE_EVENTS.format(
                where=where, reporting="1" if self.reporting else SQL_REPORTING_TENANTS),
                [now] + args)
            return conn.execute(SQL_REQUEUE.format(where=where), [now] + args).rowcount
        if command == "hold":
            return conn.execute(SQL_HOLD.format(where=where), [now] + args).rowcount
        if command == "release":
            return conn.execute(SQL_RELEASE_HELD.format(where=where),
                                [now, now] + args).rowcount
        raise ValueError("unknown operator command %r" % command)

    def purge_reported(self, before, tenant=None):
        """Delete the finished messages reported before ``before`` (of one
        tenant, or of all), their attempts with them, PURGE_BATCH per
        transaction so intake and dispatch never wait long.  Returns how many
        were deleted."""
        removed = 0
        sql = SQL_PURGE_REPORTED.format(tenant="" if tenant is None else "AND tenant = ?")
        args = (before,) if tenant is None else (before, tenant)
        while True:
            with self._transaction(durable=False) as conn:
                batch = conn.execute(sql, args + (PURGE_BATCH,)).rowcount
            removed += batch
            if batch < PURGE_BATCH:
                return removed

    # -- accounts -----------------------------------------------------------

    def upsert_account(self, account, now):
        """Insert or replace an account (``id`` its store key, ``tenant_id``
        its tenant)."""
        with self._transaction(durable=True) as conn:
            conn.execute(SQL_UPSERT_ACCOUNT, (account["id"], json.dumps(account), now,
                                              account["tenant_id"]))

    def list_accounts(self):
        """Every account's settings (with password: callers must strip it)."""
        with self._connection() as conn:
            return [json.loads(row[0]) for row in conn.execute(SQL_LIST_ACCOUNTS)]

    def delete_account(self, account_id, force, now):
        """Delete an account.

        Returns None when it does not exist, else the number of its
        undelivered messages: when that is not 0 and ``force`` is false
        nothing is deleted (the caller answers 409); with ``force`` they fail
        with error ``account deleted`` (and are reported like any error).
        """
        with self._transaction(durable=True) as conn:
            if conn.execute(SQL_GET_ACCOUNT, (account_id,)).fetchone() is None:
                return None
            undelivered = []
            for status in ACTIVE_STATUSES:
                undelivered.extend(conn.execute(
                    SQL_ACCOUNT_ACTIVE_MESSAGES, (status, account_id)).fetchall())
            if undelivered and not force:
                return len(undelivered)
            # one already on the wire is failed too: if the relay accepts it,
            # record_outcomes turns it into "sent" (the truth) and reports that
            self._withdraw_claims([(pk, key) for pk, key, _ in undelivered])
            for pk, ref, priority in undelivered:
                self._force_fail(conn, MessageKey(pk, ref, account_id, priority), now,
                           "account deleted")
            conn.execute(SQL_DELETE_ACCOUNT, (account_id,))
            return len(undelivered)

    # -- tenants ------------------------------------------------------------

    def upsert_tenant(self, tenant_id, settings, key_hash, now):
        """Register a tenant or replace its settings and key hash; returns
        whether it is new."""
        with self._transaction(durable=True) as conn:
            text = json.dumps(settings)
            if conn.execute(SQL_TENANT_EXISTS, (tenant_id,)).fetchone() is not None:
                conn.execute(SQL_UPDATE_TENANT, (text, key_hash, now, tenant_id))
                return False
            conn.execute(SQL_INSERT_TENANT, (tenant_id, text, key_hash, now, now))
            conn.execute(SQL_TENANT_COUNTS, (tenant_id,) * len(STATUSES))
            return True

    def list_tenants(self):
        """Every tenant: dicts of id, settings (with secrets: callers strip
        them), key_hash, created_ts, updated_ts."""
        keys = ("id", "settings", "key_hash", "created_ts", "updated_ts")
        with self._connection() as conn:
            tenants = [dict(zip(keys, row)) for row in conn.execute(SQL_LIST_TENANTS)]
        for tenant in tenants:
            tenant["settings"] = json.loads(tenant["settings"])
        return tenants

    def delete_tenant(self, tenant_id):
        """Delete a tenant with everything it has: messages (a claimed one
        is never sent; one on the wire ends as the relay says, unrecorded),
        report events, accounts, send log, suppressions.  Returns (messages,
        accounts) removed, or None when there is no such tenant."""
        low, high = _tenant_range(tenant_id)
        with self._transaction(durable=True) as conn:
            if conn.execute(SQL_TENANT_EXISTS, (tenant_id,)).fetchone() is None:
                return None
            keys = conn.execute(SQL_TENANT_MESSAGE_KEYS, (tenant_id,)).fetchall()
            self._withdraw_claims(keys)
            conn.execute(SQL_DELETE_TENANT_EVENTS, (tenant_id,))
            messages = conn.execute(SQL_DELETE_TENANT_MESSAGES, (tenant_id,)).rowcount
            accounts = conn.execute(SQL_DELETE_TENANT_ACCOUNTS, (tenant_id,)).rowcount
            conn.execute(SQL_DELETE_TENANT_SENDS, (low, high))
            conn.execute(SQL_DELETE_TENANT_SUPPRESSIONS, (low, high))
            conn.execute(SQL_DELETE_TENANT_COUNTS, (tenant_id,))
            conn.execute(SQL_DELETE_TENANT, (tenant_id,))
        self._suppression_count = None
        return messages, accounts

    # -- report events ------------------------------------------------------
    # Each state change that the upstream must hear about becomes one row of
    # ``events`` (naming its message by MessageKey fields) when reporting is
    # on; without reporting a finished message counts as reported at once.

    def _reports(self, tenant):
        """Whether ``tenant``'s state changes are reported: a registered
        tenant always has its sync URL; the default one only with [client]
        client_sync_url."""
        return self.reporting or tenant != DEFAULT_TENANT

    def _reported_at(self, key, now):
        """``reported_ts`` of a message that finishes at ``now``: None while
        its report is due, ``now`` when its tenant is not reported to."""
        return None if self._reports(_tenant_of(key.account_id)) else now

    def _event(self, conn, key, kind, sent_ts=None, error_ts=None, error=None,
               deferred_ts=None, reason=None, refused=None):
        tenant = _tenant_of(key.account_id)
        if self._reports(tenant):
            conn.execute(SQL_INSERT_EVENT, (
                key.pk, key.ref, key.account_id, key.priority, kind, sent_ts, error_ts,
                error, deferred_ts, reason, json.dumps(refused) if refused else None, tenant))

    def _force_fail(self, conn, key, now, error):
        """Fail a message whatever its state (a forced account deletion)."""
        conn.execute(SQL_FAIL_MESSAGE, {"now": now, "error": error, "pk": key.pk,
                                        "reported": self._reported_at(key, now)})
        self._event(conn, key, "error", error_ts=now, error=error)

    def has_events(self, tenant):
        """Whether ``tenant`` has a report event waiting (one index seek)."""
        with self._connection() as conn:
            return conn.execute(SQL_HAS_EVENTS, (tenant,)).fetchone() is not None

    def pending_events(self, limit, tenant=DEFAULT_TENANT):
        """Up to ``limit`` unacknowledged report events of ``tenant``, oldest
        first."""
        with self._connection() as conn:
            rows = conn.execute(SQL_PENDING_EVENTS, (tenant, limit)).fetchall()
        keys = ("seq", "message_pk", "id", "account_id", "priority", "kind", "sent_ts",
                "error_ts", "error", "deferred_ts", "reason", "refused", "bounce")
        events = [dict(zip(keys, row)) for row in rows]
        for event in events:
            event["refused"] = json.loads(event["refused"]) if event["refused"] else None
            event["bounce"] = json.loads(event["bounce"]) if event["bounce"] else None
        return events

    def acknowledge_events(self, events, now):
        """Forget exactly these events; a final one marks its message reported."""
        with self._transaction(durable=False) as conn:
            for start in range(0, len(events), SQL_CHUNK):
                chunk = events[start:start + SQL_CHUNK]
                seqs = [e["seq"] for e in chunk]
                conn.execute(SQL_DELETE_EVENTS.format(marks=",".join("?" * len(seqs))), seqs)
                final = [e["message_pk"] for e in chunk if e["kind"] in FINISHED_STATUSES]
                if final:
                    conn.execute(SQL_MARK_REPORTED.format(marks=",".join("?" * len(final))),
                                 [now, now] + final)

    # -- delivery -----------------------------------------------------------

    def recover_interrupted(self):
        """Put messages left in ``sending`` by a crash back to ``pending``
        (their Message-ID is stored, so the retry carries the same one)."""
        with self._transaction(durable=False) as conn:
            return conn.execute(SQL_RECOVER_SENDING).rowcount

    def promote_due(self, now):
        """Move deferred messages whose deferred_ts has come to ``pending``."""
        with self._transaction(durable=False) as conn:
            return conn.execute(SQL_PROMOTE_DUE, {"now": now}).rowcount

    @staticmethod
    def _held_clause(held_batches):
        if not held_batches:
            return "", []
        held = sorted(held_batches)
        return SQL_CLAIM_HELD_BATCHES.format(marks=",".join("?" * len(held))), held

    def has_pending(self, account_id, max_priority, held_batches=()):
        """Whether the account has a due message, leaving out the campaigns
        (batch codes) on hold."""
        clause, held = self._held_clause(held_batches)
        with self._connection() as conn:
            return conn.execute(SQL_HAS_PENDING.format(held=clause),
                                [account_id, max_priority] + held).fetchone() is not None

    def claim(self, account_id, max_priority, limit, held_batches=()):
        """Atomically move up to ``limit`` pending messages of one account,
        by priority then age, to ``sending`` and return them as Claims
        (leaving out the campaigns in ``held_batches``).

        Each stays claimed until record_outcomes settles it; call begin_send
        right before its SMTP transaction."""
        pks = []
        clause, held = self._held_clause(held_batches)
        try:
            with self._transaction(durable=False) as conn:
                rows = conn.execute(SQL_CLAIM_SELECT.format(held=clause),
                                    [account_id, max_priority] + held + [limit]).fetchall()
                if rows:
                    pks = [row[0] for row in rows]
                    conn.execute(SQL_CLAIM_UPDATE.format(marks=",".join("?" * len(pks))), pks)
                    # inside the transaction: no delete can come in between
                    with self._claims_lock:
                        self._claims.update((pk, _CLAIMED) for pk in pks)
        except BaseException:
            self._settle_claims(pks)
            raise
        return [Claim(*row) for row in rows]

    def begin_send(self, pk):
        """Whether the claimed message ``pk`` may start its SMTP transaction.

        False when it was deleted, or failed by a forced account deletion,
        since its claim: it must not be sent.  True marks it on the wire, so
        a later delete leaves it to its outcome.  Never blocks on SQLite.
        """
        with self._claims_lock:
            if self._claims.get(pk) != _CLAIMED:
                return False
            self._claims[pk] = _ON_WIRE
            return True

    def _withdraw_claims(self, keys, doom=False):
        """Mark claimed messages among ``keys`` ((pk, id) pairs) withdrawn, so
        begin_send refuses them; returns the ids already on the wire, which
        ``doom`` marks to be deleted when their transaction ends (unless
        sent).  Called inside the deleting transaction, which serialises it
        with claim and record_outcomes."""
        on_wire = []
        with self._claims_lock:
            for pk, key in keys:
                state = self._claims.get(pk)
                if state in (_ON_WIRE, _DOOMED):
                    on_wire.append(key)
                    if doom:
                        self._claims[pk] = _DOOMED
                elif state == _CLAIMED:
                    self._claims[pk] = _WITHDRAWN
        return on_wire

    @contextlib.contextmanager
    def _settling(self, pks):
        """Forget the claims of ``pks`` when the block ends, however it ends."""
        try:
            yield
        finally:
            self._settle_claims(pks)

    def _settle_claims(self, pks):
        with self._claims_lock:
            for pk in pks:
                self._claims.pop(pk, None)

    def record_outcomes(self, outcomes):
        """Apply delivery outcomes, and the attempts behind them, in one
        transaction.

        An outcome applies only to a message still claimed: one deleted, or
        failed by a forced account deletion meanwhile, keeps that state,
        except that a relay's acceptance is the truth and wins over
        "account deleted".  Raises ValueError, writing nothing, for an
        outcome of an unknown kind.
        """
        unknown = sorted({repr(o.kind) for o in outcomes if o.kind not in Outcome.KINDS})
        if unknown:
            raise ValueError("unknown outcome kind %s" % ", ".join(unknown))
        if not outcomes:
            return
        # the claims are settled before the commit: a delete that comes
        # after it finds a finished message, never one "on the wire"
        settled = [outcome.claim.pk for outcome in outcomes]
        with self._transaction(durable=False) as conn, self._settling(settled):
            with self._claims_lock:   # inside the transaction: no delete comes between
                doomed = {pk for pk in settled if self._claims.get(pk) == _DOOMED}
            for outcome in outcomes:
                if outcome.claim.pk in doomed and outcome.kind != "sent":
                    # deleted while on the wire and not accepted: gone for good
                    self._remove(conn, [outcome.claim])
                    continue
                getattr(self, "_apply_" + outcome.kind)(conn, outcome)
                if outcome.attempt is not None:
                    self._record_attempt(conn, outcome)

    def _apply_sent(self, conn, outcome):
        claim, refused = outcome.claim, outcome.refused
        conn.execute(SQL_INSERT_SEND, (claim.account_id, outcome.ts))
        if conn.execute(SQL_SENT_MESSAGE, {
                "now": outcome.ts, "refused": json.dumps(refused) if refused else None,
                "reported": self._reported_at(claim, outcome.ts), "pk": claim.pk}).rowcount:
            self._event(conn, claim, "sent", sent_ts=outcome.ts, refused=refused)

    def _apply_error(self, conn, outcome):
        claim = outcome.claim
        if conn.execute(SQL_FAIL_CLAIMED, {
                "now": outcome.ts, "error": outcome.error, "pk": claim.pk,
                "reported": self._reported_at(claim, outcome.ts)}).rowcount:
            self._event(conn, claim, "error", error_ts=outcome.ts, error=outcome.error)

    def _apply_deferred(self, conn, outcome):
        """A deferral, written (with its report event) only while the claim stands."""
        claim = outcome.claim
        if conn.execute(SQL_DEFER_MESSAGE, {
                "now": outcome.ts, "until": outcome.until, "error": outcome.error,
                "retry_count": outcome.retry_count, "pk": claim.pk,
                "reason": outcome.reason}).rowcount:
            self._event(conn, claim, "deferred", deferred_ts=outcome.until,
                        reason=outcome.reason)

    def _apply_released(self, conn, outcome):
        conn.execute(SQL_RELEASE_MESSAGE, (outcome.claim.pk,))

    def _record_attempt(self, conn, outcome):
        attempt, pk = outcome.attempt, outcome.claim.pk
        conn.execute(SQL_INSERT_ATTEMPT, (
            pk, attempt.ts, attempt.duration, attempt.relay, outcome.kind,
            attempt.code, attempt.text, json.dumps(attempt.refused) if attempt.refused else None))
        conn.execute(SQL_TRIM_ATTEMPTS, {"pk": pk, "kept": ATTEMPTS_KEPT})

    def sends_since(self, account_id, since):
        """Timestamps of successful sends of one account after ``since``."""
        with self._connection() as conn:
            return [row[0] for row in conn.execute(SQL_SENDS_SINCE, (account_id, since))]

    def prune_send_log(self, before):
        with self._transaction(durable=False) as conn:
            return conn.execute(SQL_PRUNE_SEND_LOG, (before,)).rowcount


# ####################################################################### #
# #######################  Accounts and tenants  ######################## #
# ####################################################################### #

def _account_host(value):
    if not isinstance(value, str) or not _is_host(value):
        raise ValueError("must be a DNS name or an IP address")
    return value


def _account_credential(value):
    # Any Unicode text: AUTH sends it base64-encoded UTF-8, so nothing in it
    # reaches the wire raw; NUL alone is out (it separates the PLAIN fields).
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError("must be a string without NUL")
    return value or None


def _account_path(value):
    if not isinstance(value, str) or _CONTROL_CHARS.search(value):
        raise ValueError("must be a path")
    return value or None


# field -> (parser, default).  A missing field or a null value takes the
# default; a parser raises ValueError saying what the value must be.
ACCOUNT_SCHEMA = {
    "host": (_account_host, None),          # required
    "port": (_whole(1, 65535), 587),
    "user": (_account_credential, None),
    "password": (_account_credential, None),
    "use_tls": (_parse_bool, False),       # STARTTLS (implicit TLS on 465)
    "use_ssl": (_parse_bool, None),        # implicit TLS; None: port == 465
    "tls_verify": (_parse_bool, True),
    "ca_file": (_account_path, None),        # a private CA for this relay
    "limit_per_minute": (_whole(0, 10 ** 9), 0),   # 0: no limit
    "limit_per_hour": (_whole(0, 10 ** 9), 0),
    "limit_per_day": (_whole(0, 10 ** 9), 0),
    "limit_behavior": (_choice("defer", "reject"), "defer"),
    "timeout": (_seconds(0.1, 3600), None),   # None: smtp_timeout_seconds
    "batch_size": (_whole(1, 100000), 100),   # messages per dispatch cycle
    "ttl": (_seconds(0, DAY), 300),   # seconds a connection is reused
}
IMPLICIT_TLS_PORT = 465   # "submissions" (RFC 8314): TLS from the first byte


def validate_account(raw):
    """Check an account object of POST /account and fill in its defaults.

    Returns the normalised account: every ACCOUNT_SCHEMA field plus ``id``,
    and no other (fields it does not know are the caller's to report; see
    ``ignored_account_fields``).  ``use_ssl`` (implicit TLS) defaults to true
    on port 465, and ``use_tls`` on 465 means implicit TLS too, since that is
    what every client means by it there; an explicit ``use_ssl: true`` wins
    over ``use_tls``.  Raises ValueError with the reason.
    """
    if not isinstance(raw, dict):
        raise ValueError("account must be an object")
    account = {"id": _check_identifier(raw.get("id"), "id")}
    if raw.get("host") is None:
        raise ValueError("host is required")
    for field, (parse, default) in ACCOUNT_SCHEMA.items():
        value = raw.get(field)
        try:
            account[field] = default if value is None else parse(value)
        except ValueError as exc:
            raise ValueError("%s %s" % (field, exc)) from exc
    implicit = account["port"] == IMPLICIT_TLS_PORT
    if account["use_ssl"] is None:
        account["use_ssl"] = implicit
    if account["use_ssl"]:
        account["use_tls"] = False
    return account


def ignored_account_fields(raw):
    """The fields of an account object that asyncmail does not know (they
    are accepted, ignored and never stored), sorted, names cut to 80 chars."""
    if not isinstance(raw, dict):
        return []
    known = set(ACCOUNT_SCHEMA) | {"id"}
    return sorted(str(name)[:QUOTE_CHARS] for name in raw if name not in known)


def public_account(account):
    """An account as the API shows it: its own id (not its store key), its
    tenant, never the password."""
    shown = {key: value for key, value in account.items() if key != "password"}
    shown["id"] = _name_of(account["id"])
    shown["tenant_id"] = _tenant_of(account["id"])
    return shown


TENANT_FIELDS = ("id", "client_base_url", "client_sync_path", "client_attachment_path",
                 "client_auth")
TENANT_AUTH_METHODS = ("basic", "bearer", "none")
MAX_TENANT_URL = 2048


def _tenant_url_field(value, field, required=False):
    """An http(s) URL (``client_base_url``) or a path to append to it."""
    if value is None or value == "":
        if required:
            raise ValueError("%s is required" % field)
        return ""
    if (not isinstance(value, str) or len(value) > MAX_TENANT_URL or not value.isascii()
            or _CONTROL_CHARS.search(value) or " " in value):
        raise ValueError("%s must be ASCII without spaces or control characters, at most %d"
                         % (field, MAX_TENANT_URL))
    if field == "client_base_url":
        parts = urllib.parse.urlsplit(value)
        try:
            parts.port
        except ValueError as exc:
            raise ValueError("%s has an invalid port" % field) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            raise ValueError("%s must be an http or https URL" % field)
    elif not value.startswith("/") or "#" in value:
        raise ValueError("%s must be a path starting with /" % field)
    return value


def validate_tenant(raw):
    """Check a POST /tenant body.  Returns (tenant id, settings to store,
    ignored field names); raises ValueError."""
    tenant_id = raw.get("id")
    if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
        raise ValueError("id must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    if tenant_id == DEFAULT_TENANT:
        raise ValueError("id %s is reserved for the [client] section's tenant" % DEFAULT_TENANT)
    settings = {"client_base_url": _tenant_url_field(raw.get("client_base_url"),
                                                     "client_base_url", required=True)}
    for field in ("client_sync_path", "client_attachment_path"):
        settings[field] = _tenant_url_field(raw.get(field), field)
    auth = raw.get("client_auth")
    if auth is None:
        auth = {"method": "none"}
    if not isinstance(auth, dict):
        raise ValueError("client_auth must be an object")
    unknown = sorted(str(k)[:QUOTE_CHARS] for k in auth if k not in ("method", "user", "password",
                                                            "token"))
    if unknown:
        raise ValueError("client_auth: unknown field %s" % unknown[0])
    method = auth.get("method", "none")
    if method not in TENANT_AUTH_METHODS:
        raise ValueError("client_auth.method must be basic, bearer or none")
    for field in ("user", "password", "token"):
        _check_text(auth.get(field), "client_auth." + field, max_chars=MAX_CREDENTIAL_CHARS,
                    single_line=True)
    if method == "basic" and (not auth.get("user") or ":" in auth["user"]):
        raise ValueError("client_auth.user is required for basic (and has no ':')")
    if method == "bearer" and not auth.get("token"):
        raise ValueError("client_auth.token is required for bearer")
    settings["client_auth"] = {"method": method}
    if method == "basic":
        settings["client_auth"].update(user=auth["user"], password=auth.get("password") or "")
    elif method == "bearer":
        settings["client_auth"]["token"] = auth["token"]
    ignored = sorted(str(k)[:QUOTE_CHARS] for k in raw if k not in TENANT_FIELDS)
    return tenant_id, settings, ignored


def public_tenant(record):
    """A tenant as the API shows it: never a password, token or key."""
    settings = record["settings"]
    auth = {"method": settings["client_auth"]["method"]}
    if "user" in settings["client_auth"]:
        auth["user"] = settings["client_auth"]["user"]
    shown = {"id": record["id"], "client_auth": auth, "created_ts": record["created_ts"],
             "updated_ts": record["updated_ts"]}
    for field in ("client_base_url", "client_sync_path", "client_attachment_path"):
        shown[field] = settings[field]
    return shown


def _tenant_url(settings, path_field):
    """``client_base_url`` joined with one of the tenant's paths."""
    base, path = settings["client_base_url"], settings[path_field]
    return base.rstrip("/") + path if path else base


def _tenant_auth_headers(settings):
    auth = settings["client_auth"]
    return _auth_headers(auth.get("user"), auth.get("password"), auth.get("token"))


# ####################################################################### #
# ########  Attachments: URL, S3, SigV4, endpoints, SSRF guard  ######### #
# ####################################################################### #

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,254}", re.IGNORECASE)
_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")
_S3_REGION = re.compile(r"[a-z0-9-]{1,64}")
MAX_STORAGE_PATH = 1024


def _attachment_filename(value, field):
    """A bare file name (no path), single-line, at most MAX_FILENAME_CHARS."""
    filename = _check_text(value, field, required=True, max_chars=MAX_FILENAME_CHARS,
                           single_line=True)
    if not filename.strip() or _CONTROL_CHARS.search(filename):
        raise ValueError("%s must be a non-empty name without control characters" % field)
    if "/" in filename or "\\" in filename:
        raise ValueError("%s must be a bare name, not a path" % field)
    return filename


def _attachment_mime_type(value, field):
    """type/subtype, lower-cased; None: guessed from the filename at send time."""
    if value is None:
        return None
    if (not isinstance(value, str) or len(value) > MAX_MIME_TYPE_CHARS
            or not _MIME_TYPE.fullmatch(value)):
        raise ValueError("%s must look like type/subtype" % field)
    return value.lower()


def _content_source(value, field):
    """Base64 content, kept without its line breaks."""
    if not isinstance(value, str):
        raise ValueError("%s must be a base64 string" % field)
    compact = "".join(value.split())
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("%s is not valid base64" % field) from exc
    return compact


def _url_source(value, field):
    """An http(s) URL, fetched at send time through the address check."""
    if not isinstance(value, str) or _CONTROL_CHARS.search(value) or " " in value:
        raise ValueError("%s must be an http or https URL" % field)
    if not value.isascii():
        raise ValueError("%s must be ASCII (percent-encode the rest)" % field)
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port
    except ValueError as exc:
        raise ValueError("%s has an invalid port" % field) from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("%s must be an http or https URL" % field)
    return value


def _s3_source(value, field):
    """An S3 object: ``bucket``, ``key`` and an optional ``region``."""
    if not isinstance(value, dict):
        raise ValueError("%s must be an object with bucket and key" % field)
    bucket, key, region = value.get("bucket"), value.get("key"), value.get("region")
    if not isinstance(bucket, str) or not _S3_BUCKET.fullmatch(bucket):
        raise ValueError("%s.bucket must be a bucket name" % field)
    if not isinstance(key, str) or not key or len(key) > MAX_S3_KEY or "\x00" in key:
        raise ValueError("%s.key must be a non-empty object key" % field)
    s3 = {"bucket": bucket, "key": key}
    if region is not None:
        if not isinstance(region, str) or not _S3_REGION.fullmatch(region):
            raise ValueError("%s.region must be a region name" % field)
        s3["region"] = region
    return s3


def _storage_source(value, field):
    """A path on the tenant's own storage ("volume:path"), fetched back from
    its client_attachment_path at send time."""
    if (not isinstance(value, str) or not value or len(value) > MAX_STORAGE_PATH
            or _CONTROL_CHARS.search(value)):
        raise ValueError("%s must be a path of 1-%d characters without control characters"
                         % (field, MAX_STORAGE_PATH))
    return value


def _endpoint_fetch_mode(value, field):
    """``endpoint``, the only mode of a storage_path (not stored)."""
    if value is not None and value != "endpoint":
        raise ValueError("%s must be endpoint, with storage_path" % field)
    return None     # the only mode: not stored


def _content_md5(value, field):
    """The MD5 (hex) the tenant gives for a storage_path file, lower-cased."""
    if value is None:
        return None
    if not isinstance(value, str) or not _MD5_HEX.fullmatch(value):
        raise ValueError("%s must be 32 hexadecimal digits" % field)
    return value.lower()


# field -> parser(value or None, the field's name in errors) for every
# attachment; then the sources, of which an attachment names exactly one; then
# the fields that only a storage_path source may carry.  A parser returns the
# normalised value (None: not stored) or raises ValueError naming the field.
ATTACHMENT_SCHEMA = {
    "filename": _attachment_filename,      # required
    "mime_type": _attachment_mime_type,    # None: guessed from the filename
}
ATTACHMENT_SOURCES = {
    "content": _content_source,
    "url": _url_source,
    "s3": _s3_source,
    "storage_path": _storage_source,
}
ENDPOINT_SCHEMA = {
    "fetch_mode": _endpoint_fetch_mode,
    "content_md5": _content_md5,     # caches the fetched bytes when they match
}


def _check_attachment(raw, index):
    """One attachment of a message, checked and normalised by its field
    tables: a bare filename, an optional MIME type, and exactly one source
    (base64 ``content``, an http(s) ``url``, an ``s3`` bucket and key, or a
    tenant's ``storage_path``).  Raises ValueError naming ``attachments[index]``."""
    field = "attachments[%d]" % index
    if not isinstance(raw, dict):
        raise ValueError("%s must be an object" % field)
    attachment = {}
    for name, parse in ATTACHMENT_SCHEMA.items():
        value = parse(raw.get(name), "%s.%s" % (field, name))
        if value is not None:
            attachment[name] = value
    sources = [name for name in ATTACHMENT_SOURCES if raw.get(name) is not None]
    if len(sources) != 1:
        raise ValueError("%s needs exactly one of content, url, s3 or storage_path" % field)
    source = sources[0]
    if source != "storage_path" and raw.get("fetch_mode") is not None:
        raise ValueError("%s.fetch_mode must be endpoint, with storage_path" % field)
    attachment[source] = ATTACHMENT_SOURCES[source](raw[source], "%s.%s" % (field, source))
    if source == "storage_path":
        for name, parse in ENDPOINT_SCHEMA.items():
            value = parse(raw.get(name), "%s.%s" % (field, name))
            if value is not None:
                attachment[name] = value
    return attachment


def _guess_mime_type(filename):
    import mimetypes
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


# -- attachments: URL and S3 sources -----------------------------------------

MAX_REDIRECTS = 5
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _aws_quote(text, keep_slash):
    """URI-encode as SigV4 wants: RFC 3986 unreserved characters stay, every
    other byte of the UTF-8 form becomes %XX (uppercase hex)."""
    return urllib.parse.quote(text, safe="-_.~" + ("/" if keep_slash else ""))


def sigv4_sign(method, path, query, headers, payload_sha256, access_key, secret_key,
               region, service, amz_date):
    """AWS Signature Version 4 of one request; a pure function.

    ``path`` is the raw (not yet encoded) path, encoded once here with ``/``
    kept (S3 semantics: no normalisation); ``query`` a list of raw (name,
    value) pairs; ``headers`` a mapping that includes ``host`` (and
    ``x-amz-date``, ``x-amz-content-sha256``, ``x-amz-security-token`` when
    they are sent).  Returns a dict with ``canonical_request``,
    ``string_to_sign``, ``signature`` and ``authorization``.
    """
    canonical_query = "&".join(
        "%s=%s" % pair for pair in sorted(
            (_aws_quote(name, False), _aws_quote(value, False)) for name, value in query))
    folded = {}
    for name, value in headers.items():
        folded.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    names = sorted(folded)
    canonical_headers = "".join("%s:%s\n" % (n, ",".join(folded[n])) for n in names)
    signed_headers = ";".join(names)
    canonical_request = "\n".join([method, _aws_quote(path, True) or "/", canonical_query,
                                   canonical_headers, signed_headers, payload_sha256])
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope,
        hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    authorization = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        access_key, scope, signed_headers, signature)
    return {"canonical_request": canonical_request, "string_to_sign": string_to_sign,
            "signature": signature, "authorization": authorization}


def _is_public_address(address):
    """False for loopback, private, link-local (169.254/16: cloud metadata),
    multicast, unspecified, reserved and shared (100.64/10) addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_unspecified or ip.is_reserved or not ip.is_global)


class AttachmentEndpoint(collections.namedtuple("AttachmentEndpoint", "tenant url headers")):
    """Where a tenant's ``storage_path`` attachments are fetched from: its
    ``client_base_url + client_attachment_path`` and the headers of its
    ``client_auth``."""

    __slots__ = ()


ENDPOINT_FETCH_FAILED = "Attachment fetch failed"   # Genropy retries errors that say so


def _time_left(deadline):
    """Seconds until ``deadline`` (time.monotonic()); socket.timeout once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


class _DeadlineReader(io.RawIOBase):
    """socket.makefile's raw reader, each read waiting at most the time left."""

    def __init__(self, sock, deadline):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)   # keeps the socket open until closed
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self):
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket (plain or TLS) whose every operation ends by
    ``deadline``: each waits at most the time left, where a plain socket
    timeout would start afresh with every byte a server drips.  Offers what
    http.client uses of a socket: sendall, makefile("rb") and close."""

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data):
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode="rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self):
        self._sock.close()   # the socket stays open while a reader still uses it


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a pre-checked address, whatever DNS says by now, and
    ends every socket operation by ``deadline``."""

    def __init__(self, host, port, address, deadline):
        super().__init__(host, port)
        self.pinned_address = address
        self.deadline = deadline

    def connect(self):
        sock = socket.create_connection((self.pinned_address, self.port),
                                        _time_left(self.deadline))
        self.sock = _DeadlineSocket(sock, self.deadline)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to a pre-checked address, verifying the certificate for ``host``,
    every socket operation ending by ``deadline``."""

    def __init__(self, host, port, address, deadline, context):
        super().__init__(host, port, context=context)
        self.pinned_address = address
        self.deadline = deadline

    def connect(self):
        sock = socket.create_connection((self.pinned_address, self.port),
                                        _time_left(self.deadline))
        # the handshake's timeout is its total duration (ssl, Python 3.5+)
        sock.settimeout(_time_left(self.deadline))
        sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock = _DeadlineSocket(sock, self.deadline)


def _pinned_connection(scheme, host, port, address, deadline, context):
    """An http.client connection to ``host`` that connects to ``address``
    and ends every socket operation by ``deadline`` (time.monotonic())."""
    if scheme == "https":
        return _PinnedHTTPSConnection(host, port, address, deadline, context)
    return _PinnedHTTPConnection(host, port, address, deadline)


def _content_type(headers):
    value = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return value if len(value) <= MAX_MIME_TYPE_CHARS and _MIME_TYPE.fullmatch(value) else None


class AttachmentFetcher:
    """Fetches URL, S3 and tenant-endpoint attachments at send time.

    Every fetch, URL or S3, connects to an address that was resolved and
    checked (the SSRF guard; only an [s3] endpoint_url, which the admin
    configured, is trusted as it is) and pins the connection to it, so a DNS
    answer cannot change between check and connect; redirects are followed by
    hand, at most MAX_REDIRECTS, each hop re-checked.  The body is read in
    chunks and refused as soon as it passes ``max_bytes``.  The whole fetch
    (connects, TLS, redirects, headers and body) ends within
    ``timeout_seconds``: every socket operation waits at most the time left,
    so a server dripping bytes cannot hold it longer.  Raises TemporaryError
    (network, timeout, 5xx) or PermanentError (403/404, too large, refused
    target, missing credentials), always naming the attachment and never a
    secret.  Thread-safe (the endpoint cache has its own lock).

    A tenant's ``storage_path`` attachment is POSTed for (``{"storage_path":
    ...}``) to the endpoint the admin registered, so its address is trusted
    like an [s3] endpoint_url; 404 is permanent, anything temporary says
    ENDPOINT_FETCH_FAILED.  What came with a ``content_md5`` that the bytes
    match is kept (per tenant, MAX_CACHED_ATTACHMENT_BYTES in all).
    """

    def __init__(self, attachments, s3, now, resolve=None, address_allowed=None, tls=None):
        """``resolve(host, port) -> [address]`` and ``address_allowed(address)``
        are the network seams (defaults: getaddrinfo, and public addresses
        only unless ``allow_private_urls``); ``tls`` a _LazyTls to share."""
        self.max_bytes = attachments.max_bytes
        self.timeout = attachments.timeout_seconds
        self.s3 = s3
        self.now = now
        self._resolve = resolve or self._getaddrinfo
        self._tls = tls or _LazyTls()
        if address_allowed is None:
            address_allowed = ((lambda address: True) if attachments.allow_private_urls
                               else _is_public_address)
        self._allowed = address_allowed
        self._cache = collections.OrderedDict()   # (tenant, md5) -> bytes, oldest first
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()

    @staticmethod
    def _getaddrinfo(host, port):
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]

    def fetch(self, attachment, endpoint=None):
        """(filename, mime type, bytes) of one attachment; ``endpoint`` (an
        AttachmentEndpoint) is where a ``storage_path`` one comes from."""
        filename = attachment["filename"]
        deadline = time.monotonic() + self.timeout   # for the whole fetch
        if "content" in attachment:
            data, content_type = base64.b64decode(attachment["content"]), None
        elif "url" in attachment:
            data, content_type = self._fetch_url(filename, attachment["url"], deadline)
        elif "storage_path" in attachment:
            data, content_type = self._fetch_endpoint(filename, attachment, endpoint, deadline)
        else:
            data, content_type = self._fetch_s3(filename, attachment["s3"], deadline)
        mime_type = (attachment.get("mime_type") or content_type
                     or _guess_mime_type(filename))
        return filename, mime_type, data

    # -- URL ----------------------------------------------------------------

    def _fetch_url(self, filename, url, deadline):
        """(bytes, content type) of an http(s) attachment, following at most MAX_REDIRECTS
        redirects, each hop resolved and checked again (the SSRF guard)."""
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise PermanentError("attachment %s: redirected to a non-http(s) URL" % filename)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = self._checked_address(filename, parts.hostname, port)
            path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            status, headers, body = self._get(filename, parts.scheme, parts.hostname, port,
                                              address, path, {}, _redact_url(url), deadline)
            if status in (301, 302, 303, 307, 308) and headers.get("location"):
                url = urllib.parse.urljoin(url, headers["location"])
                continue
            return body, _content_type(headers)
        raise PermanentError("attachment %s: more than %d redirects" % (filename, MAX_REDIRECTS))

    def _checked_address(self, filename, host, port, trusted=False):
        """The address to connect to for ``host``: resolved, and refused when
        any of its addresses is not allowed, unless the admin configured this
        very host (``trusted``: the [s3] endpoint_url)."""
        try:
            addresses = self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise TemporaryError("attachment %s: cannot resolve %s: %s"
                                 % (filename, host, exc)) from exc
        if not addresses:
            raise TemporaryError("attachment %s: %s has no address" % (filename, host))
        for address in addresses:
            if not trusted and not self._allowed(address):
                raise PermanentError(
                        "attachment %s: refused target %s (%s is not a public address; "
                        "see [attachments] allow_private_urls)" % (filename, host, address))
        return addresses[0]

    # -- a tenant's attachment endpoint ---------------------------------------

    def _fetch_endpoint(self, filename, attachment, endpoint, deadline):
        """(bytes, content type) of a tenant's ``storage_path`` attachment, POSTed for at
        its endpoint with its credentials, or from the cache when ``content_md5`` names
        bytes already fetched and verified.  404 is a PermanentError naming the file;
        anything temporary is a TemporaryError saying ENDPOINT_FETCH_FAILED."""
        path = attachment["storage_path"]
        if endpoint is None:
            raise PermanentError("attachment %s: %s needs a tenant with a "
                                 "client_attachment_path" % (filename, path))
        md5 = attachment.get("content_md5")
        if md5 is not None:
            with self._cache_lock:
                data = self._cache.get((endpoint.tenant, md5))
                if data is not None:
                    self._cache.move_to_end((endpoint.tenant, md5))
                    return data, None
        parts = urllib.parse.urlsplit(endpoint.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        where = "%s (%s)" % (_redact_url(endpoint.url), path)
        body = json.dumps({"storage_path": path}).encode("utf-8")
        headers = dict(endpoint.headers, **{"Content-Type": "application/json"})
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        try:
            address = self._checked_address(filename, parts.hostname, port, trusted=True)
            status, response_headers, data = self._get(
                filename, parts.scheme, parts.hostname, port, address, target, headers,
                where, deadline, method="POST", body=body)
        except TemporaryError as exc:
            raise TemporaryError("%s: %s" % (ENDPOINT_FETCH_FAILED, exc),
                                 http_status=exc.http_status) from exc
        except PermanentError as exc:
            if exc.http_status == 404:
                raise PermanentError("attachment %s not found: %s answered 404"
                                     % (filename, where), http_status=404) from exc
            if exc.http_status in (401, 403):   # the site's credentials: fixable
                raise TemporaryError("%s: %s" % (ENDPOINT_FETCH_FAILED, exc),
                                     http_status=exc.http_status) from exc
            raise
        if 300 <= status < 400:
            raise PermanentError("attachment %s: %s answered a redirect (HTTP %d)"
                                 % (filename, where, status), http_status=status)
        if md5 is not None and hashlib.md5(data).hexdigest() == md5:
            self._remember(endpoint.tenant, md5, data)
        return data, _content_type(response_headers)

    def _remember(self, tenant, md5, data):
        """Cache verified bytes by (tenant, MD5), oldest out first; a file over a
        quarter of the cache is not kept."""
        if len(data) > MAX_CACHED_ATTACHMENT_BYTES // 4:
            return   # one file must not flush the whole cache
        with self._cache_lock:
            if (tenant, md5) in self._cache:
                return
            self._cache[(tenant, md5)] = data
            self._cached_bytes += len(data)
            while self._cached_bytes > MAX_CACHED_ATTACHMENT_BYTES:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)

    # -- S3 -----------------------------------------------------------------

    def _fetch_s3(self, filename, source, deadline):
        """(bytes, content type) of an S3 object: a GET signed with SigV4, path-
        style at ``[s3] endpoint_url``, else at AWS (the bucket's virtual host,
        or path-style when its name has dots); the address is checked unless
        the admin named the endpoint.  Raises PermanentError without
        credentials or on a redirect (a wrong region)."""
        s3 = self.s3
        if not s3.access_key_id or not s3.secret_access_key:
            raise PermanentError("attachment %s: no S3 credentials configured ([s3] or "
                                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)" % filename)
        region = source.get("region") or s3.region
        bucket, key = source["bucket"], source["key"]
        if s3.endpoint_url:
            endpoint = urllib.parse.urlsplit(s3.endpoint_url)
            scheme, host, port = endpoint.scheme, endpoint.hostname, endpoint.port
            base = endpoint.path.rstrip("/")
            raw_path = "%s/%s/%s" % (base, bucket, key)
        elif "." in bucket:   # virtual-hosted names with dots break TLS hostnames
            scheme, host, port = "https", "s3.%s.amazonaws.com" % region, None
            raw_path = "/%s/%s" % (bucket, key)
        else:
            scheme, host, port = "https", "%s.s3.%s.amazonaws.com" % (bucket, region), None
            raw_path = "/" + key
        port = port or (443 if scheme == "https" else 80)
        host_header = host if port in (80, 443) else "%s:%d" % (host, port)
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.now()))
        headers = {"host": host_header, "x-amz-date": amz_date,
                   "x-amz-content-sha256": _EMPTY_SHA256}
        if s3.session_token:
            headers["x-amz-security-token"] = s3.session_token
        signed = sigv4_sign("GET", raw_path, [], headers, _EMPTY_SHA256, s3.access_key_id,
                            s3.secret_access_key, region, "s3", amz_date)
        headers["authorization"] = signed["authorization"]
        # the bucket and region come from the message: checked like any URL,
        # unless the admin named the endpoint (a MinIO on a private address)
        address = self._checked_address(filename, host, port, trusted=bool(s3.endpoint_url))
        where = "s3://%s/%s" % (bucket, key)
        status, response_headers, body = self._get(
            filename, scheme, host, port, address, _aws_quote(raw_path, True), headers,
            where, deadline)
        if status in (301, 302, 303, 307, 308):
            raise PermanentError("attachment %s: %s answered a redirect (HTTP %d): wrong "
                                 "region?" % (filename, where, status))
        return body, _content_type(response_headers)

    # -- one HTTP exchange --------------------------------------------------

    def _get(self, filename, scheme, host, port, address, path, headers, where, deadline,
             method="GET", body=None):
        """GET (or ``method`` with ``body``) over a connection pinned to
        ``address``, ending by ``deadline`` (time.monotonic()).  Returns
        (status, lower-case headers, body) for 2xx and redirects; raises
        TemporaryError or PermanentError (with ``http_status``) otherwise."""
        connection = _pinned_connection(scheme, host, port, address, deadline,
                                        self._tls.get() if scheme == "https" else None)
        request_headers = {"User-Agent": "asyncmail/" + __version__, "Accept": "*/*"}
        request_headers.update(headers)
        try:
            connection.request(method, path, body=body, headers=request_headers)
            response = connection.getresponse()
            response_headers = {k.lower(): v for k, v in response.getheaders()}
            status = response.status
            if 300 <= status < 400:
                return status, response_headers, b""
            if status >= 500 or status in (408, 429):
                raise TemporaryError("attachment %s: HTTP %d from %s" % (filename, status, where),
                                     http_status=status)
            if status >= 400 or status < 200:
                raise PermanentError("attachment %s: HTTP %d from %s" % (filename, status, where),
                                     http_status=status)
            length = response_headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise PermanentError("attachment %s: %s bytes at %s exceed max_bytes %d"
                                     % (filename, length, where, self.max_bytes))
            chunks, total = [], 0
            while True:
                chunk = response.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    raise PermanentError("attachment %s: %s is larger than max_bytes %d"
                                         % (filename, where, self.max_bytes))
                if time.monotonic() > deadline:
                    raise TemporaryError("attachment %s: fetching %s took longer than "
                                         "[attachments] timeout_seconds (%g s)"
                                         % (filename, where, self.timeout))
                chunks.append(chunk)
            return status, response_headers, b"".join(chunks)
        except (TemporaryError, PermanentError):
            raise
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise TemporaryError("attachment %s: fetching %s took longer than "
                                     "[attachments] timeout_seconds (%g s)"
                                     % (filename, where, self.timeout)) from exc
            raise TemporaryError("attachment %s: fetching %s failed: %s"
                                 % (filename, where, exc or type(exc).__name__)) from exc
        finally:
            connection.close()


# ####################################################################### #
# #############  Messages: validation, MIME, the envelope  ############## #
# ####################################################################### #

# Headers that the message's own fields produce; a custom header may not
# replace them (Bcc in particular must never reach the headers).
_RESERVED_HEADERS = frozenset([
    "from", "to", "cc", "bcc", "subject", "reply-to", "return-path", "message-id",
    "date", "mime-version", "content-type", "content-transfer-encoding", "sender"])
_MESSAGE_ID_TEXT = re.compile(r"[!-~]+")   # printable ASCII, no space


def _account_id_field(value, field):
    """An account id, or None for the batch's default account."""
    return None if value is None else _check_identifier(value, field)


def _sender_field(value, field):
    """The From address as [name, address] (required)."""
    if value is None:
        raise ValueError("%s is required" % field)
    if not isinstance(value, str):
        raise ValueError("%s must be a string" % field)
    return list(_parse_address(value))


def _address_list_field(value, field):
    """A list of [name, address] pairs (empty when absent)."""
    return [] if value is None else [list(pair) for pair in _parse_address_list(value, field)]


def _recipient_field(value, field):
    """To: at least one [name, address]."""
    recipients = _address_list_field(value, field)
    if not recipients:
        raise ValueError("%s must name at least one recipient" % field)
    return recipients


def _return_path_field(value, field):
    """The envelope sender's bare address, or None (From's, or VERP's)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("%s must be a string" % field)
    return _parse_address(value)[1]


def _text_field(required=False, single_line=False):
    """A parser of a text field (see _check_text)."""
    def parse(value, field):
        return _check_text(value, field, required=required, single_line=single_line)
    return parse


def _content_type_field(value, field):
    """``plain`` (the default) or ``html``; text/plain and text/html are taken too."""
    if value is None:
        return "plain"
    if not isinstance(value, str) or value.lower() not in (
            "plain", "html", "text/plain", "text/html"):
        raise ValueError("%s must be plain or html" % field)
    return "html" if value.lower().endswith("html") else "plain"


def _headers_field(value, field):
    """Custom headers, name: value; none may replace a header that a field of
    the message makes (Bcc above all)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("%s must be an object of name: value strings" % field)
    headers = {}
    for name, text in value.items():
        if len(name) > MAX_HEADER_NAME or not _HEADER_NAME.fullmatch(name):
            raise ValueError("header name %r is not a valid field name" % name[:QUOTE_CHARS])
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError("header %s comes from its own field and cannot be set" % name)
        if isinstance(text, bool):   # Genropy sends its extra headers' numbers and
            text = "true" if text else "false"   # flags as JSON numbers and booleans
        elif _is_number(text):
            text = str(text)
        headers[name] = _check_text(text, "header %s" % name, required=True, single_line=True)
    return headers


def _rfc_message_id_field(value, field):
    """The client's Message-ID as ``<id>`` (None: one is made from the
    sender's domain).  Printable ASCII only: RFC 5322 has no encoding for a
    msg-id, so anything else (U+2028 too) would fail the message at send time."""
    if value is None:
        return None
    if (not isinstance(value, str) or len(value) > MAX_RFC_MESSAGE_ID
            or not _MESSAGE_ID_TEXT.fullmatch(value) or "@" not in value):
        raise ValueError("%s must look like <unique@domain> (printable ASCII)" % field)
    bare = value.strip("<>")
    if not bare or "<" in bare or ">" in bare:
        raise ValueError("%s must look like <unique@domain>" % field)
    return "<%s>" % bare


def _priority_field(value, field):
    """0-3 (see _parse_priority), or None for the batch's default."""
    return None if value is None else _parse_priority(value)   # None: the batch's default


def _batch_code_field(value, field):
    """A campaign code: an id of at most MAX_BATCH_CODE characters, or None."""
    if value is None:
        return None
    _check_identifier(value, field)
    if len(value) > MAX_BATCH_CODE:
        raise ValueError("%s is longer than %d characters" % (field, MAX_BATCH_CODE))
    return value


def _attachments_field(value, field):
    """The list of attachments, each checked by _check_attachment."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("%s must be a list" % field)
    return [_check_attachment(attachment, i) for i, attachment in enumerate(value)]


# field -> parser(value or None, the field's name in errors), in the order
# they are checked; a parser returns the normalised value or raises
# ValueError with the reason the message is refused.  ``account_id``,
# ``message_id`` and ``priority`` left None are filled in by validate_message.
MESSAGE_SCHEMA = {
    "id": _check_identifier,                  # required
    "account_id": _account_id_field,          # None: the default account
    "from": _sender_field,                    # required
    "to": _recipient_field,                   # required, at least one
    "cc": _address_list_field,
    "bcc": _address_list_field,
    "reply_to": _address_list_field,
    "return_path": _return_path_field,        # the envelope sender (VERP aside)
    "subject": _text_field(required=True, single_line=True),
    "body": _text_field(required=True),
    "content_type": _content_type_field,      # plain or html
    "body_text": _text_field(),               # the plain part beside an html body
    "headers": _headers_field,
    "message_id": _rfc_message_id_field,
    "priority": _priority_field,
    "deferred_ts": _check_timestamp,          # not before this epoch second
    "batch_code": _batch_code_field,          # a campaign, which suspend can hold
    "attachments": _attachments_field,
}


def validate_message(raw, default_priority, resolve_account):
    """Check one message of an add-messages batch and normalise it, field by
    field as MESSAGE_SCHEMA says.

    ``resolve_account(account_id_or_None)`` returns the account id to use or
    raises ValueError.  Returns the normalised message (a JSON-able dict);
    raises ValueError with the reason the message is rejected.
    """
    if not isinstance(raw, dict):
        raise ValueError("message must be an object")
    message = {field: parse(raw.get(field), field) for field, parse in MESSAGE_SCHEMA.items()}
    message["account_id"] = resolve_account(message["account_id"])
    if message["message_id"] is None:
        domain = message["from"][1].rpartition("@")[2]
        message["message_id"] = "<%s@%s>" % (os.urandom(16).hex(), domain)
    if message["priority"] is None:
        message["priority"] = default_priority
    return message


# Every field a message may have (SPEC 3, and today's Genropy: tenant_id,
# batch_code; fetch_mode and content_md5 of an endpoint attachment).  Others
# are accepted and ignored, and the answer names them.
MESSAGE_FIELDS = frozenset(MESSAGE_SCHEMA) | {"tenant_id"}
ATTACHMENT_FIELDS = frozenset(ATTACHMENT_SCHEMA) | set(ATTACHMENT_SOURCES) | set(ENDPOINT_SCHEMA)


def ignored_message_fields(raw):
    """The field names of a message (and of its attachments, as
    ``attachments[i].name``) that asyncmail does not know, sorted, cut to 80
    characters: a misspelled ``Bcc`` or ``atachments`` must not pass
    unnoticed."""
    names = [str(name)[:QUOTE_CHARS] for name in raw if name not in MESSAGE_FIELDS]
    attachments = raw.get("attachments")
    if isinstance(attachments, list):
        for index, attachment in enumerate(attachments):
            if isinstance(attachment, dict):
                names.extend("attachments[%d].%s" % (index, str(name)[:QUOTE_CHARS])
                             for name in attachment if name not in ATTACHMENT_FIELDS)
    return sorted(names)


_BULKY_FIELDS = ("body", "body_text")


def message_view(message, retry_count, full=True):
    """A normalised message as the API shows it: the shape a client sends
    (addresses as strings), plus ``retry_count``.  Without ``full`` the
    bodies and attachment contents are left out, so listing a page of large
    messages stays small."""
    view = dict(message)
    view["from"] = _format_address(*message["from"])
    for field in ("to", "cc", "bcc"):
        view[field] = [_format_address(*pair) for pair in message[field]]
    view["reply_to"] = ", ".join(_format_address(*pair) for pair in message["reply_to"]) or None
    if not full:
        for field in _BULKY_FIELDS:
            view.pop(field, None)
        view["attachments"] = [{key: value for key, value in attachment.items()
                                if key != "content"} for attachment in message["attachments"]]
    view["retry_count"] = retry_count
    return view


def _address_objects(pairs):
    """(name, address) pairs as the email package's Address objects (a quoted
    local part unquoted, as Address quotes it again)."""
    from email.headerregistry import Address
    objects = []
    for name, addr in pairs:
        local, _, domain = addr.rpartition("@")
        if local.startswith('"') and local.endswith('"'):
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        objects.append(Address(display_name=name or "", username=local, domain=domain))
    return objects


def _check_header_fields(message, attachments):
    """Check once more, where the headers are written, everything that
    becomes a header: a message stored by an older version, or a gap in
    intake validation, must fail here rather than end the header block
    early or add a header.  Raises PermanentError."""
    def refuse(what):
        raise PermanentError("cannot build the message: %s" % what)

    for name, value in message["headers"].items():
        if (len(name) > MAX_HEADER_NAME or not _HEADER_NAME.fullmatch(name)
                or name.lower() in _RESERVED_HEADERS):
            refuse("header name %r is not allowed" % name[:QUOTE_CHARS])
        if not isinstance(value, str) or _LINE_BREAKS.search(value):
            refuse("header %s holds a line break" % name)
    if _LINE_BREAKS.search(message["subject"]):
        refuse("the subject holds a line break")
    if not _MESSAGE_ID_TEXT.fullmatch(message["message_id"]):
        refuse("message_id %r is not printable ASCII" % message["message_id"][:QUOTE_CHARS])
    pairs = [message["from"]] + message["to"] + message["cc"] + message["reply_to"]
    for name, addr in pairs + message["bcc"]:
        if _CONTROL_CHARS.search(name) or _CONTROL_CHARS.search(addr):
            refuse("address %r holds a control character" % addr[:QUOTE_CHARS])
    for filename, mime_type, _ in attachments:
        if _CONTROL_CHARS.search(filename):
            refuse("attachment filename %r holds a control character" % filename[:QUOTE_CHARS])
        if len(mime_type) > MAX_MIME_TYPE_CHARS or not _MIME_TYPE.fullmatch(mime_type):
            refuse("attachment %s has MIME type %r" % (filename, mime_type[:QUOTE_CHARS]))


class _NotSimple(Exception):
    """Internal to _simple_mime: this message needs the email package."""


_PRINTABLE_ASCII = re.compile(r"[ -~]*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")   # what the email package splits on; not \f or \u2028


def _simple_mime(message, now):
    """``build_mime`` for a single text part with ASCII headers that fit in
    78 octets, or None when the message needs the email package."""
    if message["content_type"] == "html" and message.get("body_text") is not None:
        return None
    lines = []

    def add(name, value):
        line = "%s: %s" % (name, value)
        if len(line) > 78 or not _PRINTABLE_ASCII.fullmatch(value):
            raise _NotSimple()
        lines.append(line)

    def add_addresses(name, pairs):
        # one address per continuation line keeps long lists within 78 octets
        add(name, _format_address(*pairs[0]) + ("," if len(pairs) > 1 else ""))
        for index, pair in enumerate(pairs[1:], 1):
            text = " " + _format_address(*pair) + ("," if index < len(pairs) - 1 else "")
            if len(text) > 78 or not _PRINTABLE_ASCII.fullmatch(text):
                raise _NotSimple()
            lines.append(text)

    try:
        add_addresses("From", [message["from"]])
        if message["to"]:     # empty when every To recipient was suppressed
            add_addresses("To", message["to"])
        if message["cc"]:
            add_addresses("Cc", message["cc"])
        if message["reply_to"]:
            add_addresses("Reply-To", message["reply_to"])
        add("Subject", message["subject"])
        add("Date", email.utils.format_datetime(
            datetime.datetime.fromtimestamp(now, datetime.timezone.utc)))
        add("Message-ID", message["message_id"])
        for name, value in message["headers"].items():
            add(name, value)
    except _NotSimple:
        return None
    body = message["body"]
    text_lines = _LINE_BREAK.split(body[:-1] if body.endswith("\n") else body)
    if (_PRINTABLE_ASCII.fullmatch(body.replace("\n", " ").replace("\r", " ").replace("\t", " "))
            and max(len(line) for line in text_lines) <= 78):
        encoding, payload = "7bit", "\r\n".join(text_lines).encode("ascii") + b"\r\n"
    else:
        encoding = "quoted-printable"
        payload = binascii.b2a_qp("\n".join(text_lines).encode("utf-8") + b"\n",
                                  istext=True).replace(b"\n", b"\r\n")
    lines.append("MIME-Version: 1.0")
    lines.append('Content-Type: text/%s; charset="utf-8"' % message["content_type"])
    lines.append("Content-Transfer-Encoding: " + encoding)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload


def _rich_mime(message, attachments, now):
    """``build_mime`` through ``email.message.EmailMessage``."""
    import email.policy
    from email.message import EmailMessage
    policy = email.policy.SMTP.clone(cte_type="7bit", max_line_length=78)
    mime = EmailMessage(policy=policy)
    try:
        mime["From"] = _address_objects([message["from"]])
        if message["to"]:
            mime["To"] = _address_objects(message["to"])
        if message["cc"]:
            mime["Cc"] = _address_objects(message["cc"])
        if message["reply_to"]:
            mime["Reply-To"] = _address_objects(message["reply_to"])
        mime["Subject"] = message["subject"]
        mime["Date"] = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(now, datetime.timezone.utc))
        mime["Message-ID"] = message["message_id"]
        for name, value in message["headers"].items():
            mime[name] = value
        if message["content_type"] == "html":
            if message.get("body_text") is not None:
                mime.set_content(message["body_text"], subtype="plain", charset="utf-8")
                mime.add_alternative(message["body"], subtype="html", charset="utf-8")
            else:
                mime.set_content(message["body"], subtype="html", charset="utf-8")
        else:
            mime.set_content(message["body"], subtype="plain", charset="utf-8")
        for filename, mime_type, data in attachments:
            maintype, _, subtype = mime_type.partition("/")
            mime.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        return mime.as_bytes(policy=policy)
    except (ValueError, TypeError, IndexError, email.errors.MessageError) as exc:
        raise PermanentError("cannot build the message: %s" % exc) from exc


def build_mime(message, attachments, now):
    """The message as bytes ready for DATA: CRLF line ends, 7-bit clean
    (non-ASCII text goes quoted-printable or base64, headers RFC 2047), no
    line longer than 78 octets, Bcc nowhere in the headers.

    ``attachments`` is a list of (filename, mime_type, bytes).  Raises
    PermanentError when the message cannot be represented.  A single-part
    message whose headers are plain ASCII is written directly (the email
    package's header machinery is ~85% of the delivery CPU); anything else
    goes through ``email.message.EmailMessage``.
    """
    _check_header_fields(message, attachments)
    if not attachments:
        simple = _simple_mime(message, now)
        if simple is not None:
            return simple
    return _rich_mime(message, attachments, now)


def envelope(message, verp_address=None):
    """(sender, [recipients]) for the SMTP envelope: the message's own
    return_path, else ``verp_address`` (its VERP sender), else From; To, Cc
    and Bcc without duplicates."""
    sender = message["return_path"] or verp_address or message["from"][1]
    recipients = []
    for field in ("to", "cc", "bcc"):
        for _, addr in message[field]:
            if addr.lower() not in (r.lower() for r in recipients):
                recipients.append(addr)
    return sender, recipients


# ####################################################################### #
# #########  Bounces: VERP, DSN, qmail, Exim, the IMAP client  ########## #
# ####################################################################### #

# -- VERP (SPEC 8): a bounce names the message it is about --------------------

VERP_MAC_CHARS = 8   # 40 bits of HMAC: a forged bounce would have to guess them
_VERP_TOKEN = re.compile(r"[a-z2-7]{%d}[0-9a-z]{1,13}" % VERP_MAC_CHARS)


def _base36(number):
    """A non-negative integer in base 36 (digits, then lower-case letters)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if not number:
            return text


def verp_token(key, pk):
    """The VERP token of the message stored as row ``pk``: letters and
    digits only (lower case, as some MTAs fold local parts), at most 21
    characters: an HMAC of the row under the database's own key, then the
    row in base 36.  Only this database can make one, and reading it back
    needs no index."""
    mac = hmac.new(key, b"%d" % pk, hashlib.sha256).digest()
    return base64.b32encode(mac).decode("ascii").lower()[:VERP_MAC_CHARS] + _base36(pk)


def verp_pk(key, token):
    """The row a VERP token names, or None when it is not one of ours."""
    token = token.lower()
    if not _VERP_TOKEN.fullmatch(token):
        return None
    pk = int(token[VERP_MAC_CHARS:], 36)
    return pk if hmac.compare_digest(verp_token(key, pk), token) else None


def verp_sender(base, token):
    """``bounces+TOKEN@example.com`` from ``bounces@example.com``."""
    local, _, domain = base.rpartition("@")
    return "%s+%s@%s" % (local, token, domain)


def verp_token_of(base, address):
    """The token of a VERP address built on ``base`` (case-insensitive), or
    None when ``address`` is not one."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    base_local, _, base_domain = base.rpartition("@")
    prefix = base_local.lower() + "+"
    if domain.lower() != base_domain.lower() or not local.lower().startswith(prefix):
        return None
    return local[len(prefix):] or None


# -- bounces: reading delivery status notifications (SPEC 8) ------------------
# Pure functions: the bounce collector fetches a message and hands its bytes to
# parse_bounce.  RFC 3464 reports through the email package (compat32, raw
# header values, every value cleaned by one bounded function), and the two
# commonest plain-text formats: qmail's QSBMF and Exim's default bounce.

# Postfix returns at most 50 kB of the original, Exim 100 kB; a 1 MiB DSN
# parses in ~20 ms.  Larger messages are not parsed (kind "too_large").
MAX_BOUNCE_BYTES = 1 << 20
# multipart/ and message/ parts: the email package recurses once per level and
# checks every line against every enclosing boundary.
MAX_MIME_CONTAINERS = 32
MAX_CONTENT_TYPE_CHARS = 2048  # the email package's parameter parsing is quadratic
MAX_BOUNCE_RECIPIENTS = 1000   # entries reported from one bounce; the rest dropped
MAX_HEADER_VALUES = 20      # Delivered-To (one per hop) etc. values searched for VERP
MAX_FIELD_CHARS = 1000      # a DSN field or header value kept (RFC 5322 line: 998)
MAX_DIAGNOSTIC_CHARS = 1000  # diagnostic text kept; an SMTP reply line is <= 512

BOUNCE_KINDS = ("dsn", "qmail", "exim", "not_a_bounce", "too_large")
DSN_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")  # RFC 3464 2.3.3
# The headers that may carry the address a bounce was delivered to, most
# trustworthy first: the first two are written by the final MTA, To by anyone.
VERP_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "To")

# RFC 3463 section 3: class, subject, and the detail codes a bounce most
# often carries.  Details are defined independently of the class.
_STATUS_CLASSES = {"2": "Success", "4": "Persistent transient failure",
                   "5": "Permanent failure"}
_STATUS_SUBJECTS = {
    "0": "other or undefined status", "1": "addressing status",
    "2": "mailbox status", "3": "mail system status",
    "4": "network and routing status", "5": "mail delivery protocol status",
    "6": "message content or media status", "7": "security or policy status"}
_STATUS_DETAILS = {
    "1.1": "Bad destination mailbox address",
    "1.2": "Bad destination system address",
    "1.3": "Bad destination mailbox address syntax",
    "1.6": "Destination mailbox has moved, no forwarding address",
    "2.1": "Mailbox disabled, not accepting messages",
    "2.2": "Mailbox full",
    "2.3": "Message length exceeds administrative limit",
    "3.4": "Message too big for system",
    "4.1": "No answer from host",
    "4.2": "Bad connection",
    "4.4": "Unable to route",
    "4.7": "Delivery time expired",
    "7.1": "Delivery not authorized, message refused"}

_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")
# A failure's enhanced status code inside free text ("550 5.1.1 ...", qmail's
# "(#5.1.1)"); the look-arounds keep it from matching inside an IP address.
_STATUS_IN_TEXT = re.compile(r"(?<![0-9.])([45])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.])")
# A basic SMTP reply code at a line start or after a colon ("said: 550 ...").
_SMTP_CODE_IN_TEXT = re.compile(r"(?:^|:)[ \t]*([45])[0-9][0-9][ -]", re.M)
_ADDRESS_SEPARATORS = re.compile(r"[\s<>,;:\"()\[\]]+")
_TYPED_VALUE = re.compile(r"([A-Za-z0-9-]{1,40})[ \t]*;[ \t]*(.*)", re.S)  # "smtp; 550 ..."
_MESSAGE_ID = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>|([^<>\s@]+@[^<>\s@]+)")
_UNPRINTABLE_RUN = re.compile(r"[\s\x00-\x1f\x7f]+")
# A header value with its folded continuation lines (the email package also
# ends lines at a bare \r).
_FOLDED_VALUE = re.compile(rb"(?:[^\r\n]|(?:\r\n?|\n)[ \t])*")
_CONTENT_TYPE = b"content-type:"

_QMAIL_START = "Hi. This is the"          # QSBMF section 2: the body begins so
_EXIM_START = "This message was created automatically by mail delivery software."
_EXIM_COPY = "------ This is a copy of the message"


RecipientStatus = collections.namedtuple(
    "RecipientStatus", "recipient action status diagnostic")
RecipientStatus.__doc__ = """One recipient of a bounce: ``recipient`` as the
bounce names it, ``action`` (one of DSN_ACTIONS or "unknown"), ``status``
(RFC 3463 ``x.y.z``, or "" when nothing implies one) and ``diagnostic``
(the reason text, a DSN's Diagnostic-Code without its type prefix)."""

BounceReport = collections.namedtuple(
    "BounceReport", "kind verp_token original_rfc_message_id recipients")
BounceReport.__doc__ = """What parse_bounce read from one message: ``kind``
(one of BOUNCE_KINDS), the VERP token or None, the bounced message's
``"<id@domain>"`` or None, and a tuple of RecipientStatus."""


def bounce_type(action, status):
    """``"hard"``, ``"soft"``, ``"delayed"`` or None for one recipient.

    SPEC 8: ``failed`` with a 5.x.x status is a hard bounce, with 4.x.x a soft
    one; ``delayed`` is noted, not a bounce.  Anything else (delivered,
    relayed, a failure claiming 2.x.x) is None: nothing to record.
    """
    if action == "delayed":
        return "delayed"
    if action == "failed" and status[:2] == "5.":
        return "hard"
    if action == "failed" and status[:2] == "4.":
        return "soft"
    return None


def status_meaning(status):
    """A short English text for an RFC 3463 status such as ``"5.1.1"``: the
    detail's meaning when it is a common one, else the class and subject
    ("Permanent failure: mailbox status"), else the class alone ("5.0.0":
    "Permanent failure").  Raises ValueError for a string that is not a
    status code."""
    match = _STATUS.fullmatch(status) if isinstance(status, str) else None
    if not match:
        raise ValueError("not an RFC 3463 status code: %r" % (status,))
    klass, subject, detail = (str(int(group)) for group in match.groups())
    if subject + "." + detail in _STATUS_DETAILS:
        return _STATUS_DETAILS[subject + "." + detail]
    if subject in _STATUS_SUBJECTS and subject != "0":
        return "%s: %s" % (_STATUS_CLASSES[klass], _STATUS_SUBJECTS[subject])
    return _STATUS_CLASSES[klass]


def _normal_status(match):
    """``x.y.z`` without leading zeros from a match of ``_STATUS*``."""
    return ".".join(str(int(group)) for group in match.groups())


def _status_from_text(text, default):
    """The status a free-text diagnostic implies: its first enhanced code,
    else the class of its first SMTP reply code, else ``default``."""
    match = _STATUS_IN_TEXT.search(text)
    if match:
        return _normal_status(match)
    match = _SMTP_CODE_IN_TEXT.search(text)
    if match:
        return match.group(1) + ".0.0"
    return default


@functools.lru_cache(maxsize=1)
def _raw_header_policy():
    """compat32, but header values come back as the raw str (built at the
    first bounce: the email package is a heavy import for start-up).

    compat32 rather than ``email.policy.default``: the default policy parses
    every header it is asked for into structured objects, code with a history
    of exceptions and super-linear cases on malformed input; here every value
    goes through this module's own bounded cleaning instead.  And the raw str
    rather than compat32's ``Header`` wrapper, which would turn 8-bit text into
    U+FFFD where ``_clean`` recovers UTF-8.
    """

    import email.policy

    class RawHeaderPolicy(email.policy.Compat32):
        def header_fetch_parse(self, name, value):
            return value

    return RawHeaderPolicy()   # policies are immutable


def _parse_message(raw, headers_only=False):
    """A ``Message`` from bytes (``parse_bounce`` translates what this raises)."""
    import email.parser
    return email.parser.BytesParser(policy=_raw_header_policy()).parsebytes(
        raw, headersonly=headers_only)


def _clean(value, limit):
    """A header value or text as one printable line of at most ``limit``
    characters: bytes the parser carried as surrogate escapes are decoded as
    UTF-8 (else U+FFFD), and runs of whitespace and control characters, folding
    included, become one space.  Work is bounded by ``limit``, not by the input."""
    text = str(value)[:limit * 4]
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:   # a surrogate that is not an escaped byte
        text = text.encode("utf-8", "replace").decode("utf-8")
    return _UNPRINTABLE_RUN.sub(" ", text).strip()[:limit]


def _rfc_message_id(value):
    """``"<id@domain>"`` from a Message-ID header value, else None."""
    text = _clean(value, MAX_FIELD_CHARS) if value is not None else ""
    match = _MESSAGE_ID.fullmatch(text)
    found = match and (match.group(1) or match.group(2))
    return "<%s>" % found if found and len(found) <= MAX_RFC_MESSAGE_ID else None


def _rfc_message_id_in_text(text):
    """The Message-ID in the header block at the start of ``text`` (a quoted
    original message in a plain-text bounce), else None."""
    raw = text.lstrip("\r\n").encode("utf-8")
    return _rfc_message_id(_parse_message(raw, headers_only=True).get("Message-ID"))


def _body_text(message):
    """The decoded body of a single-part message as str, else None."""
    if message.is_multipart():
        return None
    payload = message.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


def _dsn_address(value):
    """The address of a Final-/Original-Recipient value ("rfc822; a@b"), else None."""
    text = _clean(value, MAX_FIELD_CHARS)
    typed = _TYPED_VALUE.fullmatch(text)
    address = (typed.group(2) if typed else text).strip().strip("<>").strip()
    if not address or len(address) > MAX_ADDR_SPEC:
        return None
    return address


def _dsn_recipient(fields):
    """A ``RecipientStatus`` from one per-recipient block (a ``Message`` whose
    headers are the fields), else None when the block names no recipient."""
    recipient = _dsn_address(fields.get("Final-Recipient", ""))
    recipient = recipient or _dsn_address(fields.get("Original-Recipient", ""))
    if recipient is None:
        return None
    action = _clean(fields.get("Action", ""), 40).lower().partition(" ")[0]
    action = action if action in DSN_ACTIONS else "unknown"
    diagnostic = _clean(fields.get("Diagnostic-Code", ""), MAX_DIAGNOSTIC_CHARS)
    typed = _TYPED_VALUE.fullmatch(diagnostic)
    diagnostic = typed.group(2).strip() if typed else diagnostic
    # RFC 3464 requires Status; when it is missing or garbled, the diagnostic
    # or (as a last resort) the action says what kind of failure this was.
    field = _clean(fields.get("Status", ""), 40).partition(" ")[0]
    match = _STATUS.fullmatch(field)
    default = {"failed": "5.0.0", "delayed": "4.0.0", "unknown": ""}.get(action, "2.0.0")
    status = _normal_status(match) if match else _status_from_text(diagnostic, default)
    return RecipientStatus(recipient, action, status, diagnostic)


def _returned_rfc_message_id(part):
    """The Message-ID in a DSN's third part (``message/rfc822`` or
    ``text/rfc822-headers``), else None."""
    if part.is_multipart():   # message/rfc822: parsed as a sub-message
        payload = part.get_payload()
        return _rfc_message_id(payload[0].get("Message-ID")) if payload else None
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return None
    return _rfc_message_id(_parse_message(raw, headers_only=True).get("Message-ID"))


def _parse_dsn(message):
    """``(original_rfc_message_id, recipients)`` of an RFC 3464 report, else None.

    A DSN is a top-level ``multipart/report; report-type=delivery-status`` with
    a ``message/delivery-status`` part; the original's headers are read from
    its first ``message/rfc822`` or ``text/rfc822-headers`` part.  (RFC 6533's
    message/global-delivery-status is not read: asyncmail does not send
    SMTPUTF8 mail, and only such mail gets one.)
    """
    if message.get_content_type() != "multipart/report":
        return None
    report_type = email.utils.collapse_rfc2231_value(message.get_param("report-type", ""))
    if report_type.lower() != "delivery-status" or not message.is_multipart():
        return None   # not a report, or its boundary is missing
    # (get_payload() only on multiparts: on a str payload 3.8 can raise.)
    parts = message.get_payload()
    status_parts = [part for part in parts if part.is_multipart()
                    and part.get_content_type() == "message/delivery-status"]
    if not status_parts:
        return None
    recipients = []
    for fields in status_parts[0].get_payload():
        entry = _dsn_recipient(fields)
        if entry is not None and len(recipients) < MAX_BOUNCE_RECIPIENTS:
            recipients.append(entry)
    original = None
    for part in parts:
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            original = _returned_rfc_message_id(part)
            break
    return original, recipients


def _paragraphs(lines):
    """Split lines into paragraphs: ``(first line index, [lines])`` for each
    run of non-blank lines."""
    paragraph, start = [], 0
    for index, line in enumerate(lines):
        if line.strip():
            if not paragraph:
                start = index
            paragraph.append(line)
        elif paragraph:
            yield start, paragraph
            paragraph = []
    if paragraph:
        yield start, paragraph


def _parse_qmail(text, lines):
    """``(original_rfc_message_id, recipients)`` of a qmail bounce, else None.

    QSBMF (https://cr.yp.to/proto/qsbmf.txt): the body begins "Hi. This is
    the"; after an introductory paragraph come failure paragraphs, whose first
    line is "<address>:" and the rest a description, then a break paragraph
    starting with "-", then the original message.  Every failure is permanent
    (status 5.0.0) unless the description quotes a code ("Remote host said:
    550 5.1.1 ...", qmail's own "(#5.1.1)").
    """
    if not text.startswith(_QMAIL_START):
        return None
    recipients, original = [], None
    paragraphs = _paragraphs(lines)
    next(paragraphs)   # the introduction
    for start, paragraph in paragraphs:
        first = paragraph[0].strip()
        if first.startswith("-"):
            original = _rfc_message_id_in_text("\n".join(lines[start + len(paragraph):]))
            break
        address = first[1:-2].strip()
        if (not (first.startswith("<") and first.endswith(">:")) or not address
                or len(address) > MAX_ADDR_SPEC or len(recipients) >= MAX_BOUNCE_RECIPIENTS):
            continue   # reserved for extensions, or one too many
        diagnostic = _clean(" ".join(paragraph[1:]), MAX_DIAGNOSTIC_CHARS)
        recipients.append(RecipientStatus(
            address, "failed", _status_from_text(diagnostic, "5.0.0"), diagnostic))
    return original, recipients


def _parse_exim(text, lines):
    """``(original_rfc_message_id, recipients)`` of an Exim plain-text bounce, else None.

    Exim's default text (its spec, "Customizing bounce and warning messages",
    and deliver.c): "This message was created automatically by mail delivery
    software.", a paragraph saying the message "could not be delivered" and
    ending "...address(es) failed:", then each address indented two spaces with
    its error indented four, then "------ This is a copy of the message..."
    and the original.  The failure is permanent: status 5.0.0 unless the error
    quotes a code.
    """
    first = next((index for index, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first].strip() != _EXIM_START:
        return None
    index = first + 1
    while index < len(lines) and not lines[index].rstrip().endswith("failed:"):
        index += 1
    intro = _clean(" ".join(lines[first:index + 1]), MAX_FIELD_CHARS)
    if index == len(lines) or "could not be delivered" not in intro:
        return None   # a delay warning, or something else
    failed, errors, original = [], None, None   # failed: [(address, [error line])]
    for number in range(index + 1, len(lines)):
        line = lines[number]
        if line.startswith(_EXIM_COPY):
            original = _rfc_message_id_in_text("\n".join(lines[number + 1:]))
            break
        if line.startswith(("    ", "\t")):          # an error line
            if errors is not None:
                errors.append(line)
        elif line.startswith("  ") and line.strip():   # an address
            address, errors = line.strip().strip("<>"), None
            if ("@" in address and " " not in address and len(address) <= MAX_ADDR_SPEC
                    and len(failed) < MAX_BOUNCE_RECIPIENTS):
                errors = []
                failed.append((address, errors))
        elif line.strip():   # "The following text was generated ..." and the like
            errors = None
    recipients = []
    for address, error_lines in failed:
        diagnostic = _clean(" ".join(error_lines), MAX_DIAGNOSTIC_CHARS)
        recipients.append(RecipientStatus(
            address, "failed", _status_from_text(diagnostic, "5.0.0"), diagnostic))
    return original, recipients


def _find_verp_token(message, verp_address):
    """The VERP token in the first of ``VERP_HEADERS`` that holds one, else None."""
    for name in VERP_HEADERS:
        for value in (message.get_all(name) or [])[:MAX_HEADER_VALUES]:
            for word in _ADDRESS_SEPARATORS.split(_clean(value, MAX_FIELD_CHARS)):
                token = verp_token_of(verp_address, word) if "@" in word else None
                if token:
                    return token
    return None


def _check_mime_limits(raw):
    """Raise BounceParseError unless every Content-Type field is at most
    ``MAX_CONTENT_TYPE_CHARS`` long and at most ``MAX_MIME_CONTAINERS`` of them
    declare a multipart or message type: the two things that make the email
    package's work grow faster than the input."""
    lowered, containers = raw.lower(), 0
    at = lowered.find(_CONTENT_TYPE)
    while at >= 0:
        end = at + len(_CONTENT_TYPE)
        if at == 0 or lowered[at - 1] in b"\r\n":   # a field, not words in a line
            value = _FOLDED_VALUE.match(lowered, end).group()
            if len(value) > MAX_CONTENT_TYPE_CHARS:
                raise BounceParseError("a Content-Type field longer than %d characters"
                                       % MAX_CONTENT_TYPE_CHARS)
            if value.lstrip(b" \t\r\n").startswith((b"multipart/", b"message/")):
                containers += 1
        at = lowered.find(_CONTENT_TYPE, end)
    if containers > MAX_MIME_CONTAINERS:
        raise BounceParseError("more than %d multipart or message parts" % MAX_MIME_CONTAINERS)


def _read_bounce(raw, verp_address):
    """``parse_bounce`` once the input passed its limits."""
    message = _parse_message(raw)
    token = _find_verp_token(message, verp_address) if verp_address else None
    found = _parse_dsn(message)
    if found is not None:
        return BounceReport("dsn", token, found[0], tuple(found[1]))
    text = _body_text(message)
    if text is not None:
        lines = text.splitlines()
        for kind, parse in (("qmail", _parse_qmail), ("exim", _parse_exim)):
            found = parse(text, lines)
            if found is not None:
                return BounceReport(kind, token, found[0], tuple(found[1]))
    return BounceReport("not_a_bounce", token, None, ())


def parse_bounce(raw_bytes, verp_address=None, max_bytes=MAX_BOUNCE_BYTES):
    """Read one message from the bounce mailbox.

    Returns a ``BounceReport``: kind ``"too_large"`` (nothing parsed) when
    ``raw_bytes`` is longer than ``max_bytes``; else the VERP token (when
    ``verp_address`` is set) from ``VERP_HEADERS`` and, for kind ``"dsn"``,
    ``"qmail"`` or ``"exim"``, the returned Message-ID and the recipients.
    Anything else is ``"not_a_bounce"``.  Linear in the input.

    Raises BounceParseError for a message with more MIME nesting or longer
    Content-Type fields than this module parses (``_check_mime_limits``) or
    one the email package fails on; TypeError when ``raw_bytes`` is not
    bytes.  Nothing else, whatever the bytes hold.
    """
    if not isinstance(raw_bytes, (bytes, bytearray)):
        raise TypeError("raw_bytes must be bytes")
    if len(raw_bytes) > max_bytes:
        return BounceReport("too_large", None, None, ())
    _check_mime_limits(raw_bytes)
    try:
        return _read_bounce(bytes(raw_bytes), verp_address)
    except (email.errors.MessageError, RecursionError, LookupError, ValueError,
            TypeError) as exc:
        # The email package records defects rather than raising, but not
        # always: on 3.8-3.10 a broken uuencoded body lets binascii.Error out
        # of get_payload(decode=True); 3.8's get_payload() raises TypeError on
        # an RFC 2231 charset.  The one place its exceptions are translated.
        raise BounceParseError("unparseable message: %s: %s"
                               % (type(exc).__name__, exc)) from exc


IMAP_TIMEOUT = 30.0      # seconds for each IMAP socket operation of the bounce collector


def _imap(imap, command, *args):
    """The data of an IMAP command that answered OK.  Raises ImapError for
    any other answer, and for what imaplib raises (a BAD answer, a dropped
    or garbled connection): its errors are translated here and in
    _imap_connect only."""
    import imaplib
    try:
        typ, data = getattr(imap, command)(*args)
    except imaplib.IMAP4.error as exc:
        raise ImapError("IMAP %s failed: %s" % (command.upper(),
                                                 str(exc)[:QUOTE_TEXT_CHARS])) from exc
    if typ != "OK":
        said = b" ".join(d for d in data if isinstance(d, bytes))[:QUOTE_TEXT_CHARS]
        raise ImapError("IMAP %s answered %s: %s" % (command.upper(), typ,
                                                     said.decode("utf-8", "replace")))
    return data


_FETCH_SIZE = re.compile(rb"UID (\d+) RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+) UID (\d+)")


def _imap_sizes(imap, uids):
    """{uid: size} of messages, in one FETCH."""
    sizes = {}
    for item in _imap(imap, "uid", "FETCH", b",".join(uids), "(RFC822.SIZE)"):
        line = item[0] if isinstance(item, tuple) else item
        match = _FETCH_SIZE.search(line or b"")
        if match:
            uid, size = (match.group(1), match.group(2)) if match.group(1) else (
                match.group(4), match.group(3))
            sizes[uid] = int(size)
    return sizes


def _imap_body(imap, uid):
    """The whole message, without setting \\Seen (BODY.PEEK)."""
    for item in _imap(imap, "uid", "FETCH", uid, "(BODY.PEEK[])"):
        if isinstance(item, tuple) and len(item) == 2:
            return item[1]
    return b""


def _imap_flag(imap, uid, flag):
    _imap(imap, "uid", "STORE", uid, "+FLAGS.SILENT", "(%s)" % flag)


def _imap_logout(imap):
    with contextlib.suppress(Exception):   # the mailbox may be gone already
        imap.logout()


def _imap_connect(settings):
    """Open, secure, authenticate and select the bounce folder; the
    ``imap_connect`` seam.  Implicit TLS with ``imap_ssl``, else STARTTLS,
    refused when the server does not offer it unless ``imap_plain``.
    Credentials go as UTF-8 through AUTHENTICATE PLAIN when offered.
    Raises ImapError or OSError (imaplib's and ssl's errors translated)."""
    import imaplib
    import ssl
    context = _ssl_context({"ca_file": settings.imap_ca_file or None,
                            "tls_verify": settings.imap_tls_verify})

    class Imap(imaplib.IMAP4):
        # a bounded socket on every Python (3.8's IMAP4 takes no timeout)
        def _create_socket(self, *args):
            return socket.create_connection((self.host, self.port), IMAP_TIMEOUT)

    class ImapSsl(imaplib.IMAP4_SSL):
        def _create_socket(self, *args):
            sock = socket.create_connection((self.host, self.port), IMAP_TIMEOUT)
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)

    where = "%s:%d" % (settings.imap_host, settings.imap_port)
    imap = None
    try:
        if settings.imap_ssl:
            imap = ImapSsl(settings.imap_host, settings.imap_port, ssl_context=context)
        else:
            imap = Imap(settings.imap_host, settings.imap_port)
            if "STARTTLS" in imap.capabilities:
                imap.starttls(ssl_context=context)
            elif not settings.imap_plain:
                raise ImapError("%s does not offer STARTTLS and imap_plain is false: "
                                "refusing to log in in plain text" % where)
        user, password = settings.imap_user, settings.imap_password
        if "AUTH=PLAIN" in imap.capabilities:
            blob = ("\0%s\0%s" % (user, password)).encode("utf-8")
            _imap(imap, "authenticate", "PLAIN", lambda challenge: blob)
        else:
            _imap(imap, "login", user, password)
        _imap(imap, "select", settings.folder)
        return imap
    except (imaplib.IMAP4.error, ssl.SSLError, ImapError, UnicodeError) as exc:
        if imap is not None:
            _imap_logout(imap)
        raise ImapError("%s: %s" % (where, type(exc).__name__ if isinstance(exc, UnicodeError)
                                    else exc)) from exc
    except OSError:
        if imap is not None:
            _imap_logout(imap)
        raise


# ####################################################################### #
# ##############################  Metrics  ############################## #
# ####################################################################### #

def _escape_label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_number(value):
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class Metrics:
    """In-memory counters and histograms, rendered in Prometheus text format
    0.0.4.  Thread-safe: every change takes the lock briefly; rendering copies
    under the lock and formats outside it."""

    SMTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    # The label of each family: "account" series are keyed by an account's
    # store key and shown as tenant and account_id; "tenant" by a tenant id.
    COUNTERS = (
        ("asyncmail_sent_total", "Messages accepted by the SMTP relay.", "account"),
        ("asyncmail_errors_total", "Messages failed permanently.", "account"),
        ("asyncmail_deferred_total",
         "Deferrals (rate limit, temporary failure, retry).", "account"),
        ("asyncmail_rate_limited_total", "Deferrals caused by an account rate limit.",
         "account"),
        ("asyncmail_report_posts_total", "Delivery report POSTs acknowledged by the upstream.",
         "tenant"),
        ("asyncmail_report_failures_total", "Delivery report POSTs that failed.", "tenant"),
        ("asyncmail_report_entries_total", "Delivery report entries acknowledged.", "tenant"),
        ("asyncmail_http_requests_total", "HTTP requests answered, by status code.", "code"),
        ("asyncmail_bounces_total", "Bounces matched to a sent message, by type.", "type"),
        ("asyncmail_bounces_unmatched_total",
         "Messages in the bounce mailbox not matched to a sent message (or not a bounce).",
         None),
        ("asyncmail_bounces_skipped_total",
         "Messages in the bounce mailbox too large or malformed to read.", None),
        ("asyncmail_suppressed_total", "Recipients dropped because they are suppressed.", None),
    )
    PER_ACCOUNT = ("asyncmail_sent_total", "asyncmail_errors_total",
                   "asyncmail_deferred_total", "asyncmail_rate_limited_total")

    def __init__(self):
        self._lock = threading.Lock()
        self._minutes = {}       # (tenant, minute) -> {outcome: n}, the last HOUR_KEPT
        self._counters = {name: {} for name, _, _ in self.COUNTERS}
        self._counters["asyncmail_bounces_total"].update({"hard": 0, "soft": 0})
        self._smtp_counts = [0] * (len(self.SMTP_BUCKETS) + 1)
        self._smtp_sum = 0.0

    PER_TENANT = ("asyncmail_report_posts_total", "asyncmail_report_failures_total",
                  "asyncmail_report_entries_total")

    def add_account(self, account_id):
        """Make the per-account series exist at 0 from now on (and the
        account's tenant's)."""
        with self._lock:
            for name in self.PER_ACCOUNT:
                self._counters[name].setdefault(account_id, 0)
        self.add_tenant(_tenant_of(account_id))

    def add_tenant(self, tenant):
        """Make the per-tenant series exist at 0 from now on."""
        with self._lock:
            for name in self.PER_TENANT:
                self._counters[name].setdefault(tenant, 0)

    def forget_tenant(self, tenant):
        """Drop the series of a deleted tenant (its chart's minutes too)."""
        with self._lock:
            self._minutes = {key: counts for key, counts in self._minutes.items()
                             if key[0] != tenant}
            for name, _, label in self.COUNTERS:
                if label == "account":
                    self._counters[name] = {k: v for k, v in self._counters[name].items()
                                            if _tenant_of(k) != tenant}
                elif label == "tenant":
                    self._counters[name].pop(tenant, None)

    def inc(self, name, label=None, amount=1):
        with self._lock:
            series = self._counters[name]
            series[label] = series.get(label, 0) + amount

    HOUR_KEPT = 60            # minutes of outcomes kept for the web page's chart
    TALLIED = ("sent", "deferred", "error")

    def tally(self, tenant, outcome, now):
        """Count one delivery outcome (sent, deferred, error) in its minute."""
        minute = int(now // 60)
        with self._lock:
            counts = self._minutes.get((tenant, minute))
            if counts is None:
                oldest = minute - self.HOUR_KEPT
                for key in [key for key in self._minutes if key[1] <= oldest]:
                    del self._minutes[key]
                counts = self._minutes[(tenant, minute)] = dict.fromkeys(self.TALLIED, 0)
            counts[outcome] = counts.get(outcome, 0) + 1

    def last_hour(self, now, tenant=None):
        """The outcomes of the last HOUR_KEPT minutes, oldest first: ``start``
        (the epoch second the first minute begins) and a list per outcome, of
        one tenant or (None) of all.  Kept in memory: a restart begins empty."""
        last = int(now // 60)
        first = last - self.HOUR_KEPT + 1
        series = {outcome: [0] * self.HOUR_KEPT for outcome in self.TALLIED}
        with self._lock:
            for (name, minute), counts in self._minutes.items():
                if first <= minute <= last and (tenant is None or name == tenant):
                    for outcome, n in counts.items():
                        series[outcome][minute - first] += n
        return dict(series, start=first * 60, minutes=self.HOUR_KEPT)

    def value(self, name, label=None):
        """One series' value; without ``label``, the family's total."""
        with self._lock:
            if label is None:
                return sum(self._counters[name].values())
            return self._counters[name].get(label, 0)

    def observe_smtp(self, seconds):
        with self._lock:
            for index, bound in enumerate(self.SMTP_BUCKETS):
                if seconds <= bound:
                    self._smtp_counts[index] += 1
                    break
            else:
                self._smtp_counts[-1] += 1
            self._smtp_sum += seconds

    def render(self, gauges):
        """The exposition text; ``gauges`` is [(name, help, value)] read by the
        caller from the store."""
        with self._lock:
            counters = {name: dict(series) for name, series in self._counters.items()}
            smtp_counts = list(self._smtp_counts)
            smtp_sum = self._smtp_sum
        lines = []
        for name, help_text, label in self.COUNTERS:
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s counter" % name)
            for key in sorted(counters[name], key=str):
                value = counters[name][key]
                if label == "account" and key is not None:
                    tenant, account_id = _unscoped(key)
                    lines.append('%s{tenant="%s",account_id="%s"} %d' % (
                        name, _escape_label(tenant), _escape_label(account_id), value))
                elif label and key is not None:
                    lines.append('%s{%s="%s"} %d' % (name, label, _escape_label(key), value))
                elif not label:
                    lines.append("%s %d" % (name, value))
            if not label and not counters[name]:
                lines.append("%s 0" % name)
        name = "asyncmail_smtp_send_duration_seconds"
        lines.append("# HELP %s Duration of SMTP transactions." % name)
        lines.append("# TYPE %s histogram" % name)
        cumulative = 0
        for bound, count in zip(self.SMTP_BUCKETS, smtp_counts):
            cumulative += count
            lines.append('%s_bucket{le="%g"} %d' % (name, bound, cumulative))
        cumulative += smtp_counts[-1]
        lines.append('%s_bucket{le="+Inf"} %d' % (name, cumulative))
        lines.append("%s_sum %r" % (name, smtp_sum))
        lines.append("%s_count %d" % (name, cumulative))
        for gauge_name, help_text, value in gauges:
            lines.append("# HELP %s %s" % (gauge_name, help_text))
            lines.append("# TYPE %s gauge" % gauge_name)
            if isinstance(value, dict):
                for labels, number in value.items():
                    text = ",".join('%s="%s"' % (k, _escape_label(v)) for k, v in labels)
                    lines.append("%s{%s} %s" % (gauge_name, text, _format_number(number)))
            else:
                lines.append("%s %s" % (gauge_name, _format_number(value)))
        return "\n".join(lines) + "\n"


# ####################################################################### #
# ###################  SMTP: relays and rate limits  #################### #
# ####################################################################### #

REUSE_CHECK_IDLE = 2.0   # seconds idle after which a cached connection gets a NOOP
RATE_LIMIT_ERROR = "rate limit exceeded"   # the error of limit_behavior = reject


MAX_LOGGED_RECIPIENTS = 5   # a delivery log line names the first few To addresses
MAX_LOGGED_REPLY = 200      # and the reply, on one line, cut to this
_ENHANCED_STATUS = re.compile(r"(?<![0-9.])[245]\.[0-9]{1,3}\.[0-9]{1,3}(?![0-9.])")


def _dsn(status, code, text):
    """The delivery status code of a log line (RFC 3463): the reply's own
    enhanced code, else one from the outcome (2.0.0, 4.0.0, 5.0.0)."""
    found = _ENHANCED_STATUS.search(text[:MAX_LOGGED_REPLY]) if text else None
    if found:
        return found.group(0)
    if code and 200 <= code < 600:
        return "%d.0.0" % (code // 100)
    return {"sent": "2.0.0", "deferred": "4.0.0"}.get(status, "5.0.0")


def _unexpected_cause(exc):
    """The traceback of what caused ``exc`` when that was no SMTP, socket or
    delivery error (a bug, or a relay saying what no code expects, caught by
    AUTH's catch-all), without its message, which may quote a credential;
    "" otherwise."""
    import smtplib
    cause = exc.__cause__
    if cause is None or isinstance(cause, (smtplib.SMTPException, OSError, DeliveryError)):
        return ""
    return ("\nTraceback (most recent call last):\n%s%s.%s (message withheld: it may hold "
            "a credential)") % ("".join(traceback.format_tb(cause.__traceback__)),
                               type(cause).__module__, type(cause).__qualname__)


def _reply_text(code, reply):
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return ("%s %s" % (code, " ".join(str(reply).split()))).strip()[:500]


def _b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _without_credentials(text, account):
    """``text`` with the account's user and password, and the base64 forms
    AUTH sent them in, masked wherever they stand as a word of their own: a
    relay may echo what it was sent (a short user name inside a longer word
    is left alone, or "u" would mask every u of the text)."""
    user, password = account.get("user") or "", account.get("password") or ""
    secrets = [password, user]
    secrets += [_b64(form) for form in (user, password, "\0%s\0%s" % (user, password))]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = re.sub(r"(?<!\w)%s(?!\w)" % re.escape(secret), "********", text)
    return text


def _smtp_login(conn, user, password, where):
    """AUTH with the first mechanism both sides speak (CRAM-MD5, PLAIN,
    LOGIN: smtplib's order), credentials as UTF-8.  smtplib's own ``login``
    encodes them as ASCII, so a non-ASCII password would fail with an error
    that quotes its characters.  Raises smtplib.SMTPAuthenticationError on
    refusal and SmtpTemporaryError when no mechanism fits."""
    import smtplib
    offered = conn.esmtp_features.get("auth", "").upper().split()
    if "CRAM-MD5" in offered:
        code, reply = conn.docmd("AUTH", "CRAM-MD5")
        if code == 334:
            challenge = base64.b64decode(reply, validate=False)
            digest = hmac.new(password.encode("utf-8"), challenge, "md5").hexdigest()
            code, reply = conn.docmd(_b64("%s %s" % (user, digest)))
    elif "PLAIN" in offered:
        code, reply = conn.docmd("AUTH", "PLAIN " + _b64("\0%s\0%s" % (user, password)))
    elif "LOGIN" in offered:
        code, reply = conn.docmd("AUTH", "LOGIN " + _b64(user))
        if code == 334:
            code, reply = conn.docmd(_b64(password))
    else:
        raise _smtp_error("%s offers no AUTH mechanism asyncmail speaks (CRAM-MD5, PLAIN, "
                          "LOGIN); offered: %s"
                          % (where, " ".join(offered)[:QUOTE_TEXT_CHARS] or "none"),
                          True, True)
    if code not in (235, 503):   # 503: already authenticated
        raise smtplib.SMTPAuthenticationError(code, reply)


def _close_quietly(conn):
    """QUIT, or just close when the connection is already broken."""
    import smtplib
    if conn is None:
        return
    try:
        conn.quit()
    except (smtplib.SMTPException, OSError):
        with contextlib.suppress(OSError):
            conn.close()


def _smtp_open(account, timeout, local_hostname):
    """A connected, greeted and (when the account has a user) authenticated
    SMTP connection: implicit TLS or STARTTLS as the account says, never a
    fallback to plain text when TLS was asked for.  Raises SmtpTemporaryError,
    account-level (connect, TLS, a refused session, AUTH), so the account's
    messages wait and are retried."""
    import smtplib
    import ssl
    host, port = account["host"], account["port"]
    where = "%s:%d" % (host, port)
    conn = None
    try:
        if account["use_ssl"]:
            conn = smtplib.SMTP_SSL(host, port, local_hostname=local_hostname,
                                    timeout=timeout, context=_ssl_context(account))
        else:
            conn = smtplib.SMTP(host, port, local_hostname=local_hostname, timeout=timeout)
        conn.ehlo_or_helo_if_needed()
        if account["use_tls"]:
            if not conn.has_extn("starttls"):
                raise _smtp_error("%s does not offer STARTTLS and use_tls is set: refusing "
                                  "to send in plain text" % where, True, True)
            conn.starttls(context=_ssl_context(account))
            conn.ehlo()
        if account.get("user"):
            try:
                _smtp_login(conn, account["user"], account.get("password") or "", where)
            except (SmtpTemporaryError, smtplib.SMTPException, OSError):
                raise
            except Exception as exc:   # whatever it is, its text may hold a credential
                raise _smtp_error("AUTH with %s failed: %s" % (where, type(exc).__name__),
                                  True, True) from exc
        return conn
    except SmtpTemporaryError:
        _close_quietly(conn)
        raise
    except smtplib.SMTPAuthenticationError as exc:
        _close_quietly(conn)
        raise _smtp_error("authentication failed at %s: %s"
                          % (where, _reply_text(exc.smtp_code, exc.smtp_error)),
                          True, True, exc.smtp_code) from exc
    except smtplib.SMTPResponseException as exc:
        _close_quietly(conn)
        raise _smtp_error("%s refused the session: %s"
                          % (where, _reply_text(exc.smtp_code, exc.smtp_error)),
                          True, True, exc.smtp_code) from exc
    except ssl.SSLError as exc:
        _close_quietly(conn)
        raise _smtp_error("TLS with %s failed: %s" % (where, exc), True, True) from exc
    except (smtplib.SMTPException, OSError) as exc:
        _close_quietly(conn)
        raise _smtp_error("cannot connect to %s: %s" % (where, exc or type(exc).__name__),
                          True, True) from exc


def _smtp_connect(account, timeout, local_hostname):
    """Open, greet, secure and authenticate one SMTP connection.

    The default ``smtp_connect`` seam; returns an ``smtplib.SMTP``.  Raises
    SmtpTemporaryError (account-level) for every failure: a relay that
    cannot be reached, refuses TLS or rejects the credentials is not the
    message's fault.  smtplib's and ssl's exceptions are translated here,
    and no text of the failure ever carries the account's credentials.
    """
    try:
        return _smtp_open(account, timeout, local_hostname)
    except _SMTP_ERRORS as exc:
        clean = _without_credentials(str(exc), account)
        if clean == str(exc):
            raise
        raise _smtp_error(clean, isinstance(exc, TemporaryError), exc.account_level,
                          exc.smtp_code) from None


class SmtpReply(collections.namedtuple("SmtpReply", "code text refused")):
    """A relay's acceptance of a message: the reply to DATA (code, text) and
    ``{recipient: "code text"}`` of recipients refused while others were
    accepted (empty when none)."""

    __slots__ = ()


class _StaleConnection(Exception):
    """Internal: the connection failed before the transaction took effect."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class SmtpRelay:
    """One account's SMTP connection, reused for up to ``ttl`` seconds.

    Used by one delivery thread at a time (the dispatcher never runs two jobs
    of one account at once).  A connection idle for a while is checked with
    NOOP before reuse; one the server dropped is replaced transparently when
    the drop shows before any recipient was accepted.
    """

    def __init__(self, account, timeout, connect, local_hostname, monotonic=time.monotonic):
        self.account = account
        self.where = "%s:%d" % (account["host"], account["port"])   # for logs and history
        self.timeout = timeout
        self._connect = connect
        self._local_hostname = local_hostname
        self._monotonic = monotonic
        self._conn = None
        self._opened = 0.0
        self._used = 0.0

    def _connection(self):
        """(connection, reused)."""
        now = self._monotonic()
        if self._conn is not None:
            if now - self._opened > self.account["ttl"]:
                self.close()
            elif now - self._used >= REUSE_CHECK_IDLE and not self._alive():
                self.close()
        if self._conn is not None:
            return self._conn, True
        self._conn = self._connect(self.account, self.timeout, self._local_hostname)
        self._opened = self._used = self._monotonic()
        return self._conn, False

    def _alive(self):
        import smtplib
        try:
            return self._conn.noop()[0] == 250
        except (smtplib.SMTPException, OSError):
            return False

    def idle_for(self):
        return self._monotonic() - self._used if self._conn is not None else None

    def close(self):
        conn, self._conn = self._conn, None
        _close_quietly(conn)

    def send(self, sender, recipients, data):
        """One transaction.  Returns the SmtpReply of an accepted message;
        raises SmtpTemporaryError or SmtpPermanentError."""
        import smtplib
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                return self._transaction(conn, sender, recipients, data)
            except _StaleConnection as exc:
                self.close()
                if not reused or attempt == 2:
                    raise _smtp_error("connection to %s lost: %s" % (self.where, exc.reason),
                                      True, True) from exc
            except _SMTP_ERRORS:
                self._reset()
                raise
            except (smtplib.SMTPException, OSError) as exc:
                self.close()
                raise _smtp_error("connection to %s lost during the transaction: %s" % (
                    self.where, exc or type(exc).__name__), True) from exc
            finally:
                self._used = self._monotonic()
            if self.account["ttl"] <= 0:
                self.close()

    def _reset(self):
        """RSET on the open connection after a failed transaction; a connection
        that cannot even do that is closed."""
        if self._conn is None:
            return
        import smtplib
        try:
            self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _transaction(self, conn, sender, recipients, data):
        """MAIL, RCPT for each recipient, DATA over ``conn``.  Returns the
        SmtpReply of an accepted message (with the recipients refused while
        others were accepted); raises SmtpPermanentError or
        SmtpTemporaryError for a refusal, and _StaleConnection when the
        server dropped the connection before MAIL was answered (the caller
        may then retry once on a fresh one).  Blocks up to the account's
        timeout per command."""
        import smtplib
        try:
            code, reply = conn.mail(sender)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise _StaleConnection(str(exc) or type(exc).__name__) from exc
        if code == 421:
            raise _StaleConnection(_reply_text(code, reply))
        if code != 250:
            raise _smtp_error("MAIL FROM refused: %s" % _reply_text(code, reply),
                              code < 500, smtp_code=code)
        refused = {}
        for recipient in recipients:
            code, reply = conn.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, _reply_text(code, reply))
        if len(refused) == len(recipients):
            temporary = any(code < 500 for code, _ in refused.values())
            detail = "; ".join("%s: %s" % (r, text) for r, (_, text) in refused.items())
            raise _smtp_error("all recipients refused: %s" % detail[:900], temporary,
                              smtp_code=min(code for code, _ in refused.values()))
        try:
            code, reply = conn.data(data)
        except smtplib.SMTPDataError as exc:   # DATA itself refused (no 354)
            code, reply = exc.smtp_code, exc.smtp_error
        if code != 250:
            raise _smtp_error("message refused after DATA: %s" % _reply_text(code, reply),
                              code < 500, smtp_code=code)
        if self.account["ttl"] <= 0:
            self.close()
        return SmtpReply(code, _reply_text(code, reply),
                         {r: text for r, (_, text) in refused.items()})


class RateLimiter:
    """Per-account sliding windows of 60 s, 1 h and 24 h over successful sends.

    The send log lives in the store (so a restart does not reset it); this
    keeps each account's last day of sends in memory, loaded on first use.
    Thread-safe.
    """

    WINDOWS = (("limit_per_minute", 60.0), ("limit_per_hour", 3600.0),
               ("limit_per_day", DAY))

    def __init__(self, store):
        self._store = store
        self._sends = {}
        self._lock = threading.Lock()

    def _log(self, account_id, now):
        """The account's recent send times (the last day), read from the send log once and
        kept in memory after."""
        sends = self._sends.get(account_id)
        if sends is None:
            loaded = self._store.sends_since(account_id, now - DAY)
            with self._lock:
                sends = self._sends.setdefault(account_id, loaded)
        cutoff = now - DAY
        with self._lock:
            drop = 0
            while drop < len(sends) and sends[drop] <= cutoff:
                drop += 1
            if drop:
                del sends[:drop]
            return list(sends)

    def _windows(self, account, now):
        """For each limit the account has: (window key, limit, span, the
        account's recent sends, the index of the first one inside the span)."""
        limits = [(key, account.get(key) or 0, span) for key, span in self.WINDOWS]
        limits = [(key, limit, span) for key, limit, span in limits if limit > 0]
        if not limits:
            return []
        sends = self._log(account["id"], now)
        import bisect
        return [(key, limit, span, sends, bisect.bisect_right(sends, now - span))
                for key, limit, span in limits]

    def allowance(self, account, now):
        """(messages that may be sent now or None for unlimited, instant the
        next slot frees when none may)."""
        allowed, free_at = None, None
        for _, limit, span, sends, start in self._windows(account, now):
            used = len(sends) - start
            room = limit - used
            if room <= 0:
                moment = sends[start + used - limit] + span
                free_at = moment if free_at is None else max(free_at, moment)
                room = 0
            allowed = room if allowed is None else min(allowed, room)
        return allowed, free_at

    def usage(self, account, now):
        """``{window: [sent in it, limit]}`` for each limit the account has
        (``minute``, ``hour``, ``day``)."""
        return {key[len("limit_per_"):]: [len(sends) - start, limit]
                for key, limit, _, sends, start in self._windows(account, now)}

    def record(self, account_id, ts):
        with self._lock:
            sends = self._sends.get(account_id)
            if sends is not None:
                sends.append(ts)

    def forget(self, account_id):
        with self._lock:
            self._sends.pop(account_id, None)


# ####################################################################### #
# ############  Delivery reports: entries, answers, targets  ############ #
# ####################################################################### #

class ReportTarget(collections.namedtuple("ReportTarget", "tenant url headers")):
    """Where one tenant's delivery reports go: its sync URL and the headers
    of its credentials (``Authorization``, or none)."""

    __slots__ = ()


class _Upstream:
    """One tenant's report target and its pacing: our back-off after a
    failure, its Retry-After, its next_sync_after, whether it has more work
    for us.  Changed only by the one report job it may have at a time
    (``busy``, under the reporter's lock)."""

    def __init__(self, target):
        self.target = target
        self.busy = False
        self.forced = False
        self.last_post = None
        self.failures = 0
        self.retry_at = 0.0        # our own back-off after a failure
        self.not_before = 0.0      # the upstream's Retry-After
        self.heartbeat_after = 0.0   # the upstream's next_sync_after
        self.more = False          # the upstream has more work for us

    @property
    def tenant(self):
        return self.target.tenant


def _report_target(record):
    """The ReportTarget of a tenant record (``client_base_url +
    client_sync_path``, its client_auth)."""
    settings = record["settings"]
    return ReportTarget(record["id"], _tenant_url(settings, "client_sync_path"),
                        _tenant_auth_headers(settings))


def _report_entry(event):
    """One delivery report entry (SPEC 5; a bounce adds SPEC 8's fields)."""
    tenant, ref = _unscoped(event["id"])
    entry = {"id": ref, "account_id": _name_of(event["account_id"]),
             "priority": event["priority"], "status": event["kind"],
             "sent_ts": event["sent_ts"], "error_ts": event["error_ts"],
             "error": event["error"], "deferred_ts": event["deferred_ts"]}
    if event["reason"]:
        entry["deferred_reason"] = event["reason"]
    if event["refused"]:
        entry["refused"] = event["refused"]
    if tenant != DEFAULT_TENANT:
        entry["tenant_id"] = tenant
    bounce = event.get("bounce")
    if bounce:
        entry.update({"bounce_ts": bounce["ts"], "bounce_type": bounce["type"],
                      "bounce_code": bounce["status"], "bounce_reason": bounce["reason"],
                      "bounce_recipient": bounce["recipient"]})
    return entry


_SUMMARY_FIELDS = ("sent", "error", "deferred", "queued", "next_sync_after")
GENROPY_JSON_SUFFIX = "::JS"   # Genropy's RPC answers: JSON text tagged with its type


MAX_SUMMARY_BYTES = 65536   # a summary is a few numbers; a larger answer is not one


def _parse_summary(answer):
    """The numbers of the upstream's summary (``sent``, ``error``,
    ``deferred``, ``queued``, ``next_sync_after``) as a dict; {} when the
    answer is not such a summary (plain JSON, or Genropy's ``{...}::JS``)."""
    try:
        text = answer[:MAX_SUMMARY_BYTES].decode("utf-8").strip()
    except UnicodeDecodeError:
        return {}
    if text.endswith(GENROPY_JSON_SUFFIX):
        text = text[:-len(GENROPY_JSON_SUFFIX)]
    try:
        data = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in _SUMMARY_FIELDS if _is_number(data.get(k))}


def _retry_after_seconds(value, now):
    """Seconds from ``now`` that a Retry-After header (delta-seconds or an
    HTTP date, RFC 9110 10.2.3) asks to wait, or None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if _ASCII_DIGITS.fullmatch(value) and len(value) <= 10:
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, moment.timestamp() - now)


# ####################################################################### #
# ##########  Workers: dispatcher, reporter, bounce collector  ########## #
# ####################################################################### #

class _Controls:
    """Suspension state, global, per tenant, per account (by store key) and
    per campaign (a tenant's batch code), shared by the API and the
    dispatcher.  Starts as ``[scheduler] active`` says; like Postfix's
    ``postsuper -h`` state it is the operator's, kept in memory only."""

    def __init__(self, active):
        self._lock = threading.Lock()
        self.active = bool(active)
        self._suspended = set()
        self._tenants = set()
        self._batches = {}    # tenant -> batch codes on hold

    def suspend_tenant(self, tenant, suspended=True):
        with self._lock:
            if suspended:
                self._tenants.add(tenant)
            else:
                self._tenants.discard(tenant)

    def tenant_active(self, tenant):
        with self._lock:
            return tenant not in self._tenants

    def hold_batch(self, tenant, batch_code, held=True):
        """Hold (or release) one campaign of a tenant: the claim skips its messages."""
        with self._lock:
            codes = self._batches.setdefault(tenant, set())
            if held:
                codes.add(batch_code)
            else:
                codes.discard(batch_code)
                if not codes:
                    del self._batches[tenant]

    def held_batches(self, tenant):
        """The batch codes of ``tenant`` on hold (a frozenset)."""
        with self._lock:
            return frozenset(self._batches.get(tenant, ()))

    def forget_tenant(self, tenant):
        with self._lock:
            self._tenants.discard(tenant)
            self._batches.pop(tenant, None)
            self._suspended = {key for key in self._suspended if _tenant_of(key) != tenant}

    def suspend(self, account_id=None):
        with self._lock:
            if account_id is None:
                self.active = False
            else:
                self._suspended.add(account_id)

    def activate(self, account_id=None):
        with self._lock:
            if account_id is None:
                self.active = True
            else:
                self._suspended.discard(account_id)

    def may_send(self, account_id=None):
        with self._lock:
            return self.active and (account_id is None or (
                account_id not in self._suspended
                and _tenant_of(account_id) not in self._tenants))

    def account_active(self, account_id):
        """The account's own flag, whatever the global one says."""
        with self._lock:
            return account_id not in self._suspended


class _Worker:
    """A loop thread: ``cycle(now)`` runs when woken, and every
    ``interval()`` seconds when ``poll`` is true.  Without ``poll`` (test
    mode) nothing but ``run_now`` starts a cycle, so a test drives each one;
    a test may also call ``cycle(now)`` itself.  A cycle returns the Events
    of work it started elsewhere (or nothing); a ``run_now`` that waits also
    waits for those.  An exception from a cycle is logged with its traceback
    and the loop carries on.  ``looked_up`` is when the loop last looked up
    (the systemd watchdog reads it)."""

    name = "asyncmail-worker"

    def __init__(self, log, now, poll):
        """``log`` for the loop's exceptions, ``now`` the epoch clock handed to each cycle,
        ``poll`` whether the loop runs by itself every ``interval()`` (false: test mode,
        only run-now)."""
        self.log = log
        self.now = now          # epoch seconds (durations use time.monotonic)
        self._poll = poll
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._await_work = 0.0   # seconds a waiting run_now lets the cycle's work take
        self._thread = None
        self.looked_up = time.monotonic()

    def interval(self):
        raise NotImplementedError

    def cycle(self, now):
        raise NotImplementedError

    def shutdown(self):
        pass

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self):
        """Ask for a cycle soon; without ``poll`` only run-now counts."""
        if self._poll:
            self._wake.set()

    def run_now(self, wait=None):
        """Request a cycle; with ``wait`` seconds, block until it and the
        work it started have finished (each piece of work waited for at most
        ``wait`` seconds)."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            if wait:
                self._await_work = max(self._await_work, wait)
        self._wake.set()
        if wait:
            with self._cond:
                self._cond.wait_for(lambda: self._done >= ticket or self._stop.is_set(), wait)

    def alive(self, max_age):
        """Whether the loop thread runs and has looked up within ``max_age`` s."""
        return (self._thread is not None and self._thread.is_alive()
                and time.monotonic() - self.looked_up < max_age)

    def stop(self, timeout):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.shutdown()

    @property
    def wake_pending(self):
        """Whether a cycle has been asked for and not begun (tests read it)."""
        return self._wake.is_set()

    def _run(self):
        """The thread's loop, until ``stop``: wait for a wake-up or the next
        poll (at most LOOK_UP_EVERY, so ``looked_up`` stays fresh for the
        watchdog), run ``cycle(now)`` with the injected ``now``, wait (for a
        run-now that asked to) on the Events of the work it started, then
        tell run-now's waiters the cycle is done.  A cycle's exception is
        logged with its traceback and the loop goes on; nothing but
        ``stop`` ends it."""
        next_cycle = time.monotonic() + self.interval() if self._poll else math.inf
        while not self._stop.is_set():
            woken = self._wake.wait(min(max(0.0, next_cycle - time.monotonic()),
                                        LOOK_UP_EVERY))
            self.looked_up = time.monotonic()
            if self._stop.is_set():
                break
            if not woken and time.monotonic() < next_cycle:
                continue
            self._wake.clear()
            with self._cond:
                ticket, await_work, self._await_work = self._requested, self._await_work, 0.0
            try:
                started = self.cycle(self.now()) or ()
                if await_work:
                    for done in started:
                        done.wait(await_work)
            except Exception:
                self.log.exception("%s: cycle failed", self.name)
            self.looked_up = time.monotonic()
            if self._poll:
                next_cycle = self.looked_up + self.interval()
            with self._cond:
                self._done = max(self._done, ticket)
                self._cond.notify_all()


class _Pool:
    """A fixed set of named daemon threads running submitted callables."""

    def __init__(self, size, name, log):
        self._jobs = queue.Queue()
        self._log = log
        self._threads = [threading.Thread(target=self._run, name="%s-%d" % (name, i),
                                          daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, job):
        """Run ``job()`` on a pool thread; returns an Event set when it ends."""
        done = threading.Event()
        self._jobs.put((job, done))
        return done

    def _run(self):
        """A pool thread: run jobs until the stop marker, each job's exception logged with
        its traceback; a job's Event is set however it ends."""
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                job()
            except Exception:   # a job is a unit of work like a thread's loop
                self._log.exception("delivery job failed")
            finally:
                done.set()

    def stop(self, timeout):
        """Let running jobs finish within ``timeout``; queued ones are dropped
        (their messages stay pending in the store)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Dispatcher(_Worker):
    """Finds due messages and delivers them, one job per account at a time,
    on a pool of ``max_workers`` threads.

    Given what it uses: the store, ``accounts()`` (a snapshot of the
    accounts), the suspension controls, the attachment fetcher, the metrics,
    ``now`` (epoch seconds), and ``on_delivered()``, called when a job changed
    messages (the core wakes the reporter with it).  ``monotonic`` measures
    durations.
    """

    name = "asyncmail-dispatcher"
    PRUNE_EVERY = 300.0   # seconds between send-log prunes

    def __init__(self, store, accounts, controls, fetcher, metrics, config, log, now,
                 poll, on_delivered, smtp_connect=None, monotonic=time.monotonic, verp=None,
                 endpoint=lambda tenant: None):
        """``verp``: a Verp when bounces come back by VERP;
        ``endpoint(tenant)``: the AttachmentEndpoint of a tenant, or None."""
        super().__init__(log, now, poll)
        self.verp = verp
        self.endpoint = endpoint
        self.store = store
        self.accounts = accounts
        self.controls = controls
        self.fetcher = fetcher
        self.metrics = metrics
        self.on_delivered = on_delivered
        self.monotonic = monotonic
        self.delivery = config.delivery
        self.window = config.scheduler.window
        self.timezone = config.scheduler.timezone
        self.activity = config.logging.delivery_activity
        self._connect = smtp_connect or _smtp_connect
        self._local_hostname = socket.gethostname() or "localhost"
        self._lock = threading.Lock()
        self._busy = set()
        self._relays = {}
        self._backoff = {}
        self._last_prune = None
        self.rate = RateLimiter(store)
        self._pool = None

    def start(self):
        self._pool = _Pool(self.delivery.max_workers, "asyncmail-smtp", self.log)
        super().start()

    def interval(self):
        return self.delivery.send_interval_seconds

    def wake_if_idle(self):
        """Wake the loop unless a delivery job runs: a job that ends wakes
        it anyway, so under steady intake the loop does not spin."""
        with self._lock:
            idle = not self._busy
        if idle:
            self.wake()

    def held_back(self, now):
        """``{account key: until}`` of the accounts held back after a relay
        failure or a full rate window, as of ``now``."""
        with self._lock:
            return {key: until for key, until in self._backoff.items() if until > now}

    def lift_backoff(self, account_id=None):
        """Forget the back-off of one account (or of all) after a relay
        failure or a full rate window, so the next cycle tries it again (an
        account still over its limit is deferred again to the exact instant)."""
        with self._lock:
            if account_id is None:
                self._backoff.clear()
            else:
                self._backoff.pop(account_id, None)

    def account_changed(self, account_id):
        """An account was added, replaced or deleted: drop its connection."""
        with self._lock:
            relay = None if account_id in self._busy else self._relays.pop(account_id, None)
            self._backoff.pop(account_id, None)
        if relay is not None:
            relay.close()
        self.rate.forget(account_id)
        self.wake()

    def _max_priority(self, now):
        if self.window is None:
            return 3
        moment = datetime.datetime.fromtimestamp(now, self.timezone)
        return 3 if self.window.contains(moment) else 1

    def cycle(self, now):
        """Promote what came due, then start a job for every account with
        due mail that is not busy, held back or suspended.  Returns the jobs'
        Events."""
        if self._last_prune is None or now - self._last_prune >= self.PRUNE_EVERY:
            self.store.prune_send_log(now - DAY)
            self.store.prune_suppressions(now)
            self._last_prune = now
        self._close_idle_relays()
        if not self.controls.active:
            return []
        self.store.promote_due(now)
        max_priority = self._max_priority(now)
        jobs = []
        for account_id, account in sorted(self.accounts().items()):
            with self._lock:
                if account_id in self._busy or self._backoff.get(account_id, 0) > now:
                    continue
            if not self.controls.may_send(account_id):
                continue
            if not self.store.has_pending(account_id, max_priority,
                                          self.controls.held_batches(_tenant_of(account_id))):
                continue
            with self._lock:
                self._busy.add(account_id)
            jobs.append(self._pool.submit(
                lambda account=account: self._deliver_account(account, max_priority, now)))
        return jobs

    def _close_idle_relays(self):
        """Close the relays idle past their account's ``ttl`` (none in use is touched)."""
        with self._lock:
            idle = [(k, r) for k, r in self._relays.items()
                    if k not in self._busy and (r.idle_for() or 0) > r.account["ttl"]]
            for key, _ in idle:
                del self._relays[key]
        for _, relay in idle:
            relay.close()

    def _relay(self, account):
        """The account's SmtpRelay, made anew when the account's settings changed (the old
        connection closed outside the lock)."""
        stale = None
        with self._lock:
            relay = self._relays.get(account["id"])
            if relay is None or relay.account != account:
                stale = relay
                relay = SmtpRelay(account, account.get("timeout")
                                  or self.delivery.smtp_timeout_seconds,
                                  self._connect, self._local_hostname, monotonic=self.monotonic)
                self._relays[account["id"]] = relay
        if stale is not None:
            stale.close()   # QUIT may wait: never under the lock
        return relay

    def _deliver_account(self, account, max_priority, now):
        """Send up to the account's batch_size due messages over its relay.

        Messages are claimed at most CLAIM_CHUNK at a time (a rate limit can
        only lower that) and a chunk's outcomes are committed together, so a
        crash resends at most one chunk: delivery is at-least-once.  ``now``
        is the cycle's; each later decision reads the clock again, because
        SMTP transactions take time.
        """
        account_id = account["id"]
        delivered = False
        try:
            relay = self._relay(account)
            budget = account["batch_size"]
            while budget > 0 and not self._stop.is_set() and self.controls.may_send(account_id):
                allowed, free_at = self.rate.allowance(account, now)
                if allowed == 0:
                    delivered = self._rate_limited(account, max_priority, budget, free_at, now)
                    break
                size = min(budget, CLAIM_CHUNK, CLAIM_CHUNK if allowed is None else allowed)
                chunk = self.store.claim(account_id, max_priority, size,
                                         self.controls.held_batches(_tenant_of(account_id)))
                if not chunk:
                    break
                budget -= len(chunk)
                account_down = self._send_chunk(relay, account, chunk)
                delivered = True
                if account_down:
                    break
                now = self.now()
        finally:
            with self._lock:
                self._busy.discard(account_id)
            if delivered:
                self.on_delivered()
                self.wake()

    def _send_chunk(self, relay, account, chunk):
        """Attempt each claimed message in turn and commit the chunk's
        outcomes together; the ones not attempted (stop, suspension, the
        relay down) go back to pending, whatever ends the loop.  Returns
        True when the relay itself failed, so the account's job ends."""
        outcomes = []
        try:
            for claim in chunk:
                if self._stop.is_set() or not self.controls.may_send(account["id"]):
                    break
                outcome = self._attempt(relay, account, claim)
                outcomes.append(outcome)
                if outcome.account_down:
                    break
        finally:
            outcomes.extend(Outcome.released(claim) for claim in chunk[len(outcomes):])
            self.store.record_outcomes(outcomes)
        return any(outcome.account_down for outcome in outcomes)

    def _rate_limited(self, account, max_priority, budget, free_at, now):
        """Over the account's rate limit: with ``limit_behavior = defer``
        the messages this cycle would have sent wait for the instant a slot
        frees (and the account is skipped until then); with ``reject`` they
        fail at once with ``rate limit exceeded``.  Returns whether any
        message changed."""
        account_id = account["id"]
        claims = self.store.claim(account_id, max_priority, budget,
                                  self.controls.held_batches(_tenant_of(account_id)))
        self.metrics.inc("asyncmail_rate_limited_total", account_id, len(claims))
        if account.get("limit_behavior") == "reject":
            self.store.record_outcomes([self._fail(c, now, RATE_LIMIT_ERROR) for c in claims])
            if claims:
                self.log.info("account %s over its rate limit: %d message(s) rejected",
                              _shown_key(account_id), len(claims))
            return bool(claims)
        self.store.record_outcomes([Outcome.deferred(c, now, free_at, "rate limit")
                                    for c in claims])
        for claim in claims:
            self._log_outcome(claim, "deferred", now, "rate limit of account %s"
                              % _shown_key(account_id), until=free_at)
        self.metrics.inc("asyncmail_deferred_total", account_id, len(claims))
        with self._lock:
            self._backoff[account_id] = free_at
        if claims:
            self.log.info("account %s over its rate limit: %d message(s) deferred until %s",
                          _shown_key(account_id), len(claims), _iso(free_at))
        return bool(claims)

    def _attempt(self, relay, account, claim):
        """One delivery attempt of a claimed message: its Outcome, with the
        Attempt behind it (``account_down`` when the relay itself failed)."""
        payload = claim.message()
        tenant = _tenant_of(claim.account_id)
        suppressed = self._drop_suppressed(tenant, payload)
        if suppressed and not (payload["to"] or payload["cc"] or payload["bcc"]):
            return self._fail(claim, self.now(), "all recipients suppressed")
        started = self.monotonic()
        try:
            endpoint = (self.endpoint(tenant) if any("storage_path" in a for a in
                                                     payload["attachments"]) else None)
            attachments = [self.fetcher.fetch(a, endpoint) for a in payload["attachments"]]
            data = build_mime(payload, attachments, self.now())
            del attachments
            sender, recipients = envelope(payload, self.verp and verp_sender(
                self.verp.base, verp_token(self.verp.key, claim.pk)))
            if not self.store.begin_send(claim.pk):
                # deleted, or failed by a forced account deletion, since the
                # claim: its transaction never begins (releasing it is a no-op)
                if self.activity:
                    self.log.info("not sending %s: it (or its account) was deleted "
                                  "since its claim", _shown_key(claim.ref))
                return Outcome.released(claim)
            reply = relay.send(sender, recipients, data)
        except DeliveryError as exc:
            return self._failed_attempt(relay, claim, exc, started)
        except Exception as exc:
            # A message that crashes the sender would otherwise come back after
            # every restart and block its chunk: fail it alone, loudly (this
            # is the boundary of one message's work, as a thread's loop is).
            self.log.exception("message %s of account %s could not be handled",
                               _shown_key(claim.ref), _shown_key(claim.account_id))
            relay.close()
            return self._fail(claim, self.now(), "internal error while sending: %s: %s"
                              % (type(exc).__name__, str(exc)[:QUOTE_TEXT_CHARS]))
        duration = self.monotonic() - started
        self.metrics.observe_smtp(duration)
        now = self.now()
        self.rate.record(claim.account_id, now)
        self.metrics.inc("asyncmail_sent_total", claim.account_id)
        refused = dict(reply.refused, **suppressed)
        attempt = Attempt(now, duration, relay.where, reply.code, reply.text, refused)
        self._log_outcome(claim, "sent", now, reply.text, attempt, refused=refused)
        return Outcome.sent(claim, now, refused, attempt)

    def _log_outcome(self, claim, status, now, text, attempt=None, until=None, refused=None):
        """The one line every outcome gets, Postfix's way (``id= to= relay=
        delay= dsn= status= (reply)``): sent and deferred at INFO, failed
        for good at WARNING.  Also counts the outcome in its minute (the web
        page's chart)."""
        self.metrics.tally(_tenant_of(claim.account_id), status, now)
        level = logging.WARNING if status == "error" else logging.INFO
        if not self.log.isEnabledFor(level):
            return   # [logging] level = WARNING: the sent and deferred lines cost nothing
        try:
            to = json.loads(claim.recipients or "[]")
        except ValueError:
            to = []
        shown = ",".join("<%s>" % _parse_address(a)[1] if "<" in a else "<%s>" % a
                         for a in to[:MAX_LOGGED_RECIPIENTS])
        if len(to) > MAX_LOGGED_RECIPIENTS:
            shown += ",+%d" % (len(to) - MAX_LOGGED_RECIPIENTS)
        text = " ".join(str(text).split())[:MAX_LOGGED_REPLY]
        delay = now - claim.created_ts if claim.created_ts is not None else 0.0
        self.log.log(level, "id=%s to=%s relay=%s delay=%s dsn=%s status=%s (%s)%s%s",
                     _shown_key(claim.ref), shown or "<>",
                     attempt.relay if attempt is not None else "none",
                     "%.2f" % delay if delay < 10 else "%d" % delay,
                     _dsn(status, attempt.code if attempt else None, text), status, text,
                     " until %s" % _iso(until) if until is not None else "",
                     " refused=%s" % ",".join(sorted(refused)) if refused else "")

    def _drop_suppressed(self, tenant, payload):
        """Take the recipients ``tenant`` suppressed out of to, cc and bcc
        (SPEC 8); returns ``{address: "suppressed: <reason>"}`` of those
        dropped."""
        addresses = [addr for field in ("to", "cc", "bcc") for _, addr in payload[field]]
        found = self.store.suppressed(addresses, self.now(), tenant)
        if not found:
            return {}
        reasons = {address.lower(): reason for address, (reason, _) in found.items()}
        dropped = {}
        for field in ("to", "cc", "bcc"):
            for _, addr in payload[field]:
                if addr.lower() in reasons:
                    dropped[addr] = "suppressed: %s" % reasons[addr.lower()]
            payload[field] = [pair for pair in payload[field] if pair[1] not in dropped]
        self.metrics.inc("asyncmail_suppressed_total", amount=len(dropped))
        return dropped

    def _failed_attempt(self, relay, claim, exc, started):
        """The Outcome of an attempt that raised a DeliveryError: failed when
        permanent, else deferred (or failed once retries are used up); an
        account-level failure also holds the account back until the retry."""
        duration = self.monotonic() - started
        if isinstance(exc, _SMTP_ERRORS):
            self.metrics.observe_smtp(duration)
        now = self.now()
        attempt = Attempt(now, duration, relay.where, exc.smtp_code, str(exc), None)
        if isinstance(exc, PermanentError):
            return self._fail(claim, now, str(exc), attempt)
        outcome = self._retry(claim, now, str(exc), attempt)
        if not exc.account_level:
            return outcome
        self.log.error("account %s: %s%s", _shown_key(claim.account_id), exc,
                       _unexpected_cause(exc))
        with self._lock:
            self._backoff[claim.account_id] = now + self._delay(claim.retry_count)
        return outcome._replace(account_down=True)

    def _delay(self, retry_count):
        delays = self.delivery.retry_delays
        return delays[min(retry_count, len(delays) - 1)]

    def _retry(self, claim, now, error, attempt):
        """The Outcome of a temporary failure: deferred by ``retry_delays[retry_count]``,
        or failed once ``max_retries`` are used up (the error says so)."""
        retries = claim.retry_count
        if retries >= self.delivery.max_retries:
            return self._fail(claim, now, "gave up after %d retries: %s" % (retries, error),
                              attempt)
        until = now + self._delay(retries)
        self.metrics.inc("asyncmail_deferred_total", claim.account_id)
        self._log_outcome(claim, "deferred", now, error, attempt, until=until)
        return Outcome.deferred(claim, now, until, "temporary failure", error, retries + 1,
                                attempt)

    def _fail(self, claim, now, error, attempt=None):
        self.metrics.inc("asyncmail_errors_total", claim.account_id)
        self._log_outcome(claim, "error", now, error, attempt)
        return Outcome.failed(claim, now, error, attempt)

    def shutdown(self):
        if self._pool is not None:
            self._pool.stop(self.delivery.smtp_timeout_seconds)
        with self._lock:
            relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.close()


class _Reporter(_Worker):
    """POSTs delivery report events upstream, each tenant's to its own
    target, and purges reported, finished messages past their retention.

    Each tenant is paced on its own: its report exchanges run as jobs on a
    small pool (REPORT_WORKERS threads, at most one job per tenant), so a
    site that is slow or down holds one thread and its own reports, never
    another site's.

    A 2xx answer acknowledges exactly the entries of that POST, whatever its
    body (Genropy answers ``{...}::JS``, or pure JSON).  Anything else leaves
    them queued and backs that tenant off (5 s doubling to 5 min; run-now
    retries at once).  With nothing to report it still POSTs an empty list
    every ``sync_interval_seconds`` so the upstream can push new work.

    The upstream paces it (SPEC 5): ``Retry-After`` on a 503 or 429 means
    no POST before then, run-now included; a summary with ``"queued": n >
    0``, or work handed over through add-messages while the POST was open
    (the pull flow), means POST again at once; ``next_sync_after`` postpones
    the next heartbeat (reports of new events still go).
    """

    name = "asyncmail-reporter"
    POLL = 1.0            # seconds between checks for new events
    PURGE_EVERY = 60.0    # seconds between retention purges
    BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0
    MAX_ANSWER_BYTES = 1 << 20
    # An upstream's pause longer than these is taken as these: a garbage date
    # must not silence reporting for good.
    MAX_RETRY_AFTER = 3600.0
    MAX_HEARTBEAT_PAUSE = DAY
    # POSTs in one job before it hands its thread back (stop flag, watchdog,
    # the other tenants); more work then continues in the next cycle, at once.
    MAX_POSTS_PER_CYCLE = 50
    REPORT_WORKERS = 4

    def __init__(self, store, metrics, config, log, now, poll, intake_serial, tls=None):
        """``intake_serial(tenant)`` counts a tenant's well-formed
        add-messages batches: work handed over while a POST was open means
        the upstream may have more; ``tls`` is a _LazyTls to share."""
        super().__init__(log, now, poll)
        self.store = store
        self.metrics = metrics
        self.intake_serial = intake_serial
        client = config.client
        self.client = client
        self.retention = config.delivery.delivery_report_retention_seconds
        self.activity = config.logging.delivery_activity
        self._last_purge = None
        self._purge_forced = False
        self._lock = threading.Lock()
        self._upstreams = {}
        self._tls = tls or _LazyTls()
        self._pool = None
        if client.client_sync_url:
            self.set_target(ReportTarget(DEFAULT_TENANT, client.client_sync_url,
                                         _auth_headers(client.client_sync_user,
                                                       client.client_sync_password,
                                                       client.client_sync_token)))

    def start(self):
        self._pool = _Pool(self.REPORT_WORKERS, "asyncmail-report", self.log)
        super().start()

    def shutdown(self):
        if self._pool is not None:
            self._pool.stop(self.client.timeout_seconds + 1)

    def set_target(self, target):
        """Report ``target.tenant``'s events to ``target`` from now on
        (its pacing state stays)."""
        with self._lock:
            upstream = self._upstreams.get(target.tenant)
            if upstream is None:
                self._upstreams[target.tenant] = _Upstream(target)
            else:
                upstream.target = target
        self.metrics.add_tenant(target.tenant)

    def drop_target(self, tenant):
        with self._lock:
            self._upstreams.pop(tenant, None)

    def interval(self):
        return min(self.POLL, self.client.sync_interval_seconds)

    def run_now(self, wait=None, tenant=None):
        """A cycle now for every tenant (or just ``tenant``), past our own
        back-off; see _Worker.run_now."""
        with self._lock:
            for upstream in self._upstreams.values():
                if tenant is None or upstream.tenant == tenant:
                    upstream.forced = True
            self._purge_forced = True
        super().run_now(wait)

    def cycle(self, now):
        """Purge what is past retention, then start a report job for every
        tenant that is due (forced, heartbeat, more work, or events waiting)
        and has none running.  Returns the jobs' Events."""
        if (self._purge_forced or self._last_purge is None
                or now - self._last_purge >= self.PURGE_EVERY):
            self._purge_forced = False
            self._last_purge = now
            removed = self.store.purge_reported(now - self.retention)
            if removed:
                self.log.info("purged %d reported message(s) past retention", removed)
        jobs = []
        with self._lock:
            upstreams = [u for u in self._upstreams.values() if not u.busy]
        for upstream in upstreams:
            if not self._due(upstream, now):
                continue
            with self._lock:
                if upstream.busy:
                    continue
                upstream.busy = True
                forced, upstream.forced = upstream.forced, False
            jobs.append(self._pool.submit(
                lambda upstream=upstream, forced=forced: self._serve(upstream, forced, now)))
        return jobs

    def _due(self, upstream, now):
        """Whether a tenant's upstream gets a POST this cycle: not while paced or
        backing off, at once when forced or more events wait, else when
        events exist or its heartbeat is due."""
        if now < upstream.not_before:
            return False
        if upstream.forced or upstream.more:
            return True
        if now < upstream.retry_at:
            return False
        return self._heartbeat_due(upstream, now) or self.store.has_events(upstream.tenant)

    def _heartbeat_due(self, upstream, now):
        return ((upstream.last_post is None
                 or now - upstream.last_post >= self.client.sync_interval_seconds)
                and now >= upstream.heartbeat_after)

    def _serve(self, upstream, forced, now):
        """One tenant's report job: POST its events, batch after batch,
        while there are any or the upstream has more work for us."""
        try:
            want_post = forced or upstream.more or self._heartbeat_due(upstream, now)
            for _ in range(self.MAX_POSTS_PER_CYCLE):
                if self._stop.is_set():
                    return
                events = self.store.pending_events(self.client.batch_size, upstream.tenant)
                if not events and not want_post:
                    return
                intake = self.intake_serial(upstream.tenant)
                summary = self._post(upstream, events, now)
                if summary is None:
                    return
                upstream.more = (_is_number(summary.get("queued")) and summary["queued"] > 0
                                 or self.intake_serial(upstream.tenant) != intake)
                want_post = upstream.more
                now = self.now()
            self.wake()   # more to do: the next cycle follows at once
        finally:
            with self._lock:
                upstream.busy = False

    def _post(self, upstream, events, now):
        """One report POST.  Returns the upstream's summary (a dict, maybe
        empty) when it acknowledged the entries, None when it did not."""
        target = upstream.target
        entries = [_report_entry(event) for event in events]
        body = json.dumps({"delivery_report": entries}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Connection": "close",
                   "User-Agent": "asyncmail/" + __version__}
        headers.update(target.headers)
        status, retry_after, answer, problem = None, None, b"", None
        try:
            status, retry_after, answer = self._exchange(target.url, body, headers)
            if not 200 <= status < 300:
                problem = "HTTP %d" % status
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
        if problem is not None:
            self._failed(upstream, problem, status, retry_after, len(entries), now)
            return None
        self.store.acknowledge_events(events, self.now())
        upstream.failures, upstream.retry_at, upstream.last_post = 0, 0.0, now
        self.looked_up = time.monotonic()
        self.metrics.inc("asyncmail_report_posts_total", target.tenant)
        self.metrics.inc("asyncmail_report_entries_total", target.tenant, len(events))
        summary = _parse_summary(answer)
        after = summary.get("next_sync_after")
        if _is_number(after):
            upstream.heartbeat_after = min(after, now + self.MAX_HEARTBEAT_PAUSE)
        counts = {k: summary[k] for k in ("sent", "error", "deferred", "queued") if k in summary}
        if self.activity or counts:
            self.log.info("delivery report to %s: %d entr%s acknowledged (HTTP %d)%s",
                          _redact_url(target.url), len(entries),
                          "y" if len(entries) == 1 else "ies", status,
                          "; upstream summary %s" % counts if counts else "")
        return summary

    def _failed(self, upstream, problem, status, retry_after, kept, now):
        """Back the tenant off after a POST that was not acknowledged: until
        the upstream's Retry-After on a 503/429 that has one, else 5 s
        doubling."""
        upstream.failures += 1
        pause = None
        if status in (429, 503):
            pause = _retry_after_seconds(retry_after, now)
        if pause is not None:
            delay = min(pause, self.MAX_RETRY_AFTER)
            upstream.not_before = now + delay
        else:
            delay = min(self.BACKOFF_MAX, self.BACKOFF_FIRST * 2 ** (upstream.failures - 1))
        upstream.retry_at = now + delay
        self.metrics.inc("asyncmail_report_failures_total", upstream.tenant)
        self.log.warning("delivery report to %s failed (%s); %d entr%s kept, retry in %gs%s",
                         _redact_url(upstream.target.url), problem, kept,
                         "y" if kept == 1 else "ies", delay,
                         " (the upstream's Retry-After)" if pause is not None else "")

    def _exchange(self, url, body, headers):
        """POST ``body`` to ``url``; returns (status, Retry-After header, answer bytes).

        The whole exchange, connect to last byte, is bounded by
        ``timeout_seconds``: a per-read timeout alone lets an upstream that
        drips one byte at a time hold the reporter for ever.  No redirect is
        followed (a 3xx is just not a 2xx: a redirect would carry the
        credentials elsewhere, or turn the POST into a GET that
        "acknowledges" everything).  Raises OSError, http.client.HTTPException.
        """
        target, timeout = urllib.parse.urlsplit(url), self.client.timeout_seconds
        deadline = time.monotonic() + timeout     # the fetcher's way: every socket
        port = target.port or (443 if target.scheme == "https" else 80)   # op ends by it
        address = socket.getaddrinfo(target.hostname, port, type=socket.SOCK_STREAM)[0][4][0]
        conn = _pinned_connection(target.scheme, target.hostname, port, address, deadline,
                                  self._tls.get() if target.scheme == "https" else None)
        path = (target.path or "/") + ("?" + target.query if target.query else "")
        try:
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            answer = response.read(self.MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException):
            if time.monotonic() >= deadline:
                raise socket.timeout("no complete answer within %gs" % timeout) from None
            raise
        finally:
            conn.close()
        return response.status, response.getheader("Retry-After"), answer


class _BounceCollector(_Worker):
    """Polls the ``[bounces]`` mailbox over IMAP and applies what it finds
    (SPEC 8): every unseen message is read (PEEK, so nothing changes until
    it is handled), parsed, matched to a sent message by VERP token or by
    its original Message-ID, recorded and reported; then it is marked seen
    (or, matched and ``after = delete``, deleted), so each is counted once.
    A message too large or too malformed to read is counted, marked seen
    and left in place; so is one that matches nothing.

    A mailbox that is down, refuses the login or misbehaves is logged
    (never with a secret) and tried again after a back-off that doubles
    from ``poll_interval_seconds`` to an hour.  Given the store, metrics,
    the ``[bounces]`` section, ``verp`` (a Verp or None), ``now`` and
    ``on_bounce()`` (the core wakes the reporter with it); ``imap_connect``
    is the seam that opens, secures and logs in.
    """

    name = "asyncmail-bounces"
    BACKOFF_MAX = 3600.0     # seconds between tries of a mailbox that keeps failing
    MAX_PER_CYCLE = 1000     # messages handled per poll; the rest wait for the next

    def __init__(self, store, metrics, settings, verp, log, now, poll, on_bounce,
                 imap_connect=None):
        super().__init__(log, now, poll)
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.verp = verp
        self.on_bounce = on_bounce
        self._connect = imap_connect or _imap_connect
        self._failures = 0
        self._retry_at = 0.0
        self._polled = None        # (when, bounces found) of the last good poll
        self._problem = None       # the last failure's text, without credentials

    def state(self):
        """For the web page: the mailbox, its last good poll, and while it
        fails the failure (no credential in it) and the next try."""
        polled = self._polled or (None, None)
        return {"mailbox": "%s:%d" % (self.settings.imap_host, self.settings.imap_port),
                "last_poll": polled[0], "last_found": polled[1],
                "failures": self._failures, "problem": self._problem if self._failures else None,
                "retry_at": self._retry_at if self._failures else None}

    def interval(self):
        return self.settings.poll_interval_seconds

    def cycle(self, now):
        """One poll of the mailbox, unless backing off after a failure:
        connect, read each unseen message, record what it is, mark it seen
        (or delete a matched one), log out.  A refused or failing mailbox
        is logged and backs off (the poll interval doubling to an hour)."""
        if now < self._retry_at:
            return
        try:
            imap = self._connect(self.settings)
        except (OSError, ImapError) as exc:
            return self._failed(exc, now)
        try:
            found = self._collect(imap, now)
        except (OSError, ImapError) as exc:
            return self._failed(exc, now)
        finally:
            _imap_logout(imap)
        self._failures, self._retry_at = 0, 0.0
        self._polled = (now, found)
        if found:
            self.on_bounce()

    def _failed(self, exc, now):
        """A failed poll: back off (doubling up to BACKOFF_MAX) and log it
        without a credential."""
        self._failures += 1
        delay = min(self.BACKOFF_MAX, self.settings.poll_interval_seconds
                    * 2 ** (self._failures - 1))
        self._retry_at = now + delay
        text = _without_credentials(str(exc), {"user": self.settings.imap_user,
                                              "password": self.settings.imap_password})
        self._problem = text[:QUOTE_TEXT_CHARS]
        self.log.warning("bounce mailbox %s:%d: %s; next try in %gs", self.settings.imap_host,
                         self.settings.imap_port, text[:300], delay)

    def _collect(self, imap, now):
        """Handle the unseen messages; returns how many bounces were new."""
        uids = _imap(imap, "uid", "SEARCH", None, "UNSEEN")[0].split()[:self.MAX_PER_CYCLE]
        sizes = _imap_sizes(imap, uids) if uids else {}
        new, deleted = 0, False
        for uid in uids:
            self.looked_up = time.monotonic()
            size = sizes.get(uid)
            if size is None or size > MAX_BOUNCE_BYTES:
                self.metrics.inc("asyncmail_bounces_skipped_total")
                self.log.info("bounce mailbox: message %s skipped (%s)", uid.decode(),
                              "too large" if size else "no size")
                _imap_flag(imap, uid, "\\Seen")
                continue
            raw = _imap_body(imap, uid)
            matched, count = self._apply(raw, now)
            new += count
            if matched and self.settings.after == "delete":
                _imap_flag(imap, uid, "\\Deleted")
                deleted = True
            else:
                _imap_flag(imap, uid, "\\Seen")
        if deleted:
            _imap(imap, "expunge")
        return new

    def _apply(self, raw, now):
        """Parse one message and record its bounces: (matched, new bounces)."""
        try:
            report = parse_bounce(raw, self.verp.base if self.verp else None)
        except BounceParseError as exc:
            self.metrics.inc("asyncmail_bounces_skipped_total")
            self.log.info("bounce mailbox: a message could not be read: %s",
                          str(exc)[:QUOTE_TEXT_CHARS])
            return False, 0
        except Exception:
            # a parser bug must not stall the mailbox on one message at every
            # poll: skip it, loudly (one message's boundary, like a job's)
            self.metrics.inc("asyncmail_bounces_skipped_total")
            self.log.exception("bounce mailbox: reading a message failed")
            return False, 0
        found = None
        if report.kind in ("dsn", "qmail", "exim"):
            if report.verp_token and self.verp:
                pk = verp_pk(self.verp.key, report.verp_token)
                found = self.store.find_sent(pk=pk) if pk else None
            if found is None and report.original_rfc_message_id:
                found = self.store.find_sent(rfc_message_id=report.original_rfc_message_id)
        if found is None:
            self.metrics.inc("asyncmail_bounces_unmatched_total")
            return False, 0
        key, sent_ts, recipients = found
        new = 0
        suppress = self.settings.suppress_days
        for entry in report.recipients:
            kind = bounce_type(entry.action, entry.status)
            if kind == "delayed":
                self.log.info("message %s delayed for %s: %s %s", key.ref, entry.recipient,
                              entry.status, entry.diagnostic[:QUOTE_TEXT_CHARS])
                continue
            # only the message's own recipients: a bounce must not suppress others
            if kind is None or entry.recipient.lower() not in recipients:
                continue
            reason = entry.diagnostic or status_meaning(entry.status)
            bounce = {"recipient": entry.recipient, "type": kind, "status": entry.status,
                      "diagnostic": entry.diagnostic or None, "reason": reason, "ts": now,
                      "error": "bounced: %s: %s %s" % (entry.recipient, entry.status, reason)}
            if self.store.record_bounce(key, sent_ts, bounce,
                                        now + suppress * DAY if suppress else None):
                new += 1
                self.metrics.inc("asyncmail_bounces_total", kind)
        return True, new


# ####################################################################### #
# #################  Web page: HTML, style and script  ################## #
# ####################################################################### #

# One page at ``/`` (issue 20): the queue, the messages, the operator's
# actions.  It holds no data itself: its script reads the API with the token
# the admin types, kept in the tab's sessionStorage and sent as X-API-Token
# (a header no other site can make a browser send), so the page and its two
# files need no token, and the browser rules (loopback Host, same Origin,
# JSON bodies) still hold for every API request it makes without one.
# Everything is text built with textContent, never markup from data; the CSP
# allows this origin's files only (no inline script or style, no frames).

PAGE_HTML = r"""
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>asyncmail</title>
<link rel="stylesheet" href="/ui/app.css">
<script src="/ui/app.js" defer></script>
</head>
<body>
<header>
  <h1>asyncmail</h1>
  <nav id="nav" hidden><a href="#/">Overview</a><a href="#/messages">Messages</a></nav>
  <span id="live" class="muted"></span>
  <button id="logout" type="button" hidden>Log out</button>
</header>
<div id="notice" role="status" hidden></div>
<section id="login" hidden>
  <form id="login-form">
    <h2>Log in</h2>
    <p class="muted">The admin token or a tenant's API key. It is kept in this tab only.</p>
    <label>API token <input id="token" type="password" autocomplete="off" required></label>
    <button type="submit">Log in</button>
    <p id="login-error" class="error"></p>
  </form>
</section>
<main id="app" hidden>
  <section id="view-overview" hidden>
    <div class="bar"><h2>Queue</h2><span id="daemon-state"></span>
      <button id="run-now" type="button">Run now</button></div>
    <div id="counts" class="cards"></div>
    <div id="tenants"></div>
    <h2>Last hour</h2>
    <canvas id="chart" width="720" height="160"></canvas>
    <div id="legend" class="legend"><span class="key-sent">sent</span>
      <span class="key-deferred">deferred</span><span class="key-error">error</span></div>
    <h2>Accounts</h2>
    <table id="accounts"><thead><tr><th>Account</th><th>Tenant</th><th>Relay</th>
      <th>State</th><th>Rate limit use</th><th>Pending</th><th>Deferred</th><th>Held</th>
      <th>Sending</th><th></th></tr></thead><tbody></tbody></table>
    <h2>Bounce mailbox</h2>
    <p id="bounces" class="muted"></p>
  </section>
  <section id="view-messages" hidden>
    <form id="filters" class="filters">
      <label>Status <select name="status"><option value="">any</option>
        <option>pending</option><option>deferred</option><option>held</option>
        <option>sending</option><option>sent</option><option>error</option></select></label>
      <label>Tenant <input name="tenant_id" size="10"></label>
      <label>Account <input name="account_id" size="10"></label>
      <label>Since <input name="since" type="datetime-local"></label>
      <label>Until <input name="until" type="datetime-local"></label>
      <label>Id prefix <input name="id_prefix" size="10"></label>
      <label>Search <input name="search" size="16" placeholder="recipient or subject"></label>
      <label>Order <select name="order"><option value="newest">newest</option>
        <option value="oldest">oldest</option></select></label>
      <button type="submit">Show</button>
    </form>
    <p id="list-info" class="muted"></p>
    <table id="messages"><thead><tr><th>Id</th><th>Status</th><th>Tenant</th><th>Account</th>
      <th>To</th><th>Subject</th><th>Created</th><th>Tries</th><th>Reason</th></tr></thead>
      <tbody></tbody></table>
    <div class="bar"><button id="first-page" type="button">First page</button>
      <button id="next-page" type="button">Next page</button></div>
  </section>
  <section id="view-message" hidden>
    <div class="bar"><h2 id="message-title"></h2><span id="message-actions"></span></div>
    <table id="record" class="record"><tbody></tbody></table>
    <h3>Attempts</h3>
    <table id="attempts"><thead><tr><th>When</th><th>Outcome</th><th>Relay</th><th>Code</th>
      <th>Reply</th><th>Seconds</th></tr></thead><tbody></tbody></table>
    <h3>Bounces</h3>
    <table id="bounce-list"><thead><tr><th>When</th><th>Recipient</th><th>Type</th>
      <th>Status</th><th>Diagnostic</th></tr></thead><tbody></tbody></table>
    <h3>MIME headers, as built for sending (Date is set when it is sent)</h3>
    <pre id="mime"></pre>
  </section>
</main>
<div id="confirm" hidden>
  <div class="dialog" role="dialog" aria-modal="true">
    <p id="confirm-text"></p>
    <button id="confirm-yes" type="button">Confirm</button>
    <button id="confirm-no" type="button">Cancel</button>
  </div>
</div>
</body>
</html>
"""

PAGE_STYLE = r"""
:root { --fg: #1d232a; --muted: #66707a; --line: #d9dee3; --bg: #fff; --accent: #2160c4;
  --sent: #2e9d57; --deferred: #d99a1c; --error: #cc3b3b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; align-items: center; gap: 1.5em; padding: .6em 1.2em;
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.2em; margin: 0; }
nav a { margin-right: 1em; color: var(--accent); text-decoration: none; }
main, #login { padding: 0 1.2em 2em; }
h2 { font-size: 1.05em; margin: 1.2em 0 .5em; }
h3 { font-size: .95em; margin: 1em 0 .4em; }
.muted { color: var(--muted); }
.error { color: var(--error); }
.bar { display: flex; align-items: center; gap: 1em; }
.cards { display: flex; flex-wrap: wrap; gap: .6em; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .5em .9em; min-width: 7.5em;
  color: inherit; text-decoration: none; }
.card b { display: block; font-size: 1.5em; }
table { border-collapse: collapse; width: 100%; margin: .3em 0; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-weight: 600; color: var(--muted); }
td.reason { color: var(--error); max-width: 28em; overflow-wrap: anywhere; }
.record th { width: 12em; }
pre { background: #f5f7f9; padding: .8em; overflow-x: auto; }
button { font: inherit; padding: .25em .8em; border: 1px solid var(--line); border-radius: 4px;
  background: #f5f7f9; cursor: pointer; }
button:disabled { opacity: .5; cursor: default; }
.filters { display: flex; flex-wrap: wrap; gap: .6em; align-items: end; margin: 1em 0 .4em; }
.filters label { display: flex; flex-direction: column; font-size: .85em; color: var(--muted); }
input, select { font: inherit; padding: .2em .3em; }
#notice { margin: .6em 1.2em 0; padding: .5em .8em; border-radius: 4px; background: #eef4fd; }
#notice.failed { background: #fbeaea; color: var(--error); }
#confirm { position: fixed; inset: 0; background: rgba(0, 0, 0, .3); display: flex;
  align-items: center; justify-content: center; }
.dialog { background: var(--bg); padding: 1.2em 1.5em; border-radius: 6px; max-width: 30em; }
.legend span { margin-right: 1em; }
.legend span::before { content: ""; display: inline-block; width: .8em; height: .8em;
  margin-right: .3em; }
.legend .key-sent::before { background: var(--sent); }
.legend .key-deferred::before { background: var(--deferred); }
.legend .key-error::before { background: var(--error); }
.state-suspended { color: var(--error); }
.state-backed-off { color: var(--deferred); }
#login form { max-width: 26em; }
#login label { display: block; margin: .8em 0; }
#login input { width: 100%; }
[hidden] { display: none !important; }
"""

PAGE_SCRIPT = r"""
"use strict";
// asyncmail's web page: everything it shows comes from the API, written into
// the page as text (never as markup); the token stays in this tab's
// sessionStorage and goes out as X-API-Token, which no other site can set.
(function () {
  var TOKEN_KEY = "asyncmail-token";
  var POLL_MS = 3000;
  var STATUSES = ["pending", "deferred", "held", "sending", "sent", "error"];
  var FILTERS = ["status", "tenant_id", "account_id", "id_prefix", "search", "order"];
  var REQUEST_MS = 15000;      // a request that has not answered by then is given up
  var state = { scope: null, view: null, cursors: [], next: null, timer: null, busy: false,
                seq: 0, stale: false };

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function when(ts) {
    if (ts === null || ts === undefined) return "";
    return new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }
  function token() { return sessionStorage.getItem(TOKEN_KEY); }
  function localInput(ts) {     // epoch seconds as a datetime-local value
    var d = new Date(ts * 1000), pad = function (n) { return String(n).padStart(2, "0"); };
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" +
      pad(d.getHours()) + ":" + pad(d.getMinutes());
  }

  function LoginNeeded(message) { this.message = message; }

  async function api(method, path, body) {
    var headers = { "Accept": "application/json" };
    if (token()) headers["X-API-Token"] = token();
    var abort = new AbortController();
    var timer = setTimeout(function () { abort.abort(); }, REQUEST_MS);
    var options = { method: method, headers: headers, cache: "no-store", credentials: "omit",
                    signal: abort.signal };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    var response, answer = {};
    try {
      response = await fetch(path, options);
      try {
        answer = await response.json();
      } catch (e) {
        answer = { error: "HTTP " + response.status };
      }
    } catch (e) {
      throw new Error(e.name === "AbortError" ? "no answer within " + REQUEST_MS / 1000 + " s"
                      : "the daemon cannot be reached");
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401) {
      throw new LoginNeeded(token() ? "The token was refused." : "");
    }
    if (!response.ok) throw new Error(answer.error || ("HTTP " + response.status));
    return answer;
  }

  function showLogin(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(state.timer);
    $("app").hidden = true; $("nav").hidden = true; $("logout").hidden = true;
    $("login").hidden = false;
    state.scope = null;
    state.seq++;               // what is still on its way is not drawn
    state.cursors = [];
    $("filters").reset();      // nothing of one session's filters reaches the next
    $("login-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
    document.body.dataset.view = "login";
  }

  function notice(text, failed) {
    var box = $("notice");
    box.hidden = !text;
    box.textContent = text || "";
    box.className = failed ? "failed" : "";
    state.stale = false;
  }

  // an action's failure stays until the next action; a refresh's goes once one succeeds
  function failed(error, refreshing) {
    if (error instanceof LoginNeeded) { showLogin(error.message); return; }
    notice(String(error.message || error), true);
    state.stale = Boolean(refreshing);
  }

  // -- actions: confirmed first, progress while they run, the result after
  function confirmThen(text) {
    return new Promise(function (resolve) {
      $("confirm-text").textContent = text;
      $("confirm").hidden = false;
      function done(answer) {
        $("confirm").hidden = true;
        $("confirm-yes").onclick = $("confirm-no").onclick = null;
        resolve(answer);
      }
      $("confirm-yes").onclick = function () { done(true); };
      $("confirm-no").onclick = function () { done(false); };
      $("confirm-yes").focus();
    });
  }

  function summary(answer) {
    var parts = [];
    Object.keys(answer).forEach(function (key) {
      var value = answer[key];
      if (key === "ok") return;
      if (Array.isArray(value)) value = value.length ? value.join(", ") : "none";
      else if (value && typeof value === "object") value = JSON.stringify(value);
      parts.push(key.replace(/_/g, " ") + ": " + value);
    });
    return parts.join("; ");
  }

  async function act(label, path, body) {
    if (state.busy || !(await confirmThen(label + "?"))) return;
    state.busy = true;
    var started = performance.now();
    var buttons = document.querySelectorAll("button.action");
    buttons.forEach(function (b) { b.disabled = true; });
    var ticker = setInterval(function () {
      var seconds = (performance.now() - started) / 1000;
      notice("Working: " + label + " (" + seconds.toFixed(1) + " s)");
    }, 100);
    notice("Working: " + label);
    try {
      var answer = await api("POST", path, body);
      clearInterval(ticker);
      notice(label + ": done. " + summary(answer));
    } catch (error) {
      clearInterval(ticker);
      failed(error);
    } finally {
      state.busy = false;
      buttons.forEach(function (b) { b.disabled = false; });
    }
    refresh();
  }

  function actionButton(label, path, body, text) {
    var button = el("button", label, "action");
    button.type = "button";
    button.dataset.action = label.toLowerCase();
    button.onclick = function () { act(text || label, path, body); };
    return button;
  }

  function withTenant(query, tenant) {     // a tenant key acts in its own tenant only
    if (tenant && state.scope === "*") query.push("tenant_id=" + encodeURIComponent(tenant));
    return query.length ? "?" + query.join("&") : "";
  }

  function scoped(body, tenant) {
    if (state.scope === "*") body.tenant_id = tenant;
    return body;
  }

  // -- the overview
  function drawChart(hour) {
    var canvas = $("chart"), ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height, n = hour.minutes, top = 0, i;
    var colors = { sent: "#2e9d57", deferred: "#d99a1c", error: "#cc3b3b" };
    for (i = 0; i < n; i++) top = Math.max(top, hour.sent[i] + hour.deferred[i] + hour.error[i]);
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#66707a"; ctx.font = "11px sans-serif";
    ctx.fillText(String(top) + " per minute", 4, 11);
    ctx.fillText("-60 min", 4, h - 2); ctx.fillText("now", w - 24, h - 2);
    var base = h - 14, room = base - 16, bar = w / n;
    for (i = 0; i < n; i++) {
      var y = base;
      ["sent", "deferred", "error"].forEach(function (kind) {
        var height = top ? hour[kind][i] / top * room : 0;
        ctx.fillStyle = colors[kind];
        ctx.fillRect(i * bar + 1, y - height, bar - 2, height);
        y -= height;
      });
    }
    canvas.dataset.total = String(hour.sent.concat(hour.deferred, hour.error)
      .reduce(function (a, b) { return a + b; }, 0));
  }

  function renderOverview(o) {
    $("daemon-state").textContent = o.active ? "delivering" : "suspended";
    $("daemon-state").className = o.active ? "" : "state-suspended";
    var counts = $("counts");
    counts.textContent = "";
    STATUSES.forEach(function (status) {
      var card = el("a", null, "card");
      card.href = "#/messages?status=" + status;
      var number = el("b", o.queue[status]);
      number.id = "count-" + status;
      card.appendChild(number);
      card.appendChild(el("span", status));
      counts.appendChild(card);
    });
    var backlog = el("div", null, "card");
    var b = el("b", o.report_backlog); b.id = "count-report-backlog";
    backlog.appendChild(b); backlog.appendChild(el("span", "reports to send"));
    counts.appendChild(backlog);
    var tenants = $("tenants");
    tenants.textContent = "";
    if (o.tenants) {
      var table = el("table"), head = el("tr");
      ["Tenant"].concat(STATUSES).forEach(function (t) { head.appendChild(el("th", t)); });
      table.appendChild(head);
      Object.keys(o.tenants).forEach(function (name) {
        var row = el("tr");
        row.appendChild(el("td", name));
        STATUSES.forEach(function (s) { row.appendChild(el("td", o.tenants[name][s])); });
        table.appendChild(row);
      });
      tenants.appendChild(el("h2", "By tenant"));
      tenants.appendChild(table);
    }
    drawChart(o.last_hour);
    var body = $("accounts").tBodies[0];
    body.textContent = "";
    o.by_account.forEach(function (a) {
      var row = el("tr");
      row.dataset.account = a.id;
      row.appendChild(el("td", a.id));
      row.appendChild(el("td", a.tenant_id));
      row.appendChild(el("td", a.relay));
      var text = "active", cls = "";
      if (!a.active) { text = "suspended"; cls = "state-suspended"; } else if (a.held_back_until) {
        text = "backed off until " + when(a.held_back_until); cls = "state-backed-off";
      }
      row.appendChild(el("td", text, cls));
      row.appendChild(el("td", Object.keys(a.rate).map(function (w) {
        return a.rate[w][0] + "/" + a.rate[w][1] + " per " + w; }).join(", ") || "no limit"));
      ["pending", "deferred", "held", "sending"].forEach(function (s) {
        var n = a.queue[s];
        row.appendChild(el("td", n >= o.depth_cap ? n + "+" : n));
      });
      var cell = el("td"), which = scoped({ account_id: a.id }, a.tenant_id);
      cell.appendChild(a.active
        ? actionButton("Suspend", "/commands/suspend", which, "Suspend account " + a.id)
        : actionButton("Activate", "/commands/activate", which, "Activate account " + a.id));
      row.appendChild(cell);
      body.appendChild(row);
    });
    var bounces = o.bounces;
    var said = "No bounce mailbox is configured.";
    if (bounces && bounces.problem) {
      said = bounces.mailbox + ": failing (" + bounces.problem + "), next try " +
        when(bounces.retry_at);
    } else if (bounces && bounces.last_poll) {
      said = bounces.mailbox + ": last polled " + when(bounces.last_poll) + ", " +
        bounces.last_found + " new bounce(s)";
    } else if (bounces) {
      said = bounces.mailbox + ": not polled yet";
    }
    $("bounces").textContent = said;
  }

  // -- messages
  function filterQuery() {
    var form = $("filters"), query = [];
    FILTERS.forEach(function (name) {
      var value = form.elements[name].value.trim();
      if (value) query.push(name + "=" + encodeURIComponent(value));
    });
    ["since", "until"].forEach(function (name) {
      var value = form.elements[name].value;
      if (value) query.push(name + "=" + Math.floor(new Date(value).getTime() / 1000));
    });
    return query;
  }

  // The filter in force is the one in the address (#/messages?...), set by
  // Show or a link: what is being typed in the form waits for Show.
  function appliedQuery() {
    var hash = location.hash, at = hash.indexOf("?");
    var params = new URLSearchParams(at < 0 ? "" : hash.slice(at + 1)), query = [];
    if (state.scope !== "*") params.delete("tenant_id");
    params.forEach(function (value, name) {
      if (FILTERS.indexOf(name) >= 0 || name === "since" || name === "until") {
        query.push(name + "=" + encodeURIComponent(value));
      }
    });
    // the admin lists every tenant, unless an account or id prefix names one
    // (the default tenant's, when no tenant is given)
    if (state.scope === "*" && !params.get("tenant_id") && !params.get("account_id") &&
        !params.get("id_prefix")) {
      query.push("tenant_id=*");
    }
    return query;
  }

  function renderMessages(answer) {
    var body = $("messages").tBodies[0];
    body.textContent = "";
    answer.messages.forEach(function (m) {
      var row = el("tr");
      row.dataset.id = m.id;
      var link = el("a", m.id);
      link.href = "#/message/" + encodeURIComponent(m.tenant_id) + "/" + encodeURIComponent(m.id);
      var cell = el("td"); cell.appendChild(link); row.appendChild(cell);
      row.appendChild(el("td", m.status, "status"));
      row.appendChild(el("td", m.tenant_id));
      row.appendChild(el("td", m.account_id));
      row.appendChild(el("td", (m.to || []).join(", ")));
      row.appendChild(el("td", m.subject));
      row.appendChild(el("td", when(m.created_ts)));
      row.appendChild(el("td", m.retry_count));
      row.appendChild(el("td", m.error, "reason"));
      body.appendChild(row);
    });
    state.next = answer.next;
    $("next-page").disabled = !answer.next;
    $("first-page").disabled = !state.cursors.length;
    $("list-info").textContent = answer.messages.length + " message(s) on this page" +
      (answer.searched ? " (the search looks at " + answer.searched + " messages per page)" : "") +
      (answer.next ? "; more may follow" : "");
  }

  function messagesPath() {
    var query = appliedQuery();
    var after = state.cursors[state.cursors.length - 1];
    if (after) query.push("after=" + encodeURIComponent(after));
    query.push("limit=50");
    return "/messages?" + query.join("&");
  }

  function row(table, label, value) {
    var tr = el("tr");
    tr.appendChild(el("th", label));
    tr.appendChild(el("td", value));
    tr.dataset.field = label;
    table.appendChild(tr);
  }

  function messagePath(tenant, id) {
    return "/messages/" + encodeURIComponent(id) + withTenant(["mime=true"], tenant);
  }

  function renderMessage(answer) {
    var m = answer.message, body = $("record").tBodies[0];
    $("message-title").textContent = "Message " + m.id;
    body.textContent = "";
    row(body, "status", m.status);
    row(body, "tenant", m.tenant_id);
    row(body, "account", m.account_id);
    row(body, "from", m.message.from);
    row(body, "to", (m.message.to || []).join(", "));
    if (m.message.cc.length) row(body, "cc", m.message.cc.join(", "));
    if (m.message.bcc.length) row(body, "bcc", m.message.bcc.join(", "));
    row(body, "subject", m.subject);
    row(body, "priority", m.priority);
    row(body, "created", when(m.created_ts));
    row(body, "updated", m.updated_at);
    if (m.deferred_ts) row(body, "deferred until", when(m.deferred_ts));
    if (m.sent_ts) row(body, "sent", when(m.sent_ts));
    if (m.error) row(body, "reason", m.error);
    row(body, "tries", m.retry_count);
    if (m.batch_code) row(body, "batch", m.batch_code);
    if (m.refused) row(body, "refused", JSON.stringify(m.refused));
    var files = (m.message.attachments || []).map(function (a) { return a.filename; });
    row(body, "attachments", files.join(", ") || "none");
    var attempts = $("attempts").tBodies[0];
    attempts.textContent = "";
    m.attempts.forEach(function (a) {
      var tr = el("tr");
      var cells = [when(a.ts), a.outcome, a.relay, a.code, a.text, (a.duration || 0).toFixed(3)];
      cells.forEach(function (v) { tr.appendChild(el("td", v)); });
      attempts.appendChild(tr);
    });
    var bounces = $("bounce-list").tBodies[0];
    bounces.textContent = "";
    m.bounces.forEach(function (b) {
      var tr = el("tr");
      var cells = [when(b.ts), b.recipient, b.type, b.status, b.diagnostic];
      cells.forEach(function (v) { tr.appendChild(el("td", v)); });
      bounces.appendChild(tr);
    });
    $("mime").textContent = m.mime_headers || "";
    var actions = $("message-actions"), ids = scoped({ ids: [m.id] }, m.tenant_id);
    actions.textContent = "";
    var named = "message " + m.id;
    function offer(label, path, body, text) {
      actions.appendChild(actionButton(label, path, body, text));
    }
    if (m.status === "deferred") {
      offer("Retry", "/commands/retry", Object.assign({ include_scheduled: true }, ids),
            "Retry " + named + " now");
    }
    if (m.status === "error") offer("Requeue", "/commands/requeue", ids, "Requeue " + named);
    if (m.status === "pending" || m.status === "deferred") {
      offer("Hold", "/commands/hold", ids, "Hold " + named);
    }
    if (m.status === "held") offer("Release", "/commands/release", ids, "Release " + named);
    if (m.status !== "sent") offer("Delete", "/commands/delete-messages", ids, "Delete " + named);
  }

  // -- views and the live refresh
  function show(view) {
    ["overview", "messages", "message"].forEach(function (name) {
      $("view-" + name).hidden = name !== view;
    });
    state.view = view;
    document.body.dataset.view = view;
  }

  // One refresh at a time counts: each has a number, and a refresh that a
  // newer one has overtaken (a click, a poll) draws nothing and plans nothing.
  async function refresh() {
    clearTimeout(state.timer);
    var mine = ++state.seq;
    var hash = location.hash.replace(/^#/, "") || "/";
    try {
      if (state.scope === null) {
        var first = await api("GET", "/overview");
        if (mine !== state.seq) return;
        state.scope = first.scope;
        $("login").hidden = true; $("app").hidden = false; $("nav").hidden = false;
        $("logout").hidden = !token();
        $("filters").elements.tenant_id.closest("label").hidden = state.scope !== "*";
      }
      var view, path, render;
      if (hash.indexOf("/message/") === 0) {
        var parts = hash.split("/");
        view = "message"; render = renderMessage;
        path = messagePath(decodeURIComponent(parts[2]),
                           decodeURIComponent(parts.slice(3).join("/")));
      } else if (hash.indexOf("/messages") === 0) {
        view = "messages"; render = renderMessages; path = messagesPath();
      } else {
        view = "overview"; render = renderOverview; path = "/overview";
      }
      var answer = await api("GET", path);
      if (mine !== state.seq) return;
      show(view);
      render(answer);
      $("live").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.ready = String(performance.now());
      if (state.stale) notice("");
    } catch (error) {
      if (mine !== state.seq) return;
      failed(error, true);
      if (error instanceof LoginNeeded) return;
    }
    state.timer = setTimeout(refresh, POLL_MS);
  }

  function start() {
    $("login-form").addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value);
      state.scope = null;
      refresh();
    });
    $("logout").onclick = function () { showLogin(""); };
    $("run-now").classList.add("action");
    $("run-now").onclick = function () { act("Run now", "/commands/run-now", {}); };
    $("filters").addEventListener("submit", function (event) {
      event.preventDefault();
      state.cursors = [];
      var wanted = "#/messages?" + filterQuery().join("&");
      if (location.hash === wanted) refresh(); else location.hash = wanted;
    });
    $("next-page").onclick = function () {
      if (state.next) { state.cursors.push(state.next); refresh(); }
    };
    $("first-page").onclick = function () { state.cursors = []; refresh(); };
    window.addEventListener("hashchange", function () {
      var hash = location.hash;
      if (hash.indexOf("#/messages") === 0) {
        var at = hash.indexOf("?");
        var params = new URLSearchParams(at < 0 ? "" : hash.slice(at + 1));
        var form = $("filters");
        FILTERS.forEach(function (name) {   // the link says the whole filter
          var value = params.get(name);
          form.elements[name].value = value === null || value === "*" ? "" : value;
        });
        if (!form.elements.order.value) form.elements.order.value = "newest";
        ["since", "until"].forEach(function (name) {
          var value = params.get(name);
          form.elements[name].value = value ? localInput(Number(value)) : "";
        });
        state.cursors = [];
      }
      refresh();
    });
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  }

  document.addEventListener("DOMContentLoaded", start);
})();
"""

PAGE_FILES = {
    "page": (PAGE_HTML.encode("utf-8"), "text/html; charset=utf-8"),
    "page style": (PAGE_STYLE.encode("utf-8"), "text/css; charset=utf-8"),
    "page script": (PAGE_SCRIPT.encode("utf-8"), "text/javascript; charset=utf-8"),
}
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'; object-src 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


# ####################################################################### #
# #############################  HTTP API  ############################## #
# ####################################################################### #

class Caller(collections.namedtuple("Caller", "admin tenant")):
    """Who sent a request: the admin (the ``[server] api_token``, or any
    local client when there is none) or a tenant (by its API key)."""

    __slots__ = ()


ADMIN = Caller(True, None)
# Commands only the admin may run (a tenant key gets 403).
ADMIN_COMMANDS = frozenset(["add tenant", "get tenant", "list tenants", "delete tenant",
                            "metrics"])
# Commands that, for the admin without a tenant_id, span the whole daemon.
SPAN_COMMANDS = frozenset(["status", "overview", "run now", "suspend", "activate", "metrics"])
# Commands that take tenant_id=* (every tenant) from the admin.
ALL_TENANT_COMMANDS = SPAN_COMMANDS | frozenset(["list messages", "list accounts", "retry",
                                                 "requeue", "hold", "release"])

class Route(collections.namedtuple("Route", "method pattern command")):
    """One HTTP route: ``method``, the path ``pattern`` (segments; ``{id}``
    matches one percent-decoded segment, passed to the command under that
    name) and the ``command`` it runs (a _Commands method, by its name with
    spaces: "run now" is ``_Commands.run_now``)."""

    __slots__ = ()


# The one table of the API: every route and the command it runs.
_ROUTES = tuple(Route(*route) for route in (
    ("GET", ("health",), "health"),
    ("GET", ("status",), "status"),
    ("GET", ("overview",), "overview"),
    ("GET", ("metrics",), "metrics"),
    ("GET", ("",), "page"),
    ("GET", ("ui", "app.css"), "page style"),
    ("GET", ("ui", "app.js"), "page script"),
    ("POST", ("commands", "run-now"), "run now"),
    ("POST", ("commands", "suspend"), "suspend"),
    ("POST", ("commands", "activate"), "activate"),
    ("POST", ("commands", "add-messages"), "add messages"),
    ("POST", ("commands", "delete-messages"), "delete messages"),
    ("POST", ("commands", "cleanup-messages"), "cleanup messages"),
    ("POST", ("commands", "retry"), "retry"),
    ("POST", ("commands", "requeue"), "requeue"),
    ("POST", ("commands", "hold"), "hold"),
    ("POST", ("commands", "release"), "release"),
    ("POST", ("account",), "add account"),
    ("GET", ("accounts",), "list accounts"),
    ("DELETE", ("account", "{id}"), "delete account"),
    ("GET", ("messages",), "list messages"),
    ("GET", ("messages", "{id}"), "get message"),
    ("GET", ("suppressions",), "list suppressions"),
    ("POST", ("suppressions",), "add suppression"),
    ("DELETE", ("suppressions", "{address}"), "delete suppression"),
    ("POST", ("tenant",), "add tenant"),
    ("GET", ("tenants",), "list tenants"),
    ("GET", ("tenant", "{id}"), "get tenant"),
    ("DELETE", ("tenant", "{id}"), "delete tenant"),
))
# The commands no token is needed for: a probe that touches no data.
PUBLIC_COMMANDS = frozenset(["health"])
# The web page and its files: no token either (they hold no data), but the
# browser rules of a daemon without api_token apply.
PAGE_COMMANDS = frozenset(PAGE_FILES)
COMMAND_NAMES = frozenset(route.command for route in _ROUTES
                           if route.command not in PAGE_COMMANDS)


def _index_routes(routes):
    """Routes by (first path segment, number of segments)."""
    index = {}
    for route in routes:
        index.setdefault((route.pattern[0], len(route.pattern)), []).append(route)
    return index


_ROUTES_BY_HEAD = _index_routes(_ROUTES)


def _match_route(segments):
    """[(method, command, params)] of the routes whose path matches."""
    found = []
    for method, pattern, command in _ROUTES_BY_HEAD.get((segments[0], len(segments)), ()):
        params = {}
        for expected, actual in zip(pattern, segments):
            if expected.startswith("{"):
                params[expected[1:-1]] = actual
            elif expected != actual:
                break
        else:
            found.append((method, command, params))
    return found


_HTTP_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


class _RequestHeaders(dict):
    """Request headers by lower-case name; ``get`` ignores the name's case."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


_SINGLE_HEADERS = frozenset(["content-length", "transfer-encoding", "host", "authorization",
                             "x-api-token", "expect"])


def _is_loopback_authority(authority):
    """Whether a Host value ``host[:port]`` names a loopback interface
    (``localhost:8000``, ``127.0.0.1``, ``[::1]:1234``); False when malformed."""
    if authority.startswith("["):
        host, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        host, _, port = authority.partition(":")
    if port and not _ASCII_DIGITS.fullmatch(port):
        return False
    return bool(host) and _is_loopback_host(host)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")   # RFC 9112 7.1: 1*HEXDIG, and nothing else


def _has_lone_surrogate(value):
    """Whether any string in a parsed JSON value cannot be encoded as UTF-8
    (JSON lets "\\ud800" through; storing it would break every later answer)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


class _ApiHandler(BaseHTTPRequestHandler):
    """One client connection: keep-alive HTTP/1.1, JSON in and out.

    Every answer is JSON (``ok`` plus ``error`` on failure); malformed
    requests get a 4xx, never a 500, and always an answer before the
    connection closes.  Runs in the connection's own thread.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # else keep-alive answers wait ~40 ms (Nagle + delayed ACK)
    timeout = REQUEST_IDLE_TIMEOUT    # an idle or stalled client releases its thread
    server_version = "asyncmail/" + __version__
    sys_version = ""
    # http.server assumes HTTP/0.9 until the request line parses, and answers
    # 0.9 requests without a status line: errors would come back headless.
    default_request_version = "HTTP/1.0"

    def version_string(self):
        return self.server_version

    # -- plumbing -----------------------------------------------------------

    def log_message(self, format, *args):
        self.server.log.debug("http %s: " + format, self.address_string(), *args)

    def log_request(self, code="-", size="-"):
        pass

    def _send(self, status, body, content_type="application/json; charset=utf-8",
              extra_headers=()):
        """Write a whole response with one send (headers and body together:
        two writes cost a syscall and a TCP segment each)."""
        self.server.metrics.inc("asyncmail_http_requests_total", str(status))
        self.log_request(status, len(body))
        lines = ["HTTP/1.1 %d %s" % (status, _HTTP_PHRASES.get(status, "")),
                 "Server: " + self.server_version, "Date: " + self.date_time_string(),
                 "Content-Type: " + content_type, "Content-Length: %d" % len(body)]
        lines.extend("%s: %s" % header for header in extra_headers)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head if self.command == "HEAD" else head + body)
        except OSError:   # the client is gone (or was cut off): nothing left to tell it
            self.close_connection = True

    def _send_json(self, status, payload, extra_headers=()):
        try:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:    # never expected: input is checked; stay valid JSON
            body = json.dumps(payload, separators=(",", ":")).encode("ascii")
        self._send(status, body, extra_headers=extra_headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method, huge
        headers) as JSON; an unknown method is 405 and no parse failure of a
        client's bytes is answered with a 5xx."""
        if code == 501:
            code, message = 405, "method not allowed"
        elif code >= 500:
            code = 400
        self.close_connection = True
        if not getattr(self, "command", None):
            self.command = "GET"
        self._send_json(code, {"ok": False, "error": message or "bad request"})

    def parse_request(self):
        """Parse the request line and headers into ``self.headers``.

        Replaces http.server's version, which parses headers with the email
        package: a third of the CPU of a small request.  Same contract
        (False after sending an error; keep-alive and ``Expect:
        100-continue`` handled), stricter input: folded header lines and a
        repeated Content-Length, Transfer-Encoding, Host or credential header
        are refused, so no two readers can disagree about a request.
        """
        self.command = None
        self.request_version = version = self.default_request_version
        self.close_connection = True
        if self.raw_requestline in (b"\r\n", b"\n"):   # RFC 9112 2.2: skip one empty line
            self.raw_requestline = self.rfile.readline(MAX_HEADER_LINE + 1)
        if not self.raw_requestline.endswith(b"\n"):
            return False   # cut off (the client left, or was cut): never run half a request
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            match = re.fullmatch(r"HTTP/([0-9])\.([0-9])", version)
            if not match:
                self.send_error(400, "Bad request version (%r)" % version[:40])
                return False
            if match.group(1) != "1":
                self.send_error(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
                return False
            if version == "HTTP/1.1":
                self.close_connection = False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline[:QUOTE_CHARS])
            return False
        self.command, self.path = words[0], words[1]
        if len(words) == 2:
            self.close_connection = True
            if self.command != "GET":
                self.send_error(400, "Bad HTTP/0.9 request type (%r)" % self.command[:20])
                return False
        headers = _RequestHeaders()
        while len(words) == 3:   # an HTTP/0.9 request line has no header block
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "header line too long")
                return False
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                return False   # the header block was cut off: run nothing, answer nothing
            if len(headers) >= MAX_HEADERS:
                self.send_error(431, "too many headers")
                return False
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                self.send_error(400, "malformed header line")
                return False
            key, value = name.lower(), value.strip(" \t\r\n")   # RFC 9110 5.6.3: OWS is SP/HTAB
            if key in headers:
                if key in _SINGLE_HEADERS:
                    self.send_error(400, "repeated %s header" % name)
                    return False
                value = headers[key] + ", " + value
            headers[key] = value
        self.headers = headers
        if self.request_version == "HTTP/1.1" and "host" not in headers:
            self.send_error(400, "Host header required")   # RFC 9112 3.2
            return False
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        framing_error = self._framing_error()
        if framing_error is not None:
            self.send_error(400, framing_error)   # and close: the body's end is unknown
            return False
        if (headers.get("expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def _framing_error(self):
        """Why the body's framing is refused (RFC 9112 6.1-6.3), or None.

        Only ``chunked`` alone is a transfer coding this server decodes, and
        never together with a Content-Length: a proxy in front could frame
        the body the other way and smuggle a request past it.
        """
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if self.headers.get("Content-Length") is not None:
                return "Content-Length and Transfer-Encoding together"
            if [part.strip(" \t").lower() for part in coding.split(",")] != ["chunked"]:
                return "unsupported Transfer-Encoding %r (only chunked)" % coding[:60]
        elif self._content_length() == -1:
            return "invalid Content-Length"
        return None

    def _content_length(self):
        """The declared body length: None when absent, -1 when malformed
        (``str.isdigit`` would accept "²", which ``int`` refuses)."""
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        value = value.strip(" \t")
        if len(value) > 15 or not _ASCII_DIGITS.fullmatch(value):
            return -1
        return int(value)

    def handle_expect_100(self):
        """Answer ``Expect: 100-continue`` with 400/413 at once for a body that
        is malformed or too large, before the client sends it."""
        length = self._content_length()
        if length == -1:
            self.send_error(400, "invalid Content-Length")
            return False
        if length is not None and length > self.server.max_request_bytes:
            self.send_error(413, "request body larger than %d bytes"
                            % self.server.max_request_bytes)
            return False
        return BaseHTTPRequestHandler.handle_expect_100(self)

    def _read_body(self):
        """The request body as bytes (Content-Length or chunked).

        Raises ApiError (400/411/413); on any of them the connection closes
        because the rest of the body was not read.
        """
        limit = self.server.max_request_bytes
        deadline = time.monotonic() + self.server.body_deadline
        if self.headers.get("Transfer-Encoding") is not None:   # chunked: see _framing_error
            return self._read_chunked(limit, deadline)
        length = self._content_length()
        if length is None:
            return b""
        if length < 0:
            self.close_connection = True
            raise ApiError("invalid Content-Length", status=400)
        if length > limit:
            self.close_connection = True
            raise ApiError("request body larger than %d bytes" % limit, status=413)
        return self._read_exact(length, deadline)

    def _read_exact(self, length, deadline):
        """Exactly ``length`` body bytes, read by ``deadline``; raises ApiError:
        408 past the deadline, 400 when the client sends fewer."""
        chunks, remaining = [], length
        while remaining:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise ApiError("request body too slow", status=408)
            try:
                chunk = self.rfile.read(min(remaining, 65536))
            except (socket.timeout, OSError):
                chunk = b""
            if not chunk:
                self.close_connection = True
                raise ApiError("request body shorter than Content-Length", status=400)
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _read_chunked(self, limit, deadline):
        """A chunked body (RFC 9112 7.1), read strictly: hex digits only in a
        size (``int`` would also take "0x", "_", "+" and spaces), CRLF after
        every line and every chunk's data, at most MAX_HEADERS trailer lines
        (ignored).  Counts against ``limit`` and ``deadline`` exactly like a
        Content-Length body.  Raises ApiError (400/408/413)."""
        chunks, total = [], 0
        while True:
            size, separator, _ = self._chunk_line(deadline).partition(b";")
            if separator:
                size = size.rstrip(b" \t")   # whitespace is allowed before an extension
            if not _CHUNK_SIZE.fullmatch(size):
                self._malformed_chunk("chunk size %r is not hexadecimal" % size[:20])
            size = int(size, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                self.close_connection = True
                raise ApiError("request body larger than %d bytes" % limit, status=413)
            chunks.append(self._read_exact(size, deadline))
            try:
                end = self.rfile.read(2)
            except (socket.timeout, OSError):
                end = b""
            if end != b"\r\n":
                self._malformed_chunk("chunk data not followed by CRLF")
        for _ in range(MAX_HEADERS + 1):
            if self._chunk_line(deadline) == b"":
                return b"".join(chunks)
        self._malformed_chunk("too many trailer lines")

    def _chunk_line(self, deadline):
        """The next line of a chunked body without its CRLF; ApiError unless
        it ends in CRLF within MAX_CHUNK_LINE octets and ``deadline``."""
        if time.monotonic() > deadline:
            self.close_connection = True
            raise ApiError("request body too slow", status=408)
        try:
            line = self.rfile.readline(MAX_CHUNK_LINE + 2)
        except (socket.timeout, OSError):
            line = b""
        if not line.endswith(b"\r\n"):
            self._malformed_chunk("chunked body line without CRLF, too long, or cut short")
        return line[:-2]

    def _malformed_chunk(self, reason):
        """Raise the 400 of a chunked body; the connection closes (its rest
        cannot be framed)."""
        self.close_connection = True
        raise ApiError("malformed chunked body: %s" % reason, status=400)

    def _caller(self):
        """The Caller of this request, or None (a 401): the admin token, a
        tenant's key, or, when there is no admin token, no token at all."""
        token = self.server.api_token
        given = self.headers.get("X-API-Token")
        if given is None:
            auth = self.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        if given is None:
            return ADMIN if token is None else None
        if token is not None and hmac.compare_digest(
                given.encode("utf-8", "surrogateescape"), token):
            return ADMIN
        tenant = self.server.core.tenant_for_key(given)
        return Caller(False, tenant) if tenant is not None else None

    def handle_one_request(self):
        # the next request line and headers must arrive within the idle timeout
        self.server.set_deadline(self.connection, self.server.idle_timeout)
        BaseHTTPRequestHandler.handle_one_request(self)

    # -- dispatch -----------------------------------------------------------

    def _handle(self):
        """Every method's entry: bound the request, route it, and turn what it raised into
        an answer (ApiError: its status; StoreError: 503; anything else: a logged 500 that
        closes the connection)."""
        self.server.set_deadline(self.connection, self.server.body_deadline * 2)
        try:
            self._route()
        except ApiError as exc:
            payload = {"ok": False, "error": str(exc)}
            if exc.detail is not None:
                payload["detail"] = exc.detail
            headers = [("Allow", exc.detail["allow"])] if exc.status == 405 else []
            self._send_json(exc.status, payload, headers)
        except StoreError as exc:
            self.server.log.error("store error answering %s %s: %s",
                                  self.command, self.path[:QUOTE_TEXT_CHARS], exc)
            self._send_json(503, {"ok": False, "error": "storage unavailable, retry later"})
        except Exception:
            self.server.log.exception("internal error answering %s %s",
                                      self.command, self.path[:QUOTE_TEXT_CHARS])
            self.close_connection = True
            self._send_json(500, {"ok": False, "error": "internal error"})

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def _route(self):
        """Answer one request: frame and check it (browser rules, token),
        match its route, read its body (bounded), run its command through
        the core for its Caller.  Raises ApiError for the answer to send
        instead; the core's StoreError becomes a 503 in ``_handle``."""
        parts = self._request_target()
        segments = [urllib.parse.unquote(s) for s in parts.path.strip("/").split("/")]
        matches = _match_route(segments)
        method = self.command
        page = [m for m in matches if m[1] in PAGE_COMMANDS and m[0] == method]
        if page:
            self._refuse_browser_requests(parts)
            self._discard_body()
            body, content_type = PAGE_FILES[page[0][1]]
            self._send(200, body, content_type, PAGE_HEADERS)
            return
        public = [m for m in matches if m[1] in PUBLIC_COMMANDS
                  and m[0] == ("GET" if method == "HEAD" else method)]
        if public and method == "HEAD":
            method = "GET"   # a probe may HEAD; the API itself is not a web server (405)
        if not public:   # probes (Genropy's "Proxy reachable", load balancers) need no token
            self._refuse_browser_requests(parts)
            caller = self._caller()
            if caller is None:
                self.server.note_unauthorized(self.client_address[0])
                self._refuse(401, "Invalid or missing API token")
        else:
            caller = None
        if not matches:
            self._discard_body()
            if segments[0] == "commands" and len(segments) == 2:
                raise NotFoundError("unknown command")
            raise NotFoundError("no such endpoint: %s" % parts.path[:QUOTE_TEXT_CHARS])
        for route_method, command, params in matches:
            if route_method == method:
                break
        else:
            self._discard_body()
            allowed = ", ".join(sorted({m for m, _, _ in matches}))
            raise ApiError("method not allowed; use %s" % allowed, status=405,
                           detail={"allow": allowed})
        if method != "POST":
            self._discard_body()      # keep-alive stays in sync with a GET that has a body
        query = {}
        if parts.query:
            try:
                parsed = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                               strict_parsing=False, max_num_fields=50)
            except ValueError as exc:
                self._discard_body()
                raise ValidationError("malformed query string") from exc
            query = {key: values[-1] for key, values in parsed.items()}
        if command == "metrics":
            _, answer = self.server.core.run_command(command, {}, caller)
            self._send(200, answer["text"].encode("utf-8"),
                       "text/plain; version=0.0.4; charset=utf-8")
            return
        payload = dict(params)
        if method == "POST":
            # The whole body first, outside the slot: a client that stalls or
            # dribbles holds only its own thread and bytes (until the body
            # deadline), never the slot every other large request waits for.
            body = self._read_body()
            if len(body) > LARGE_BODY_BYTES:   # counted alike, Content-Length or chunked
                # a parsed 1 MB batch is ~10 MB of objects: one at a time
                if not self.server.large_requests.acquire(timeout=self.server.body_deadline):
                    raise ApiError("busy with other large requests, retry later", status=503)
                try:
                    payload = self._with_query(self._json_body(body, command), query)
                    del body
                    status, answer = self.server.core.run_command(command, payload, caller)
                    del payload
                finally:
                    self.server.large_requests.release()
                self._send_json(status, answer)
                return
            payload = self._with_query(self._json_body(body, command), query)
        else:
            for key, value in query.items():
                payload.setdefault(key, value)
        status, answer = self.server.core.run_command(command, payload, caller)
        self._send_json(status, answer)

    @staticmethod
    def _with_query(body, query):
        """A POST's payload: its JSON body and, from the query, only
        ``tenant_id`` (which must not contradict the body's)."""
        payload = dict(body)
        for key in ("tenant_id",):
            if key in query:
                if payload.get(key) not in (None, query[key]):
                    raise ValidationError("%s in the query and in the body differ" % key)
                payload[key] = query[key]
        return payload

    def _request_target(self):
        """The request target split like urlsplit (RFC 9112 3.2): origin-form
        ``/path?query``, or absolute-form ``http(s)://authority/path``.
        Anything else is a 400 before any route or auth logic: a target
        urlsplit cannot split (``http://[::1/``), or an origin-form with
        ``[`` or ``]`` (RFC 3986 allows them only around an IP literal in an
        authority; ``//[`` is what urlsplit took for one)."""
        target = self.path
        if target.startswith("/"):   # never parsed for an authority: "//x" is a path
            if "[" not in target and "]" not in target:
                path, _, query = target.partition("#")[0].partition("?")
                return urllib.parse.SplitResult("", "", path, query, "")
            self._refuse(400, "malformed request target %r (percent-encode [ and ])"
                         % target[:QUOTE_CHARS])
        if target[:7].lower() == "http://" or target[:8].lower() == "https://":
            try:
                parts = urllib.parse.urlsplit(target)
                parts.port   # raises ValueError for a malformed port
            except ValueError:
                parts = None
            if parts is not None and parts.hostname:
                return parts._replace(path=parts.path or "/")
        self._refuse(400, "malformed request target %r" % target[:QUOTE_CHARS])

    def _refuse_browser_requests(self, parts):
        """Without an api_token, refuse what a web page could make a browser
        send here: a body that is not application/json (cross-site, a page
        can send only text/plain, form or multipart bodies without a CORS
        preflight, which is never granted), a Host that is not a loopback name
        or address (DNS rebinding), and an Origin other than the daemon's own.
        With a token a page cannot forge its header, so none of this applies
        and whatever curl sends is accepted.  Raises ApiError (400/403/415).
        """
        if self.server.api_token is not None:
            return
        host = self.headers.get("Host")   # present on HTTP/1.1 (parse_request)
        if host is not None and not _is_loopback_authority(host):
            self._refuse(403, "Host %r is not a loopback name or address (without "
                              "api_token only local clients are served)" % host[:QUOTE_CHARS])
        if parts.netloc and not _is_loopback_host(parts.hostname):
            self._refuse(403, "request target names a host that is not loopback")
        origin = self.headers.get("Origin")
        if origin is not None and (host is None or origin.lower() != "http://" + host.lower()):
            self._refuse(403, "cross-origin request refused (Origin %r)" % origin[:QUOTE_CHARS])
        if self._content_length() or self.headers.get("Transfer-Encoding") is not None:
            media_type = self.headers.get("Content-Type", "").partition(";")[0]
            if media_type.strip().lower() != "application/json":
                self._refuse(415, "request body must be application/json (without api_token "
                                  "a body a browser could send cross-site is refused)")

    def _refuse(self, status, message):
        """Answer ``status`` without reading the body, which then closes the
        connection (the unread body would be taken for the next request)."""
        if self._content_length() or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        raise ApiError(message, status=status)

    def _discard_body(self):
        """Read (bounded) or give up on the body of a request that failed
        before its body mattered, so keep-alive stays in sync."""
        length = self._content_length()
        if length is not None and 0 <= length <= 65536 and not self.headers.get(
                "Transfer-Encoding"):
            with contextlib.suppress(ApiError):
                self._read_exact(length, time.monotonic() + self.server.body_deadline)
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _json_body(self, body, command):
        """The request body as a JSON object (empty: {}, except for delete-messages, where
        a selector must be given).  Raises ValidationError for what is not UTF-8 JSON of an
        object (for add-messages with the batch shape's ``detail``), or holds a lone
        surrogate."""
        if not body.strip():
            if command == "delete messages":   # a bare POST must not empty the queue
                raise ValidationError("name what to delete: ids, account_id, status, or {} "
                                      "for every message not yet sent or failed")
            return {}
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError("body is not UTF-8") from exc
        try:
            payload = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ValidationError("body is not valid JSON: %s"
                                  % str(exc)[:QUOTE_TEXT_CHARS]) from exc
        if not isinstance(payload, dict):
            message = "body must be a JSON object"
            if command == "add messages":   # the shape of every other malformed batch
                message += " with a messages list"
                raise ValidationError(message, detail={"error": message, "rejected": []})
            raise ValidationError(message)
        if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(payload):
            raise ValidationError("body contains a lone UTF-16 surrogate escape (\\ud800-"
                                  "\\udfff without its pair), which is not text")
        return payload


class _ApiServer(socketserver.ThreadingMixIn, HTTPServer):
    """The HTTP listener: one daemon thread per client connection.

    Each connection carries a deadline for its current request (the request
    line and headers within REQUEST_IDLE_TIMEOUT, the body and answer within
    REQUEST_BODY_DEADLINE more); ``service_actions``, run by the accept loop,
    shuts down connections past it, so a client dribbling bytes cannot pin a
    thread.  Beyond MAX_CONNECTIONS new connections get 503 and are closed.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128
    max_connections = MAX_CONNECTIONS
    idle_timeout = REQUEST_IDLE_TIMEOUT
    body_deadline = REQUEST_BODY_DEADLINE
    # refused tokens are logged at once, then at most one summary line this often
    unauthorized_log_every = 60.0

    def __init__(self, address, core, api_token, max_request_bytes, metrics, log):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.core = core
        self.api_token = api_token.encode("utf-8") if api_token else None
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.log = log
        self._deadlines = {}
        self._deadlines_lock = threading.Lock()
        self.large_requests = threading.BoundedSemaphore(LARGE_BODY_CONCURRENCY)
        self._last_reap = time.monotonic()
        self._unauthorized = 0
        self._unauthorized_logged = -math.inf
        HTTPServer.__init__(self, address, _ApiHandler)

    def note_unauthorized(self, client):
        """Count a request refused for its token (a 401; the code-labelled
        request counter has it too) and log it, at most one line per
        ``unauthorized_log_every`` seconds, however many come."""
        with self._deadlines_lock:
            self._unauthorized += 1
            now = time.monotonic()
            if now - self._unauthorized_logged < self.unauthorized_log_every:
                return
            count, self._unauthorized, self._unauthorized_logged = self._unauthorized, 0, now
        self.log.warning("refused %d request(s) with a missing or wrong API token (the last "
                         "from %s); next report in %ds at most", count, client,
                         self.unauthorized_log_every)

    def process_request(self, request, client_address):
        """Give a new connection its deadline and thread, or, past MAX_CONNECTIONS, a 503
        and the door."""
        with self._deadlines_lock:
            crowded = len(self._deadlines) >= self.max_connections
            if not crowded:
                self._deadlines[request] = time.monotonic() + self.idle_timeout
        if crowded:
            body = b'{"ok":false,"error":"too many connections, retry later"}'
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\nConnection: "
                                b"close\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def set_deadline(self, request, seconds):
        with self._deadlines_lock:
            if request in self._deadlines:
                self._deadlines[request] = time.monotonic() + seconds

    def shutdown_request(self, request):
        with self._deadlines_lock:
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self):
        """Run by the accept loop: once a second, shut down the connections past
        their request deadline."""
        now = time.monotonic()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        with self._deadlines_lock:
            late = [request for request, deadline in self._deadlines.items() if deadline < now]
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        self.log.exception("unexpected error on a connection from %s", client_address[0])


# ####################################################################### #
# ########  API commands: handlers, selectors, cursors, records  ######## #
# ####################################################################### #

def _mime_headers(message, now):
    """The header block a message will be sent with (Date and, when the
    message has none of its own, Message-ID aside: they are made at send
    time), its attachments standing in empty; None when it cannot be built."""
    stand_ins = [(a["filename"], a.get("mime_type") or _guess_mime_type(a["filename"]), b"")
                 for a in message["attachments"]]
    try:
        data = build_mime(message, stand_ins, now)
    except DeliveryError as exc:
        return "(cannot be built: %s)" % str(exc)[:QUOTE_TEXT_CHARS]
    return data.partition(b"\r\n\r\n")[0].decode("ascii", "replace")


def _present_record(record, full):
    """A store record as the API shows it: SPEC fields plus the seed
    system's ``created_at``, ``updated_at`` and ``message``, which Genropy's
    queue views read."""
    payload = record.pop("payload")
    record["id"] = _name_of(record["id"])
    record["account_id"] = _name_of(record["account_id"])
    record["created_at"] = _iso(record["created_ts"])
    record["updated_at"] = _iso(record.pop("updated_ts"))
    record["message"] = message_view(payload, record["retry_count"], full)
    return record


SELECTOR_FIELDS = ("ids", "account_id", "status")
COMMAND_OPTIONS = {"retry": ("include_scheduled",)}


def _parse_selector(command, payload):
    """The Selector of an operator command (SPEC 7): ids, account_id, status
    or all.  Raises ValidationError for any other shape or an unknown
    field."""
    known = set(SELECTOR_FIELDS) | set(COMMAND_OPTIONS.get(command, ()))
    unknown = sorted(str(key)[:QUOTE_CHARS] for key in payload if key not in known)
    if unknown:
        raise ValidationError("unknown field %s (a selector is ids, account_id or status)"
                              % unknown[0])
    given = [key for key in SELECTOR_FIELDS if key in payload]
    if len(given) > 1:
        raise ValidationError("a selector names one of ids, account_id or status")
    if not given:
        return Selector("all", None)
    kind, value = given[0], payload[given[0]]
    if kind == "ids":
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ValidationError("ids must be a list of message ids")
        if len(value) > MAX_DELETE_IDS:
            raise ValidationError("at most %d ids per request" % MAX_DELETE_IDS)
        return Selector("ids", list(dict.fromkeys(value)))
    if kind == "status":
        if value not in COMMAND_STATUSES[command]:
            raise ValidationError("%s applies to status %s" % (
                command, " or ".join(COMMAND_STATUSES[command])))
        return Selector("status", value)
    try:
        return Selector("account_id", _check_identifier(value, "account_id"))
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def _encode_cursor(position):
    """An opaque, URL-safe keyset cursor: [created_ts, pk], or an id."""
    text = json.dumps(position, separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")


MAX_CURSOR_CHARS = 2048


def _decode_cursor(value, by_id):
    """The position of a cursor from ``_encode_cursor``; ValidationError if
    it is not one (of the listing's kind)."""
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > MAX_CURSOR_CHARS:
        raise ValidationError("after must be a cursor from a previous answer's next")
    try:
        position = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise ValidationError("after must be a cursor from a previous answer's next") from exc
    if by_id and isinstance(position, str):
        return position
    if (not by_id and isinstance(position, list) and len(position) == 2
            and _is_number(position[0]) and isinstance(position[1], int)
            and not isinstance(position[1], bool)):
        return position
    raise ValidationError("after must be a cursor from a previous answer's next "
                          "(with the same id_prefix use)")




def _query_field(payload, name, parse, default=None):
    """A query parameter through one of the field parsers (absent or empty:
    ``default``); ValidationError naming it."""
    value = payload.get(name)
    if value is None or value == "":
        return default
    try:
        return parse(value)
    except ValueError as exc:
        raise ValidationError("%s %s" % (name, exc)) from exc


def _query_number(payload, name):
    return _query_field(payload, name, _EPOCH_TEXT)


def _query_bool(payload, name):
    return _query_field(payload, name, _parse_bool, default=False)


def _query_int(payload, name, default, low, high):
    return _query_field(payload, name, _whole(low, high), default)


class _AccountResolver:
    """Picks the account of a message: its own, else ``default_account``,
    else the only account when there is exactly one."""

    def __init__(self, accounts, default_account):
        self.accounts = accounts
        self.default = default_account or (next(iter(accounts)) if len(accounts) == 1 else None)

    def __call__(self, account_id):
        """The account a message goes out through: the one named, else the
        default; ValueError for none or an unknown one."""
        if account_id is None:
            if self.default is None:
                raise ValueError("no account_id and no default account")
            account_id = self.default
        if account_id not in self.accounts:
            raise ValueError("unknown account %s" % account_id[:QUOTE_CHARS])
        return account_id


class _Commands:
    """The API's commands, between HTTP and the core: one method per command
    (its name with spaces: "run now" is ``run_now``), each taking the
    payload (path parameters, query and body merged, ``tenant_id`` taken
    out) and the tenant the caller acts in, and returning the answer as a
    dict; raises ApiError.  ``run`` checks who may run what and resolves the
    tenant.  Given the core, whose store, workers, controls, caches and
    clock it uses; it keeps only what the commands remember themselves (the
    ignored field names already logged, each tenant's intake serial).
    Safe from any thread."""

    def __init__(self, core):
        self.core = core
        self._lock = threading.Lock()
        self._ignored_fields = set()   # (kind, field) already logged as ignored
        self._intake_counter = itertools.count(1)
        self._intake_serials = {}      # tenant -> serial of its last add-messages batch

    # -- dispatch ------------------------------------------------------------

    def run(self, name, payload=None, caller=None):
        """Run the command ``name`` for ``caller`` (a Caller; None: the
        admin): returns (HTTP status, answer); raises ApiError.  The
        payload's ``tenant_id`` picks the tenant it acts in (see ``_scope``)."""
        if name not in COMMAND_NAMES:
            raise NotFoundError("unknown command")
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise ValidationError("payload must be an object")
        caller = caller or ADMIN
        if name in ADMIN_COMMANDS and not caller.admin:
            raise ApiError("this endpoint needs the admin token, not a tenant key", status=403)
        payload = dict(payload)
        tenant = self._scope(name, caller, payload.pop("tenant_id", None))
        return 200, getattr(self, name.replace(" ", "_"))(payload, tenant)

    def intake_serial(self, tenant):
        """The serial of ``tenant``'s last well-formed add-messages batch."""
        return self._intake_serials.get(tenant, 0)

    def health(self, payload, tenant):
        """For probes: no database, nothing about the queue."""
        return {"ok": True, "status": "ok"}

    def _scope(self, name, caller, given):
        """The tenant a command acts in: a tenant key's own (naming another
        is a 401); for the admin the one ``tenant_id`` names, else the
        default tenant, or ALL_TENANTS for the commands that span the daemon
        (status, run-now, suspend, metrics)."""
        if given is not None and not isinstance(given, str):
            raise ValidationError("tenant_id must be a string")
        if given == "":
            given = None
        if not caller.admin:
            if given is not None and given != caller.tenant:
                raise ApiError("Invalid or missing API token (the key is not tenant %s's)"
                               % given[:QUOTE_CHARS], status=401)
            return caller.tenant
        if given is None:
            return ALL_TENANTS if name in SPAN_COMMANDS else DEFAULT_TENANT
        if given == ALL_TENANTS:
            if name not in ALL_TENANT_COMMANDS:
                raise ValidationError("tenant_id=* is for listings and operator commands")
            return given
        if given != DEFAULT_TENANT:
            known = self.core.tenant(given) is not None
            if not known:
                raise NotFoundError("unknown tenant %s" % given[:QUOTE_CHARS])
        return given

    def status(self, payload, tenant):
        """GET /status: queue depth by status, the accounts suspended or held back and the
        report backlog, of one tenant, or of the daemon (with each tenant's counts) for the
        admin without tenant_id."""
        if tenant == ALL_TENANTS:
            by_tenant = self.core.store.tenant_queue_counts()
            counts = self.core.store.queue_counts()
            backlog = self.core.store.event_backlog()
            answer = {"ok": True, "active": self.core.controls.active, "version": __version__,
                      "queue": {status: counts.get(status, 0) for status in STATUSES},
                      "accounts": self._account_states(tenant),
                      "report_backlog": sum(backlog.values())}
            if len(by_tenant) > 1:
                answer["tenants"] = {name: {status: by_tenant[name].get(status, 0)
                                            for status in STATUSES}
                                     for name in sorted(by_tenant)}
            return answer
        counts = self.core.store.queue_counts(tenant)
        controls = self.core.controls
        return {"ok": True, "active": controls.active and controls.tenant_active(tenant),
                "version": __version__, "tenant_id": tenant,
                "queue": {status: counts.get(status, 0) for status in STATUSES},
                "accounts": self._account_states(tenant),
                "report_backlog": self.core.store.event_backlog().get(tenant, 0)}

    # an account's depth on the web page is counted up to this (exact totals
    # per tenant come from the counters): an index range each, never a scan
    OVERVIEW_DEPTH_CAP = 10000

    def overview(self, payload, tenant):
        """GET /overview, the web page's first view: /status's answer, and
        per account its state, rate-limit use and queue depth (each count at
        most OVERVIEW_DEPTH_CAP), the outcomes of the last hour by minute,
        and the bounce collector's state.  No password or credential: of an
        account only its id, tenant and relay (host:port) are shown."""
        answer = self.status(payload, tenant)
        now = self.core.now()
        held = self.core.dispatcher.held_back(now)
        by_account = []
        for key, account in sorted(self.core.accounts().items()):
            if tenant != ALL_TENANTS and _tenant_of(key) != tenant:
                continue
            by_account.append({
                "id": _name_of(key), "tenant_id": _tenant_of(key),
                "relay": "%s:%d" % (account["host"], account["port"]),
                "active": self.core.controls.account_active(key),
                "held_back_until": held.get(key),
                "rate": self.core.dispatcher.rate.usage(account, now),
                "queue": self.core.store.account_depth(key, ACTIVE_STATUSES,
                                                       self.OVERVIEW_DEPTH_CAP)})
        bounces = self.core.bounces
        answer.update({
            "scope": tenant, "now": now, "by_account": by_account,
            "depth_cap": self.OVERVIEW_DEPTH_CAP,
            "last_hour": self.core.metrics.last_hour(
                now, None if tenant == ALL_TENANTS else tenant),
            "bounces": bounces.state() if bounces is not None and tenant in (
                ALL_TENANTS, DEFAULT_TENANT) else None})
        return answer

    def metrics(self, payload, tenant):
        return {"ok": True, "text": self.core.render_metrics()}

    def run_now(self, payload, tenant):
        """Both loops run a cycle now (the reporter for one tenant, or all);
        in test mode the answer waits for the cycles and the deliveries
        they started."""
        wait = self._run_now_wait() if self.core.test_mode else None
        self.core.dispatcher.run_now(wait)
        if self.core.bounces is not None:
            self.core.bounces.run_now(wait)
        self.core.reporter.run_now(wait, tenant=None if tenant == ALL_TENANTS else tenant)
        return {"ok": True}

    def _run_now_wait(self):
        """How long a test-mode run-now waits for one piece of work: an SMTP
        job's steps (connect, TLS and AUTH, the transaction, QUIT) are each
        bounded by the SMTP timeout, a report exchange by its own, and the
        store gets some slack besides."""
        smtp_steps = 4
        return max(self.core.config.delivery.smtp_timeout_seconds * smtp_steps,
                   self.core.config.client.timeout_seconds) + RUN_NOW_SLACK

    def _account_argument(self, payload, tenant):
        """The store key of the payload's ``account_id`` in ``tenant``
        (None when absent); NotFoundError when it has no such account."""
        account_id = payload.get("account_id")
        if account_id is None:
            return None
        if tenant == ALL_TENANTS:
            raise ValidationError("account_id needs one tenant_id")
        key = _scoped(tenant, account_id) if isinstance(account_id, str) else None
        if key is None or key not in self.core.accounts():
            raise NotFoundError("unknown account")
        return key

    def _suspension(self, payload, tenant, suspended):
        """suspend / activate: globally (the admin without tenant_id), one
        tenant, one account (``account_id``) or one campaign (``batch_code``)."""
        unknown = sorted(str(k)[:QUOTE_CHARS] for k in payload
                         if k not in ("account_id", "batch_code"))
        if unknown:
            raise ValidationError("unknown field %s (suspend and activate take account_id "
                                  "or batch_code)" % unknown[0])
        verb = "suspended" if suspended else "activated"
        batch_code = payload.get("batch_code")
        if batch_code is not None:
            if "account_id" in payload:
                raise ValidationError("name account_id or batch_code, not both")
            if tenant == ALL_TENANTS:
                tenant = DEFAULT_TENANT
            try:
                _check_identifier(batch_code, "batch_code")
            except ValueError as exc:
                raise ValidationError(str(exc)) from exc
            self.core.controls.hold_batch(tenant, batch_code, held=suspended)
            self.core.log.info("dispatching %s for batch %s of tenant %s", verb,
                               batch_code[:QUOTE_CHARS], tenant)
            if not suspended:
                self.core.dispatcher.wake()
            return {"ok": True, "batch_code": batch_code, "active": not suspended}
        if tenant == ALL_TENANTS and "account_id" in payload:
            tenant = DEFAULT_TENANT   # the seed's per-account suspend, unchanged
        account_id = self._account_argument(payload, tenant)
        if account_id is not None:
            (self.core.controls.suspend if suspended else self.core.controls.activate)(account_id)
            self.core.log.info("dispatching %s for account %s", verb, _shown_key(account_id))
        elif tenant == ALL_TENANTS:
            (self.core.controls.suspend if suspended else self.core.controls.activate)()
            self.core.log.info("dispatching %s", verb)
        else:
            self.core.controls.suspend_tenant(tenant, suspended)
            self.core.log.info("dispatching %s for tenant %s", verb, tenant)
        if not suspended:
            self.core.dispatcher.wake()
        if account_id is not None:
            return {"ok": True, "account_id": _name_of(account_id),
                    "active": self.core.controls.account_active(account_id)}
        if tenant == ALL_TENANTS:
            return {"ok": True, "active": self.core.controls.active}
        return {"ok": True, "tenant_id": tenant,
                "active": self.core.controls.tenant_active(tenant)}

    def suspend(self, payload, tenant):
        return self._suspension(payload, tenant, suspended=True)

    def activate(self, payload, tenant):
        return self._suspension(payload, tenant, suspended=False)

    def add_messages(self, payload, tenant):
        """Queue a batch.  Only a malformed batch (no messages list, or more
        than MAX_BATCH_MESSAGES) is an error: the real client raises on any
        non-2xx, and a raise inside its pull loop would wedge it on that
        batch for good.  Invalid messages are listed in ``rejected``; an id
        already queued or sent, or earlier in the batch, in ``duplicates``
        (the first copy stands, so a resend after a lost answer reads as
        success); an id whose message failed is queued anew (``replaced``:
        Genropy's "Retry send" resends the same id)."""
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise self._batch_error("body must be an object with a messages list", [])
        if len(messages) > MAX_BATCH_MESSAGES:
            raise self._batch_error("a batch holds at most %d messages" % MAX_BATCH_MESSAGES, [])
        self._note_intake(tenant)
        default_priority = self.core.config.delivery.default_priority
        bad_default = None
        if payload.get("default_priority") is not None:
            try:
                default_priority = _parse_priority(payload["default_priority"])
            except ValueError as exc:
                bad_default = "default_priority: %s" % exc
        now = self.core.now()
        accepted, rejected, repeated, ignored = self._screen(messages, tenant, default_priority,
                                                             bad_default)
        duplicates, orphans, replaced = (self.core.store.insert_messages(accepted, now, tenant)
                                         if accepted else (set(), set(), set()))
        for key in sorted(orphans):
            rejected.append({"id": _name_of(key), "reason": "unknown account (deleted)"})
        queued = len(accepted) - len(duplicates) - len(orphans)
        stored = [m for m in accepted if _scoped(tenant, m["id"]) not in duplicates | orphans]
        due = [m["priority"] for m in stored
               if m["deferred_ts"] is None or m["deferred_ts"] <= now]
        if 0 in due:
            self.core.dispatcher.wake()
        elif due:
            # new due mail is looked at now, as Postfix's qmgr is told of new
            # mail at once (send_interval_seconds is only the idle poll)
            self.core.dispatcher.wake_if_idle()
        answer = {"ok": True, "queued": queued, "rejected": rejected,
                  "duplicates": list(dict.fromkeys(
                      [m["id"] for m in accepted if _scoped(tenant, m["id"]) in duplicates]
                      + repeated))}
        if ignored:
            answer["ignored"] = ignored
        if replaced:
            answer["replaced"] = [m["id"] for m in accepted
                                  if _scoped(tenant, m["id"]) in replaced]
            self.core.log.info("%d failed message(s) resubmitted as new attempts (tenant %s)",
                               len(replaced), tenant)
        return answer

    def _screen(self, messages, tenant, default_priority, bad_default):
        """The messages of a batch validated: (accepted, rejected, repeated,
        ignored), ``accepted`` normalised and each id once (the first copy
        stands: later ones are ``repeated``), ``rejected`` the refused with
        their reasons, ``ignored`` the unknown fields named (at most
        MAX_IGNORED_SHOWN messages)."""
        resolve = _AccountResolver(set(self.core.tenant_accounts(tenant)),
                                   self.core.config.delivery.default_account
                                   if tenant == DEFAULT_TENANT else None)
        endpoint = self.core.attachment_endpoint(tenant)
        rejected, accepted, seen, repeated, ignored = [], [], set(), [], []
        for raw in messages:
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                if bad_default and raw.get("priority") is None:
                    raise ValueError(bad_default)
                if raw.get("tenant_id") not in (None, tenant):
                    raise ValueError("tenant_id %s is not this request's tenant (%s)"
                                     % (str(raw["tenant_id"])[:QUOTE_CHARS], tenant))
                message = validate_message(raw, default_priority, resolve)
                if endpoint is None and any("storage_path" in a
                                            for a in message["attachments"]):
                    raise ValueError("storage_path attachments need a tenant registered "
                                     "with client_attachment_path")
            except ValueError as exc:
                rejected.append({"id": raw_id if isinstance(raw_id, (str, int)) else None,
                                 "reason": str(exc)})
                continue
            unknown = ignored_message_fields(raw)
            if unknown and len(ignored) < MAX_IGNORED_SHOWN:
                ignored.append({"id": message["id"], "fields": unknown[:MAX_IGNORED_SHOWN]})
                self._note_ignored_fields("message", message["id"], unknown)
            if message["id"] in seen:
                repeated.append(message["id"])
                continue
            seen.add(message["id"])
            accepted.append(message)
        return accepted, rejected, repeated, ignored

    def _note_intake(self, tenant):
        """Count a well-formed add-messages batch.  The reporter compares the
        count around each report POST: an upstream that handed work over
        while its POST was open (Genropy's pull flow) may have more."""
        self._intake_serials[tenant] = next(self._intake_counter)

    @staticmethod
    def _batch_error(message, rejected):
        return ValidationError(message, detail={"error": message, "rejected": rejected})

    def delete_messages(self, payload, tenant):
        """Delete what a selector names (SPEC 7 shapes: ids, account_id,
        status, or {} for every message not yet sent or failed), like
        ``postsuper -d``; each deletion is logged and reported upstream.  A
        message on the wire goes when its transaction ends, unless the relay
        accepted it (``being_sent``)."""
        kind, value = _parse_selector("delete", payload)
        if tenant == ALL_TENANTS:
            raise ValidationError("delete-messages needs one tenant_id")
        not_found = []
        if kind == "ids":
            keys = [_scoped(tenant, i) for i in value]
            not_found, being_sent = self.core.store.delete_messages(keys) if keys else ([], [])
            removed = len(keys) - len(not_found) - len(being_sent)
        else:
            if kind == "account_id":
                value = _scoped(tenant, value)
            removed, being_sent = self.core.store.delete_selected(kind, value, tenant)
        what = {"ids": "%d id(s)" % len(value) if kind == "ids" else "",
                "account_id": "account %s" % _shown_key(str(value)),
                "status": "status %s" % value, "all": "all not yet sent or failed"}[kind]
        self.core.log.info("delete-messages (%s, tenant %s): %d deleted%s", what, tenant, removed,
                           "; %d on the wire, deleted when their transaction ends unless sent"
                           % len(being_sent) if being_sent else "")
        if removed:
            self.core.reporter.wake()
        answer = {"ok": True, "removed": removed, "affected": removed,
                  "not_found": [_name_of(k) for k in not_found]}
        if being_sent:
            answer["being_sent"] = [_name_of(k) for k in being_sent]
        return answer

    def cleanup_messages(self, payload, tenant):
        """POST /commands/cleanup-messages: purge the tenant's reported, finished messages
        older than ``older_than_seconds`` (default: the retention)."""
        older_than = payload.get("older_than_seconds")
        if older_than is None:
            older_than = self.core.config.delivery.delivery_report_retention_seconds
        elif not _is_number(older_than) or older_than < 0:
            raise ValidationError("older_than_seconds must be a number >= 0")
        older_than = min(older_than, 1e12)   # 30,000 years: beyond it, float() overflows
        return {"ok": True, "removed": self.core.store.purge_reported(self.core.now() - older_than,
                                                                      tenant)}

    def add_account(self, payload, tenant):
        """POST /account: validate and insert or replace an account of ``tenant``; unknown
        fields are ignored, listed in the answer and logged once."""
        try:
            account = validate_account(payload)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        key = _scoped(tenant, account["id"])
        account.update(id=key, tenant_id=tenant)
        self.core.store.upsert_account(account, self.core.now())
        self.core.reload_accounts()
        self.core.metrics.add_account(key)
        self.core.dispatcher.account_changed(key)
        answer = {"ok": True}
        ignored = ignored_account_fields(payload)
        if ignored:
            answer["ignored"] = ignored[:MAX_IGNORED_SHOWN]
            self._note_ignored_fields("account", _shown_key(key), ignored)
        return answer

    def _note_ignored_fields(self, kind, name, fields):
        """Log each ignored field name of an account or a message once per
        process: a client that sends the same extra field every time is
        told once (every answer still lists them)."""
        with self._lock:
            new = [f for f in fields if (kind, f) not in self._ignored_fields]
            if len(self._ignored_fields) < MAX_IGNORED_SHOWN * 10:
                self._ignored_fields.update((kind, f) for f in new)
        if new:
            self.core.log.info("%s %s: ignored unknown field(s) %s (not stored)", kind, name,
                               ", ".join(new[:MAX_IGNORED_SHOWN]))

    def list_accounts(self, payload, tenant):
        """The accounts, each with its state: ``active`` (its own suspension
        flag) and ``held_back_until`` (epoch, or None: the dispatcher's
        back-off after a relay failure or a full rate window)."""
        accounts = self.core.tenant_accounts(tenant)
        held = self.core.dispatcher.held_back(self.core.now())
        shown = []
        for name in sorted(accounts):
            account = public_account(accounts[name])
            key = accounts[name]["id"]
            account["active"] = self.core.controls.account_active(key)
            account["held_back_until"] = held.get(key)
            shown.append(account)
        return {"ok": True, "accounts": shown}

    def _account_states(self, tenant):
        """For /status: the accounts suspended, and those held back (until)."""
        now = self.core.now()
        held = self.core.dispatcher.held_back(now)
        suspended, backed_off = [], {}
        for key in sorted(self.core.accounts()):
            if tenant != ALL_TENANTS and _tenant_of(key) != tenant:
                continue
            shown = _name_of(key) if tenant != ALL_TENANTS else _shown_key(key)
            if not self.core.controls.account_active(key):
                suspended.append(shown)
            if key in held:
                backed_off[shown] = held[key]
        return {"suspended": suspended, "held_back_until": backed_off}

    def delete_account(self, payload, tenant):
        """DELETE /account/{id}: 404 unknown; 409 while it has undelivered messages, unless
        ``force``, which fails them with ``account deleted`` (reported like any error)."""
        account_id = payload.get("id")
        if not isinstance(account_id, str):
            raise ValidationError("id must be a string")
        try:
            force = _parse_bool(payload.get("force", False))
        except ValueError as exc:
            raise ValidationError("force must be true or false") from exc
        key = _scoped(tenant, account_id)
        undelivered = self.core.store.delete_account(key, force, self.core.now())
        self.core.reload_accounts()
        if undelivered is None:
            raise NotFoundError("unknown account")
        if undelivered and not force:
            raise ConflictError("account has %d undelivered message(s); use ?force=true "
                                "to fail them" % undelivered)
        if undelivered:
            self.core.log.warning("account %s deleted with force: %d message(s) failed",
                                  _shown_key(key), undelivered)
            self.core.reporter.wake()
        self.core.dispatcher.account_changed(key)
        return {"ok": True}

    def list_messages(self, payload, tenant):
        """GET /messages: filters (status, account_id, since, until,
        id_prefix, batch_code), order and keyset paging (``after`` /
        ``next``), in one tenant or (ALL_TENANTS) all."""
        statuses = list(STATUSES)
        if payload.get("status") not in (None, ""):
            wanted = str(payload["status"]).split(",")
            unknown = [s for s in wanted if s not in STATUSES]
            if unknown:
                raise ValidationError("status must be a comma list of %s" % ", ".join(STATUSES))
            statuses = [s for s in STATUSES if s in wanted]
        if _query_bool(payload, "active_only"):
            statuses = [s for s in statuses if s in ACTIVE_STATUSES]
        order = payload.get("order") or "oldest"
        if order not in SQL_LIST_ORDER:
            raise ValidationError("order must be oldest or newest")
        id_prefix = payload.get("id_prefix")
        if id_prefix is not None:
            id_prefix = _check_identifier(id_prefix, "id_prefix") if id_prefix != "" else None
        account_id = payload.get("account_id") or None
        if account_id is not None and not isinstance(account_id, str):
            raise ValidationError("account_id must be a string")
        batch_code = payload.get("batch_code") or None
        if batch_code is not None and not isinstance(batch_code, str):
            raise ValidationError("batch_code must be a string")
        if tenant == ALL_TENANTS and (id_prefix is not None or account_id is not None):
            raise ValidationError("id_prefix and account_id need one tenant_id")
        if tenant != ALL_TENANTS:
            account_id = None if account_id is None else _scoped(tenant, account_id)
            if id_prefix is not None:
                id_prefix = _scoped(tenant, id_prefix)
        query = {"account_id": account_id, "id_prefix": id_prefix, "order": order,
                 "tenant": None if tenant == ALL_TENANTS else tenant, "batch_code": batch_code,
                 "since": _query_number(payload, "since"),
                 "until": _query_number(payload, "until"),
                 "after": _decode_cursor(payload.get("after"), by_id=id_prefix is not None),
                 "limit": _query_int(payload, "limit", 1000, 0, MAX_LIST_LIMIT),
                 "offset": _query_int(payload, "offset", 0, 0, 2 ** 62)}
        full = _query_bool(payload, "full")
        search = payload.get("search") or None
        if search is not None:
            try:
                search = _check_text(search, "search", max_chars=MAX_SEARCH_CHARS,
                                     single_line=True)
            except ValueError as exc:
                raise ValidationError(str(exc)) from exc
        last = None
        if not statuses:
            records = []
        elif search is not None:
            records, window_end = self.core.store.search_messages(statuses, search, **query)
            last = records[-1] if records and len(records) == query["limit"] else window_end
        else:
            records = self.core.store.list_messages(statuses, **query)
            last = records[-1] if records and len(records) == query["limit"] else None
        cursor = None if last is None else _encode_cursor(
            last["id"] if id_prefix is not None else [last["created_ts"], last["pk"]])
        for record in records:
            del record["pk"]
        answer = {"ok": True, "messages": [_present_record(r, full) for r in records],
                  "next": cursor}
        if search is not None:
            answer["searched"] = SEARCH_WINDOW   # messages looked at, at most, for this page
        return answer

    def get_message(self, payload, tenant):
        """GET /messages/{id}: the record with its attempts and bounces, and
        with ``mime=true`` the headers it is built with (the web page asks;
        building the message is work no other caller needs); 404 unknown."""
        ref = payload.get("id")
        key = _scoped(tenant, ref) if isinstance(ref, str) else None
        record = self.core.store.get_message(key) if key is not None else None
        if record is None:
            raise NotFoundError("unknown message")
        message = record["payload"]
        record = _present_record(record, full=True)
        record["attempts"] = self.core.store.attempts(key)
        record["bounces"] = self.core.store.bounces(key)
        if _query_bool(payload, "mime"):
            record["mime_headers"] = _mime_headers(message, self.core.now())
        return {"ok": True, "message": record}

    def list_suppressions(self, payload, tenant):
        return {"ok": True, "suppressions": self.core.store.suppressions(self.core.now(), tenant)}

    def add_suppression(self, payload, tenant):
        """Suppress an address for ``days`` (default ``suppress_days``; 0:
        until deleted, so that with automatic suppression off an admin's
        suppression still holds)."""
        unknown = sorted(str(k)[:QUOTE_CHARS] for k in payload if k not in ("address", "days"))
        if unknown:
            raise ValidationError("unknown field %s" % unknown[0])
        address = payload.get("address")
        try:
            name, address = _parse_address(address)
        except ValueError as exc:
            raise ValidationError("address: %s" % exc) from exc
        if name:
            raise ValidationError("address must be a bare address")
        days = payload.get("days", self.core.config.bounces.suppress_days)
        if not _is_number(days) or not 0 <= days <= MAX_SUPPRESS_DAYS:
            raise ValidationError("days must be 0-%d (0: until deleted)" % MAX_SUPPRESS_DAYS)
        now = self.core.now()
        self.core.store.suppress(address, "manual", now, now + days * DAY if days else None,
                                 tenant)
        return {"ok": True, "address": address.lower()}

    def delete_suppression(self, payload, tenant):
        address = payload.get("address")
        if not isinstance(address, str) or not self.core.store.unsuppress(address, self.core.now(),
                                                                          tenant):
            raise NotFoundError("not suppressed")
        return {"ok": True}

    def add_tenant(self, payload, tenant):
        """Register a tenant, or replace its settings: either way a new API
        key is made and returned (Genropy stores whatever key comes back, and
        makes new client_auth credentials at every "Register"), so the old
        key stops working at once."""
        try:
            tenant_id, settings, ignored = validate_tenant(payload)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        key = secrets.token_urlsafe(TENANT_KEY_BYTES)
        created = self.core.store.upsert_tenant(tenant_id, settings, _key_digest(key),
                                                self.core.now())
        self.core.reload_tenants()
        record = self.core.tenant(tenant_id)
        self.core.reporter.set_target(_report_target(record))
        self.core.log.info("tenant %s %s (reports to %s); a new API key was issued", tenant_id,
                           "registered" if created else "updated",
                           _redact_url(_tenant_url(settings, "client_sync_path")))
        answer = {"ok": True, "id": tenant_id, "api_key": key, "created": created}
        if ignored:
            answer["ignored"] = ignored[:MAX_IGNORED_SHOWN]
        return answer

    def _tenant_record(self, payload):
        tenant_id = payload.get("id")
        record = self.core.tenant(tenant_id) if isinstance(tenant_id, str) else None
        if record is None:
            raise NotFoundError("unknown tenant")
        return record

    def get_tenant(self, payload, tenant):
        return {"ok": True, "tenant": public_tenant(self._tenant_record(payload))}

    def list_tenants(self, payload, tenant):
        records = self.core.tenants()
        return {"ok": True, "tenants": [public_tenant(record) for record in records]}

    def delete_tenant(self, payload, tenant):
        """Unregister a tenant: its key stops working, and its accounts and
        messages (queued ones too: the site asked to leave) are removed."""
        record = self._tenant_record(payload)
        tenant_id = record["id"]
        accounts = [key for key in self.core.accounts() if _tenant_of(key) == tenant_id]
        removed = self.core.store.delete_tenant(tenant_id)
        if removed is None:
            raise NotFoundError("unknown tenant")
        self.core.reload_tenants()
        self.core.reload_accounts()
        self.core.reporter.drop_target(tenant_id)
        self.core.controls.forget_tenant(tenant_id)
        self.core.metrics.forget_tenant(tenant_id)
        for key in accounts:
            self.core.dispatcher.account_changed(key)
        self.core.log.warning("tenant %s deleted with %d message(s) and %d account(s)", tenant_id,
                              removed[0], removed[1])
        return {"ok": True, "removed_messages": removed[0], "removed_accounts": removed[1]}

    def retry(self, payload, tenant):
        """Deferred messages due now (postqueue -f / -i); the client's own
        schedule stays unless ``include_scheduled``; rate limits still hold
        (the dispatcher defers a message still over one to the exact
        instant).  Also lifts the accounts' back-off after a relay failure."""
        try:
            include = _parse_bool(payload.get("include_scheduled", False))
        except ValueError as exc:
            raise ValidationError("include_scheduled must be true or false") from exc
        answer = self._operate("retry", payload, tenant, include_scheduled=include)
        account_id = payload.get("account_id")
        self.core.dispatcher.lift_backoff(None if account_id is None or tenant == ALL_TENANTS
                                     else _scoped(tenant, str(account_id)))
        self.core.dispatcher.wake()
        return answer

    def requeue(self, payload, tenant):
        """Failed messages back to pending with retry_count 0 (after a
        fix: a password, a relay), each reported as a new state change."""
        answer = self._operate("requeue", payload, tenant)
        self.core.dispatcher.wake()
        self.core.reporter.wake()
        return answer

    def hold(self, payload, tenant):
        """Pending or deferred messages to ``held``: never dispatched, never
        expired, until released (postsuper -h)."""
        return self._operate("hold", payload, tenant)

    def release(self, payload, tenant):
        """Held messages back to where they were: ``deferred`` while their
        ``deferred_ts`` is ahead, else ``pending`` (postsuper -H)."""
        answer = self._operate("release", payload, tenant)
        self.core.dispatcher.wake()
        return answer

    def _operate(self, command, payload, tenant, include_scheduled=False):
        """Apply an operator command to what the payload's selector names in ``tenant``;
        answers ``affected`` and ``not_found`` (with ids also ``skipped``)."""
        kind, value = _parse_selector(command, payload)
        if tenant == ALL_TENANTS and kind in ("ids", "account_id"):
            raise ValidationError("ids and account_id need one tenant_id")
        if kind == "ids":
            value = [_scoped(tenant, i) for i in value]
        elif kind == "account_id":
            value = _scoped(tenant, value)
        affected, not_found, skipped = self.core.store.operate(
            command, Selector(kind, value), self.core.now(), include_scheduled,
            tenant=None if tenant == ALL_TENANTS else tenant)
        if affected:
            self.core.log.info("%s: %d message(s) (selector %s, tenant %s)", command, affected,
                               kind, "all" if tenant == ALL_TENANTS else tenant)
        answer = {"ok": True, "affected": affected, "not_found": [_name_of(k) for k in not_found]}
        if kind == "ids":
            answer["skipped"] = [_name_of(k) for k in skipped]
        return answer


# ####################################################################### #
# #############################  The core  ############################## #
# ####################################################################### #

class AsyncMailCore:
    """Builds and owns everything: store, workers, HTTP server, metrics.

    ``AsyncMailCore(config=None)`` uses the defaults without reading a file or
    the environment; ``config`` may also be a Config or a mapping of
    section -> key -> value.  ``now`` is the clock (epoch seconds) used for
    every timestamp and delay, so tests drive time; ``smtp_connect`` is the
    seam that opens SMTP connections.  ``test_mode`` (or ``[delivery]
    test_mode``): the loops run only on run-now, which then returns after the
    cycle finished.

    ``handle_command(name, payload)`` is safe from any thread; it acts as
    the admin, in the default tenant unless the payload names a
    ``tenant_id``.  The commands themselves are ``_Commands``'; the core
    wires the parts, starts and stops them, and keeps the caches (accounts,
    tenants) that several of them read.
    """

    def __init__(self, config=None, test_mode=False, now=None, smtp_connect=None,
                 logger=None, imap_connect=None):
        """Open the store (recovering what a crash left in ``sending``),
        load accounts and tenants, and build the workers; nothing runs and
        nothing listens until ``start``.  Raises StoreError."""
        if config is None:
            config = Config()
        elif isinstance(config, dict):
            config = Config(config)
        self.config = config
        self.test_mode = bool(test_mode or config.delivery.test_mode)
        self.now = now or time.time
        self.log = logger or logging.getLogger("asyncmail")
        self.metrics = Metrics()
        self.store = Store(config.storage.db_path, reporting=bool(config.client.client_sync_url))
        self.controls = _Controls(config.scheduler.active)
        self.tls = _LazyTls()   # one verified context for https, reporter and fetcher
        self.fetcher = AttachmentFetcher(config.attachments, config.s3, self.now, tls=self.tls)
        self._http = None
        self._http_thread = None
        self._started = False
        self._accounts_lock = threading.Lock()
        self.commands = _Commands(self)
        self._accounts = self._load_accounts()
        self._tenants, self._tenant_keys = self._load_tenants()
        self.metrics.add_tenant(DEFAULT_TENANT)
        for account_id in self._accounts:
            self.metrics.add_account(account_id)
        recovered = self.store.recover_interrupted()
        if recovered:
            self.log.warning("%d message(s) were being sent when asyncmail last stopped; "
                             "they will be retried with their Message-ID", recovered)
        poll = not self.test_mode
        verp = None
        if config.bounces.verp_address:
            verp = Verp(config.bounces.verp_address, bytes.fromhex(self.store.setting("verp_key")))
        self.verp = verp
        self.dispatcher = _Dispatcher(
            self.store, self.accounts, self.controls, self.fetcher, self.metrics, config,
            self.log, self.now, poll, on_delivered=lambda: self.reporter.wake(),
            smtp_connect=smtp_connect, verp=verp, endpoint=self.attachment_endpoint)
        self.reporter = _Reporter(self.store, self.metrics, config, self.log, self.now, poll,
                                  intake_serial=self.commands.intake_serial, tls=self.tls)
        for tenant in self._tenants.values():
            self.reporter.set_target(_report_target(tenant))
        self.bounces = None   # the third loop runs only with a bounce mailbox
        if config.bounces.imap_host:
            self.bounces = _BounceCollector(
                self.store, self.metrics, config.bounces, verp, self.log, self.now, poll,
                on_bounce=lambda: self.reporter.wake(), imap_connect=imap_connect)

    # -- accounts (cached: read on every intake and every dispatch cycle) -----

    def _load_accounts(self):
        return {account["id"]: account for account in self.store.list_accounts()}

    def accounts(self):
        """{account store key: settings}, a snapshot of the cached accounts table."""
        with self._accounts_lock:
            return dict(self._accounts)

    def tenant_accounts(self, tenant):
        """{account id: settings} of one tenant (ALL_TENANTS: by store key)."""
        accounts = self.accounts()
        if tenant == ALL_TENANTS:
            return accounts
        return {_name_of(key): account for key, account in accounts.items()
                if _tenant_of(key) == tenant}

    def reload_accounts(self):
        accounts = self._load_accounts()
        with self._accounts_lock:
            self._accounts = accounts

    # -- tenants (cached: every request with a tenant key looks one up) -------

    def _load_tenants(self):
        tenants = {t["id"]: t for t in self.store.list_tenants()}
        return tenants, {t["key_hash"]: t["id"] for t in tenants.values()}

    def reload_tenants(self):
        tenants, keys = self._load_tenants()
        with self._accounts_lock:
            self._tenants, self._tenant_keys = tenants, keys

    def tenant(self, tenant_id):
        """The record of a registered tenant, or None."""
        with self._accounts_lock:
            return self._tenants.get(tenant_id)

    def tenants(self):
        """Every registered tenant's record, by id."""
        with self._accounts_lock:
            return [self._tenants[name] for name in sorted(self._tenants)]

    def tenant_for_key(self, key):
        """The tenant whose API key is ``key``, or None.  Only the key's
        SHA-256 is kept; the look-up is by that digest, so its timing says
        nothing about the key, and the match is confirmed in constant time."""
        digest = _key_digest(key)
        with self._accounts_lock:
            tenant = self._tenant_keys.get(digest)
            stored = self._tenants[tenant]["key_hash"] if tenant is not None else ""
        return tenant if tenant is not None and hmac.compare_digest(stored, digest) else None

    def attachment_endpoint(self, tenant):
        """The AttachmentEndpoint of ``tenant``, or None (the default tenant,
        or one registered without client_attachment_path)."""
        with self._accounts_lock:
            record = self._tenants.get(tenant)
        if record is None or not record["settings"].get("client_attachment_path"):
            return None
        settings = record["settings"]
        return AttachmentEndpoint(tenant, _tenant_url(settings, "client_attachment_path"),
                                  _tenant_auth_headers(settings))

    # -- lifecycle ----------------------------------------------------------

    def start(self, serve_http=True):
        """Start the workers and (unless ``serve_http`` is false) the HTTP
        server on ``[server] host/port``.  Returns self."""
        if self._started:
            return self
        self._started = True
        if serve_http:   # bind first: a taken port must not leave workers sending
            server = self.config.server
            self._http = _ApiServer((server.host, server.port), self, server.api_token,
                                    server.max_request_bytes, self.metrics, self.log)
        self.dispatcher.start()
        self.reporter.start()
        if self.bounces is not None:
            self.bounces.start()
        if serve_http:
            self._http_thread = threading.Thread(
                target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                name="asyncmail-http", daemon=True)
            self._http_thread.start()
            self.log.info("asyncmail %s listening on http://%s:%d (database %s)",
                          __version__, self.http_address[0], self.http_address[1],
                          self.store.path)
        return self

    @property
    def http_address(self):
        """(host, port) the HTTP server is bound to, or None."""
        return self._http.server_address[:2] if self._http else None

    def stop(self):
        """Stop accepting requests, let in-flight SMTP transactions finish
        (at most ``smtp_timeout_seconds``), close the store.  Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(5)
            self._http = None
        grace = self.config.delivery.smtp_timeout_seconds + 1
        self.dispatcher.stop(grace)
        self.reporter.stop(self.config.client.timeout_seconds + 1)
        if self.bounces is not None:
            self.bounces.stop(IMAP_TIMEOUT + 1)
        self.store.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- commands -----------------------------------------------------------

    def run_command(self, name, payload=None, caller=None):
        """Run a command for ``caller`` (a Caller; None: the admin): returns
        (HTTP status, answer); raises ApiError (see _Commands.run)."""
        return self.commands.run(name, payload, caller)

    def handle_command(self, name, payload=None):
        """Run a command as the admin and return its answer as a dict (``ok``
        false and an ``error`` on failure)."""
        try:
            return self.run_command(name, payload)[1]
        except ApiError as exc:
            answer = {"ok": False, "error": str(exc)}
            if exc.detail is not None:
                answer["detail"] = exc.detail
            return answer

    # -- suppressions (SPEC 8) -----------------------------------------------

    # -- tenants ----------------------------------------------------------------

    # -- operator control (SPEC 7) -------------------------------------------

    def healthy(self, max_age):
        """Every loop alive and looking up within ``max_age`` seconds (the
        systemd watchdog is fed only while this holds)."""
        return (self.dispatcher.alive(max_age) and self.reporter.alive(max_age)
                and (self.bounces is None or self.bounces.alive(max_age)))

    def status_line(self):
        """One line for systemd's STATUS=: queue depth by status."""
        counts = self.store.queue_counts()
        return "%s; queue: %d pending, %d deferred, %d sending, %d sent, %d failed" % (
            "active" if self.controls.active else "suspended", counts.get("pending", 0),
            counts.get("deferred", 0), counts.get("sending", 0), counts.get("sent", 0),
            counts.get("error", 0))

    # -- metrics ------------------------------------------------------------

    def render_metrics(self):
        """The Prometheus exposition: counters plus gauges read with index
        seeks only (no table scan), so scraping stays cheap at any queue size;
        only the report backlog is counted, over its index, and it is as long
        as the upstreams are behind."""
        by_tenant = self.store.tenant_queue_counts()
        counts = self.store.queue_counts()
        backlog = self.store.event_backlog()
        now = self.now()
        accounts = sorted(self.accounts())
        held = self.dispatcher.held_back(now)
        oldest = self.store.oldest_active_created_ts()
        age = max(0.0, now - oldest) if oldest is not None else 0.0
        gauges = [
            ("asyncmail_pending_messages", "Messages not yet sent or failed.",
             sum(counts.get(s, 0) for s in ACTIVE_STATUSES)),
            ("asyncmail_queue_messages", "Messages in the queue by tenant and status.",
             {(("tenant", t), ("status", s)): by_tenant[t].get(s, 0)
              for t in sorted(by_tenant) for s in STATUSES}),
            ("asyncmail_oldest_pending_age_seconds",
             "Age of the oldest message not yet sent or failed.", age),
            ("asyncmail_active", "1 when dispatching is active, 0 when suspended.",
             1 if self.controls.active else 0),
            ("asyncmail_tenant_active", "1 when a tenant's dispatching is active, 0 when "
             "suspended.", {(("tenant", t),): 1 if self.controls.tenant_active(t) else 0
                            for t in sorted(by_tenant)}),
            ("asyncmail_account_active", "1 when an account's own dispatching is active, 0 "
             "when suspended.", {(("tenant", _tenant_of(k)), ("account_id", _name_of(k))):
                                 1 if self.controls.account_active(k) else 0
                                 for k in accounts}),
            ("asyncmail_account_held_back_seconds", "Seconds until a held-back account "
             "(relay failure, full rate window) is tried again; 0 when it is not.",
             {(("tenant", _tenant_of(k)), ("account_id", _name_of(k))):
              max(0.0, held.get(k, now) - now) for k in accounts}),
            ("asyncmail_report_backlog", "Report events waiting for the upstream's "
             "acknowledgement.", {(("tenant", t),): backlog.get(t, 0)
                                  for t in sorted(set(by_tenant) | set(backlog))}),
            ("asyncmail_build_info", "Version of asyncmail.",
             {(("version", __version__),): 1}),
        ]
        return self.metrics.render(gauges)


# ####################################################################### #
# ######################  systemd, CLI and main()  ###################### #
# ####################################################################### #

class _JournalFormatter(logging.Formatter):
    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                  logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        text = super().format(record)
        prefix = "<%d>" % self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _JsonFormatter(logging.Formatter):
    """``[logging] format = json``: one JSON object a line (ts, level,
    logger, message, and the traceback as ``exc``), for log shippers; under
    systemd with journald's ``<N>`` priority prefix."""

    def __init__(self, journal=False):
        super().__init__()
        self.journal = journal

    def format(self, record):
        entry = {"ts": _iso(record.created)[:-1] + ".%03dZ" % record.msecs,
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        text = json.dumps(entry, ensure_ascii=False)
        if self.journal:
            text = "<%d>%s" % (_JournalFormatter.PRIORITIES.get(record.levelno, 6), text)
        return text


def _setup_logging(config, stream=None):
    """Log to stderr; under systemd (JOURNAL_STREAM set) without timestamps
    and with ``<N>`` syslog priority prefixes that journald understands."""
    handler = logging.StreamHandler(stream or sys.stderr)
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    if config.logging.format == "json":
        handler.setFormatter(_JsonFormatter(journal))
    elif journal:
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("asyncmail")
    logger.handlers[:] = [handler]
    logger.setLevel(config.logging.level)
    logger.propagate = False
    return logger


def _sd_notify(message, environ=None):
    """Send ``message`` to systemd's notification socket; a no-op without
    ``$NOTIFY_SOCKET``.  Never raises."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False


def _watchdog_seconds(environ):
    """systemd's WatchdogSec= for this process in seconds, or None."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def _parse_args(argv):
    """The command line: the daemon's options, and the CLI's commands with theirs (``--json``,
    ``--tenant`` and ``--config`` on each).  argparse exits 2 on a usage error."""
    parser = argparse.ArgumentParser(
        prog="asyncmail.py",
        description="asyncmail %s: a durable mail queue daemon with a REST API. "
                    "Without a command it runs the daemon: it reads config.ini from the "
                    "working directory (or $ASYNC_MAIL_CONFIG) if present and listens on "
                    "127.0.0.1:8000. With a command it talks to the running daemon "
                    "through its API (address and token from the same configuration)."
                    % __version__,
        epilog="exit codes: 0 success, 1 the API refused (its message is printed) or an "
               "ID was not found, 69 the daemon does not answer, 75 another asyncmail "
               "holds the database, 78 configuration error")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $ASYNC_MAIL_CONFIG, "
                             "else ./config.ini if it exists)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print it with secrets "
                             "masked, and exit (0 valid, 78 invalid)")
    parser.add_argument("--version", action="version", version="asyncmail " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    queue_cmd = commands.add_parser("queue", help="list the queue, like mailq")
    queue_cmd.add_argument("--status", help="comma list: pending,deferred,held,sending,"
                                            "sent,error (default: not yet sent or failed)")
    queue_cmd.add_argument("--account", help="only this account's messages")
    queue_cmd.add_argument("--limit", type=int, default=None, help="at most N messages")
    commands.add_parser("status", help="queue depth by status")
    show = commands.add_parser("show", help="one message: its record and attempts")
    show.add_argument("id")
    for name, what in (("retry", "deferred messages due now (postqueue -f / -i)"),
                       ("requeue", "failed messages back to pending (after a fix)"),
                       ("hold", "pending/deferred messages held (postsuper -h)"),
                       ("release", "held messages back where they were (postsuper -H)"),
                       ("delete", "messages removed; with --account/--all only those not "
                                  "yet sent or failed (postsuper -d)")):
        command = commands.add_parser(name, help=what)
        command.add_argument("ids", nargs="*", metavar="ID")
        command.add_argument("--account", help="every message of this account")
        command.add_argument("--all", action="store_true", help="every message it applies to")
        if name == "retry":
            command.add_argument("--include-scheduled", action="store_true",
                                 help="also messages waiting for their own deferred_ts")
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="print the API's JSON")
        # options may follow the command too ("status --config X")
        command.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                             help="configuration file (as before the command)")
        command.add_argument("--tenant", metavar="ID",
                             help="act in this tenant (default: the default tenant; "
                                  "'*': every tenant, for queue, status and the "
                                  "operator commands)")
    return parser.parse_args(argv)


class _CliError(AsyncmailError):
    """A CLI request failed; ``code`` is the exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class _ApiClient:
    """The CLI's HTTP client of the running daemon: address and token from
    the configuration; a wildcard listen address is reached on loopback."""

    TIMEOUT = 30.0

    def __init__(self, config):
        host = config.server.host
        self.host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.port = config.server.port
        self.token = config.server.api_token
        self.tenant = None   # sent as ?tenant_id= with every call when set

    def call(self, method, path, body=None):
        """The answer's JSON; raises _CliError (exit 69 when nothing answers,
        1 for an API error)."""
        if self.tenant is not None:
            path += ("&" if "?" in path else "?") + urllib.parse.urlencode(
                {"tenant_id": self.tenant})
        headers = {"X-API-Token": self.token} if self.token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.TIMEOUT)
        where = "http://%s:%d" % (("[%s]" % self.host) if ":" in self.host else self.host,
                                  self.port)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _CliError("the daemon does not answer at %s (%s); is it running?"
                            % (where, exc or type(exc).__name__), EX_UNAVAILABLE) from exc
        finally:
            conn.close()
        try:
            answer = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise _CliError("%s answered HTTP %d with no JSON: is it asyncmail?"
                            % (where, response.status), 1) from exc
        if response.status == 401:
            raise _CliError("the daemon refused the API token (set [server] api_token or "
                            "ASYNC_MAIL_SERVER_API_TOKEN as the daemon has it)", 1)
        if not 200 <= response.status < 300 or not answer.get("ok"):
            raise _CliError("%s" % answer.get("error", "HTTP %d" % response.status), 1)
        return answer


def _age(seconds):
    """3s, 5m, 2h, 4d: mailq-style, for the queue table."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % max(0, seconds)


_QUEUE_ROW = "%-28s %-8s %5s %-14s %-8s %-30s %s"


def _next_attempt(record, now):
    """When a deferred message is tried next: "in 5m", "due"; "-" otherwise."""
    if record["status"] != "deferred" or record.get("deferred_ts") is None:
        return "-"
    left = record["deferred_ts"] - now
    return "in " + _age(left) if left > 0 else "due"


def _cli_queue(api, args, now, out):
    """``asyncmail.py queue``: a mailq-like table (header row, NEXT column, a summary and "more
    exist" when ``--limit`` cut it), or ``--json``; pages through GET /messages with its keyset
    cursor.  Raises _CliError."""
    query = {"status": args.status or ",".join(ACTIVE_STATUSES), "limit": 1000}
    if args.account:
        known = [a["id"] for a in api.call("GET", "/accounts")["accounts"]]
        if args.account not in known:
            raise _CliError("no account %s (accounts: %s)" % (
                args.account, ", ".join(known[:20]) or "none"), 1)
        query["account_id"] = args.account
    shown, counts, rows, more = 0, {}, [], False
    if not args.json:
        print(_QUEUE_ROW % ("ID", "STATUS", "AGE", "ACCOUNT", "NEXT", "TO", "LAST ERROR"),
              file=out)
    while args.limit is None or shown < args.limit:
        if args.limit is not None:
            query["limit"] = min(1000, args.limit - shown)
        answer = api.call("GET", "/messages?" + urllib.parse.urlencode(query))
        for record in answer["messages"]:
            shown += 1
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            rows.append(record)
            if not args.json:
                to = record["to"][0] if record["to"] else ""
                shown_id = record["id"]
                if record.get("tenant_id") not in (None, DEFAULT_TENANT, api.tenant):
                    shown_id = "%s/%s" % (record["tenant_id"], shown_id)
                print(_QUEUE_ROW % (
                    shown_id[:28], record["status"], _age(now - record["created_ts"]),
                    record["account_id"][:14], _next_attempt(record, now), to[:30],
                    " ".join((record["error"] or "").split())[:60]), file=out)
        more = bool(answer.get("next"))
        if not more:
            break
        query["after"] = answer["next"]
    if args.json:
        print(json.dumps({"ok": True, "messages": rows, "more": more}, indent=1), file=out)
    else:
        summary = ", ".join("%d %s" % (n, status) for status, n in sorted(counts.items()))
        print("-- %d message%s%s%s" % (shown, "" if shown == 1 else "s",
                                       " (%s)" % summary if summary else "",
                                       "; more exist (raise --limit)" if more else ""),
              file=out)


def _cli_selector(args):
    chosen = [bool(args.ids), args.account is not None, args.all]
    if sum(chosen) != 1:
        raise _CliError("name the messages: ID..., --account X or --all", 1)
    if args.ids:
        return {"ids": args.ids}
    return {"account_id": args.account} if args.account is not None else {}


def _cli_delete(api, args):
    """``asyncmail.py delete``: ids in chunks of MAX_DELETE_IDS, or the account's (or every)
    message not yet sent or failed through one selector."""
    selector = _cli_selector(args)
    ids = selector.get("ids")
    if ids is None:        # the queued messages of an account, or all of them
        return api.call("POST", "/commands/delete-messages", selector)
    removed, not_found, being_sent = 0, [], []
    for start in range(0, len(ids), MAX_DELETE_IDS):
        answer = api.call("POST", "/commands/delete-messages",
                          {"ids": ids[start:start + MAX_DELETE_IDS]})
        removed += answer["removed"]
        not_found += answer["not_found"]
        being_sent += answer.get("being_sent", [])
    answer = {"ok": True, "removed": removed, "affected": removed, "not_found": not_found}
    if being_sent:
        answer["being_sent"] = being_sent
    return answer


def _cli(config, args, out=None):
    """Run one CLI command against the daemon; returns the exit code."""
    out = out or sys.stdout
    api = _ApiClient(config)
    api.tenant = getattr(args, "tenant", None)
    try:
        if args.command == "queue":
            _cli_queue(api, args, time.time(), out)
            return 0
        if args.command == "status":
            answer = api.call("GET", "/status")
            if args.json:
                print(json.dumps(answer, indent=1), file=out)
            else:
                print("asyncmail %s, %s%s" % (
                    answer["version"], "active" if answer["active"] else "suspended",
                    ", tenant %s" % answer["tenant_id"] if "tenant_id" in answer else ""),
                    file=out)
                for status, count in answer["queue"].items():
                    print("  %-9s %d" % (status, count), file=out)
                for tenant, counts in sorted(answer.get("tenants", {}).items()):
                    print("  tenant %s: %s" % (tenant, ", ".join(
                        "%d %s" % (n, status) for status, n in counts.items() if n)
                        or "empty"), file=out)
            return 0
        if args.command == "show":
            answer = api.call("GET", "/messages/" + urllib.parse.quote(args.id, safe=""))
            record = answer["message"]
            if args.json:
                print(json.dumps(answer, indent=1), file=out)
                return 0
            for key in ("id", "tenant_id", "account_id", "batch_code", "status", "priority",
                        "subject", "to", "created_at", "updated_at", "deferred_ts", "sent_ts",
                        "error_ts", "reported_ts", "retry_count", "error", "refused"):
                value = record.get(key)
                if key.endswith("_ts") and value is not None:
                    value = "%s (%s)" % (_iso(value), value)
                print("%-12s %s" % (key + ":", value), file=out)
            print("attempts:", file=out)
            for attempt in record["attempts"]:
                print("  %s %6.2fs %-24s %-8s %s %s" % (
                    _iso(attempt["ts"]), attempt["duration"], attempt["relay"],
                    attempt["outcome"], attempt["code"] or "", attempt["text"] or ""), file=out)
            return 0
        if args.command == "delete":
            answer = _cli_delete(api, args)
        else:
            body = _cli_selector(args)
            if getattr(args, "include_scheduled", False):
                body["include_scheduled"] = True
            answer = api.call("POST", "/commands/" + args.command, body)
        if args.json:
            print(json.dumps(answer, indent=1), file=out)
        else:
            print("%s: %d message%s" % (args.command, answer["affected"],
                                        "" if answer["affected"] == 1 else "s"), file=out)
            for ref in answer.get("not_found", []):
                print("  not found: %s" % ref, file=out)
            for ref in answer.get("skipped", []):
                print("  not in a status %s applies to: %s" % (args.command, ref),
                      file=out)
            for ref in answer.get("being_sent", []):
                print("  on the wire, deleted when its transaction ends unless sent: %s"
                      % ref, file=out)
        return 1 if answer.get("not_found") else 0
    except _CliError as exc:
        print("asyncmail: %s" % exc, file=sys.stderr)
        return exc.code


def main(argv=None):
    """Run the daemon until SIGTERM/SIGINT, or one CLI command; returns the
    exit code."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("asyncmail: configuration error: %s" % exc, file=sys.stderr)
        return EX_CONFIG
    if args.command is not None:
        return _cli(config, args)
    if args.check_config:
        for source in config.sources:
            print("# read: %s" % source)
        for section, key, value in config.describe():
            print("%s.%s = %s" % (section, key, value))
        return 0
    log = _setup_logging(config)
    stop = threading.Event()

    def request_stop(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    directory = os.path.dirname(os.path.abspath(config.storage.db_path))
    if not os.path.isdir(directory):
        log.error("configuration error: storage.db_path: directory %s does not exist (create "
                  "it, or let systemd's StateDirectory= make it); not starting on an empty "
                  "queue", directory)
        return EX_CONFIG
    try:
        core = AsyncMailCore(config, logger=log)
    except AlreadyRunningError as exc:
        log.error("cannot start: %s", exc)
        return EX_TEMPFAIL
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        core.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, exc)
        core.stop()
        return 1
    _sd_notify("READY=1\nSTATUS=listening on %s:%d" % core.http_address)
    watchdog = _watchdog_seconds(os.environ)
    tick = min(1.0, watchdog / 3.0) if watchdog else 1.0
    next_status = time.monotonic() + STATUS_EVERY
    try:
        while not stop.wait(tick):
            if watchdog:
                if core.healthy(watchdog):
                    _sd_notify("WATCHDOG=1")
                else:
                    log.critical("a worker loop is stuck or dead; withholding the "
                                 "watchdog ping so systemd restarts asyncmail")
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY
                with contextlib.suppress(StoreError):
                    _sd_notify("STATUS=" + core.status_line())
    finally:
        _sd_notify("STOPPING=1")
        log.info("stopping: finishing in-flight deliveries")
        core.stop()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
