"""The local HTTP server: the page and its JSON API, from the standard library (no web framework to install).

  GET  /                         the page
  GET  /api/info                 runs, base model
  GET  /api/run?label=L          a run's settings and its report's headline numbers
  POST /api/generate             {"run", "text", "json": bool, "seed"} -> {"job"}
  POST /api/answer               {"run", "adapter", "question", "system"} -> {"job"}
  GET  /api/job/<id>             {"state": queued|running|done|error, "message", "elapsed_s", "result"}
  GET  /api/download/<id>.zip    the made adapter's folder (PEFT files + README.md model card)

Requests that can be checked at once (empty prompts, a file that is not JSON, a run without a generator) are
answered with {"error": one line} and status 400; the rest run as jobs on the studio's one worker thread.
"""

from __future__ import annotations

import json
import re
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from dnd_jax.errors import DndError
from dnd_jax.web.page import PAGE
from dnd_jax.web.studio import Jobs, Studio

MAX_BODY = 32 << 20  # a LLaMA-Factory JSON upload of a few thousand records fits


def make_server(studio: Studio, host: str, port: int) -> ThreadingHTTPServer:
    jobs = Jobs()

    class Handler(BaseHTTPRequestHandler):
        server_version = "dnd_jax"

        def log_message(self, fmt, *args):  # quiet: the terminal shows what the server does, not every poll
            pass

        def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, code: int = 200) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self):  # http.server's names
            self._guarded(self._get)

        def do_POST(self):
            self._guarded(self._post)

        def _guarded(self, handle) -> None:
            """A user's mistake is one line (400); anything else too (500), logged, and the server goes on."""
            try:
                handle()
            except DndError as e:
                self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
            except Exception as e:  # noqa: BLE001 (the page shows it; the server stays up)
                traceback.print_exc()
                self._json({"error": f"internal error: {type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def _get(self):
            url = urlparse(self.path)
            if url.path == "/":
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if url.path == "/api/info":
                return self._json(studio.info())
            if url.path == "/api/run":
                return self._json(studio.run_info(parse_qs(url.query).get("label", [None])[0]))
            if url.path.startswith("/api/job/"):
                return self._json(jobs.status(url.path.rsplit("/", 1)[1]))
            if url.path.startswith("/api/download/") and url.path.endswith(".zip"):
                aid = url.path.rsplit("/", 1)[1][: -len(".zip")]
                body = studio.zip_bytes(aid)
                disp = {"Content-Disposition": f'attachment; filename="dnd-adapter-{aid}.zip"'}
                return self._send(200, body, "application/zip", disp)
            return self._json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND)

        def _post(self):
            body = self._body()
            if self.path == "/api/generate":
                return self._json({"job": jobs.submit(studio.make_adapter, *_generate_args(studio, body))})
            if self.path == "/api/answer":
                args = (str(body.get("adapter") or ""), str(body.get("question") or ""),
                        str(body.get("system") or ""))  # fmt: skip
                if not args[1].strip():
                    raise DndError("the question is empty: type one to compare the answers")
                studio.adapter_dir(args[0])  # the adapter's own run gives the control
                return self._json({"job": jobs.submit(studio.answer, *args)})
            return self._json({"error": f"no such action: {self.path}"}, HTTPStatus.NOT_FOUND)

        def _body(self) -> dict:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise DndError("the request's Content-Length is not a number") from None
            if n < 0 or n > MAX_BODY:
                self.close_connection = True
                raise DndError(f"a request of {n} bytes: at most {MAX_BODY >> 20} MiB (upload fewer prompts)")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DndError("the request is not JSON") from None
            if not isinstance(body, dict):
                raise DndError("the request is not a JSON object")
            return body

    return ThreadingHTTPServer((host, port), Handler)


def _generate_args(studio: Studio, body: dict) -> tuple:
    """Checks a generate request before it is queued: (run, condition texts, seed)."""
    from dnd_jax.data.prompts import needs_answers, parse_prompts

    run = studio.run(body.get("run"))
    if run.problem():
        raise DndError(run.problem())
    form = run.config["data"].get("condition", "prompts")
    text = str(body.get("text") or "")
    is_json = _is_json_list(text)  # an upload or pasted JSON; whatever the file's name or later edits
    if not text.strip():
        raise DndError("no prompts: paste the task's prompts, one per line, or upload a JSON file")
    if needs_answers(form) and not is_json:
        raise DndError(f"this generator reads prompts with answers (condition {form!r}): upload a JSON list of "
                       '{"prompt", "response"} records')  # fmt: skip
    seed = str(body.get("seed") or "").strip()
    if seed and not re.fullmatch(r"[0-9]{1,9}", seed):
        raise DndError(f"seed {seed!r} is not a whole number from 0 to 999999999")
    where = "the uploaded file" if is_json else "prompts"
    texts = parse_prompts(text, is_json, form, int(seed) if seed else run.config["seed"], where)  # the CLI's mix draw
    return run.label, texts, int(seed) if seed else None


def _is_json_list(text: str) -> bool:
    """Whether the prompts box holds a JSON list (an uploaded or pasted dataset file) rather than lines of text."""
    if not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return text.lstrip().startswith(("[{", '["', "[\n", "[ ")) or text.strip() == "["  # broken JSON: say so
