"""The specification of codex_proxy, as tests. Run: python -m unittest -v

Each test drives the real server over loopback against FakeCodex, a strict
stand-in for the Codex backend, or calls a pure translation function.
Recorded data comes from ../shared/fixtures (real Claude Code requests and
real Responses streams).

Table of contents (the tests follow the sections of codex_proxy.py; the fakes
and helpers they share come first, right after this list):

Helpers: outgoing connections through proxies and certificate authorities
    TestOutboundProxy

Token store and OAuth: sign in, refresh (a write that fails), broken login files, sharing the
Codex CLI's login, Windows
    TestLogin, TestTokenRefresh, TestBrokenLoginFiles, TestSharedLoginAcrossProcesses,
    TestWindowsPaths

Accounts: logins, usage windows, failover, the usage ledger
    TestAccountFailover, TestAccounts, TestAccountInTheLog, TestUsageLedger,
    TestQuota

Request translation (pure functions), the compatibility table, learned downgrades
    TestRequestTranslation, TestToolNames, TestToolLoadsKeepThePrefix, TestAnthropicCompatibility,
    TestCodexParity, TestCodexHeaders, TestSelfHealing

Conversation state kept between turns: threads, hidden reasoning, token counts
    TestMessageThreadsWithTheSDK, TestMessageThreads, TestHiddenReasoning,
    TestWrittenRequests, TestTheBackendSeesItsOwnHistory, TestCountTokensCalibration

Stream translation (the reducer, pure) and web search
    TestStreamTranslation, TestCodexCliStreams, TestWebSearch

Upstream client: reading the stream, the failure table, errors, timeouts, faults, the model catalog
    TestReadingTheUpstream, TestUpstreamFailureTable, TestUpstreamErrors, TestUpstreamTimeouts,
    TestUpstreamUnreachable, TestUpstreamFaults, TestModelsFollowTheBackend, TestWhatTheBackendSays,
    TestCompressedUploads, TestWorkspaceRouting, TestModelCatalog

Safeguards: auto mode's check of each tool call, Claude Code's own classifier
    TestAutoModeSafeguards, TestAutoModeSafeguardsOff, TestClaudeCodesOwnClassifier

Relaying a turn: recovery, streaming, concurrency
    TestRecoveryTable, TestStreaming, TestConcurrency

HTTP server: routes, guards, bad input, connections, the keeper, shutdown
    TestRoutesAndAuth, TestNotLoggedIn, TestRequestGuards, TestOneRequestPerRequest,
    TestBrokenStateAndOddBodies, TestProxyKeyFile, TestWhatACrashLeaves, TestBrokenCaches,
    TestFuzz, TestMemoryAfterLargeBodies, TestConnectionLimits, TestKeeper, TestShutdownAndLogs

Command line: env, the launcher, doctor, a named login, the request log, the manual
    TestStartCommand, TestEnvCommand, TestLauncher, TestDoctor,
    TestOnlyANamedLogin, TestRequestLog, TestManual

Judged by real clients: Claude Code CLI, the Codex CLI, the official Python SDK; a fresh clone's data
    TestClaudeCode, TestClaudeCodeAutoMode, TestClaudeCodeAutoModeInteractive, TestPromptCacheReuse,
    TestPromptCacheReuseWithTheSDK, TestClaudeCodeWebSearch,
    TestRecordedCodexCliTraffic, TestCodexCliOracle (the real Codex CLI on the upstream side),
    TestAnthropicSDK,
    TestFreshCloneData
"""

import collections
import contextlib
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
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import codex_proxy as cp


# ---------------------------------------------------------------------------
# Fakes and helpers: a strict Codex backend, an OAuth issuer, stream checks, the proxy under test
# ---------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
FIXTURES = Path(os.environ.get("CODEX_PROXY_FIXTURES") or HERE.parent / "shared" / "fixtures")
PROXY_KEY = "test-proxy-key-" + "k" * 20
ACCESS_TOKEN = "at-" + "a" * 40
ACCOUNT_ID = "acct-1234"
TOOL_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")


def wait_until(condition, timeout=10.0, what="the condition"):
    """Poll ``condition`` until it is true (its value is returned) or ``timeout`` passes
    (AssertionError). For what the proxy does just after a reply went out."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("%s was not reached in %g s" % (what, timeout))
        time.sleep(0.01)


def fixture(*parts):
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise unittest.SkipTest("fixtures not found at %s (set CODEX_PROXY_FIXTURES)" % FIXTURES)
    return path


def claude_code_body(name):
    return json.loads(fixture("claude-code", name).read_text())["body"]


FORBIDDEN_FIELDS = ("max_output_tokens", "max_tokens", "temperature", "top_p", "top_k", "stop",
                    "metadata", "user", "previous_response_id", "prompt_cache_retention",
                    "safety_identifier", "truncation", "response_format", "messages", "stream_options")
FOUR = ("low", "medium", "high", "xhigh")
CATALOG_ENTRY = {"context_window": 272000, "supports_parallel_tool_calls": True, "visibility": "list",
                 "input_modalities": ["text", "image"], "supports_reasoning_summaries": True, "support_verbosity": True}
# What auth.openai.com answers for a refresh token that was already used (recorded 401 body).
REFRESH_REUSED_BODY = {"error": {"message": "Your refresh token has already been used to generate a new access "
                                            "token. Please try signing in again.",
                                 "type": "invalid_request_error", "param": None, "code": "refresh_token_reused"}}


# The catalog of 2026-12 (the one the Codex CLI 0.171 bundles; read from ../shared/fixtures when it is
# there): (slug, visibility, minimal_client_version, Lite, context window, default effort, efforts, upgrade).
SIX = FOUR + ("max", "ultra")
DECEMBER_MODELS = (
    ("gpt-6.2-sol", "list", "0.166.0", True, 500000, "low", SIX, None),
    ("gpt-6.2-astra", "list", "0.166.0", True, 272000, "low", SIX, None),
    ("gpt-6-astra", "list", "0.153.0", True, 272000, "low", SIX, None),
    ("gpt-6.1-sol", "list", "0.153.0", True, 500000, "low", SIX, None),
    ("gpt-6.1-terra", "list", "0.153.0", True, 500000, "low", SIX, None),
    ("gpt-6-sol", "list", "0.155.0", True, 272000, "medium", SIX, None),
    ("gpt-6-luna", "list", "0.155.0", True, 272000, "medium", FOUR + ("max",), None),
    ("gpt-5.6-sol", "list", "0.144.0", True, 272000, "low", SIX, "gpt-6-sol"),
    ("gpt-5.6-terra", "list", "0.144.0", True, 272000, "medium", SIX, "gpt-6-sol"),
    ("gpt-5.6-luna", "list", "0.144.0", True, 272000, "medium", FOUR + ("max",), "gpt-6-luna"),
    ("gpt-daybreak-blue-latest", "hide", "0.144.0", True, 272000, "low", SIX, None),
    ("gpt-daybreak-red-latest", "hide", "0.142.2", True, 372000, "medium", SIX, None),
    ("gpt-5.5", "list", "0.124.0", False, 272000, "medium", FOUR, "gpt-6-sol"),
    ("codex-auto-review", "hide", "0.98.0", True, 272000, "medium", FOUR + ("max",), None),
)


def load_december_catalog():
    """The 2026-12 catalog as GET /models answers it (from the Codex CLI 0.171's bundled one)."""
    path = FIXTURES / "codex-cli-0.171" / "bundled-catalog-0.171.0-summary.json"
    rows = [(m["slug"], m["visibility"], m["minimal_client_version"], m["use_responses_lite"], m["context_window"],
             m["default_reasoning_level"], tuple(m["efforts"]), m.get("upgrade_to"))
            for m in json.loads(path.read_text())["models"]] if path.exists() else DECEMBER_MODELS
    title = lambda slug: "-".join(part.upper() if part == "gpt" else part.capitalize() if part.isalpha() else part
                                  for part in slug.split("-"))   # gpt-6.2-sol -> GPT-6.2-Sol
    return [dict(CATALOG_ENTRY, slug=slug, display_name=title(slug), visibility=visibility,
                 minimal_client_version=floor, use_responses_lite=lite, context_window=window,
                 max_context_window=max(window, 872000 if lite else window), default_reasoning_level=default,
                 default_verbosity="low", supports_reasoning_summary_parameter=True, service_tiers=["priority"],
                 supported_reasoning_levels=[{"effort": e} for e in efforts],
                 upgrade={"model": upgrade} if upgrade else None)
            for slug, visibility, floor, lite, window, default, efforts, upgrade in rows]


FAKE_CATALOG = load_december_catalog()   # what the backend offers a Plus account today
KNOWN_MODELS = {m["slug"]: m for m in FAKE_CATALOG}   # what the backend serves (FakeCodex.serve adds more)


def version_key(version):
    return tuple(int(p) for p in version.split(".")) if re.match(r"\d+\.\d+\.\d+\Z", version or "") else (0, 0, 0)
PART_TYPES = {"user": {"input_text", "input_image", "input_file"},
              "developer": {"input_text"}, "system": {"input_text"},
              "assistant": {"output_text", "refusal"}}


def fallback_stage(body):
    """"severity" or "block" for Claude Code's own classifier requests (as the proxy sends
    them on: the system prompt a developer message), else None."""
    texts = [part.get("text") or "" for item in (body or {}).get("input") or [] if item.get("type") == "message"
             for part in item.get("content") or [] if isinstance(part, dict)]
    if not any(cp.CLASSIFIER_SYSTEM in text for text in texts):
        return None
    tail = texts[-1][-2000:] if texts else ""
    return "severity" if "<severity>" in tail else "block" if "<block>" in tail else None


def zstd_module():
    """Something that decompresses zstd: the standard library's (3.14+), or the zstandard package."""
    for name in ("compression.zstd", "zstandard"):
        try:
            return __import__("importlib").import_module(name)
        except ImportError:
            continue
    return None


def decoded(raw, encoding):
    """A request body as the backend reads it: gzip or zstd (what the Codex CLI sends)."""
    if encoding == "gzip":
        import gzip
        return gzip.decompress(raw)
    if encoding == "zstd":
        module = zstd_module()
        if module.__name__ == "zstandard":   # its frames may not say their size: read them as a stream
            return module.ZstdDecompressor().decompressobj().decompress(raw)
        return module.decompress(raw)
    return raw


def review_case(body):
    """The case a classifier request asks about ({"session", "user_messages", "pending_call"}),
    read from its user message; None for any other request."""
    for item in (body or {}).get("input") or []:
        if item.get("type") == "message" and item.get("role") == "user":
            for part in item.get("content") or []:
                try:
                    case = json.loads(part.get("text") or "")
                except ValueError:
                    continue
                if isinstance(case, dict) and "pending_call" in case:
                    return case
    return None


def codex_request_problem(body, issued, lite=False, known=None):
    """What the real backend would refuse in this body: (status, detail) or None.

    Rules from codex-backend.md §6.4-§6.7; the messages are the real ones where
    they are known. ``lite``: the request carried the Responses Lite header.
    ``known``: slug -> catalog entry of the models served (KNOWN_MODELS).
    """
    known = KNOWN_MODELS if known is None else known
    if not isinstance(body, dict):
        return 400, "Invalid body"
    for name in FORBIDDEN_FIELDS:
        if name in body:
            return 400, "Unsupported parameter: %s" % name
    if body.get("store") is not False:
        return 400, "Store must be set to false"
    if "service_tier" in body and body["service_tier"] not in ("priority", "default", "auto", "flex"):
        return 400, "Unsupported service_tier: %s" % body["service_tier"]
    if body.get("stream") is not True:
        return 400, "Stream must be set to true"
    if not isinstance(body.get("input"), list):
        return 400, "Input must be a list"
    if lite:
        problem = lite_problem(body, known)
        if problem:
            return 400, problem
        spaces = body["input"][0]["tools"]
        body = dict(body, tools=[tool for space in spaces for tool in space.get("tools", [space])], input=body["input"][1:])
    elif not isinstance(body.get("instructions", ""), str):   # optional: the Codex CLI 0.171 never sends it
        return 400, "Invalid 'instructions'"
    model = body.get("model")
    if model not in known:   # retired ones too (gpt-5.4-mini since 2026-08-31): the same words
        return 400, "The '%s' model is not supported when using Codex with a ChatGPT account." % model
    if body.get("include") != ["reasoning.encrypted_content"]:
        return 400, "include must ask for reasoning.encrypted_content"
    reasoning = body.get("reasoning")
    if not isinstance(reasoning, dict) or reasoning.get("effort") not in efforts_of(known[model]):
        return 400, "Unsupported value: reasoning.effort %r" % (reasoning,)
    if reasoning.get("summary") not in (None, "auto", "concise", "detailed"):
        return 400, "Unsupported value: reasoning.summary"
    if not isinstance(body.get("prompt_cache_key"), str) or not body["prompt_cache_key"]:
        return 400, "prompt_cache_key missing"
    text = body.get("text", {})
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"} \
            or text.get("verbosity", "low") not in ("low", "medium", "high"):
        return 400, "Invalid 'text': %r" % (text,)
    if reasoning.get("effort") == "ultra":
        return 400, "Unsupported value: 'ultra' (send it as 'max')"
    tools = body.get("tools")
    if not isinstance(tools, list):
        return 400, "tools must be a list"
    names = set()
    for i, tool in enumerate(tools):
        if tool.get("type") == "web_search":
            extra = set(tool) - {"type", "external_web_access", "filters", "user_location", "search_context_size",
                                 "search_content_types"}
            if extra or not isinstance(tool.get("external_web_access"), bool):
                return 400, "Invalid 'tools[%d]' web_search: %s" % (i, sorted(extra))
            continue
        if tool.get("type") in ("custom", "namespace", "tool_search"):   # what the Codex CLI 0.171 sends
            if tool["type"] != "tool_search" and not isinstance(tool.get("name"), str):
                return 400, "Invalid 'tools[%d].name'" % i
            if tool["type"] == "tool_search" and tool.get("execution") not in ("client", "server"):
                return 400, "Invalid 'tools[%d].execution'" % i
            names.add(tool.get("name"))
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
    searches, searched = set(), set()
    spaces = {tool.get("name") for tool in tools if tool.get("type") == "namespace"} | ({"functions"} if lite else set())
    for i, item in enumerate(body["input"]):
        if not isinstance(item, dict) or "type" not in item:
            return 400, "Invalid 'input[%d]'" % i
        kind = item["type"]   # an `id` on an item is taken with store false: the Codex CLI 0.171 sends one on each
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
        elif kind in ("function_call", "custom_tool_call"):
            arguments = "arguments" if kind == "function_call" else "input"
            if not all(isinstance(item.get(k), str) and item[k] for k in ("call_id", "name", arguments)):
                return 400, "Invalid %s in input[%d]" % (kind, i)
            if lite and not item.get("namespace"):
                return 400, "Lite: %s input[%d] without its namespace" % (kind, i)
            if "namespace" in item and item["namespace"] not in spaces:
                return 400, "Unknown namespace %r in input[%d]" % (item["namespace"], i)
            calls.add(item["call_id"])
        elif kind == "tool_search_call":   # as the Codex CLI replays a client-executed search
            if not any(t.get("type") == "tool_search" and t.get("execution") == "client" for t in tools):
                return 400, "Invalid 'input[%d]': tool_search_call without a client tool_search tool" % i
            if not isinstance(item.get("call_id"), str) or item.get("execution") != "client" \
                    or not isinstance(item.get("arguments"), dict):
                return 400, "Invalid tool_search_call in input[%d]" % i
            searches.add(item["call_id"])
        elif kind == "tool_search_output":
            if item.get("call_id") not in searches:
                return 400, "No tool search call found for tool_search_output with call_id %s." % item.get("call_id")
            problem = loaded_tools_problem(item, i)
            if problem:
                return 400, problem
            spaces |= {space["name"] for space in item["tools"]}
            searched.add(item["call_id"])
        elif kind in ("function_call_output", "custom_tool_call_output"):
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
    missing = (calls - answered) | (searches - searched)
    if missing:
        return 400, "No tool output found for function call %s." % sorted(missing)[0]
    return None


def loaded_tools_problem(item, i):
    """A tool_search_output as Codex sends one: completed, client-executed, namespaces of functions."""
    if item.get("execution") != "client" or item.get("status") != "completed" or not isinstance(item.get("tools"), list):
        return "Invalid tool_search_output in input[%d]" % i
    for j, space in enumerate(item["tools"]):
        if space.get("type") != "namespace" or not isinstance(space.get("name"), str) \
                or not isinstance(space.get("tools"), list) or not space["tools"]:
            return "Invalid 'input[%d].tools[%d]': a namespace with its tools" % (i, j)
        for tool in space["tools"]:
            if tool.get("type") != "function" or not re.match(r"^[a-zA-Z0-9_-]{1,64}$", str(tool.get("name"))) \
                    or tool.get("strict") is not False or tool.get("parameters", {}).get("type") != "object" \
                    or set(tool) - {"type", "name", "description", "strict", "parameters", "defer_loading"}:
                return "Invalid 'input[%d].tools[%d]' function %r" % (i, j, tool.get("name"))
    return None


def efforts_of(entry):
    return tuple(level["effort"] for level in entry["supported_reasoning_levels"])


def version_problem(model, headers, known):
    """A model served only from a client version above the one the request presents (its
    `version` header and the User-Agent's product token, the lower of the two): the backend's
    words, which for the newest models are the misleading entitlement ones (drift §2.1)."""
    floor = (known.get(model) or {}).get("minimal_client_version")
    agent = re.match(r"[\w.-]+/(\d+\.\d+\.\d+)", headers.get("user-agent", ""))
    sent = min(version_key(headers.get("version")), version_key(agent.group(1) if agent else None))
    if not floor or sent >= version_key(floor):
        return None
    if version_key(floor) >= (0, 166, 0):
        return 400, "The '%s' model is not supported when using Codex with a ChatGPT account." % model
    return 400, "The '%s' model requires a newer version of Codex. Please upgrade to the latest app or CLI and try again." % model


def lite_problem(body, known=None):
    """The Responses Lite shape (codex-backend.md 6.6), as Codex sends it."""
    known = KNOWN_MODELS if known is None else known
    if not (known.get(body.get("model")) or {}).get("use_responses_lite"):
        return "Responses Lite is not available for %s" % body.get("model")
    if "instructions" in body or "tools" in body:
        return "Lite: no top-level instructions or tools"
    first = body["input"][0] if body["input"] else {}
    namespaces = first.get("tools") if first.get("type") == "additional_tools" else None
    if first.get("role") != "developer" or not isinstance(namespaces, list):
        return "Lite: input[0] must be additional_tools"
    for space in namespaces:   # the Codex CLI sends several (functions, collaboration, clock), none empty
        if space.get("type") == "tool_search" and space.get("execution") == "client":
            continue   # a client-executed tool, which Lite takes (not a hosted one)
        if space.get("type") != "namespace" or not isinstance(space.get("name"), str) \
                or not isinstance(space.get("tools"), list) or not space["tools"]:
            return "Lite: each namespace has a name and at least one tool"
    if body.get("parallel_tool_calls") is not False or (body.get("reasoning") or {}).get("context") != "all_turns":
        return "Lite: parallel_tool_calls false and reasoning.context all_turns"
    for item in body["input"][1:]:
        for part in item.get("content") or (item.get("output") if isinstance(item.get("output"), list) else []):
            if part.get("type") == "input_image" and ("detail" in part or not part["image_url"].startswith("data:")):
                return "Lite: images are data URLs without detail"
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

    def web_search(self, query, status="completed", sources=None):
        index, item_id = len(self.output), "ws_" + secrets.token_hex(16)
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "web_search_call", "status": "in_progress"})
        for phase in ("in_progress", "searching", "completed"):
            self.add("response.web_search_call." + phase, item_id=item_id, output_index=index)
        action = {"type": "search", "query": query}
        if sources:
            action["sources"] = sources
        item = {"id": item_id, "type": "web_search_call", "status": status, "action": action}
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def text(self, text, pieces=4, deltas=True, citations=()):
        """A message; citations are (url, title, cited substring) turned into url_citation annotations."""
        annotations = []
        for url, title, cited in citations:
            start = text.index(cited)
            annotations.append({"type": "url_citation", "url": url, "title": title,
                                "start_index": start, "end_index": start + len(cited)})
        index, item_id = len(self.output), "msg_" + secrets.token_hex(16)
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"})
        self.add("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        for piece in (chunks(text, pieces) if deltas else []):
            self.add("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                     delta=piece, logprobs=[], obfuscation=self._obfuscation())
        for n, annotation in enumerate(annotations):
            self.add("response.output_text.annotation.added", item_id=item_id, output_index=index,
                     content_index=0, annotation_index=n, annotation=annotation)
        part = {"type": "output_text", "annotations": annotations, "logprobs": [], "text": text}
        self.add("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                 text=text, logprobs=[])
        self.add("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
        item = {"id": item_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def tool_call(self, name, arguments, call_id=None, pieces=3, deltas=True, namespace=None):
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
        if namespace:   # a tool loaded by a tool search: called in the namespace it came in
            item["namespace"] = namespace
        self.add("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        return self

    def tool_search(self, arguments, call_id=None):
        """A client-executed tool search, as the backend streams one (arguments whole, at done)."""
        index, item_id = len(self.output), "tsc_" + secrets.token_hex(16)
        call_id = call_id or "call_" + secrets.token_urlsafe(12).replace("-", "x")
        self.add("response.output_item.added", output_index=index, item={
            "id": item_id, "type": "tool_search_call", "status": "in_progress", "execution": "client",
            "call_id": call_id, "arguments": {}})
        item = {"id": item_id, "type": "tool_search_call", "status": "completed", "execution": "client",
                "call_id": call_id, "arguments": arguments}
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


class QuietServer(ThreadingHTTPServer):
    """A test server that does not print tracebacks when the proxy hangs up on it
    (which the proxy does on purpose: aborts, bounded reads of error bodies)."""

    daemon_threads = True
    request_queue_size = 128   # like the proxy: many connections may arrive at once

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):
            ThreadingHTTPServer.handle_error(self, request, client_address)


class TrickleSocket:
    """What HTTPResponse reads from: ``data``, at most ``step`` bytes per read of the socket."""

    def __init__(self, data, step):
        self.data, self.step = data, step

    def makefile(self, mode):
        import io
        data, step, sent = self.data, self.step, [0]

        class Raw(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, buffer):
                n = min(len(buffer), step, len(data) - sent[0])
                buffer[:n] = data[sent[0]:sent[0] + n]
                sent[0] += n
                return n
        return io.BufferedReader(Raw())


class Reply:
    """One scripted answer of FakeCodex.

    events: a list of event dicts (or raw SSE bytes) sent as a chunked SSE body.
    status/body/headers: an error reply instead. cut_after: close the socket
    after that many events. stall_after: stop sending after that many events
    until ``release`` is set (or the test ends). gate_after: wait for ``gate``
    after that many events, then go on.
    """

    def __init__(self, events=None, status=200, body=None, headers=None, cut_after=None,
                 stall_after=None, gate_after=None, pause=None, stall_headers=False):
        self.events = events
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.cut_after = cut_after
        self.stall_after = stall_after
        self.gate_after = gate_after
        self.pause = pause            # (after n events, seconds of silence)
        self.stall_headers = stall_headers   # say nothing at all: not even the status line
        self.gate = threading.Event()
        self.release = threading.Event()
        self.client_left = threading.Event()


class FakeServer:
    """A loopback HTTP/1.1 server whose requests go to on_get / on_post."""

    def __init__(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                BaseHTTPRequestHandler.setup(self)
                owner.on_connect()

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.on_get(self)

            def do_POST(self):
                owner.on_post(self)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    scheme = "http"

    def start(self):
        self.thread.start()
        return self

    def use_tls(self, certfile, keyfile):
        """Serve HTTPS with this certificate (before start)."""
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https"
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def on_connect(self):
        pass

    def send_json(self, handler, status, doc, headers=None):
        data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


class FakeCodex(FakeServer):
    """Stand-in for https://chatgpt.com/backend-api/codex that rejects what the real one rejects."""

    def __init__(self):
        self.requests = []
        self.script = collections.deque()
        self.default = None          # events answered when the script is empty (load and fuzz runs)
        self.gets = []
        self.catalog = FAKE_CATALOG
        self.usage = None
        self.counts_tokens = False   # report input_tokens as counted by count_input()
        self.refuse = None           # (test of the body, status, error body): refuse like a changed backend
        self.token_accounts = {}     # access token -> its ChatGPT account id (others: ACCOUNT_ID)
        self.limits = {}             # account id -> (requests it serves, then usage_limit_reached resetting in s)
        self.usage_headers = {}      # account id -> x-codex-* headers on its replies
        self.served = {}             # account id -> requests that reached a reply
        self.issued = set()
        self.valid_tokens = {ACCESS_TOKEN}
        self.connections = 0
        self.extra_models = {}       # slug -> catalog entry of models a test adds (serve)
        self.encodings = {"gzip", "zstd"}   # request Content-Encodings taken (the backend takes both)
        self.routing = None          # (origin or None for this one, override): answers wham/accounts/check
        self.refused = []            # (path, (status, detail)) of every request refused as the backend would
        self.reviewer = None         # case -> events or Reply: plays the model that judges auto mode's calls
        self.reviews = []            # the cases it was asked about (the proxy's classifier requests)
        self.fallback_classifier = None   # (stage, body) -> events: answers Claude Code's own classifier
        self.fallback_asked = []
        self.lock = threading.Lock()
        FakeServer.__init__(self)

    def on_connect(self):
        with self.lock:
            self.connections += 1

    @property
    def url(self):
        return "%s://127.0.0.1:%d/backend-api/codex" % (self.scheme, self.server.server_address[1])

    def on_get(self, handler):
        """GET /models?client_version=… (the account's catalog) and /wham/usage."""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self.lock:
            self.gets.append(handler.path)
        if headers.get("authorization", "")[7:] not in self.valid_tokens:
            return self.send_json(handler, 401, {"detail": "Unauthorized"})
        if handler.path.startswith("/backend-api/codex/models?client_version="):
            seen = version_key(handler.path.rsplit("=", 1)[1])   # models above the caller's version are hidden
            models = [m for m in self.catalog if version_key(m.get("minimal_client_version") or "0.0.0") <= seen]
            return self.send_json(handler, 200, {"models": models}, {"ETag": 'W/"fake"'})
        if handler.path == "/backend-api/wham/usage" and self.usage is not None:
            return self.send_json(handler, 200, self.usage)
        if handler.path == "/backend-api/codex/responses" and headers.get("upgrade", "").lower() == "websocket":
            return self.send_json(handler, 426, {"detail": "Upgrade Required"})   # the CLI falls back to SSE
        if handler.path == "/backend-api/wham/accounts/check" and self.routing is not None:
            origin, override = self.routing   # as the Codex CLI 0.171 oracle saw it answered
            return self.send_json(handler, 200, {"accounts": [{
                "id": self.token_accounts.get(headers["authorization"][7:], ACCOUNT_ID),
                "workspace_backend_origin": origin or self.url.rsplit("/backend-api", 1)[0],
                "account_routing_override": override}]})
        self.send_json(handler, 404, {"detail": "Not Found"})

    def stop(self):
        for reply in list(self.script):
            reply.release.set()
        FakeServer.stop(self)

    def reset(self):
        with self.lock:
            self.requests = []
            self.script.clear()
            self.default = None
            self.connections = 0
            self.gets = []
            self.catalog = FAKE_CATALOG
            self.usage = None
            self.counts_tokens = False
            self.refuse = None
            self.limits, self.usage_headers, self.served = {}, {}, {}
            self.reviewer, self.reviews = None, []
            self.extra_models = {}
            self.encodings = {"gzip", "zstd"}
            self.routing = None
            self.refused = []
            self.fallback_classifier, self.fallback_asked = None, []

    def turn(self, model="gpt-5.5"):
        return Turn(self, model)

    def serve(self, **entry):
        """A model the backend serves and lists from here on (catalog fields; Lite by default)."""
        entry = dict(dict(CATALOG_ENTRY, use_responses_lite=True, minimal_client_version="0.98.0",
                          supported_reasoning_levels=[{"effort": e} for e in SIX]), **entry)
        self.extra_models[entry["slug"]] = entry
        self.catalog = list(self.catalog) + [entry]
        return entry

    def reply(self, *replies):
        for reply in replies:
            self.script.append(reply if isinstance(reply, Reply) else Reply(events=reply))
        return replies[0] if len(replies) == 1 else replies

    def on_post(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        encoding = headers.get("content-encoding")
        if encoding is not None and encoding not in self.encodings:
            return self.send_json(handler, 415, {"detail": "Unsupported Content-Encoding: %s" % encoding})
        try:
            body = json.loads(decoded(raw, encoding))
        except ValueError:
            body = None
        with self.lock:
            record = {"path": handler.path, "headers": headers, "body": body, "wire_bytes": len(raw)}
            self.requests.append(record)
        lite = headers.get("x-openai-internal-codex-responses-lite") == "true"
        known = dict(KNOWN_MODELS, **self.extra_models)
        problem = self.header_problem(handler.path, headers, body) or \
            version_problem((body or {}).get("model") if isinstance(body, dict) else None, headers, known) or \
            codex_request_problem(body, self.issued, lite, known)
        if problem:
            with self.lock:
                self.refused.append((handler.path, problem))
            return self.send_json(handler, problem[0], {"detail": problem[1]})
        if self.refuse and self.refuse[0](body, headers):
            return self.send_json(handler, self.refuse[1], self.refuse[2])
        stage = fallback_stage(body)
        if stage is not None and self.fallback_classifier is not None:
            with self.lock:
                self.requests.pop()
                self.fallback_asked.append((stage, body))
            return self.stream(handler, Reply(events=self.fallback_classifier(stage, body)), body)
        case = review_case(body)
        if case is not None and self.reviewer is not None:
            with self.lock:
                self.requests.pop()   # kept apart: the turn's own requests stay in order
                self.reviews.append(dict(case, model=body["model"], effort=body["reasoning"]["effort"],
                                         text=body.get("text")))
            answer = self.reviewer(case)
            reply = answer if isinstance(answer, Reply) else Reply(events=answer)
            if reply.status != 200:
                return self.send_json(handler, reply.status, reply.body, reply.headers)
            return self.stream(handler, reply, body)
        account = headers["chatgpt-account-id"]
        with self.lock:
            served = self.served[account] = self.served.get(account, 0) + 1
        if account in self.limits and served > self.limits[account][0]:
            return self.send_json(handler, 429, {"error": {
                "type": "usage_limit_reached", "message": "The usage limit has been reached", "plan_type": "plus",
                "resets_in_seconds": self.limits[account][1]}}, {"x-codex-primary-used-percent": "100"})
        with self.lock:
            reply = self.script.popleft() if self.script else None
            record["output"] = reply_items(reply)
        if reply is None and self.default is not None:
            reply = Reply(events=self.default)
        if reply is None:
            return self.send_json(handler, 500, {"detail": "FakeCodex: no scripted reply left"})
        if reply.stall_headers:
            self.stall(handler.connection, reply)
            handler.close_connection = True
            return
        if reply.status != 200:
            return self.send_json(handler, reply.status, reply.body, reply.headers)
        if account in self.usage_headers:
            reply = Reply(events=reply.events, headers=dict(reply.headers, **self.usage_headers[account]))
        self.stream(handler, reply, body)

    def header_problem(self, path, headers, body):
        if path != "/backend-api/codex/responses":
            return 404, "Not Found"
        if headers.get("authorization", "")[7:] not in self.valid_tokens:
            return 401, "Unauthorized"
        if headers.get("chatgpt-account-id") != self.token_accounts.get(headers["authorization"][7:], ACCOUNT_ID):
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

    def stall(self, connection, reply):
        """Send nothing until released; note it when the proxy hangs up on us."""
        import select
        deadline = time.monotonic() + 30
        while not reply.release.is_set() and time.monotonic() < deadline:
            if select.select([connection], [], [], 0.05)[0]:
                try:
                    if connection.recv(1, socket.MSG_PEEK) == b"":
                        reply.client_left.set()
                        return
                except OSError:
                    reply.client_left.set()
                    return

    def count_input(self, body):
        """The fake's own tokenizer: deterministic, and unlike the proxy's estimate."""
        return int(len(json.dumps([body.get("instructions"), body.get("input"), body.get("tools")])) / 3.3)

    def stream(self, handler, reply, body=None):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        events = reply.events
        if self.counts_tokens and isinstance(events, list) and body is not None:
            events = [dict(e, response=dict(e["response"], usage=dict(e["response"]["usage"], input_tokens=self.count_input(body))))
                      if e["type"] == "response.completed" else e for e in events]
        pieces = [events] if isinstance(events, bytes) else [sse_bytes([e]) for e in events]
        try:
            for n, piece in enumerate(pieces):
                if reply.cut_after == n:
                    handler.wfile.write(b"%x\r\n%s" % (len(piece), piece[: len(piece) // 2]))
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    handler.close_connection = True
                    return
                if reply.stall_after == n:
                    self.stall(handler.connection, reply)
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


def make_jwt(claims):
    part = lambda doc: cp.b64url(json.dumps(doc).encode())
    return "%s.%s.%s" % (part({"alg": "RS256", "typ": "JWT"}), part(claims), cp.b64url(b"signature"))


AUTH_CLAIMS = {"chatgpt_account_id": ACCOUNT_ID, "chatgpt_plan_type": "plus", "chatgpt_user_id": "user-1"}


class FakeIssuer(FakeServer):
    """Stand-in for https://auth.openai.com: PKCE authorize, token endpoint with
    single-use rotating refresh tokens, device-code endpoints, revoke."""

    def __init__(self, codex=None):
        self.codex = codex
        self.lock = threading.Lock()
        self.codes = {}            # authorization code -> (challenge, redirect_uri)
        self.live_refresh = set()  # refresh tokens that still work once
        self.refresh_calls = 0
        self.exchanges = 0
        self.revoked = []
        self.device_enabled = True
        self.device_polls_pending = 2
        self.devices = {}
        self.token_lifetime = 3600
        self.refresh_delay = 0.05
        self.refresh_held_until = None   # a condition the refresh answer waits for (at most 15 s)
        FakeServer.__init__(self)

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.server.server_address[1])

    def mint(self):
        """A fresh token set, accepted by the paired FakeCodex."""
        access = make_jwt({"exp": int(time.time()) + self.token_lifetime, "jti": secrets.token_hex(8),
                           "https://api.openai.com/auth": AUTH_CLAIMS})
        refresh = "rt-" + secrets.token_hex(16)
        with self.lock:
            self.live_refresh.add(refresh)
            if self.codex is not None:
                self.codex.valid_tokens.add(access)
        id_token = make_jwt({"email": "dev@example.com", "https://api.openai.com/auth": AUTH_CLAIMS})
        return {"id_token": id_token, "access_token": access, "refresh_token": refresh}

    def on_get(self, handler):
        """GET /oauth/authorize: check the PKCE request, redirect back with a code."""
        from urllib.parse import parse_qs, urlsplit, urlencode
        url = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        problems = [k for k, v in (("client_id", cp.CLIENT_ID), ("response_type", "code"),
                                   ("code_challenge_method", "S256"), ("scope", cp.SCOPE),
                                   ("codex_cli_simplified_flow", "true")) if query.get(k) != v]
        redirect = query.get("redirect_uri", "")
        if url.path != "/oauth/authorize" or problems or not re.match(r"^http://localhost:\d+/auth/callback$", redirect) \
                or len(query.get("code_challenge", "")) != 43 or not query.get("state"):
            return self.send_json(handler, 400, {"error": "invalid_request", "problems": problems})
        code = "ac_" + secrets.token_hex(12)
        with self.lock:
            self.codes[code] = (query["code_challenge"], redirect)
        handler.send_response(302)
        handler.send_header("Location", redirect + "?" + urlencode({"code": code, "state": query["state"]}))
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def on_post(self, handler):
        from urllib.parse import parse_qs
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        kind = handler.headers.get("Content-Type", "")
        body = json.loads(raw) if kind.startswith("application/json") else {
            k: v[0] for k, v in parse_qs(raw.decode()).items()}
        path = handler.path
        if path == "/oauth/token" and body.get("grant_type") == "authorization_code":
            return self.exchange(handler, body)
        if path == "/oauth/token" and body.get("grant_type") == "refresh_token":
            return self.refresh(handler, body)
        if path == "/api/accounts/deviceauth/usercode":
            if not self.device_enabled:
                return self.send_json(handler, 404, {"detail": "Not Found"})
            device = "dev_" + secrets.token_hex(6)
            verifier = cp.b64url(os.urandom(64))
            challenge = cp.b64url(__import__("hashlib").sha256(verifier.encode()).digest())
            code = "ac_" + secrets.token_hex(12)
            with self.lock:
                self.devices[device] = {"polls": 0, "code": code, "verifier": verifier, "challenge": challenge}
                self.codes[code] = (challenge, self.url + "/deviceauth/callback")
            return self.send_json(handler, 200, {"device_auth_id": device, "user_code": "ABCD-1234", "interval": "0.1"})
        if path == "/api/accounts/deviceauth/token":
            device = self.devices.get(body.get("device_auth_id"))
            if device is None or body.get("user_code") != "ABCD-1234":
                return self.send_json(handler, 400, {"error": "bad_device"})
            device["polls"] += 1
            if device["polls"] <= self.device_polls_pending:
                return self.send_json(handler, 403, {"error": {"code": "deviceauth_authorization_pending"}})
            return self.send_json(handler, 200, {"authorization_code": device["code"],
                                             "code_challenge": device["challenge"], "code_verifier": device["verifier"]})
        if path == "/oauth/revoke":
            self.revoked.append(body.get("token"))
            return self.send_json(handler, 200, {})
        self.send_json(handler, 404, {"detail": "Not Found"})

    def exchange(self, handler, body):
        import hashlib
        with self.lock:
            expected = self.codes.pop(body.get("code"), None)
        verifier = body.get("code_verifier", "")
        if expected is None or body.get("client_id") != cp.CLIENT_ID or body.get("redirect_uri") != expected[1] \
                or cp.b64url(hashlib.sha256(verifier.encode()).digest()) != expected[0]:
            return self.send_json(handler, 400, {"error": "invalid_grant"})
        self.exchanges += 1
        self.send_json(handler, 200, dict(self.mint(), expires_in=3600, token_type="Bearer"))

    def refresh(self, handler, body):
        with self.lock:
            self.refresh_calls += 1
            token = body.get("refresh_token")
            if body.get("client_id") != cp.CLIENT_ID or token not in self.live_refresh:
                return self.send_json(handler, 401, REFRESH_REUSED_BODY)
            self.live_refresh.discard(token)
        time.sleep(self.refresh_delay)   # a real round trip: gives concurrent callers the chance to pile up
        deadline = time.monotonic() + 15
        while self.refresh_held_until is not None and not self.refresh_held_until() and time.monotonic() < deadline:
            time.sleep(0.01)   # held until the test saw what it waits for (another caller blocked)
        tokens = self.mint()
        del tokens["id_token"]
        self.send_json(handler, 200, tokens)


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
    with_issuer = False
    settings = {}
    handler = None

    @classmethod
    def setUpClass(cls):
        cls.home = Path(tempfile.mkdtemp(prefix="codex-proxy-test-"))
        if cls.logged_in:
            write_tokens(cls.home / "tokens.json")
        cls.fake = FakeCodex().start()
        settings = dict(cls.settings)
        if cls.with_issuer:
            cls.issuer = FakeIssuer(cls.fake).start()
            settings["issuer"] = cls.issuer.url
        cls.config = make_config(cls.home, cls.fake.url, **settings)
        cls.proxy = cp.ProxyServer(cls.config, cls.handler)
        cls.thread = threading.Thread(target=cls.proxy.serve_forever, daemon=True)
        cls.thread.start()

    @classmethod
    def tearDownClass(cls):
        cls.proxy.shutdown()
        cls.proxy.server_close()
        cls.proxy.codex.close_idle()
        cls.fake.stop()
        if cls.with_issuer:
            cls.issuer.stop()
        shutil.rmtree(str(cls.home), ignore_errors=True)

    def setUp(self):
        self.fake.reset()

    def restarted(self):
        """A new proxy process, as far as what it keeps goes: the same home, nothing in memory."""
        proxy = cp.ProxyServer(self.config, self.handler)
        proxy.answers = []
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        return proxy

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
                  codex_home=Path(home) / "codex-home", issuer="http://127.0.0.1:9",
                  models={"opus": "gpt-5.5", "sonnet": "gpt-5.5", "haiku": "gpt-6-luna"},
                  retry_delay=0.01, connect_timeout=5.0)
    values.update(settings)
    return cp.Config(**values)


def user(text):
    return {"role": "user", "content": text}


BASIC = {"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [user("hi")]}


def translate(body, headers=None, **settings):
    config = make_config(tempfile.gettempdir(), "http://127.0.0.1:9/backend-api/codex", **settings)
    return cp.translate_request(body, headers or {}, config)


BASH_TOOL = {"name": "Bash", "description": "Run a command",
             "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                              "properties": {"command": {"type": "string"}}, "required": ["command"]}}


CATALOG = {m["slug"]: m for m in FAKE_CATALOG}


def report(text):
    """A number for the test output (issue 5 asks each hardening test to show one)."""
    sys.stderr.write("\n    [measured] %s " % text)


def replay_form(item):
    """An item as a store:false replay can carry it again (prompt-cache.md): reasoning by its
    encrypted content, messages by role and text, calls by id, name and arguments."""
    kind = item.get("type")
    if kind == "reasoning":
        return kind, item.get("encrypted_content")
    if kind == "message":
        return kind, item.get("role"), tuple(part.get("text") for part in item.get("content") or [])
    if kind == "function_call":
        return kind, item.get("call_id"), item.get("name"), item.get("arguments")
    if kind == "tool_search_call":
        return kind, item.get("call_id"), json.dumps(item.get("arguments"), sort_keys=True)
    return kind, json.dumps(item, sort_keys=True)


def reply_items(reply):
    """The output items of a scripted reply (what its response.completed lists)."""
    events = reply.events if reply is not None and isinstance(reply.events, list) else []   # not raw SSE bytes
    done = [e for e in events if isinstance(e, dict) and e.get("type") == "response.completed"]
    return done[-1]["response"]["output"] if done else []


def reply_output(record):
    """The output items of the reply FakeCodex gave a recorded request."""
    return record.get("output") or []


def prefix_reuse(records):
    """Measured as in prompt-cache.md: for each request and the one before it under the same
    prompt_cache_key, the bytes of its input that repeat the previous input and output as a
    prefix (the backend's cache condition; nothing when instructions, tools or model differ),
    and the ceiling, its bytes up to the length of the previous input and output: what any
    proxy could reuse. -> [(reused bytes, ceiling bytes)], one per pair."""
    last, pairs = {}, []
    for record in records:
        body = record["body"]
        before = last.get(body["prompt_cache_key"])
        last[body["prompt_cache_key"]] = record
        if before is None:
            continue
        prev, size = before["body"], [len(cp.json_bytes(item)) for item in body["input"]]
        expected = [("same", item) for item in prev["input"]] + [("replay", replay_form(i)) for i in reply_output(before)]
        reused = 0
        if all(prev.get(k) == body.get(k) for k in ("instructions", "tools", "model")):
            for item, (how, wanted) in zip(body["input"], expected):
                if (item if how == "same" else replay_form(item)) != wanted:
                    break
                reused += 1
        pairs.append((sum(size[:reused]), sum(size[:len(expected)])))
    return pairs


def share_of_ceiling(pairs):
    return 100.0 * sum(r for r, _ in pairs) / max(sum(c for _, c in pairs), 1)


CLAUDE = os.environ.get("CODEX_PROXY_CLAUDE") or shutil.which("claude")
try:
    anthropic = __import__("importlib").import_module("anthropic")
except ImportError:
    anthropic = None
REQUIRE_CLIENTS = os.environ.get("CODEX_PROXY_REQUIRE_CLIENTS") == "1"   # set by .ci/run


def needs(client, reason):
    """Skip without the client, except where CI requires it: there its absence fails."""
    def decorate(cls):
        if client or not REQUIRE_CLIENTS:
            return unittest.skipUnless(client, reason)(cls)

        class Missing(unittest.TestCase):
            def test_client_is_installed(self):
                self.fail("CODEX_PROXY_REQUIRE_CLIENTS=1 but " + reason)
        Missing.__name__ = Missing.__qualname__ = cls.__name__
        return Missing
    return decorate


# ===========================================================================
# TESTS, in the order of codex_proxy.py's sections
# ===========================================================================


# ---------------------------------------------------------------------------
# Helpers: outgoing connections through proxies and certificate authorities
# ---------------------------------------------------------------------------

class ConnectProxy:
    """A loopback HTTP proxy that only tunnels (CONNECT), as company proxies do,
    and wants Basic credentials. It counts the tunnels it opens."""

    def __init__(self, credentials="dev:p@ss word"):
        import base64
        self.expected = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.tunnels = []          # "host:port" of every CONNECT it accepted
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.running = True
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.tunnel, args=(client,), daemon=True).start()

    def tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return client.close()
            head += chunk
        lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
        method, target = lines[0].split()[:2]
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if method != "CONNECT" or headers.get("proxy-authorization") != self.expected:
            self.refused += 1
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.tunnels.append(target)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        back = threading.Thread(target=self.pipe, args=(upstream, client), daemon=True)
        back.start()
        self.pipe(client, upstream)
        back.join(60)
        client.close()
        upstream.close()

    @staticmethod
    def pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.running = False
        self.listener.close()


def make_certificate(folder):
    """A throwaway certificate for 127.0.0.1 made by the openssl command: (cert, key)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise unittest.SkipTest("the openssl command is not installed (apt-get install openssl)")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


NETWORK_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                     "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


class TestOutboundProxy(unittest.TestCase):
    """Behind a company proxy with its own CA: every outgoing call goes through the
    proxy (CONNECT, with credentials), trusts SSL_CERT_FILE, and reuses its tunnels."""

    def setUp(self):
        self.folder = Path(tempfile.mkdtemp(prefix="codex-proxy-tls-"))
        self.addCleanup(shutil.rmtree, str(self.folder), True)
        cert, key = make_certificate(self.folder)
        saved = {name: os.environ.pop(name) for name in NETWORK_VARIABLES if name in os.environ}
        self.addCleanup(lambda: [os.environ.pop(n, None) for n in NETWORK_VARIABLES] and None)
        self.addCleanup(os.environ.update, saved)
        self.fake = FakeCodex().use_tls(cert, key).start()
        self.addCleanup(self.fake.stop)
        self.issuer = FakeIssuer(self.fake).use_tls(cert, key).start()
        self.addCleanup(self.issuer.stop)
        self.tunnel = ConnectProxy()
        self.addCleanup(self.tunnel.stop)
        os.environ["HTTPS_PROXY"] = "http://dev:p%%40ss%%20word@127.0.0.1:%d" % self.tunnel.port
        os.environ["SSL_CERT_FILE"] = cert
        tokens = self.issuer.mint()
        doc = {"tokens": dict(tokens, access_token=expired_access(), account_id=ACCOUNT_ID)}
        cp.write_private_file(self.folder / "tokens.json", json.dumps(doc))

    def start_proxy(self):
        config = make_config(self.folder, self.fake.url, issuer=self.issuer.url)
        proxy = cp.ProxyServer(config)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        self.addCleanup(proxy.codex.close_idle)
        return proxy

    def turn(self, proxy, text):
        self.fake.reply(self.fake.turn().text(text).completed())
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, stream=True)),
                     {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        self.assertEqual(response.status, 200, body[:300])
        return cp.fold_message(check_stream(self, body))["content"][0]["text"]

    def test_refresh_catalog_and_turns_go_through_the_proxy_and_reuse_the_tunnel(self):
        proxy = self.start_proxy()
        self.assertEqual(proxy.codex.proxy, os.environ["HTTPS_PROXY"])
        self.assertEqual(self.turn(proxy, "through the tunnel"), "through the tunnel")
        self.assertEqual(self.issuer.refresh_calls, 1, "the expired login was refreshed, through the proxy")
        catalog = proxy.catalog.refresh()
        self.assertIn("gpt-5.5", catalog)
        upstream = "127.0.0.1:%d" % self.fake.server.server_address[1]
        issuer = "127.0.0.1:%d" % self.issuer.server.server_address[1]
        self.assertEqual(set(self.tunnel.tunnels), {upstream, issuer})
        opened = self.tunnel.tunnels.count(upstream)
        for n in range(5):
            self.assertEqual(self.turn(proxy, "turn %d" % n), "turn %d" % n)
        self.assertEqual(self.tunnel.tunnels.count(upstream), opened, "later turns reuse the open tunnel")
        self.assertEqual(self.tunnel.refused, 0)
        self.assertTrue(any(g.startswith("/backend-api/codex/models") for g in self.fake.gets))
        report("outbound proxy: refresh, catalog and 6 turns through %d tunnels (%s)" % (
            len(self.tunnel.tunnels), ", ".join(sorted(set(self.tunnel.tunnels)))))

    def test_no_proxy_goes_direct(self):
        os.environ["NO_PROXY"] = "localhost,127.0.0.1"
        proxy = self.start_proxy()
        self.assertIsNone(proxy.codex.proxy)
        self.assertEqual(self.turn(proxy, "direct"), "direct")
        self.assertEqual(self.issuer.refresh_calls, 1)
        self.assertEqual(self.tunnel.tunnels, [])

    def test_the_proxy_is_named_without_its_credentials(self):
        self.assertEqual(cp.shown_proxy(os.environ["HTTPS_PROXY"]), "http://127.0.0.1:%d" % self.tunnel.port)
        config = make_config(self.folder, self.fake.url, issuer=self.issuer.url)
        line = cp.outbound_summary(config)
        self.assertIn("http://127.0.0.1:%d" % self.tunnel.port, line)
        self.assertNotIn("p%40ss", line)

    def test_a_certificate_not_trusted_is_refused(self):
        del os.environ["SSL_CERT_FILE"]
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(BASIC), {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        self.assertEqual(response.status, 401, "the refresh could not verify the issuer")
        self.assertIn(b"CERTIFICATE_VERIFY_FAILED", response.read())
        conn.close()


# ---------------------------------------------------------------------------
# Token store and OAuth: sign in, refresh, sharing the Codex CLI's login, Windows
# ---------------------------------------------------------------------------

class BlockingInput:
    """A stdin stand-in: readline() hands out lines the test feeds, and blocks meanwhile."""

    def __init__(self):
        self.lines = collections.deque()
        self.ready = threading.Condition()

    def feed(self, line):
        with self.ready:
            self.lines.append(line)
            self.ready.notify_all()

    def readline(self):
        with self.ready:
            self.ready.wait_for(lambda: self.lines, timeout=30)
            return self.lines.popleft() if self.lines else ""


class CliRun:
    """cp.main(args) on a thread, with its own environment and captured output."""

    def __init__(self, test, args, stdin=None):
        import io
        self.out, self.err, self.code = io.StringIO(), io.StringIO(), None
        self.thread = threading.Thread(target=self._run, args=(args, stdin or BlockingInput()), daemon=True)
        self.thread.start()

    def _run(self, args, stdin):
        import contextlib
        saved = sys.stdin
        sys.stdin = stdin
        try:
            with contextlib.redirect_stdout(self.out), contextlib.redirect_stderr(self.err):
                self.code = cp.main(args)
        finally:
            sys.stdin = saved

    def wait_for(self, pattern, timeout=10):
        try:
            return wait_until(lambda: re.search(pattern, self.out.getvalue()), timeout)
        except AssertionError:
            raise AssertionError("%r never printed; output so far: %s" % (pattern, self.out.getvalue()))

    def result(self, timeout=20):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the command did not finish"
        return self.code, self.out.getvalue(), self.err.getvalue()


def http_get(url):
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
    response = conn.getresponse()
    answer = Answer(response.status, response.headers, response.read())
    conn.close()
    return answer


class LoginCase(unittest.TestCase):
    """A FakeIssuer and an isolated environment (CODEX_PROXY_HOME, CODEX_HOME) per test."""

    @classmethod
    def setUpClass(cls):
        cls.issuer = FakeIssuer().start()

    @classmethod
    def tearDownClass(cls):
        cls.issuer.stop()

    def setUp(self):
        from unittest import mock
        self.home = Path(tempfile.mkdtemp(prefix="codex-proxy-login-")) / "proxy-home"
        self.codex_home = self.home.parent / "codex-home"
        self.codex_home.mkdir()
        self.addCleanup(shutil.rmtree, str(self.home.parent), True)
        patches = [mock.patch.dict(os.environ, {"CODEX_PROXY_HOME": str(self.home), "CODEX_HOME": str(self.codex_home),
                                                "CODEX_PROXY_ISSUER": self.issuer.url}),
                   mock.patch.object(cp.Config, "CALLBACK_PORTS", (0,))]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)

    def saved(self, path=None):
        return json.loads((path or self.home / "tokens.json").read_text())


class TestLogin(LoginCase):

    def test_browser_login_end_to_end_and_wrong_state_is_refused(self):
        run = CliRun(self, ["login", "--no-browser"])
        url = run.wait_for(r"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)").group(1)
        self.assertIn("code_challenge_method=S256", url)
        self.assertIn("redirect_uri=http%3A%2F%2Flocalhost%3A", url)
        redirect = http_get(url)
        self.assertEqual(redirect.status, 302)
        callback = redirect.headers["Location"].replace("localhost", "127.0.0.1")
        forged = re.sub(r"state=[^&]+", "state=forged", callback)
        refused = http_get(forged)
        self.assertEqual(refused.status, 400)
        self.assertIn(b"State mismatch", refused.body)
        accepted = http_get(callback)
        self.assertEqual(accepted.status, 200)
        self.assertIn(b"Signed in", accepted.body)
        code, out, err = run.result()
        self.assertEqual(code, 0, err)
        self.assertIn("Logged in as dev@example.com (plus plan)", out)
        doc = self.saved()
        self.assertEqual(set(doc["tokens"]), {"id_token", "access_token", "refresh_token", "account_id"})
        self.assertEqual(doc["tokens"]["account_id"], ACCOUNT_ID)
        self.assertRegex(doc["last_refresh"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(stat.S_IMODE((self.home / "tokens.json").stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.home.stat().st_mode), 0o700)
        self.assertNotIn(doc["tokens"]["access_token"], out + err, "tokens never printed")

    def test_pasted_redirect_url_finishes_the_login(self):
        stdin = BlockingInput()
        run = CliRun(self, ["login", "--no-browser"], stdin)
        url = run.wait_for(r"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)").group(1)
        location = http_get(url).headers["Location"]   # the browser ended on another machine
        stdin.feed("not a url\n")
        stdin.feed(location + "\n")
        code, out, err = run.result()
        self.assertEqual(code, 0, err)
        self.assertIn("not the redirect URL", err)
        self.assertEqual(self.saved()["tokens"]["account_id"], ACCOUNT_ID)

    def test_busy_callback_port_is_one_clear_sentence(self):
        from unittest import mock
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        with mock.patch.object(cp.Config, "CALLBACK_PORTS", (busy.getsockname()[1],)):
            code, out, err = CliRun(self, ["login", "--no-browser"]).result()
        self.assertEqual(code, 1)
        self.assertIn("Port %d is in use" % busy.getsockname()[1], err)
        self.assertIn("login --device", err)
        self.assertNotIn("Traceback", err)

    def test_device_code_login_end_to_end(self):
        before = self.issuer.exchanges
        code, out, err = CliRun(self, ["login", "--device"]).result()
        self.assertEqual(code, 0, err)
        self.assertIn("Open %s/codex/device in a browser and enter the code ABCD-1234" % self.issuer.url, out)
        self.assertEqual(self.issuer.exchanges, before + 1)
        self.assertEqual(self.saved()["tokens"]["account_id"], ACCOUNT_ID)

    def test_device_login_switched_off_says_how_to_enable_it(self):
        self.issuer.device_enabled = False
        self.addCleanup(setattr, self.issuer, "device_enabled", True)
        code, out, err = CliRun(self, ["login", "--device"]).result()
        self.assertEqual(code, 1)
        self.assertIn("Settings > Security", err)

    def test_status_json_fields_and_exit_codes(self):
        code, out, _ = CliRun(self, ["status", "--json"]).result()
        self.assertEqual((code, json.loads(out)["logged_in"]), (1, False))
        tokens = self.issuer.mint()
        cp.write_private_file(self.home / "tokens.json", json.dumps({"tokens": dict(tokens, account_id=ACCOUNT_ID)}))
        code, out, _ = CliRun(self, ["status", "--json"]).result()
        status = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual({k: status[k] for k in ("logged_in", "usable", "email", "plan", "account_id",
                                                 "token_file", "shared_with_codex", "access_token_expired")},
                         {"logged_in": True, "usable": True, "email": "dev@example.com", "plan": "plus",
                          "account_id": ACCOUNT_ID, "token_file": str(self.home / "tokens.json"),
                          "shared_with_codex": False, "access_token_expired": False})
        self.assertRegex(status["access_token_expires_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        code, text, _ = CliRun(self, ["status"]).result()
        self.assertIn("Logged in as dev@example.com (plus plan)", text)
        for secret in tokens.values():
            self.assertNotIn(secret, out + text)

    def test_codex_api_key_login_is_not_taken_for_a_chatgpt_login(self):
        cp.write_private_file(self.codex_home / "auth.json", json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"}))
        code, out, _ = CliRun(self, ["status", "--json"]).result()
        self.assertEqual((code, json.loads(out)["logged_in"]), (1, False))
        cp.write_private_file(self.codex_home / "auth.json", json.dumps(
            {"auth_mode": "chatgpt", "tokens": dict(self.issuer.mint(), account_id=ACCOUNT_ID)}))
        code, out, _ = CliRun(self, ["status", "--json"]).result()
        self.assertEqual((code, json.loads(out)["shared_with_codex"]), (0, True))

    def test_logout_removes_own_tokens_and_leaves_codex_login(self):
        own, theirs = self.issuer.mint(), self.issuer.mint()
        cp.write_private_file(self.home / "tokens.json", json.dumps({"tokens": own}))
        cp.write_private_file(self.codex_home / "auth.json", json.dumps({"auth_mode": "chatgpt", "tokens": theirs}))
        code, out, _ = CliRun(self, ["logout"]).result()
        self.assertEqual(code, 0)
        self.assertIn("Removed %s" % (self.home / "tokens.json"), out)
        self.assertIn("--codex", out)
        self.assertFalse((self.home / "tokens.json").exists())
        self.assertTrue((self.codex_home / "auth.json").exists())
        self.assertIn(own["refresh_token"], self.issuer.revoked)
        self.assertNotIn(theirs["refresh_token"], self.issuer.revoked, "Codex's login is never revoked")
        code, out, _ = CliRun(self, ["logout", "--codex"]).result()
        self.assertIn("Removed %s" % (self.codex_home / "auth.json"), out)
        self.assertFalse((self.codex_home / "auth.json").exists())

    def test_help_on_every_subcommand(self):
        import contextlib, io
        for command in ("start", "login", "status", "logout", "models", "env", "claude", "doctor"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
                cp.main([command, "--help"])
            self.assertEqual(caught.exception.code, 0)
            self.assertIn("usage: codex_proxy.py %s" % command, out.getvalue())


def expired_access():
    return make_jwt({"exp": int(time.time()) - 60, "https://api.openai.com/auth": AUTH_CLAIMS})


class TestTokenRefresh(ProxyCase):
    logged_in = False
    with_issuer = True

    def setUp(self):
        ProxyCase.setUp(self)
        for path in (self.home / "tokens.json", self.config.codex_auth_path):
            if path.exists():
                path.unlink()
        self.issuer.refresh_calls = 0

    def login(self, access=None, path=None, mode=0o600, **extra):
        tokens = self.issuer.mint()
        if access is not None:
            tokens["access_token"] = access
        doc = dict(extra, tokens=dict(tokens, account_id=ACCOUNT_ID), last_refresh="2026-11-01T00:00:00Z")
        cp.write_private_file(path or self.home / "tokens.json", json.dumps(doc), mode)
        return tokens

    def test_expired_token_is_refreshed_once_for_20_concurrent_requests(self):
        old = self.login(access=expired_access())
        self.fake.reply(*[self.fake.turn().text("ok").completed() for _ in range(20)])
        answers = [None] * 20

        def call(n):
            answers[n] = self.post(BASIC).status
        threads = [threading.Thread(target=call, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(answers, [200] * 20)
        self.assertEqual(self.issuer.refresh_calls, 1, "one refresh, however many requests waited")
        saved = json.loads((self.home / "tokens.json").read_text())["tokens"]
        self.assertNotEqual(saved["refresh_token"], old["refresh_token"], "the rotated refresh token was saved")
        self.assertEqual(stat.S_IMODE((self.home / "tokens.json").stat().st_mode), 0o600)

    def test_upstream_401_mid_session_refreshes_once_and_succeeds(self):
        tokens = self.login()
        self.fake.reply(self.fake.turn().text("before").completed(), self.fake.turn().text("after").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.fake.valid_tokens.discard(tokens["access_token"])   # the backend stops accepting it
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(answer.json()["content"][0]["text"], "after")
        self.assertEqual(self.issuer.refresh_calls, 1)
        self.assertEqual([r["headers"]["authorization"] == "Bearer " + tokens["access_token"]
                          for r in self.fake.requests], [True, True, False])

    def test_reused_refresh_token_fails_with_login_message_and_no_retry_loop(self):
        tokens = self.login(access=expired_access())
        self.issuer.live_refresh.discard(tokens["refresh_token"])   # another client already used it
        for _ in range(3):
            answer = self.post(BASIC)
            self.assertEqual(answer.status, 401)
            message = answer.json()["error"]["message"]
            self.assertIn("already used", message)
            self.assertIn("python codex_proxy.py login", message)
        self.assertEqual(self.issuer.refresh_calls, 1, "a dead refresh token is not tried again")
        self.assertEqual(self.fake.requests, [])

    def test_codex_auth_json_is_used_in_place_and_written_back_with_its_mode(self):
        path = self.config.codex_auth_path
        old = self.login(access=expired_access(), path=path, mode=0o640, auth_mode="chatgpt", OPENAI_API_KEY=None)
        self.fake.reply(self.fake.turn().text("shared").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertFalse((self.home / "tokens.json").exists(), "the proxy writes no copy of its own")
        doc = json.loads(path.read_text())
        self.assertEqual((doc["auth_mode"], doc["OPENAI_API_KEY"]), ("chatgpt", None), "Codex's fields are kept")
        self.assertNotEqual(doc["tokens"]["refresh_token"], old["refresh_token"])
        self.assertIn(doc["tokens"]["access_token"], self.fake.valid_tokens)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o640)
        status = cp.login_status(self.config)
        self.assertEqual((status["token_file"], status["shared_with_codex"]), (str(path), True))

    def test_a_token_another_process_refreshed_is_used_not_refreshed_again(self):
        self.login(access=expired_access())
        mine, theirs = cp.TokenStore(self.config), cp.TokenStore(self.config)
        stale = mine.load()["tokens"]["access_token"]
        theirs.credentials()                         # the other process refreshes first
        self.assertEqual(self.issuer.refresh_calls, 1)
        fresh = mine.refresh(stale)                  # we still hold the stale token
        self.assertEqual(self.issuer.refresh_calls, 1)
        self.assertNotEqual(fresh["access_token"], stale)

    # A login file that cannot be written: the refreshed login is kept, never lost (issue 21).

    def disk_full(self):
        """Every write of a file fails as on a full disk, until the returned patches stop."""
        from unittest import mock
        full = OSError(28, "No space left on device")
        self.warnings = []
        patches = [mock.patch.object(cp, "write_private_file", side_effect=full),
                   mock.patch.object(cp, "write_in_place", side_effect=full),
                   mock.patch.object(cp, "warn", self.warnings.append)]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)
        return patches[:2]

    def test_a_refresh_whose_write_fails_keeps_serving_and_keeps_the_login(self):
        old = self.login(access=expired_access())
        before = (self.home / "tokens.json").read_bytes()
        patches = self.disk_full()
        self.fake.reply(*[self.fake.turn().text("ok %d" % n).completed() for n in range(4)])
        for n in range(3):
            answer = self.post(BASIC)
            self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(self.issuer.refresh_calls, 1, "the refreshed login was served from memory")
        self.assertEqual((self.home / "tokens.json").read_bytes(), before, "nothing half-written")
        sent = {r["headers"]["authorization"] for r in self.fake.requests}
        self.assertEqual(len(sent), 1)
        self.assertNotIn(old["access_token"], sent.pop())
        health = json.loads(self.request("GET", "/health").body)
        self.assertIn("The login file %s is out of date" % (self.home / "tokens.json"), health["login_problems"][0])
        self.assertIn("No space left on device", health["login_problems"][0])
        running = make_config(self.home, self.fake.url, port=self.proxy.server_address[1])
        self.assertEqual(cp.running_proxy_problems(running), health["login_problems"], "what `status` shows")
        self.assertEqual(self.warnings[:1], ["Refreshed the login in %s but cannot write it ([Errno 28] No space left on "
                                             "device); serving it from memory and trying again every 30 s. Free some "
                                             "space or make the file writable, or the login is lost when the proxy "
                                             "stops." % (self.home / "tokens.json")])
        for patch in patches:
            patch.stop()
        self.proxy.accounts.default.store.unsaved = self.proxy.accounts.default.store.unsaved._replace(next_try=0)
        self.assertEqual(self.post(BASIC).status, 200)
        saved = json.loads((self.home / "tokens.json").read_text())["tokens"]
        self.assertIn(saved["refresh_token"], self.issuer.live_refresh, "the file holds the live refresh token")
        self.assertIsNone(self.proxy.accounts.default.store.unsaved)
        self.assertEqual(json.loads(self.request("GET", "/health").body)["login_problems"], [])

    def test_a_second_refresh_before_the_write_works_spends_the_new_refresh_token(self):
        self.login(access=expired_access())
        self.disk_full()
        self.fake.reply(self.fake.turn().text("one").completed(), self.fake.turn().text("two").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        store = self.proxy.accounts.default.store
        kept = store.unsaved.doc["tokens"]
        self.fake.valid_tokens.discard(kept["access_token"])   # the backend stops taking it: a forced refresh
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(self.issuer.refresh_calls, 2)
        self.assertNotIn(kept["refresh_token"], self.issuer.live_refresh, "the kept refresh token was the one spent")
        self.assertIn(store.unsaved.doc["tokens"]["refresh_token"], self.issuer.live_refresh)

    def test_a_bind_mounted_login_file_is_written_in_place(self):
        from unittest import mock
        path = self.config.codex_auth_path
        self.login(access=expired_access(), path=path, mode=0o600, auth_mode="chatgpt")
        inode = path.stat().st_ino
        real = os.replace

        def replace(source, target, *args, **kwargs):
            if str(target) == str(path):   # a single file mounted into a container cannot be renamed over
                raise OSError(16, "Device or resource busy")
            return real(source, target, *args, **kwargs)
        with mock.patch("os.replace", replace):
            self.fake.reply(self.fake.turn().text("ok").completed())
            self.assertEqual(self.post(BASIC).status, 200)
        self.assertEqual(path.stat().st_ino, inode, "the same file, rewritten")
        saved = json.loads(path.read_text())
        self.assertIn(saved["tokens"]["refresh_token"], self.issuer.live_refresh)
        self.assertEqual(saved["auth_mode"], "chatgpt")
        self.assertEqual(list(path.parent.glob(".auth.json.*.tmp")), [], "no temporary copy left")

    def test_a_login_that_could_not_be_saved_is_not_refreshed(self):
        from unittest import mock
        old = self.login(access=expired_access())
        folder, real = self.home, os.access
        read_only = lambda p, mode, *a, **k: False if Path(p) in (folder, folder / "tokens.json") else real(p, mode, *a, **k)
        with mock.patch("os.access", read_only):
            answer = self.post(BASIC)
            self.assertEqual(answer.status, 500, answer.body)
            self.assertEqual(answer.json()["error"]["message"],
                             "The login in %s needs a refresh, but neither the file nor its folder %s can be written, "
                             "so a refreshed login could not be saved and the proxy did not start one. Make it "
                             "writable and try again." % (folder / "tokens.json", folder))
            self.assertEqual(self.issuer.refresh_calls, 0, "the single-use refresh token was not spent")
            self.assertIn(old["refresh_token"], self.issuer.live_refresh)
            status = cp.login_status(self.config)
            self.assertIn("cannot be refreshed when it expires", " ".join(status["warnings"]))
        soon = make_jwt({"exp": int(time.time()) + 120, "https://api.openai.com/auth": AUTH_CLAIMS})
        self.fake.valid_tokens.add(soon)
        self.login(access=soon)
        with mock.patch("os.access", read_only):
            self.fake.reply(self.fake.turn().text("ok").completed())
            self.assertEqual(self.post(BASIC).status, 200, "a token still valid is used as it is")
        self.assertEqual(self.issuer.refresh_calls, 0)

    def test_a_login_file_readable_by_others_is_warned_about_and_refreshed_at_0600(self):
        path = self.home / "tokens.json"
        self.login(access=expired_access(), mode=0o644)
        lines = cp.login_lines(cp.AccountPool(self.config))
        self.assertIn("  Warning: The login file %s can be read by other users of this machine (mode 0644); run "
                      "`chmod 600 %s`." % (path, path), lines)
        self.fake.reply(self.fake.turn().text("ok").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, "the refresh wrote it back private")


FOLDER, UNREADABLE = object(), object()

# Login files broken the ways a crash, a hand edit or another tool leave them:
# (what, content, what the sentence says is wrong with the file).
BROKEN_LOGIN_FILES = [
    ("cut short", b'{"tokens": {"access_token": "at-123', "is not valid JSON (it ends too early)"),
    ("bad JSON", b'{"tokens": {"access_token": "at-1",, }}', "is not valid JSON (line 1)"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not text"),
    ("empty", b"", "is empty"),
    ("blank", b"\n  \n", "is empty"),
    ("not an object", b"[1, 2, 3]", "holds JSON that is not an object"),
    ("no tokens", b'{"last_refresh": "2026-11-01T00:00:00Z"}', 'has no "tokens" object'),
    ("tokens of the wrong type", b'{"tokens": ["at-1"]}', 'has no "tokens" object'),
    ("access token of the wrong type", b'{"tokens": {"access_token": 5}}', "has no access token (tokens.access_token is missing or not text)"),
    ("refresh token of the wrong type", b'{"tokens": {"access_token": "at-1", "refresh_token": []}}',
     "has a refresh token that is not text"),
    ("an API key", b'{"auth_mode": "apikey", "OPENAI_API_KEY": "sk-test"}', "holds an API-key login, not a ChatGPT one"),
    ("nested too deep", b"[" * 100000, "is nested too deeply to be a login"),
    ("a folder", FOLDER, "is a folder, not a file"),
    ("unreadable", UNREADABLE, "cannot be read by this user (permission denied)"),
]


class TestBrokenLoginFiles(unittest.TestCase):
    """A login file that holds no usable login is named, with what is wrong and the fix, by
    a request, `status` and `start`; none of them rewrites it (the user may repair it)."""

    def setUp(self):
        self.fake = FakeCodex().start()
        self.addCleanup(self.fake.stop)

    def place(self, path, content):
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FOLDER:
            path.mkdir()
        else:
            path.write_bytes(b'{"tokens": {"access_token": "at-1"}}' if content is UNREADABLE else content)

    def unreadable(self, path):
        """Reading ``path`` fails as for a file of another user (root reads everything, so this stands in)."""
        from unittest import mock
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real(self)
        return mock.patch.object(Path, "read_bytes", read_bytes)

    def ask(self, config):
        """(status, error message) of one request to a proxy on ``config``."""
        proxy = cp.ProxyServer(config)
        threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
            conn.request("POST", "/v1/messages", json.dumps(BASIC), {"x-api-key": PROXY_KEY,
                                                                    "Content-Type": "application/json"})
            response = conn.getresponse()
            doc = json.loads(response.read())
            conn.close()
            return response.status, (doc.get("error") or {}).get("message")
        finally:
            proxy.shutdown()
            proxy.server_close()
            proxy.codex.close_idle()

    def check_file(self, where, what, content, fault):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-login-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        config = make_config(home, self.fake.url)
        path = {"tokens.json": home / "tokens.json", "accounts": home / "accounts" / "work.json",
                "codex": config.codex_auth_path}[where]
        if where == "accounts":
            write_tokens(home / "tokens.json")
        self.place(path, content)
        before = path.read_bytes() if path.is_file() else None
        if where == "codex":
            sentence = ("The Codex CLI's login file %s %s. Run `python codex_proxy.py login` to sign in with ChatGPT "
                        "here (the proxy then keeps its own login and leaves that file as it is)." % (path, fault))
        else:
            sentence = "The login file %s %s. Repair it, or run `python codex_proxy.py login%s` to replace it." % (
                path, fault, " --account work" if where == "accounts" else "")
        with self.unreadable(path) if content is UNREADABLE else contextlib.nullcontext():
            self.fake.reply(self.fake.turn().text("served").completed())
            status, message = self.ask(config)
            if where == "accounts":   # the default login serves; the broken one is only listed
                self.assertEqual(status, 200)
            else:
                self.assertEqual((status, message), (401, sentence))
            entries = {e["account"]: e for e in cp.login_status(config)["accounts"]}
            broken = entries["work" if where == "accounts" else "default"]
            self.assertEqual((broken["broken"], broken["usable"]), (sentence, False))
            self.assertIn("not usable. " + sentence, "\n".join(cp.login_lines(cp.AccountPool(config))))
        self.assertEqual(path.read_bytes() if path.is_file() else None, before, "the file was not rewritten")

    def test_each_broken_login_file_is_named_with_its_fault(self):
        for where in ("tokens.json", "accounts", "codex"):
            for what, content, fault in BROKEN_LOGIN_FILES:
                with self.subTest(file=where, broken=what):
                    self.check_file(where, what, content, fault)


MSVCRT_STUB = '''"""Windows' msvcrt.locking, stood in for on POSIX so that codex_proxy's Windows lock
path runs here: byte-range locks (fcntl.lockf) like LockFile, LK_NBLCK failing at once."""
import fcntl as _fcntl
import os

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4


def note(what):
    log = os.environ.get("MSVCRT_STUB_LOG")
    if log:
        with open(log, "a") as f:
            f.write(what + "\\n")


def locking(fd, mode, nbytes):
    start = os.lseek(fd, 0, os.SEEK_CUR)
    if mode == LK_UNLCK:
        note("unlocked")
        return _fcntl.lockf(fd, _fcntl.LOCK_UN, nbytes, start)
    if mode == LK_NBLCK:
        try:
            _fcntl.lockf(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB, nbytes, start)
        except OSError:
            note("busy")
            raise PermissionError(13, "Permission denied")
        note("locked")
        return None
    raise ValueError("mode %d is not one codex_proxy uses" % mode)
'''
WINDOWS_LAUNCHER = '''import runpy, sys
sys.path.insert(0, sys.argv.pop(1))
import msvcrt                 # the stand-in, which keeps the real fcntl for itself
sys.modules["fcntl"] = None   # from here on `import fcntl` fails, as on Windows
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def windows_lock_kit(folder):
    """A folder with the msvcrt stand-in, and the command prefix that runs codex_proxy.py with it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "msvcrt.py").write_text(MSVCRT_STUB)
    (folder / "launch.py").write_text(WINDOWS_LAUNCHER)
    return [sys.executable, str(folder / "launch.py"), str(folder)]


class TestSharedLoginAcrossProcesses(unittest.TestCase):

    def run_two_processes(self, prefix, env_extra=None, hold_refresh_until=None):
        fake, issuer = FakeCodex().start(), None
        issuer = FakeIssuer(fake).start()
        issuer.refresh_delay = 0.5   # long enough that both processes want to refresh at once
        issuer.refresh_held_until = hold_refresh_until
        self.addCleanup(fake.stop)
        self.addCleanup(issuer.stop)
        root = Path(tempfile.mkdtemp(prefix="codex-proxy-shared-"))
        self.addCleanup(shutil.rmtree, str(root), True)
        tokens = issuer.mint()
        tokens["access_token"] = expired_access()
        cp.write_private_file(root / "codex" / "auth.json", json.dumps(
            {"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": dict(tokens, account_id=ACCOUNT_ID)}))
        fake.reply(*[fake.turn().text("ok").completed() for _ in range(40)])
        ports = []
        for n in range(2):
            env = dict(os.environ, CODEX_HOME=str(root / "codex"), CODEX_PROXY_HOME=str(root / ("proxy%d" % n)),
                       CODEX_PROXY_UPSTREAM=fake.url, CODEX_PROXY_ISSUER=issuer.url, CODEX_PROXY_API_KEY=PROXY_KEY,
                       **(env_extra or {}))
            process = subprocess.Popen(prefix(root) + [str(HERE / "codex_proxy.py"), "start", "--port", "0"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.addCleanup(stop_process, process)
            ports.append(int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", process.stdout.readline()).group(1)))
        statuses = []

        def call(port):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/messages", json.dumps(BASIC), {"x-api-key": PROXY_KEY,
                                                                     "Content-Type": "application/json"})
            statuses.append(conn.getresponse().status)
            conn.close()
        for _ in range(2):   # a burst at both processes, then both keep working
            threads = [threading.Thread(target=call, args=(port,)) for port in ports for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        self.assertEqual(statuses, [200] * 40)
        self.assertEqual(issuer.refresh_calls, 1, "two processes, one refresh")

    def test_two_proxy_processes_sharing_auth_json_refresh_once_and_keep_working(self):
        self.run_two_processes(lambda root: [sys.executable])

    def test_the_same_with_the_windows_lock(self):
        log = Path(tempfile.mkdtemp(prefix="codex-proxy-msvcrt-")) / "calls"
        self.addCleanup(shutil.rmtree, str(log.parent), True)
        busy = lambda: log.exists() and "busy" in log.read_text()   # the other process found the lock taken
        self.run_two_processes(lambda root: windows_lock_kit(root / "windows"), {"MSVCRT_STUB_LOG": str(log)}, busy)
        calls = collections.Counter(log.read_text().split())
        self.assertEqual(calls["locked"], calls["unlocked"], "every lock taken was released")
        self.assertGreaterEqual(calls["locked"], 2, "both processes locked through msvcrt.locking")
        self.assertGreaterEqual(calls["busy"], 1, "one waited for the other")
        report("windows lock: two processes, one refresh; msvcrt.locking %s" % dict(calls))


class TestWindowsPaths(unittest.TestCase):
    """The paths a Windows user reaches, forced here."""

    def test_without_fcntl_the_lock_is_msvcrt_and_excludes_another_process(self):
        folder = Path(tempfile.mkdtemp(prefix="codex-proxy-win-"))
        self.addCleanup(shutil.rmtree, str(folder), True)
        windows_lock_kit(folder)
        sys.path.insert(0, str(folder))
        saved = {name: sys.modules.get(name) for name in ("fcntl", "msvcrt")}
        try:
            import msvcrt
            sys.modules["fcntl"] = None
            self.assertEqual(cp.lock_kind(), "msvcrt")
            probe = ("import sys; sys.path.insert(0, %r); import msvcrt, os\n"
                     "fd = os.open(%r, os.O_RDWR)\n"
                     "try:\n    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1); print('locked')\n"
                     "except PermissionError:\n    print('refused')") % (str(folder), str(folder / "auth.json.lock"))
            with cp.FileLock(folder / "auth.json"):
                held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
            after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        finally:
            sys.path.remove(str(folder))
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        self.assertEqual((held.stdout.strip(), after.stdout.strip()), ("refused", "locked"), held.stderr + after.stderr)
        self.assertEqual(cp.lock_kind(), "fcntl")

    def test_doctor_on_windows_does_not_judge_file_modes(self):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-win-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        write_tokens(home / "tokens.json")
        (home / "tokens.json").chmod(0o666)
        lines = []
        config = make_config(home, "http://127.0.0.1:%d/backend-api/codex" % free_port())
        original = cp.WINDOWS
        cp.WINDOWS = True
        self.addCleanup(setattr, cp, "WINDOWS", original)
        cp.Doctor(config, say=lines.append).run()
        self.assertIn("\u2713 token file in your user folder (Windows protects it by the folder's permissions)", lines)
        self.assertFalse([l for l in lines if "chmod" in l])

    def test_a_file_another_program_has_open_is_replaced_after_a_moment(self):
        folder = Path(tempfile.mkdtemp(prefix="codex-proxy-win-"))
        self.addCleanup(shutil.rmtree, str(folder), True)
        real, failures = os.replace, []

        def busy_replace(source, target):
            if len(failures) < 3:   # what Windows says while Codex reads auth.json
                failures.append(target)
                raise PermissionError(13, "The process cannot access the file")
            return real(source, target)
        cp.os.replace = busy_replace
        try:
            cp.write_private_file(folder / "auth.json", "{}")
        finally:
            cp.os.replace = real
        self.assertEqual((folder / "auth.json").read_text(), "{}")
        self.assertEqual(len(failures), 3)


# ---------------------------------------------------------------------------
# Accounts: logins, usage windows, failover, the usage ledger
# ---------------------------------------------------------------------------

WORK_TOKEN, WORK_ACCOUNT = "at-work-" + "w" * 36, "acct-work-5678"


class AccountsCase(ProxyCase):
    """The default login plus a second one, "work", on another ChatGPT account."""

    def setUp(self):
        ProxyCase.setUp(self)
        self.fake.valid_tokens.add(WORK_TOKEN)
        self.fake.token_accounts[WORK_TOKEN] = WORK_ACCOUNT
        write_tokens(self.home / "accounts" / "work.json", access=WORK_TOKEN, account=WORK_ACCOUNT)
        self.addCleanup(lambda: (self.home / "accounts" / "work.json").unlink())
        pool = self.proxy.accounts
        pool._looked = -1.0   # look for account files now, not up to a second later
        pool.sticky.clear()
        pool.failovers = 0
        for account in pool.accounts():
            account.resting_until, account.quota = 0, None
        self.fake.usage_headers = {ACCOUNT_ID: {"x-codex-primary-used-percent": "10"},
                                   WORK_ACCOUNT: {"x-codex-primary-used-percent": "40"}}

    def accounts_used(self):
        return [r["headers"]["chatgpt-account-id"] for r in self.fake.requests]


@needs(anthropic, "anthropic SDK not installed (pip install anthropic)")
class TestAccountFailover(AccountsCase):
    """Several logins: conversations stick to one, new ones go where the headroom is,
    an exhausted login rests until its reset, and the client never sees its 429."""

    def test_50_conversations_fail_over_from_an_exhausted_account_without_a_429(self):
        self.fake.default = self.fake.turn().text("ok").completed()
        self.fake.limits = {ACCOUNT_ID: (40, 3600)}   # the default account runs out after 40 replies
        client = anthropic.Anthropic(api_key=PROXY_KEY, base_url=self.proxy.url, max_retries=0)
        conversations = {"conv-%02d" % n: [user("task %d" % n)] for n in range(50)}
        seen_429 = 0
        for turn in range(3):
            for session, messages in conversations.items():
                try:
                    reply = client.messages.create(model="claude-opus-4-8", max_tokens=1024, messages=messages,
                                                   system="You are Claude Code.", tools=[BASH_TOOL],
                                                   extra_headers={"X-Claude-Code-Session-Id": session})
                except anthropic.RateLimitError:
                    seen_429 += 1
                    continue
                messages += [{"role": "assistant", "content": reply.content[0].text}, user("next %d" % turn)]
        self.assertEqual(seen_429, 0)
        by_session = collections.defaultdict(list)
        for request in self.fake.requests:
            by_session[request["headers"]["session-id"]].append(request["headers"]["chatgpt-account-id"])
        self.assertEqual(len(by_session), 50)
        first_429 = next(n for n, r in enumerate(self.fake.requests)
                         if r["headers"]["chatgpt-account-id"] == ACCOUNT_ID
                         and sum(1 for q in self.fake.requests[:n + 1] if q["headers"]["chatgpt-account-id"] == ACCOUNT_ID) > 40)
        after = [r["headers"]["chatgpt-account-id"] for r in self.fake.requests[first_429 + 1:]]
        self.assertNotIn(ACCOUNT_ID, after, "the exhausted account got no request before its reset")
        for session, used in by_session.items():
            switches = [n for n in range(1, len(used)) if used[n] != used[n - 1]]
            self.assertLessEqual(len(switches), 1, session)
            if switches:   # it moved once: from the exhausted account, when it ran out
                self.assertEqual((used[switches[0] - 1], used[switches[0]]), (ACCOUNT_ID, WORK_ACCOUNT), session)
        self.assertEqual(by_session[self.fake.requests[0]["headers"]["session-id"]][0], ACCOUNT_ID,
                         "new conversations went to the account with the most headroom")
        counts = collections.Counter(self.accounts_used())
        report("accounts: 50 conversations x 3 turns; requests per account %s; %d failovers; "
               "429s seen by the client: %d" % ({"default": counts[ACCOUNT_ID], "work": counts[WORK_ACCOUNT]},
                                                self.proxy.accounts.failovers, seen_429))
        self.assertGreater(self.proxy.accounts.failovers, 0)


class TestAccounts(AccountsCase):
    """The accounts themselves: choice, refusal, reasoning bound to its account."""

    def test_new_conversations_go_to_the_most_headroom_and_stay(self):
        pool = cp.AccountPool(self.config)
        default, work = pool.get("default"), pool.get("work")
        pool.note_quota(default, {"windows": {"primary": {"used_percent": 85.0}}})
        pool.note_quota(work, {"windows": {"primary": {"used_percent": 30.0}, "secondary": {"used_percent": 50.0}}})
        self.assertEqual(pool.choose("conv-a").name, "work")
        pool.note_quota(work, {"windows": {"primary": {"used_percent": 95.0}}})
        self.assertEqual(pool.choose("conv-b").name, "default", "the freshest account now")
        self.assertEqual(pool.choose("conv-a").name, "work", "a conversation stays where it began")
        pool.rest(work, time.time() + 60)
        self.assertEqual(pool.choose("conv-a").name, "default", "until its account rests")
        pool.rest(default, time.time() + 30)
        self.assertIsNone(pool.choose("conv-c"))
        self.assertAlmostEqual(int(pool.exhausted_error().headers["retry-after"]), 30, delta=2)

    def test_an_exhausted_account_moves_the_turn_and_the_client_sees_no_429(self):
        self.fake.default = self.fake.turn().text("ok").completed()
        self.fake.limits = {ACCOUNT_ID: (0, 3600)}
        answer = self.post(BASIC)
        self.assertEqual((answer.status, answer.json()["content"][0]["text"]), (200, "ok"))
        self.assertEqual(self.accounts_used(), [ACCOUNT_ID, WORK_ACCOUNT])
        self.assertEqual(self.proxy.accounts.failovers, 1)
        self.assertEqual(self.post(dict(BASIC, messages=[user("another conversation")])).status, 200)
        self.assertEqual(self.accounts_used(), [ACCOUNT_ID, WORK_ACCOUNT, WORK_ACCOUNT], "the exhausted one rests")

    def test_when_every_account_is_exhausted_the_client_gets_the_earliest_reset(self):
        self.fake.default = self.fake.turn().text("ok").completed()
        self.fake.limits = {ACCOUNT_ID: (0, 7200), WORK_ACCOUNT: (0, 1800)}
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 429)
        self.assertIn("All 2 ChatGPT logins have reached their Codex usage limit", answer.json()["error"]["message"])
        self.assertAlmostEqual(int(answer.headers["retry-after"]), 1800, delta=5)
        tried = len(self.fake.requests)
        again = self.post(BASIC)
        self.assertEqual(again.status, 429)
        self.assertEqual(len(self.fake.requests), tried, "resting accounts get no request before their reset")

    def test_a_refused_login_moves_the_turn_to_the_other_account(self):
        self.fake.valid_tokens.discard(ACCESS_TOKEN)
        self.addCleanup(self.fake.valid_tokens.add, ACCESS_TOKEN)
        self.fake.reply(self.fake.turn().text("from work").completed())
        answer = self.post(BASIC)
        self.assertEqual(answer.json()["content"][0]["text"], "from work")
        self.assertEqual(self.accounts_used()[-1], WORK_ACCOUNT)

    def test_reasoning_from_one_account_is_not_sent_to_another(self):
        self.fake.reply(self.fake.turn().reasoning(["think"]).text("a").completed())
        first = self.post(dict(BASIC, thinking={"type": "adaptive"})).json()
        thinking = first["content"][0]
        self.assertTrue(thinking["signature"].startswith("cxp1:gpt-5.5@"))
        self.assertEqual(self.accounts_used(), [ACCOUNT_ID])
        history = [user("hi"), {"role": "assistant", "content": first["content"]}, user("more")]
        work = self.proxy.accounts.get("work")
        codex, _ = cp.translate_request(dict(BASIC, messages=history, thinking={"type": "adaptive"}), {},
                                        self.config, account=work)
        self.assertNotIn("reasoning", [i["type"] for i in codex["input"]])
        codex, _ = cp.translate_request(dict(BASIC, messages=history, thinking={"type": "adaptive"}), {},
                                        self.config, account=self.proxy.accounts.default)
        self.assertIn("reasoning", [i["type"] for i in codex["input"]])

    def test_status_lists_every_account(self):
        env = dict(os.environ, CODEX_PROXY_HOME=str(self.home), CODEX_HOME=str(self.home / "codex-home"))
        result = subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        status = json.loads(result.stdout)
        self.assertEqual([a["account"] for a in status["accounts"]], ["default", "work"])
        self.assertEqual(status["accounts"][1]["account_id"], WORK_ACCOUNT)
        text = subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "status"], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        self.assertIn("Account work:", text)

    def test_the_codex_login_joins_once_when_it_is_another_account(self):
        pool = cp.AccountPool(self.config)
        self.assertEqual([a.name for a in pool.accounts()], ["default", "work"])
        write_tokens(self.config.codex_auth_path, access=WORK_TOKEN, account=WORK_ACCOUNT)
        self.addCleanup(self.config.codex_auth_path.unlink)
        self.assertEqual([a.name for a in cp.AccountPool(self.config).accounts()], ["default", "work"],
                         "the same account as work: counted once")
        write_tokens(self.config.codex_auth_path, access="at-codex-" + "c" * 30, account="acct-codex")
        self.assertEqual([a.name for a in cp.AccountPool(self.config).accounts()], ["default", "work", "codex"])


class TestAccountInTheLog(AccountsCase):

    def test_the_request_log_names_the_account(self):
        path = self.home / "requests.jsonl"
        self.config.log_file, self.proxy.log_file = str(path), open(str(path), "a", encoding="utf-8")
        self.addCleanup(setattr, self.config, "log_file", None)
        self.addCleanup(setattr, self.proxy, "log_file", None)
        self.addCleanup(self.proxy.log_file.close)
        self.proxy.accounts.rest(self.proxy.accounts.default, time.time() + 60)
        self.fake.reply(self.fake.turn().text("ok").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        wait_until(path.read_text, what="the log line")   # written just after the reply went out
        record = json.loads(path.read_text().splitlines()[-1])
        self.assertEqual(record["account"], "work")


class TestUsageLedger(ProxyCase):
    """`usage`: tokens per day and model from a ledger with no content."""

    def test_usage_prints_a_table_from_the_ledger_the_proxy_wrote(self):
        ledger = self.home / "usage.jsonl"
        if ledger.exists():
            ledger.unlink()
        self.fake.reply(self.fake.turn().text("secret answer").completed(input_tokens=1000, cached=600, output_tokens=50),
                        self.fake.turn().text("more").completed(input_tokens=1200, cached=900, output_tokens=70),
                        self.fake.turn("gpt-6-luna").text("small").completed(input_tokens=300, output_tokens=20))
        for body in (BASIC, BASIC, dict(BASIC, model="claude-haiku-4-5")):
            self.assertEqual(self.post(body).status, 200)
        wait_until(lambda: len(ledger.read_text().splitlines()) >= 3, what="three ledger lines")
        lines = [json.loads(l) for l in ledger.read_text().splitlines()]
        self.assertEqual([(l["model"], l["input"], l["cached"], l["output"]) for l in lines],
                         [("gpt-5.5", 1000, 600, 50), ("gpt-5.5", 1200, 900, 70), ("gpt-6-luna", 300, 0, 20)])
        self.assertNotIn("secret", ledger.read_text())
        self.assertEqual(stat.S_IMODE(ledger.stat().st_mode), 0o600)
        env = dict(os.environ, CODEX_PROXY_HOME=str(self.home), CODEX_HOME=str(self.home / "codex-home"))
        out = subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "usage"], env=env,
                             capture_output=True, text=True, timeout=60).stdout
        day = time.strftime("%Y-%m-%d", time.gmtime())
        self.assertRegex(out, r"%s\s+gpt-6-luna\s+1\s+300\s+0\s+20" % day)
        self.assertRegex(out, r"%s\s+gpt-5\.5\s+2\s+2200\s+1500\s+120" % day)
        self.assertRegex(out, r"total\s+3\s+2500\s+1500\s+140")
        self.assertIn("Account default", out)
        doc = json.loads(subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "usage", "--json"], env=env,
                                        capture_output=True, text=True, timeout=60).stdout)
        self.assertEqual(sum(d["requests"] for d in doc["days"]), 3)


USAGE_HEADERS = {"x-codex-plan-type": "plus", "x-codex-primary-used-percent": "45",
                 "x-codex-primary-window-minutes": "300", "x-codex-primary-reset-at": "1900000000",
                 "x-codex-secondary-used-percent": "82", "x-codex-secondary-window-minutes": "10080",
                 "x-codex-secondary-reset-after-seconds": "316705"}


class TestQuota(ProxyCase):

    def test_usage_windows_become_anthropic_unified_headers(self):
        events = self.fake.turn().text("ok").completed()
        self.fake.reply(Reply(events=events, headers=USAGE_HEADERS), Reply(events=events, headers=USAGE_HEADERS))
        for stream in (True, False):
            answer = self.post(dict(BASIC, stream=stream))
            self.assertEqual(answer.status, 200)
            headers = answer.headers
            self.assertEqual(headers["anthropic-ratelimit-unified-5h-utilization"], "0.45")
            self.assertEqual(headers["anthropic-ratelimit-unified-5h-reset"], "1900000000")
            self.assertEqual(headers["anthropic-ratelimit-unified-5h-status"], "allowed")
            self.assertEqual(headers["anthropic-ratelimit-unified-7d-utilization"], "0.82")
            self.assertEqual(headers["anthropic-ratelimit-unified-7d-status"], "allowed_warning")
            self.assertEqual(headers["anthropic-ratelimit-unified-status"], "allowed_warning")
            self.assertEqual(headers["anthropic-ratelimit-unified-representative-claim"], "seven_day")
            self.assertAlmostEqual(int(headers["anthropic-ratelimit-unified-7d-reset"]), time.time() + 316705, delta=60)

    def test_a_429_carries_retry_after_and_rejected_status(self):
        recorded = json.loads(fixture("responses", "chatgpt_codex_usage_limit_reached_plus_2026-05-04.json").read_text())
        self.fake.reply(Reply(status=429, body={"error": recorded["error"]}, headers=recorded["headers"]))
        answer = self.post(BASIC)
        self.assertEqual((answer.status, answer.headers["retry-after"]), (429, "13872"))
        self.assertEqual(answer.headers["anthropic-ratelimit-unified-status"], "rejected")
        self.assertEqual(answer.headers["anthropic-ratelimit-unified-5h-reset"], "1777936568")

    def test_status_shows_the_windows_the_backend_sent_and_live_asks_again(self):
        from unittest import mock
        self.proxy.accounts._quota_saved = 0
        self.fake.reply(Reply(events=self.fake.turn().text("ok").completed(), headers=USAGE_HEADERS))
        self.assertEqual(self.post(BASIC).status, 200)
        wait_until((self.home / "quota.json").exists, what="quota.json")   # saved just after the reply
        env = {"CODEX_PROXY_HOME": str(self.home), "CODEX_HOME": str(self.home / "codex-home"),
               "CODEX_PROXY_UPSTREAM": self.fake.url}
        with mock.patch.dict(os.environ, env):
            code, out, _ = CliRun(self, ["status", "--json"]).result()
            self.assertEqual(code, 0)
            windows = json.loads(out)["quota"]["windows"]
            self.assertEqual((windows["primary"]["used_percent"], windows["primary"]["window_minutes"],
                              windows["primary"]["resets_at"]), (45.0, 300.0, 1900000000))
            self.assertEqual(windows["secondary"]["used_percent"], 82.0)
            code, text, _ = CliRun(self, ["status"]).result()
            self.assertIn("Usage, 5h window: 45% used", text)
            self.assertIn("Usage, 7d window: 82% used, resets in 3 d 15 h", text)
            self.fake.usage = {"plan_type": "plus", "rate_limit": {"allowed": True, "limit_reached": False,
                               "primary_window": {"used_percent": 12, "limit_window_seconds": 18000, "reset_after_seconds": 600},
                               "secondary_window": {"used_percent": 30, "limit_window_seconds": 604800, "reset_at": 1900500000}}}
            code, out, _ = CliRun(self, ["status", "--live", "--json"]).result()
        windows = json.loads(out)["quota"]["windows"]
        self.assertEqual((windows["primary"]["used_percent"], windows["primary"]["window_minutes"]), (12.0, 300))
        self.assertEqual(windows["secondary"]["resets_at"], 1900500000)
        self.assertIn("/backend-api/wham/usage", self.fake.gets)


# ---------------------------------------------------------------------------
# Request translation (pure functions), the compatibility table, learned downgrades
# ---------------------------------------------------------------------------

class TestRequestTranslation(unittest.TestCase):

    def test_required_fields_always_present_and_rejected_fields_never(self):
        body = dict(BASIC, temperature=0.2, top_p=0.9, top_k=5, metadata={"user_id": "u"},
                    stop_sequences=["END"], max_tokens=64000, service_tier="auto",
                    context_management={"edits": []}, speed="fast")
        codex, _ = translate(body)
        self.assertIs(codex["store"], False)
        self.assertIs(codex["stream"], True)
        self.assertEqual(codex["include"], ["reasoning.encrypted_content"])
        self.assertEqual(codex["instructions"], "")
        self.assertIsInstance(codex["input"], list)
        for key in ("tool_choice", "parallel_tool_calls", "reasoning", "prompt_cache_key"):
            self.assertIn(key, codex)
        for key in FORBIDDEN_FIELDS:
            self.assertNotIn(key, codex)
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_billing_header_dropped_and_system_becomes_developer_message(self):
        body = dict(BASIC, system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.331.471; cc_entrypoint=sdk-cli;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Main prompt."}])
        codex, _ = translate(body)
        self.assertEqual(codex["input"][0], {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "You are a Claude agent."}, {"type": "input_text", "text": "Main prompt."}]})
        self.assertNotIn("billing-header", json.dumps(codex))
        self.assertEqual(translate(dict(BASIC, system="Be brief."))[0]["input"][0]["content"],
                         [{"type": "input_text", "text": "Be brief."}])

    def test_system_role_messages_become_developer_messages_in_place(self):
        body = dict(BASIC, messages=[user("one"), {"role": "system", "content": "env info",
                                                   "output_config": {"effort": "high"}},
                                     {"role": "system", "content": []}, user("two")])
        codex, _ = translate(body)
        self.assertEqual([(i["role"], i["content"][0]["text"]) for i in codex["input"]],
                         [("user", "one"), ("developer", "env info"), ("user", "two")])
        self.assertEqual(codex["reasoning"]["effort"], "high", "per-message output_config.effort counts")

    def test_string_content_equals_text_block(self):
        a, _ = translate(dict(BASIC, messages=[user("hello")]))
        b, _ = translate(dict(BASIC, messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}]))
        self.assertEqual(a["input"], b["input"])

    def test_images_documents_and_text_documents(self):
        content = [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
            {"type": "document", "title": "spec.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
            {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "n1"}},
            {"type": "text", "text": "describe"}]
        codex, _ = translate(dict(BASIC, messages=[{"role": "user", "content": content}]))
        self.assertEqual(codex["input"][0]["content"], [
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0K", "detail": "auto"},
            {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"},
            {"type": "input_file", "filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"},
            {"type": "input_text", "text": "Notes\n\nn1"},
            {"type": "input_text", "text": "describe"}])

    def test_tool_use_and_tool_result_become_function_call_items(self):
        body = claude_code_body("03-tool-turn2-request.json")
        codex, _ = translate(body)
        kinds = [(i["type"], i.get("role")) for i in codex["input"]]
        self.assertEqual(kinds[-3:], [("message", "assistant"), ("function_call", None), ("function_call_output", None)])
        call, output = codex["input"][-2], codex["input"][-1]
        self.assertEqual(call, {"type": "function_call", "call_id": "toolu_capture_002", "name": "Bash",
                                "arguments": json.dumps({"command": "echo hello-from-tool",
                                                         "description": "Echo a marker string"},
                                                        separators=(",", ":"))})
        self.assertEqual(output, {"type": "function_call_output", "call_id": "toolu_capture_002",
                                  "output": "hello-from-tool"})
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_tool_result_error_and_images_reach_the_model(self):
        tail = json.loads(fixture("claude-code", "20-tool-error-result.json").read_text())["messages_tail"]
        codex, _ = translate(dict(BASIC, messages=[user("go")] + tail))
        self.assertEqual(codex["input"][-1]["output"],
                         "[tool error]\nExit code 3\nls: cannot access '/nonexistent-dir': No such file or directory\nto-stdout")
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
        codex, _ = translate(dict(BASIC, messages=[
            user("go"), {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Shot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "screen:"}, image]}]}]))
        self.assertEqual(codex["input"][-1]["output"], [
            {"type": "input_text", "text": "screen:"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}])

    def test_parallel_tool_results_in_any_order_pair_by_call_id(self):
        tail = json.loads(fixture("claude-code", "21-parallel-tools-permission-denied.json").read_text())["messages_tail"]
        codex, _ = translate(dict(BASIC, messages=[user("go")] + tail))
        calls = [i["call_id"] for i in codex["input"] if i["type"] == "function_call"]
        outputs = [i["call_id"] for i in codex["input"] if i["type"] == "function_call_output"]
        self.assertEqual(sorted(calls), sorted(outputs))
        self.assertEqual(outputs, ["toolu_capture_002_1", "toolu_capture_002_0", "toolu_capture_002_2"])
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_tool_reference_and_unknown_blocks_become_short_text(self):
        tail = json.loads(fixture("claude-code", "32-toolsearch-tool-reference.json").read_text())["messages_tail"]
        codex, _ = translate(dict(BASIC, messages=[user("go")] + tail + [
            {"role": "assistant", "content": [{"type": "mystery_block", "x": 1}]},
            {"role": "user", "content": [{"type": "mystery_block", "y": 2}]}]))
        self.assertEqual(codex["input"][3]["output"], "Tool loaded: WebFetch\nTool loaded: NotebookEdit")
        self.assertEqual(codex["input"][4]["content"], [{"type": "input_text", "text": "Tool loaded."}])
        self.assertEqual(codex["input"][5]["content"][0]["text"], '[mystery_block block: {"x": 1}]')
        self.assertEqual(codex["input"][6]["content"][0]["text"], '[mystery_block block: {"y": 2}]')
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_orphan_tool_output_and_missing_output_are_repaired(self):
        body = dict(BASIC, messages=[
            user("start"),
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "gone", "content": "old result"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "Bash", "input": {}},
                                              {"type": "tool_use", "id": "b", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "A"},
                                         {"type": "tool_result", "tool_use_id": "a", "content": "again"},
                                         {"type": "text", "text": "next"}]}])
        codex, _ = translate(body)
        self.assertIsNone(codex_request_problem(codex, set()))
        summary = [(i["type"], i.get("call_id"), i.get("output") if i["type"] != "message" else i["content"][-1]["text"])
                   for i in codex["input"]]
        self.assertEqual(summary, [
            ("message", None, "start"),
            ("message", None, "old result"),
            ("function_call", "a", None), ("function_call", "b", None),
            ("function_call_output", "b", cp.MISSING_OUTPUT),
            ("function_call_output", "a", "A"),
            ("message", None, "next")])

    def test_tools_become_functions_without_client_only_fields(self):
        tools = [dict(BASH_TOOL, cache_control={"type": "ephemeral"}, eager_input_streaming=True),
                 {"name": "DeferredToolPlaceholder", "description": "d", "defer_loading": True,
                  "input_schema": {"type": "object"}},
                 {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"}]
        codex, _ = translate(dict(BASIC, tools=tools))
        self.assertEqual(codex["tools"], [
            {"type": "function", "name": "Bash", "description": "Run a command", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
            {"type": "function", "name": "DeferredToolPlaceholder", "description": "d", "strict": False,
             "parameters": {"type": "object", "properties": {}}}])
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_tool_choice_and_parallel_flag(self):
        tools = [BASH_TOOL]
        cases = [(None, "auto", True), ({"type": "auto"}, "auto", True), ({"type": "any"}, "required", True),
                 ({"type": "tool", "name": "Bash"}, {"type": "function", "name": "Bash"}, True),
                 ({"type": "none"}, "none", True),
                 ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False)]
        for choice, expected, parallel in cases:
            codex, _ = translate(dict(BASIC, tools=tools, tool_choice=choice))
            self.assertEqual((codex["tool_choice"], codex["parallel_tool_calls"]), (expected, parallel), choice)
        codex, _ = translate(dict(BASIC, tools=[], tool_choice={"type": "any"}))
        self.assertEqual((codex["tool_choice"], codex["parallel_tool_calls"]), ("auto", False))

    def test_effort_from_output_config_budget_and_thinking_type(self):
        cases = [({}, "medium"), ({"output_config": {"effort": "low"}}, "low"),
                 ({"output_config": {"effort": "max"}}, "xhigh"),
                 ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "low"),
                 ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
                 ({"thinking": {"type": "enabled", "budget_tokens": 31999}}, "high"),
                 ({"thinking": {"type": "enabled", "budget_tokens": 64000}}, "xhigh"),
                 ({"thinking": {"type": "adaptive"}}, "medium"),
                 ({"thinking": {"type": "disabled"}}, "low"),
                 ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, "high")]
        for extra, effort in cases:
            codex, _ = translate(dict(BASIC, **extra))
            self.assertEqual(codex["reasoning"]["effort"], effort, extra)

    def test_reasoning_summary_only_when_thinking_is_shown(self):
        for thinking, summary, emits in [({"type": "adaptive", "display": "updates"}, "auto", True),
                                         ({"type": "enabled", "budget_tokens": 5000}, "auto", True),
                                         ({"type": "adaptive", "display": "omitted"}, None, True),
                                         ({"type": "disabled"}, None, False), (None, None, False)]:
            codex, context = translate(dict(BASIC, thinking=thinking) if thinking else BASIC)
            self.assertEqual(codex["reasoning"].get("summary"), summary, thinking)
            self.assertEqual(context.thinking, emits, thinking)

    def test_model_mapping_and_effort_suffix(self):
        cases = [("claude-opus-5-5", "gpt-5.5", "medium"), ("claude-sonnet-4-5-20250929", "gpt-5.5", "medium"),
                 ("claude-haiku-5-5", "gpt-6-luna", "medium"), ("gpt-5.4", "gpt-5.4", "medium"),
                 ("claude-fable-5-1", "gpt-5.5", "medium"), ("claude-mythos-5-1", "gpt-5.5", "medium"),
                 ("default", "gpt-5.5", "medium"), ("claude-next-family-9", "gpt-5.5", "medium"),
                 ("opusplan", "gpt-5.5", "medium"),
                 ("gpt-5.5:high", "gpt-5.5", "high"), ("claude-opus-4-8[1m]", "gpt-5.5", "medium"),
                 ("claude-opus-4-8:xhigh", "gpt-5.5", "xhigh"), ("weird:model", "weird:model", "medium")]
        for requested, model, effort in cases:
            codex, context = translate(dict(BASIC, model=requested))
            self.assertEqual((codex["model"], codex["reasoning"]["effort"]), (model, effort), requested)
            self.assertEqual(context.requested_model, requested)
        codex, _ = translate(dict(BASIC, model="claude-haiku-5-5"),
                             models={"opus": "gpt-5.5", "sonnet": "gpt-5.4", "haiku": "gpt-5.4:low"})
        self.assertEqual((codex["model"], codex["reasoning"]["effort"]), ("gpt-5.4", "low"))

    def test_prompt_cache_key_sources(self):
        header = {"X-Claude-Code-Session-Id": "fa4f4945-9578-45b6-9a4b-c524c70d264e"}
        self.assertEqual(translate(BASIC, header)[0]["prompt_cache_key"], "fa4f4945-9578-45b6-9a4b-c524c70d264e")
        body = claude_code_body("01-p-text-request.json")
        self.assertEqual(translate(body)[0]["prompt_cache_key"], "fa4f4945-9578-45b6-9a4b-c524c70d264e")
        old = dict(BASIC, metadata={"user_id": "user_abc_account_x_session_0f0e0d0c-aaaa-bbbb-cccc-111122223333"})
        self.assertEqual(translate(old)[0]["prompt_cache_key"], "0f0e0d0c-aaaa-bbbb-cccc-111122223333")
        agent = translate(BASIC, dict(header, **{"X-Claude-Code-Agent-Id": "a69657"}))[0]["prompt_cache_key"]
        self.assertNotEqual(agent, header["X-Claude-Code-Session-Id"])
        self.assertEqual(agent, translate(BASIC, dict(header, **{"X-Claude-Code-Agent-Id": "a69657"}))[0]["prompt_cache_key"])
        hashed = translate(BASIC)[0]["prompt_cache_key"]
        self.assertEqual(hashed, translate(dict(BASIC, messages=[user("hi"), {"role": "assistant", "content": "x"},
                                                                 user("more")]))[0]["prompt_cache_key"])
        self.assertNotEqual(hashed, translate(dict(BASIC, messages=[user("other")]))[0]["prompt_cache_key"])

    def test_structured_output_becomes_text_format(self):
        schema = {"type": "object", "properties": {"title": {"type": "string"}}}
        codex, _ = translate(dict(BASIC, output_config={"format": {"type": "json_schema", "schema": schema}}))
        self.assertEqual(codex["text"], {"format": {"type": "json_schema", "name": "output", "schema": schema,
                                                    "strict": False}})

    def test_invalid_bodies_name_the_field(self):
        cases = [([], "JSON object"), ({"messages": []}, "model: field required"),
                 ({"model": "m"}, "messages: field required"), ({"model": "m", "messages": "hi"}, "messages: must be a list"),
                 ({"model": "m", "messages": [3]}, "messages.0: must be an object"),
                 ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                 ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
                 ({"model": "m", "messages": [], "tools": {}}, "tools: must be a list")]
        for body, words in cases:
            with self.assertRaises(cp.ProxyError) as caught:
                translate(body)
            self.assertEqual((caught.exception.status, caught.exception.error_type), (400, "invalid_request_error"))
            self.assertIn(words, caught.exception.message)

    def test_real_claude_code_requests_translate_and_pass_the_strict_backend(self):
        names = sorted(p.name for p in fixture("claude-code").glob("*-request.json"))
        self.assertGreaterEqual(len(names), 12)
        for name in names:
            body = claude_code_body(name)
            if not isinstance(body, dict) or "messages" not in body:
                continue
            with self.subTest(fixture=name):
                codex, context = translate(body)
                self.assertIsNone(codex_request_problem(codex, set(), context.lite), name)
                self.assertNotIn("x-anthropic-billing-header", json.dumps(codex))
                self.assertEqual(context.requested_model, body["model"])


class TestToolNames(unittest.TestCase):

    def test_long_and_invalid_tool_names_are_shortened_and_mapped_back(self):
        long_name = "mcp__a_very_long_server_name_for_testing__" + "and_a_tool_name_that_goes_on" * 2
        odd_name = "my.tool/with spaces"
        tools = [dict(BASH_TOOL, name=long_name), dict(BASH_TOOL, name=odd_name), BASH_TOOL]
        codex, context = translate(dict(BASIC, tools=tools))
        sent = [t["name"] for t in codex["tools"]]
        self.assertEqual(sent[2], "Bash")
        for name in sent:
            self.assertRegex(name, r"^[a-zA-Z0-9_-]{1,64}$")
        self.assertTrue(sent[0].startswith("mcp__a_very_long_se"), sent[0])
        self.assertTrue(sent[0].endswith("tool_name_that_goes_on"), sent[0])
        self.assertEqual(sent, [t["name"] for t in translate(dict(BASIC, tools=tools))[0]["tools"]], "stable")
        turn = Turn().tool_call(sent[0], {"command": "ls"}).tool_call(sent[1], {"command": "pwd"})
        events, message = translate_events(self, turn.completed(), context)
        self.assertEqual([b["name"] for b in message["content"]], [long_name, odd_name])
        history = dict(BASIC, tools=tools, messages=[user("go"), {"role": "assistant", "content": message["content"]},
                                                     {"role": "user", "content": [
                                                         {"type": "tool_result", "tool_use_id": b["id"], "content": "ok"}
                                                         for b in message["content"]]}])
        codex, _ = translate(history)
        self.assertEqual([i["name"] for i in codex["input"] if i["type"] == "function_call"], sent[:2])
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_odd_tool_use_ids_are_made_valid_consistently(self):
        bad = "toolu:with/odd chars"
        codex, _ = translate(dict(BASIC, messages=[
            user("x"), {"role": "assistant", "content": [{"type": "tool_use", "id": bad, "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": bad, "content": "ok"}]}]))
        call, output = codex["input"][1], codex["input"][2]
        self.assertEqual(call["call_id"], output["call_id"])
        self.assertRegex(call["call_id"], r"^[a-zA-Z0-9_-]{1,64}$")


# Claude Code's tool search, as 2.1.331 sends it (fixture 32): ToolSearch, a placeholder that keeps
# deferral on, and the tools it loads joining `tools` with defer_loading once a search names them.
TOOL_SEARCH_TOOL = {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools.",
                    "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                                     "properties": {"query": {"type": "string"}, "max_results": {"type": "number"}},
                                     "required": ["query", "max_results"], "additionalProperties": False}}
PLACEHOLDER_TOOL = {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder that keeps deferred tool "
                    "loading active; never call this tool.", "input_schema": {"type": "object", "properties": {}},
                    "defer_loading": True}
WEBFETCH_TOOL = {"name": "WebFetch", "description": "Fetch a URL and read the page.", "defer_loading": True,
                 "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}
SEARCH_CALL = {"type": "tool_use", "id": "toolu_search", "name": "ToolSearch",
               "input": {"query": "select:WebFetch", "max_results": 5}}
SEARCH_RESULT = {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "toolu_search", "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]},
    {"type": "text", "text": "Tool loaded.", "cache_control": {"type": "ephemeral"}}]}
FETCH_CALL = {"type": "tool_use", "id": "toolu_fetch", "name": "WebFetch", "input": {"url": "https://example.com"}}


def searching_session():
    """Three requests of one conversation: before the search, after it (WebFetch loaded), after the fetch."""
    first = dict(BASIC, tools=[BASH_TOOL, TOOL_SEARCH_TOOL, PLACEHOLDER_TOOL], messages=[user("read example.com")])
    loaded = dict(first, tools=[BASH_TOOL, TOOL_SEARCH_TOOL, WEBFETCH_TOOL, PLACEHOLDER_TOOL], messages=first["messages"] + [
        {"role": "assistant", "content": [SEARCH_CALL]}, SEARCH_RESULT])
    fetched = dict(loaded, messages=loaded["messages"] + [{"role": "assistant", "content": [FETCH_CALL]}, {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_fetch", "content": "Example Domain"}]}])
    return first, loaded, fetched


def keeps_prefix(test, before, after):
    """``after`` repeats ``before`` as the backend's cache needs it: same tools, input a prefix."""
    test.assertEqual(cp.json_bytes(after.get("tools")), cp.json_bytes(before.get("tools")), "the tools stay the same")
    test.assertEqual(cp.json_bytes(after["input"][:len(before["input"])]), cp.json_bytes(before["input"]))


class TestToolLoadsKeepThePrefix(ProxyCase):
    """Claude Code's deferred tools load through Codex's client-executed tool search: the tools
    sent stay the same all along and a loaded tool arrives as an item at the point of its load,
    so the prompt before it stays cached (issue 17). A backend without it gets plain tools."""

    def test_a_tool_load_keeps_the_tools_and_every_earlier_item(self):
        first, loaded, fetched = [translate(body)[0] for body in searching_session()]
        keeps_prefix(self, first, loaded)
        keeps_prefix(self, loaded, fetched)
        self.assertEqual([t.get("name", t["type"]) for t in first["tools"]], ["Bash", "tool_search"])
        self.assertEqual(first["tools"][1], {"type": "tool_search", "execution": "client", "description":
                                             TOOL_SEARCH_TOOL["description"], "parameters": {
            "type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "number"}},
            "required": ["query", "max_results"], "additionalProperties": False}})
        call, output, note = loaded["input"][1:]
        self.assertEqual(call, {"type": "tool_search_call", "call_id": "toolu_search", "status": "completed",
                                "execution": "client", "arguments": {"query": "select:WebFetch", "max_results": 5}})
        self.assertEqual(output, {"type": "tool_search_output", "call_id": "toolu_search", "status": "completed",
                                  "execution": "client", "tools": [{"type": "namespace", "name": "functions",
                                                                    "description": "", "tools": [{
            "type": "function", "name": "WebFetch", "description": "Fetch a URL and read the page.",
            "parameters": WEBFETCH_TOOL["input_schema"], "strict": False, "defer_loading": True}]}]})
        self.assertEqual(note["content"], [{"type": "input_text", "text": "Tool loaded."}])
        self.assertEqual(fetched["input"][4], {"type": "function_call", "call_id": "toolu_fetch", "name": "WebFetch",
                                               "arguments": '{"url":"https://example.com"}', "namespace": "functions"})
        for body in (first, loaded, fetched):
            self.assertIsNone(codex_request_problem(body, set()))

    def test_the_models_search_reaches_the_client_as_its_search_tool(self):
        first, loaded, fetched = searching_session()
        for stream in (False, True):
            self.fake.reply(self.fake.turn().tool_search({"query": "select:WebFetch", "max_results": 5},
                                                         call_id="call_s1").completed())
            answer = self.stream(first) if stream else self.post(first).json()
            message = cp.fold_message(answer) if stream else answer
            self.assertEqual((message["stop_reason"], message["content"]), ("tool_use", [
                {"type": "tool_use", "id": "call_s1", "name": "ToolSearch",
                 "input": {"query": "select:WebFetch", "max_results": 5}}]))

    def test_a_loaded_tool_is_called_and_sent_back_in_the_namespace_it_came_in(self):
        first, loaded, fetched = searching_session()
        self.fake.reply(self.fake.turn().tool_call("WebFetch", {"url": "https://example.com"}, call_id="toolu_fetch",
                                                   namespace="functions").completed(),
                        self.fake.turn().text("It says Example Domain.").completed())
        call = self.post(loaded).json()["content"][0]
        self.assertEqual((call["name"], call["input"]), ("WebFetch", {"url": "https://example.com"}))
        self.assertEqual(self.post(fetched).status, 200, self.fake.refused)
        keeps_prefix(self, self.fake.requests[0]["body"], self.sent())

    def test_a_tool_addition_loads_the_tool_where_it_is_added(self):
        first = dict(BASIC, tools=[BASH_TOOL, TOOL_SEARCH_TOOL, PLACEHOLDER_TOOL, WEBFETCH_TOOL],
                     messages=[user("go"), {"role": "assistant", "content": "ok"}])
        added = dict(first, messages=first["messages"] + [{"role": "system", "content": [
            {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "WebFetch"}}]}, user("fetch it")])
        before, after = translate(first)[0], translate(added)[0]
        keeps_prefix(self, before, after)
        self.assertEqual([i["type"] for i in after["input"][len(before["input"]):]],
                         ["message", "tool_search_call", "tool_search_output", "message"])
        self.assertEqual(cp.loaded_names(after["input"][-2]), ["WebFetch"])
        self.assertIsNone(codex_request_problem(after, set()))

    def test_responses_lite_takes_the_tool_search_beside_its_namespace(self):
        bodies = [dict(body, model="gpt-5.6-sol") for body in searching_session()]
        codex = [translate(body)[0] for body in bodies]
        self.assertEqual([t["type"] for t in codex[0]["input"][0]["tools"]], ["namespace", "tool_search"])
        for before, after in zip(codex, codex[1:]):
            self.assertEqual(cp.json_bytes(after["input"][:len(before["input"])]), cp.json_bytes(before["input"]))
        for body in codex:
            self.assertIsNone(codex_request_problem(body, set(), lite=True))

    def test_a_search_cut_from_the_history_leaves_no_orphan(self):
        first, loaded, fetched = searching_session()
        no_result = dict(loaded, messages=loaded["messages"][:-1] + [user("never mind")])
        codex = translate(no_result)[0]
        self.assertEqual(codex["input"][2], {"type": "tool_search_output", "call_id": "toolu_search",
                                             "status": "completed", "execution": "client", "tools": []})
        orphan = dict(loaded, messages=[user("read example.com"), SEARCH_RESULT])
        codex = translate(orphan)[0]
        self.assertEqual(codex["input"][1]["content"][0]["text"], "Result of an earlier tool call (toolu_search):")
        for body in (translate(no_result)[0], codex):
            self.assertIsNone(codex_request_problem(body, set()))

    def test_without_a_search_tool_deferred_tools_are_offered_from_the_start(self):
        codex = translate(dict(BASIC, tools=[BASH_TOOL, WEBFETCH_TOOL]))[0]
        self.assertEqual([t["name"] for t in codex["tools"]], ["Bash", "WebFetch"])
        self.assertNotIn("defer_loading", json.dumps(codex["tools"]))

    def test_a_recorded_claude_code_search_keeps_the_prefix(self):
        body = claude_code_body("02-tool-turn1-request.json")
        tail = json.loads(fixture("claude-code", "32-toolsearch-tool-reference.json").read_text())
        tools = list(body["tools"])
        for name in ("NotebookEdit", "WebFetch"):   # where 2.1.331 puts them: in its sorted order
            at = [t["name"] for t in tail["tools_next_request"]].index(name)
            tools.insert(at, {"name": name, "description": name, "input_schema": {"type": "object"}, "defer_loading": True})
        before = translate(body)[0]
        after = translate(dict(body, tools=tools, messages=body["messages"] + tail["messages_tail"]))[0]
        keeps_prefix(self, before, after)
        self.assertEqual(cp.loaded_names(next(i for i in after["input"] if i["type"] == "tool_search_output")),
                         ["WebFetch", "NotebookEdit"])
        self.assertIsNone(codex_request_problem(after, set()))


def has_part(body, kind):
    return any(part.get("type") == kind for part in cp.all_parts(body))


PDF_BLOCK = {"type": "document", "title": "spec.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}}
TOOL_USE_TURN = [user("list files"),
                 {"role": "assistant", "content": [
                     {"type": "thinking", "thinking": "", "signature": cp.thinking_signature("gpt-5.5", "gAAAAB-unknown")},
                     {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}]}]


def turns(*blocks):
    """A conversation whose assistant turn holds ``blocks``, then a user question."""
    return [user("go"), {"role": "assistant", "content": list(blocks)}, user("and now?")]


def upstream_texts(codex):
    return [part.get("text") for item in codex["input"] if item["type"] == "message"
            for part in item["content"] if "text" in part]


def has_no(*fields):
    return lambda test, codex, context: [test.assertNotIn(f, json.dumps(codex)) for f in fields]


TOOL_CHANGES = [user("go"),
                {"role": "system", "content": [{"type": "tool_removal", "tool": {"type": "tool_reference", "name": "Bash"}},
                                               {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
                                                   "name": "Deploy", "description": "Deploy the app",
                                                   "input_schema": {"type": "object", "properties": {}}}}}]},
                user("deploy it")]
FILE_IMAGE = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
BIG_HISTORY = [user("go")] + [m for n in range(6) for m in (
    {"role": "assistant", "content": [{"type": "tool_use", "id": "call_%d" % n, "name": "Bash", "input": {"command": "ls"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_%d" % n, "content": "x" * 400}]})]

# Every row of the README's "Anthropic API compatibility" table: (the name in its first column, the
# verdict, what a request adds to BASIC, and a check of the upstream body, or for "refused" a text the
# 400 must contain).
COMPATIBILITY = [
    ("model", "works", {}, lambda t, c, x: t.assertEqual((c["model"], x.requested_model), ("gpt-5.5", "claude-opus-4-8"))),
    ("max_tokens", "emulated", {"max_tokens": 7}, lambda t, c, x: t.assertEqual(x.max_tokens, 7)),
    ("messages", "works", {}, lambda t, c, x: t.assertEqual(upstream_texts(c), ["hi"])),
    ("system", "works", {"system": "Be terse."}, lambda t, c, x: t.assertEqual(upstream_texts(c)[0], "Be terse.")),
    ("stream", "works", {"stream": True}, lambda t, c, x: t.assertIs(c["stream"], True)),
    ("stop_sequences", "emulated", {"stop_sequences": ["END"]}, lambda t, c, x: t.assertEqual(x.stop_sequences, ["END"])),
    ("temperature", "ignored", {"temperature": 0.2}, has_no("temperature")),
    ("top_p", "ignored", {"top_p": 0.9}, has_no("top_p")),
    ("top_k", "ignored", {"top_k": 5}, has_no("top_k")),
    ("metadata", "works", {"metadata": {"user_id": "u-1"}}, has_no("u-1")),
    ("tools", "works", {"tools": [BASH_TOOL]}, lambda t, c, x: t.assertEqual(c["tools"][0]["name"], "Bash")),
    ("tool_choice", "works", {"tools": [BASH_TOOL], "tool_choice": {"type": "any"}},
     lambda t, c, x: t.assertEqual(c["tool_choice"], "required")),
    ("thinking", "works", {"thinking": {"type": "enabled", "budget_tokens": 20000}},
     lambda t, c, x: t.assertEqual(c["reasoning"], {"effort": "high", "summary": "auto"})),
    ("output_config", "works", {"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}}},
     lambda t, c, x: t.assertEqual((c["reasoning"]["effort"], c["text"]["format"]["type"]), ("low", "json_schema"))),
    ("output_format", "works", {"output_format": {"type": "json_schema", "schema": {"type": "object"}}},
     lambda t, c, x: t.assertEqual(c["text"]["format"]["schema"], {"type": "object"})),
    ("service_tier", "ignored", {"service_tier": "standard_only"}, has_no("service_tier", "standard_only")),
    ("cache_control", "ignored", {"cache_control": {"type": "ephemeral"}}, has_no("cache_control", "ephemeral")),
    ("speed", "emulated", {"speed": "fast"}, lambda t, c, x: (
        has_no("speed", "priority")(t, c, x),   # a model whose catalog entry has no priority tier: ignored
        t.assertEqual(cp.translate_request(dict(BASIC, model="gpt-6-sol", speed="fast"), {}, make_config(
            tempfile.gettempdir(), "http://127.0.0.1:9"), CATALOG)[0]["service_tier"], "priority"))),
    ("safeguards", "emulated", {"safeguards": [{"type": "dangerous_tool_use", "classifier_context": {"v": 1}}]},
     lambda t, c, x: t.assertIsNotNone(cp.safeguard_request(dict(BASIC, safeguards=[{"type": "dangerous_tool_use"}])))
     or has_no("safeguards", "classifier_context")(t, c, x)),
    ("Claude Code's own classifier requests", "emulated",
     {"system": "You are a security monitor for autonomous AI coding agents.",
      "messages": [user("<transcript>{}</transcript> Respond with <severity>N</severity> ONLY.")]},
     lambda t, c, x: t.assertEqual(cp.answer_form(dict(BASIC, system="You are a security monitor for autonomous AI "
                                                      "coding agents.", messages=[user("Respond with <severity>N</severity>")])),
                                   "severity")),
    ("fallbacks", "ignored", {"fallbacks": [{"model": "claude-haiku-4-5"}]}, has_no("fallbacks", "haiku")),
    ("diagnostics", "ignored", {"diagnostics": {"cache": True}}, has_no("diagnostics")),
    ("context_management", "emulated", {"context_management": {"edits": [{"type": "clear_tool_uses_20250919",
     "trigger": {"type": "input_tokens", "value": 100}, "keep": {"type": "tool_uses", "value": 2}}]},
     "tools": [BASH_TOOL], "messages": BIG_HISTORY},
     lambda t, c, x: t.assertEqual([i["output"] == cp.CLEARED_RESULT for i in c["input"] if i["type"] == "function_call_output"],
                                   [True] * 4 + [False] * 2)),
    ("thread", "works", {}, lambda t, c, x: t.assertNotIn("thread", c)),   # the store itself: TestMessageThreads
    ("inference_geo", "refused", {"inference_geo": "us"}, "inference_geo"),
    ("container", "refused", {"container": "cntr_1"}, "container"),
    ("mcp_servers", "refused", {"mcp_servers": [{"type": "url", "name": "m", "url": "https://m.example"}]}, "mcp_servers"),
    ("compaction", "refused", {"compaction": {"trigger": 1000}}, "compaction"),
    ("compact_20260112", "refused", {"context_management": {"edits": [{"type": "compact_20260112"}]}}, "compact_20260112"),
    # content blocks
    ("text", "works", {"messages": [{"role": "user", "content": [{"type": "text", "text": "cited", "citations": [
        {"type": "char_location", "cited_text": "c", "document_index": 0, "start_char_index": 0, "end_char_index": 1}]}]}]},
     lambda t, c, x: t.assertEqual(upstream_texts(c), ["cited"])),
    ("image", "works", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     lambda t, c, x: t.assertEqual(c["input"][0]["content"][0]["image_url"], "data:image/png;base64,AAAA")),
    ("document", "works", {"messages": [{"role": "user", "content": [PDF_BLOCK]}]},
     lambda t, c, x: t.assertEqual(c["input"][0]["content"][0]["type"], "input_file")),
    ("file_id sources", "refused", {"messages": [{"role": "user", "content": [FILE_IMAGE]}]}, "Files API"),
    ("container_upload", "refused", {"messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "f"}]}]},
     "container_upload"),
    ("search_result", "emulated", {"messages": [{"role": "user", "content": [{"type": "search_result", "title": "T",
     "source": "https://s.example", "content": [{"type": "text", "text": "found"}]}]}]},
     lambda t, c, x: t.assertEqual(upstream_texts(c), ["T\nhttps://s.example\nfound"])),
    ("tool_use", "works", {"tools": [BASH_TOOL], "messages": TOOL_USE_TURN},
     lambda t, c, x: t.assertIn("function_call", [i["type"] for i in c["input"]])),
    ("tool_result", "works", {"tools": [BASH_TOOL], "messages": TOOL_USE_TURN},
     lambda t, c, x: t.assertEqual(c["input"][-1], {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"})),
    ("thinking blocks", "works", {"messages": turns({"type": "thinking", "thinking": "hm", "signature": cp.thinking_signature(
        "gpt-5.5", "gAAAAB-x")}, {"type": "text", "text": "ok"})},
     lambda t, c, x: t.assertEqual([i["type"] for i in c["input"]], ["message", "reasoning", "message", "message"])),
    ("redacted_thinking", "ignored", {"messages": turns({"type": "redacted_thinking", "data": "EuYBCkQ"}, {"type": "text", "text": "ok"})},
     has_no("EuYBCkQ")),
    ("server_tool_use", "emulated", {"messages": turns({"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
     "input": {"query": "q"}}, {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
         {"type": "web_search_result", "url": "https://a.example", "title": "A", "encrypted_content": "e"}]})},
     lambda t, c, x: t.assertEqual(upstream_texts(c)[1:3], ['[server_tool_use web_search called with {"query": "q"}]',
                                                             "[web search results: A <https://a.example>]"])),
    ("mcp_tool_use", "emulated", {"messages": turns({"type": "mcp_tool_use", "id": "m1", "name": "lookup", "server_name": "s",
     "input": {}}, {"type": "mcp_tool_result", "tool_use_id": "m1", "content": [{"type": "text", "text": "r"}]})},
     lambda t, c, x: t.assertIn("[mcp_tool_use lookup called with {}]", upstream_texts(c))),
    ("compaction blocks", "emulated", {"messages": turns({"type": "compaction", "content": "We fixed the bug."})},
     lambda t, c, x: t.assertIn("Summary of the earlier conversation:\nWe fixed the bug.", upstream_texts(c))),
    ("mid_conv_system", "works", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {
        "type": "mid_conv_system", "content": [{"type": "text", "text": "Note this."}]}]}]},
     lambda t, c, x: t.assertEqual(c["input"][1]["role"], "developer")),
    ("role: system messages", "works", {"messages": [user("a"), {"role": "system", "content": "Later rule."}]},
     lambda t, c, x: t.assertEqual((c["input"][1]["role"], upstream_texts(c)[1]), ("developer", "Later rule."))),
    ("clear_at", "works", {"messages": [user("a"), {"role": "system", "content": "Only now.", "clear_at": "next_user_message"},
                                        {"role": "system", "content": "Always.", "clear_at": "never"}, user("b"),
                                        {"role": "system", "content": "Just for b.", "clear_at": "next_user_message"}]},
     lambda t, c, x: t.assertEqual(upstream_texts(c), ["a", "Always.", "b", "Just for b."])),
    ("tool_addition / tool_removal", "emulated", {"tools": [BASH_TOOL], "messages": TOOL_CHANGES},
     lambda t, c, x: t.assertEqual([tool["name"] for tool in c["tools"]], ["Bash", "Deploy"])),
    ("tool_reference", "works", searching_session()[1],
     lambda t, c, x: t.assertEqual(cp.loaded_names(c["input"][2]), ["WebFetch"])),
    ("other block types", "emulated", {"messages": [user("a"), {"role": "user", "content": [{"type": "fallback", "x": 1}]}]},
     lambda t, c, x: t.assertIn('[fallback block: {"x": 1}]', upstream_texts(c))),
    # tools
    ("custom tool fields", "works", {"tools": [dict(BASH_TOOL, strict=True, cache_control={"type": "ephemeral"},
                                                  eager_input_streaming=True, allowed_callers=["direct"])]},
     has_no("cache_control", "eager_input_streaming", "allowed_callers")),
    ("input_examples", "emulated", {"tools": [dict(BASH_TOOL, input_examples=[{"command": "ls -la"}])]},
     lambda t, c, x: t.assertIn('Examples of input:\n{"command": "ls -la"}', c["tools"][0]["description"])),
    ("defer_loading", "works", searching_session()[0], lambda t, c, x: (
        t.assertEqual([tool.get("name", tool["type"]) for tool in c["tools"]], ["Bash", "tool_search"]),
        t.assertEqual(translate({"model": "m", "messages": [user("a")], "tools": [dict(BASH_TOOL, defer_loading=True)]})[0][
            "tools"][0]["name"], "Bash"))),
    ("web_search", "works", {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3,
                                       "allowed_domains": ["docs.python.org"]}]},
     lambda t, c, x: t.assertEqual(c["tools"][0]["filters"], {"allowed_domains": ["docs.python.org"]})),
    ("blocked_domains", "refused", {"tools": [{"type": "web_search_20250305", "name": "web_search",
                                              "blocked_domains": ["x.example"]}]}, "blocked_domains"),
    ("bash", "emulated", {"tools": [{"type": "bash_20250124", "name": "bash"}]},
     lambda t, c, x: t.assertEqual(sorted(c["tools"][0]["parameters"]["properties"]), ["command", "restart"])),
    ("text_editor", "emulated", {"tools": [{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}]},
     lambda t, c, x: t.assertEqual(c["tools"][0]["parameters"]["required"], ["command", "path"])),
    ("memory", "emulated", {"tools": [{"type": "memory_20250818", "name": "memory"}]},
     lambda t, c, x: t.assertIn("rename", c["tools"][0]["parameters"]["properties"]["command"]["enum"])),
    ("tool_search_tool", "emulated", {"tools": [BASH_TOOL, {"type": "tool_search_tool_bm25_20251119", "name": "tool_search_tool_bm25"}]},
     lambda t, c, x: t.assertEqual([tool["name"] for tool in c["tools"]], ["Bash"])),
    ("web_fetch", "refused", {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, "web_fetch_20250910"),
    ("code_execution", "refused", {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}, "code_execution"),
    ("computer", "refused", {"tools": [{"type": "computer_20250124", "name": "computer", "display_width_px": 1024}]}, "computer"),
    ("mcp_toolset", "refused", {"tools": [{"type": "mcp_toolset", "mcp_server_name": "s"}]}, "mcp_toolset"),
    ("advisor", "refused", {"tools": [{"type": "advisor_20260301", "name": "advisor"}]}, "advisor"),
    ("other tool types", "refused", {"tools": [{"type": "hologram_20270101", "name": "hologram"}]}, "hologram_20270101"),
]


class TestAnthropicCompatibility(ProxyCase):
    """Nothing is dropped silently: each request field, block and tool works, is
    emulated, cannot change the answer, or is refused with a 400 naming it."""

    def test_every_row_does_what_the_readme_says(self):
        for name, verdict, extra, check in COMPATIBILITY:
            with self.subTest(feature=name):
                body = dict(BASIC, **extra)
                if verdict == "refused":
                    with self.assertRaises(cp.ProxyError) as caught:
                        translate(body)
                    self.assertEqual(caught.exception.status, 400)
                    self.assertIn(check, caught.exception.message)
                    self.assertIn("is not supported through codex_proxy", caught.exception.message)
                    continue
                codex, context = translate(body)
                check(self, codex, context)
                self.assertIsNone(codex_request_problem(codex, {"gAAAAB-x", "gAAAAB-unknown"}), name)

    def test_the_readme_table_lists_exactly_these_rows(self):
        readme = (HERE / "README.md").read_text()
        table = readme.split("## Anthropic API compatibility", 1)[1].split("\n## ", 1)[0]
        rows = re.findall(r"^\| `?([^|`]+?)`? \| (works|emulated|ignored|refused)\b", table, re.M)
        self.assertEqual(sorted(rows), sorted((name, verdict) for name, verdict, _, _ in COMPATIBILITY))

    def test_a_refused_feature_gets_a_400_over_the_wire_and_nothing_upstream(self):
        answer = self.post(dict(BASIC, tools=[{"type": "code_execution_20250825", "name": "code_execution"}]))
        self.assertEqual(answer.status, 400)
        self.assertEqual(answer.json()["error"]["type"], "invalid_request_error")
        self.assertIn("tools.0: the code_execution_20250825 tool is not supported", answer.json()["error"]["message"])
        self.assertEqual(self.fake.requests, [])

    def test_max_tokens_cuts_the_reply_with_stop_reason_max_tokens(self):
        self.fake.reply(self.fake.turn().text("0123456789" * 20, pieces=10).completed())
        message = cp.fold_message(self.stream(dict(BASIC, max_tokens=10)))
        self.assertEqual(message["content"], [{"type": "text", "text": ("0123456789" * 4)}])
        self.assertEqual(message["stop_reason"], "max_tokens")
        self.fake.reply(self.fake.turn().text("short").completed())
        self.assertEqual(self.post(dict(BASIC, max_tokens=10)).json()["stop_reason"], "end_turn")

    def test_a_tool_added_mid_conversation_is_callable_and_a_removed_one_is_said_gone(self):
        self.fake.reply(self.fake.turn().tool_call("Deploy", {}, call_id="call_d").completed())
        answer = self.post(dict(BASIC, tools=[BASH_TOOL], messages=TOOL_CHANGES))
        self.assertEqual(answer.json()["content"][0]["name"], "Deploy")
        sent = self.sent()   # the removed tool stays declared: what comes before the conversation holds
        self.assertEqual([t["name"] for t in sent["tools"]], ["Bash", "Deploy"])
        notes = [p["text"] for i in sent["input"] if i.get("role") == "developer" for p in i["content"]]
        self.assertEqual(notes, ["The tool Bash is no longer available; do not call it.",
                                 "The tool Deploy is available from now on."])
        readd = TOOL_CHANGES + [{"role": "system", "content": [
            {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "Bash"}}]}]
        codex, _ = translate(dict(BASIC, tools=[BASH_TOOL], messages=readd))
        self.assertEqual([t["name"] for t in codex["tools"]], ["Bash", "Deploy"])

    def test_clear_thinking_keeps_the_reasoning_of_the_last_turns(self):
        signed = lambda n: {"type": "thinking", "thinking": "", "signature": cp.thinking_signature("gpt-5.5", "gAAAAB-%d" % n)}
        messages = [m for n in range(3) for m in (user("q%d" % n), {"role": "assistant", "content": [signed(n), {"type": "text", "text": "a"}]})]
        for keep, expected in (("all", [0, 1, 2]), ({"type": "thinking_turns", "value": 1}, [2]),
                               ({"type": "thinking_turns", "value": 2}, [1, 2])):
            codex, _ = translate(dict(BASIC, messages=messages + [user("q")], context_management={
                "edits": [{"type": "clear_thinking_20251015", "keep": keep}]}))
            self.assertEqual([i["encrypted_content"] for i in codex["input"] if i["type"] == "reasoning"],
                             ["gAAAAB-%d" % n for n in expected], keep)

    def test_every_beta_flag_is_accepted(self):
        flags = ("claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14,"
                 "context-management-2025-06-27,context-1m-2025-08-07,effort-2025-11-24,advanced-tool-use-2025-11-20,"
                 "prompt-caching-scope-2026-01-05,extended-cache-ttl-2025-04-11,cache-diagnosis-2026-04-07,"
                 "redact-thinking-2026-02-12,thinking-token-count-2026-05-13,mid-conversation-system-2026-04-07,"
                 "mid-conversation-tool-changes-2026-07-01,inline-tools-2026-09-15,advisor-tool-2026-03-01,"
                 "fast-mode-2026-02-01,server-side-fallback-2026-06-01,fallback-credit-2026-06-01,"
                 "structured-outputs-2025-12-15,prompt-caching-2024-07-31,token-efficient-tools-2025-02-19,"
                 "output-128k-2025-02-19,token-counting-2024-11-01,pdfs-2024-09-25,message-threads-2026-08-12,"
                 "per-turn-control-2026-07-01,thinking-display-updates-2026-08-18,unknown-flag-2099-01-01")
        self.fake.reply(self.fake.turn().text("ok").completed())
        answer = self.post(BASIC, headers={"anthropic-beta": flags})
        self.assertEqual(answer.status, 200)
        self.assertNotIn("anthropic-beta", self.fake.requests[0]["headers"])


class TestCodexParity(unittest.TestCase):
    """Where the Codex CLI's source shows a different request or reading of a reply
    (codex-cli-crosscheck.md), the proxy now does what Codex does."""

    def test_insufficient_quota_is_final_with_codex_wording(self):
        for failure in (cp.upstream_failure({"code": "insufficient_quota", "message": "You exceeded your current quota, "
                                             "please check your plan and billing details."}, None),
                        cp.upstream_http_error(429, json.dumps({"error": {"code": "insufficient_quota", "message": "x"}}).encode(),
                                               {}, None)):
            error = failure.error
            self.assertEqual((error.status, error.error_type), (429, "rate_limit_error"))
            self.assertEqual(error.headers.get("x-should-retry"), "false")
            self.assertNotIn("retry-after", error.headers)
            self.assertFalse(failure.retryable)
            self.assertTrue(error.message.startswith("Quota exceeded"))
            self.assertNotIn("resets", error.message)

    def test_every_error_codex_treats_as_final_is_not_retried(self):
        for code in ("context_length_exceeded", "insufficient_quota", "usage_not_included",
                     "cyber_policy", "invalid_prompt", "bio_policy"):
            failure = cp.upstream_failure({"code": code, "message": "m"}, None)
            self.assertEqual(failure.error.headers.get("x-should-retry"), "false", code)
            self.assertFalse(failure.retryable, code)

    def test_rate_limit_delay_is_read_as_codex_reads_it(self):
        for message, seconds in (("Rate limit reached. Try again in 35 seconds.", "35"),
                                 ("Please try again in 11.054s.", "12"), ("try again in 250ms", "1")):
            error = cp.upstream_failure({"code": "rate_limit_exceeded", "message": message}, None).error
            self.assertEqual(error.headers["retry-after"], seconds, message)

    def test_a_refused_parameter_is_not_taken_for_an_unavailable_model(self):
        body = {"error": {"message": "Unsupported parameter: 'tool_choice' is not supported with this model.",
                          "type": "invalid_request_error", "param": "tool_choice", "code": "unsupported_parameter"}}
        error = cp.upstream_http_error(400, json.dumps(body).encode(), {}, None).error
        self.assertNotIn("not available with this ChatGPT account", error.message)
        self.assertIn("Unsupported parameter: 'tool_choice'", error.message)
        for detail in ("The 'gpt-5.3-codex' model is not supported when using Codex with a ChatGPT account.",
                       "The model 'gpt-9.1' does not exist or you do not have access to it."):
            error = cp.upstream_http_error(400, json.dumps({"detail": detail}).encode(), {}, None).error
            self.assertIn("not available with this ChatGPT account", error.message, detail)

    def test_lite_request_without_tools_has_no_empty_namespace(self):
        codex, context = translate(dict(BASIC, model="gpt-5.6-sol"))
        self.assertTrue(context.lite)
        self.assertEqual(codex["input"][0], {"type": "additional_tools", "role": "developer", "tools": []})
        self.assertIsNone(lite_problem(codex))
        codex, _ = translate(dict(BASIC, model="gpt-5.6-sol", tools=[BASH_TOOL]))
        self.assertEqual([t["name"] for t in codex["input"][0]["tools"][0]["tools"]], ["Bash"])

    def test_reasoning_summary_follows_the_catalog(self):
        config = make_config(tempfile.gettempdir(), "http://127.0.0.1:9/backend-api/codex")
        body = dict(BASIC, thinking={"type": "enabled", "budget_tokens": 8000})
        entry = dict(CATALOG["gpt-5.5"])
        codex, _ = cp.translate_request(body, {}, config, {"gpt-5.5": entry})
        self.assertEqual(codex["reasoning"]["summary"], "auto")
        codex, context = cp.translate_request(body, {}, config, {"gpt-5.5": dict(
            entry, supports_reasoning_summary_parameter=False)})
        self.assertNotIn("summary", codex["reasoning"])
        self.assertTrue(context.thinking, "thinking blocks still come, with the signature to replay")

    def test_verbosity_is_the_models_default_as_codex_sends_it(self):
        config = make_config(tempfile.gettempdir(), "http://127.0.0.1:9/backend-api/codex")
        codex, _ = cp.translate_request(BASIC, {}, config, CATALOG)
        self.assertEqual(codex["text"], {"verbosity": "low"})
        red, _ = cp.translate_request(dict(BASIC, model="gpt-daybreak-red-latest"), {}, config,
                                      dict(CATALOG, **{"gpt-daybreak-red-latest": dict(
                                          CATALOG["gpt-daybreak-red-latest"], default_verbosity="high")}))
        self.assertEqual(red["input"][0]["type"], "additional_tools")
        self.assertEqual(red["text"], {"verbosity": "high"}, "each model's own default, as Codex sends it")
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        shaped, _ = cp.translate_request(dict(BASIC, output_config={"format": {"type": "json_schema", "schema": schema}}),
                                         {}, config, CATALOG)
        self.assertEqual(shaped["text"]["verbosity"], "low")
        self.assertEqual(shaped["text"]["format"]["schema"], schema)
        self.assertNotIn("text", translate(BASIC)[0], "without a catalog entry, nothing is guessed")

    def test_argument_deltas_for_a_call_that_never_got_its_name_are_dropped(self):
        upstream = [{"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": '{"input":"'},
                    {"type": "response.completed", "response": {"id": "resp1"}}]
        out, message = translate_events(self, upstream)
        self.assertEqual(message["content"], [])
        self.assertEqual(message["stop_reason"], "end_turn")
        self.assertFalse([e for e in out if e["type"] == "content_block_start"])

    def test_a_named_call_whose_item_never_finished_is_still_delivered(self):
        turn = Turn().tool_call("Bash", {"command": "ls"})
        events = [e for e in turn.events if e["type"] != "response.output_item.done"]
        events.append({"type": "response.completed", "response": {"id": turn.id}})
        _, message = translate_events(self, events)
        self.assertEqual([(b["type"], b["name"], b["input"]) for b in message["content"]],
                         [("tool_use", "Bash", {"command": "ls"})])


class TestCodexHeaders(ProxyCase):
    """Headers Codex sends on /responses that the proxy mirrors."""

    def test_thread_id_and_turn_state_are_sent_as_codex_sends_them(self):
        first = self.fake.turn().tool_call("Bash", {"command": "ls"}, call_id="call_a").completed()
        self.fake.reply(Reply(events=first, headers={"x-codex-turn-state": "ts-1"}),
                        Reply(events=self.fake.turn().text("listed").completed(), headers={"x-codex-turn-state": "ts-2"}),
                        self.fake.turn().text("new turn").completed())
        turn1 = dict(BASIC, tools=[BASH_TOOL], messages=[user("list files")])
        self.assertEqual(self.post(turn1).status, 200)
        loop = dict(turn1, messages=turn1["messages"] + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_a", "name": "Bash", "input": {"command": "ls"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "a.txt"}]}])
        self.assertEqual(self.post(loop).status, 200)
        fresh = dict(loop, messages=loop["messages"] + [{"role": "assistant", "content": "listed"}, user("thanks")])
        self.assertEqual(self.post(fresh).status, 200)
        headers = [r["headers"] for r in self.fake.requests]
        self.assertEqual([h.get("x-codex-turn-state") for h in headers], [None, "ts-1", None],
                         "echoed within the tool loop of a turn, not into the next turn")
        for h in headers:
            self.assertEqual(h["thread-id"], h["session-id"])


# (rule, Anthropic request, is the part in the upstream body, the backend's refusal in its own words)
REFUSALS = [
    ("tool_choice", dict(BASIC, tools=[BASH_TOOL], tool_choice={"type": "any"}),
     lambda body, headers: body.get("tool_choice") != "auto",
     {"error": {"message": "Unsupported parameter: 'tool_choice' is not supported with this model.",
                "type": "invalid_request_error", "param": "tool_choice", "code": "unsupported_parameter"}}),
    ("input_file", dict(BASIC, messages=[{"role": "user", "content": [PDF_BLOCK, {"type": "text", "text": "sum up"}]}]),
     lambda body, headers: has_part(body, "input_file"),
     {"error": {"message": "Invalid value: 'input_file'. Supported values are: 'input_text' and 'input_image'.",
                "type": "invalid_request_error", "param": "input[0].content[0].type", "code": "invalid_value"}}),
    ("reasoning_summary", dict(BASIC, thinking={"type": "enabled", "budget_tokens": 8000}),
     lambda body, headers: "summary" in body["reasoning"], {"detail": "Unsupported parameter: reasoning.summary"}),
    ("verbosity", BASIC, lambda body, headers: "verbosity" in body.get("text", {}),
     {"detail": "Unknown parameter: 'text.verbosity'."}),
    ("tool_search", searching_session()[2], lambda body, headers: "tool_search" in json.dumps(body),
     {"error": {"message": "Invalid value: 'tool_search'. Supported values are: 'function', 'custom', 'namespace' and "
                "'web_search'.", "type": "invalid_request_error", "param": "tools[1].type", "code": "invalid_value"}}),
    ("tool_search", searching_session()[2], lambda body, headers: "tool_search" in json.dumps(body),
     {"error": {"message": "Invalid value: 'tool_search_call'.", "type": "invalid_request_error",
                "param": "input[1].type", "code": "invalid_value"}}),
    ("lite", dict(BASIC, model="gpt-5.6-sol", tools=[BASH_TOOL]),
     lambda body, headers: headers.get("x-openai-internal-codex-responses-lite") == "true",
     {"error": {"message": "Invalid value: 'additional_tools'. Supported values are: 'message', 'function_call', "
                "'function_call_output' and 'reasoning'.", "type": "invalid_request_error", "param": "input[0].type",
                "code": "invalid_value"}}),
]


class TestSelfHealing(ProxyCase):
    """A 400 that names a part of the request we can do without: one retry without
    it, a normal reply, and the rule kept for the model for a day."""

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.downgrades.rules = {}
        path = self.home / "downgrades.json"
        if path.exists():
            path.unlink()

    def test_each_refused_part_is_downgraded_once_and_then_sent_downgraded(self):
        for rule, request, present, refusal in REFUSALS:
            with self.subTest(rule=rule):
                self.setUp()
                self.fake.refuse = (present, 400, refusal)
                model = "gpt-5.6-sol" if rule == "lite" else "gpt-5.5"
                self.fake.reply(self.fake.turn(model).text("healed reply").completed(),
                                self.fake.turn(model).text("second turn").completed())
                message = cp.fold_message(self.stream(request))
                self.assertEqual(message["content"], [{"type": "text", "text": "healed reply"}])
                first, retry = self.fake.requests
                self.assertTrue(present(first["body"], first["headers"]), "the first try carried the part")
                self.assertFalse(present(retry["body"], retry["headers"]), "the retry left it out")
                self.assertEqual([r for _, r, _ in self.proxy.downgrades.active()], [rule])
                answer = self.post(request)   # the next turn goes out downgraded at once
                self.assertEqual(answer.status, 200, answer.body[:300])
                self.assertEqual(len(self.fake.requests), 3)
                self.assertFalse(present(self.sent(), self.fake.requests[-1]["headers"]))
                lines = []
                cp.Doctor(self.config, say=lines.append).learned_downgrades()
                self.assertEqual(len(lines), 1)
                self.assertIn(model, lines[0])
                self.assertIn(cp.DOWNGRADES[rule], lines[0])

    def test_a_rule_that_cannot_be_saved_is_said_to_last_until_the_proxy_stops(self):
        from unittest import mock
        rule, request, present, refusal = REFUSALS[0]
        (self.home / "downgrades.json").mkdir()   # as a read-only or full disk: the write fails
        self.addCleanup((self.home / "downgrades.json").rmdir)
        self.fake.refuse = (present, 400, refusal)
        self.fake.reply(self.fake.turn().text("healed reply").completed())
        logged, warned = [], []
        with mock.patch.object(cp.ProxyHandler, "log", lambda handler, text: logged.append(text)), \
                mock.patch.object(cp, "warn", warned.append):
            self.assertEqual(self.post(request).status, 200)
        self.assertEqual([line for line in logged if "refused part" in line], [
            "the Codex backend refused part of a request for gpt-5.5; from now on, until the proxy stops (it could "
            "not be saved): %s. (`python codex_proxy.py doctor` lists what was learned.)" % cp.DOWNGRADES[rule]])
        self.assertEqual(len(warned), 1)
        self.assertTrue(warned[0].startswith("Cannot save %s (" % (self.home / "downgrades.json")), warned)
        self.assertIn("what the backend refused is learned again after a restart", warned[0])

    def test_the_downgrades_leave_a_request_the_strict_backend_accepts(self):
        pdf = REFUSALS[1][1]
        codex, context = translate(dict(pdf, tools=[BASH_TOOL], tool_choice={"type": "any"}, model="gpt-5.6-sol",
                                        thinking={"type": "adaptive"}))
        for rule in ("tool_choice", "input_file", "reasoning_summary", "lite"):
            cp.apply_downgrade(codex, context, rule)
        self.assertEqual((codex["tool_choice"], context.lite, "summary" in codex["reasoning"]), ("auto", False, False))
        self.assertEqual(codex["input"][0]["content"][0]["text"],
                         "[The document spec.pdf could not be sent: the Codex backend refused PDF files.]")
        self.assertEqual([t["name"] for t in codex["tools"]], ["Bash"])
        self.assertIsNone(codex_request_problem(codex, set()))

    def test_reasoning_the_backend_cannot_verify_is_left_out_once_not_learned(self):
        self.fake.reply(self.fake.turn().text("done").completed())
        answer = self.post(dict(BASIC, messages=TOOL_USE_TURN, tools=[BASH_TOOL], thinking={"type": "adaptive"}))
        self.assertEqual(answer.status, 200, answer.body[:300])
        first, retry = self.fake.requests
        self.assertEqual([i["type"] for i in first["body"]["input"]][:2], ["message", "reasoning"])
        self.assertNotIn("reasoning", [i["type"] for i in retry["body"]["input"]])
        self.assertEqual(self.proxy.downgrades.active(), [])

    def test_a_refusal_naming_nothing_we_can_drop_reaches_the_client_unchanged(self):
        self.fake.refuse = (lambda body, headers: True, 400, {"detail": "Unsupported parameter: 'frobnicate'"})
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 400)
        self.assertIn("Unsupported parameter: 'frobnicate'", answer.json()["error"]["message"])
        self.assertEqual(answer.headers["x-should-retry"], "false")
        self.assertEqual(len(self.fake.requests), 1)

    def test_a_backend_that_still_refuses_gets_one_retry_then_the_error(self):
        rule, request, _, refusal = REFUSALS[0]
        self.fake.refuse = (lambda body, headers: True, 400, refusal)
        answer = self.post(request)
        self.assertEqual(answer.status, 400)
        self.assertIn("tool_choice", answer.json()["error"]["message"])
        self.assertEqual(len(self.fake.requests), 2)
        self.assertEqual([r["body"]["tool_choice"] for r in self.fake.requests], ["required", "auto"])

    def test_a_learned_rule_is_shared_through_the_home_and_ends_after_a_day(self):
        learned = cp.LearnedDowngrades(self.config)
        self.assertTrue(learned.learn("gpt-5.5", "tool_choice"))
        self.assertFalse(learned.learn("gpt-5.5", "tool_choice"), "said once")
        self.assertEqual(stat.S_IMODE((self.home / "downgrades.json").stat().st_mode), 0o600)
        again = cp.LearnedDowngrades(self.config)
        self.assertEqual(again.for_model("gpt-5.5"), ("tool_choice",))
        self.assertEqual(again.for_model("gpt-5.4"), ())
        doc = json.loads((self.home / "downgrades.json").read_text())
        doc["gpt-5.5"]["tool_choice"] = time.time() - 1
        (self.home / "downgrades.json").write_text(json.dumps(doc))
        self.assertEqual(cp.LearnedDowngrades(self.config).for_model("gpt-5.5"), ())

    def test_the_log_says_it_once(self):
        import io
        rule, request, present, refusal = REFUSALS[0]
        self.fake.refuse = (present, 400, refusal)
        self.fake.default = self.fake.turn().text("ok").completed()
        saved, sys.stderr = sys.stderr, io.StringIO()
        try:
            for _ in range(3):
                self.assertEqual(self.post(request).status, 200)
            said = sys.stderr.getvalue()
        finally:
            sys.stderr = saved
        self.assertEqual(said.count("the Codex backend refused part of a request for gpt-5.5"), 1, said)
        self.assertEqual(len(self.fake.requests), 4)


# ---------------------------------------------------------------------------
# Conversation state kept between turns: threads, hidden reasoning, token counts
# ---------------------------------------------------------------------------

class ClientRecordingHandler(cp.ProxyHandler):
    """The proxy's handler, also keeping each request body its client sent."""

    def _read_json(self):
        body = cp.ProxyHandler._read_json(self)
        self.server.client_bodies.append(body)
        return body


def weather_turns(fake):
    """A three-tool-call task as the backend answers it: reasoning, one call a turn, then the answer."""
    turns = [fake.turn().reasoning().tool_call("get_weather", {"city": city}, call_id="call_%s" % city).completed()
             for city in ("Oslo", "Lima", "Pune")]
    return turns + [fake.turn().reasoning().text("Oslo 3C, Lima 19C, Pune 31C.").completed()]


class ThreadCase(ProxyCase):
    handler = ClientRecordingHandler

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.client_bodies = []
        self.proxy.threads.threads.clear()
        self.proxy.threads.bytes = 0

    def client(self, **kw):
        return anthropic.Anthropic(api_key=PROXY_KEY, base_url=self.proxy.url, max_retries=kw.pop("max_retries", 0), **kw)

    def upstream_inputs(self):
        return [r["body"]["input"] for r in self.fake.requests]


@needs(anthropic, "anthropic SDK not installed (pip install anthropic)")
class TestMessageThreadsWithTheSDK(ThreadCase):
    """The official SDK's tool runner and thread helper use message threads by default."""

    def run_weather(self, **runner_args):
        calls = []

        @anthropic.beta_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            calls.append(city)
            return {"Oslo": "3C", "Lima": "19C", "Pune": "31C"}[city]

        runner = self.client().beta.messages.tool_runner(
            model="claude-opus-4-8", max_tokens=1024, system="You are a weather desk.", tools=[get_weather],
            messages=[{"role": "user", "content": "Weather in Oslo, Lima and Pune?"}], **runner_args)
        final = runner.until_done()
        return calls, final

    def test_tool_runner_with_default_settings_sends_what_an_unthreaded_run_sends(self):
        turns = weather_turns(self.fake)
        self.fake.reply(*turns)
        calls, final = self.run_weather()
        self.assertEqual(calls, ["Oslo", "Lima", "Pune"])
        self.assertEqual(final.content[-1].text, "Oslo 3C, Lima 19C, Pune 31C.")
        threads = [b.get("thread") for b in self.proxy.client_bodies]
        self.assertEqual(threads[0], {"type": "create"})
        self.assertEqual([t["type"] for t in threads[1:]], ["continue"] * 3, "the SDK really used threads")
        for body in self.proxy.client_bodies[1:]:
            self.assertEqual((len(body["messages"]), "system" in body, "tools" in body), (1, False, False))
        threaded = self.upstream_inputs()
        self.fake.reset()
        self.fake.reply(*turns)
        self.proxy.client_bodies = []
        calls, final = self.run_weather(thread=False)
        self.assertNotIn("thread", self.proxy.client_bodies[-1])
        self.assertEqual(threaded, self.upstream_inputs(), "every turn's upstream input is the unthreaded one")
        self.assertEqual(threaded[-1][0]["role"], "developer", "the system prompt reached the model")
        self.assertEqual(len([i for i in threaded[-1] if i["type"] == "function_call"]), 3)

    def test_thread_helper_over_five_turns_recovers_from_an_expired_thread(self):
        for n in range(5):
            self.fake.reply(self.fake.turn().text("answer %d" % n).completed())
        thread = self.client().beta.messages.thread(model="claude-opus-4-8", max_tokens=1024, system="Be brief.")
        replies = []
        for n in range(5):
            if n == 3:   # the thread expires (5 minutes later, as the proxy sees it)
                for stored in self.proxy.threads.threads.values():
                    stored.used -= 301
            replies.append(thread.send({"role": "user", "content": "question %d" % n}).content[0].text)
        self.assertEqual(replies, ["answer %d" % n for n in range(5)])
        kinds = [b["thread"]["type"] for b in self.proxy.client_bodies]
        self.assertEqual(kinds, ["create", "continue", "continue", "continue", "create", "continue"],
                         "turn 4 got thread_not_found and the SDK replayed the history")
        self.assertEqual(len(self.fake.requests), 5, "the refused continue never reached the backend")
        last = self.upstream_inputs()[-1]
        said = [i["content"][0]["text"] for i in last if i["type"] == "message"]
        self.assertEqual(said, ["Be brief."] + [x for n in range(4) for x in ("question %d" % n, "answer %d" % n)]
                         + ["question 4"])
        self.assertEqual(len(self.proxy.client_bodies[4]["messages"]), 7, "the replay sent the whole history")

    def test_tool_loop_without_thinking_replays_the_hidden_reasoning(self):
        turns = weather_turns(self.fake)
        self.fake.reply(*turns)
        self.run_weather()
        for n, body in enumerate(self.fake.requests[1:], 1):
            encrypted = turns[n - 1][-1]["response"]["output"][0]["encrypted_content"]
            kinds = [(i["type"], i.get("encrypted_content") or i.get("call_id")) for i in body["body"]["input"]]
            at = kinds.index(("reasoning", encrypted))
            self.assertEqual(kinds[at + 1][0], "function_call", "turn %d: reasoning right before its call" % n)
        self.assertNotIn("thinking", self.proxy.client_bodies[0])


class TestMessageThreads(ThreadCase):
    """The thread store over loopback, with the documented answers."""

    def create(self, text="hi", **extra):
        self.fake.reply(self.fake.turn().text("reply to " + text).completed())
        answer = self.post(dict(BASIC, system="sys", tools=[BASH_TOOL], messages=[user(text)],
                                thread={"type": "create"}, **extra))
        self.assertEqual(answer.status, 200, answer.body[:300])
        return answer.json()["id"]

    def continue_(self, previous, text="more", **extra):
        body = dict(model=BASIC["model"], max_tokens=100, messages=[user(text)],
                    thread={"type": "continue", "previous_message_id": previous}, **extra)
        return self.post(body)

    def test_continue_of_an_unknown_id_is_404_thread_not_found(self):
        answer = self.continue_("msg_unknown")
        self.assertEqual(answer.status, 404)
        error = answer.json()["error"]
        self.assertEqual((error["type"], error["details"]["error_code"]), ("not_found_error", "thread_not_found"))
        self.assertEqual(self.fake.requests, [])

    def test_a_reply_continued_twice_is_thread_already_continued(self):
        first = self.create()
        self.fake.reply(self.fake.turn().text("second").completed())
        self.assertEqual(self.continue_(first).status, 200)
        again = self.continue_(first)
        self.assertEqual(again.status, 400)
        self.assertEqual(again.json()["error"]["details"]["error_code"], "thread_already_continued")

    def test_concurrent_continues_of_one_reply_get_thread_continue_in_flight(self):
        first = self.create()
        slow = Reply(events=self.fake.turn().text("slow").completed(), gate_after=2)
        self.fake.reply(slow)
        results = []
        worker = threading.Thread(target=lambda: results.append(self.continue_(first, stream=True)))
        worker.start()
        wait_until(lambda: len(self.fake.requests) == 2)
        other = self.continue_(first)
        slow.gate.set()
        worker.join(30)
        self.assertEqual(other.status, 400)
        self.assertEqual(other.json()["error"]["details"]["error_code"], "thread_continue_in_flight")
        self.assertEqual(results[0].status, 200)

    def test_a_failed_reply_is_not_stored_and_the_thread_goes_on_from_before(self):
        first = self.create()
        self.fake.reply(self.fake.turn().text("partial").failed("server_error", "boom"),
                        self.fake.turn().text("again").failed("server_error", "boom"),
                        self.fake.turn().text("and again").failed("server_error", "boom"),
                        self.fake.turn().text("still").failed("server_error", "boom"))
        failed = self.continue_(first, stream=True)
        self.assertIn(b"event: error", failed.body)
        failed_id = json.loads(failed.body.split(b"data: ", 2)[1].split(b"\n")[0])["message"]["id"]
        self.assertEqual(self.continue_(failed_id).status, 404, "a reply cut short is not a thread")
        self.fake.reply(self.fake.turn().text("fine").completed())
        self.assertEqual(self.continue_(first).status, 200, "the thread is still continuable")

    def test_continue_must_leave_out_system_and_tools(self):
        first = self.create()
        answer = self.continue_(first, system="other")
        self.assertEqual(answer.status, 400)
        self.assertIn("leave out system", answer.json()["error"]["message"])

    def test_count_tokens_counts_the_whole_thread(self):
        first = self.create(text="x" * 4000)
        threaded = self.post({"model": BASIC["model"], "messages": [user("more")],
                              "thread": {"type": "continue", "previous_message_id": first}},
                             path="/v1/messages/count_tokens").json()["input_tokens"]
        whole = self.post({"model": BASIC["model"], "system": "sys", "tools": [BASH_TOOL], "messages": [
            user("x" * 4000), {"role": "assistant", "content": [{"type": "text", "text": "reply to " + "x" * 4000}]},
            user("more")]}, path="/v1/messages/count_tokens").json()["input_tokens"]
        self.assertEqual(threaded, whole)
        self.fake.reply(self.fake.turn().text("counted").completed())
        self.assertEqual(self.continue_(first).status, 200, "counting claimed nothing")

    def test_the_store_forgets_the_oldest_beyond_its_limits(self):
        store = cp.ThreadStore(max_threads=1000, max_bytes=8 << 20)
        import tracemalloc
        tracemalloc.start()
        message = {"role": "user", "content": "m" * 4000}
        for n in range(10000):
            _, turn = store.open({"messages": [message], "system": "s", "thread": {"type": "create"}})
            store.close(turn, "msg_%d" % n, {"content": [{"type": "text", "text": "r" * 1000}]})
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLessEqual(len(store.threads), 1000)
        self.assertLessEqual(store.bytes, 8 << 20)
        self.assertLess(current, 16 << 20)
        with self.assertRaises(cp.ProxyError) as caught:
            store.open({"messages": [], "thread": {"type": "continue", "previous_message_id": "msg_0"}})
        self.assertEqual(caught.exception.details, {"error_code": "thread_not_found"})
        store.open({"messages": [], "thread": {"type": "continue", "previous_message_id": "msg_9999"}})
        report("threads: 10,000 created (5 KB each), %d kept, %.1f MB counted, %.1f MB traced (peak %.1f MB)"
               % (len(store.threads), store.bytes / 1e6, current / 1e6, peak / 1e6))

    def test_threads_never_touch_disk(self):
        marker = "thread-marker-" + secrets.token_hex(8)
        ledger = self.home / "usage.jsonl"
        turns = lambda: len(ledger.read_text().splitlines()) if ledger.exists() else 0
        before = turns()
        self.create(text=marker)
        wait_until(lambda: turns() != before, what="the ledger line")   # the last thing written after a reply
        for path in self.home.rglob("*"):
            if path.is_file():
                self.assertNotIn(marker, path.read_text(errors="replace"), path)


class TestHiddenReasoning(unittest.TestCase):
    """ReasoningCache: bounded, and only for the model and login that made it."""

    def test_reasoning_is_recalled_only_for_its_model_and_account(self):
        cache = cp.ReasoningCache()
        cache.remember("gpt-5.5", "acct-1", [("gAAAAB-r1", ["call_a", "call_b"])])
        self.assertEqual(cache.recall("call_b", "gpt-5.5", "acct-1"), "gAAAAB-r1")
        self.assertIsNone(cache.recall("call_a", "gpt-5.4", "acct-1"))
        self.assertIsNone(cache.recall("call_a", "gpt-5.5", "acct-2"))

    def test_parallel_calls_bring_back_one_reasoning_item_before_them(self):
        cache = cp.ReasoningCache()
        cache.remember("gpt-5.5", None, [("gAAAAB-r1", ["call_a", "call_b"])])
        body = dict(BASIC, tools=[BASH_TOOL], messages=[user("go"), {"role": "assistant", "content": [
            {"type": "text", "text": "Running both."},
            {"type": "tool_use", "id": "call_a", "name": "Bash", "input": {"command": "a"}},
            {"type": "tool_use", "id": "call_b", "name": "Bash", "input": {"command": "b"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "1"},
                                         {"type": "tool_result", "tool_use_id": "call_b", "content": "2"}]}])
        config = make_config(tempfile.gettempdir(), "http://127.0.0.1:9/backend-api/codex")
        codex, _ = cp.translate_request(body, {}, config, recall=lambda i, m: cache.recall(i, m, None))
        self.assertEqual([i["type"] for i in codex["input"]],
                         ["message", "reasoning", "message", "function_call", "function_call",
                          "function_call_output", "function_call_output"])
        self.assertIsNone(codex_request_problem(codex, {"gAAAAB-r1"}))

    def test_the_cache_is_bounded(self):
        cache = cp.ReasoningCache(max_items=100, max_bytes=50000)
        for n in range(1000):
            cache.remember("gpt-5.5", None, [("x" * 1000, ["call_%d" % n])])
        self.assertLessEqual(len(cache.items), 50)
        self.assertLessEqual(cache.bytes, 50000)
        self.assertIsNotNone(cache.recall("call_999", "gpt-5.5", None))
        self.assertIsNone(cache.recall("call_0", "gpt-5.5", None))


class TestWrittenRequests(unittest.TestCase):
    """The tools of a conversation are written to JSON once, and each input item once, their
    bytes reused by the next turns: the request sent is the same JSON, for the classic shape
    and for Lite, and what changed is written again."""

    def turns(self, model, count=3):
        body = dict(BASIC, model=model, tools=[BASH_TOOL, dict(BASH_TOOL, name="Read", description="Read a file")])
        messages, turns = [], []
        for n in range(count):
            if messages:
                messages = messages + [{"role": "assistant", "content": "answer %d" % n}]
            messages = messages + [user("turn %d é" % n)]
            turns.append(translate(dict(body, messages=messages))[0])
        return turns

    def test_each_turn_sends_the_same_json_and_the_tools_are_written_once(self):
        for model, shape in (("gpt-5.5", "tools"), ("gpt-5.6-sol", "input")):
            with self.subTest(model=model):
                written = cp.WrittenRequests()
                sent = [written.request_bytes(codex) for codex in self.turns(model)]
                self.assertEqual([json.loads(data) for data in sent], self.turns(model))
                self.assertIn(shape, json.loads(sent[0]))
                self.assertEqual(len(written.recent), 1, "one tool set, written once")
                tools = json.dumps(json.loads(sent[0])[shape] if shape == "tools" else json.loads(sent[0])["input"][0],
                                   ensure_ascii=False, separators=(",", ":")).encode()
                self.assertTrue(all(tools in data for data in sent), "the same bytes in every turn")

    def test_the_history_is_written_once_and_its_bytes_reused(self):
        written = cp.WrittenRequests()
        first, second, third = self.turns("gpt-5.5")
        written.request_bytes(first)
        kept = list(written.inputs[first["prompt_cache_key"]])
        written.request_bytes(second)
        again = written.inputs[first["prompt_cache_key"]]
        self.assertEqual(len(again), len(second["input"]))
        self.assertIs(again[0], kept[0], "the first user message was not written again")
        self.assertEqual(json.loads(written.request_bytes(third)), third)
        self.assertEqual(len(written.inputs), 1, "one conversation")

    def test_changed_items_are_written_again_and_later_changes_cannot_reach_the_kept_bytes(self):
        written = cp.WrittenRequests()
        first, second, _ = self.turns("gpt-5.5")
        before = written.request_bytes(first)
        first["tools"][0]["description"] = "changed after it was sent"
        first["input"][0]["content"][0]["text"] = "changed after it was sent"
        after = written.request_bytes(second)
        self.assertNotIn(b"changed after it was sent", after)
        self.assertEqual(json.loads(after)["tools"], json.loads(before)["tools"])
        self.assertEqual(json.loads(after), second)
        second["tools"][1]["description"] = "Read a file, all of it"
        second["input"][0]["content"][0]["text"] = "turn 0, edited by the client"
        self.assertEqual(json.loads(written.request_bytes(second)), second)

    def test_requests_without_tools_are_written_as_they_are(self):
        written = cp.WrittenRequests()
        codex = translate(BASIC)[0]
        self.assertEqual(json.loads(written.request_bytes(codex)), codex)
        self.assertEqual(json.loads(written.request_bytes({"input": []})), {"input": []})
        self.assertEqual(len(written.recent), 0)

    def test_large_items_and_many_conversations_are_not_kept(self):
        written = cp.WrittenRequests()
        image = "data:image/png;base64," + "A" * (written.LARGEST_ITEM + 10)
        body = dict(BASIC, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image[22:]}},
            {"type": "text", "text": "what is it?"}]}])
        codex = translate(body)[0]
        self.assertEqual(json.loads(written.request_bytes(codex)), codex)
        self.assertEqual(written.inputs[codex["prompt_cache_key"]], [(None, b"")], "the image is not kept")
        for n in range(written.CONVERSATIONS + 10):
            written.request_bytes(translate(dict(BASIC, messages=[user("hello %d" % n)]))[0])
        self.assertEqual(len(written.inputs), written.CONVERSATIONS)
        self.assertEqual(written.input_bytes, sum(len(data) for kept in written.inputs.values() for _, data in kept))
        written.INPUT_BYTES = 2000
        for n in range(20):
            written.request_bytes(translate(dict(BASIC, messages=[user("other %d" % n)]))[0])
        self.assertLessEqual(written.input_bytes, 2000)


class TestTheBackendSeesItsOwnHistory(ProxyCase):
    """What the backend's prompt cache sees again is what it saw before: a tool call's arguments
    as the model wrote them, and one cache key whatever cache_control does (issue 17)."""

    WRITTEN = '{"command": "ls -la",   "description": "list"}'   # spacing no serialiser would choose

    def loop(self, change=None):
        self.fake.reply(self.fake.turn().tool_call("Bash", self.WRITTEN, call_id="call_written").completed(),
                        self.fake.turn().text("done").completed())
        first = dict(BASIC, tools=[BASH_TOOL], messages=[user("list the files")])
        reply = self.post(first).json()
        call = next(b for b in reply["content"] if b["type"] == "tool_use")
        if change:
            call = dict(call, input=dict(call["input"], **change))
        result = {"type": "tool_result", "tool_use_id": call["id"], "content": "a b c"}
        self.assertEqual(self.post(dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}])).status, 200)
        return next(i for i in self.sent()["input"] if i["type"] == "function_call")["arguments"]

    def test_a_tool_call_goes_back_with_the_arguments_the_model_wrote(self):
        self.assertEqual(self.loop(), self.WRITTEN)

    def test_a_call_the_client_changed_goes_back_as_the_client_sent_it(self):
        self.assertEqual(json.loads(self.loop(change={"command": "ls"})), {"command": "ls", "description": "list"})

    def test_the_cache_key_does_not_move_with_cache_control(self):
        text = "Refactor the parser."
        spellings = [text, [{"type": "text", "text": text}],
                     [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]]
        keys = {cp.prompt_cache_key(dict(BASIC, messages=[user(content)]), {}) for content in spellings}
        self.assertEqual(len(keys), 1, "one conversation, one key")
        other = cp.prompt_cache_key(dict(BASIC, messages=[user("Something else.")]), {})
        self.assertNotIn(other, keys)

    def test_the_reasoning_of_a_reply_of_text_only_goes_back_with_it(self):
        self.fake.reply(self.fake.turn().reasoning(encrypted="gAAAAB-final-thoughts").text("All done.").completed(),
                        self.fake.turn().text("You are welcome.").completed())
        first = dict(BASIC, messages=[user("tidy up")])   # no thinking asked: the reasoning stays hidden
        reply = self.post(first).json()
        self.assertEqual(reply["content"], [{"type": "text", "text": "All done."}])
        self.assertEqual(self.post(dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": reply["content"]}, user("thanks")])).status, 200)
        self.assertEqual([(i["type"], i.get("encrypted_content")) for i in self.sent()["input"]], [
            ("message", None), ("reasoning", "gAAAAB-final-thoughts"), ("message", None), ("message", None)])

    def test_a_restart_between_two_prompts_changes_nothing_that_is_sent(self):
        spaced = '{"command": "ls", "description": "list"}'
        self.fake.reply(self.fake.turn().reasoning(encrypted="gAAAAB-why-ls").tool_call("Bash", spaced, call_id="call_r1")
                        .completed(),
                        self.fake.turn().reasoning(encrypted="gAAAAB-why-done").text("Listed.").completed())
        body = dict(BASIC, tools=[BASH_TOOL], messages=[user("list the files")])
        for _ in range(2):   # the tool loop of the first prompt, without thinking
            reply = self.post(body).json()
            body = dict(body, messages=body["messages"] + [{"role": "assistant", "content": reply["content"]}])
            if reply["stop_reason"] == "tool_use":
                body["messages"].append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_r1", "content": "a.txt"}]})
        second = dict(body, messages=body["messages"] + [user("now count them")])
        sent = []
        for proxy in (self.proxy, self.restarted()):
            self.proxy = proxy
            self.fake.reply(self.fake.turn().text("One.").completed())
            self.assertEqual(self.post(second).status, 200)
            sent.append(cp.json_bytes({k: self.sent()[k] for k in ("input", "tools", "prompt_cache_key")}))
        self.assertEqual(sent[0], sent[1], "the restarted proxy sends what the first one sent")
        self.assertIn(b'"arguments":"{\\"command\\": \\"ls\\", \\"description\\": \\"list\\"}"', sent[1])
        self.assertEqual(sent[1].count(b"gAAAAB-why-"), 2)

    def test_the_kept_files_hold_no_conversation_text_and_stay_bounded(self):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-kept-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        reasoning = cp.ReasoningCache(home / "reasoning.jsonl", max_file_bytes=20000)
        arguments = cp.WrittenArguments(home / "arguments.jsonl", max_file_bytes=8000)
        for n in range(400):
            reasoning.remember("gpt-5.5", "acct", [("gAAAAB-%04d" % n, ["toolu_SECRET_%d" % n]),
                                                   ("gAAAAB-text-%04d" % n, [cp.reply_key("k", ["SECRET reply %d" % n])])])
            arguments.remember([("toolu_SECRET_%d" % n, '{"path": "/home/SECRET/%d", "note": "Z\u00fcrich"}' % n)])
        for path, bound in ((home / "reasoning.jsonl", 20000), (home / "arguments.jsonl", 8000)):
            data = path.read_bytes()
            self.assertLessEqual(len(data), bound, path.name)
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
            self.assertNotIn(b"SECRET", data)
            self.assertNotIn(b"rich", data)
            for line in data.splitlines():
                self.assertLessEqual(set(json.loads(line)), {"k", "m", "a", "e", "t", "s", "d"})
        again = cp.ReasoningCache(home / "reasoning.jsonl")
        self.assertEqual(again.recall("toolu_SECRET_399", "gpt-5.5", "acct"), "gAAAAB-0399")
        self.assertEqual(again.recall(cp.reply_key("k", ["SECRET reply 399"]), "gpt-5.5", "acct"), "gAAAAB-text-0399")
        self.assertIsNone(again.recall("toolu_SECRET_399", "gpt-5.5", "other-login"))
        self.assertIsNone(again.recall("toolu_SECRET_0", "gpt-5.5", "acct"), "rewritten with the newest only")
        spelled = cp.WrittenArguments(home / "arguments.jsonl")
        value = {"path": "/home/SECRET/399", "note": "Zürich"}
        self.assertEqual(spelled.spelled("toolu_SECRET_399", value), '{"path": "/home/SECRET/399", "note": "Zürich"}')
        self.assertIsNone(spelled.spelled("toolu_SECRET_399", dict(value, note="changed")))
        with open(str(home / "reasoning.jsonl"), "ab") as f:   # a week old, and a line a crash cut short
            f.write(json.dumps({"k": cp.kept_key("old"), "m": "gpt-5.5", "a": "acct", "e": "gAAAAB-old",
                                "t": int(time.time()) - 8 * 86400}).encode() + b'\n{"k": "cut')
        later = cp.ReasoningCache(home / "reasoning.jsonl")
        self.assertIsNone(later.recall("old", "gpt-5.5", "acct"))
        later.remember("gpt-5.5", "acct", [("gAAAAB-after", ["toolu_after"])])
        self.assertEqual(cp.ReasoningCache(home / "reasoning.jsonl").recall("toolu_after", "gpt-5.5", "acct"),
                         "gAAAAB-after")

    def test_the_arguments_kept_are_bounded(self):
        kept = cp.WrittenArguments(max_items=3, max_bytes=100)
        kept.remember([("a", "x" * 40), ("b", "y" * 40), ("c", "z" * 40)])
        self.assertEqual((kept.recall("a"), len(kept.items), kept.bytes), (None, 2, 80), "the oldest went first")
        kept.remember([("d", "1"), ("e", "2")])
        self.assertEqual(list(kept.items), ["c", "d", "e"])


class TestCountTokensCalibration(ProxyCase):

    def test_estimate_moves_within_5_percent_of_the_backend_count_after_two_turns(self):
        self.fake.counts_tokens = True
        session = {"X-Claude-Code-Session-Id": "calibrate-" + secrets.token_hex(4)}
        base = claude_code_body("02-tool-turn1-request.json")
        turns = [base["messages"]]
        for n in range(3):
            turns.append(turns[-1] + [{"role": "assistant", "content": "Step %d done: " % n + "detail " * (40 * (n + 1))},
                                      user("Continue with part %d of the plan, keeping the earlier notes. " % n * (n + 1))])

        def body(messages):
            return dict(base, messages=messages, stream=False)

        def backend_count(messages):
            codex, _ = cp.translate_request(body(messages), session, self.config, self.proxy.catalog.current())
            return self.fake.count_input(codex)

        def local(messages):
            return self.post(body(messages), path="/v1/messages/count_tokens", headers=session).json()["input_tokens"]

        first_error = abs(local(turns[0]) - backend_count(turns[0])) / backend_count(turns[0])
        for messages in turns[:2]:   # two real turns teach the proxy how this backend counts
            self.fake.reply(self.fake.turn().text("ok").completed())
            self.assertEqual(self.post(body(messages), headers=session).status, 200)
        estimate, actual = local(turns[3]), backend_count(turns[3])
        error = abs(estimate - actual) / actual
        self.assertGreater(first_error, 0.05, "the uncalibrated estimate is off, so this test shows something")
        self.assertLess(error, 0.05)
        report("count_tokens: %.1f%% off before calibration, %.1f%% off after two turns (%d vs %d)"
               % (first_error * 100, error * 100, estimate, actual))


# ---------------------------------------------------------------------------
# Stream translation (the reducer, pure) and web search
# ---------------------------------------------------------------------------

class TestStreamTranslation(unittest.TestCase):

    def test_recorded_reasoning_and_function_call_stream(self):
        upstream = upstream_events_from_file(fixture("responses", "platform_responses_stream_reasoning_function_call.sse"))
        events, message = translate_events(self, upstream)
        self.assertEqual([b["type"] for b in message["content"]], ["thinking", "tool_use"])
        thinking, call = message["content"]
        done = [e for e in upstream if e["type"] == "response.output_item.done"]
        self.assertEqual(thinking["signature"], cp.thinking_signature("gpt-5.5", done[0]["item"]["encrypted_content"]))
        self.assertNotEqual(done[0]["item"]["encrypted_content"], upstream[2]["item"]["encrypted_content"],
                            "the done blob differs from the added one, and the done one is kept")
        self.assertEqual(call, {"type": "tool_use", "id": "call_5dp5Uj0Loqn1YcyIpqSq6sLX", "name": "get_weather",
                                "input": {"location": "New York City, USA"}})
        deltas = [e for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
        self.assertEqual(len(deltas), 12, "arguments stream as they arrive, one delta per upstream delta")
        self.assertEqual(message["stop_reason"], "tool_use")
        usage = upstream[-1]["response"]["usage"]
        self.assertEqual(message["usage"], {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                                            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})

    def test_recorded_text_stream(self):
        upstream = upstream_events_from_file(fixture("responses", "platform_responses_stream_text_after_tool_output.sse"))
        events, message = translate_events(self, upstream)
        self.assertEqual(message["content"], [{"type": "text", "text": "Current weather in New York City, USA: Sunny."}])
        self.assertEqual(message["stop_reason"], "end_turn")
        self.assertEqual(sum(1 for e in events if e["type"] == "content_block_delta"), 11)
        self.assertEqual(message["usage"]["input_tokens"], 114)

    def test_codex_cli_fixture_with_only_done_items(self):
        upstream = upstream_events_from_file(fixture("responses", "codex_cli_responses_fixture_synthetic.sse"))
        _, message = translate_events(self, upstream)
        self.assertEqual(message["content"], [{"type": "text", "text": "fixture hello"}])
        self.assertEqual(message["stop_reason"], "end_turn")

    def test_arguments_come_from_the_done_item_when_no_deltas_arrive(self):
        turn = Turn().tool_call("Bash", {"command": "echo 1"}, deltas=False)
        events, message = translate_events(self, turn.completed())
        self.assertEqual(message["content"][0]["input"], {"command": "echo 1"})
        self.assertEqual([e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"],
                         ['{"command": "echo 1"}'])

    def test_items_only_in_the_completed_snapshot_are_emitted(self):
        turn = Turn()
        turn.output.append({"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "Bash",
                            "arguments": '{"command":"x"}', "status": "completed"})
        _, message = translate_events(self, turn.completed())
        self.assertEqual(message["content"], [{"type": "tool_use", "id": "call_1", "name": "Bash",
                                               "input": {"command": "x"}}])
        self.assertEqual(message["stop_reason"], "tool_use")

    def test_parallel_tool_calls_keep_call_ids(self):
        turn = Turn().text("Running both.").tool_call("Bash", {"command": "a"}, call_id="call_A") \
                     .tool_call("Read", {"file_path": "/b"}, call_id="call_B")
        _, message = translate_events(self, turn.completed())
        self.assertEqual([(b["type"], b.get("id")) for b in message["content"]],
                         [("text", None), ("tool_use", "call_A"), ("tool_use", "call_B")])
        self.assertEqual(message["content"][2]["input"], {"file_path": "/b"})

    def test_interleaved_items_are_serialized_one_block_at_a_time(self):
        add = lambda i, item: {"type": "response.output_item.added", "output_index": i, "item": item}
        done = lambda i, item: {"type": "response.output_item.done", "output_index": i, "item": item}
        a = {"id": "fc_a", "type": "function_call", "call_id": "call_a", "name": "Bash", "arguments": '{"command":"a"}'}
        b = {"id": "fc_b", "type": "function_call", "call_id": "call_b", "name": "Bash", "arguments": '{"command":"b"}'}
        arg = lambda i, d: {"type": "response.function_call_arguments.delta", "output_index": i, "delta": d}
        upstream = [add(0, dict(a, arguments="")), add(1, dict(b, arguments="")), arg(1, '{"command":'),
                    arg(0, '{"command":'), arg(1, '"b"}'), arg(0, '"a"}'), done(1, b), done(0, a),
                    {"type": "response.completed", "response": {"usage": {}}}]
        _, message = translate_events(self, upstream)
        self.assertEqual([(b["id"], b["input"]) for b in message["content"]],
                         [("call_a", {"command": "a"}), ("call_b", {"command": "b"})])

    def test_whitespace_only_text_is_never_a_block(self):
        _, message = translate_events(self, Turn().text("  \n ").tool_call("Bash", {}).completed())
        self.assertEqual([b["type"] for b in message["content"]], ["tool_use"])
        _, message = translate_events(self, Turn().text("\n\nHello").completed())
        self.assertEqual(message["content"], [{"type": "text", "text": "\n\nHello"}])

    def test_usage_reports_cached_tokens_apart(self):
        _, message = translate_events(self, Turn().text("ok").completed(input_tokens=1000, cached=800, output_tokens=42))
        self.assertEqual(message["usage"], {"input_tokens": 200, "cache_read_input_tokens": 800,
                                            "cache_creation_input_tokens": 0, "output_tokens": 42})

    def test_stop_reasons(self):
        cases = [(Turn().text("partial").incomplete("max_output_tokens"), "max_tokens"),
                 (Turn().text("partial").incomplete("content_filter"), "refusal"),
                 (Turn().text("done").completed(), "end_turn"),
                 (Turn().tool_call("Bash", {}).completed(), "tool_use")]
        for upstream, stop in cases:
            _, message = translate_events(self, upstream)
            self.assertEqual(message["stop_reason"], stop)
        refusal = Turn()
        refusal.add("response.output_item.added", output_index=0, item={"id": "msg_r", "type": "message", "content": []})
        refusal.add("response.refusal.delta", output_index=0, item_id="msg_r", delta="I can't help with that.")
        refusal.add("response.output_item.done", output_index=0, item={"id": "msg_r", "type": "message", "content": [
            {"type": "refusal", "refusal": "I can't help with that."}]})
        _, message = translate_events(self, refusal.completed())
        self.assertEqual((message["stop_reason"], message["content"][0]["text"]), ("refusal", "I can't help with that."))

    def test_stop_sequence_cuts_text_across_deltas(self):
        context = cp.RequestContext("m", "gpt-5.5", {}, False, ["STOP", "##"], "k")
        upstream = Turn().text("Hello wor", pieces=1)
        upstream.events[-3:-3] = [{"type": "response.output_text.delta", "output_index": 0, "item_id": "x", "delta": d}
                                  for d in ["ld ST", "OP and more"]]
        events, message = translate_events(self, upstream.completed(), context)
        self.assertEqual(message["content"], [{"type": "text", "text": "Hello world "}])
        self.assertEqual((message["stop_reason"], message["stop_sequence"]), ("stop_sequence", "STOP"))
        self.assertEqual(events[-1]["type"], "message_stop")
        _, message = translate_events(self, Turn().text("no match here #", pieces=5).completed(), context)
        self.assertEqual((message["content"][0]["text"], message["stop_reason"]), ("no match here #", "end_turn"))

    def test_thinking_blocks_only_when_the_client_asked_for_thinking(self):
        upstream = Turn().reasoning(["plan"]).text("answer").completed()
        hidden = cp.RequestContext("m", "gpt-5.5", {}, False, [], "k")
        _, message = translate_events(self, upstream, hidden)
        self.assertEqual(message["content"], [{"type": "text", "text": "answer"}])
        _, message = translate_events(self, Turn().reasoning(["First.", "Second."]).text("a").completed())
        self.assertEqual(message["content"][0]["thinking"], "First.\n\nSecond.")

    def test_reasoning_without_summary_gives_an_empty_signed_thinking_block(self):
        turn = Turn().reasoning([], encrypted="gAAAAB-blob").text("hi")
        _, message = translate_events(self, turn.completed())
        self.assertEqual(message["content"][0], {"type": "thinking", "thinking": "",
                                                 "signature": "cxp1:gpt-5.5:gAAAAB-blob"})

    def test_streaming_and_non_streaming_agree(self):
        upstream = Turn().reasoning(["why"]).text("Here.").tool_call("Bash", {"command": "ls"}).completed(cached=10)
        events, message = translate_events(self, upstream)
        self.assertEqual(message["content"][1], {"type": "text", "text": "Here."})
        self.assertEqual(message["stop_reason"], "tool_use")
        self.assertEqual(events[-2]["usage"], message["usage"])

    def test_failed_events_raise_the_errors_claude_code_acts_on(self):
        expected = {"rate_limit_exceeded": (429, "rate_limit_error"),
                    "context_length_exceeded": (400, "invalid_request_error"),
                    "insufficient_quota": (429, "rate_limit_error"),
                    "cyber_policy": (400, "invalid_request_error"),
                    "invalid_prompt": (400, "invalid_request_error"),
                    "bio_policy": (400, "invalid_request_error")}
        lines = fixture("responses", "codex_response_failed_examples.jsonl").read_text().splitlines()
        for line in lines:
            event = json.loads(line)
            code = event["response"]["error"]["code"]
            translator = cp.ResponseTranslator(cp.RequestContext("m", "gpt-5.5", {}, True, [], "k"))
            with self.assertRaises(cp.CodexFailure) as caught:
                translator.feed(event)
            error = caught.exception.error
            self.assertEqual((error.status, error.error_type), expected[code], code)
            self.assertTrue(error.message.strip(), code)
            if code == "rate_limit_exceeded":
                self.assertEqual(error.headers["retry-after"], "12")
            if code == "context_length_exceeded":
                self.assertRegex(error.message, r"^prompt is too long: \d+ tokens > 272000 maximum$")


class TestCodexCliStreams(unittest.TestCase):
    """The 51 Responses streams from the Codex CLI's own tests: each becomes a valid
    Anthropic stream, or the documented error."""

    DOCUMENTED = {400: "invalid_request_error", 402: "billing_error", 429: "rate_limit_error",
                  500: "api_error", 529: "overloaded_error"}

    def run_fixture(self, path, thinking):
        context = cp.RequestContext("claude-opus-4-8", "gpt-5.5", {"shell": "Bash"}, thinking, [], "key")
        translator = cp.ResponseTranslator(context)
        out = []
        try:
            for event in upstream_events_from_file(path):
                out.extend(translator.feed(event))
        except cp.CodexFailure as failure:
            error = failure.error
            self.assertEqual(self.DOCUMENTED.get(error.status), error.error_type, path.name)
            self.assertTrue(error.message.strip(), path.name)
            return "error %d" % error.status, error
        if not translator.finished:   # the relay retries, then answers "ended before the reply was complete"
            return "cut", None
        message = cp.fold_message(check_stream(self, sse_bytes(out)))
        self.assertEqual(message["stop_reason"] is not None, True, path.name)
        return "message", message

    def test_every_codex_cli_stream_translates(self):
        paths = sorted(fixture("codex-cli").glob("*.sse"))
        self.assertEqual(len(paths), 51)
        outcomes = collections.Counter()
        for path in paths:
            for thinking in (False, True):
                with self.subTest(fixture=path.name, thinking=thinking):
                    outcome, _ = self.run_fixture(path, thinking)
                    outcomes[outcome] += 1
        report("codex-cli streams: 51 fixtures x thinking off/on -> %s" % dict(outcomes))

    def test_quota_fixtures_are_final(self):
        for name in ("api__failed_insufficient_quota.sse", "suite__quota_exceeded.sse"):
            outcome, error = self.run_fixture(fixture("codex-cli", name), False)
            self.assertEqual(outcome, "error 429")
            self.assertEqual(error.headers, {"x-should-retry": "false"})

    def test_argument_deltas_without_an_item_give_no_tool_call(self):
        outcome, message = self.run_fixture(fixture("codex-cli", "api__parses_tool_call_input_deltas.sse"), False)
        self.assertEqual((outcome, message["content"], message["stop_reason"]), ("message", [], "end_turn"))

    def test_errors_and_cut_streams_are_the_documented_ones(self):
        expected = {"api__failed_context_length_exceeded.sse": "error 400", "api__failed_cyber_policy.sse": "error 400",
                    "api__failed_rate_limit_exceeded.sse": "error 429", "api__error_when_missing_completed.sse": "cut",
                    "suite__client_context_window_failed.sse": "error 400", "hist__core_incomplete_sse.sse": "cut"}
        for name, outcome in expected.items():
            self.assertEqual(self.run_fixture(fixture("codex-cli", name), False)[0], outcome, name)


WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}


class TestWebSearch(ProxyCase):

    def searched(self):
        turn = self.fake.turn().web_search("codex proxy").text(
            "The proxy is documented at Example Docs, see also Other Site.",
            citations=[("https://example.com/docs", "Example Docs", "Example Docs"),
                       ("https://other.example/page", "Other Site", "Other Site")])
        return turn.completed()

    def test_search_becomes_server_tool_use_then_results_then_cited_text(self):
        context = cp.RequestContext("m", "gpt-5.5", {}, False, [], "k")
        events, message = translate_events(self, self.searched(), context)
        kinds = [b["type"] for b in message["content"]]
        self.assertEqual(kinds, ["server_tool_use", "web_search_tool_result", "text"])
        use, result, text = message["content"]
        self.assertRegex(use["id"], r"^srvtoolu_[a-f0-9]{24}$")
        self.assertEqual((use["name"], use["input"]), ("web_search", {"query": "codex proxy"}))
        self.assertEqual(result["tool_use_id"], use["id"])
        self.assertEqual([(r["url"], r["title"], r["page_age"]) for r in result["content"]],
                         [("https://example.com/docs", "Example Docs", None), ("https://other.example/page", "Other Site", None)])
        for page in result["content"]:
            self.assertEqual(page["type"], "web_search_result")
            self.assertTrue(page["encrypted_content"])
        self.assertEqual([c["type"] for c in text["citations"]], ["web_search_result_location"] * 2)
        self.assertEqual(text["citations"][0]["cited_text"], "Example Docs")
        self.assertTrue(text["citations"][0]["encrypted_index"])
        self.assertEqual(message["usage"]["server_tool_use"], {"web_search_requests": 1})
        query_deltas = [e for e in events if e["type"] == "content_block_delta" and e["index"] == 0]
        self.assertEqual([d["delta"]["type"] for d in query_deltas], ["input_json_delta"])

    def test_failed_search_and_search_before_a_tool_call(self):
        turn = self.fake.turn().web_search("nothing", status="failed").tool_call("Bash", {"command": "ls"})
        _, message = translate_events(self, turn.completed())
        self.assertEqual([b["type"] for b in message["content"]], ["server_tool_use", "web_search_tool_result", "tool_use"])
        self.assertEqual(message["content"][1]["content"], {"type": "web_search_tool_result_error", "error_code": "unavailable"})
        two = self.fake.turn().web_search("first").web_search("second", sources=[{"url": "https://s.example", "title": "S"}])
        _, message = translate_events(self, two.text("Answer.").completed())
        results = [b["content"] for b in message["content"] if b["type"] == "web_search_tool_result"]
        self.assertEqual([[r["url"] for r in found] for found in results], [[], ["https://s.example"]])
        self.assertEqual(message["usage"]["server_tool_use"], {"web_search_requests": 2})

    def test_web_search_tool_goes_upstream_and_both_modes_agree(self):
        body = claude_code_body("07-websearch-nested-request.json")
        body = dict(body, tools=[dict(WEB_SEARCH_TOOL, allowed_domains=["example.com"],
                                      user_location={"type": "approximate", "country": "NO", "city": "Oslo"})])
        events = self.searched()
        self.fake.reply(events, events)
        streamed = cp.fold_message(self.stream(body))
        self.assertEqual(self.sent()["tools"], [{"type": "web_search", "external_web_access": True,
                                                 "filters": {"allowed_domains": ["example.com"]},
                                                 "user_location": {"type": "approximate", "country": "NO", "city": "Oslo"}}])
        plain = self.post(dict(body, stream=False)).json()
        self.assertEqual([b["type"] for b in plain["content"]], ["server_tool_use", "web_search_tool_result", "text"])
        plain.pop("id"), streamed.pop("id")
        self.assertEqual(plain, streamed)

    def test_history_with_search_blocks_is_accepted(self):
        context = cp.RequestContext("m", "gpt-5.5", {}, False, [], "k")
        _, message = translate_events(self, self.searched(), context)
        self.fake.reply(self.fake.turn().text("Thanks.").completed())
        follow = dict(BASIC, tools=[WEB_SEARCH_TOOL], messages=[
            user("search it"), {"role": "assistant", "content": message["content"]}, user("and now?")])
        self.assertEqual(self.post(follow).status, 200)
        sent = [(i["type"], i.get("role")) for i in self.sent()["input"]]
        self.assertEqual(sent, [("message", "user"), ("message", "assistant"), ("message", "user")])


# ---------------------------------------------------------------------------
# Upstream client: reading the stream, the failure table, errors, timeouts, faults, the model catalog
# ---------------------------------------------------------------------------

class TestReadingTheUpstream(unittest.TestCase):
    """The backend's SSE body is read a socket read at a time: its chunks undone over all
    that one read brought, the events that came together handed on together, the
    connection reusable after the last chunk, and a body cut short or malformed an error."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    def events(self, n, size=40):
        return [{"type": "response.output_text.delta", "n": i, "delta": "é" + "x" * size} for i in range(n)]

    def chunked(self, events, extension=b"", trailer=b""):
        body = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in
                        (sse_bytes([event]) for event in events))
        return body + b"0\r\n" + trailer + b"\r\n"

    def reply(self, data):
        """An HTTPResponse reading ``data`` from a socket, after its head."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.sendall(data)
        response = http.client.HTTPResponse(ours)
        response.begin()
        return response, theirs

    def test_events_that_arrive_together_come_out_together(self):
        first, second = self.events(6, size=20), self.events(3, size=20)
        split = len(self.chunked(first)) - len(b"0\r\n\r\n")
        body = self.chunked(first + second)
        self.assertLess(split, 2048, "within one read")
        response, theirs = self.reply(self.HEAD + body[:split])
        batches = cp.read_sse(response)
        self.assertEqual(next(batches), first, "one read, one list, in order")
        theirs.sendall(body[split:])
        self.assertEqual(next(batches), second)
        self.assertEqual(list(batches), [])
        self.assertTrue(response.isclosed(), "closed after the last chunk, so the connection can be reused")

    def test_a_backlog_is_read_a_few_events_at_a_time(self):
        events = self.events(200)
        response, _ = self.reply(self.HEAD + self.chunked(events))
        batches = list(cp.read_sse(response))
        self.assertEqual([e for batch in batches for e in batch], events)
        self.assertLess(max(len(batch) for batch in batches), 40, "a read takes at most 2 KB")
        self.assertGreater(max(len(batch) for batch in batches), 1)

    def test_chunks_split_anywhere_with_extensions_and_trailers_read_whole(self):
        events = self.events(40, size=700)
        for extension, trailer in ((b"", b""), (b";name=value", b"X-Trailer: 1\r\n")):
            data = self.HEAD + self.chunked(events, extension, trailer)
            for step in (1, 7, 4096):
                with self.subTest(extension=extension, step=step):
                    response = http.client.HTTPResponse(TrickleSocket(data, step))
                    response.begin()
                    self.assertEqual([e for batch in cp.read_sse(response) for e in batch], events)
                    self.assertTrue(response.isclosed())

    def test_a_body_cut_short_or_malformed_is_an_error_not_an_end(self):
        body = self.chunked(self.events(3))
        for data, error in ((body[:len(body) // 2], http.client.IncompleteRead),
                            (b"zz\r\nabc\r\n", ValueError), (b"9" * 5000, ValueError)):
            with self.subTest(data=data[:20]):
                response, theirs = self.reply(self.HEAD + data)
                theirs.shutdown(socket.SHUT_WR)
                with self.assertRaises(error):
                    list(cp.read_sse(response))

    def test_a_body_with_a_length_is_read_as_it_comes(self):
        events = self.events(12)
        body = sse_bytes(events)
        response, _ = self.reply(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual([e for batch in cp.read_sse(response) for e in batch], events)

    def test_json_is_written_as_json_dumps_writes_it(self):
        for doc in ({"a": 1.5, "b": [1, 2, {"c": "é\ud800"}], "n": None, "t": True, "x": float("nan")}, "s", 3,
                    [1e100, -0.0, 10 ** 30], {1: "an int key"}, {"k": "\u2028\x00\"\\"}, {}, []):
            self.assertEqual(cp.json_bytes(doc), json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
                             .encode("utf-8", "replace"))
        with self.assertRaises(TypeError):
            cp.json_bytes({"a": object()})


class TestUpstreamFailureTable(unittest.TestCase):
    """One table from a Codex failure to the Anthropic error and the relay's verdict."""

    def test_an_http_error_and_the_same_failure_in_the_stream_map_alike(self):
        for code in cp.BACKEND_CODES:
            body = json.dumps({"error": {"code": code, "message": "Try again in 3 seconds."}}).encode()
            http_side = cp.upstream_http_error(400, body, {}, None)
            stream_side = cp.upstream_failure({"code": code, "message": "Try again in 3 seconds."}, None)
            self.assertEqual((http_side.error.status, http_side.error.error_type, http_side.error.message[:60],
                              http_side.retryable, http_side.rest is None),
                             (stream_side.error.status, stream_side.error.error_type, stream_side.error.message[:60],
                              stream_side.retryable, stream_side.rest is None), code)

    def test_every_row_answers_with_a_known_error_type_and_final_rows_say_no_retry(self):
        for kind, (status, error_type, _, after, rest) in cp.CODEX_FAILURES.items():
            failure = cp.codex_failure(kind, "m", status=500)
            self.assertEqual(cp.ERROR_TYPES[failure.error.status], error_type, kind)
            self.assertEqual(failure.error.headers.get("x-should-retry") == "false", after == cp.FINAL
                             or (kind == "usage_limit_reached" and failure.rest > 60), kind)
            self.assertEqual(failure.retryable, after == cp.RETRY, kind)
            self.assertTrue(failure.error.message.strip(), kind)

    def test_the_rows_say_how_long_a_login_rests(self):
        self.assertEqual(cp.codex_failure("login_refused").rest, 600)
        self.assertEqual(cp.codex_failure("insufficient_quota").rest, 3600)
        self.assertEqual(cp.codex_failure("usage_limit_reached", error={"resets_in_seconds": 120}).rest, 120)
        self.assertIsNone(cp.codex_failure("rate_limit_exceeded").rest)

    def test_an_unknown_backend_code_is_a_retryable_failure(self):
        failure = cp.upstream_failure({"code": "server_error", "message": "boom"}, None)
        self.assertEqual((failure.error.status, failure.error.message, failure.retryable),
                         (500, "The Codex backend failed: boom", True))


class TestUpstreamErrors(ProxyCase):

    def error_of(self, answer, status, error_type):
        self.assertEqual(answer.status, status, answer.body)
        doc = answer.json()
        self.assertEqual(doc["error"]["type"], error_type)
        return doc["error"]["message"]

    def test_usage_limit_becomes_429_with_retry_after(self):
        recorded = json.loads(fixture("responses", "chatgpt_codex_usage_limit_reached_plus_2026-05-04.json").read_text())
        self.fake.reply(Reply(status=429, body={"error": recorded["error"]}, headers=recorded["headers"]))
        answer = self.post(dict(BASIC, stream=True))
        message = self.error_of(answer, 429, "rate_limit_error")
        self.assertEqual(answer.headers["retry-after"], "13872")
        self.assertEqual(answer.headers["x-should-retry"], "false")
        self.assertIn("plus", message)
        self.assertIn("3 h 51 min", message)
        self.assertEqual(len(self.fake.requests), 1, "a usage limit is not retried")
        free = json.loads(fixture("responses", "chatgpt_codex_http429_body_free_2026-03-28.json").read_text())
        self.fake.reply(Reply(status=429, body=free))
        answer = self.post(BASIC)
        self.error_of(answer, 429, "rate_limit_error")
        self.assertEqual(answer.headers["retry-after"], "602705")

    def test_context_overflow_becomes_prompt_is_too_long(self):
        for stream in (True, False):
            self.fake.reply(self.fake.turn().failed("context_length_exceeded", "Your input exceeds the context window"))
            answer = self.post(dict(BASIC, stream=stream, messages=[user("x " * 100)]))
            message = self.error_of(answer, 400, "invalid_request_error")
            self.assertRegex(message, r"^prompt is too long: \d+ tokens > 272000 maximum$")
            match = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", message)
            self.assertGreater(int(match.group(1)), int(match.group(2)))

    def test_overloaded_upstream_becomes_529(self):
        line = fixture("responses", "codex_http_error_examples.jsonl").read_text().splitlines()[0]
        recorded = json.loads(line)
        self.fake.reply(Reply(status=recorded["status"], body=recorded["body"]))
        self.error_of(self.post(dict(BASIC, stream=True)), 529, "overloaded_error")
        self.assertEqual(len(self.fake.requests), 1)

    def test_5xx_then_success_is_retried(self):
        self.fake.reply(Reply(status=500, body={"detail": "boom"}), Reply(status=502, body=b"bad gateway"),
                        self.fake.turn().text("recovered").completed())
        events = self.stream(BASIC)
        self.assertEqual(cp.fold_message(events)["content"], [{"type": "text", "text": "recovered"}])
        self.assertEqual(len(self.fake.requests), 3)

    def test_5xx_forever_gives_529_after_bounded_retries(self):
        self.fake.reply(*[Reply(status=500, body={"detail": "down"}) for _ in range(6)])
        started = time.monotonic()
        message = self.error_of(self.post(dict(BASIC, stream=True)), 529, "overloaded_error")
        self.assertIn("HTTP 500", message)
        self.assertEqual(len(self.fake.requests), self.config.retries + 1)
        self.assertLess(time.monotonic() - started, 5)

    def test_model_not_available_on_the_plan_names_model_and_fix(self):
        message = self.error_of(self.post(dict(BASIC, model="gpt-5.3-codex")), 400, "invalid_request_error")
        self.assertIn("gpt-5.3-codex", message)
        self.assertIn("CODEX_PROXY_OPUS_MODEL", message)

    def test_upstream_400_detail_is_shown_and_not_retried(self):
        self.fake.reply(Reply(status=400, body={"detail": "Unsupported parameter: foo"}))
        answer = self.post(BASIC)
        self.assertIn("Unsupported parameter: foo", self.error_of(answer, 400, "invalid_request_error"))
        self.assertEqual(answer.headers["x-should-retry"], "false")

    def test_failure_after_output_is_one_error_event_and_no_message_stop(self):
        turn = self.fake.turn().text("partial answer")
        self.fake.reply(turn.failed("server_is_overloaded", "busy"))
        events = self.stream(BASIC)
        self.assertEqual(events[-1], {"type": "error", "error": {"type": "overloaded_error", "message": events[-1]["error"]["message"]}})
        self.assertNotIn("message_stop", [e["type"] for e in events])

    def test_failure_in_the_same_read_as_the_output_still_streams_the_output(self):
        turn = self.fake.turn().text("partial answer")
        self.fake.reply(Reply(events=sse_bytes(turn.failed("server_is_overloaded", "busy"))))   # one write, one read
        events = self.stream(BASIC)
        self.assertEqual("".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"),
                         "partial answer")
        self.assertEqual(events[-1]["type"], "error")
        self.assertNotIn("message_stop", [e["type"] for e in events])

    def test_failure_before_output_in_a_stream_is_an_http_error(self):
        self.fake.reply(self.fake.turn().failed("server_is_overloaded", "busy"))
        self.error_of(self.post(dict(BASIC, stream=True)), 529, "overloaded_error")

    def test_unknown_failure_before_output_is_retried(self):
        self.fake.reply(self.fake.turn().failed("server_error", "oops"), self.fake.turn().text("second try").completed())
        answer = self.post(BASIC)
        self.assertEqual(answer.json()["content"][0]["text"], "second try")

    def test_truncated_stream_before_output_is_retried(self):
        self.fake.reply(Reply(events=self.fake.turn().text("lost").completed(), cut_after=1),
                        self.fake.turn().text("whole").completed())
        self.assertEqual(cp.fold_message(self.stream(BASIC))["content"][0]["text"], "whole")
        self.assertEqual(len(self.fake.requests), 2)

    def test_truncated_stream_after_output_ends_with_an_error_event(self):
        events = self.fake.turn().text("cut in the middle", pieces=4).completed()
        first_delta = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.delta")
        self.fake.reply(Reply(events=events, cut_after=first_delta + 2))
        stream = self.stream(BASIC)
        self.assertEqual(stream[-1]["type"], "error")
        self.assertEqual(stream[-1]["error"]["type"], "api_error")
        self.assertNotIn("message_stop", [e["type"] for e in stream])

    def test_stream_that_ends_without_completion_is_not_a_success(self):
        events = self.fake.turn().text("no terminal event").events   # no response.completed
        self.fake.reply(events, self.fake.turn().text("fine").completed())
        stream = self.stream(BASIC)
        self.assertEqual(stream[-1]["type"], "error")
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 200, "non-streaming: the broken attempt is retried")


class TestUpstreamTimeouts(ProxyCase):
    settings = {"idle_timeout": 0.6, "ping_interval": 0.2, "retries": 1}

    def test_stall_before_output_is_retried_then_fails_cleanly(self):
        stalled = [Reply(events=self.fake.turn().text("x").completed(), stall_after=1) for _ in range(2)]
        self.fake.reply(*stalled)
        started = time.monotonic()
        answer = self.post(dict(BASIC, stream=True))
        self.assertEqual(answer.status, 500)
        self.assertIn("sent nothing for", answer.json()["error"]["message"])
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(len(self.fake.requests), 2)
        for reply in stalled:
            self.assertTrue(reply.client_left.wait(5), "the stalled upstream connection was closed")

    def test_stall_mid_stream_ends_with_an_error_event(self):
        events = self.fake.turn().text("half", pieces=2).completed()
        first_delta = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.delta")
        reply = self.fake.reply(Reply(events=events, stall_after=first_delta + 1))
        stream = self.stream(BASIC)
        self.assertEqual(stream[-1]["type"], "error")
        self.assertIn("ping", [e["type"] for e in stream], "pings kept the client informed meanwhile")
        self.assertTrue(reply.client_left.wait(5))


class TestUpstreamUnreachable(ProxyCase):

    @classmethod
    def setUpClass(cls):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        cls.dead_port = probe.getsockname()[1]
        probe.close()
        ProxyCase.setUpClass.__func__(cls)
        cls.config.upstream = "http://127.0.0.1:%d/backend-api/codex" % cls.dead_port
        cls.proxy.codex = cp.CodexClient(cls.config, cls.proxy.accounts)

    def test_connection_refused_is_retried_then_explained(self):
        started = time.monotonic()
        answer = self.post(dict(BASIC, stream=True))
        self.assertEqual(answer.status, 500)
        doc = answer.json()
        self.assertEqual(doc["error"]["type"], "api_error")
        self.assertIn("Cannot reach the Codex backend", doc["error"]["message"])
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(self.request("GET", "/health", key=None).status, 200, "the server keeps serving")


class TestUpstreamFaults(ProxyCase):
    """Each fault ends in the right Anthropic answer within a bounded time, and serving goes on."""

    settings = {"first_byte_timeout": 0.5, "idle_timeout": 0.6, "ping_interval": 0.2, "retries": 1}

    def run_fault(self, name, replies, stream=True, upstream=None):
        saved = self.proxy.codex
        if upstream:
            self.proxy.codex = cp.CodexClient(make_config(self.home, upstream), self.proxy.accounts)
        self.fake.reset()
        self.fake.reply(*replies)
        started = time.monotonic()
        try:
            answer = self.post(dict(BASIC, stream=stream))
        finally:
            self.proxy.codex = saved
            for reply in replies:
                if isinstance(reply, Reply):
                    reply.release.set()
        elapsed = time.monotonic() - started
        if answer.status == 200 and stream:
            events = check_stream(self, answer.body)
            outcome = events[-1]["error"]["type"] if events[-1]["type"] == "error" else "success"
        else:
            outcome = answer.json()["error"]["type"] if answer.status != 200 else "success"
        self.assertLess(elapsed, 5, name)
        self.assertEqual(self.request("GET", "/health", key=None).status, 200, "still serving after " + name)
        return "%d %s" % (answer.status, outcome), elapsed

    def test_every_upstream_fault_ends_cleanly(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d/backend-api/codex" % probe.getsockname()[1]
        probe.close()
        text = lambda: self.fake.turn().text("fine", pieces=3).completed()
        first_delta = next(i for i, e in enumerate(text()) if e["type"] == "response.output_text.delta")
        faults = [
            ("connection refused", [], "500 api_error", dict(upstream=dead)),
            ("reset mid-stream", [Reply(events=text(), cut_after=first_delta + 1)], "200 api_error", {}),
            ("5xx then success", [Reply(status=502, body=b"bad gateway"), text()], "200 success", {}),
            ("5xx forever", [Reply(status=500, body={"detail": "x"}) for _ in range(3)], "529 overloaded_error", {}),
            ("stall before the first byte", [Reply(stall_headers=True) for _ in range(2)], "500 api_error", {}),
            ("stall mid-stream", [Reply(events=text(), stall_after=first_delta + 1)], "200 api_error", {}),
            ("truncated SSE", [Reply(events=sse_bytes(text())[:-40])], "200 api_error", {}),
            ("response.failed", [self.fake.turn().failed("server_is_overloaded", "busy")], "529 overloaded_error", {}),
            ("response.failed after output", [self.fake.turn().text("half").failed("server_is_overloaded")],
             "200 overloaded_error", {}),
        ]
        lines = []
        for name, replies, expected, options in faults:
            with self.subTest(fault=name):
                outcome, elapsed = self.run_fault(name, replies, **options)
                self.assertEqual(outcome, expected, name)
                lines.append("%s -> %s in %.2f s" % (name, outcome, elapsed))
        self.assertEqual(self.proxy.crashes, 0)
        report("upstream faults: " + "; ".join(lines))


class TestModelsFollowTheBackend(ProxyCase):
    """The proxy presents today's Codex client, raised per model to the catalog's floor; a
    stale default follows the catalog; every Claude name maps somewhere; a model the backend
    serves only to a newer client heals by itself."""

    settings = {"models": {"opus": "gpt-6.2-sol", "sonnet": "gpt-6-sol", "haiku": "gpt-5.4-mini"}, "retries": 0}

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.catalog.refresh()
        self.proxy.said.clear()
        self.logged = []
        from unittest import mock
        patch = mock.patch.object(cp.ProxyHandler, "log", lambda handler, text: self.logged.append(text))
        patch.start()
        self.addCleanup(patch.stop)

    def test_the_newest_models_are_reachable_by_name_and_listed(self):
        for model in ("gpt-6-sol", "gpt-6.2-sol", "claude-opus-5-5"):
            self.fake.reply(self.fake.turn(model).text("served").completed())
            answer = self.post(dict(BASIC, model=model))
            self.assertEqual(answer.status, 200, answer.body[:300])
        self.assertEqual([r["body"]["model"] for r in self.fake.requests], ["gpt-6-sol", "gpt-6.2-sol", "gpt-6.2-sol"])
        listed = [m["id"] for m in self.request("GET", "/v1/models").json()["data"]]
        for model in ("gpt-6-sol", "gpt-6.2-sol", "gpt-6-luna", "gpt-5.5"):
            self.assertIn(model, listed)
        for hidden in ("codex-auto-review", "gpt-daybreak-blue-latest"):
            self.assertNotIn(hidden, listed)

    def test_one_client_version_everywhere(self):
        self.fake.reply(self.fake.turn("gpt-6-sol").text("ok").completed())
        self.post(dict(BASIC, model="gpt-6-sol"))
        headers = self.fake.requests[-1]["headers"]
        self.assertEqual(headers["version"], "0.171.0")
        self.assertTrue(headers["user-agent"].startswith("codex_cli_rs/0.171.0 ("), headers["user-agent"])
        self.assertIn("/backend-api/codex/models?client_version=0.171.0", self.fake.gets)

    def test_a_version_set_lower_is_raised_per_model_to_its_floor(self):
        config = make_config(self.home, self.fake.url, client_version="0.160.0", models=self.settings["models"])
        catalog = {m["slug"]: m for m in FAKE_CATALOG}
        self.assertEqual(cp.translate_request(dict(BASIC, model="gpt-6.2-sol"), {}, config, catalog)[1].client_version,
                         "0.166.0")
        self.assertEqual(cp.translate_request(dict(BASIC, model="gpt-5.5"), {}, config, catalog)[1].client_version,
                         "0.160.0")

    def test_a_model_served_only_to_a_newer_client_heals_by_itself(self):
        self.fake.serve(slug="gpt-6.3-sol", minimal_client_version="0.180.0")
        self.proxy.catalog.refresh()   # asked as 0.171.0: the new model is not listed
        self.fake.reply(self.fake.turn("gpt-6.3-sol").text("healed").completed(),
                        self.fake.turn("gpt-6.3-sol").text("again").completed())
        answer = self.post(dict(BASIC, model="gpt-6.3-sol"))
        self.assertEqual(answer.status, 200, answer.body[:400])
        self.assertEqual([r["headers"]["version"] for r in self.fake.requests], ["0.171.0", "0.180.0"])
        self.assertIn("/backend-api/codex/models?client_version=999.0.0", self.fake.gets, "asked as a newer client")
        self.assertEqual(self.post(dict(BASIC, model="gpt-6.3-sol")).status, 200)
        self.assertEqual(self.fake.requests[-1]["headers"]["version"], "0.180.0", "learned: no refusal the second time")
        self.assertEqual(len(self.fake.requests), 3)
        self.assertEqual([l for l in self.logged if "0.180.0" in l], [
            "the Codex backend serves gpt-6.3-sol to Codex 0.180.0 and newer; the proxy now presents that version for it."])

    def test_the_misleading_entitlement_words_heal_too_and_are_never_a_plan_problem(self):
        from unittest import mock
        with mock.patch.object(self.proxy.config, "client_version", "0.153.0"):
            self.proxy.catalog.refresh()   # as 0.153.0: the 0.155 and 0.166 models are hidden
            self.fake.reply(self.fake.turn("gpt-6.2-sol").text("served").completed())
            answer = self.post(dict(BASIC, model="gpt-6.2-sol"))
        self.assertEqual(answer.status, 200, answer.body[:400])
        self.assertEqual([r["headers"]["version"] for r in self.fake.requests], ["0.153.0", "0.166.0"])
        self.proxy.catalog.refresh()

    def test_a_retired_default_follows_its_upgrade_and_is_said_once(self):
        self.fake.catalog = FAKE_CATALOG + [dict(CATALOG_ENTRY, slug="gpt-5.4-mini", visibility="hide",
                                                 minimal_client_version="0.98.0", upgrade={"model": "gpt-5.6-luna"},
                                                 supported_reasoning_levels=[{"effort": e} for e in FOUR])]
        self.proxy.catalog.refresh()
        self.fake.reply(*[self.fake.turn("gpt-5.6-luna").text("small").completed() for _ in range(2)])
        for _ in range(2):
            self.assertEqual(self.post(dict(BASIC, model="claude-haiku-4-5")).status, 200)
        self.assertEqual([r["body"]["model"] for r in self.fake.requests], ["gpt-5.6-luna", "gpt-5.6-luna"])
        self.assertEqual([l for l in self.logged if "gpt-5.4-mini" in l], [
            "the model gpt-5.4-mini is retired; requests mapped to it go to gpt-5.6-luna, as the catalog says. "
            "(CODEX_PROXY_OPUS_MODEL, _SONNET_, _HAIKU_ or CODEX_PROXY_MODELS choose another.)"])
        self.assertIn("haiku -> gpt-5.6-luna (gpt-5.4-mini is retired)", "\n".join(cp.start_banner(self.proxy)))

    def test_a_default_the_catalog_does_not_offer_goes_to_a_model_of_its_size(self):
        self.fake.reply(self.fake.turn("gpt-6-luna").text("small").completed())
        self.assertEqual(self.post(dict(BASIC, model="claude-haiku-4-5")).status, 200)
        self.assertEqual(self.sent()["model"], "gpt-6-luna")

    def test_a_stale_default_sent_before_the_catalog_is_known_heals(self):
        self.proxy.catalog._models, self.proxy.catalog._fetched = None, time.time()   # not fetched yet
        self.fake.reply(self.fake.turn("gpt-6-luna").text("small").completed())
        answer = self.post(dict(BASIC, model="claude-haiku-4-5"))
        self.assertEqual(answer.status, 200, answer.body[:400])
        self.assertEqual([r["body"]["model"] for r in self.fake.requests], ["gpt-5.4-mini", "gpt-6-luna"])

    def test_every_claude_name_is_served(self):
        for name, model in (("claude-fable-5-1", "gpt-6.2-sol"), ("claude-mythos-5-1", "gpt-6.2-sol"),
                            ("default", "gpt-6-sol"), ("claude-sonnet-6", "gpt-6-sol"), ("claude-lyric-7", "gpt-6-sol"),
                            ("claude-opus-5-5[1m]", "gpt-6.2-sol"), ("opusplan", "gpt-6.2-sol")):
            with self.subTest(name=name):
                self.fake.reply(self.fake.turn(model).text("ok").completed())
                answer = self.post(dict(BASIC, model=name))
                self.assertEqual(answer.status, 200, answer.body[:300])
                self.assertEqual((self.sent()["model"], answer.json()["model"]), (model, name))

    def test_a_family_can_be_mapped_explicitly(self):
        os.environ["CODEX_PROXY_MODELS"] = "fable=gpt-6-sol:high, haiku=gpt-6-luna:low"
        self.addCleanup(os.environ.pop, "CODEX_PROXY_MODELS")
        config = cp.Config()
        self.assertEqual((config.models["fable"], config.models["haiku"]), ("gpt-6-sol:high", "gpt-6-luna:low"))
        self.assertEqual(cp.resolve_model("claude-fable-5-1", config.models), ("gpt-6-sol", "high", "fable"))
        self.assertEqual(cp.resolve_model("claude-mythos-5-1", config.models)[2], "opus")

    def test_settings_users_can_get_wrong_are_refused_with_the_fix(self):
        for name, value, words in (("CODEX_PROXY_CLIENT_VERSION", "latest", "must be a Codex CLI version such as 0.171.0"),
                                   ("CODEX_PROXY_MODELS", "fable:gpt-6-sol", "takes FAMILY=MODEL pairs")):
            with self.subTest(name=name):
                os.environ[name] = value
                try:
                    with self.assertRaises(SystemExit) as caught:
                        cp.Config()
                finally:
                    os.environ.pop(name)
                self.assertIn(words, str(caught.exception))


class TestWhatTheBackendSays(ProxyCase):
    """What the backend says beside the reply is passed on as it is: fast mode as the priority
    tier, a reply another model served, the usage windows of a codex.rate_limits event; events
    the proxy does not know change nothing."""

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.catalog.refresh()

    def records(self, body):
        from unittest import mock
        records = []
        with mock.patch.object(self.proxy.config, "verbose", True), \
                mock.patch.object(self.proxy, "log_request_record", lambda record, line: records.append((record, line))):
            answer = self.post(body)
            wait_until(lambda: records, what="the request's log record")
        return answer, records[-1]

    def test_fast_mode_asks_for_the_priority_tier_where_the_model_has_it(self):
        self.fake.serve(slug="gpt-6-nova", service_tiers=[])
        self.proxy.catalog.refresh()
        self.fake.reply(self.fake.turn("gpt-6-sol").text("fast").completed(),
                        self.fake.turn("gpt-6-nova").text("as usual").completed())
        self.assertEqual(self.post(dict(BASIC, model="gpt-6-sol", speed="fast")).status, 200)
        self.assertEqual(self.sent()["service_tier"], "priority")
        self.assertEqual(self.post(dict(BASIC, model="gpt-6-nova", speed="fast")).status, 200)
        self.assertNotIn("service_tier", self.sent(), "a model without the tier answers as usual")

    def test_a_reply_another_model_served_is_logged_with_both_names(self):
        self.fake.reply(self.fake.turn("gpt-5.5").text("rerouted").completed())
        answer, (record, line) = self.records(dict(BASIC, model="gpt-6-sol"))
        self.assertEqual(answer.status, 200)
        self.assertEqual((record["upstream_model"], record["served_model"]), ("gpt-6-sol", "gpt-5.5"))
        self.assertIn("-> gpt-6-sol (", line)
        self.assertIn(" served_by=gpt-5.5", line)

    def unknown_events(self, turn):
        """``turn`` with the events the backend added since the August references, between its items."""
        turn.add("codex.response.metadata", metadata={"turn": 1})
        turn.add("response.metadata", metadata={"type": "safety_buffering", "use_cases": ["cyber"], "reasons": []})
        turn.add("responsesapi.websocket_timing", timing={"ms": 3})
        turn.add("response.something_new", payload={"x": 1})
        return turn

    def test_unknown_events_in_the_middle_of_a_stream_change_nothing(self):
        plain = self.fake.turn().text("Before.").tool_call("Bash", {"command": "ls"}, call_id="call_u")
        noisy = self.unknown_events(self.fake.turn().text("Before.")).tool_call("Bash", {"command": "ls"},
                                                                                 call_id="call_u")
        out_plain, message_plain = translate_events(self, plain.completed())
        out_noisy, message_noisy = translate_events(self, noisy.completed())
        strip = lambda events: [e for e in events if e["type"] != "message_start"]
        self.assertEqual(strip(out_noisy), strip(out_plain))
        self.assertEqual(dict(message_noisy, id=None), dict(message_plain, id=None))
        for stream in (True, False):
            self.fake.reply(self.unknown_events(self.fake.turn().text("Still here.")).completed())
            answer = self.post(dict(BASIC, stream=stream))
            self.assertEqual(answer.status, 200)
            text = cp.fold_message(check_stream(self, answer.body)) if stream else answer.json()
            self.assertEqual(text["content"], [{"type": "text", "text": "Still here."}], stream)

    def test_codex_rate_limits_events_update_the_usage_windows(self):
        reset = int(time.time()) + 3600
        turn = self.fake.turn().text("counted")
        turn.add("codex.rate_limits", plan_type="plus", rate_limits={
            "primary": {"used_percent": 42.0, "window_minutes": 300, "reset_at": reset},
            "secondary": {"used_percent": 7.5, "window_minutes": 10080, "reset_at": reset + 86400}})
        self.fake.reply(turn.completed())
        self.assertEqual(self.post(BASIC).status, 200)
        quota = wait_until(lambda: self.proxy.accounts.default.quota, what="the usage windows")
        self.assertEqual(quota["windows"]["primary"], {"used_percent": 42.0, "window_minutes": 300, "resets_at": reset})
        self.assertEqual(quota["windows"]["secondary"]["used_percent"], 7.5)
        self.assertIn("Usage, 5h window: 42% used", "\n".join(cp.describe_quota(quota)), "what `status` prints")


class TestCompressedUploads(ProxyCase):
    """A large request goes up compressed, as the Codex CLI sends its turns (zstd where Python
    has it, else gzip); a backend that refuses that gets plain JSON at once, from then on."""

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.codex.encoding = cp.upload_encoding()
        self.proxy.codex.compress_from = cp.COMPRESS_FROM   # as to the real backend (not this machine)
        self.addCleanup(setattr, self.proxy.codex, "compress_from", None)

    def large(self):
        words = " ".join("line %d of a long build log: compiling module_%d.py ... ok" % (n, n % 97) for n in range(18000))
        return dict(BASIC, messages=[user(words)])

    def test_a_large_request_goes_up_compressed_and_the_backend_reads_it(self):
        body = self.large()
        self.fake.reply(self.fake.turn().text("read it").completed())
        answer = self.post(body)
        self.assertEqual(answer.status, 200, answer.body[:300])
        sent = self.fake.requests[-1]
        self.assertEqual(sent["headers"]["content-encoding"], cp.upload_encoding())
        plain = len(cp.json_bytes(sent["body"]))
        self.assertGreater(plain, 1 << 20)
        self.assertLess(sent["wire_bytes"], plain / 4, "a build log compresses well")
        report("a %d KB request went up as %d KB (%s)" % (plain >> 10, sent["wire_bytes"] >> 10,
                                                            sent["headers"]["content-encoding"]))
        self.assertEqual(sent["body"]["input"][-1]["content"][0]["text"], body["messages"][0]["content"])

    def test_an_upstream_on_this_machine_gets_plain_json(self):
        self.assertIsNone(cp.CodexClient(make_config(self.home, self.fake.url), None).compress_from)
        self.assertEqual(cp.CodexClient(make_config(self.home, "https://chatgpt.com/backend-api/codex"),
                                        None).compress_from, cp.COMPRESS_FROM)

    def test_a_small_request_goes_plain(self):
        self.fake.reply(self.fake.turn().text("small").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertNotIn("content-encoding", self.fake.requests[-1]["headers"])

    def test_a_backend_that_refuses_compression_gets_plain_json_from_then_on(self):
        from unittest import mock
        warned = []
        self.fake.encodings = set()
        self.fake.reply(self.fake.turn().text("one").completed(), self.fake.turn().text("two").completed())
        with mock.patch.object(cp, "warn", warned.append):
            for text in ("one", "two"):
                answer = self.post(self.large())
                self.assertEqual((answer.status, answer.json()["content"][0]["text"]), (200, text))
        self.assertEqual([r["headers"].get("content-encoding") for r in self.fake.requests], [None, None],
                         "the refused attempt never reached a turn; both turns went plain")
        self.assertEqual(len(warned), 1)
        self.assertIn("sending them uncompressed from now on", warned[0])


class TestWorkspaceRouting(ProxyCase):
    """What GET wham/accounts/check says (as the Codex CLI asks it before a session): a
    data-residency workspace's override goes on its turns, and its turns go to its origin;
    an account without a constraint (Plus, Pro) sees no change."""

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.codex.routes.known.clear()
        self.proxy.codex.routes.follow_origins = True   # as from the default upstream, chatgpt.com

    def test_an_account_without_a_constraint_sees_no_change(self):
        self.fake.routing = (None, "NO_CONSTRAINT")
        self.fake.reply(self.fake.turn().text("plain").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertNotIn(cp.ROUTING_HEADER, self.fake.requests[-1]["headers"])
        self.assertIn("/backend-api/wham/accounts/check", self.fake.gets)

    def test_a_residency_workspace_gets_its_override_and_its_origin(self):
        other = FakeCodex().start()
        self.addCleanup(other.stop)
        other.reply(other.turn().text("served in the us").completed(), other.turn().text("again").completed())
        self.fake.routing = (other.url.rsplit("/backend-api", 1)[0], "us")
        for text in ("served in the us", "again"):
            answer = self.post(BASIC)
            self.assertEqual((answer.status, answer.json()["content"][0]["text"]), (200, text))
        self.assertEqual(self.fake.requests, [], "no turn went to the configured origin")
        self.assertEqual([r["headers"][cp.ROUTING_HEADER] for r in other.requests], ["us", "us"])
        self.assertEqual(self.fake.gets.count("/backend-api/wham/accounts/check"), 1, "asked once, then cached")
        store = self.proxy.accounts.default.store
        self.assertEqual(self.proxy.codex.routes.describe(store), "workspace routing: %s, data residency us"
                         % other.url.rsplit("/backend-api", 1)[0])

    def test_a_backend_that_does_not_answer_the_check_changes_nothing(self):
        self.fake.reply(self.fake.turn().text("as before").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertNotIn(cp.ROUTING_HEADER, self.fake.requests[-1]["headers"])


class TestModelCatalog(ProxyCase):

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.catalog.refresh()

    def test_v1_models_lists_the_account_models_and_the_claude_aliases(self):
        doc = self.request("GET", "/v1/models").json()
        ids = [m["id"] for m in doc["data"]]
        self.assertEqual(ids[:3], ["claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5"])
        for slug, entry in CATALOG.items():
            self.assertEqual(slug in ids, entry["visibility"] != "hide", slug)
        sol = next(m for m in doc["data"] if m["id"] == "gpt-5.6-sol")
        self.assertEqual((sol["display_name"], sol["max_input_tokens"]), ("GPT-5.6-Sol (Codex)", 272000))

    def test_catalog_is_cached_in_memory_and_on_disk(self):
        path = self.home / "models_cache.json"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        gets = len(self.fake.gets)
        for _ in range(3):
            self.assertIn("gpt-5.6-sol", self.proxy.catalog.current())
        self.assertEqual(len(self.fake.gets), gets, "fresh: no new fetch")
        offline = cp.ModelCatalog(self.config, None)      # a new process, before any network
        self.assertEqual(sorted(offline._models or offline.current()), sorted(CATALOG))
        self.assertIn("client_version=" + cp.CODEX_CLIENT_VERSION, self.fake.gets[-1])

    def test_model_not_on_the_plan_gets_400_listing_the_usable_models(self):
        answer = self.post(dict(BASIC, model="gpt-5.3-codex"))
        self.assertEqual(answer.status, 400)
        message = answer.json()["error"]["message"]
        self.assertIn("'gpt-5.3-codex' is not available", message)
        for slug in ("gpt-5.5", "gpt-5.6-sol", "gpt-6-sol", "gpt-6.2-sol"):
            self.assertIn(slug, message)
        self.assertNotIn("codex-auto-review", message, "hidden models are not offered as a choice")

    def test_newest_models_get_the_responses_lite_shape(self):
        self.fake.reply(self.fake.turn(model="gpt-5.6-sol").text("lite ok").completed())
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
        body = dict(BASIC, model="gpt-5.6-sol", system="Be exact.", tools=[BASH_TOOL], messages=[
            {"role": "user", "content": [{"type": "text", "text": "look"}, image]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]}])
        self.assertEqual(self.post(body).status, 200)
        request = self.fake.requests[-1]
        self.assertEqual(request["headers"]["x-openai-internal-codex-responses-lite"], "true")
        sent = request["body"]
        self.assertNotIn("instructions", sent)
        self.assertNotIn("tools", sent)
        self.assertEqual(sent["input"][0]["tools"][0]["tools"][0]["name"], "Bash")
        self.assertEqual(sent["input"][1]["content"], [{"type": "input_text", "text": "Be exact."}])
        self.assertEqual((sent["parallel_tool_calls"], sent["reasoning"]["context"]), (False, "all_turns"))

    def test_classic_shape_when_configured_or_when_web_search_is_asked(self):
        self.config.responses_lite = False
        self.addCleanup(setattr, self.config, "responses_lite", True)
        self.fake.reply(self.fake.turn(model="gpt-5.6-sol").text("classic ok").completed())
        self.assertEqual(self.post(dict(BASIC, model="gpt-5.6-sol")).status, 200)
        self.assertIn("instructions", self.sent())
        self.config.responses_lite = True
        self.fake.reply(self.fake.turn(model="gpt-5.6-sol").text("searched").completed())
        self.assertEqual(self.post(dict(BASIC, model="gpt-5.6-sol", tools=[WEB_SEARCH_TOOL])).status, 200)
        self.assertEqual(self.sent()["tools"][0]["type"], "web_search")
        self.assertNotIn("x-openai-internal-codex-responses-lite", self.fake.requests[-1]["headers"])

    def test_efforts_are_clamped_to_what_the_model_has(self):
        cases = [("claude-opus-4-8", "max", "xhigh"), ("gpt-5.6-sol", "max", "max"),
                 ("gpt-5.6-sol:ultra", None, "max"), ("gpt-5.6-luna:ultra", None, "max"),
                 ("gpt-5.5:ultra", None, "xhigh"), ("gpt-5.5:minimal", None, "low"), ("gpt-5.6-terra", "low", "low")]
        for model, effort, sent in cases:
            body = dict(BASIC, model=model, output_config={"effort": effort}) if effort else dict(BASIC, model=model)
            codex, _ = cp.translate_request(body, {}, self.config, CATALOG)
            self.assertEqual(codex["reasoning"]["effort"], sent, model)
            self.assertIsNone(codex_request_problem(codex, set(), lite=codex.get("tools") is None), model)

    def test_prompt_too_long_uses_the_catalog_context_window(self):
        self.fake.catalog = [dict(CATALOG["gpt-5.5"], context_window=400000)] + [
            m for m in FAKE_CATALOG if m["slug"] != "gpt-5.5"]
        self.proxy.catalog.refresh()
        self.addCleanup(self.proxy.catalog.refresh)
        self.fake.reply(self.fake.turn().failed("context_length_exceeded", "too long"))
        message = self.post(BASIC).json()["error"]["message"]
        self.assertRegex(message, r"^prompt is too long: \d+ tokens > 400000 maximum$")

    def test_models_command_prints_windows_and_efforts(self):
        from unittest import mock
        with mock.patch.dict(os.environ, {"CODEX_PROXY_HOME": str(self.home), "CODEX_HOME": str(self.home / "codex-home"),
                                          "CODEX_PROXY_UPSTREAM": self.fake.url}):
            code, out, err = CliRun(self, ["models"]).result()
            self.assertEqual(code, 0, err)
            code, doc, _ = CliRun(self, ["models", "--json"]).result()
        self.assertRegex(out, r"gpt-5\.6-sol\s+272k\s+low, medium, high, xhigh, max, ultra\s+low\s+lite")
        self.assertRegex(out, r"gpt-5\.5\s+272k\s+low, medium, high, xhigh\s+medium\s+classic")
        self.assertIn("opus -> gpt-6.2-sol", out)
        self.assertNotIn("codex-auto-review", out, "hidden models are not chat models")
        sol = next(m for m in json.loads(doc) if m["model"] == "gpt-5.6-sol")
        self.assertEqual((sol["context_window"], sol["default_effort"], sol["responses_lite"]), (272000, "low", True))


# ---------------------------------------------------------------------------
# Safeguards: auto mode's check of each tool call (the fake plays the classifier model too)
# ---------------------------------------------------------------------------



def auto_mode_body(**extra):
    """A request as Claude Code sends it in auto mode: the real one when the fixtures are there."""
    try:
        body = claude_code_body("09-interactive-request.json")
        context = body["safeguards"][0]["classifier_context"]
    except unittest.SkipTest:
        context = {"v": 1, "permission_mode": "auto", "platform": "linux", "live_cwd": "/work",
                   "trusted_directories": {"primary": {"path": "/work", "resolved": ["/work"]}, "additional": []},
                   "rules": {"allow": [], "deny": [], "ask": []}, "git_state": {"cwd": "/work", "branch": "main"}}
    return dict(BASIC, tools=[BASH_TOOL], messages=[user("Clean the build and publish main, whatever it takes.")],
                safeguards=[{"type": "dangerous_tool_use", "classifier_context": context}], **extra)


def verdict(outcome, explanation):
    return lambda case: Turn(None, "codex-auto-review").text(
        json.dumps({"outcome": outcome, "explanation": explanation})).completed(input_tokens=900, output_tokens=20)


def by_command(flagged):
    """A reviewer that flags the Bash commands containing ``flagged`` and lets the others run."""
    def judge(case):
        command = case["pending_call"]["input"].get("command", "")
        return verdict("flagged" if flagged in command else "not_flagged", "judged: " + command)(case)
    return judge


class TestAutoModeSafeguards(ProxyCase):
    """Every tool_use of a reply to a request with ``safeguards`` gets a verdict in the final
    message_delta (streaming) or the Message (not): judged by the catalog's reviewer model as
    soon as the call is complete, failing closed when no verdict can be had."""

    settings = {"safeguard_wait": 2.0, "retries": 0}

    def setUp(self):
        ProxyCase.setUp(self)
        self.fake.catalog = FAKE_CATALOG
        self.proxy.catalog.refresh()

    def two_calls(self):
        return self.fake.turn().tool_call("Bash", {"command": "rm -rf ./build"}, call_id="call_rm") \
            .tool_call("Bash", {"command": "git push --force origin main"}, call_id="call_push").completed()

    def results(self, events):
        final = [e for e in events if e["type"] == "message_delta"]
        self.assertEqual(len(final), 1)
        return final[0]["delta"].get("safeguard_results")

    def test_each_tool_call_gets_its_verdict_in_the_final_message_delta(self):
        self.fake.reviewer = by_command("--force")
        self.fake.reply(self.two_calls())
        events = self.stream(auto_mode_body())
        uses = [e["content_block"]["id"] for e in events if e["type"] == "content_block_start"
                and e["content_block"]["type"] == "tool_use"]
        self.assertEqual(self.results(events), [{"type": "dangerous_tool_use", "status": {"type": "available", "tool_uses": {
            uses[0]: {"type": "evaluated", "outcome": "not_flagged", "explanation": "judged: rm -rf ./build"},
            uses[1]: {"type": "evaluated", "outcome": "flagged", "explanation": "judged: git push --force origin main"}}}}])
        self.assertEqual(len(self.fake.requests), 1, "the turn itself went upstream once")
        cases = sorted(self.fake.reviews, key=lambda c: c["pending_call"]["input"]["command"])
        self.assertEqual([c["pending_call"] for c in cases], [
            {"tool": "Bash", "input": {"command": "git push --force origin main"}},
            {"tool": "Bash", "input": {"command": "rm -rf ./build"}}])
        for case in cases:
            self.assertEqual(case["user_messages"], ["Clean the build and publish main, whatever it takes."])
            self.assertEqual(case["session"], auto_mode_body()["safeguards"][0]["classifier_context"])
            self.assertEqual((case["model"], case["effort"]), ("codex-auto-review", "low"))
            self.assertEqual(case["text"]["format"]["schema"], cp.VERDICT_SCHEMA)

    def test_a_non_streaming_message_carries_them_at_the_top_level(self):
        self.fake.reviewer = by_command("--force")
        self.fake.reply(self.two_calls())
        message = self.post(auto_mode_body()).json()
        uses = [b["id"] for b in message["content"] if b["type"] == "tool_use"]
        status = message["safeguard_results"][0]["status"]
        self.assertEqual([status["tool_uses"][u]["outcome"] for u in uses], ["not_flagged", "flagged"])
        self.assertEqual(message["stop_reason"], "tool_use")

    def test_a_reply_without_tool_calls_costs_no_classifier_request(self):
        self.fake.reviewer = by_command("--force")
        self.fake.reply(self.fake.turn().text("Nothing to run.").completed())
        events = self.stream(auto_mode_body())
        self.assertEqual(self.results(events), [{"type": "dangerous_tool_use",
                                                 "status": {"type": "available", "tool_uses": {}}}])
        self.assertEqual(self.fake.reviews, [])

    def test_a_verdict_that_cannot_be_had_fails_closed(self):
        stalled = Reply(events=verdict("not_flagged", "late")(None), stall_after=0)
        for name, reviewer, reason in (
                ("timeout", lambda case: stalled, "timeout"),
                ("garbage", lambda case: Turn(None, "codex-auto-review").text("Sure, looks fine!").completed(), "error"),
                ("backend error", lambda case: Reply(status=500, body={"detail": "boom"}), "error"),
                ("wrong outcome", verdict("maybe", "?"), "error")):
            with self.subTest(reviewer=name):
                self.fake.reset()
                self.fake.catalog = FAKE_CATALOG
                self.fake.reviewer = reviewer
                self.fake.reply(self.fake.turn().tool_call("Bash", {"command": "git push --force"}).completed())
                started = time.monotonic()
                status = self.results(self.stream(auto_mode_body()))[0]["status"]
                self.assertEqual(list(status["tool_uses"].values()), [{"type": "unavailable", "reason": reason}])
                self.assertLess(time.monotonic() - started, 20, "the deadline bounds the wait")
        stalled.release.set()

    def test_calls_are_judged_while_the_reply_goes_on(self):
        self.fake.reviewer = verdict("not_flagged", "routine")
        turn = self.fake.turn().tool_call("Bash", {"command": "make test"}).text("Running the tests.").completed()
        reply = self.fake.reply(Reply(events=turn, gate_after=len(turn) - 4))   # held after the call is done
        threading.Thread(target=lambda: (wait_until(lambda: self.fake.reviews, what="a classifier request"),
                                         reply.gate.set()), daemon=True).start()
        status = self.results(self.stream(auto_mode_body()))[0]["status"]
        self.assertEqual([v["outcome"] for v in status["tool_uses"].values()], ["not_flagged"])

    def test_the_classifier_is_the_setting_else_the_catalogs_reviewer_else_the_haiku_model(self):
        config = make_config(self.home, self.fake.url)
        self.assertEqual(cp.safeguard_model(config, {"codex-auto-review": {}, "gpt-5.5": {}}), "codex-auto-review:low")
        self.assertEqual(cp.safeguard_model(config, {"gpt-5.5": {}}), "gpt-6-luna:low")
        config.safeguard_model = "gpt-5.5:medium"
        self.assertEqual(cp.safeguard_model(config, {"codex-auto-review": {}}), "gpt-5.5:medium")

    def test_the_request_log_names_every_verdict_and_its_time(self):
        from unittest import mock
        records = []
        self.fake.reviewer = by_command("--force")
        self.fake.reply(self.two_calls())
        with mock.patch.object(self.proxy.config, "verbose", True), \
                mock.patch.object(self.proxy, "log_request_record", lambda record, line: records.append((record, line))):
            self.stream(auto_mode_body())
            wait_until(lambda: records, what="the request's log record")   # written once the reply is out
        record, line = records[-1]
        self.assertEqual(sorted(c["outcome"] for c in record["safeguards"]), ["flagged", "not_flagged"])
        self.assertTrue(all(isinstance(c["ms"], int) for c in record["safeguards"]))
        self.assertRegex(line, r" check=call_rm:not_flagged/\d+ms check=call_push:flagged/\d+ms")

    def test_checks_count_in_the_usage_ledger_as_their_own_kind(self):
        key = (time.strftime("%Y-%m-%d", time.gmtime()), "codex-auto-review (auto mode checks)")
        before = cp.UsageLedger(self.config).totals(1).get(key, [0, 0, 0, 0])
        self.fake.reviewer = by_command("--force")
        self.fake.reply(self.two_calls())
        self.stream(auto_mode_body())
        after = cp.UsageLedger(self.config).totals(1)[key]
        self.assertEqual([a - b for a, b in zip(after, before)], [2, 1800, 0, 40], "two checks, their tokens")


class TestAutoModeSafeguardsOff(ProxyCase):
    """CODEX_PROXY_SAFEGUARDS=off: no call is judged; a client that asks is told "disabled",
    and Claude Code is started with its own classifier (CLAUDE_CODE_AUTO_MODE_SERVER=0)."""

    settings = {"safeguards": False}

    def test_no_call_is_judged_and_the_answer_says_disabled(self):
        self.fake.reviewer = verdict("not_flagged", "never asked")
        self.fake.reply(self.fake.turn().tool_call("Bash", {"command": "ls"}).completed())
        message = self.post(auto_mode_body()).json()
        self.assertEqual(message["safeguard_results"], [{"type": "dangerous_tool_use",
                                                         "status": {"type": "unavailable", "reason": "disabled"}}])
        self.assertEqual(self.fake.reviews, [])

    def test_claude_code_is_told_to_classify_by_itself(self):
        off = cp.client_env(self.config, "http://127.0.0.1:1", "key")
        self.assertEqual(off["CLAUDE_CODE_AUTO_MODE_SERVER"], "0")
        self.assertNotIn("CLAUDE_CODE_AUTO_MODE_SERVER", cp.client_env(make_config(self.home, self.fake.url),
                                                                      "http://127.0.0.1:1", "key"))


class TestClaudeCodesOwnClassifier(unittest.TestCase):
    """Claude Code's own classifier requests (its fallback) get answers in exactly the asked
    form; an answer that cannot be read as one becomes the blocking one."""

    SYSTEM = "You are a security monitor for autonomous AI coding agents. ..."

    def message(self, text):
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}

    def body(self, ask):
        return {"model": "claude-haiku-4-5", "max_tokens": 64, "system": [{"type": "text", "text": self.SYSTEM}],
                "messages": [user("<transcript>...</transcript>\n" + ask)], "stop_sequences": ["</block>"]}

    def test_each_stage_is_recognised(self):
        self.assertEqual(cp.answer_form(self.body("Respond with <severity>N</severity> ONLY.")), "severity")
        self.assertEqual(cp.answer_form(self.body("Answer <block>yes</block> or <block>no</block>.")), "block")
        self.assertIsNone(cp.answer_form(dict(self.body("<block>"), system="You are a helpful assistant.")))
        self.assertIsNone(cp.answer_form(BASIC))

    def test_answers_are_rewritten_to_the_exact_form(self):
        cases = [
            ("severity", "<severity>12</severity>", "<severity>12</severity>"),
            ("severity", "Looking at this... the action is routine.\n<severity> 8 </severity>", "<severity>8</severity>"),
            ("severity", "<severity>72</severity><category>Data Exfiltration</category> because it uploads",
             "<severity>72</severity><category>Data Exfiltration</category>"),
            ("severity", "I think it is fine.", "<severity>100</severity>"),
            ("severity", "<severity>10</severity> or maybe <severity>90</severity>", "<severity>100</severity>"),
            ("block", "<block>no</block>", "<block>no</block>"),
            ("block", "After review: <block>no</block>, it stays in the folder.", "<block>no</block>"),
            ("block", "<block>yes</block><reason>force push</reason>", "<block>yes</block><reason>force push</reason>"),
            ("block", "It depends.", "<block>yes</block><reason>The reviewer's answer could not be read; "
                                     "blocked to be safe.</reason>"),
            ("block", "<block>no</block> <block>yes</block>", "<block>yes</block><reason>The reviewer's answer "
                                                              "could not be read; blocked to be safe.</reason>"),
        ]
        for form, said, answer in cases:
            with self.subTest(said=said):
                rewritten = cp.in_form(self.message(said), form)
                self.assertEqual([b["text"] for b in rewritten["content"]], [answer])
                self.assertEqual((rewritten["stop_reason"], rewritten["stop_sequence"]), ("end_turn", None))


# ---------------------------------------------------------------------------
# Relaying a turn: recovery, streaming, concurrency
# ---------------------------------------------------------------------------

class TestRecoveryTable(unittest.TestCase):
    """What the relay does after a failed attempt: one pure function, one test per outcome."""

    def failure(self, kind="failed", downgrade=None, **fields):
        failure = cp.codex_failure(kind, "m", **fields)
        failure.downgrade = downgrade
        return failure

    def decide(self, failure, seen_bytes=False, retries=0, downgraded=()):
        return cp.recovery(failure, seen_bytes, retries, set(downgraded), 3, 0.25)

    def test_once_the_client_has_seen_bytes_the_error_is_answered(self):
        for failure in (self.failure(), self.failure("request_refused", ("tool_choice", True)),
                        self.failure("usage_limit_reached")):
            self.assertEqual(self.decide(failure, seen_bytes=True), ("answer", None))

    def test_a_refused_part_is_downgraded_once(self):
        failure = self.failure("request_refused", ("tool_choice", True))
        self.assertEqual(self.decide(failure), ("downgrade", ("tool_choice", True)))
        self.assertEqual(self.decide(failure, downgraded={"tool_choice"}), ("answer", None), "never a loop")

    def test_a_login_that_must_rest_moves_the_turn(self):
        for kind in ("usage_limit_reached", "insufficient_quota", "usage_not_included", "login_refused"):
            self.assertEqual(self.decide(self.failure(kind)), ("move", None), kind)
        self.assertEqual(self.decide(cp.login_failure(cp.not_logged_in())), ("move", None))
        stuck_lock = cp.ProxyError(500, "api_error", "Another program has held the lock file for 120 s.")
        self.assertEqual(self.decide(cp.login_failure(stuck_lock)), ("answer", None), "not the login's fault")

    def test_a_retryable_failure_is_retried_with_a_doubling_backoff(self):
        for kind in ("failed", "stream_broken", "server_error"):
            self.assertEqual(self.decide(self.failure(kind)), ("retry", 0.25), kind)
        self.assertEqual(self.decide(self.failure(), retries=2), ("retry", 1.0))

    def test_retries_end_with_the_error(self):
        self.assertEqual(self.decide(self.failure(), retries=3), ("answer", None))

    def test_a_final_failure_is_answered_at_once(self):
        for kind in ("context_length_exceeded", "rate_limit_exceeded", "server_is_overloaded", "cyber_policy",
                     "forbidden", "request_refused"):
            self.assertEqual(self.decide(self.failure(kind)), ("answer", None), kind)
        for kind in ("model_refused", "client_too_old"):
            self.assertEqual(self.decide(self.failure(kind), downgraded={"model"}), ("answer", None), kind)

    def test_a_refused_model_is_asked_about_once(self):
        for kind in ("model_refused", "client_too_old"):
            self.assertEqual(self.decide(self.failure(kind)), ("recheck", None), kind)
        shutting_down = cp.CodexFailure(cp.ProxyError(529, "overloaded_error", "The proxy is shutting down."))
        self.assertEqual(self.decide(shutting_down), ("answer", None))


class TestStreaming(ProxyCase):
    settings = {"ping_interval": 0.2}

    def test_text_reply_streams_valid_events(self):
        self.fake.reply(self.fake.turn().text("Hello from Codex.", pieces=5).completed())
        events = self.stream(BASIC)
        text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        self.assertEqual(text, "Hello from Codex.")
        self.assertEqual(events[0]["message"]["model"], "claude-opus-4-8")

    def test_upstream_request_carries_auth_session_and_codex_headers(self):
        self.fake.reply(self.fake.turn().text("ok").completed())
        self.stream(BASIC, headers={"X-Claude-Code-Session-Id": "11111111-2222-3333-4444-555555555555"})
        headers = self.fake.requests[0]["headers"]
        self.assertEqual(headers["authorization"], "Bearer " + ACCESS_TOKEN)
        self.assertEqual(headers["chatgpt-account-id"], ACCOUNT_ID)
        self.assertEqual(headers["session-id"], "11111111-2222-3333-4444-555555555555")
        self.assertEqual(headers["originator"], "codex_cli_rs")
        self.assertTrue(headers["user-agent"].startswith("codex_cli_rs/"))
        self.assertEqual(headers["accept"], "text/event-stream")
        self.assertNotIn(PROXY_KEY, json.dumps(self.fake.requests[0]))

    def test_parallel_tool_calls_keep_call_ids(self):
        turn = self.fake.turn().text("Two at once.").tool_call("Bash", {"command": "echo a"}, call_id="call_A") \
                   .tool_call("Bash", {"command": "echo b"}, call_id="call_B")
        self.fake.reply(turn.completed())
        body = dict(BASIC, tools=[BASH_TOOL])
        message = cp.fold_message(self.stream(body))
        uses = [b for b in message["content"] if b["type"] == "tool_use"]
        self.assertEqual([(b["id"], b["input"]["command"]) for b in uses], [("call_A", "echo a"), ("call_B", "echo b")])
        self.assertEqual(message["stop_reason"], "tool_use")
        self.fake.reply(self.fake.turn().text("Both done.").completed())
        follow = dict(body, messages=body["messages"] + [
            {"role": "assistant", "content": message["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_B", "content": "b"},
                                         {"type": "tool_result", "tool_use_id": "call_A", "content": "a"}]}])
        self.stream(follow)
        sent = [(i["type"], i.get("call_id"), i.get("output")) for i in self.sent()["input"]
                if i["type"].startswith("function_call")]
        self.assertEqual(sent, [("function_call", "call_A", None), ("function_call", "call_B", None),
                                ("function_call_output", "call_B", "b"), ("function_call_output", "call_A", "a")])

    def test_reasoning_round_trip_replays_encrypted_content(self):
        turn = self.fake.turn().reasoning(["Check the files first."], encrypted="gAAAAB-secret-1") \
                   .tool_call("Bash", {"command": "ls"}, call_id="call_1")
        self.fake.reply(turn.completed())
        body = dict(BASIC, thinking={"type": "adaptive", "display": "updates"}, tools=[BASH_TOOL])
        message = cp.fold_message(self.stream(body))
        thinking = message["content"][0]
        self.assertEqual(thinking["thinking"], "Check the files first.")
        self.fake.reply(self.fake.turn().text("Listed.").completed())
        follow = dict(body, messages=body["messages"] + [
            {"role": "assistant", "content": message["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a.txt"}]}])
        self.stream(follow)
        reasoning = [i for i in self.sent()["input"] if i["type"] == "reasoning"]
        self.assertEqual(reasoning, [{"type": "reasoning", "encrypted_content": "gAAAAB-secret-1",
                                      "summary": [{"type": "summary_text", "text": "Check the files first."}]}])

    def test_foreign_and_redacted_thinking_are_dropped(self):
        tail = json.loads(fixture("claude-code", "26-thinking-empty-text-long-sig-redacted.json").read_text())["messages_tail"]
        self.fake.reply(self.fake.turn().text("fine").completed())
        self.stream(dict(BASIC, thinking={"type": "adaptive"}, messages=[user("go")] + tail))
        self.assertEqual([i for i in self.sent()["input"] if i["type"] == "reasoning"], [])
        other_model = cp.thinking_signature("gpt-5.4", "gAAAAB-from-another-model")
        self.fake.issued.add("gAAAAB-from-another-model")
        self.fake.reply(self.fake.turn().text("fine").completed())
        self.stream(dict(BASIC, thinking={"type": "adaptive"}, messages=[user("go"), {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "", "signature": other_model}, {"type": "text", "text": "x"}]}, user("more")]))
        self.assertEqual([i for i in self.sent()["input"] if i["type"] == "reasoning"], [])

    def test_non_streaming_equals_streaming(self):
        def upstream():
            turn = self.fake.turn().reasoning(["r"], encrypted="gAAAAB-same").text("Same answer.") \
                       .tool_call("Bash", {"command": "x"}, call_id="call_same")
            return turn.completed(input_tokens=500, cached=300, output_tokens=77)
        body = dict(BASIC, thinking={"type": "adaptive"}, tools=[BASH_TOOL])
        self.fake.reply(upstream())
        streamed = cp.fold_message(self.stream(body))
        self.fake.reply(upstream())
        answer = self.post(body)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["Content-Type"], "application/json")
        plain = answer.json()
        self.assertTrue(plain["id"].startswith("msg_"))
        self.assertNotEqual(plain.pop("id"), streamed.pop("id"))
        self.assertEqual(plain, streamed)

    def test_each_event_is_flushed_before_the_next_arrives(self):
        turn = self.fake.turn().text("first second", pieces=2)
        events = turn.completed()
        gate_at = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.delta") + 1
        reply = self.fake.reply(Reply(events=events, gate_after=gate_at))
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, stream=True)),
                      {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        seen = b""
        while b"text_delta" not in seen:   # the upstream is held at its gate meanwhile
            seen += response.read1(65536)
        self.assertFalse(reply.gate.is_set())
        reply.gate.set()
        check_stream(self, seen + response.read())
        conn.close()

    def test_ping_during_upstream_silence(self):
        events = self.fake.turn().text("slow answer", pieces=2).completed()
        first_delta = next(i for i, e in enumerate(events) if e["type"] == "response.output_text.delta")
        self.fake.reply(Reply(events=events, pause=(first_delta + 1, 1.0)))
        stream = self.stream(BASIC)
        kinds = [e["type"] for e in stream]
        self.assertGreaterEqual(kinds.count("ping"), 2)
        self.assertEqual(kinds[0], "message_start")

    def test_a_client_that_hurries_on_after_message_stop_still_gets_the_same_upstream_connection(self):
        # The next turn is sent on a new connection the moment message_stop is read, while
        # the proxy is (made) slow to hand the finished upstream connection back.
        from unittest import mock
        self.proxy.catalog.refresh()   # fresh now: no catalog fetch meanwhile, only turns are counted
        self.proxy.codex.close_idle()
        self.fake.reset()
        slow_finish = cp.CodexStream._finish

        def finish(stream):
            time.sleep(0.1)
            slow_finish(stream)
        port = self.proxy.server_address[1]
        with mock.patch.object(cp.CodexStream, "_finish", finish):
            for n in range(3):
                self.fake.reply(self.fake.turn().text("turn %d" % n).completed())
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                body = json.dumps(dict(BASIC, stream=True)).encode()
                sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (port, PROXY_KEY.encode(), len(body), body))
                received = b""
                while b"message_stop" not in received:
                    received += sock.recv(65536)
                sock.close()   # and on to the next turn at once
        self.fake.reply(self.fake.turn().text("last").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertEqual(self.fake.connections, 1, "one upstream connection for four sequential turns")

    def test_upstream_connection_is_reused_across_turns(self):
        self.proxy.codex.close_idle()
        self.fake.reset()
        for n in range(5):
            self.fake.reply(self.fake.turn().text("turn %d" % n).completed())
            self.stream(BASIC)
        self.fake.reply(self.fake.turn().text("plain").completed())
        self.assertEqual(self.post(BASIC).status, 200)
        self.assertEqual(len(self.fake.requests), 6)
        self.assertEqual(self.fake.connections, 1, "one upstream connection for six sequential turns")

    def test_stop_sequence_ends_the_reply_and_the_upstream_request(self):
        events = self.fake.turn().text("one two THREE four five", pieces=5).completed()
        reply = self.fake.reply(Reply(events=events, stall_after=len(events) - 1))
        stream = self.stream(dict(BASIC, stop_sequences=["THREE"]))
        message = cp.fold_message(stream)
        self.assertEqual(message["content"], [{"type": "text", "text": "one two "}])
        self.assertEqual((message["stop_reason"], message["stop_sequence"]), ("stop_sequence", "THREE"))
        self.assertTrue(reply.client_left.wait(5), "the rest of the upstream reply was not waited for")

    def test_client_disconnect_closes_the_upstream(self):
        events = self.fake.turn().text("never finished", pieces=2).completed()
        reply = self.fake.reply(Reply(events=events, stall_after=len(events) - 2))
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
        body = json.dumps(dict(BASIC, stream=True)).encode()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (PROXY_KEY.encode(), len(body), body))
        received = b""
        while b"text_delta" not in received:
            received += sock.recv(65536)
        started = time.monotonic()
        sock.close()
        self.assertTrue(reply.client_left.wait(10), "the proxy closed its upstream connection")
        self.assertLess(time.monotonic() - started, 2)


class TestConcurrency(ProxyCase):

    def test_64_concurrent_streams_until_1000_complete(self):
        self.fake.default = self.fake.turn().text("concurrent reply", pieces=5).completed()
        done, failures = [], []
        lock = threading.Lock()
        tickets = iter(range(1000))

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=60)
            while True:
                with lock:
                    ticket = next(tickets, None)
                if ticket is None:
                    break
                try:
                    conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, stream=True)),
                                 {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
                    response = conn.getresponse()
                    raw = response.read()
                    if response.status != 200:
                        raise AssertionError("HTTP %d: %s" % (response.status, raw[:300]))
                    message = cp.fold_message(check_stream(self, raw))
                    if message["content"] != [{"type": "text", "text": "concurrent reply"}]:
                        raise AssertionError("content %r" % (message["content"],))
                    with lock:
                        done.append(ticket)
                except Exception as exc:   # noted, then the assertion below reports all of them
                    with lock:
                        failures.append(repr(exc)[:200])
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=60)
            conn.close()
        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.monotonic() - started
        self.assertEqual(failures, [])
        self.assertEqual(len(done), 1000)
        self.assertEqual(self.proxy.crashes, 0)
        report("concurrency: 1000 streams by 64 clients in %.1f s (%.0f streams/s), 0 failed, %d upstream connections"
               % (elapsed, 1000 / elapsed, self.fake.connections))


# ---------------------------------------------------------------------------
# HTTP server: routes, guards, bad input, connections, the keeper, shutdown
# ---------------------------------------------------------------------------

class TestRoutesAndAuth(ProxyCase):

    def assert_error(self, answer, status, error_type, words=""):
        self.assertEqual(answer.status, status, answer.body)
        self.assertEqual(answer.headers["Content-Type"], "application/json")
        doc = answer.json()
        self.assertEqual(set(doc), {"type", "error", "request_id"})
        self.assertEqual((doc["type"], doc["error"]["type"]), ("error", error_type))
        self.assertEqual(doc["request_id"], answer.headers["request-id"], "7: same id in header and body")
        self.assertIn(words, doc["error"]["message"])
        return doc

    def test_beta_query_string_is_ignored(self):
        for path in ("/v1/messages", "/v1/messages?beta=true"):
            self.fake.reply(self.fake.turn().text("hi").completed())
            answer = self.post(BASIC, path=path)
            self.assertEqual(answer.status, 200)
            self.assertEqual(answer.json()["content"], [{"type": "text", "text": "hi"}])

    def test_key_as_x_api_key_bearer_or_both(self):
        for headers, key in [({}, PROXY_KEY), ({"Authorization": "Bearer " + PROXY_KEY}, None),
                             ({"Authorization": "Bearer " + PROXY_KEY}, PROXY_KEY)]:
            answer = self.request("GET", "/v1/models", headers=headers, key=key)
            self.assertEqual(answer.status, 200, headers)

    def test_wrong_or_missing_key_is_refused_and_nothing_is_forwarded(self):
        for key in (None, "wrong", PROXY_KEY + "x"):
            answer = self.post(BASIC, key=key)
            self.assert_error(answer, 401, "authentication_error", "ANTHROPIC_AUTH_TOKEN")
        self.assertEqual(self.fake.requests, [])

    def test_unknown_beta_flags_and_fields_are_ignored(self):
        self.fake.reply(self.fake.turn().text("ok").completed())
        body = dict(BASIC, context_management={"edits": []}, diagnostics={}, speed="fast",
                    tools=[dict(BASH_TOOL, defer_loading=False, eager_input_streaming=True, strict=True)])
        answer = self.post(body, headers={"anthropic-beta": "foo-2099-01-01, claude-code-20250219"})
        self.assertEqual(answer.status, 200, answer.body)

    def test_head_preconnect_answers_200_without_key(self):
        for path in ("/", "/api/hello"):
            answer = self.request("HEAD", path, key=None)
            self.assertEqual((answer.status, answer.body), (200, b""))
            self.assertTrue(answer.headers["request-id"].startswith("req_"))

    def test_health_reports_version_and_login(self):
        answer = self.request("GET", "/health", key=None)
        self.assertEqual(answer.json(), {"ok": True, "version": cp.__version__, "logged_in": True, "login_problems": []})

    def test_unknown_route_is_404_in_anthropic_shape(self):
        self.assert_error(self.request("GET", "/v1/nothing"), 404, "not_found_error", "/v1/nothing")
        self.assert_error(self.request("GET", "/v1/messages"), 405, "invalid_request_error", "POST")
        self.assert_error(self.request("DELETE", "/v1/messages"), 501, "api_error")

    def test_malformed_bodies_give_400_naming_the_problem(self):
        cases = [(b"{not json", "not valid JSON"), (b"[1,2]", "JSON object"), (b'{"messages":[]}', "model"),
                 (b'{"model":"claude-opus-4-8"}', "messages"), (b"\xff\xfe", "not valid JSON"),
                 (b"[" * 100000 + b"]" * 100000, "not valid JSON")]
        for raw, words in cases:
            self.assert_error(self.post(None, raw=raw), 400, "invalid_request_error", words)
        self.assertEqual(self.fake.requests, [])

    def test_models_list_and_lookup(self):
        doc = self.request("GET", "/v1/models?limit=1000").json()
        ids = [m["id"] for m in doc["data"]]
        self.assertIn("claude-opus-5-5", ids)
        self.assertIn("gpt-5.5", ids)
        self.assertEqual((doc["has_more"], doc["first_id"], doc["last_id"]), (False, ids[0], ids[-1]))
        for model in doc["data"]:
            self.assertEqual(model["type"], "model")
            self.assertRegex(model["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(self.request("GET", "/v1/models/gpt-5.5").json()["id"], "gpt-5.5")
        self.assert_error(self.request("GET", "/v1/models/nope"), 404, "not_found_error")

    def test_count_tokens_estimates_without_calling_upstream(self):
        fresh = {"X-Claude-Code-Session-Id": "count-tokens-%s" % secrets.token_hex(4)}   # nothing learned yet
        small = self.post(dict(BASIC), path="/v1/messages/count_tokens?beta=true", headers=fresh).json()
        large = self.post(dict(BASIC, messages=[user("word " * 4000)], tools=[BASH_TOOL]),
                          path="/v1/messages/count_tokens").json()
        self.assertEqual(set(small), {"input_tokens"})
        self.assertGreater(large["input_tokens"], 4000)
        self.assertLess(small["input_tokens"], 50)
        self.assertEqual(self.fake.requests, [])

    def test_keep_alive_connection_serves_several_requests(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        for _ in range(3):
            self.fake.reply(self.fake.turn().text("again").completed())
            conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, stream=True)),
                         {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
            response = conn.getresponse()
            check_stream(self, response.read())
        conn.close()


class TestNotLoggedIn(ProxyCase):
    logged_in = False

    def test_missing_token_file_says_how_to_log_in(self):
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 401)
        self.assertEqual(answer.json()["error"]["type"], "authentication_error")
        self.assertIn("python codex_proxy.py login", answer.json()["error"]["message"])
        self.assertEqual(self.request("GET", "/health", key=None).json()["logged_in"], False)


class TestRequestGuards(ProxyCase):
    settings = {"client_timeout": 0.5, "keepalive_timeout": 30.0}

    def refused(self, answer, status=403, error_type="permission_error"):
        self.assertEqual(answer.status, status, answer.body)
        self.assertEqual(answer.json()["error"]["type"], error_type)
        for header in answer.headers:
            self.assertFalse(header.lower().startswith("access-control-"), "no CORS headers, ever")

    def test_browser_style_csrf_is_refused_and_nothing_reaches_upstream(self):
        body = json.dumps(BASIC).encode()
        attempts = [
            dict(key=None, headers={"Content-Type": "text/plain"}),                       # a form post
            dict(key=None, headers={"Content-Type": "text/plain", "Origin": "https://evil.example"}),
            dict(key=PROXY_KEY, headers={"Content-Type": "text/plain"}),                  # even with the key
            dict(key=PROXY_KEY, headers={"Origin": "https://evil.example"}),
            dict(key=PROXY_KEY, headers={"Origin": "null"}),
        ]
        for attempt in attempts:
            answer = self.request("POST", "/v1/messages", raw=body, **attempt)
            self.assertIn(answer.status, (401, 403), attempt)
            self.assertEqual(answer.json()["type"], "error")
        self.refused(self.request("POST", "/v1/messages", raw=body, headers={"Origin": "https://evil.example"}))
        self.refused(self.request("POST", "/v1/messages", raw=body, headers={"Content-Type": "text/plain"}))
        self.assertEqual(self.fake.requests, [])
        report("csrf: %d browser-style requests refused, %d reached the upstream" % (len(attempts) + 2, len(self.fake.requests)))

    def test_dns_rebinding_host_is_refused(self):
        port = self.proxy.server_address[1]
        for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1:%d" % (port + 1), "attacker.localhost:%d" % port):
            self.refused(self.post(BASIC, headers={"Host": host}))
            self.refused(self.request("GET", "/health", key=None, headers={"Host": host}))
        for host in ("localhost:%d" % port, "127.0.0.1:%d" % port, "[::1]:%d" % port):
            self.assertEqual(self.request("GET", "/v1/models", headers={"Host": host}).status, 200, host)
        self.assertEqual(self.fake.requests, [])
        report("rebinding: 8 requests with foreign Host headers refused, 0 reached the upstream")

    def test_an_allowed_origin_passes(self):
        self.config.allowed_origins = ["https://my-tool.example"]
        self.addCleanup(setattr, self.config, "allowed_origins", [])
        answer = self.request("GET", "/v1/models", headers={"Origin": "https://my-tool.example"})
        self.assertEqual(answer.status, 200)
        self.assertNotIn("Access-Control-Allow-Origin", answer.headers)

    def test_cors_preflight_gets_no_cors_headers(self):
        answer = self.request("OPTIONS", "/v1/messages", headers={"Origin": "https://evil.example",
                                                                 "Access-Control-Request-Method": "POST"})
        self.assertGreaterEqual(answer.status, 400)
        self.assertFalse([h for h in answer.headers if h.lower().startswith("access-control-")])

    def test_body_over_the_cap_is_413_before_reading_it(self):
        self.config.max_body = 1024 * 1024
        self.addCleanup(setattr, self.config, "max_body", 32 * 1024 * 1024)
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
        self.addCleanup(sock.close)
        started = time.monotonic()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (self.proxy.server_address[1], PROXY_KEY.encode(), 2 * 1024 * 1024))
        answer = b""
        while b"request_too_large" not in answer and select_ready(sock, 5):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:100])
        self.assertIn(b'"request_too_large"', answer)
        self.assertLess(time.monotonic() - started, 5.0, "answered without waiting for the 2 MiB")

    def test_stalled_and_trickling_clients_are_cut(self):
        port = self.proxy.server_address[1]
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(stalled.close)
        started = time.monotonic()
        stalled.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # and then nothing
        self.assertEqual(stalled.recv(65536)[:0], b"")
        while stalled.recv(65536):
            pass
        header_cut = time.monotonic() - started
        self.assertLess(header_cut, 3)
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(trickle.close)
        started = time.monotonic()
        trickle.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\""
                        % (port, PROXY_KEY.encode()))
        answer = b""
        for _ in range(20):   # one byte every 0.1 s: each packet is prompt, the whole is too slow
            try:
                trickle.sendall(b" ")
            except OSError:
                break
            time.sleep(0.1)
            answer = trickle.recv(65536) if select_ready(trickle) else answer
            if answer:
                break
        trickle.settimeout(10)
        while answer and b"did not arrive in time" not in answer:   # the head and the body may come apart
            more = trickle.recv(65536)
            if not more:
                break
            answer += more
        self.assertIn(b"did not arrive in time", answer)
        report("slow clients: stalled headers cut after %.1f s, a trickled body after %.1f s (limit 0.5 s)"
               % (header_cut, time.monotonic() - started))

    def test_idle_keep_alive_connection_still_serves_after_a_pause(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
        self.addCleanup(conn.close)
        for _ in range(2):
            conn.request("GET", "/v1/models", headers={"x-api-key": PROXY_KEY})
            self.assertEqual(conn.getresponse().read()[:1], b"{")
            time.sleep(1.0)   # longer than client_timeout: idle between requests is not "slow"


class TestOneRequestPerRequest(ProxyCase):
    """A refused request never leaves its body to be read as the next request, and header
    lines that two readers could read two ways are refused with the connection closed."""

    def exchange(self, raw, timeout=5):
        """Send raw bytes on a new connection; -> every byte the proxy sends until it closes or
        goes quiet."""
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(raw)
        received = b""
        while select_ready(sock, timeout):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            timeout = 0.5   # the rest, if any, follows at once
        return received

    def head(self, method, path, extra=b"", body=b"", key=True):
        port = self.proxy.server_address[1]
        return (b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s%sContent-Length: %d\r\n\r\n%s"
                % (method, path, port, b"x-api-key: %s\r\n" % PROXY_KEY.encode() if key else b"", extra,
                   len(body), body))

    def test_each_early_refusal_followed_by_a_pipelined_request(self):
        port = self.proxy.server_address[1]
        smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n\r\n" % (
            port, PROXY_KEY.encode())
        refusals = {
            "404": (self.head(b"POST", b"/nowhere", body=smuggled), b"HTTP/1.1 404"),
            "405": (self.head(b"POST", b"/v1/models", body=smuggled), b"HTTP/1.1 405"),
            "wrong key": (self.head(b"POST", b"/v1/messages", b"Content-Type: application/json\r\n", smuggled,
                                    key=False), b"HTTP/1.1 401"),
            "foreign origin": (self.head(b"POST", b"/v1/messages", b"Origin: https://evil.example\r\n"
                                         b"Content-Type: text/plain\r\n", smuggled), b"HTTP/1.1 403"),
        }
        count_tokens = json.dumps(BASIC).encode()
        second = self.head(b"POST", b"/v1/messages/count_tokens", b"Content-Type: application/json\r\n",
                           count_tokens)
        for name, (first, status) in refusals.items():
            with self.subTest(refusal=name):
                received = self.exchange(first + second)
                self.assertTrue(received.startswith(status), received[:200])
                self.assertNotIn(b'"data":[', received, "the refused body was not run as a request")
                answers = received.count(b"HTTP/1.1 ")
                self.assertIn(answers, (1, 2), received[:300])
                if answers == 2:   # drained: the next request got its own answer
                    self.assertIn(b'"input_tokens"', received)
        self.assertEqual(self.fake.requests, [])

    def test_a_keep_alive_client_with_a_wrong_key_is_answered_next_time(self):
        body = json.dumps(BASIC).encode()
        wrong = self.head(b"POST", b"/v1/messages/count_tokens", b"Content-Type: application/json\r\n", body,
                          key=False)
        right = self.head(b"POST", b"/v1/messages/count_tokens", b"Content-Type: application/json\r\n", body)
        received = self.exchange(wrong + right)
        self.assertTrue(received.startswith(b"HTTP/1.1 401"), received[:100])
        self.assertEqual(received.count(b"HTTP/1.1 200"), 1, received[-300:])

    def test_header_lines_read_two_ways_are_refused_and_the_connection_closed(self):
        port = self.proxy.server_address[1]
        host = b"Host: 127.0.0.1:%d\r\n" % port
        bad = {
            "control byte": host + b"X-Note: a\x00b\r\n",
            "no colon": host + b"Just some words\r\n",
            "folded line": host + b"X-Note: a\r\n  continued\r\n",
            "two Host headers": host + host,
            "two Content-Lengths": host + b"Content-Length: 2\r\nContent-Length: 20\r\n",
            "lone CR": host + b"X-Note: a\rx-api-key: %s\r\n" % PROXY_KEY.encode(),
            "space before colon": host + b"x-api-key : %s\r\n" % PROXY_KEY.encode(),
        }
        for name, lines in bad.items():
            with self.subTest(header=name):
                received = self.exchange(b"GET /v1/models HTTP/1.1\r\n" + lines + b"\r\n" + self.head(b"GET", b"/v1/models"))
                self.assertTrue(received.startswith(b"HTTP/1.1 400"), received[:200])
                self.assertIn(b"invalid_request_error", received)
                self.assertEqual(received.count(b"HTTP/1.1 "), 1, "closed: nothing after the refusal was read")

    def test_plain_header_lines_still_work(self):
        received = self.exchange(self.head(b"GET", b"/v1/models", b"X-Tab: a\tb\r\nX-Empty:\r\n"
                                           b"X-Latin: caf\xe9\r\n"))
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received[:200])


class TestBrokenStateAndOddBodies(ProxyCase):
    """Bad input and broken files of its own get an answer, never a dropped connection or a 500."""

    settings = {"retries": 0}

    def deep_body(self, depth):
        """A tool call whose input is ``depth`` objects deep, as raw JSON (json.dumps cannot write it)."""
        deep = '{"a":' * depth + '"leaf"' + '}' * depth
        return ('{"model":"claude-opus-4-8","max_tokens":1024,"tools":[%s],"messages":[{"role":"user","content":'
                '"go"},{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"Bash","input":%s}]},'
                '{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"ok"}]}]}'
                % (json.dumps(BASH_TOOL), deep)).encode()

    def test_a_body_nested_1000_deep_gets_400_and_nothing_deep_gets_a_500(self):
        self.fake.default = self.fake.turn().text("ok").completed()
        statuses = {depth: self.post(None, raw=self.deep_body(depth)) for depth in (900, 970, 975, 980, 1000, 5000)}
        for depth, answer in statuses.items():
            self.assertIn(answer.status, (200, 400), (depth, answer.body[:200]))
        for depth in (1000, 5000):
            self.assertEqual(statuses[depth].json()["error"]["type"], "invalid_request_error", depth)
        self.assertEqual(self.proxy.crashes, 0)

    def test_a_deeply_nested_metadata_user_id_gets_400(self):
        answer = self.post(dict(BASIC, metadata={"user_id": "[" * 100000}))
        self.assertEqual(answer.status, 400, answer.body[:300])
        self.assertIn("nested too deeply", answer.json()["error"]["message"])

    def test_a_login_file_whose_lock_cannot_be_made_gets_an_answer(self):
        write_tokens(self.home / "tokens.json", access=expired_access())
        self.addCleanup(write_tokens, self.home / "tokens.json")
        lock = Path(str(self.home / "tokens.json") + ".lock")
        if lock.exists():
            lock.unlink()
        lock.mkdir()   # os.open on it fails, as on a read-only folder (root can write anywhere)
        self.addCleanup(lock.rmdir)
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 500, answer.body[:300])
        self.assertIn("Cannot use the login file %s or its lock" % (self.home / "tokens.json"),
                      answer.json()["error"]["message"])
        self.assertEqual(self.fake.requests, [])

    def test_the_ledger_after_a_cut_short_line_keeps_both_records(self):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-ledger-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        config = make_config(home, self.fake.url)
        counted = {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}
        cp.UsageLedger(config).record("gpt-5.5", "default", counted)
        with open(str(home / "usage.jsonl"), "a") as ledger:
            ledger.write('{"time": 17, "model": "gpt-5')   # the process writing it was killed here
        cp.UsageLedger(config).record("gpt-5.5", "default", counted)
        totals = cp.UsageLedger(config).totals()
        self.assertEqual([row[0] for row in totals.values()], [2], "both whole records are counted")


# The proxy's own caches, corrupted the ways a crash, an old version or a hand edit leave them:
# (file, content). Each must be ignored (and rebuilt), never crash a request, `start` or `status`.
BROKEN_CACHES = [
    ("models_cache.json", {"fetched_at": 1, "models": [{"slug": 5}, {"slug": "gpt-5.5"}]}),
    ("models_cache.json", {"fetched_at": 1, "models": [{"slug": "gpt-5.5", "supported_reasoning_levels": 5}]}),
    ("models_cache.json", {"fetched_at": 9e18, "models": []}),
    ("models_cache.json", {"fetched_at": "NaN", "models": [{"slug": "gpt-5.5"}]}),
    ("models_cache.json", {"fetched_at": 1, "models": "all of them"}),
    ("models_cache.json", ["not", "an", "object"]),
    ("quota.json", {"default": {"windows": {"primary": {"used_percent": "45"}}}}),
    ("quota.json", {"default": {"windows": {"primary": "full"}}}),
    ("quota.json", {"windows": {"primary": {"used_percent": 45, "window_minutes": "300", "resets_at": "soon"}}}),
    ("quota.json", "quota"),
    ("quota.json", b"\xff\xfe binary"),
    ("quota.json", b"[" * 100000),
    ("quota.json", FOLDER),
    ("models_cache.json", b"[" * 100000),
    ("models_cache.json", b'{"fetched_at": 1, "models": [{"slug": "gpt-'),
    ("models_cache.json", FOLDER),
    ("downgrades.json", {"gpt-5.5": {"no_such_rule": 9e18, "lite": "tomorrow", "verbosity": True}}),
    ("downgrades.json", {"gpt-5.5": ["lite"]}),
    ("downgrades.json", ["lite"]),
    ("downgrades.json", b'{"gpt-5.5": {"lite": 17'),
    ("downgrades.json", b"\x00\xff"),
    ("downgrades.json", b"{" * 100000),
    ("downgrades.json", FOLDER),
    ("usage.jsonl", b'{"time": 1e300, "model": "m", "input": 1, "cached": 0, "output": 1}\n\xff\xfe\n[1, 2]\n'
                    b'{"time": NaN, "model": "m", "input": 1, "cached": 0, "output": 1}\n'
                    b'{"time": 5, "model": "m", "input": "many", "cached": 0, "output": 1}\n'
                    b'{"time": 5, "model": "m", "input": Infinity, "cached": 0, "output": 1}\n' + b"[" * 100000 + b"\n"),
    ("usage.jsonl", FOLDER),
]


class TestProxyKeyFile(unittest.TestCase):
    """A key file that cannot be read or made, or holds a key no client can send, stops
    `start` with one sentence that names the file, never a traceback or a word about the port."""

    def start(self, prepare):
        root = Path(tempfile.mkdtemp(prefix="codex-proxy-key-"))
        self.addCleanup(shutil.rmtree, str(root), True)
        home = prepare(root)
        env = dict(os.environ, CODEX_PROXY_HOME=str(home), CODEX_HOME=str(root / "codex"))
        env.pop("CODEX_PROXY_API_KEY", None)
        result = subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "start", "--port", "0"], env=env,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        return result, home

    def key_file(self, content):
        def prepare(root):
            (root / "home").mkdir(mode=0o700)
            if content is None:
                (root / "home" / "api-key").mkdir()
            else:
                (root / "home" / "api-key").write_bytes(content)
            return root / "home"
        return prepare

    def test_each_bad_key_file_gets_its_sentence(self):
        cases = [(b"\xff\xfe not utf-8\n", "is not one that clients can send"),
                 (b"two\nlines-of-key\n", "is not one that clients can send"),
                 (b"k" * (1 << 20), "is not one that clients can send"),
                 (None, "Cannot read the proxy key in")]
        for content, sentence in cases:
            with self.subTest(content=content[:20] if content else content):
                result, home = self.start(self.key_file(content))
                self.assertEqual(result.returncode, 1, result.stderr)
                self.assertIn(sentence, result.stderr)
                self.assertIn(str(home / "api-key"), result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn("Cannot listen", result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_a_home_where_no_key_can_be_made_is_named(self):
        def prepare(root):
            (root / "a-file").write_text("not a folder")
            return root / "a-file" / "home"   # as a read-only home: the key cannot be written
        result, home = self.start(prepare)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("Cannot save a proxy key in %s" % (home / "api-key"), result.stderr)
        self.assertNotIn("Cannot listen", result.stderr)

    def test_a_configured_key_with_a_line_break_is_refused(self):
        with self.assertRaises(SystemExit) as caught:
            cp.Config(api_key="good-part\nInjected: header").proxy_key()
        self.assertIn("CODEX_PROXY_API_KEY", str(caught.exception))


class TestWhatACrashLeaves(unittest.TestCase):
    """What a process killed at the wrong moment leaves behind is cleaned up or closed properly."""

    def test_temporary_token_copies_left_by_a_killed_write_are_removed(self):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-tmp-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        old = home / ".tokens.json.dead0001.tmp"
        old.write_text('{"tokens": {"refresh_token": "rt-secret"}}')
        os.utime(str(old), (time.time() - 3600, time.time() - 3600))
        fresh = home / ".tokens.json.busy0002.tmp"   # another process is writing right now
        fresh.write_text("{}")
        write_tokens(home / "tokens.json")
        self.assertFalse(old.exists(), "an hour-old copy with token data is gone")
        self.assertTrue(fresh.exists(), "a copy another process may still be writing stays")

    def test_a_thinking_block_cut_by_max_tokens_still_ends_with_a_signature(self):
        context = cp.RequestContext("claude-opus-4-8", "gpt-5.5", {}, True, [], "key")
        context.max_tokens = 3
        turn = Turn(None, "gpt-5.5").reasoning(["a long line of thought " * 5]).text("never shown")
        out, message = translate_events(self, turn.completed(), context)
        thinking = [e for e in out if e["type"] == "content_block_delta" and e["index"] == 0]
        self.assertEqual(thinking[-1]["delta"], {"type": "signature_delta", "signature": ""})
        self.assertEqual((message["stop_reason"], message["content"][0]["signature"]), ("max_tokens", ""))


class TestBrokenCaches(unittest.TestCase):
    """A cache file of the proxy's own with wrong inner types is ignored and rebuilt: every
    request, `start`'s banner and `status` go on."""

    def test_catalog_entries_of_the_wrong_shape_are_read_as_unknown(self):
        for entry in ({"supported_reasoning_levels": 5}, {"supported_reasoning_levels": [5, "x"]},
                      {"context_window": "big"}):
            self.assertEqual(cp.model_profile("gpt-5.5", {"gpt-5.5": entry})[:1], (cp.CLASSIC_EFFORTS,), entry)

    def test_each_broken_cache_is_ignored(self):
        fake = FakeCodex().start()
        self.addCleanup(fake.stop)
        fake.default = fake.turn().text("ok").completed()
        warnings = []
        from unittest import mock
        with mock.patch.object(cp, "warn", warnings.append):
            self.serve_each_broken_cache(fake, warnings)

    def serve_each_broken_cache(self, fake, warnings):
        for name, content in BROKEN_CACHES:
            with self.subTest(file=name, content=repr(content)[:80]):
                home = Path(tempfile.mkdtemp(prefix="codex-proxy-cache-"))
                self.addCleanup(shutil.rmtree, str(home), True)
                write_tokens(home / "tokens.json")
                if content is FOLDER:
                    (home / name).mkdir()
                else:
                    (home / name).write_bytes(content if isinstance(content, bytes) else
                                              json.dumps(content).replace('"NaN"', "NaN").encode())
                asked = len(fake.gets)
                config = make_config(home, fake.url)
                proxy = cp.ProxyServer(config)
                threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
                try:
                    self.assertTrue(cp.start_banner(proxy))
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
                    conn.request("POST", "/v1/messages", json.dumps(BASIC),
                                 {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
                    self.assertEqual(conn.getresponse().status, 200)
                    conn.close()
                    status = cp.login_status(config)
                    self.assertTrue(status["logged_in"])
                    cp.describe_quota(status["quota"])
                    self.assertEqual(cp.LearnedDowngrades(config).for_model("gpt-5.5"), ())
                    requests = [row[0] for row in cp.UsageLedger(config).totals(365000).values()]
                    self.assertEqual(requests, [] if content is FOLDER and name == "usage.jsonl" else [1],
                                     "only the turn just served is counted")
                    if name == "models_cache.json":   # never trusted as fresh: asked for again at once
                        wait_until(lambda: len(fake.gets) > asked, what="a catalog fetch")
                    if content is FOLDER and name in ("models_cache.json", "usage.jsonl"):   # said, once
                        said = wait_until(lambda: [w for w in warnings if w.startswith("Cannot save %s (" % (home / name))],
                                          what="the warning")
                        self.assertEqual(len(said), 1, said)
                finally:
                    proxy.shutdown()
                    proxy.server_close()
                    proxy.codex.close_idle()


def select_ready(sock, timeout=0.0):
    import select
    return bool(select.select([sock], [], [], timeout)[0])


def mutate(rng, body):
    """One hostile variation of a real Claude Code body, as raw bytes."""
    raw = json.dumps(body).encode()
    choice = rng.randrange(8)
    if choice == 0:
        return raw[:rng.randrange(1, max(2, len(raw)))]                       # truncated
    if choice == 1:
        cut = rng.randrange(len(raw))
        return raw[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]) + raw[cut:]   # bad bytes
    if choice == 2:
        depth = rng.choice([50, 500, 5000, 50000])
        return b'{"model":"claude-opus-4-8","messages":' + b"[" * depth + b"]" * depth + b"}"  # deep nesting
    doc = json.loads(raw)
    paths = list(walk_paths(doc))
    path = rng.choice(paths) if paths else []
    replacement = rng.choice([None, 0, -1, 1e308, True, "", "x" * rng.choice([10, 100000, 2000000]),
                              [], {}, [None], {"type": None}, [[[]]], "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")])
    if choice == 7 and path:
        parent, key = locate(doc, path)
        deep = replacement
        for _ in range(rng.choice([10, 300, 900])):
            deep = [deep] if rng.random() < 0.5 else {"content": deep}
        parent[key] = deep
    elif path:
        parent, key = locate(doc, path)
        if choice == 6 and isinstance(parent, dict):
            del parent[key]                                                   # a field goes missing
        else:
            parent[key] = replacement                                         # type swap
    else:
        doc = replacement
    return json.dumps(doc).encode()


def walk_paths(node, prefix=()):
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        if len(prefix) < 8:
            yield from walk_paths(value, prefix + (key,))


def locate(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc, path[-1]


class TestFuzz(ProxyCase):

    def test_5000_mutated_claude_code_bodies_never_crash_the_server(self):
        import random
        rng = random.Random(20261125)
        sources = [claude_code_body(p.name) for p in sorted(fixture("claude-code").glob("*-request.json"))]
        sources = [b for b in sources if isinstance(b, dict) and "messages" in b]
        for excerpt in sorted(fixture("claude-code").glob("2*.json")) + sorted(fixture("claude-code").glob("3*.json")):
            doc = json.loads(excerpt.read_text())
            sources.append({"model": doc["model"], "max_tokens": 100, "messages": [user("go")] + doc["messages_tail"]})
        small = [b for b in sources if len(json.dumps(b)) < 20000]
        self.fake.default = self.fake.turn().text("ok").completed()
        counts = collections.Counter()
        bad_errors, internal = [], []
        lock = threading.Lock()
        bodies = [mutate(rng, rng.choice(small if rng.random() < 0.9 else sources)) for _ in range(5000)]

        def worker(chunk):
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=30)
            for raw in chunk:
                try:
                    conn.request("POST", "/v1/messages", raw, {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=30)
                    with lock:
                        counts["connection dropped"] += 1
                    continue
                with lock:
                    counts[response.status] += 1
                    if response.status >= 300:
                        try:
                            doc = json.loads(data)
                            ok = doc["type"] == "error" and doc["error"]["type"] and doc["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            ok = False
                        if not ok:
                            bad_errors.append((response.status, data[:200]))
                        if response.status == 500 and b"Internal proxy error" in data:
                            internal.append((raw[:300], data[:300]))
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            conn.close()
        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(bodies[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.monotonic() - started
        self.assertEqual(sum(counts.values()), 5000)
        self.assertEqual(self.proxy.crashes, 0, "crashed handler threads")
        self.assertEqual(bad_errors, [], "non-2xx replies without a JSON error body")
        self.assertEqual(internal, [], "bugs: internal errors on hostile input")
        self.assertEqual(counts["connection dropped"], 0)
        self.assertEqual(self.request("GET", "/health", key=None).status, 200)
        report("fuzz: 5000 bodies in %.1f s, statuses %s, 0 crashed threads, 0 replies without a JSON error body"
               % (elapsed, dict(sorted((k, v) for k, v in counts.items() if isinstance(k, int)))))


class TestMemoryAfterLargeBodies(ProxyCase):
    """A request with a large body hands the memory back once its reply is out (the
    benchmark measures the effect: 100 bodies of 5 MB, RSS within 20 MB of idle)."""

    def test_memory_is_given_back_after_a_large_body_and_only_then(self):
        from unittest import mock
        calls = []
        self.fake.reply(self.fake.turn().text("small").completed(), self.fake.turn().text("large").completed())
        with mock.patch.object(cp.Memory, "give_back", lambda: calls.append("trimmed")):
            self.assertEqual(self.post(BASIC).status, 200)
            self.assertEqual(calls, [], "a small body costs nothing")
            text = "y" * (2 << 20)
            answer = self.post(dict(BASIC, messages=[user(text)]))
            self.assertEqual(answer.status, 200, answer.body[:300])
            wait_until(lambda: calls == ["trimmed"], what="the memory given back")
        self.assertEqual(self.sent()["input"][0]["content"][0]["text"], text, "the body arrived whole")

    def test_glibc_is_told_to_give_memory_back(self):
        import platform
        if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
            self.skipTest("malloc_trim is glibc's")
        self.assertTrue(cp.Memory.libc(), "malloc_trim and mallopt were found")
        cp.Memory.give_back()
        self.assertTrue(cp.Memory.share_arenas(), "glibc took the arena limit")


class TestConnectionLimits(ProxyCase):
    """No client can hold the proxy hostage: one deadline per request head, a short
    wait for a silent new connection, a cap on connections served at once."""

    settings = {"client_timeout": 1.0, "first_request_timeout": 1.5, "keepalive_timeout": 30.0,
                "max_connections": 64}

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def wait_for(self, condition, timeout=10.0):
        wait_until(condition, timeout)

    def timed_models_request(self):
        started = time.monotonic()
        answer = self.request("GET", "/v1/models")
        return answer, time.monotonic() - started

    def test_trickled_request_heads_are_cut_at_one_deadline(self):
        port = self.proxy.server_address[1]
        head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\nX-Padding: %s\r\n"
                % (port, PROXY_KEY.encode(), b"p" * 400))
        socks = [self.connect() for _ in range(50)]
        for sock in socks:
            sock.setblocking(False)
        started, closed_after, sent = time.monotonic(), {}, 0
        while len(closed_after) < len(socks) and time.monotonic() - started < 10:
            for sock in socks:   # one header byte per connection every 0.2 s: each byte is prompt
                if sock in closed_after:
                    continue
                try:
                    if select_ready(sock) and not sock.recv(65536):
                        raise ConnectionResetError()
                    sock.send(head[sent % len(head):][:1])
                except OSError:
                    closed_after[sock] = time.monotonic() - started
            sent += 1
            time.sleep(0.2)
        self.assertEqual(len(closed_after), 50, "connections still open after 10 s")
        latest = max(closed_after.values())
        self.assertLess(latest, self.config.client_timeout + 2)
        self.assertEqual(self.proxy.crashes, 0)
        report("trickled heads: 50 connections sending a header byte every 0.2 s, all closed by %.2f s "
               "(head deadline %g s)" % (latest, self.config.client_timeout))

    def test_silent_connections_cost_no_thread_and_are_closed(self):
        threads_before = threading.active_count()
        silent = [self.connect() for _ in range(500)]
        self.wait_for(lambda: len(self.proxy.lobby.waiting) >= 500)
        answer, elapsed = self.timed_models_request()
        self.assertEqual(answer.status, 200)
        self.assertLess(elapsed, 2.0, "the silent connections do not hold a request up")
        added = threading.active_count() - threads_before
        self.assertLess(added, self.config.max_connections)
        self.assertLessEqual(self.proxy.connections, 1)
        started = time.monotonic()
        for sock in silent:   # the proxy closes each one after first_request_timeout
            sock.settimeout(10)
            self.assertEqual(sock.recv(1), b"")
        closed = time.monotonic() - started
        self.assertLess(closed, self.config.first_request_timeout + 2)
        self.wait_for(lambda: not self.proxy.lobby.waiting)
        report("silent connections: 500 held with %d extra threads (cap %d); a request meanwhile took %.1f ms; "
               "all closed within %.1f s" % (added, self.config.max_connections, elapsed * 1000, closed))

    def test_over_the_cap_a_new_connection_gets_529_and_the_others_go_on(self):
        self.fake.default = self.fake.turn().text("served").completed()
        held = []
        for _ in range(self.config.max_connections):   # keep-alive connections, each served once
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy.server_address[1], timeout=10)
            self.addCleanup(conn.close)
            conn.request("GET", "/v1/models", headers={"x-api-key": PROXY_KEY})
            self.assertEqual(conn.getresponse().read()[:1], b"{")
            held.append(conn)
        self.wait_for(lambda: self.proxy.connections == self.config.max_connections)
        started = time.monotonic()
        answer = self.post(BASIC)
        self.assertLess(time.monotonic() - started, 5.0, "the 529 comes at once, not after a wait")
        self.assertEqual(answer.status, 529)
        self.assertEqual(answer.json()["error"]["type"], "overloaded_error")
        self.assertIn("CODEX_PROXY_MAX_CONNECTIONS", answer.json()["error"]["message"])
        self.assertEqual(answer.headers["x-should-retry"], "true")
        held[0].request("GET", "/v1/models", headers={"x-api-key": PROXY_KEY})   # the admitted ones are served
        self.assertEqual(held[0].getresponse().status, 200)
        held.pop().close()
        self.wait_for(lambda: self.proxy.connections < self.config.max_connections)
        answer = self.post(BASIC)
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(len(self.fake.requests), 1, "the refused request never reached the upstream")

    def test_a_burst_of_300_clients_is_answered_within_2_seconds(self):
        self.fake.default = self.fake.turn().text("burst reply").completed()
        body = json.dumps(BASIC).encode()
        port = self.proxy.server_address[1]
        gate, lock, answers = threading.Barrier(300, timeout=30), threading.Lock(), []

        def client():
            gate.wait()
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/messages", body, {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
                status = conn.getresponse().status
                conn.close()
            except OSError as exc:
                status = repr(exc)
            with lock:
                answers.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=client) for _ in range(300)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        statuses = collections.Counter(status for status, _ in answers)
        slowest = max(elapsed for _, elapsed in answers)
        self.assertEqual(len(answers), 300)
        self.assertEqual(set(statuses) - {200, 529}, set(), statuses)
        self.assertLess(slowest, 10.0, "every client was answered; none waited for a timeout")
        self.assertEqual(self.proxy.crashes, 0)
        report("burst: 300 clients at once, answers %s, slowest %.2f s" % (dict(statuses), slowest))


class TestKeeper(unittest.TestCase):
    """The one thread that pings, times out and notices departed clients for every reply."""

    def test_one_failing_stream_does_not_stop_the_keeping_of_the_others(self):
        config = make_config(tempfile.gettempdir(), "http://127.0.0.1:9/x", ping_interval=0.1, idle_timeout=10)
        server = type("Server", (), {"config": config})()
        keeper = cp.Keeper(server)
        seen = threading.Event()

        class Broken:
            def keep(self, stream, now):
                raise ValueError("file descriptor cannot be a negative integer (-1)")

            def log_error(self, *args):
                pass

        class Healthy:
            calls = 0

            def keep(self, stream, now):
                Healthy.calls += 1
                if Healthy.calls >= 3:
                    seen.set()
        keeper.watch(Broken(), object())
        keeper.watch(Healthy(), object())
        self.assertTrue(seen.wait(10), "the keeper kept going past the failing stream")

    def test_a_closed_client_socket_counts_as_gone(self):
        left, right = socket.socketpair()
        right.close()
        self.assertTrue(cp.client_left(left))
        left.close()
        self.assertTrue(cp.client_left(left), "no ValueError on a closed socket")


class TestShutdownAndLogs(unittest.TestCase):
    """`start` serves until SIGTERM or Ctrl+C, then lets running replies finish. Where glibc
    can give memory back it serves from a thread once the script's code has ended (so that
    Python frees the script's parse); elsewhere from the main thread: both are tested here."""

    # `start` as it runs where it serves from the main thread (no glibc, Python 3.12.0-3.12.2)
    FROM_THE_MAIN_THREAD = ["-c", "import sys, codex_proxy as cp; cp.serves_after_the_script = lambda: False; "
                                  "sys.exit(cp.main(sys.argv[1:]))"]

    def start_proxy(self, fake, *flags, launcher=None):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-stop-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        write_tokens(home / "tokens.json")
        env = dict(os.environ, CODEX_PROXY_HOME=str(home), CODEX_HOME=str(home / "codex"),
                   CODEX_PROXY_UPSTREAM=fake.url, CODEX_PROXY_API_KEY=PROXY_KEY)
        command = [sys.executable] + (launcher or [str(HERE / "codex_proxy.py")]) + ["start", "--port", "0"]
        process = subprocess.Popen(command + list(flags), env=env, cwd=str(HERE), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, process)
        port = int(re.search(r":(\d+)$", process.stdout.readline().split()[-1]).group(1))
        return process, port

    def test_sigterm_lets_running_replies_finish_then_cuts_the_rest_and_exits_0(self):
        self.check_sigterm_drains()

    def test_the_same_when_serving_from_the_main_thread(self):
        self.check_sigterm_drains(self.FROM_THE_MAIN_THREAD)

    def test_start_gives_the_scripts_parse_back_while_it_serves(self):
        if not cp.serves_after_the_script():
            self.skipTest("served from the main thread here: the parse is kept")
        fake = FakeCodex().start()
        self.addCleanup(fake.stop)
        fake.reply(fake.turn().text("served after the script ended").completed())
        process, port = self.start_proxy(fake)

        def memory(field):
            status = Path("/proc/%d/status" % process.pid).read_text()
            return int(re.search(field + r":\s+(\d+) kB", status).group(1))
        # The parse of the script is most of the peak; given back, the process is well below it.
        wait_until(lambda: memory("VmRSS") < 0.8 * memory("VmHWM"), what="the script's parse given back")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(BASIC), {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
        answer = conn.getresponse()
        self.assertEqual((answer.status, json.loads(answer.read())["content"][0]["text"]),
                         (200, "served after the script ended"))
        conn.close()
        report("start: RSS %.1f MB once serving, %.1f MB at its peak" % (memory("VmRSS") / 1024, memory("VmHWM") / 1024))
        process.send_signal(__import__("signal").SIGINT)
        self.assertEqual(process.wait(30), 0, "Ctrl+C stops it")

    def check_sigterm_drains(self, launcher=None):
        import signal
        fake = FakeCodex().start()
        self.addCleanup(fake.stop)
        quick = Reply(events=fake.turn().text("finished during shutdown").completed(), pause=(3, 1.0))
        stuck = Reply(events=fake.turn().text("never ends", pieces=2).completed(), stall_after=4)
        fake.reply(quick, stuck)
        process, port = self.start_proxy(fake, launcher=launcher)
        results = {}

        def call(name):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, stream=True)),
                         {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
            results[name] = conn.getresponse().read()
            conn.close()
        threads = [threading.Thread(target=call, args=(name,)) for name in ("quick", "stuck")]
        for thread in threads:
            thread.start()
            wait_until(lambda: len(fake.requests) >= threads.index(thread) + 1, 30)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(15)
        elapsed = time.monotonic() - started
        for thread in threads:
            thread.join(10)
        self.assertEqual(code, 0)
        quick_events = check_stream(self, results["quick"])
        self.assertEqual(quick_events[-1]["type"], "message_stop", "a reply that ends within the grace time ends normally")
        stuck_events = check_stream(self, results["stuck"])
        self.assertEqual(stuck_events[-1]["type"], "error")
        self.assertIn("shutting down", stuck_events[-1]["error"]["message"])
        self.assertLess(elapsed, 10)
        stuck.release.set()
        report("shutdown: exit 0 after %.1f s; 1 reply finished, 1 cut with an error event" % elapsed)

    def test_logs_never_show_keys_tokens_or_content(self):
        for flags in ([], ["--verbose"]):
            fake = FakeCodex().start()
            self.addCleanup(fake.stop)
            fake.reply(fake.turn().text("secret answer text").completed(), Reply(status=500, body={"detail": "x"}),
                       *[Reply(status=500, body={"detail": "x"}) for _ in range(3)])
            process, port = self.start_proxy(fake, *flags)
            for body in (dict(BASIC, messages=[user("private prompt words")]), BASIC):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/v1/messages?beta=true", json.dumps(body), {
                    "Authorization": "Bearer " + PROXY_KEY, "Content-Type": "application/json"})
                conn.getresponse().read()
                conn.close()
            process.send_signal(__import__("signal").SIGINT)
            _, err = process.communicate(timeout=60)
            for secret in (PROXY_KEY, ACCESS_TOKEN, "private prompt words", "secret answer text"):
                self.assertNotIn(secret, err, (flags, secret))
            if flags:
                self.assertIn("POST /v1/messages", err, "verbose logs the requests")


# ---------------------------------------------------------------------------
# Command line: env, the launcher, doctor, a named login, the request log, the manual
# ---------------------------------------------------------------------------

STUB_CLAUDE = """#!%s
import json, os, sys, urllib.request
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/models",
                                 headers={"Authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"]})
status = urllib.request.urlopen(request, timeout=10).status
names = [n for n in os.environ if n.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))]
print(json.dumps({"args": sys.argv[1:], "env": {n: os.environ[n] for n in names}, "models_status": status}))
sys.exit(7)
""" % sys.executable


class CliCase(unittest.TestCase):
    """An isolated home with a login, a FakeCodex, and the program run as a subprocess."""

    def setUp(self):
        self.root = Path(tempfile.mkdtemp(prefix="codex-proxy-cli-"))
        self.addCleanup(shutil.rmtree, str(self.root), True)
        self.home = self.root / "proxy-home"
        write_tokens(self.home / "tokens.json")
        self.fake = FakeCodex().start()
        self.addCleanup(self.fake.stop)
        self.bin = self.root / "bin"
        self.bin.mkdir()
        self.env = dict(os.environ, CODEX_PROXY_HOME=str(self.home), CODEX_HOME=str(self.root / "codex"),
                        CODEX_PROXY_UPSTREAM=self.fake.url, CODEX_PROXY_PORT=str(free_port()),
                        PATH=str(self.bin) + os.pathsep + "/usr/bin:/bin", HOME=str(self.root))
        for name in ("CODEX_PROXY_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
            self.env.pop(name, None)

    def run_cli(self, *args, **kw):
        return subprocess.run([sys.executable, str(HERE / "codex_proxy.py")] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=kw.get("timeout", 120), stdin=subprocess.DEVNULL)

    def stub_claude(self):
        stub = self.bin / "claude"
        stub.write_text(STUB_CLAUDE)
        stub.chmod(0o755)


def free_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def stop_process(process):
    process.kill()
    process.communicate()


class TestStartCommand(unittest.TestCase):

    def test_flags_win_over_environment_over_defaults(self):
        saved = {k: os.environ.pop(k, None) for k in ("CODEX_PROXY_HOST", "CODEX_PROXY_PORT", "CODEX_PROXY_OPUS_MODEL")}
        self.addCleanup(lambda: [os.environ.__setitem__(k, v) for k, v in saved.items() if v is not None])
        parser = cp.build_parser()
        config = cp.config_from_args(parser.parse_args(["start"]))
        self.assertEqual((config.host, config.port, config.models["opus"]), ("127.0.0.1", 8082, "gpt-6.2-sol"))
        os.environ.update(CODEX_PROXY_HOST="127.0.0.2", CODEX_PROXY_PORT="9000", CODEX_PROXY_OPUS_MODEL="gpt-5.4:high")
        self.addCleanup(lambda: [os.environ.pop(k, None) for k in ("CODEX_PROXY_HOST", "CODEX_PROXY_PORT",
                                                                    "CODEX_PROXY_OPUS_MODEL")])
        config = cp.config_from_args(parser.parse_args(["start"]))
        self.assertEqual((config.host, config.port, config.models["opus"]), ("127.0.0.2", 9000, "gpt-5.4:high"))
        config = cp.config_from_args(parser.parse_args(["start", "--host", "127.0.0.3", "--port", "9001", "--verbose"]))
        self.assertEqual((config.host, config.port, config.verbose), ("127.0.0.3", 9001, True))
        os.environ["CODEX_PROXY_PORT"] = "eighty"
        with self.assertRaises(SystemExit) as caught:
            cp.Config()
        self.assertIn("CODEX_PROXY_PORT must be a whole number", str(caught.exception))

    def test_start_prints_the_lines_to_paste_and_keeps_the_key_private(self):
        home = Path(tempfile.mkdtemp(prefix="codex-proxy-start-"))
        self.addCleanup(shutil.rmtree, str(home), True)
        env = dict(os.environ, CODEX_PROXY_HOME=str(home))
        env.pop("CODEX_PROXY_API_KEY", None)
        process = subprocess.Popen([sys.executable, str(HERE / "codex_proxy.py"), "start", "--port", "0"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, process)
        lines = [process.stdout.readline() for _ in range(9)]
        text = "".join(lines)
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text).group(1)
        self.assertIn("export ANTHROPIC_BASE_URL=%s\n" % url, text)
        self.assertIn("export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", text)
        key = re.search(r"export ANTHROPIC_AUTH_TOKEN=(\S+)", text).group(1)
        key_file = home / "api-key"
        self.assertEqual(key_file.read_text().strip(), key)
        self.assertEqual(stat.S_IMODE(key_file.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(home.stat().st_mode), 0o700)
        self.assertIn("python codex_proxy.py login", text, "not logged in yet: says what to do")
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer " + key})
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()

    def test_start_does_not_look_up_its_own_name(self):
        from unittest import mock
        home = tempfile.mkdtemp(prefix="codex-proxy-name-")
        self.addCleanup(shutil.rmtree, home, True)
        with mock.patch.dict(os.environ, CODEX_PROXY_HOME=home), \
                mock.patch.object(socket, "getfqdn", side_effect=AssertionError("a DNS lookup at start")):
            server = cp.ProxyServer(cp.config_from_args(cp.build_parser().parse_args(["start", "--port", "0"])))
        server.server_close()
        self.assertEqual(server.server_name, "127.0.0.1")

    def test_port_in_use_is_one_clear_sentence(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        home = tempfile.mkdtemp(prefix="codex-proxy-busy-")
        self.addCleanup(shutil.rmtree, home, True)
        result = subprocess.run([sys.executable, str(HERE / "codex_proxy.py"), "start", "--port",
                                 str(busy.getsockname()[1])], env=dict(os.environ, CODEX_PROXY_HOME=home),
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertIn("is already in use", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class TestEnvCommand(CliCase):

    def test_bash_lines_evaluate_to_the_right_environment(self):
        self.env["CODEX_PROXY_API_KEY"] = "key with 'quotes' and $dollars"
        script = 'eval "$(%s %s env)"; printf "%%s|%%s|%%s|%%s" "$ANTHROPIC_BASE_URL" "$ANTHROPIC_AUTH_TOKEN" ' \
                 '"$CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC" "$CLAUDE_CODE_AUTO_COMPACT_WINDOW"' % (
                     sys.executable, HERE / "codex_proxy.py")
        result = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.split("|"), ["http://127.0.0.1:%s" % self.env["CODEX_PROXY_PORT"],
                                                    "key with 'quotes' and $dollars", "1", "500000"])

    def test_fish_and_powershell_syntax(self):
        self.env["CODEX_PROXY_API_KEY"] = "k'1"
        fish = self.run_cli("env", "--shell", "fish", "--port", "9000").stdout.splitlines()
        self.assertEqual(fish, ["set -gx ANTHROPIC_BASE_URL http://127.0.0.1:9000", "set -gx ANTHROPIC_AUTH_TOKEN 'k\\'1'",
                                "set -gx CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC 1",
                                "set -gx CLAUDE_CODE_AUTO_COMPACT_WINDOW 500000"])
        powershell = self.run_cli("env", "--shell", "powershell").stdout.splitlines()
        self.assertEqual(powershell[1], "$env:ANTHROPIC_AUTH_TOKEN = 'k''1'")
        self.assertEqual(powershell[0], "$env:ANTHROPIC_BASE_URL = 'http://127.0.0.1:%s'" % self.env["CODEX_PROXY_PORT"])


class TestLauncher(CliCase):

    def test_launcher_starts_a_proxy_runs_claude_with_every_argument_and_returns_its_code(self):
        self.stub_claude()
        self.env["ANTHROPIC_API_KEY"] = "sk-ant-real-key-must-not-leak"
        result = self.run_cli("claude", "-p", "hello there", "--model", "haiku", "--", "--weird")
        self.assertEqual(result.returncode, 7, result.stderr)
        seen = json.loads(result.stdout)
        self.assertEqual(seen["args"], ["-p", "hello there", "--model", "haiku", "--", "--weird"])
        self.assertEqual(seen["models_status"], 200, "the proxy answered claude with the key it was given")
        env = seen["env"]
        self.assertRegex(env["ANTHROPIC_BASE_URL"], r"^http://127\.0\.0\.1:\d+$")
        self.assertNotEqual(env["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1], self.env["CODEX_PROXY_PORT"], "a free port")
        self.assertEqual((env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"]), ("1", "500000"),
                         "the window of the opus model, gpt-6.2-sol")
        self.assertNotIn("ANTHROPIC_API_KEY", env)

    def test_launcher_uses_a_proxy_that_is_already_running(self):
        self.stub_claude()
        port = self.env["CODEX_PROXY_PORT"]
        process = subprocess.Popen([sys.executable, str(HERE / "codex_proxy.py"), "start"], env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, process)
        self.assertIn(port, process.stdout.readline())
        result = self.run_cli("claude", "-p", "x")
        self.assertEqual(result.returncode, 7, result.stderr)
        self.assertEqual(json.loads(result.stdout)["env"]["ANTHROPIC_BASE_URL"], "http://127.0.0.1:%s" % port)

    def test_missing_claude_says_how_to_install_it(self):
        result = self.run_cli("claude", "-p", "x")
        self.assertEqual(result.returncode, 127)
        self.assertEqual(result.stderr.strip(), cp.CLAUDE_MISSING)
        self.assertIn("npm install -g @anthropic-ai/claude-code", result.stderr)

    def test_not_logged_in_says_to_log_in_first(self):
        self.stub_claude()
        (self.home / "tokens.json").unlink()
        result = self.run_cli("claude")
        self.assertEqual(result.returncode, 1)
        self.assertIn("Run `python codex_proxy.py login` first.", result.stderr)

    @unittest.skipUnless(CLAUDE, "Claude Code CLI not found")
    def test_launcher_with_the_real_claude_code(self):
        os.symlink(CLAUDE, str(self.bin / "claude"))
        self.env["PATH"] = str(self.bin) + os.pathsep + os.environ.get("PATH", "")
        self.env.update(TMPDIR=str(self.root), CLAUDE_CODE_MAX_RETRIES="1")
        self.fake.reply(self.fake.turn().text("Launched through the proxy.").completed())
        result = self.run_cli("claude", "-p", "hi", "--output-format", "json", "--no-session-persistence")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(json.loads(result.stdout)["result"], "Launched through the proxy.")


class TestDoctor(CliCase):

    def script_healthy(self):
        self.fake.reply(self.fake.turn().text("pong").completed(),
                        self.fake.turn().tool_call("get_time", {"zone": "UTC"}).completed(),
                        self.fake.turn().reasoning(["Need the time."]).tool_call("get_time", {"zone": "UTC"}).completed(),
                        self.fake.turn().text("It is 12:00 UTC.").completed())

    def test_all_checks_pass_against_a_healthy_backend(self):
        self.script_healthy()
        result = self.run_cli("doctor")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual([l[0] for l in lines[:-1]], ["\u2713"] * 15, result.stdout)
        for words in ("Python", "ChatGPT login in", "token file mode 0600", "access token valid",
                      "the login can be refreshed and saved", "proxy-home is writable",
                      "Codex backend reachable", "opus -> gpt-6.2-sol is available", "Connecting to 127.0.0.1 directly", "haiku -> gpt-6-luna is available",
                      "text reply: 'pong'", "tool call: get_time", "reasoning replay: encrypted reasoning sent back and accepted"):
            self.assertIn(words, result.stdout)
        self.assertEqual(lines[-1], "All checks passed.")
        reasoning = [i for i in self.fake.requests[-1]["body"]["input"] if i["type"] == "reasoning"]
        self.assertEqual(len(reasoning), 1, "the replay really carried the encrypted reasoning")

    def test_a_broken_setup_shows_each_failure_with_its_fix(self):
        (self.home / "tokens.json").chmod(0o644)
        failures, out = run_doctor(make_config(self.home, "http://127.0.0.1:%d/backend-api/codex" % free_port()))
        self.assertEqual(failures, 5, out)
        self.assertIn("\u2717 token file mode 0644\n    fix: chmod 600 %s" % (self.home / "tokens.json"), out)
        self.assertIn("\u2717 Codex backend: Cannot reach the Codex backend", out)
        for check in ("text reply", "tool call", "reasoning replay"):
            self.assertRegex(out, "\u2717 %s: Cannot reach.*\n    fix: check the network connection and CODEX_PROXY_UPSTREAM" % check)

    def test_a_login_that_expired_for_good_says_to_log_in_again(self):
        write_tokens(self.home / "tokens.json", access=expired_access())
        failures, out = run_doctor(make_config(self.home, self.fake.url, issuer="http://127.0.0.1:%d" % free_port()))
        self.assertEqual(failures, 1)
        self.assertIn("\u2717 Could not refresh the ChatGPT login", out)
        self.assertIn("fix: run `python codex_proxy.py login`", out)

    def test_doctor_lists_what_the_proxy_learned_to_leave_out(self):
        self.fake.refuse = (REFUSALS[0][2], 400, REFUSALS[0][3])   # the backend refuses tool_choice
        self.fake.reply(self.fake.turn().text("forced").completed())
        self.script_healthy()
        config = make_config(self.home, self.fake.url)
        proxy = cp.ProxyServer(config)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
        conn.request("POST", "/v1/messages", json.dumps(dict(BASIC, tools=[BASH_TOOL], tool_choice={"type": "any"})),
                     {"x-api-key": PROXY_KEY, "Content-Type": "application/json"})
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        proxy.shutdown()
        proxy.server_close()
        result = self.run_cli("doctor")
        self.assertRegex(result.stdout, r"! gpt-5\.5: the backend refused a request part, so until [\d-]+ [\d:]+ UTC: "
                                        r"tool_choice is sent as \"auto\"")
        self.assertEqual(result.returncode, 0, result.stdout)

    def test_models_not_on_the_plan_are_named_with_the_fix(self):
        self.fake.catalog = [m for m in FAKE_CATALOG if "luna" not in m["slug"]]
        self.script_healthy()
        result = self.run_cli("doctor")
        self.assertIn("\u2717 haiku -> gpt-6-luna is not available on this plan\n    fix: set CODEX_PROXY_HAIKU_MODEL to one of:",
                      result.stdout)

    def test_a_default_the_account_lacks_is_followed_to_one_of_the_same_size(self):
        self.fake.catalog = [m for m in FAKE_CATALOG if m["slug"] != "gpt-6-luna"]
        self.script_healthy()
        result = self.run_cli("doctor")
        self.assertIn("\u2713 haiku -> gpt-6-luna is not offered to this account; gpt-5.6-luna serves it", result.stdout)


class TestOnlyANamedLogin(CliCase):
    """With only `login --account work` (no tokens.json), every entry point finds the login."""

    def setUp(self):
        CliCase.setUp(self)
        (self.home / "accounts").mkdir(mode=0o700)
        os.replace(str(self.home / "tokens.json"), str(self.home / "accounts" / "work.json"))
        self.config = make_config(self.home, self.fake.url)

    def test_health_says_logged_in(self):
        proxy = cp.ProxyServer(self.config)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=10)
        conn.request("GET", "/health")
        self.assertEqual(json.loads(conn.getresponse().read())["logged_in"], True)
        conn.close()

    def test_start_names_the_account(self):
        proxy = cp.ProxyServer(self.config)
        self.addCleanup(proxy.server_close)
        banner = "\n".join(cp.start_banner(proxy))
        self.assertIn("ChatGPT account work: unknown (unknown plan), login from %s" % (self.home / "accounts" / "work.json"),
                      banner)
        self.assertNotIn("Not logged in", banner)

    def test_claude_starts(self):
        self.stub_claude()
        result = self.run_cli("claude", "-p", "x")
        self.assertEqual(result.returncode, 7, result.stderr)
        self.assertEqual(json.loads(result.stdout)["models_status"], 200)

    def test_models_asks_the_backend_with_that_login(self):
        result = self.run_cli("models", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Could not fetch", result.stderr)
        self.assertEqual([m["model"] for m in json.loads(result.stdout)],
                         [m["slug"] for m in FAKE_CATALOG if m["visibility"] != "hide"])
        self.assertEqual(self.fake.requests, [], "only the catalog was asked")

    def test_doctor_works(self):
        TestDoctor.script_healthy(self)
        failures, out = run_doctor(self.config)
        self.assertEqual(failures, 0, out)
        self.assertIn("ChatGPT login in %s (account work)" % (self.home / "accounts" / "work.json"), out)
        self.assertIn("reasoning replay: encrypted reasoning sent back and accepted", out)


def run_doctor(config):
    """-> (failures, what it printed): doctor in this process, with the test's short timings."""
    lines = []
    failures = cp.Doctor(config, say=lines.append).run()
    return failures, "\n".join(lines)


class TestRequestLog(CliCase):

    def test_verbose_line_and_json_log_per_request(self):
        log = self.root / "requests.jsonl"
        self.fake.reply(self.fake.turn("gpt-6.2-sol").text("logged").completed(input_tokens=900, cached=600, output_tokens=12),
                        Reply(status=429, body={"error": {"type": "usage_limit_reached", "resets_in_seconds": 90}}),
                        Reply(status=502, body=b"bad gateway"), self.fake.turn("gpt-6.2-sol").text("retried").completed())
        process = subprocess.Popen([sys.executable, str(HERE / "codex_proxy.py"), "start", "--verbose",
                                    "--log-file", str(log)], env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, process)
        port = int(re.search(r":(\d+)\s*$", process.stdout.readline()).group(1))
        key = (self.home / "api-key").read_text().strip()
        for body in (dict(BASIC, stream=True), BASIC, BASIC):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/messages?beta=true", json.dumps(body), {"x-api-key": key, "Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        process.send_signal(__import__("signal").SIGINT)
        _, err = process.communicate(timeout=60)
        lines = [l for l in err.splitlines() if "/v1/messages" in l]
        self.assertEqual(len(lines), 3, err)
        self.assertRegex(lines[0], r"^\d\d:\d\d:\d\d POST /v1/messages 200 claude-opus-4-8 -> gpt-6\.2-sol \(medium\) stream "
                                   r"in=900 cached=600 out=12 first=\d+ms total=\d+ms end_turn$")
        self.assertRegex(lines[1], r"POST /v1/messages 429 claude-opus-4-8 -> gpt-6\.2-sol \(medium\) json total=\d+ms "
                                   r"error=rate_limit_error: The ChatGPT usage limit")
        self.assertRegex(lines[2], r"POST /v1/messages 200 .* end_turn$", "a retried success logs no error")
        records = [json.loads(l) for l in log.read_text().splitlines()]
        self.assertEqual([(r["status"], r.get("stop_reason"), r.get("input_tokens"), r.get("error")) for r in records],
                         [(200, "end_turn", 900, None), (429, None, None, records[1]["error"]), (200, "end_turn", 120, None)])
        self.assertNotIn(key, err + log.read_text())


class TestManual(unittest.TestCase):
    """The README is the manual: what it names exists, and what exists is in it."""

    def help_texts(self):
        import contextlib, io
        texts = {}
        for command in ("", "start", "login", "status", "logout", "models", "env", "claude", "doctor", "usage"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
                cp.main(([command] if command else []) + ["--help"])
            texts[command] = out.getvalue()
        return texts

    def manual(self):
        text = (HERE / "README.md").read_text().split("## Development")[0]   # the rest: the test harness
        return "\n".join(line for line in text.splitlines() if "bench_codex_proxy" not in line)

    def test_every_command_flag_and_variable_in_the_readme_exists_and_the_reverse(self):
        texts = self.help_texts()
        manual = self.manual()
        helps = "\n".join(texts.values())
        readme_commands = set(re.findall(r"codex_proxy\.py (start|login|status|logout|models|env|claude|doctor|usage)\b", manual))
        help_commands = set(re.findall(r"^    (\w+)\s{2,}", texts[""], re.M))
        self.assertEqual(readme_commands, help_commands)
        readme_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", manual)) - {"--"}
        help_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", helps))
        self.assertEqual(readme_flags, help_flags)
        variables = lambda text: set(re.findall(r"\b(CODEX_PROXY_[A-Z_]+[A-Z]|CODEX_HOME)\b", text))
        used = variables((HERE / "codex_proxy.py").read_text().split('"""', 2)[2])   # the code, after the docstring
        self.assertEqual(variables(manual), variables(helps))
        self.assertEqual(variables(helps), used)

    def test_version_shebang_and_a_symlink_named_codex_proxy(self):
        script = HERE / "codex_proxy.py"
        self.assertTrue(script.read_text().startswith("#!/usr/bin/env python3\n"))
        self.assertTrue(os.access(str(script), os.X_OK), "chmod +x codex_proxy.py is committed")
        folder = Path(tempfile.mkdtemp(prefix="codex-proxy-link-"))
        self.addCleanup(shutil.rmtree, str(folder), True)
        os.symlink(str(script), str(folder / "codex-proxy"))
        result = subprocess.run([str(folder / "codex-proxy"), "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.stdout.strip(), "codex-proxy " + cp.__version__)
        usage = subprocess.run([str(folder / "codex-proxy"), "status", "--help"], capture_output=True, text=True, timeout=30)
        self.assertIn("usage: codex-proxy status", usage.stdout)


# ---------------------------------------------------------------------------
# Judged by real clients: Claude Code CLI, the Codex CLI, the official Python SDK; a fresh clone's data
# ---------------------------------------------------------------------------

class RecordingHandler(cp.ProxyHandler):
    """The proxy's handler, also noting each status and header it sends (for assertions)."""

    def send_response(self, code, message=None):
        self.server.answers.append({"status": code, "headers": {}, "path": self.path})
        cp.ProxyHandler.send_response(self, code, message)

    def send_header(self, keyword, value):
        if getattr(self.server, "answers", None):
            self.server.answers[-1]["headers"][keyword.lower()] = value
        cp.ProxyHandler.send_header(self, keyword, value)


class ClaudeCodeCase(ProxyCase):
    """Runs the real `claude -p` in an empty home against the proxy and FakeCodex."""

    handler = RecordingHandler
    settings = {"ping_interval": 1.0}

    def setUp(self):
        ProxyCase.setUp(self)
        self.proxy.answers = []

    def claude_environment(self, root):
        """What `claude -p` runs with: an empty home under ``root``, the proxy as its API."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"),
                "TMPDIR": str(root / "tmp"), "TERM": "dumb", "ANTHROPIC_BASE_URL": self.proxy.url,
                "ANTHROPIC_AUTH_TOKEN": PROXY_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_MAX_RETRIES": "1", "API_TIMEOUT_MS": "60000"}

    def claude(self, prompt, *args, **env):
        root = Path(tempfile.mkdtemp(prefix="codex-proxy-claude-"))
        self.addCleanup(shutil.rmtree, str(root), True)
        for name in ("home", "tmp", "work"):
            (root / name).mkdir()
        self.work = root / "work"
        (self.work / "build").mkdir()   # something for a risky command to remove
        environment = dict(self.claude_environment(root), **env)
        result = subprocess.run([CLAUDE, "-p", prompt, "--output-format", "stream-json", "--verbose",
                                 "--no-session-persistence"] + list(args), cwd=str(root / "work"),
                                env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=180)
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        final = [line for line in lines if line.get("type") == "result"]
        self.assertTrue(final, "claude printed no result: %s %s" % (result.stdout[-2000:], result.stderr[-2000:]))
        return final[-1], lines

    def blocks(self, lines, kind):
        return [block for line in lines if line.get("type") in ("assistant", "user")
                for block in line["message"]["content"] if isinstance(block, dict) and block.get("type") == kind]


@needs(CLAUDE, "Claude Code CLI not found: npm install @anthropic-ai/claude-code@2.1.331 (or set CODEX_PROXY_CLAUDE)")
class TestClaudeCode(ClaudeCodeCase):
    """Scenarios run by the real `claude -p` against the proxy and FakeCodex."""

    def test_1_plain_text_answer(self):
        self.fake.reply(self.fake.turn().text("Hello from the Codex backend.").completed())
        result, _ = self.claude("say hello")
        self.assertEqual((result["is_error"], result["result"]), (False, "Hello from the Codex backend."))
        self.assertEqual(len(self.fake.requests), 1)

    def test_2_bash_tool_really_runs_and_its_output_goes_back(self):
        turn = self.fake.turn().text("I'll run it.").tool_call("Bash", {"command": "echo marker-7f3a",
                                                                         "description": "Print a marker"})
        self.fake.reply(turn.completed(), self.fake.turn().text("The command printed marker-7f3a.").completed())
        result, lines = self.claude("run echo marker-7f3a", "--allowedTools", "Bash")
        self.assertEqual(result["result"], "The command printed marker-7f3a.")
        outputs = [i for i in self.sent()["input"] if i["type"] == "function_call_output"]
        self.assertEqual(len(outputs), 1)
        self.assertIn("marker-7f3a", outputs[0]["output"])
        self.assertEqual(self.blocks(lines, "tool_result")[0]["content"], "marker-7f3a")

    def test_3_parallel_tool_calls_pair_results_by_call_id(self):
        turn = self.fake.turn().tool_call("Bash", {"command": "echo first-1", "description": "one"}, call_id="call_one") \
                   .tool_call("Bash", {"command": "echo second-2", "description": "two"}, call_id="call_two")
        self.fake.reply(turn.completed(), self.fake.turn().text("Both ran.").completed())
        result, _ = self.claude("run both", "--allowedTools", "Bash")
        self.assertEqual(result["result"], "Both ran.")
        outputs = {i["call_id"]: i["output"] for i in self.sent()["input"] if i["type"] == "function_call_output"}
        self.assertEqual(set(outputs), {"call_one", "call_two"})
        self.assertIn("first-1", outputs["call_one"])
        self.assertIn("second-2", outputs["call_two"])

    def test_4_reasoning_is_replayed_with_its_encrypted_content(self):
        turn = self.fake.turn().reasoning(["Look before answering."], encrypted="gAAAAB-claude-e2e-blob") \
                   .tool_call("Bash", {"command": "echo ok", "description": "check"})
        self.fake.reply(turn.completed(), self.fake.turn().text("Checked.").completed())
        result, lines = self.claude("check it", "--allowedTools", "Bash")
        self.assertEqual(result["result"], "Checked.")
        self.assertEqual([i["encrypted_content"] for i in self.sent()["input"] if i["type"] == "reasoning"],
                         ["gAAAAB-claude-e2e-blob"])
        self.assertEqual(self.blocks(lines, "thinking")[0]["thinking"], "Look before answering.")

    def test_5_haiku_class_request_goes_to_the_small_model(self):
        self.fake.reply(self.fake.turn(model="gpt-6-luna").text("small and fast").completed())
        result, _ = self.claude("hi", "--model", "haiku")
        self.assertEqual(result["result"], "small and fast")
        self.assertEqual(self.sent()["model"], "gpt-6-luna")

    def test_6_usage_limit_is_reported_with_retry_after(self):
        recorded = json.loads(fixture("responses", "chatgpt_codex_usage_limit_reached_plus_2026-05-04.json").read_text())
        self.fake.reply(*[Reply(status=429, body={"error": recorded["error"]}, headers=recorded["headers"])
                          for _ in range(3)])
        result, _ = self.claude("hi")
        self.assertTrue(result["is_error"])
        self.assertEqual(result.get("api_error_status"), 429)
        self.assertIn("usage limit", result["result"])
        limited = [a for a in self.proxy.answers if a["status"] == 429]
        self.assertTrue(limited)
        self.assertEqual(limited[0]["headers"]["retry-after"], "13872")

    def test_7_failure_mid_stream_is_retried_and_the_second_attempt_succeeds(self):
        broken = self.fake.turn().text("partial that will be dropped").failed("server_is_overloaded", "busy")
        self.fake.reply(broken, self.fake.turn().text("Second attempt worked.").completed(),
                        self.fake.turn().text("Second attempt worked.").completed())
        result, _ = self.claude("hi")
        self.assertEqual((result["is_error"], result["result"]), (False, "Second attempt worked."))
        self.assertGreaterEqual(len(self.fake.requests), 2)

    def test_8_tool_search_loads_a_tool_without_changing_the_prompt_before_it(self):
        turn = self.fake.turn().tool_search({"query": "select:WebFetch", "max_results": 5})
        self.fake.reply(turn.completed(), self.fake.turn().text("WebFetch is loaded.").completed())
        result, _ = self.claude("load the web fetch tool")
        self.assertEqual(result["result"], "WebFetch is loaded.")
        first, second = self.fake.requests[0]["body"], self.sent()
        keeps_prefix(self, first, second)
        self.assertIn("tool_search", [t["type"] for t in first["tools"]])
        self.assertNotIn("DeferredToolPlaceholder", json.dumps(first["tools"]))
        output = next(i for i in second["input"] if i["type"] == "tool_search_output")
        self.assertEqual(cp.loaded_names(output), ["WebFetch"])


@needs(CLAUDE, "Claude Code CLI not found: npm install @anthropic-ai/claude-code@2.1.331 (or set CODEX_PROXY_CLAUDE)")
class TestClaudeCodeAutoMode(ClaudeCodeCase):
    """Claude Code in auto mode (its default permission mode), headless: the proxy answers its
    safety check; a flagged or unjudged call does not run. Also its own classifier
    (CLAUDE_CODE_AUTO_MODE_SERVER=0) through the proxy, with a model that says more than asked."""

    settings = {"ping_interval": 1.0, "safeguard_wait": 2.0}
    ALLOWED = "rm -rf ./build && echo cleaned-7f3a"
    FLAGGED = "touch pushed.txt && git push --force origin main"

    def setUp(self):
        ClaudeCodeCase.setUp(self)
        self.fake.catalog = FAKE_CATALOG
        self.proxy.catalog.refresh()

    def run_command(self, command, **env):
        turn = self.fake.turn().text("Running it.").tool_call("Bash", {"command": command, "description": "do it"})
        self.fake.reply(turn.completed(), self.fake.turn().text("Finished.").completed(),
                        self.fake.turn().text("Finished again.").completed())
        result, lines = self.claude("clean the build and force-push main", "--permission-mode", "auto", **env)
        results = self.blocks(lines, "tool_result")
        self.assertTrue(results, "the call came back: %s" % result)
        content = results[0]["content"]
        return result, content if isinstance(content, str) else json.dumps(content)

    def test_1_a_risky_command_the_classifier_allows_runs(self):
        self.fake.reviewer = by_command("--force")
        result, output = self.run_command(self.ALLOWED)
        self.assertIn("cleaned-7f3a", output)
        self.assertFalse((self.work / "build").exists(), "the command really ran")
        self.assertEqual([c["pending_call"]["input"]["command"] for c in self.fake.reviews], [self.ALLOWED])
        self.assertEqual(self.fake.requests[0]["body"].get("safeguards"), None, "the field stays with the proxy")
        self.assertNotIn("can't check", json.dumps(result))

    def test_2_a_command_the_classifier_flags_does_not_run(self):
        self.fake.reviewer = by_command("--force")
        result, output = self.run_command(self.FLAGGED)
        self.assertIn("denied by the Claude Code auto mode classifier", output)
        self.assertIn("judged: " + self.FLAGGED, output, "the explanation reaches the model")
        self.assertFalse((self.work / "pushed.txt").exists(), "the command did not run")

    def test_3_a_classifier_that_times_out_or_answers_garbage_does_not_run_the_command(self):
        stalled = Reply(events=verdict("not_flagged", "late")(None), stall_after=0)
        self.addCleanup(stalled.release.set)
        for name, reviewer, reason in (
                ("garbage", lambda case: Turn(None, "codex-auto-review").text("Looks fine to me!").completed(), "error"),
                ("timeout", lambda case: stalled, "timed out")):
            with self.subTest(reviewer=name):
                self.fake.reset()
                self.setUp()
                self.fake.reviewer = reviewer
                result, output = self.run_command(self.FLAGGED)
                self.assertIn("gave no verdict (%s)" % reason, output)
                self.assertFalse((self.work / "pushed.txt").exists(), "nothing ran without a verdict")

    def own_classifier(self, severity):
        """Claude Code's stages (2.1.331 asks for <severity> in both; older versions for <block> in
        the second), answered the way a chatty model answers: the tag, then on and on until
        max_tokens cuts it, a reply Claude Code itself does not accept."""
        def answer(stage, body):
            tag = ("<severity>%d</severity>%s" % (severity, "<category>Git Destructive</category>" if severity > 50
                                                  else "")) if stage == "severity" else \
                "<block>%s</block><reason>force-pushing main rewrites shared history</reason>" % (
                    "yes" if severity > 50 else "no")
            return Turn(None, "gpt-6-luna").text(tag + " Let me explain my reasoning in detail." * 4000).completed()
        return answer

    def test_4_its_own_classifier_through_the_proxy_allows_and_blocks(self):
        command = "touch ran-7f3a.txt && git push --force origin main"
        for severity, ran in ((5, True), (95, False)):
            with self.subTest(severity=severity):
                self.fake.reset()
                self.setUp()
                self.fake.fallback_classifier = self.own_classifier(severity)
                _, output = self.run_command(command, CLAUDE_CODE_AUTO_MODE_SERVER="0")
                self.assertEqual(self.fake.reviews, [], "the proxy judged nothing: Claude Code did")
                self.assertEqual(len(self.fake.fallback_asked), 1 if ran else 2, "a high grade is looked at twice")
                self.assertEqual((self.work / "ran-7f3a.txt").exists(), ran, output)
                if not ran:
                    self.assertIn("Git Destructive", output, "the category the model gave reaches Claude Code")


TMUX = shutil.which("tmux")


@needs(CLAUDE and TMUX, "Claude Code CLI or tmux not found: npm install @anthropic-ai/claude-code@2.1.331; "
                        "apt-get install tmux (.ci/run does both)")
class TestClaudeCodeAutoModeInteractive(ClaudeCodeCase):
    """The real Claude Code, interactive in a terminal (tmux), in its default permission mode
    (auto mode, no --dangerously-skip-permissions), as users run it: the proxy's verdicts decide
    what runs, and the notice that the check "isn't getting through" never appears."""

    settings = {"ping_interval": 1.0, "safeguard_wait": 2.0}
    COMMAND = "touch ran-7f3a.txt && %s"

    def setUp(self):
        ClaudeCodeCase.setUp(self)
        self.fake.catalog = FAKE_CATALOG
        self.proxy.catalog.refresh()

    def interactive(self, command, done="Finished the job."):
        """Claude Code in tmux, asked to clean up; the model runs ``command``. -> the screen."""
        turn = self.fake.turn().text("Running it.").tool_call("Bash", {"command": command, "description": "do it"})
        self.fake.reply(turn.completed(), self.fake.turn().text(done).completed(),
                        self.fake.turn().text(done).completed())
        root = Path(tempfile.mkdtemp(prefix="codex-proxy-tmux-"))
        self.addCleanup(shutil.rmtree, str(root), True)
        for name in ("home", "tmp", "work/build"):
            (root / name).mkdir(parents=True)
        self.work = root / "work"
        (root / "home" / ".claude.json").write_text(json.dumps({   # a user who has been through onboarding
            "hasCompletedOnboarding": True, "lastOnboardingVersion": "2.1.331", "theme": "dark",
            "projects": {str(self.work): {"hasTrustDialogAccepted": True}}}))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
               "TERM": "xterm-256color", "ANTHROPIC_BASE_URL": self.proxy.url, "ANTHROPIC_AUTH_TOKEN": PROXY_KEY,
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CODE_MAX_RETRIES": "1"}
        session = "codex-proxy-%d-%s" % (os.getpid(), secrets.token_hex(3))
        line = "env -i %s %s %s; sleep 60" % (" ".join("%s=%s" % (k, subprocess.list2cmdline([v])) for k, v in env.items()),
                                              subprocess.list2cmdline([CLAUDE]), "'clean the build and push main'")
        subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(self.work), line],
                       check=True)
        self.addCleanup(subprocess.run, [TMUX, "kill-session", "-t", session], capture_output=True)
        screen = lambda: subprocess.run([TMUX, "capture-pane", "-p", "-t", session], capture_output=True,
                                        text=True).stdout
        try:
            wait_until(lambda: done in screen() and "auto mode on" in screen(), 90, "the end of the turn")
        except AssertionError:
            raise AssertionError("the turn did not end; the screen:\n" + screen())
        return screen()

    def test_1_a_risky_command_the_classifier_allows_runs(self):
        self.fake.reviewer = by_command("--force")
        screen = self.interactive(self.COMMAND % "rm -rf ./build")
        self.assertTrue((self.work / "ran-7f3a.txt").exists(), screen)
        self.assertFalse((self.work / "build").exists())
        self.assertNotIn("can't check", screen)
        self.assertNotIn("Did not run", screen)
        self.assertEqual(len(self.fake.reviews), 1)

    def test_2_a_command_the_classifier_flags_is_blocked_and_shown_so(self):
        self.fake.reviewer = by_command("--force")
        command = self.COMMAND % "git push --force origin main"
        screen = self.interactive(command)
        self.assertFalse((self.work / "ran-7f3a.txt").exists(), screen)
        self.assertIn("Blocked by auto mode", screen)
        self.assertIn("judged: touch ran-7f3a.txt", screen, "the reviewer's explanation is shown")
        self.assertNotIn("can't check", screen)

    def test_3_a_classifier_that_times_out_or_answers_garbage_runs_nothing(self):
        stalled = Reply(events=verdict("not_flagged", "late")(None), stall_after=0)
        self.addCleanup(stalled.release.set)
        for name, reviewer in (("garbage", lambda case: Turn(None, "codex-auto-review").text("Looks fine!").completed()),
                               ("timeout", lambda case: stalled)):
            with self.subTest(reviewer=name):
                self.fake.reset()
                self.setUp()
                self.fake.reviewer = reviewer
                screen = self.interactive(self.COMMAND % "git push --force origin main")
                self.assertFalse((self.work / "ran-7f3a.txt").exists(), screen)
                self.assertIn("Not run · auto mode's check had no usable answer", screen)
                self.assertNotIn("can't check", screen)


@needs(CLAUDE, "Claude Code CLI not found: npm install @anthropic-ai/claude-code@2.1.331 (or set CODEX_PROXY_CLAUDE)")
@needs(CLAUDE, "Claude Code CLI not found: npm install @anthropic-ai/claude-code@2.1.331 (or set CODEX_PROXY_CLAUDE)")
class TestPromptCacheReuse(ClaudeCodeCase):
    """How much of each upstream request repeats the one before it, against what the client
    allows (prompt-cache.md), for a scripted real Claude Code session: a tool loop with
    parallel calls, a deferred tool loaded with ToolSearch and called, then `--resume`; with
    thinking, and without it across a proxy restart. The figures are the README's."""

    permissions = ("--allowedTools", "Bash", "Read", "CronList")

    def session(self, restart=False, **env):
        """Two prompts of one Claude Code session; -> the upstream requests of its conversation."""
        root = Path(tempfile.mkdtemp(prefix="codex-proxy-session-"))
        self.addCleanup(shutil.rmtree, str(root), True)
        for name in ("home", "tmp", "work"):
            (root / name).mkdir()
        (root / "work" / "notes.txt").write_text("first line\nsecond line\n")
        fake, session = self.fake, str(uuid.uuid4())
        fake.reply(fake.turn().reasoning(["Look first."]).text("Let me look.")
                   .tool_call("Bash", '{"command": "ls", "description": "List files"}').completed(),
                   fake.turn().reasoning(["Two at once."]).tool_call("Bash", {"command": "echo a", "description": "a"})
                   .tool_call("Read", {"file_path": str(root / "work" / "notes.txt")}).completed(),
                   fake.turn().reasoning(["Load the cron tools."]).tool_search({"query": "select:CronList", "max_results": 5})
                   .completed(),
                   fake.turn().reasoning(["List them."]).tool_call("CronList", {}, namespace="functions").completed(),
                   fake.turn().reasoning(["Say so."]).text("Looked around.").completed())
        self.run_claude(root, "Look around and list the cron jobs.", "--session-id", session, **env)
        if restart:
            self.proxy = self.restarted()
        fake.reply(fake.turn().reasoning(["Again."]).tool_call("Bash", {"command": "echo again", "description": "b"})
                   .completed(), fake.turn().reasoning(["Done."]).text("Finished.").completed())
        self.run_claude(root, "Once more, please.", "--resume", session, **env)
        return [r for r in self.fake.requests if r["path"].endswith("/responses")]

    def run_claude(self, root, prompt, *args, **env):
        environment = dict(self.claude_environment(root), **env)
        result = subprocess.run([CLAUDE, "-p", prompt, "--output-format", "stream-json", "--verbose"]
                                + list(self.permissions) + list(args),
                                cwd=str(root / "work"), env=environment, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=180)
        self.assertIn('"type":"result"', result.stdout.replace(" ", ""), result.stderr[-2000:])
        self.assertEqual(self.fake.refused, [])

    def check(self, what, records):
        pairs = prefix_reuse(records)
        share = share_of_ceiling(pairs)
        report("prefix reuse, %s: %.1f %% of the ceiling over %d pairs (%d of %d pairs at the ceiling)" % (
            what, share, len(pairs), sum(r == c for r, c in pairs), len(pairs)))
        self.assertGreaterEqual(len(pairs), 6)
        self.assertGreaterEqual(share, 99.5, pairs)
        return share

    def test_a_claude_code_session_with_a_tool_search_reuses_what_the_client_allows(self):
        records = self.session()
        self.assertTrue(any(i["type"] == "tool_search_output" for i in records[-1]["body"]["input"]))
        self.check("Claude Code, defaults (thinking, ToolSearch), --resume", records)

    def test_without_thinking_and_across_a_restart_too(self):
        records = self.session(restart=True, CLAUDE_CODE_DISABLE_THINKING="1")
        self.assertNotIn("summary", records[0]["body"]["reasoning"])
        self.check("Claude Code, CLAUDE_CODE_DISABLE_THINKING=1, proxy restarted before --resume", records)

    def test_in_auto_mode_with_every_call_checked(self):
        self.fake.catalog = FAKE_CATALOG
        self.proxy.catalog.refresh()
        self.fake.reviewer = by_command("--force")   # nothing here is flagged
        self.permissions = ("--permission-mode", "auto")
        records = self.session()
        self.assertGreaterEqual(len(self.fake.reviews), 4, "each call was judged, the search too")
        self.check("Claude Code in auto mode (its default permission mode), calls judged", records)


def sdk_tool_loop(test, thinking, stream):
    """Six model turns with tool calls (parallel ones, arguments spelled with spaces and
    non-ASCII text), a final text, then a second user turn: the SDK's own loop."""
    calls = [[("run", '{"cmd": "ls", "why": "look"}')], [("run", '{"cmd": "echo café"}'), ("run", '{"cmd": "pwd"}')],
             [("run", '{"cmd": "cat \\"a b\\"", "opts": {"n": 0.5}}')], [("run", '{"cmd": "date"}')], []]
    client = anthropic.Anthropic(api_key=PROXY_KEY, base_url=test.proxy.url, max_retries=0)
    args = dict(model="claude-opus-4-8", max_tokens=2048, tools=[{"name": "run", "description": "Run a command",
                "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}}])
    if thinking:
        args["thinking"] = {"type": "enabled", "budget_tokens": 4096}
    messages = [{"role": "user", "content": "Run the job, please."}]
    for prompt, turns in ((None, calls), ("And the date again.", [[("run", '{"cmd": "date"}')], []])):
        if prompt:
            messages.append({"role": "user", "content": prompt})
        for n, turn in enumerate(turns):
            upstream = test.fake.turn().reasoning(["Thinking %d." % n])
            for name, arguments in turn:
                upstream.tool_call(name, arguments)
            test.fake.reply(upstream.completed() if turn else upstream.text("All done.").completed())
            if stream:
                with client.messages.stream(messages=messages, **args) as answer:
                    reply = answer.get_final_message()
            else:
                reply = client.messages.create(messages=messages, **args)
            content = [block.model_dump(exclude_none=True) for block in reply.content]
            messages.append({"role": "assistant", "content": content})
            results = [{"type": "tool_result", "tool_use_id": b["id"], "content": "ok"} for b in content
                       if b["type"] == "tool_use"]
            if results:
                messages.append({"role": "user", "content": results})
    return [r for r in test.fake.requests if r["path"].endswith("/responses")]


@needs(anthropic, "anthropic SDK not installed: pip install anthropic")
class TestPromptCacheReuseWithTheSDK(ProxyCase):
    """The same measure for the official SDK's tool loop, with and without thinking."""

    def test_sdk_tool_loops_reuse_what_the_client_allows(self):
        for thinking in (True, False):
            for stream in (True, False):
                with self.subTest(thinking=thinking, stream=stream):
                    self.fake.reset()
                    pairs = prefix_reuse(sdk_tool_loop(self, thinking, stream))
                    report("prefix reuse, SDK tool loop, thinking %s, %s: %.1f %% of the ceiling over %d pairs" % (
                        "on" if thinking else "off", "streaming" if stream else "create()", share_of_ceiling(pairs),
                        len(pairs)))
                    self.assertEqual(len(pairs), 6)
                    self.assertGreaterEqual(share_of_ceiling(pairs), 99.5, pairs)


@needs(CLAUDE, "Claude Code CLI not found: npm install @anthropic-ai/claude-code@2.1.331 (or set CODEX_PROXY_CLAUDE)")
class TestClaudeCodeWebSearch(ClaudeCodeCase):
    """Claude Code's WebSearch tool (a nested request with web_search_20250305) gets real results."""

    settings = {}

    def test_9_web_search_tool_returns_the_backend_results(self):
        self.proxy.answers = []
        main = self.fake.turn().tool_call("WebSearch", {"query": "codex proxy stdlib"})
        nested = self.fake.turn().web_search("codex proxy stdlib").text(
            "codex_proxy is a one-file proxy, described at Example Docs.",
            citations=[("https://example.com/codex-proxy", "Example Docs", "Example Docs")])
        self.fake.reply(main.completed(), nested.completed(), self.fake.turn().text("Found it: Example Docs.").completed())
        result, lines = self.claude("search the web for codex proxy", "--allowedTools", "WebSearch",
                                    ENABLE_TOOL_SEARCH="false")
        self.assertEqual(result["result"], "Found it: Example Docs.")
        nested_request = self.fake.requests[1]["body"]
        self.assertEqual([t["type"] for t in nested_request["tools"]], ["web_search"])
        outputs = [i["output"] for i in self.sent()["input"] if i["type"] == "function_call_output"]
        self.assertEqual(len(outputs), 1)
        self.assertIn("https://example.com/codex-proxy", outputs[0])
        self.assertIn("Example Docs", outputs[0])


CODEX = os.environ.get("CODEX_PROXY_CODEX") or shutil.which("codex")

# Where the proxy's requests knowingly differ from what the real Codex CLI 0.171 sends for the same
# kind of turn: (what, name) -> why. The oracle test fails when a difference appears or goes away.
ORACLE_DIFFERENCES = {
    ("header", "x-codex-turn-metadata"): "the CLI's telemetry (installation, window, sandbox, turn ids)",
    ("header", "x-codex-window-id"): "the CLI's window of a thread; the proxy has no windows",
    ("header", "x-codex-beta-features"): "remote_compaction_v2: Claude Code compacts by itself",
    ("header", "x-codex-routing-hint"): "model=<slug>; not shown to be required (drift 2.3)",
    ("body", "client_metadata"): "the CLI's thread, turn and installation ids; nothing the answer depends on",
    ("body", "instructions"): "the proxy sends \"\" in the classic shape; the CLI puts its base prompt in input[0]",
    ("item message", "id"): "the CLI names every item it sends (msg_<uuid>); taken with store false, not needed",
    ("item message", "internal_chat_message_metadata_passthrough"): "the CLI's provenance metadata",
    ("item function_call", "id"): "the call's item id (fc_...), echoed by the CLI; the call_id pairs it",
    ("item function_call", "status"): "\"completed\" on every replayed call",
    ("item function_call", "internal_chat_message_metadata_passthrough"): "the CLI's provenance metadata",
    ("item function_call_output", "id"): "the CLI's own id for the output (fco_...)",
    ("item function_call_output", "internal_chat_message_metadata_passthrough"): "the CLI's provenance metadata",
    ("item reasoning", "id"): "the reasoning item's id (rs_...), echoed by the CLI",
    ("item reasoning", "content"): "null in every CLI request",
    ("item reasoning", "internal_chat_message_metadata_passthrough"): "the CLI's provenance metadata",
    ("tool type", "custom"): "the CLI's apply_patch grammar tool; Claude's tools are functions",
    ("tool type", "namespace"): "the CLI's image_gen namespace",
    ("tool type", "tool_search"): "the CLI's client-side tool search (issue 17 may adopt it)",
    ("tool type", "web_search"): "the CLI always offers web search; the proxy only when Claude asks for it",
}
ORACLE_IGNORED_HEADERS = {"host", "content-length", "connection", "x-codex-turn-state"}   # transport, or per turn


class TestRecordedCodexCliTraffic(unittest.TestCase):
    """What the real Codex CLI 0.171 sent (recorded), the fake takes: it is no stricter than the backend."""

    def test_every_turn_the_recorded_cli_sent_passes_the_fake(self):
        """The captures of ../shared/fixtures/codex-cli-0.171, fed to the fake's rules."""
        files = sorted(fixture("codex-cli-0.171").glob("*/*-POST-backend_api_codex_responses.json"))
        self.assertGreaterEqual(len(files), 5)
        for path in files:
            with self.subTest(capture="%s/%s" % (path.parent.name, path.name)):
                capture = json.loads(path.read_text())
                headers = {name.lower(): value for name, value in capture["headers"]}
                body = capture["body"]
                issued = {item.get("encrypted_content") for item in body["input"] if item.get("type") == "reasoning"}
                lite = headers.get("x-openai-internal-codex-responses-lite") == "true"
                self.assertIsNone(version_problem(body["model"], headers, KNOWN_MODELS))
                self.assertIsNone(codex_request_problem(body, issued, lite), body["model"])


@needs(CODEX and zstd_module(), "Codex CLI or a zstd decoder not found: npm install @openai/codex@0.171.0; "
                                "pip install zstandard (.ci/run does both)")
class TestCodexCliOracle(unittest.TestCase):
    """The real Codex CLI 0.171 judges the upstream side, as the real Claude Code judges the
    Anthropic side: `codex exec` runs a text turn, a tool loop and a Lite model against FakeCodex;
    the fake must take everything it sends, and the proxy's requests for the same kinds of turn
    must have its header names, body keys and item and tool shapes, but for ORACLE_DIFFERENCES."""

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeCodex().start()
        cls.root = Path(tempfile.mkdtemp(prefix="codex-proxy-oracle-"))

    @classmethod
    def tearDownClass(cls):
        cls.fake.stop()
        shutil.rmtree(str(cls.root), ignore_errors=True)

    def setUp(self):
        self.fake.reset()
        self.fake.routing = ("https://chatgpt.com", "NO_CONSTRAINT")   # what a Plus account is told

    def codex(self, model, prompt="say hi"):
        """`codex exec` in an empty folder with a fresh CODEX_HOME (a ChatGPT login the fake takes)."""
        home = Path(tempfile.mkdtemp(dir=str(self.root)))
        for name in ("home", "codex", "work"):
            (home / name).mkdir()
        claims = {"exp": 4102444800, "email": "dev@example.com", "https://api.openai.com/auth": AUTH_CLAIMS}
        access = make_jwt(claims)
        self.fake.valid_tokens.add(access)
        (home / "codex" / "auth.json").write_text(json.dumps({"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": {
            "id_token": make_jwt(claims), "access_token": access, "refresh_token": "rt-oracle", "account_id": ACCOUNT_ID},
            "last_refresh": "2026-12-01T00:00:00Z"}))
        port = self.fake.server.server_address[1]   # the two base URLs on different origins, as the recipe says
        (home / "codex" / "config.toml").write_text(
            'openai_base_url = "http://127.0.0.1:%d/backend-api/codex"\nchatgpt_base_url = "http://localhost:%d/backend-api/"\n'
            'check_for_update_on_startup = false\n[features]\ndaemon_auto_start = false\n' % (port, port))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home / "home"),
               "CODEX_HOME": str(home / "codex"), "TERM": "dumb"}
        result = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "-m", model, prompt], cwd=str(home / "work"),
                                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
        turns = [r for r in self.fake.requests if r["path"] == "/backend-api/codex/responses"]
        refused = [problem for path, problem in self.fake.refused if path == "/backend-api/codex/responses"]
        self.assertEqual(refused, [], "the fake refused what the real CLI sent")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        return result.stdout, turns

    def proxy_requests(self, *bodies):
        """What the proxy sends the same fake for ``bodies`` (Anthropic requests; a callable
        makes its body from the previous reply, a Message)."""
        seen = len(self.fake.requests)
        home = Path(tempfile.mkdtemp(dir=str(self.root)))
        write_tokens(home / "tokens.json")
        proxy = cp.ProxyServer(make_config(home, self.fake.url))
        proxy.codex.compress_from = cp.COMPRESS_FROM   # as to the real backend, where the CLI compresses too
        proxy.catalog.refresh()
        threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
        try:
            reply = None
            for body in bodies:
                body = body(reply) if callable(body) else body
                conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=30)
                conn.request("POST", "/v1/messages", json.dumps(body), {"x-api-key": PROXY_KEY,
                                                                        "Content-Type": "application/json"})
                response = conn.getresponse()
                reply = json.loads(response.read())
                self.assertEqual(response.status, 200, reply)
                conn.close()
        finally:
            proxy.shutdown()
            proxy.server_close()
            proxy.codex.close_idle()
        return [r for r in self.fake.requests[seen:] if r["path"] == "/backend-api/codex/responses"]

    def shapes(self, request):
        """{(what, name)} of a /responses request: header names, body keys, item and tool shapes."""
        out = {("header", name) for name in request["headers"] if name not in ORACLE_IGNORED_HEADERS}
        out |= {("body", key) for key in request["body"]}
        for item in request["body"]["input"]:
            out |= {("item " + item["type"], key) for key in item if item["type"] != "additional_tools"}
        tools = request["body"].get("tools") or [tool for space in request["body"]["input"][0].get("tools") or []
                                                 for tool in space.get("tools") or []]
        for tool in tools:
            out.add(("tool type", tool["type"]))
            if tool["type"] == "function":
                out |= {("function tool", key) for key in tool}
        return out

    def assert_same_shapes(self, cli, proxy, extra=None):
        """Every shape the two requests do not share is a documented difference, and every
        documented difference of the kinds both requests have is still one."""
        table = dict(ORACLE_DIFFERENCES, **(extra or {}))
        mine, theirs = self.shapes(proxy), self.shapes(cli)
        differ = mine ^ theirs
        present = {what for what, _ in mine & theirs} | {"header", "body", "tool type"}
        documented = {d for d in table if d[0] in present and (d in mine or d in theirs)}
        detail = "\nCLI only: %s\nproxy only: %s" % (sorted(theirs - mine), sorted(mine - theirs))
        self.assertEqual(sorted(differ - documented), [], "new differences from the real Codex CLI" + detail)
        self.assertEqual(sorted(documented - differ), [], "documented differences that are gone" + detail)

    def padded(self, **body):
        """A request the size of Claude Code's first one (compressed on its way, as the CLI's are)."""
        return dict(BASIC, system="You are a coding agent working in a repository. " * 600, **body)

    def test_a_text_turn(self):
        self.fake.reply(self.fake.turn().text("oracle says hi").completed())
        out, turns = self.codex("gpt-5.5")
        self.assertIn("oracle says hi", out)
        self.assertEqual(len(turns), 1)
        self.fake.reply(self.fake.turn().text("proxy says hi").completed())
        self.assert_same_shapes(turns[0], self.proxy_requests(self.padded(tools=[BASH_TOOL]))[0])

    def test_a_tool_loop(self):
        self.fake.reply(self.fake.turn().reasoning(["Run it."]).tool_call("exec_command", {"cmd": "echo oracle-tool-ok"})
                        .completed(), self.fake.turn().text("the command printed oracle-tool-ok").completed())
        out, turns = self.codex("gpt-5.5", "run echo oracle-tool-ok")
        self.assertIn("the command printed oracle-tool-ok", out)
        self.assertEqual(len(turns), 2)
        outputs = [i for i in turns[1]["body"]["input"] if i["type"] == "function_call_output"]
        self.assertIn("oracle-tool-ok", outputs[0]["output"], "the CLI really ran the command")
        first = self.fake.turn().reasoning(["Run it."]).tool_call("Bash", {"command": "echo proxy-tool-ok"})
        self.fake.reply(first.completed(), self.fake.turn().text("done").completed())
        start = self.padded(tools=[BASH_TOOL], messages=[user("run it")])

        def tool_result(reply):   # Claude Code sends the call back with its result (hidden reasoning is replayed)
            call = next(b for b in reply["content"] if b["type"] == "tool_use")
            return dict(start, messages=start["messages"] + [
                {"role": "assistant", "content": reply["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "proxy-tool-ok"}]}])
        self.assert_same_shapes(turns[1], self.proxy_requests(start, tool_result)[1])

    def test_a_lite_model(self):
        self.fake.reply(self.fake.turn("gpt-5.6-sol").text("lite says hi").completed())
        out, turns = self.codex("gpt-5.6-sol")
        self.assertIn("lite says hi", out)
        self.assertEqual(turns[0]["headers"].get("x-openai-internal-codex-responses-lite"), "true")
        self.fake.reply(self.fake.turn("gpt-5.6-sol").text("proxy lite").completed())
        proxy = self.proxy_requests(self.padded(model="gpt-5.6-sol", tools=[BASH_TOOL]))[0]
        self.assertEqual(proxy["headers"].get("x-openai-internal-codex-responses-lite"), "true")
        self.assert_same_shapes(turns[0], proxy)


@needs(anthropic, "anthropic SDK not installed (pip install anthropic)")
class TestAnthropicSDK(ProxyCase):
    """The official SDK's create() and stream().get_final_message() agree on every scenario."""

    SCENARIOS = {
        "text": lambda t: t.text("Plain text.").completed(),
        "tool_use": lambda t: t.text("Calling.").tool_call("get_weather", {"city": "Oslo"}).completed(),
        "parallel_tools": lambda t: t.tool_call("get_weather", {"city": "A"}).tool_call("get_weather", {"city": "B"}).completed(),
        "thinking": lambda t: t.reasoning(["Step one.", "Step two."]).text("Answer.").completed(cached=40),
        "max_tokens": lambda t: t.text("Cut off").incomplete("max_output_tokens"),
        "whitespace_then_tool": lambda t: t.text("  ").tool_call("get_weather", {}).completed(),
    }
    TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]

    def client(self):
        return anthropic.Anthropic(api_key=PROXY_KEY, base_url=self.proxy.url, max_retries=0)

    def test_create_and_stream_give_equal_messages_for_every_scenario(self):
        for name, build in self.SCENARIOS.items():
            with self.subTest(scenario=name):
                args = dict(model="claude-opus-4-8", max_tokens=1024, tools=self.TOOLS,
                            messages=[{"role": "user", "content": "go"}],
                            thinking={"type": "enabled", "budget_tokens": 2048})
                upstream = build(self.fake.turn())
                self.fake.reply(upstream, upstream)   # the same upstream reply for both calls
                created = self.client().messages.create(**args)
                with self.client().messages.stream(**args) as stream:
                    streamed = stream.get_final_message()
                a, b = created.model_dump(), streamed.model_dump()
                a.pop("id"), b.pop("id")
                self.assertEqual(a, b)
                self.assertIsNotNone(created.stop_reason)

    def test_safeguard_results_reach_sdk_clients_streaming_and_not(self):
        self.fake.catalog = FAKE_CATALOG
        self.proxy.catalog.refresh()
        self.fake.reviewer = by_command("--force")
        body = auto_mode_body()
        args = dict(model="claude-opus-4-8", max_tokens=1024, tools=[BASH_TOOL], messages=body["messages"],
                    extra_body={"safeguards": body["safeguards"]})
        upstream = self.fake.turn().tool_call("Bash", {"command": "git push --force"}, call_id="call_p").completed()
        self.fake.reply(upstream, upstream)
        created = self.client().messages.create(**args)
        with self.client().messages.stream(**args) as stream:   # the SDK's snapshot keeps only known fields:
            deltas = [e.delta.model_dump() for e in stream if e.type == "message_delta"]   # its raw event has it
        for results in (created.model_dump()["safeguard_results"], deltas[0]["safeguard_results"]):
            self.assertEqual(results[0]["status"]["tool_uses"]["call_p"]["outcome"], "flagged")

    def test_raw_sdk_events_pass_the_checklist(self):
        self.fake.reply(self.fake.turn().reasoning(["Think."]).text("Hi.").tool_call("get_weather", {"city": "X"}).completed())
        answer = self.post(dict(BASIC, stream=True, tools=self.TOOLS, thinking={"type": "adaptive"}))
        check_stream(self, answer.body)
        self.fake.reply(self.fake.turn().text("beta ok").completed())
        with self.client().beta.messages.stream(model="claude-opus-4-8", max_tokens=100,
                                                 messages=[{"role": "user", "content": "x"}]) as stream:
            self.assertEqual(stream.get_final_message().content[0].text, "beta ok")

    def test_mid_stream_error_raises_with_its_type(self):
        self.fake.reply(self.fake.turn().text("partial").failed("server_is_overloaded", "busy"))
        with self.assertRaises(anthropic.APIStatusError) as caught:
            with self.client().messages.stream(model="claude-opus-4-8", max_tokens=100,
                                               messages=[{"role": "user", "content": "x"}]) as stream:
                stream.get_final_message()
        self.assertIn("overloaded_error", str(caught.exception))

    def test_insufficient_quota_is_not_retried_by_the_sdk(self):
        quota = {"code": "insufficient_quota", "message": "You exceeded your current quota, please check your plan "
                 "and billing details."}
        for where, reply in (("HTTP error", lambda: Reply(status=429, body={"error": dict(quota, type="insufficient_quota")})),
                             ("response.failed", lambda: self.fake.turn().failed(**quota))):
            with self.subTest(where=where):
                self.fake.reset()
                self.fake.reply(reply(), reply(), reply())
                client = anthropic.Anthropic(api_key=PROXY_KEY, base_url=self.proxy.url, max_retries=2)
                with self.assertRaises(anthropic.RateLimitError) as caught:
                    client.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])
                self.assertIn("Quota exceeded", str(caught.exception))
                self.assertEqual(len(self.fake.requests), 1, "the SDK sent it once")
        self.fake.reset()   # control: a passing rate limit is retried by the same SDK
        self.fake.reply(self.fake.turn().failed("rate_limit_exceeded", "Try again in 0.2s."),
                        self.fake.turn().text("second try").completed())
        client = anthropic.Anthropic(api_key=PROXY_KEY, base_url=self.proxy.url, max_retries=2)
        reply = client.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(reply.content[0].text, "second try")
        self.assertEqual(len(self.fake.requests), 2)

    def test_http_errors_map_to_sdk_exceptions(self):
        self.fake.reply(Reply(status=503, body={"error": {"code": "server_is_overloaded"}}))
        with self.assertRaises(anthropic.APIStatusError) as caught:
            self.client().messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.status_code, 529)
        with self.assertRaises(anthropic.AuthenticationError):
            anthropic.Anthropic(api_key="wrong", base_url=self.proxy.url, max_retries=0).messages.create(
                model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])


class TestFreshCloneData(unittest.TestCase):
    """A clone without ../shared runs the core tests on data written here; it must
    say what the recorded fixtures say."""

    def test_inline_december_catalog_matches_the_one_codex_0_171_bundles(self):
        recorded = json.loads(fixture("codex-cli-0.171", "bundled-catalog-0.171.0-summary.json").read_text())["models"]
        self.assertEqual([(m["slug"], m["visibility"], m["minimal_client_version"], m["use_responses_lite"],
                           m["context_window"], m["default_reasoning_level"], tuple(m["efforts"]), m.get("upgrade_to"))
                          for m in recorded], list(DECEMBER_MODELS))

    def test_inline_refresh_error_is_the_recorded_body(self):
        recorded = json.loads(fixture("responses", "auth_openai_refresh_token_reused_401.json").read_text())
        self.assertEqual(REFRESH_REUSED_BODY, recorded)


if __name__ == "__main__":
    unittest.main()
