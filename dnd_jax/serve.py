"""Entry point: a local web page for a trained generator run.

  python -m dnd_jax.serve --workdir runs/demo            # then open http://127.0.0.1:7860

Paste a task's unlabeled prompts (one per line, or upload a LLaMA-Factory JSON), generate an adapter, ask a
question and compare the base model's, the generated adapter's and the prompt-blind control's greedy answers, and
download the adapter as a PEFT folder (zip) with a model card. The run's own report numbers stand beside it.
`--workdir` is one training workdir, the demo's, or a many-task experiment's (every fold generator is listed).

The server binds to 127.0.0.1 (this machine only) unless --host says otherwise. The base LM loads once, at start;
a run's generator and prompt encoder load with its first adapter and stay loaded (the last two runs used).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dnd_jax.errors import DndError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnd_jax.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workdir", required=True, help="a training workdir, the demo's or an experiment's")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page to "
                         "your network, with no authentication)")  # fmt: skip
    ap.add_argument("--port", type=int, default=7860, help="port (0: any free one; the URL is printed)")
    ap.add_argument("--base", default=None, help="base LM name or directory (default: the runs' collection model)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="device of the PyTorch LM")
    ap.add_argument("--report", default=None,
                    help="a report.md to show beside every run (default: the nearest report.md at or above the run; "
                         "an experiment run with --report_dir elsewhere names it here)")  # fmt: skip
    ap.add_argument("--out", default=None, help="where made adapters are kept (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not 0 <= args.port < 65536:
        raise DndError(f"--port {args.port}: not a port number")
    from dnd_jax.web.server import make_server
    from dnd_jax.web.studio import Studio

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dnd-serve-"))
    print(f"loading {args.workdir} and the base model (once) ...", file=sys.stderr)
    studio = Studio(args.workdir, out, args.base, args.device, args.report)
    try:
        server = make_server(studio, args.host, args.port)
    except OSError as e:
        raise DndError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    scope = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else "reachable from the network"
    print(f"serving {len(studio.runs)} run(s) of {args.workdir} at http://{host}:{port}/ ({scope}); "
          f"adapters go to {out}; Ctrl-C stops", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run_cli(main)
