#!/usr/bin/env python3
"""Measure what codex_proxy adds: latency, throughput, memory, connections, start-up.

    python bench_codex_proxy.py            # the full run (a few minutes)
    python bench_codex_proxy.py --quick    # a smoke run (under 30 s)

A fake Codex upstream in this process streams a realistic turn: a reasoning
item with summary deltas, 300 text deltas and a tool call with 50 argument
deltas. Each text delta carries the moment it was sent, so a client can tell
how long it took to arrive, straight from the upstream or through the proxy.
The proxy runs as a real `codex_proxy.py start` process. The full run also reports
how much of each upstream request repeats the one before it, against what the client
allows (the test suite's scripted Claude Code and SDK sessions, run on the
codex_proxy.py beside this file). Prints a table, then one JSON line with every number.
"""

import argparse
import base64
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROXY = HERE / "codex_proxy.py"
KEY = "bench-" + secrets.token_hex(16)
RATE = 100   # upstream events per second per stream in the latency runs
TARGETS = {"serial_55k_new_added_p50_ms": 1.7, "serial_55k_kept_added_p50_ms": 1.0,
           "serial_1k_new_added_p50_ms": 0.9, "serial_1k_kept_added_p50_ms": 0.9, "ttfb_added_p50_ms": 2.0, "ttfb_added_p99_ms": 10.0, "event_added_ms": 1.0,
           "events_per_core_second": 20000, "rss_64_mb": 40.0, "connections_per_100": 1, "start_ms": 150.0,
           "rss_after_large_added_mb": 20.0, "end_tool_checked_p50_ms": 55.0, "prefix_reuse_min_pct": 99.5}


# ---------------------------------------------------------------------------
# The fake upstream
# ---------------------------------------------------------------------------

def turn_events(tool_call=True):
    """One realistic Responses stream, as a list of event dicts ({stamp} marks a send time);
    without its closing tool call when ``tool_call`` is false."""
    events, seq = [], [0]

    def add(kind, **fields):
        fields.update(type=kind, sequence_number=seq[0])
        seq[0] += 1
        events.append(fields)
    response = {"id": "resp_bench", "object": "response", "status": "in_progress", "model": "gpt-5.5", "output": []}
    add("response.created", response=response)
    add("response.in_progress", response=response)
    add("response.output_item.added", output_index=0, item={"id": "rs_1", "type": "reasoning", "summary": [],
                                                            "encrypted_content": "gAAAAB" + "e" * 400})
    add("response.reasoning_summary_part.added", item_id="rs_1", output_index=0, summary_index=0,
        part={"type": "summary_text", "text": ""})
    for _ in range(20):
        add("response.reasoning_summary_text.delta", item_id="rs_1", output_index=0, summary_index=0,
            delta=" thinking", obfuscation="abcdefgh")
    add("response.output_item.done", output_index=0, item={"id": "rs_1", "type": "reasoning", "summary": [],
                                                           "encrypted_content": "gAAAAB" + "f" * 1200})
    add("response.output_item.added", output_index=1, item={"id": "msg_1", "type": "message", "role": "assistant",
                                                            "status": "in_progress", "content": []})
    for _ in range(300):
        add("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0, delta="{stamp}",
            logprobs=[], obfuscation="abcdefgh")
    add("response.output_item.done", output_index=1, item={"id": "msg_1", "type": "message", "role": "assistant",
                                                           "status": "completed", "content": []})
    if not tool_call:
        add("response.completed", response=dict(response, status="completed", usage={
            "input_tokens": 12000, "input_tokens_details": {"cached_tokens": 11000}, "output_tokens": 900}))
        return events
    add("response.output_item.added", output_index=2, item={"id": "fc_1", "type": "function_call", "name": "Bash",
                                                            "call_id": "call_bench", "arguments": ""})
    add("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta='{"command":"')
    for _ in range(48):
        add("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta="echo ")
    add("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta='"}')
    add("response.output_item.done", output_index=2, item={"id": "fc_1", "type": "function_call", "name": "Bash",
                                                           "call_id": "call_bench", "arguments": '{"command":"x"}'})
    add("response.completed", response=dict(response, status="completed", usage={
        "input_tokens": 12000, "input_tokens_details": {"cached_tokens": 11000}, "output_tokens": 900}))
    return events


def verdict_events():
    """The classifier's answer to one auto-mode check: a short JSON verdict."""
    text = json.dumps({"outcome": "not_flagged", "explanation": "Routine work in the folder."})
    response = {"id": "resp_check", "object": "response", "status": "in_progress", "model": "gpt-5.4-mini", "output": []}
    item = {"id": "msg_c", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return [{"type": "response.created", "response": response},
            {"type": "response.output_item.added", "output_index": 0, "item": dict(item, content=[])},
            {"type": "response.output_text.delta", "item_id": "msg_c", "output_index": 0, "content_index": 0,
             "delta": text},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": dict(response, status="completed", usage={
                "input_tokens": 900, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 20})}]


