"""The report's first lines for the mixed-format pool (experiment.decisive): does a generator beat the *best*
prompt-blind baseline (per task the better of the mean control and mt_lora) and soft retrieval, and does swapping
its prompts make it worse? Fixed in the config before the run; stated plainly, whatever the answer."""

from __future__ import annotations

import numpy as np

from dnd_jax.experiments.tables import task_mean


def headline(e, vnames: list[str], nll: dict, swaps: dict, groups, nb: int, seed: int, tie: float) -> list[str]:
    """Markdown lines; says which rows are still missing instead of comparing without them."""
    from dnd_jax.experiments.stats import paired, verdict

    def compared(d: dict) -> str:
        return verdict(d, "beats", "loses to", "is within noise of")

    blind_v, soft_v = e.blind_variant, e.soft_variant
    generators = [v for v in vnames if v not in (blind_v, soft_v) and not v.startswith("fewshot-")]
    L = ["## The answer (fixed before the run: NLL per response token, family split, 95 % CIs over held-out tasks)\n"]
    missing = [v for v in (blind_v, soft_v) if v not in vnames] + ([] if generators else ["a generator variant"])
    if missing:
        return [*L, f"Not answered yet: no scores of {', '.join(missing)} in this run.\n"]
    control = nll["control"]
    blind = task_mean(nll[f"generated:{blind_v}"])
    best_blind = np.minimum(control, blind)  # per task, the better prompt-blind row (lower NLL)
    soft = task_mean(nll[f"generated:{soft_v}"])
    L.append(f"Best prompt-blind baseline per task: the better of the mean control and {blind_v} (the control on "
             f"{int((control <= blind).sum())} of {len(control)} tasks). Differences are baseline minus generated "
             "(positive = the generator better), with wins/ties/losses.\n")  # fmt: skip
    for v in generators:
        g = nll[f"generated:{v}"]
        d_blind = paired(g, best_blind, nb, seed, tie, groups)
        d_soft = paired(g, soft, nb, seed, tie, groups)
        line = (f"- **{v}** {compared(d_blind)} the best prompt-blind baseline "
                f"({d_blind['mean']:+.4f} [{d_blind['ci'][0]:+.4f}, {d_blind['ci'][1]:+.4f}], "
                f"{d_blind['wins']}/{d_blind['ties']}/{d_blind['losses']}) and "
                f"{compared(d_soft)} soft retrieval ({d_soft['mean']:+.4f} "
                f"[{d_soft['ci'][0]:+.4f}, {d_soft['ci'][1]:+.4f}])")  # fmt: skip
        if v in swaps:
            d_swap = paired(g, swaps[v], nb, seed, tie, groups)
            said = verdict(d_swap, "makes it worse", "makes it better", "makes no difference that this run can tell")
            line += (f"; swapping its prompts {said} ({d_swap['mean']:+.4f} "
                     f"[{d_swap['ci'][0]:+.4f}, {d_swap['ci'][1]:+.4f}])")  # fmt: skip
        else:
            line += "; its prompt swap was not run"
        L.append(line + ".")
    return L
