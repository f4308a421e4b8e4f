"""`medtune serve`: a local web page (Gradio) to ask a model questions. A thin surface over ask.py: the answer and the
probabilities are `ask.answer()`'s, i.e. eval's scoring, so the page shows the numbers results.json would.

Safe by default: binds 127.0.0.1; no public share link unless --share (with a warning); analytics off and no asset
from a CDN or font service (the browser test records every request the page makes); greedy decoding; input limits
checked before the model runs; a queue with a concurrency limit and a maximum size, so a crowd gets "busy" instead of
exhausting memory; and a queued question whose client is not waiting for the answer loses its place (`QueueGuard`), so
joins that are never read can't hold the queue. The page always shows the disclaimer.
"""

from __future__ import annotations

import asyncio
import os
import time

from medtune.ask import MAX_OPTION_CHARS, MAX_OPTIONS, MAX_QUESTION_CHARS, MIN_OPTIONS, Loaded
from medtune.errors import MedtuneError

DISCLAIMER_MD = ("**Research and education only. Not for clinical decisions.** This is a language model answering "
                 "exam-style questions; it can be confidently wrong. Never use it for diagnosis or treatment.")
CSS = "#disclaimer {border: 2px solid #b91c1c; border-radius: 6px; padding: 6px 12px; background: #fef2f2}"
EXAMPLE = (("A 23-year-old sailor returns from a long voyage with bleeding gums, poor wound healing and corkscrew "
            "hairs. A deficiency of which vitamin is most likely?"),
           "Vitamin A\nVitamin B12\nVitamin C\nVitamin D")


def _quiet_network() -> None:
    """No analytics, no version check, no Hub telemetry: the page and the server work with no network."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")


def build(loaded: Loaded, max_new_tokens: int = 96, guard: QueueGuard | None = None):
    """The page: disclaimer, model card line, question form, answer with a probability bar chart, explanation."""
    _quiet_network()
    import gradio as gr

    from medtune.ask import answer, make_item
    from medtune.report import shorten

    def ask_fn(question: str, options: str, request: gr.Request):
        if guard is not None and not guard.wait_for_listener(request.session_hash):
            raise gr.Error("nobody is waiting for this answer (the client went away); it was not computed",
                           print_exception=False)
        try:
            item = make_item(question, (options or "").splitlines(), names=("question", "options"))
            result = answer(loaded, item, max_new_tokens)
        except MedtuneError as e:  # a clear message in the page (and an error for API clients), never a crash, and
            raise gr.Error(str(e), print_exception=False) from None  # no traceback in the server's log for bad input
        bars = {f"{letter}. {shorten(text, 60)}": p for (letter, p), text in zip(result["probs"].items(), item.options)}
        s = result["scoring"]
        head = (f"### Answer: {result['answer']}. {result['answer_text']}\n"
                f"probability {result['probs'][result['answer']]:.1%} ({s['method']}, {s['mode']} mode)")
        cap = " [stopped at the length cap]" if result.get("explanation_hit_cap") else ""
        return head, bars, result.get("explanation", "") + cap, result

    ask_fn.__annotations__["request"] = gr.Request  # gradio passes the request by this type (a string here otherwise)

    with gr.Blocks(analytics_enabled=False, title="medtune: ask the model") as page:
        gr.Markdown(DISCLAIMER_MD, elem_id="disclaimer")
        gr.Markdown(model_line(loaded), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                question = gr.Textbox(label="Question", lines=5, elem_id="question",
                                      info=f"Up to {MAX_QUESTION_CHARS} characters.")
                options = gr.Textbox(label="Options, one per line", lines=5, elem_id="options",
                                     info=f"{MIN_OPTIONS} to {MAX_OPTIONS} options, up to {MAX_OPTION_CHARS} "
                                          "characters each; they are lettered A, B, C, ... in this order.")
                submit = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples([list(EXAMPLE)], [question, options])
            with gr.Column():
                verdict = gr.Markdown(elem_id="answer")
                bars = gr.Label(label="Option probabilities", num_top_classes=MAX_OPTIONS, elem_id="probs")
                why = gr.Textbox(label="Explanation (greedy, generated after the chosen answer)", lines=4,
                                 elem_id="explanation")
                details = gr.JSON(label="Full result (as `medtune ask --json`)", visible=False)
        submit.click(ask_fn, [question, options], [verdict, bars, why, details], api_name="ask")

    preprocess = page.preprocess_data

    async def preprocess_data(block_fn, inputs: list, state, explicit_call: bool = False):
        """An API call's inputs: another number of them than the form's, or a value a field cannot take, is the
        caller's error in one line (gradio raised a ValueError for too few, a traceback in the server's log, dropped
        extra inputs silently, and answered a wrong value with a multi-line message and two tracebacks)."""
        if len(inputs) != len(block_fn.inputs):
            names = ", ".join(getattr(b, "label", None) or type(b).__name__ for b in block_fn.inputs)
            raise gr.Error(f"this endpoint takes {len(block_fn.inputs)} inputs ({names}), got {len(inputs)}",
                           print_exception=False)
        try:
            return await preprocess(block_fn, inputs, state, explicit_call)
        except Exception as e:  # noqa: BLE001 - any value a component cannot read is the caller's error
            raise gr.Error(f"an input is not a value this field takes ({str(e).strip().splitlines()[0][:200]})",
                           print_exception=False) from None

    page.preprocess_data = preprocess_data  # Blocks.process_api calls it before the function
    for block_fn in page.fns.values():  # the examples' loader (its value an example's index): a bad one is one line
        if block_fn.name == "load_example":
            block_fn.fn = _one_line_errors(block_fn.fn)
    return page


def _one_line_errors(load_example):
    """gradio's own example loader, given a value that is not an example index (null): one line, not a traceback."""
    import functools

    import gradio as gr

    @functools.wraps(load_example)  # gradio reads the function's signature
    def call(*args):
        try:
            return load_example(*args)
        except Exception as e:  # noqa: BLE001 - whatever it fails with, the value was the caller's
            raise gr.Error(f"not an example of this page ({type(e).__name__})", print_exception=False) from None
    return call