def sse_chunks(events):
    """Each event as one HTTP chunk; "{stamp}" is filled in at send time."""
    out = []
    for event in events:
        data = b"event: %s\ndata: %s\n\n" % (event["type"].encode(), json.dumps(event).encode())
        out.append((b"{stamp}" in data, data))
    return out


class QuietServer(ThreadingHTTPServer):
    """Says nothing when the proxy hangs up (it does, on purpose, when it stops)."""

    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):
            ThreadingHTTPServer.handle_error(self, request, client_address)


class FakeUpstream:
    """Streams the turn for every POST; ``rate`` events per second per stream (0: full speed)."""

    def __init__(self):
        self.chunks = sse_chunks(turn_events())
        self.text_chunks = sse_chunks(turn_events(tool_call=False))
        self.verdict_chunks = sse_chunks(verdict_events())
        self.review_delay = 0.05   # how long the classifier model takes to answer
        self.ended = []            # when the last event of each turn was sent (monotonic)
        self.first_item = next(n for n, (_, data) in enumerate(self.chunks) if b"output_item.added" in data)
        self.rate = 0
        self.pause = 0.0   # seconds of silence after the first output item (so that first bytes are timed alone)
        self.connections = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                BaseHTTPRequestHandler.setup(self)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.counted = False

            def log_message(self, *args):
                pass

            def do_POST(self):
                if not self.counted:   # connections that carried a turn (not the catalog fetch)
                    self.counted = True
                    with fake.lock:
                        fake.connections += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip
                    body = gzip.decompress(body)
                if b"pending_call" in body:   # the proxy's auto-mode check: the classifier model
                    time.sleep(fake.review_delay)
                    return fake.stream(self, fake.verdict_chunks)
                fake.stream(self, fake.text_chunks if b"only-text" in body else fake.chunks, fake.ended)

            def do_GET(self):   # the model catalog: none, so the proxy uses its built-in table
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base(self):
        return "http://127.0.0.1:%d/backend-api/codex" % self.server.server_address[1]

    def stream(self, handler, chunks=None, ended=None):
        chunks = chunks or self.chunks
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        gap = 1.0 / self.rate if self.rate else 0
        start = time.monotonic()
        try:
            for n, (stamped, data) in enumerate(chunks):
                if self.pause and n == self.first_item + 1:
                    time.sleep(self.pause)
                    start += self.pause
                if gap:
                    delay = start + n * gap - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if stamped:
                    data = data.replace(b"{stamp}", b"%.6f;" % time.monotonic())
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if ended is not None:
                ended.append(time.monotonic())
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True


# ---------------------------------------------------------------------------
# The proxy, as a real process
# ---------------------------------------------------------------------------

def large_body():
    """A request with a 5 MB image (base64), as Claude Code sends a screenshot or a scan."""
    data = base64.b64encode(os.urandom(5 * 1024 * 1024 * 3 // 4)).decode("ascii")
    return {"model": "claude-opus-4-8", "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is in this picture?"}]}]}


def request_body():
    """A request the size of Claude Code's (about 50 KB: a long system prompt and a dozen tools)."""
    schema = {"type": "object", "properties": {"p%d" % n: {"type": "string", "description": "x" * 80}
                                               for n in range(20)}}
    tools = [{"name": "Tool%d" % n, "description": "d" * 400, "input_schema": schema} for n in range(12)]
    return {"model": "claude-opus-4-8", "max_tokens": 32000, "stream": True,
            "thinking": {"type": "adaptive", "display": "updates"},
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"},
                       {"type": "text", "text": "You are a coding agent. " * 800}],
            "tools": tools, "messages": [{"role": "user", "content": "Run the tests."}]}


