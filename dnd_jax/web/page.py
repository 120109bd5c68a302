"""The page itself: one HTML document with its style and script inline (no assets to serve, nothing fetched from
the network). The script talks to the JSON API of `dnd_jax.web.server` and polls jobs for progress."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dnd_jax: prompts to LoRA</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
 header{background:#1d2430;color:#fff;padding:10px 20px} header h1{font-size:18px;margin:0}
 header p{margin:4px 0 0;font-size:13px;color:#c9d1dc}
 main{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px;padding:16px 20px}
 section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:12px 14px;margin-bottom:16px}
 h2{font-size:15px;margin:0 0 8px} label{font-size:13px;font-weight:600}
 textarea,input[type=text],select{width:100%;box-sizing:border-box;font:13px ui-monospace,monospace;padding:6px;
   border:1px solid #c4ccd6;border-radius:4px}
 textarea{resize:vertical} button{background:#2f6fde;color:#fff;border:0;border-radius:4px;padding:7px 14px;
   font-weight:600;cursor:pointer;margin-top:8px} button:disabled{background:#9ab0d6;cursor:default}
 .row{display:flex;gap:10px;align-items:center;flex-wrap:wrap} .muted{color:#5b6675;font-size:12px}
 .status{font-size:13px;margin-top:6px;min-height:18px} .error{color:#b3261e;font-weight:600}
 .answers{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px;margin-top:8px}
 .answer{border:1px solid #dde2e8;border-radius:4px;padding:6px;font-size:13px;white-space:pre-wrap;min-height:40px}
 .answer h3{font-size:12px;margin:0 0 4px;color:#5b6675;text-transform:uppercase}
 table{border-collapse:collapse;font-size:12px;width:100%} td,th{border-bottom:1px solid #e4e8ed;padding:3px 5px;
   text-align:left;vertical-align:top} .warn{background:#fff6e0;border:1px solid #f0d48a;padding:8px;font-size:13px;
   border-radius:4px}
 .spin{display:inline-block;width:10px;height:10px;border:2px solid #2f6fde;border-top-color:transparent;
   border-radius:50%;animation:s 0.8s linear infinite;margin-right:6px} @keyframes s{to{transform:rotate(360deg)}}
</style></head><body>
<header><h1>dnd_jax: unlabeled prompts &rarr; LoRA adapter</h1>
<p id="where">loading&hellip;</p></header>
<main><div>
<section><h2>1. A task's prompts</h2>
 <div class="row"><label for="run">generator run</label>
  <select id="run" style="width:auto;max-width:100%"></select></div>
 <p class="muted" id="runinfo"></p>
 <label for="prompts">Unlabeled prompts, one per line (or upload a JSON list: records with "prompt", or
 LLaMA-Factory's "instruction"/"input")</label>
 <textarea id="prompts" rows="9" placeholder="one prompt per line"></textarea>
 <div class="row"><input type="file" id="upload" accept=".json,.txt,application/json,text/plain">
  <label for="seed">seed</label><input type="text" id="seed" style="width:80px" placeholder="run's"></div>
 <button id="generate">Generate adapter</button>
 <div class="status" id="genstatus"></div>
 <div id="made" style="display:none"><p class="muted" id="madeinfo"></p>
  <a id="download" href="#" download>Download the PEFT adapter (.zip)</a></div>
</section>
<section><h2>2. Ask a question</h2>
 <label for="system">System prompt (optional; the task's, as in training)</label>
 <input type="text" id="system" placeholder="none">
 <label for="question">Question</label><textarea id="question" rows="4"></textarea>
 <button id="ask" disabled>Compare answers</button>
 <div class="status" id="askstatus"></div>
 <div class="answers"><div class="answer" id="ans-base"><h3>base model</h3></div>
  <div class="answer" id="ans-generated"><h3>generated adapter</h3></div>
  <div class="answer" id="ans-control"><h3>prompt-blind control</h3></div></div>
 <p class="muted">Greedy decoding in the chat format the LoRAs were trained on. The control is the mean of the
 run's training LoRAs: what a generator that ignores its prompts gives.</p>
</section></div>
<div><section><h2>What this run measured</h2><div id="report"></div></section>
<section><h2>How to read this page</h2><p class="muted">One question is an anecdote. Whether a generator helps is
 the measured comparison with the prompt-blind control over many held-out tasks, shown above when the run has a
 report. A generated adapter is worth using only where it beats the control.</p></section></div></main>
<script>
const $ = id => document.getElementById(id);
const MAX_UPLOAD = 32 << 20;  // the server's request limit
let adapterId = null;
function esc(s){return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));}
async function api(path, body){
  const r = await fetch(path, body === undefined ? {} : {method:"POST", headers:{"Content-Type":"application/json"},
                                                          body:JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
  return j;
}
function show(el, msg, kind){ el.innerHTML = kind === "busy" ? '<span class="spin"></span>' + esc(msg)
  : '<span class="' + (kind || "") + '">' + esc(msg) + '</span>'; }
async function wait(job, el){
  for (;;) {
    const s = await api("/api/job/" + job);
    if (s.state === "done") return s.result;
    if (s.state === "error") throw new Error(s.message);
    show(el, s.message + " (" + s.elapsed_s.toFixed(1) + " s)", "busy");
    await new Promise(r => setTimeout(r, 250));
  }
}
function renderReport(rep){
  if (!rep){ $("report").innerHTML = '<p class="warn">No report was found for this run: nothing here measures '
    + 'whether its adapters beat the prompt-blind control. Treat every answer on this page as a demo.</p>'; return; }
  let h = '<p class="muted">' + esc(rep.title) + ' &mdash; ' + esc(rep.path) + '</p><table><tr>'
    + rep.header.map(c => '<th>' + esc(c) + '</th>').join("") + '</tr>';
  for (const r of rep.rows) h += '<tr>' + r.map(c => '<td>' + esc(c) + '</td>').join("") + '</tr>';
  $("report").innerHTML = h + '</table>';
}
async function loadRun(){
  try {
    const r = await api("/api/run?label=" + encodeURIComponent($("run").value));
    $("runinfo").textContent = r.problem ? "" : (r.objective + " generator, step " + r.steps + ", " + r.num_texts
      + " prompts per adapter (condition: " + r.condition + "), trained on " + r.train_datasets.length + " tasks"
      + (r.residual ? ", as an offset from the control" : ""));
    if (r.problem) show($("genstatus"), r.problem, "error"); else $("genstatus").textContent = "";
    renderReport(r.report);
  } catch (e) { show($("genstatus"), e.message, "error"); }
}
$("upload").addEventListener("change", async ev => {
  const f = ev.target.files[0]; if (!f) return;
  ev.target.value = "";  // choosing the same file again reloads it
  if (f.size > MAX_UPLOAD) { show($("genstatus"), f.name + " is " + (f.size >> 20) + " MiB: at most "
    + (MAX_UPLOAD >> 20) + " MiB (upload fewer prompts)", "error"); return; }
  $("prompts").value = await f.text();
  try { const recs = JSON.parse($("prompts").value);
        if (Array.isArray(recs) && recs[0] && recs[0].system) $("system").value = recs[0].system; } catch (e) {}
});
$("generate").addEventListener("click", async () => {
  $("generate").disabled = true; $("made").style.display = "none";
  try {
    const job = await api("/api/generate", {run: $("run").value, text: $("prompts").value,
      seed: $("seed").value.trim()});
    const r = await wait(job.job, $("genstatus"));
    adapterId = r.id; $("ask").disabled = false;
    show($("genstatus"), "adapter " + r.id + " made from " + r.prompts + " prompts in " + r.seconds.toFixed(3)
      + " s (compiled call" + (r.compile_s ? "; first call compiled in " + r.compile_s.toFixed(1) + " s" : "") + ")");
    $("madeinfo").textContent = "step " + r.step + ", seed " + r.seed + ", prompts sha256 "
      + r.prompts_sha256.slice(0, 16) + "…";
    $("download").href = "/api/download/" + r.id + ".zip";
    $("download").setAttribute("download", "dnd-adapter-" + r.id + ".zip");
    $("made").style.display = "";
  } catch (e) { show($("genstatus"), e.message, "error"); }
  $("generate").disabled = false;
});
$("ask").addEventListener("click", async () => {
  $("ask").disabled = true;
  for (const k of ["base", "generated", "control"]) $("ans-" + k).querySelector("h3").nextSibling?.remove();
  try {
    const job = await api("/api/answer", {adapter: adapterId, question: $("question").value,
      system: $("system").value});
    const r = await wait(job.job, $("askstatus"));
    for (const k of ["base", "generated", "control"]) {
      const t = document.createElement("div"); t.className = "text";
      t.textContent = r[k] ? r[k].text : "(this run's training checkpoints are not on this machine)";
      $("ans-" + k).appendChild(t);
    }
    $("askstatus").textContent = "answered";
  } catch (e) { show($("askstatus"), e.message, "error"); }
  $("ask").disabled = false;
});
$("run").addEventListener("change", () => { adapterId = null; $("ask").disabled = true; loadRun(); });
(async () => {
  try {
    const info = await api("/api/info");
    $("where").textContent = "serving " + info.root + " · base model " + info.base + " · local page (127.0.0.1 unless "
      + "--host says otherwise)";
    for (const r of info.runs) { const o = document.createElement("option"); o.value = r.label;
      o.textContent = r.label + (r.problem ? " (no generator)" : ""); $("run").appendChild(o); }
    $("run").value = info.default; await loadRun();
  } catch (e) { show($("genstatus"), e.message, "error"); }
})();
</script></body></html>
"""
