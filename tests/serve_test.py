"""The web page (`python -m dnd_jax.serve`) driven in headless Chromium: paste prompts, generate, ask, download.

Oracles from outside the page: the downloaded zip loads in `PeftModel.from_pretrained` and gives the logits of the
adapter `python -m dnd_jax.generate` writes for the same prompts and seed; the page's generated answer is the greedy
continuation transformers computes with that adapter. The server is the real CLI in a subprocess, the browser
Debian's chromium through its chromedriver (scripts/setup.sh installs both; nothing is downloaded at run time).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from dnd_jax import trainer
from dnd_jax.web import runs as web_runs
from tests import warm
from tests.sft_fixtures import write_tiny_lm
from tests.train_fixtures import make_experiment, tiny_config

pytestmark = pytest.mark.needs_models  # the prompt encoder is all-MiniLM-L6-v2
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
PROMPTS = [f"What is {a} plus {b}?" for a, b in ((2, 3), (7, 1), (4, 4), (9, 6), (5, 8), (1, 1))]
QUESTION = "What is 6 plus 2?"
SHOTS = os.environ.get("DND_SCREENSHOT_DIR")  # set it to keep the page's screenshots


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained tiny generator run (plus an untrained one beside it), a tiny real LM, and the server on them."""
    root = tmp_path_factory.mktemp("serve")
    exp = make_experiment(root / "exp")
    trainer.train_and_evaluate(tiny_config(exp, **{"train.steps": 2}), exp / "runs" / "trained")
    (exp / "runs" / "untrained").mkdir()
    shutil.copy(exp / "runs" / "trained" / "config.json", exp / "runs" / "untrained" / "config.json")
    lm = write_tiny_lm(root / "lm")
    log = open(root / "server.err", "w")  # the server's stderr: a file, never a pipe that could fill
    proc = warm.popen([sys.executable, "-m", "dnd_jax.serve", f"--workdir={exp / 'runs'}", f"--base={lm}",
                             "--port=0", f"--out={root / 'made'}"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    ready, _, _ = select.select([proc.stdout], [], [], 180)
    line = proc.stdout.readline() if ready else ""
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {(root / 'server.err').read_text()[-3000:]}")
    url = line.split(" at ", 1)[1].split(" ", 1)[0]
    yield {"url": url, "exp": exp, "lm": lm, "root": root, "line": line}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_server_binds_localhost_and_lists_runs(served):
    assert served["url"].startswith("http://127.0.0.1:") and "this machine only" in served["line"]
    info = json.loads(urllib.request.urlopen(served["url"] + "api/info").read())
    assert [r["label"] for r in info["runs"]] == ["trained", "untrained"]
    assert info["default"] == "trained" and "no generator checkpoint" in info["runs"][1]["problem"]


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_one_line_and_the_server_goes_on(served):
    gen = served["url"] + "api/generate"
    lines = "\n".join(PROMPTS)
    cases = [
        (json.dumps({"run": ["trained"], "text": lines}).encode(), "'run' must be a run's name"),
        (json.dumps({"run": "trained", "text": lines, "seed": "-5"}).encode(), "not a whole number"),
        (json.dumps({"run": "nosuch", "text": lines}).encode(), "no run 'nosuch'"),
        (b"[1, 2]", "not a JSON object"),
        (b"{not json", "the request is not JSON"),
        (json.dumps({"run": "trained", "text": '[{"prompt": "a"}, {"no": 1}]'}).encode(), "needs a string 'prompt'"),
    ]  # fmt: skip
    for body, want in cases:
        code, got = _post(gen, body)
        assert code == 400 and want in got["error"] and "\n" not in got["error"], (want, got)
    code, got = _post(served["url"] + "api/answer", json.dumps({"adapter": "nosuch", "question": "q"}).encode())
    assert code == 400 and "no adapter 'nosuch'" in got["error"]
    with urllib.request.urlopen(served["url"] + "api/info") as r:  # still serving
        assert r.status == 200


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium + chromium-driver (scripts/setup.sh)")
def test_page_generates_answers_and_downloads_an_adapter_peft_loads(served, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})  # fmt: skip
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    wait = WebDriverWait(driver, 180, poll_frequency=0.2)
    by_id = lambda i: driver.find_element(By.ID, i)  # noqa: E731
    try:
        driver.get(served["url"])
        wait.until(lambda d: by_id("runinfo").text)
        assert "2 tasks" in by_id("runinfo").text
        report = by_id("report").text
        assert "No report was found" in report  # a bare train workdir: the page says nothing measured it

        # Errors a user can make: one message on the page, and the server goes on.
        by_id("generate").click()
        wait.until(lambda d: "no prompts" in by_id("genstatus").text)
        by_id("prompts").send_keys("\n".join(PROMPTS[:2]))
        by_id("generate").click()
        wait.until(lambda d: "fewer than this generator's num_texts=4" in by_id("genstatus").text)
        bad = tmp_path / "broken.json"
        bad.write_text('[{"prompt": "unclosed"')
        by_id("upload").send_keys(str(bad))
        wait.until(lambda d: "unclosed" in by_id("prompts").get_attribute("value"))
        by_id("generate").click()
        wait.until(lambda d: "invalid JSON" in by_id("genstatus").text)
        Select(by_id("run")).select_by_value("untrained")
        wait.until(lambda d: "no generator checkpoint" in by_id("genstatus").text)
        Select(by_id("run")).select_by_value("trained")
        wait.until(lambda d: by_id("genstatus").text == "")

        # Paste prompts, generate with seed 5.
        by_id("prompts").clear()
        by_id("prompts").send_keys("\n".join(PROMPTS))
        by_id("seed").send_keys("5")
        by_id("generate").click()
        wait.until(lambda d: by_id("made").is_displayed() or "error" in by_id("genstatus").get_attribute("innerHTML"))
        assert by_id("made").is_displayed(), by_id("genstatus").text
        assert "made from 6 prompts" in by_id("genstatus").text
        if SHOTS:
            driver.save_screenshot(str(Path(SHOTS) / "serve-generated.png"))

        # Ask: base, generated and control answers side by side.
        by_id("question").send_keys(QUESTION)
        by_id("ask").click()
        wait.until(
            lambda d: by_id("askstatus").text == "answered" or "error" in by_id("askstatus").get_attribute("innerHTML")
        )
        assert by_id("askstatus").text == "answered", by_id("askstatus").text
        answers = {k: by_id(f"ans-{k}").find_element(By.CLASS_NAME, "text").text for k in
                   ("base", "generated", "control")}  # fmt: skip
        assert "not on this machine" not in answers["control"]

        # Download the zip.
        by_id("download").click()
        wait.until(lambda d: any(p.suffix == ".zip" for p in downloads.iterdir()))
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        if SHOTS:
            shutil.copy(shot, Path(SHOTS) / "serve.png")
    finally:
        driver.quit()

    zipped = next(p for p in downloads.iterdir() if p.suffix == ".zip")
    with zipfile.ZipFile(zipped) as z:
        z.extractall(tmp_path / "unzipped")
    (folder,) = list((tmp_path / "unzipped").iterdir())
    card = (folder / "README.md").read_text()
    assert "6 (condition form `prompts`)" in card and "sampling seed 5" in card and "runs/trained" in card

    # The CLI's adapter for the same prompts and seed.
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(PROMPTS) + "\n")
    r = warm.run([sys.executable, "-m", "dnd_jax.generate", f"--workdir={served['exp'] / 'runs' / 'trained'}",
                        f"--prompts={pfile}", "--num-adapters=1", "--seed=5", f"--out={tmp_path / 'cli'}",
                        "--repeats=1"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ids = torch.randint(2, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for d in (folder, tmp_path / "cli" / "adapter-0"):
        base = transformers.AutoModelForCausalLM.from_pretrained(served["lm"]).eval()
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, str(d)).eval()(ids).logits)
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(served["lm"]).eval()(ids).logits
    assert (logits[0] - plain).abs().max() > 1e-4  # the adapter acts on the model
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)

    # The page's generated answer is the greedy continuation with that adapter, computed here from the zip (the
    # evaluator's generation, prefix cache and all: a random tiny LM has near-ties that another float order flips).
    from dnd_jax.lm import chat_prompt_text
    from dnd_jax.protocols.gen import generate_batch

    tok = transformers.AutoTokenizer.from_pretrained(served["lm"])
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(served["lm"]), str(folder))
    ids = tok(chat_prompt_text(tok, "", QUESTION), add_special_tokens=False)["input_ids"]
    want = generate_batch(model.eval(), tok, [ids], 96, "cpu", chars=10**9)[0]
    assert want.strip() == answers["generated"]