class Proxy:
    def __init__(self, upstream, program=PROXY):
        self.home = Path(tempfile.mkdtemp(prefix="codex-proxy-bench-"))
        (self.home / "tokens.json").write_text(json.dumps({"tokens": {
            "access_token": "bench-token", "refresh_token": "rt", "account_id": "acct"}}))
        self.env = dict(os.environ, CODEX_PROXY_HOME=str(self.home), CODEX_HOME=str(self.home / "codex"),
                        CODEX_PROXY_UPSTREAM=upstream, CODEX_PROXY_API_KEY=KEY)
        started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, str(program), "start", "--port", "0"], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.port = int(re.search(r":(\d+)\s*$", self.process.stdout.readline()).group(1))
        socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        self.start_ms = (time.monotonic() - started) * 1000

    def pin(self, cpus):
        """Run every thread of the proxy on ``cpus`` (affinity is per thread on Linux: the
        threads that already exist are each set, later ones inherit it)."""
        if hasattr(os, "sched_setaffinity"):
            for task in Path("/proc/%d/task" % self.process.pid).iterdir():
                try:
                    os.sched_setaffinity(int(task.name), cpus)
                except OSError:
                    pass   # a thread that ended meanwhile

    def cpu_seconds(self):
        fields = Path("/proc/%d/stat" % self.process.pid).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self):
        status = Path("/proc/%d/status" % self.process.pid).read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024.0

    def settled_rss_mb(self):
        """RSS once it has not changed for 0.3 s (the memory of the last replies is given back
        just after they are sent), at most after 5 s."""
        last, since, deadline = self.rss_mb(), time.monotonic(), time.monotonic() + 5.0
        while time.monotonic() < deadline and time.monotonic() - since < 0.3:
            time.sleep(0.05)
            now = self.rss_mb()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(str(self.home), ignore_errors=True)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

STAMP = re.compile(rb"(\d+\.\d{6});")


class Client:
    """Keeps one connection; times one streamed reply at a time."""

    def __init__(self, port, path, headers, marker=None, fresh=False):
        self.port, self.path, self.headers, self.marker = port, path, headers, marker
        self.fresh = fresh   # a new connection for every request
        self.conn = None

    def stream(self, body):
        """-> (seconds to the first output, [per-event latency], events counted).

        The first output is the first byte from the proxy (it answers once the
        upstream produced an output item), and the first output item when
        reading the upstream directly: the same moment of the reply.
        """
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = time.monotonic()
        self.conn.request("POST", self.path, body, self.headers)
        response = self.conn.getresponse()
        first, latencies, events, tail = None, [], 0, b""
        while True:
            chunk = response.read1(65536)
            if not chunk:
                break
            now = time.monotonic()
            if first is None and (self.marker is None or self.marker in tail + chunk):
                first = now - sent
            data = tail + chunk
            events += data.count(b"\n\n") - tail.count(b"\n\n")
            latencies.extend(now - float(stamp) for stamp in STAMP.findall(data))
            tail = data[data.rfind(b"\n\n") + 2:]   # a stamp cut in two is read whole with the next chunk
        if response.status != 200:
            raise RuntimeError("HTTP %d" % response.status)
        if self.fresh:
            self.close()
            self.conn = None
        return first, latencies, events

    def close(self):
        if self.conn:
            self.conn.close()


def direct_client(upstream, fresh=False):
    return Client(upstream.server.server_address[1], "/backend-api/codex/responses",
                  {"Content-Type": "application/json", "Accept": "text/event-stream"}, b"output_item.added", fresh)


def proxy_client(proxy, fresh=False):
    return Client(proxy.port, "/v1/messages?beta=true", {"x-api-key": KEY, "Content-Type": "application/json"},
                  None, fresh)


def run_clients(make, count, per_client, body, stagger=0.0):
    """count clients, each streaming per_client replies; -> (ttfbs, latencies, events, seconds).

    With ``stagger`` the clients start that many seconds apart, so that new
    requests meet streams already running (a steady state, not one burst).
    """
    ttfbs, latencies, events, lock = [], [], [0], threading.Lock()

    def work(n):
        time.sleep(n * stagger)
        client = make()
        try:
            for _ in range(per_client):
                first, lat, n = client.stream(body)
                with lock:
                    ttfbs.append(first)
                    latencies.extend(lat)
                    events[0] += n
        finally:
            client.close()
    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ttfbs, latencies, events[0], time.monotonic() - started


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------

