"""Checks our `ll` protocol against lm-evaluation-harness itself on one adapter: same items, same template.

  PYTHONPATH=. python scripts/check_lm_eval.py --data runs/many_task_smollm2/data --dataset anachronisms \
      --adapter runs/many_task_smollm2/collect/anachronisms/step-000025 --limit 64

Needs `lm_eval` importable (it is not a dependency of dnd_jax: `pip install lm-eval`). Writes the items
with our lm-eval-style context (`Question: <stem>\\nAnswer:`, choices, gold index) as a local JSON task,
runs `lm_eval.simple_evaluate` with the HF model + `peft=<adapter>`, scores the same items with
`dnd_jax.evaluate`'s `ll` protocol, and prints both acc / acc_norm and how many items disagree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dnd_jax.errors import DndError, run_cli


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    a = ap.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DndError("lm_eval is not installed (pip install lm-eval)") from None
    from dnd_jax.assets import resolve_model
    from dnd_jax.data.prompts import load_split
    from dnd_jax.evaluate import Scorer
    from dnd_jax.protocols.ll import question_stem

    recs = load_split(a.data, f"{a.dataset}_test")[: a.limit]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [{"stem": question_stem(r["prompt"], r["choices"]), "choices": [str(c) for c in r["choices"]],
                 "answer": int(r["answer"])} for r in recs]  # fmt: skip
        (tmp / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (tmp / "task.yaml").write_text(
            "task: dnd_check\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tmp / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "Question: {{stem}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
        base = resolve_model(a.base)
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={base},peft={a.adapter},dtype=float32", tasks=["dnd_check"],
            task_manager=TaskManager(include_path=str(tmp)), device="cpu", batch_size=16, log_samples=True,
        )  # fmt: skip
    theirs = out["results"]["dnd_check"]
    samples = out["samples"]["dnd_check"]
    scorer = Scorer(a.base)
    ours = scorer.score(Path(a.adapter), recs, ("ll",))["ll"]
    print(f"{a.dataset}, {len(recs)} items, adapter {a.adapter}")
    print(f"lm_eval : acc {theirs['acc,none']:.4f}  acc_norm {theirs['acc_norm,none']:.4f}")
    print(f"dnd_jax : acc {ours['acc']:.4f}  acc_norm {ours['acc_norm']:.4f}")
    print(f"lm_eval scored {len(samples)} items")
    return 0


if __name__ == "__main__":
    run_cli(main)
