"""The web page's engine: models loaded once per server, adapters made from prompts, answers side by side.

`Studio` holds the base LM (PyTorch, loaded once), one `generate.AdapterGenerator` per generator run it has been asked
for (the CLI's own prompts -> adapter path: the same prompts and seed give the same adapter as `python -m
dnd_jax.generate`), each run's prompt-blind control adapter, and the adapters it made, each in a folder of its own
with a README model card. It is not thread-safe: `Jobs` runs every call on one worker thread, off the HTTP threads.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import queue
import threading
import time
import traceback
import uuid
import zipfile
from pathlib import Path

from dnd_jax.errors import DndError
from dnd_jax.web.runs import Run, default_run, find_runs, report_excerpt

MAX_NEW_TOKENS = 96  # a short answer's worth; the page is for looking, not for scoring


class Studio:
    """Args:
    root: the served directory (one run, the demo's workdir, or an experiment's).
    out: where made adapters are written (one folder per adapter).
    base: base LM name or directory; default the runs' collection model (config.collect.model).
    device: "auto", "cpu" or "cuda" for the PyTorch LM.
    report: a report.md to show for every run (default: the nearest one at or above each run).
    """

    def __init__(self, root: str | Path, out: str | Path, base: str | None = None, device: str = "cpu",
                 report: str | Path | None = None):  # fmt: skip
        from dnd_jax.evaluate import Scorer

        self.root, self.out = Path(root), Path(out)
        self.report = Path(report) if report else None
        if self.report is not None and self.report_of(None) is None:
            raise DndError(f"{self.report}: no report.md with a table of control and generated rows")
        self.runs = {r.label: r for r in find_runs(self.root)}
        self.default = default_run(list(self.runs.values())).label
        self.base_name = base or self.runs[self.default].config["collect"]["model"]
        # The base LM, loaded once; its adapters attached and swapped as the evaluator does it.
        self.scorer = Scorer(self.base_name, device)
        self.tok, self.device = self.scorer.tok, self.scorer.device
        self._gens, self._controls, self._adapters = {}, {}, {}

    # -- runs ---------------------------------------------------------------------------------------------------
    def run(self, label: str | None) -> Run:
        if label is not None and not isinstance(label, str):
            raise DndError(f"'run' must be a run's name (a string), got {type(label).__name__}")
        run = self.runs.get(label or self.default)
        if run is None:
            raise DndError(f"no run {label!r} under {self.root} (have: {', '.join(self.runs)})")
        return run

    def info(self) -> dict:
        return {"root": str(self.root), "base": self.base_name, "default": self.default,
                "runs": [{"label": r.label, "problem": r.problem()} for r in self.runs.values()]}  # fmt: skip

    def report_of(self, run: Run | None) -> dict | None:
        """The report numbers shown beside `run`: --report's, else the nearest report.md at or above the run."""
        if self.report is not None:
            return report_excerpt(self.report.parent, self.report.parent, name=self.report.name)
        return report_excerpt(run.path, self.root)

    def run_info(self, label: str | None) -> dict:
        """The run's settings and its report's headline numbers (so the page never passes for evidence)."""
        run = self.run(label)
        c = run.config
        return {"label": run.label, "problem": run.problem(), "objective": run.objective,
                "num_texts": c["data"]["num_texts"], "condition": c["data"].get("condition", "prompts"),
                "steps": c["train"]["steps"], "seed": c["seed"], "train_datasets": c["data"]["train_datasets"],
                "residual": bool(c["data"].get("target_offset", "")), "report": self.report_of(run)}  # fmt: skip

    def generator(self, label: str | None):
        from dnd_jax.generate import AdapterGenerator

        run = self.run(label)
        if run.problem():
            raise DndError(run.problem())
        if run.label not in self._gens:
            gen = AdapterGenerator(run.path)
            self._fits(gen, run)
            self._gens = {run.label: gen, **dict(list(self._gens.items())[:1])}  # the last two runs stay loaded
        return self._gens[run.label]

    def _fits(self, gen, run: Run) -> None:
        from converters.base_check import check_against_base

        try:
            check_against_base(gen.layout.spec, Path(self.scorer.base_dir) / "config.json", where=f"run {run.label}")
        except DndError as e:
            raise DndError(f"{e} (the server's base model is {self.base_name}; restart it with --base)") from None

    # -- adapters -----------------------------------------------------------------------------------------------
    def make_adapter(self, label: str | None, texts: list[str], seed: int | None, progress) -> dict:
        """One adapter from `texts` (the condition texts, in the generator's form): written with its model card.

        Returns:
          {"id", "seconds": the compiled call (warm), "compile_s" (first call of the run), "load_s", "step", ...}.
        """
        run = self.run(label)
        progress(f"loading the generator of {run.label}" if run.label not in self._gens else "encoding the prompts")
        gen = self.generator(run.label)
        seed = gen.config.seed if seed is None else int(seed)
        if len(texts) < gen.config.data.num_texts:
            raise DndError(f"{len(texts)} prompts, fewer than this generator's num_texts="
                           f"{gen.config.data.num_texts}: paste at least that many")  # fmt: skip
        progress("generating the adapter")
        first = gen.compile_s is None
        t0 = time.perf_counter()
        lora, per_call, scales = gen(texts, 1, seed, repeats=1)
        wall = time.perf_counter() - t0
        aid = uuid.uuid4().hex[:12]
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        info = {"id": aid, "run": run.label, "workdir": str(run.path.absolute()), "step": gen.step, "seed": seed,
                "prompts": len(texts), "prompts_sha256": digest, "condition": gen.form,
                "seconds": per_call, "wall_s": wall, "compile_s": gen.compile_s if first else 0.0,
                "load_s": gen.load_s, "negative_scales": scales["negative"],
                "made": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}  # fmt: skip
        folder = self.out / aid
        gen.save(lora, folder, info)
        card = model_card(info, self.base_name, self.report_of(run))
        (folder / "adapter-0" / "README.md").write_text(card)
        self._adapters[aid] = (folder / "adapter-0", run.label)
        return info

    def adapter_dir(self, aid: str) -> Path:
        return self._adapter(aid)[0]

    def _adapter(self, aid: str) -> tuple[Path, str]:
        """(folder, the run that made it) of a made adapter."""
        made = self._adapters.get(aid) if isinstance(aid, str) else None
        if made is None:
            raise DndError(f"no adapter {aid!r} on this server (generate one first)")
        return made

    def control_dir(self, label: str | None) -> Path | None:
        """The run's prompt-blind control (its training checkpoints' mean tokens, detokenized), made once; None when
        the run's token store is not on this machine."""
        from dnd_jax.experiments.baselines import mean_tokens, save_tokens_adapter
        from dnd_jax.trainer import load_target_offset

        run = self.run(label)
        if run.label in self._controls:
            return self._controls[run.label]
        gen = self.generator(run.label)
        d = gen.config.data
        try:
            tokens = load_target_offset(gen.config, gen.layout.shape)
            if tokens is None:
                tokens = mean_tokens(Path(d.token_dir), list(d.train_datasets), d.real_length)
        except (DndError, OSError):
            self._controls[run.label] = None
            return None
        path = self.out / f"control-{len(self._controls)}"
        save_tokens_adapter(tokens, gen.layout, path)
        self._controls[run.label] = path
        return path

    def zip_bytes(self, aid: str) -> bytes:
        src = self.adapter_dir(aid)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(src.iterdir()):
                z.write(f, f"dnd-adapter-{aid}/{f.name}")
        return buf.getvalue()

    # -- answers ------------------------------------------------------------------------------------------------
    def answer(self, aid: str, question: str, system: str, progress) -> dict:
        """Greedy answers to `question` in the training chat format: base model, the generated adapter, and the
        prompt-blind control of the run that made the adapter, where it has one."""
        from dnd_jax.lm import chat_prompt_text
        from dnd_jax.protocols.gen import generate_batch

        if not question.strip():
            raise DndError("the question is empty: type one to compare the answers")
        gen_dir, label = self._adapter(aid)
        progress("preparing the control adapter")
        control = self.control_dir(label)
        ids = self.tok(chat_prompt_text(self.tok, system, question), add_special_tokens=False)["input_ids"]
        out = {}
        for name, path in (("base", None), ("generated", gen_dir), ("control", control)):
            if name == "control" and path is None:
                out[name] = None
                continue
            progress(f"answering with the {name} {'model' if name == 'base' else 'adapter'}")
            model, ctx = self.scorer.activate(path)
            t0 = time.perf_counter()
            with ctx:
                text = generate_batch(model, self.tok, [ids], MAX_NEW_TOKENS, self.device, chars=10**9)[0]
            out[name] = {"text": text.strip(), "seconds": time.perf_counter() - t0}
        return out