def claude_code_request():
    """A real Claude Code request (55 KB) when the fixtures are beside the repository, else
    the synthetic one of the same size."""
    path = HERE.parent / "shared" / "fixtures" / "claude-code" / "01-p-text-request.json"
    try:
        return dict(json.loads(path.read_text())["body"], stream=True), "real Claude Code request"
    except (OSError, ValueError, KeyError):
        return request_body(), "synthetic request"


def codex_bytes(body):
    """What the proxy sends upstream for ``body``: the direct client sends the same."""
    import codex_proxy
    translated, _ = codex_proxy.translate_request(body, {}, codex_proxy.Config(), {})
    return codex_proxy.json_bytes(translated)


def measure_serial(results, upstream, program, quick):
    """Added time to first byte of one request at a time, on a new client connection for every
    request and on a kept-alive one, for a 1 KB and a 55 KB request (150 requests each)."""
    large, kind = claude_code_request()
    small = {"model": "claude-opus-4-8", "max_tokens": 1024, "stream": True,
             "messages": [{"role": "user", "content": "Run the tests and tell me what failed. " * 22}]}
    results["serial_request"] = kind
    proxy = Proxy(upstream.base, program)
    # The rest of the reply waits a moment: on two cores a reply streamed at full speed keeps both
    # busy (the upstream and the proxy) and the client would wait for a core, not for the proxy.
    upstream.rate, upstream.pause = 0, 0.005
    try:
        for name, body in (("1k", small), ("55k", large)):
            raw, sent = json.dumps(body).encode(), codex_bytes(body)
            for mode, fresh in (("new", True), ("kept", False)):
                count = 40 if quick else 150
                run_clients(lambda: proxy_client(proxy, fresh), 1, 10, raw)   # warm up
                direct = run_clients(lambda: direct_client(upstream, fresh), 1, count, sent)[0]
                through = run_clients(lambda: proxy_client(proxy, fresh), 1, count, raw)[0]
                key = "serial_%s_%s" % (name, mode)
                results[key + "_added_p50_ms"] = round((percentile(through, 0.5) - percentile(direct, 0.5)) * 1000, 2)
                results[key + "_proxy_p50_ms"] = round(percentile(through, 0.5) * 1000, 2)
    finally:
        upstream.pause = 0.0
        proxy.stop()


