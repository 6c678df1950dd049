"""Markdown tables from `longreach tune` JSON files: python3 docs/tuned/summarise.py docs/tuned/*.json

Standard library only; prints what docs/tuned.md shows for each file (the choices, the paired evidence of both
stages, the prompt sets and the screen).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x: float | None, digits: int = 1, sign: bool = True) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def template(d: dict, path: Path) -> str:
    """Whether a chat template was applied: asked for (``chat``) is not applied when the tokenizer has none. Files
    written before the JSON recorded ``chat_applied`` are read from their reporting rows beside them."""
    if not d["chat"]:
        return "off"
    applied = d.get("chat_applied")
    if applied is None:
        rows = path.with_suffix("") / "reporting" / "results.jsonl"
        seen = {json.loads(line).get("chat_applied") for line in rows.read_text().splitlines() if line.strip()} \
            if rows.exists() else set()
        applied = seen.pop() if len(seen) == 1 else None
    return {True: "on", False: "asked for, but not applied (the tokenizer has none)"}.get(applied, "on (as asked)")


def slack(rule: dict) -> str:
    """JSONs written before --tune-slack (2026-12-02) forgave no tuning prompt."""
    n = rule.get("tune_slack", 0)
    return f" (on the tuning prompts, or at most {n} prompt{'s' * (n != 1)} lost net of those won)" if n else ""


def summarise(path: Path) -> str:
    d = json.loads(path.read_text())
    prov = d["provenance"]
    out = [f"### {d['model']} at {d['length']} tokens ({path.name})", "",
           f"Tasks {', '.join(d['tasks'])}; chat template {template(d, path)}; trained length "
           f"{d['trained_length']}; rule: observed difference ≥ −{d['rule']['max_drop']:g} points on every task"
           f"{slack(d['rule'])}, "
           f"and on the reporting prompts the 95% interval's lower end > {d['rule']['min_lower']:g} points "
           f"({d['rule']['interval']}). Machine: {prov.get('cpu')} ({prov.get('isa')}), {prov.get('threads')} "
           f"threads, torch {prov.get('torch')}, transformers {prov.get('transformers')}, commit "
           f"{str(prov.get('commit'))[:10]}{'+dirty' if prov.get('dirty') else ''}.", "",
           "| kind | chosen spec | against | speed vs baseline | cache vs baseline | evidence or reason |",
           "|---|---|---|---|---|---|"]
    for kind in ("position", "prefill", "press"):
        if kind not in d:
            continue
        c = d[kind]
        if c.get("spec"):
            tuning = {"tuning": " (tuning rows)", "timing": " (timed again)"}.get(c.get("speed_from"), "")
            out.append(f"| {kind} | `{c['spec']}` | {c['baseline']} | {fmt(c.get('speed_ratio'), 2, False)}x{tuning} | "
                       f"{fmt(c.get('cache_ratio'), 2, False)}x | {c['evidence']} |")
        else:
            out.append(f"| {kind} | none | – | – | – | {c['reason']} |")
    out += ["", "| stage | kind | spec | baseline | task | n | correct | baseline correct | difference, points "
            "| 95% interval | McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in d["evidence"]:
        interval = f"[{fmt(e['lower'])}, {fmt(e['upper'])}]" if e["lower"] is not None else "–"
        p = "–" if e["mcnemar_p"] is None else f"{e['mcnemar_p']:.3g}"
        out.append(f"| {e['stage']} | {e['kind']} | `{e['spec']}` | {e['baseline']} | {e['task']} | {e['n']} | "
                   f"{e['correct']:g} | {e['baseline_correct']:g} | {fmt(e['diff_points'])} | {interval} | {p} | "
                   f"{e['verdict']} |")
    prompts = d["prompts"]
    out += ["", "| prompt set | seeds | per task | corpus |", "|---|---|---|---|"]
    for name in ("screen", "tuning", "reporting"):
        s = prompts[name]
        out.append(f"| {name} | {s['seeds'][0]}–{s['seeds'][1]} | {s.get('samples_per_task', s.get('per_task'))} | "
                   f"{s['corpus']} |")
    out.append(f"\nTuning and reporting prompts disjoint (no prompt hash in both): {prompts['disjoint']}. "
               f"{prompts.get('passkey_note', '')}")
    out += [f"\nNote: {note}" for note in d.get("tuning_notes", [])]
    out += ["", "| screened candidate | kind | mass recall | output error | next-token shift | kept |",
            "|---|---|---|---|---|---|"]
    for c in d["screen"]["candidates"]:
        out.append(f"| `{c['spec']}` | {c['kind']} | {fmt(c.get('recall'), 3, False)} | "
                   f"{fmt(c.get('output_error'), 3, False)} | {fmt(c.get('shift'), 3, False)} | "
                   f"{'yes' if c.get('kept') else 'no: ' + c.get('reason', '')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print("\n".join(summarise(Path(p)) for p in sys.argv[1:]))