def model_line(loaded: Loaded) -> str:
    """Which model answers, how it is scored, and how it measured on its eval set (results.json), when known."""
    parts = [f"**Model:** `{loaded.model_name}`"]
    parts.append(f"**Adapter:** `{loaded.adapter}`" if loaded.adapter else "**Adapter:** none (base model)")
    parts.append(f"**Scoring:** {loaded.method}-logprob, {loaded.mode} mode, {loaded.style} prompt; greedy explanation")
    h = loaded.headline
    if h:
        lo, hi = h["ci95"]
        line = (f"**Measured:** accuracy {h['accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] on {h['eval_set']} "
                f"(n={h['n']}, {h['method']})")
        if "debiased_accuracy" in h:
            line += f", debiased {h['debiased_accuracy']:.3f}"
        parts.append(line)
    else:
        parts.append("**Measured:** no results.json found for this model")
    return " · ".join(parts)


def serve(loaded: Loaded, host: str = "127.0.0.1", port: int = 7860, share: bool = False, concurrency: int = 1,
          max_queue: int = 16, max_new_tokens: int = 96, log=print, abandon_s: float | None = None,
          block: bool = True):
    """Build the page and serve it until interrupted (`block=False`: return the running page; `page.close()` stops
    it). A queued question whose client has had no answer stream open for `abandon_s` seconds loses its place."""
    if concurrency < 1 or max_queue < 1:
        raise MedtuneError("--concurrency and --max-queue must be 1 or more")
    if share:
        log("warning: --share opens a public link through Gradio's servers: anyone with the URL can use this model "
            "and read what is typed. Never enter patient data.")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: other machines on this network can reach the page")
    guard = QueueGuard(ABANDON_S if abandon_s is None else abandon_s)
    page = build(loaded, max_new_tokens, guard)
    # Requests beyond max_queue waiting get a "queue is full" answer at once: a crowd sees "busy", memory stays flat.
    page.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    log(f"serving on http://{host}:{port} (Ctrl-C stops it)")
    stopped = _note_signals() if block else []
    page.launch(server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False, pwa=False,
                mcp_server=False, enable_monitoring=False, quiet=True, css=CSS, prevent_thread_lock=not block,
                app_kwargs={"middleware": guard.middleware(page)})
    if stopped:  # gradio closes the page on the interrupt and returns: the command still ends as a signal's does
        raise KeyboardInterrupt(stopped[0])
    return page


def _note_signals() -> list[int]:
    """SIGINT, SIGTERM and SIGHUP stop the server (gradio catches the KeyboardInterrupt and returns normally) and are
    noted, so that `medtune serve` exits 128 + the signal with one line, as every command does (not 0)."""
    import signal
    import threading

    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return stopped

    def note(signum, frame):
        stopped.append(signum)
        raise KeyboardInterrupt(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note)
    return stopped