def measure(quick, program=PROXY):
    results = {}
    upstream = FakeUpstream()
    body = json.dumps(request_body()).encode()
    sys.path.insert(0, str(HERE))
    codex_body = codex_bytes(request_body())   # what the proxy sends: the upstream's work is the same
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    starts = []
    for _ in range(3 if quick else 7):
        proxy = Proxy(upstream.base, program)
        starts.append(proxy.start_ms)
        proxy.stop()
    results["start_ms"] = round(percentile(starts, 0.5), 1)
    measure_serial(results, upstream, program, quick)

    proxy = Proxy(upstream.base, program)
    try:
        # Latency, at a fast but real token rate (100 events/s: a Codex model streams 50-100
        # tokens a second), 32 streams running at once, direct and through the proxy.
        upstream.rate = RATE
        rounds = 2 if quick else 6
        stagger = len(upstream.chunks) / float(RATE) / 32
        direct = run_clients(lambda: direct_client(upstream), 32, rounds, codex_body, stagger)
        through = run_clients(lambda: proxy_client(proxy), 32, rounds, body, stagger)
        for name, (ttfbs, lat, _, _) in (("direct", direct), ("proxy", through)):
            results["ttfb_%s_p50_ms" % name] = round(percentile(ttfbs, 0.5) * 1000, 2)
            results["ttfb_%s_p99_ms" % name] = round(percentile(ttfbs, 0.99) * 1000, 2)
            results["event_%s_p50_ms" % name] = round(percentile(lat, 0.5) * 1000, 3)
            results["event_%s_p99_ms" % name] = round(percentile(lat, 0.99) * 1000, 3)
        results["ttfb_added_p50_ms"] = round(results["ttfb_proxy_p50_ms"] - results["ttfb_direct_p50_ms"], 2)
        results["ttfb_added_p99_ms"] = round(results["ttfb_proxy_p99_ms"] - results["ttfb_direct_p99_ms"], 2)
        results["event_added_ms"] = round(results["event_proxy_p50_ms"] - results["event_direct_p50_ms"], 3)
        results["event_added_p99_ms"] = round(results["event_proxy_p99_ms"] - results["event_direct_p99_ms"], 3)

        # The same at four times that rate (12,800 events/s in all): where one core runs out.
        upstream.rate = 4 * RATE
        direct = run_clients(lambda: direct_client(upstream), 32, 1, codex_body, stagger / 4)
        through = run_clients(lambda: proxy_client(proxy), 32, 1, body, stagger / 4)
        results["stress_event_added_ms"] = round((percentile(through[1], 0.5) - percentile(direct[1], 0.5)) * 1000, 3)
        results["stress_ttfb_added_p50_ms"] = round((percentile(through[0], 0.5) - percentile(direct[0], 0.5)) * 1000, 2)

        # Connections: 100 sequential turns on a fresh proxy, then 100 turns from 8 clients at once.
        upstream.rate = 0
        proxy.stop()
        proxy = Proxy(upstream.base, program)
        before = upstream.connections
        run_clients(lambda: proxy_client(proxy), 1, 100, body)
        results["connections_per_100"] = upstream.connections - before
        before = upstream.connections
        run_clients(lambda: proxy_client(proxy), 8, 13, body)
        results["connections_per_100_at_8_concurrent"] = upstream.connections - before

        # Throughput on one core: the proxy pinned to one CPU, everything else on the others.
        if cpus >= 2:
            proxy.pin({0})
            os.sched_setaffinity(0, set(range(1, cpus)))
        cpu_before = proxy.cpu_seconds()
        turns, _, _, seconds = run_clients(lambda: proxy_client(proxy), 8, 4 if quick else 25, body)
        cpu = proxy.cpu_seconds() - cpu_before
        upstream_events = len(turns) * len(upstream.chunks)
        results["events_per_second_wall"] = int(upstream_events / seconds)
        results["events_per_core_second"] = int(upstream_events / cpu) if cpu else None
        results["proxy_cpu_share"] = round(cpu / seconds, 2)
        if cpus >= 2:
            os.sched_setaffinity(0, set(range(cpus)))
            proxy.pin(set(range(cpus)))
    finally:
        proxy.stop()

    # Memory: a fresh proxy, then 1, 16 and 64 streams at once (paced, so they overlap).
    proxy = Proxy(upstream.base, program)
    try:
        upstream.rate = 250
        results["rss_idle_mb"] = round(proxy.settled_rss_mb(), 1)   # once start-up memory is given back
        for streams in (1, 16, 64):
            peak, done = [proxy.rss_mb()], threading.Event()

            def sample():
                while not done.is_set():
                    peak.append(proxy.rss_mb())
                    time.sleep(0.02)
            sampler = threading.Thread(target=sample)
            sampler.start()
            run_clients(lambda: proxy_client(proxy), streams, 1 if quick else 2, body)
            done.set()
            sampler.join()
            results["rss_%d_mb" % streams] = round(max(peak), 1)
    finally:
        proxy.stop()
    measure_large_bodies(results, upstream, program, quick)
    measure_safeguards(results, upstream, program, quick)
    measure_compression(results, quick)
    if not quick:
        measure_prefix_reuse(results)
    results["machine"] = "%d CPU, %s, Python %s" % (os.cpu_count(), sys.platform, sys.version.split()[0])
    return results