def model_card(info: dict, base: str, report: dict | None) -> str:
    """The README.md written into a made adapter: what made it, from what, when, and what the run measured."""
    lines = [
        "---", "library_name: peft", f"base_model: {base}", "tags: [lora, dnd_jax, generated]", "---", "",
        "# A LoRA adapter generated by dnd_jax from unlabeled prompts", "",
        "Made by a Drag-and-Drop (arXiv 2506.16406) generator with no training on this task: the prompts below went "
        "through the run's frozen prompt encoder and its generator, which wrote these LoRA weights.", "",
        f"- **generator run**: `{info['workdir']}` (`{info['run']}`), checkpoint step {info['step']}",
        f"- **prompts**: {info['prompts']} (condition form `{info['condition']}`), sha256 of the texts joined by "
        f"newlines `{info['prompts_sha256']}`; sampling seed {info['seed']}",
        f"- **made**: {info['made']}, in {info['seconds']:.3f} s (the compiled generation call)",
        f"- **base model**: {base}", "",
        "Load it with `PeftModel.from_pretrained(base_model, '<this folder>')`.", "",
    ]  # fmt: skip
    if report:
        lines += [f"## What the run measured ({Path(report['path']).name}: {report['title']})", "",
                  "| " + " | ".join(report["header"]) + " |", "|" + "---|" * len(report["header"])]  # fmt: skip
        lines += ["| " + " | ".join(r) + " |" for r in report["rows"]]
        lines += ["", "A generated adapter is worth using only where it beats the prompt-blind control above."]
    else:
        lines += ["No report was found for this run: nothing measured whether its adapters beat the prompt-blind "
                  "control (the mean of its training LoRAs)."]  # fmt: skip
    return "\n".join(lines) + "\n"