def check_listen(host: str, port: int) -> None:
    """Refuse, in one line and before the model loads, an address the page could not listen on: a host that does not
    resolve, a port in use or not ours to bind."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except (OSError, UnicodeError) as e:
        raise MedtuneError(f"--host {host} --port {port}: cannot listen there ({getattr(e, 'strerror', None) or e})"
                           ) from None


ABANDON_S = 5.0  # how long a queued question may wait with nobody reading its answer (the browser and gradio_client
# open their answer stream milliseconds after joining; `curl` users of /call/ask run the GET right after the POST)


class QueueGuard:
    """Queued questions nobody will read lose their place.

    Gradio 6 drops a session's queued questions when its answer stream (`queue/data`, or the GET of `/call/<api>`)
    closes, but a join that never opens one keeps its place until it has been computed: 17 such joins kept a real
    question waiting 104 s (issue 18). An ASGI middleware counts the open answer streams per session; a sweep on the
    server's event loop removes questions queued for more than `abandon_s` seconds whose session has none, and a
    question that reaches the model with nobody listening is refused instead of computed (`wait_for_listener`)."""

    def __init__(self, abandon_s: float):
        self.abandon_s = abandon_s
        self.open: dict[str, int] = {}  # session hash (or /call event id) -> answer streams open now
        self.dropped = 0
        self._sweeper: asyncio.Task | None = None

    def listening(self, *keys: str | None) -> bool:
        return any(self.open.get(k) for k in keys if k)

    def wait_for_listener(self, session: str | None) -> bool:
        """In the worker thread, before the model runs: is (or, within abandon_s, will) anyone read this answer?"""
        deadline = time.monotonic() + self.abandon_s
        while not self.listening(session):
            if time.monotonic() > deadline:
                self.dropped += 1
                return False
            time.sleep(0.02)
        return True

    def middleware(self, page) -> list:
        from starlette.middleware import Middleware

        return [Middleware(_StreamCounter, guard=self, page=page)]

    async def sweep(self, queue) -> None:
        """Every abandon_s / 4 seconds: drop the queued questions of sessions that stopped (or never started)
        listening; their message queues go too, so a client that comes back late gets an error, not a hang."""
        while True:
            await asyncio.sleep(max(self.abandon_s / 4, 0.05))
            now = time.monotonic()
            stale = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)
                     if now - e.enqueue_time > self.abandon_s and not self.listening(e.session_hash, e._id)]
            for session in {e.session_hash for e in stale}:
                await queue.clean_events(session_hash=session)
                if not queue.pending_event_ids_session.get(session):
                    queue.pending_messages_per_session.pop(session, None)
            self.dropped += len(stale)


class _StreamCounter:
    """ASGI middleware: counts each open answer stream for QueueGuard, and starts its sweep on the first request."""

    def __init__(self, app, guard: QueueGuard, page):
        self.app, self.guard, self.page = app, guard, page

    async def __call__(self, scope, receive, send):
        if self.guard._sweeper is None and scope["type"] in ("http", "websocket"):
            self.guard._sweeper = asyncio.get_running_loop().create_task(self.guard.sweep(self.page._queue))
        key = _stream_key(scope)
        if key is None:
            return await self._routed(scope, receive, send)
        if not scope["path"].endswith("/queue/data") and not self._known_event(key):
            return await _json_error(send, 404, f"no such event {key[:80]!r} (unknown, or its answer was read)")
        self.guard.open[key] = self.guard.open.get(key, 0) + 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.guard.open[key] -= 1
            if not self.guard.open[key]:
                del self.guard.open[key]

    def _known_event(self, event_id: str) -> bool:
        """A /call answer stream for an event the queue holds, or whose answer waits to be read (gradio answered an
        unknown one with a broken stream and a RuntimeError traceback in the log)."""
        queue = self.page._queue
        return event_id in queue.event_ids_to_events or any(event_id in ids for ids in
                                                             list(queue.pending_event_ids_session.values()))

    async def _routed(self, scope, receive, send):
        """A call to a function or API name the page does not have (fn_index 99, /call/nope) is a 404 in one line;
        gradio raised KeyError / FnIndexInferError out of its routes: HTTP 500 and a traceback in the log."""
        from gradio.route_utils import FnIndexInferError

        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, receive, sending)
        except (KeyError, FnIndexInferError) as e:
            if started or scope["type"] != "http":
                raise
            await _json_error(send, 404, f"no such endpoint or function on this page ({str(e)[:80]})")


async def _json_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _stream_key(scope) -> str | None:
    """The session an answer stream reads: GET .../queue/data?session_hash=S, or GET .../call/<api>/<event id>."""
    if scope["type"] != "http" or scope.get("method") != "GET":
        return None
    path = scope.get("path", "")
    if path.endswith("/queue/data"):
        from urllib.parse import parse_qs

        return (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [None])[0]
    parts = path.rstrip("/").split("/")
    if len(parts) >= 4 and "call" in parts[-4:-2]:  # .../call/ask/ID and .../call/v2/ask/ID
        return parts[-1]
    return None