def test_page_shows_the_runs_report_numbers(tmp_path):
    """The nearest report.md's headline table (control and generated rows), found from a run below it."""
    run = tmp_path / "cv" / "dnd" / "fold-0" / "seed-1" / "train"
    run.mkdir(parents=True)
    (tmp_path / "report.md").write_text(
        "# Many tasks\n\n## Primary\n\n| row | mean NLL | median |\n|---|---|---|\n| base model | 3.0 | 2.9 |\n"
        "| prompt-blind control (mean training tokens) | 0.36 | 0.25 |\n| **generated (dnd)** | 0.42 | 0.27 |\n"
        "| unrelated | 1 | 1 |\n\n| a | b |\n|---|---|\n| control | 1 |\n"
    )
    rep = web_runs.report_excerpt(run, tmp_path)
    assert rep["title"] == "Primary" and rep["header"] == ["row", "mean NLL", "median"]
    assert [r[0] for r in rep["rows"]] == ["base model", "prompt-blind control (mean training tokens)",
                                           "generated (dnd)"]  # fmt: skip
    assert web_runs.report_excerpt(run, run) is None  # never above the served directory


def test_serve_cli_bad_workdir_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = warm.run([sys.executable, "-m", "dnd_jax.serve", f"--workdir={tmp_path}", "--port=0"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 1, r.stderr  # "loading ..." then the error
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: no training workdir")


def test_alpaca_records_parse_like_the_cli(tmp_path):
    from dnd_jax.data.prompts import load_prompts_file, parse_prompts

    recs = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "input": ""},
            {"prompt": "plain"}, "bare"]  # fmt: skip
    f = tmp_path / "p.json"
    f.write_text(json.dumps(recs))
    assert load_prompts_file(f) == ["Add\n2 and 3", "Say hi", "plain", "bare"]
    assert parse_prompts(json.dumps(recs[:1]), True, "answers", 0, "x") == ["5"]
    with pytest.raises(Exception, match="record 1 has no response"):
        parse_prompts(json.dumps(recs), True, "answers", 0, "x")
