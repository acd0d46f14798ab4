"""The specification of codex_proxy, as tests. Run: python -m unittest -v

Each test drives the real server over loopback against FakeCodex, a strict
stand-in for the Codex backend, or calls a pure translation function.
Recorded data comes from ../shared/fixtures (real Claude Code requests and
real Responses streams).
"""

import collections
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import codex_proxy as cp

HERE = Path(__file__).resolve().parent
FIXTURES = Path(os.environ.get("CODEX_PROXY_FIXTURES") or HERE.parent / "shared" / "fixtures")
PROXY_KEY = "test-proxy-key-" + "k" * 20
ACCESS_TOKEN = "at-" + "a" * 40
ACCOUNT_ID = "acct-1234"
TOOL_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")


def fixture(*parts):
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise unittest.SkipTest("fixtures not found at %s (set CODEX_PROXY_FIXTURES)" % FIXTURES)
    return path


def claude_code_body(name):
    return json.loads(fixture("claude-code", name).read_text())["body"]


# ---------------------------------------------------------------------------
# A strict fake of the Codex backend
# ---------------------------------------------------------------------------

FORBIDDEN_FIELDS = ("max_output_tokens", "max_tokens", "temperature", "top_p", "top_k", "stop",
                    "metadata", "user", "previous_response_id", "prompt_cache_retention",
                    "safety_identifier", "truncation", "response_format", "messages", "stream_options")
FAKE_MODELS = {"gpt-5.5": ("low", "medium", "high", "xhigh"),
               "gpt-5.4": ("low", "medium", "high", "xhigh"),
               "gpt-5.4-mini": ("low", "medium", "high", "xhigh")}
PART_TYPES = {"user": {"input_text", "input_image", "input_file"},
              "developer": {"input_text"}, "system": {"input_text"},
              "assistant": {"output_text", "refusal"}}


def codex_request_problem(body, issued):
    """What the real backend would refuse in this body: (status, detail) or None.

    Rules from codex-backend.md §6.4-§6.5 and §7; the messages are the real ones
    where they are known.
    """
    if not isinstance(body, dict):
        return 400, "Invalid body"
    for name in FORBIDDEN_FIELDS:
        if name in body:
            return 400, "Unsupported parameter: %s" % name
    if body.get("store") is not False:
        return 400, "Store must be set to false"
    if body.get("stream") is not True:
        return 400, "Stream must be set to true"
    if not isinstance(body.get("instructions"), str):
        return 400, "Instructions are required"
    if not isinstance(body.get("input"), list):
        return 400, "Input must be a list"
    model = body.get("model")
    if model not in FAKE_MODELS:
        return 400, "The '%s' model is not supported when using Codex with a ChatGPT account." % model
    if body.get("include") != ["reasoning.encrypted_content"]:
        return 400, "include must ask for reasoning.encrypted_content"
    reasoning = body.get("reasoning")
    if not isinstance(reasoning, dict) or reasoning.get("effort") not in FAKE_MODELS[model]:
        return 400, "Unsupported value: reasoning.effort %r" % (reasoning,)
    if reasoning.get("summary") not in (None, "auto", "concise", "detailed"):
        return 400, "Unsupported value: reasoning.summary"
    if not isinstance(body.get("prompt_cache_key"), str) or not body["prompt_cache_key"]:
        return 400, "prompt_cache_key missing"
    tools = body.get("tools")
    if not isinstance(tools, list):
        return 400, "tools must be a list"
    names = set()
    for i, tool in enumerate(tools):
        if tool.get("type") == "web_search":
            continue
        if tool.get("type") != "function":
            return 400, "Invalid 'tools[%d].type'" % i
        for key in ("defer_loading", "cache_control", "input_schema"):
            if key in tool:
                return 400, "Unknown parameter: 'tools[%d].%s'." % (i, key)
        name = tool.get("name")
        if not isinstance(name, str) or not re.match(r"^[a-zA-Z0-9_-]{1,64}$", name):
            return 400, "Invalid 'tools[%d].name': string does not match pattern." % i
        if tool.get("strict") is not False or tool.get("parameters", {}).get("type") != "object":
            return 400, "Invalid 'tools[%d]': strict false and object parameters expected" % i
        names.add(name)
    choice = body.get("tool_choice")
    if choice not in ("auto", "none", "required") and not (
            isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name") in names):
        return 400, "Invalid tool_choice %r" % (choice,)
    if not isinstance(body.get("parallel_tool_calls"), bool):
        return 400, "parallel_tool_calls must be a boolean"
    calls, answered = set(), set()
    for i, item in enumerate(body["input"]):
        if not isinstance(item, dict) or "type" not in item:
            return 400, "Invalid 'input[%d]'" % i
        if "id" in item:
            return 404, ("Item with id '%s' not found. Items are not persisted when `store` is set to "
                         "false. Try again with `store` set to true, or remove this item from your input."
                         % item["id"])
        kind = item["type"]
        if kind == "message":
            role = item.get("role")
            if role not in PART_TYPES or not isinstance(item.get("content"), list) or not item["content"]:
                return 400, "Invalid 'input[%d]' message" % i
            for part in item["content"]:
                if part.get("type") not in PART_TYPES[role]:
                    return 400, "Invalid content type %r for role %s in input[%d]" % (part.get("type"), role, i)
                if part["type"] in ("input_text", "output_text") and not isinstance(part.get("text"), str):
                    return 400, "Invalid 'input[%d]' text" % i
                if part["type"] == "input_image" and not re.match(r"^(data:image/|https?://)", part.get("image_url", "")):
                    return 400, "Invalid image_url in input[%d]" % i
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) and item[k] for k in ("call_id", "name", "arguments")):
                return 400, "Invalid function_call in input[%d]" % i
            calls.add(item["call_id"])
        elif kind == "function_call_output":
            if item.get("call_id") not in calls:
                return 400, "No tool call found for function call output with call_id %s." % item.get("call_id")
            if not isinstance(item.get("output"), (str, list)):
                return 400, "Invalid output in input[%d]" % i
            answered.add(item["call_id"])
        elif kind == "reasoning":
            if item.get("encrypted_content") not in issued:
                return 400, "The encrypted content for item input[%d] could not be verified." % i
            if not isinstance(item.get("summary"), list):
                return 400, "Missing required parameter: 'input[%d].summary'." % i
        else:
            return 400, "Invalid input item type %r" % kind
    missing = calls - answered
    if missing:
        return 400, "No tool output found for function call %s." % sorted(missing)[0]
    return None