class Jobs:
    """One worker thread running submitted calls in order; the HTTP threads only submit and poll.

    A job's state is "queued", "running", "done" or "error"; `progress(msg)` inside a call updates its message.
    A `DndError` is the user's message; any other exception is reported as an internal error and the worker goes on.
    """

    def __init__(self):
        self._q: queue.Queue = queue.Queue()
        self._jobs: dict[str, dict] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._work, name="dnd-web-worker", daemon=True).start()

    def submit(self, fn, *args) -> str:
        jid = uuid.uuid4().hex[:12]
        with self._lock:
            self._jobs[jid] = {"state": "queued", "message": "waiting for the worker", "t0": time.time()}
        self._q.put((jid, fn, args))
        return jid

    def status(self, jid: str) -> dict:
        with self._lock:
            job = self._jobs.get(jid)
            if job is None:
                raise DndError(f"no job {jid!r}")
            return {k: v for k, v in job.items() if k != "t0"} | {"elapsed_s": round(time.time() - job["t0"], 1)}

    def _set(self, jid: str, **kw) -> None:
        with self._lock:
            self._jobs[jid].update(kw)

    def _work(self) -> None:
        while True:
            jid, fn, args = self._q.get()
            self._set(jid, state="running", message="starting")
            try:
                result = fn(*args, lambda msg, jid=jid: self._set(jid, message=msg))
                self._set(jid, state="done", message="done", result=result)
            except DndError as e:
                self._set(jid, state="error", message=str(e))
            except Exception as e:  # noqa: BLE001 (the page shows it; the server stays up)
                traceback.print_exc()
                self._set(jid, state="error", message=f"internal error: {type(e).__name__}: {e}")