def end_delays(proxy, upstream, raw, count):
    """Seconds from the upstream's last event of each turn to the end of the client's reply."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    delays = []
    try:
        for _ in range(count):
            conn.request("POST", "/v1/messages?beta=true", raw, {"x-api-key": KEY, "Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            done = time.monotonic()
            if response.status != 200 or b"message_stop" not in data:
                raise RuntimeError("HTTP %d: %r" % (response.status, data[-300:]))
            delays.append(done - upstream.ended[-1])
    finally:
        conn.close()
    return delays


def measure_safeguards(results, upstream, program, quick):
    """Auto mode's check (``safeguards``): the end of a tool-call turn waits only for the
    classifier, which the fake upstream answers after ``review_delay``; a turn without
    tool calls does not wait at all. The upstream streams at 2,000 events a second, which the
    proxy keeps up with, so that what is timed is the wait, not a backlog of events."""
    upstream.rate, upstream.pause = 2000, 0.0
    proxy = Proxy(upstream.base, program)
    try:
        plain = request_body()
        checked = dict(plain, safeguards=[{"type": "dangerous_tool_use", "classifier_context": {"v": 1}}])
        text = [{"role": "user", "content": "only-text: answer in words."}]
        count = 5 if quick else 20
        for key, body in (("tool_checked", checked), ("tool_plain", plain),
                          ("text_checked", dict(checked, messages=text)), ("text_plain", dict(plain, messages=text))):
            delays = end_delays(proxy, upstream, json.dumps(body).encode(), count)
            results["end_%s_p50_ms" % key] = round(percentile(delays, 0.5) * 1000, 2)
        results["review_delay_ms"] = upstream.review_delay * 1000
    finally:
        upstream.rate = 0
        proxy.stop()


def measure_compression(results, quick):
    """Bytes on the wire and CPU time to compress them, for a 55 KB and a 1 MB Claude Code turn
    (the first with the real request when the fixtures are there; the second with a session's
    history of tool results added to it)."""
    import codex_proxy
    first = claude_code_request()[0]
    history = []
    while len(json.dumps(history)) < 950000:
        n = len(history)
        output = "\n".join("PASS tests/test_module_%d.py::test_case_%d (%d ms)" % ((i + n) % 40, i * 7 + n, (i * 13 + n) % 97)
                           for i in range(600))
        history += [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_%d" % n, "name": "Bash",
                                                       "input": {"command": "pytest -q tests/ -k case_%d" % n}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_%d" % n,
                                                  "content": output}]}]
    late = dict(first, messages=first["messages"][:1] + history + [{"role": "user", "content": "Go on."}])
    encoding = codex_proxy.upload_encoding()
    for name, body in (("55k", first), ("1m", late)):
        payload = codex_bytes(body)
        rounds = 3 if quick else 20
        started = time.process_time()
        for _ in range(rounds):
            packed = codex_proxy.compressed(payload, encoding)
        results["upload_%s_plain_kb" % name] = round(len(payload) / 1024, 1)
        results["upload_%s_%s_kb" % (name, encoding)] = round(len(packed) / 1024, 1)
        results["upload_%s_compress_ms" % name] = round((time.process_time() - started) / rounds * 1000, 2)
        results["upload_%s_sent_compressed" % name] = len(payload) >= codex_proxy.COMPRESS_FROM   # to a remote backend
    results["upload_encoding"] = encoding


def measure_large_bodies(results, upstream, program, quick):
    """RSS of a fresh proxy, idle and once 100 requests with a 5 MB body (4 clients at once) are done."""
    upstream.rate = 0
    proxy = Proxy(upstream.base, program)
    try:
        body = json.dumps(large_body()).encode()
        idle = proxy.rss_mb()
        run_clients(lambda: proxy_client(proxy), 4, 5 if quick else 25, body)
        results["rss_after_large_mb"] = round(proxy.settled_rss_mb(), 1)
        results["rss_after_large_added_mb"] = round(results["rss_after_large_mb"] - idle, 1)
    finally:
        proxy.stop()


PREFIX_RE = re.compile(r"\[measured\] prefix reuse, (.+?): ([\d.]+) % of the ceiling")


def measure_prefix_reuse(results):
    """The share of each upstream request that repeats the one before it, against what the
    client allows (prompt-cache.md): the test suite's scripted sessions, with the real Claude
    Code and the official SDK where they are installed (a session whose client is missing is
    left out, and said so)."""
    run = subprocess.run([sys.executable, "-m", "unittest", "test_codex_proxy.TestPromptCacheReuse",
                          "test_codex_proxy.TestPromptCacheReuseWithTheSDK"], cwd=str(HERE),
                         capture_output=True, text=True, timeout=600)
    figures = {what: float(share) for what, share in PREFIX_RE.findall(run.stderr)}
    results["prefix_reuse_of_ceiling_pct"] = figures
    results["prefix_reuse_min_pct"] = min(figures.values()) if figures else None
    results["prefix_reuse_sessions_ok"] = run.returncode == 0


def report(results):
    rows = [
        ("added first byte, 55 KB, new connection, p50", "serial_55k_new_added_p50_ms", "ms", "<="),
        ("added first byte, 55 KB, kept-alive, p50", "serial_55k_kept_added_p50_ms", "ms", "<="),
        ("added first byte, 1 KB, new connection, p50", "serial_1k_new_added_p50_ms", "ms", "<="),
        ("added first byte, 1 KB, kept-alive, p50", "serial_1k_kept_added_p50_ms", "ms", "<="),
        ("added time to first byte, p50 (32 streams)", "ttfb_added_p50_ms", "ms", "<="),
        ("added time to first byte, p99 (32 streams)", "ttfb_added_p99_ms", "ms", "<="),
        ("added delay per event, p50", "event_added_ms", "ms", "<="),
        ("upstream events per proxy CPU-second", "events_per_core_second", "/s", ">="),
        ("peak RSS, 64 concurrent streams", "rss_64_mb", "MB", "<="),
        ("RSS added after 100 requests of 5 MB", "rss_after_large_added_mb", "MB", "<="),
        ("last upstream event to message_stop, auto mode", "end_tool_checked_p50_ms", "ms", "<="),
        ("upstream connections per 100 sequential turns", "connections_per_100", "", "<="),
        ("start to listening", "start_ms", "ms", "<="),
        ("prefix reused, of the client's ceiling (lowest)", "prefix_reuse_min_pct", "%", ">="),
    ]
    print("%-48s %12s %10s  %s" % ("measure", "value", "target", "met"))
    for label, key, unit, sense in rows:
        if key not in results:
            continue   # a part the quick run leaves out
        value, target = results.get(key), TARGETS[key]
        met = value is not None and (value <= target if sense == "<=" else value >= target)
        print("%-48s %12s %10s  %s" % (label, "%s %s" % (value, unit), "%s %s" % (target, unit), "yes" if met else "NO"))
    print("\ndetails: TTFB direct %(ttfb_direct_p50_ms)s/%(ttfb_direct_p99_ms)s ms, proxy %(ttfb_proxy_p50_ms)s/"
          "%(ttfb_proxy_p99_ms)s ms (p50/p99); per event direct %(event_direct_p50_ms)s ms, proxy "
          "%(event_proxy_p50_ms)s ms (p99 added %(event_added_p99_ms)s ms); %(events_per_second_wall)s events/s "
          "wall at %(proxy_cpu_share)s of a core; RSS idle %(rss_idle_mb)s MB, 1 stream %(rss_1_mb)s MB, 16 streams "
          "%(rss_16_mb)s MB; connections per 100 turns from 8 clients: %(connections_per_100_at_8_concurrent)s; "
          "at 4x the token rate (12,800 events/s): added per event %(stress_event_added_ms)s ms, added first "
          "byte %(stress_ttfb_added_p50_ms)s ms; auto mode's check (classifier answering in %(review_delay_ms)g ms): "
          "last upstream event to message_stop %(end_tool_checked_p50_ms)s ms with a tool call (%(end_tool_plain_p50_ms)s "
          "ms unchecked), %(end_text_checked_p50_ms)s ms without one (%(end_text_plain_p50_ms)s ms unchecked); "
          "upload of a 55 KB turn %(upload_55k_plain_kb)s KB (sent compressed: %(upload_55k_sent_compressed)s), of a 1 MB "
          "turn %(upload_1m_plain_kb)s KB -> " % results + "%s KB %s in %s ms of CPU; " % (
              results["upload_1m_%s_kb" % results["upload_encoding"]], results["upload_encoding"],
              results["upload_1m_compress_ms"]) + "%(machine)s" % results)
    for what, share in sorted((results.get("prefix_reuse_of_ceiling_pct") or {}).items()):
        print("prefix reused, %s: %.1f %% of the ceiling" % (what, share))
    print(json.dumps(results, sort_keys=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure the overhead codex_proxy adds.")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 seconds")
    parser.add_argument("--proxy", metavar="PATH", default=str(PROXY),
                        help="the codex_proxy.py to measure (another copy, to compare; default: the one beside this)")
    args = parser.parse_args(argv)
    report(measure(args.quick, Path(args.proxy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