class Turn:
    """Builds a realistic Responses SSE stream: sequence numbers, ids, obfuscation."""

    def __init__(self, fake=None, model="gpt-5.5"):
        self.fake = fake
        self.model = model
        self.id = "resp_" + secrets.token_hex(16)
        self.events = []
        self.output = []
        snapshot = self._snapshot("in_progress")
        self.add("response.created", response=snapshot)
        self.add("response.in_progress", response=snapshot)

    def _snapshot(self, status, **extra):
        doc = {"id": self.id, "object": "response", "created_at": 1760000000, "status": status,
               "model": self.model, "output": list(self.output), "usage": None}
        doc.update(extra)
        return doc

    def add(self, kind, **fields):
        event = {"type": kind, "sequence_number": len(self.events)}
        event.update(fields)
        self.events.append(event)
        return self

    def _obfuscation(self):
        return secrets.token_urlsafe(8)

    def reasoning(self, summary=(), encrypted=None):
        index, item_id = len(self.output), "rs_" + secrets.token_hex(16)
        encrypted = encrypted or "gAAAAB" + secrets.token_urlsafe(48)
        if self.fake is not None:
            self.fake.issued.add(encrypted)
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "reasoning", "summary": [], "encrypted_content": "gAAAAB-early-" + secrets.token_urlsafe(8)})
        for n, text in enumerate(summary):
            self.add("response.reasoning_summary_part.added", item_id=item_id, output_index=index,
                     summary_index=n, part={"type": "summary_text", "text": ""})
            for piece in chunks(text, 3):
                self.add("response.reasoning_summary_text.delta", item_id=item_id, output_index=index,
                         summary_index=n, delta=piece, obfuscation=self._obfuscation())
            self.add("response.reasoning_summary_text.done", item_id=item_id, output_index=index,
                     summary_index=n, text=text)
            self.add("response.reasoning_summary_part.done", item_id=item_id, output_index=index,
                     summary_index=n, part={"type": "summary_text", "text": text})
        item = {"id": item_id, "type": "reasoning", "encrypted_content": encrypted,
                "summary": [{"type": "summary_text", "text": t} for t in summary]}
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def text(self, text, pieces=4, deltas=True):
        index, item_id = len(self.output), "msg_" + secrets.token_hex(16)
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"})
        self.add("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        for piece in (chunks(text, pieces) if deltas else []):
            self.add("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                     delta=piece, logprobs=[], obfuscation=self._obfuscation())
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        self.add("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                 text=text, logprobs=[])
        self.add("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
        item = {"id": item_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def tool_call(self, name, arguments, call_id=None, pieces=3, deltas=True):
        index, item_id = len(self.output), "fc_" + secrets.token_hex(16)
        call_id = call_id or "call_" + secrets.token_urlsafe(12).replace("-", "x")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "function_call", "status": "in_progress", "arguments": "",
            "call_id": call_id, "name": name})
        for piece in (chunks(arguments, pieces) if deltas else []):
            self.add("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                     delta=piece, obfuscation=self._obfuscation())
        self.add("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=arguments)
        item = {"id": item_id, "type": "function_call", "status": "completed", "arguments": arguments,
                "call_id": call_id, "name": name}
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def completed(self, input_tokens=120, cached=0, output_tokens=30):
        usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": input_tokens + output_tokens}
        return self.add("response.completed", response=self._snapshot("completed", usage=usage)).events

    def incomplete(self, reason="max_output_tokens"):
        return self.add("response.incomplete", response=self._snapshot(
            "incomplete", incomplete_details={"reason": reason},
            usage={"input_tokens": 50, "output_tokens": 9})).events

    def failed(self, code, message="failed"):
        return self.add("response.failed", response=self._snapshot(
            "failed", error={"code": code, "message": message})).events


def chunks(text, pieces):
    size = max(1, -(-len(text) // max(pieces, 1)))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def sse_bytes(events):
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events)


class Reply:
    """One scripted answer of FakeCodex.

    events: a list of event dicts (or raw SSE bytes) sent as a chunked SSE body.
    status/body/headers: an error reply instead. cut_after: close the socket
    after that many events. stall_after: stop sending after that many events
    until ``release`` is set (or the test ends). gate_after: wait for ``gate``
    after that many events, then go on.
    """

    def __init__(self, events=None, status=200, body=None, headers=None, cut_after=None,
                 stall_after=None, gate_after=None, pause=None):
        self.events = events
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.cut_after = cut_after
        self.stall_after = stall_after
        self.gate_after = gate_after
        self.pause = pause            # (after n events, seconds of silence)
        self.gate = threading.Event()
        self.release = threading.Event()
        self.client_left = threading.Event()


class FakeCodex:
    """Stand-in for https://chatgpt.com/backend-api/codex that rejects what the real one rejects."""

    def __init__(self):
        self.requests = []
        self.script = collections.deque()
        self.issued = set()
        self.connections = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                BaseHTTPRequestHandler.setup(self)
                with fake.lock:
                    fake.connections += 1

            def log_message(self, *args):
                pass

            def do_POST(self):
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return "http://127.0.0.1:%d/backend-api/codex" % self.server.server_address[1]

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        for reply in list(self.script):
            reply.release.set()
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.requests = []
            self.script.clear()
            self.connections = 0

    def turn(self, model="gpt-5.5"):
        return Turn(self, model)

    def reply(self, *replies):
        for reply in replies:
            self.script.append(reply if isinstance(reply, Reply) else Reply(events=reply))
        return replies[0] if len(replies) == 1 else replies

    def handle(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self.lock:
            self.requests.append({"path": handler.path, "headers": headers, "body": body})
        problem = self.header_problem(handler.path, headers, body) or codex_request_problem(body, self.issued)
        if problem:
            return self.send_json(handler, problem[0], {"detail": problem[1]})
        with self.lock:
            reply = self.script.popleft() if self.script else None
        if reply is None:
            return self.send_json(handler, 500, {"detail": "FakeCodex: no scripted reply left"})
        if reply.status != 200:
            return self.send_json(handler, reply.status, reply.body, reply.headers)
        self.stream(handler, reply)

    def header_problem(self, path, headers, body):
        if path != "/backend-api/codex/responses":
            return 404, "Not Found"
        if headers.get("authorization") != "Bearer " + ACCESS_TOKEN:
            return 401, "Unauthorized"
        if headers.get("chatgpt-account-id") != ACCOUNT_ID:
            return 403, "missing or wrong ChatGPT-Account-ID"
        if "text/event-stream" not in headers.get("accept", ""):
            return 400, "Accept must allow text/event-stream"
        if headers.get("content-type") != "application/json":
            return 400, "Content-Type must be application/json"
        if not headers.get("originator") or not headers.get("user-agent"):
            return 400, "originator and User-Agent are required"
        if not isinstance(body, dict) or headers.get("session-id") != body.get("prompt_cache_key"):
            return 400, "session-id must equal prompt_cache_key"
        return None

    def send_json(self, handler, status, doc, headers=None):
        data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def stream(self, handler, reply):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        events = reply.events
        pieces = [events] if isinstance(events, bytes) else [sse_bytes([e]) for e in events]
        try:
            for n, piece in enumerate(pieces):
                if reply.cut_after == n:
                    handler.wfile.write(b"%x\r\n%s" % (len(piece), piece[: len(piece) // 2]))
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    handler.close_connection = True
                    return
                if reply.stall_after == n:
                    reply.release.wait(30)
                    handler.close_connection = True
                    return
                if reply.gate_after == n:
                    reply.gate.wait(10)
                if reply.pause and reply.pause[0] == n:
                    time.sleep(reply.pause[1])
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            reply.client_left.set()
            handler.close_connection = True


# ---------------------------------------------------------------------------
# Checking what the proxy sends to Anthropic clients (anthropic-api.md §11)
# ---------------------------------------------------------------------------

def parse_sse(raw):
    """Raw SSE bytes -> [(event name or None, data dict or raw text)]."""
    out = []
    for chunk in raw.decode("utf-8").split("\n\n"):
        if not chunk.strip():
            continue
        name, data = None, []
        for line in chunk.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        text = "\n".join(data)
        try:
            out.append((name, json.loads(text)))
        except ValueError:
            out.append((name, text))
    return out


def check_stream(test, raw):
    """Assert checklist statements 14-28 on a raw Anthropic SSE body; return the events."""
    pairs = parse_sse(raw)
    test.assertNotIn(b"[DONE]", raw, "15: no [DONE]")
    events = []
    for name, data in pairs:
        test.assertIsInstance(data, dict, "14: every data line is a JSON object")
        test.assertIsNotNone(name, "15: no data-only events")
        test.assertEqual(name, data.get("type"), "14: event name equals data.type")
        events.append(data)
    test.assertTrue(events, "the stream is not empty")
    first = events[0]
    test.assertEqual(first["type"], "message_start", "16: message_start comes first")
    message = first["message"]
    test.assertEqual((message["content"], message["stop_reason"], message["stop_sequence"]), ([], None, None))
    test.assertTrue(message["id"].startswith("msg_"))
    for key in ("input_tokens", "output_tokens"):
        test.assertIsInstance(message["usage"][key], int, "16: usage has integer %s" % key)
    open_block, next_index, seen_message_delta, blocks = None, 0, False, {}
    for n, event in enumerate(events[1:], 1):
        kind = event["type"]
        if kind == "error":
            test.assertEqual(n, len(events) - 1, "28: nothing after an error event")
            test.assertIn(event["error"]["type"], ("overloaded_error", "api_error", "rate_limit_error",
                                                   "invalid_request_error", "authentication_error"))
            return events
        test.assertFalse(seen_message_delta and kind not in ("message_stop",),
                         "25: only message_stop follows message_delta, got %s" % kind)
        if kind == "ping":
            continue
        if kind == "content_block_start":
            test.assertIsNone(open_block, "18: one block open at a time")
            test.assertEqual(event["index"], next_index, "17: indices 0,1,2,...")
            block = event["content_block"]
            open_block, next_index = event["index"], next_index + 1
            blocks[open_block] = {"block": block, "deltas": []}
            if block["type"] == "text":
                test.assertEqual(block, {"type": "text", "text": ""}, "20: text starts empty")
            elif block["type"] == "thinking":
                test.assertEqual(block, {"type": "thinking", "thinking": "", "signature": ""}, "22")
            elif block["type"] in ("tool_use", "server_tool_use"):
                test.assertEqual(block["input"], {}, "21: tool_use starts with input {}")
                test.assertTrue(TOOL_ID_RE.match(block["id"]), "13: tool id pattern")
                test.assertTrue(block["name"])
        elif kind == "content_block_delta":
            test.assertEqual(event["index"], open_block, "19: delta for the open block")
            delta = event["delta"]
            allowed = {"text": ("text_delta", "citations_delta"), "thinking": ("thinking_delta", "signature_delta"),
                       "tool_use": ("input_json_delta",), "server_tool_use": ("input_json_delta",)}
            block_type = blocks[open_block]["block"]["type"]
            test.assertIn(delta["type"], allowed.get(block_type, ()), "24: delta type matches block")
            blocks[open_block]["deltas"].append(delta)
        elif kind == "content_block_stop":
            test.assertEqual(event["index"], open_block, "19: stop for the open block")
            record = blocks[open_block]
            block_type, deltas = record["block"]["type"], record["deltas"]
            if block_type == "text":
                text = "".join(d.get("text", "") for d in deltas)
                test.assertTrue(text.strip(), "12: no empty or whitespace-only text block")
            if block_type in ("tool_use", "server_tool_use"):
                joined = "".join(d["partial_json"] for d in deltas)
                if joined.strip():
                    test.assertIsInstance(json.loads(joined), dict, "21: input parses to an object")
            if block_type == "thinking":
                kinds = [d["type"] for d in deltas]
                test.assertEqual(kinds.count("signature_delta"), 1, "22: exactly one signature_delta")
                test.assertEqual(kinds[-1], "signature_delta", "22: signature_delta last")
            if block_type in ("redacted_thinking", "web_search_tool_result"):
                test.assertEqual(deltas, [], "23: complete at start")
            open_block = None
        elif kind == "message_delta":
            test.assertIsNone(open_block, "25: message_delta after the last block stop")
            test.assertFalse(seen_message_delta, "25: exactly one message_delta")
            test.assertIsNotNone(event["delta"]["stop_reason"])
            test.assertIn("stop_sequence", event["delta"])
            test.assertIsInstance(event["usage"]["output_tokens"], int)
            seen_message_delta = True
        elif kind == "message_stop":
            test.assertTrue(seen_message_delta, "25: message_delta before message_stop")
            test.assertEqual(n, len(events) - 1, "25: message_stop is last")
        else:
            test.fail("unexpected event %s" % kind)
    test.assertEqual(events[-1]["type"], "message_stop", "25: the stream ends with message_stop")
    return events


def translate_events(test, upstream_events, context=None, check=True):
    """Run upstream events through the reducer; return (Anthropic events, folded message)."""
    context = context or cp.RequestContext("claude-opus-4-8", "gpt-5.5", {}, True, [], "key")
    translator = cp.ResponseTranslator(context)
    out = []
    for event in upstream_events:
        out.extend(translator.feed(event))
    if check:
        check_stream(test, sse_bytes(out))
    return out, cp.fold_message(out)


def upstream_events_from_file(path):
    return [event for _, event in parse_sse(path.read_bytes()) if isinstance(event, dict)]


# ---------------------------------------------------------------------------
# Running the proxy against FakeCodex
# ---------------------------------------------------------------------------

class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class ProxyCase(unittest.TestCase):
    """Starts FakeCodex and the proxy once per test class, on ephemeral loopback ports."""

    logged_in = True
    settings = {}

    @classmethod
    def setUpClass(cls):
        cls.home = Path(tempfile.mkdtemp(prefix="codex-proxy-test-"))
        if cls.logged_in:
            write_tokens(cls.home / "tokens.json")
        cls.fake = FakeCodex().start()
        cls.config = make_config(cls.home, cls.fake.url, **cls.settings)
        cls.proxy = cp.ProxyServer(cls.config)
        cls.thread = threading.Thread(target=cls.proxy.serve_forever, daemon=True)
        cls.thread.start()

    @classmethod
    def tearDownClass(cls):
        cls.proxy.shutdown()
        cls.proxy.server_close()
        cls.fake.stop()
        shutil.rmtree(str(cls.home), ignore_errors=True)

    def setUp(self):
        self.fake.reset()

    def request(self, method, path, body=None, headers=None, key=PROXY_KEY, raw=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=timeout)
        sent = {"anthropic-version": "2023-06-01"}
        if key:
            sent["x-api-key"] = key
        if body is not None or raw is not None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, data, sent)
        response = conn.getresponse()
        answer = Answer(response.status, response.headers, response.read())
        conn.close()
        return answer

    def post(self, body, path="/v1/messages?beta=true", **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, body, **kw):
        answer = self.post(dict(body, stream=True), **kw)
        self.assertEqual(answer.status, 200, answer.body[:500])
        self.assertTrue(answer.headers["Content-Type"].startswith("text/event-stream"), "14")
        self.assertTrue(answer.headers["request-id"].startswith("req_"), "7")
        return check_stream(self, answer.body)

    def sent(self, n=-1):
        """The body FakeCodex received in request n."""
        return self.fake.requests[n]["body"]


def write_tokens(path, access=ACCESS_TOKEN, account=ACCOUNT_ID):
    doc = {"tokens": {"id_token": "x.e30.y", "access_token": access, "refresh_token": "rt-1",
                      "account_id": account}, "last_refresh": "2026-11-25T00:00:00Z"}
    cp.write_private_file(path, json.dumps(doc))


def make_config(home, upstream, **settings):
    values = dict(home=Path(home), upstream=upstream, api_key=PROXY_KEY, host="127.0.0.1", port=0,
                  models={"opus": "gpt-5.5", "sonnet": "gpt-5.5", "haiku": "gpt-5.4-mini"},
                  retry_delay=0.01, connect_timeout=5.0)
    values.update(settings)
    return cp.Config(**values)


def user(text):
    return {"role": "user", "content": text}


BASIC = {"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [user("hi")]}
