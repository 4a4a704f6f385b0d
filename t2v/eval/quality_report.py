"""The quality benchmark's summary (`t2v.eval.quality.run_benchmark`) as the papers' table, and where it is written.

Table: one row per run, grouped by bit-width (FP first), columns = metrics, the best value of each
bit-width group in bold. The markdown goes into a marked block of a document
(`<!-- quality-benchmark:start -->` ... `<!-- quality-benchmark:end -->`): a new file is created, the block
of an existing file is replaced and the rest of the file kept, and a file without the block is refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from qdiff.io import atomic_path

START, END = "<!-- quality-benchmark:start -->", "<!-- quality-benchmark:end -->"
# (summary key, header, digits, direction: +1 higher is better, -1 lower is better)
COLUMNS = (
    ("psnr", "PSNR (dB) ↑", 2, 1),
    ("ssim", "SSIM ↑", 4, 1),
    ("temporal_error", "Temporal err. ↓", 4, -1),
    ("flow_epe", "Flow EPE (px) ↓", 3, -1),
    ("delta_flow", "ΔFlow (px) ↓", 3, -1),
    ("latent_rel_error", "Rel. latent err. ↓", 4, -1),
    ("checker_accuracy", "Checker acc. (%) ↑", 1, 1),
)
_DTYPE_BITS = {"fp32": "32/32", "fp16": "16/16", "bf16": "16/16 (bf16)"}


def bit_width(bits: str | None, dtype: str | None = None) -> str:
    """'w4a6' -> '4/6' (the papers' W/A column); FP rows show their dtype's width."""
    if bits is None:
        return _DTYPE_BITS.get(dtype or "", "FP")
    weight, act = bits.lower().removeprefix("w").split("a")
    return f"{int(weight)}/{int(act)}"


def format_value(value: float | None, digits: int, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value * 100 if percent else value:.{digits}f}"


def _best(rows: list[dict], key: str, digits: int, direction: int) -> str | None:
    """The printed text of the group's best value (cells that print the same are all bold); None for one row."""
    values = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
    if len(rows) < 2 or not values:
        return None
    return format_value(max(values) if direction > 0 else min(values), digits, percent=key == "checker_accuracy")


def format_table(summary: dict) -> str:
    """Markdown table: FP, then every run grouped by bit-width in the order they ran; the best value of each
    group in bold."""
    header = "| Method | W/A | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [header, "|---|---|" + "---:|" * len(COLUMNS)]
    groups: dict[str, list[dict]] = {}
    for run in summary["runs"]:
        groups.setdefault(run["bits"], []).append(run)
    for rows in [[summary["fp"]], *groups.values()]:
        best = {key: _best(rows, key, digits, direction) for key, _, digits, direction in COLUMNS}
        for row in rows:
            cells = []
            for key, _, digits, _ in COLUMNS:
                value = row["metrics"].get(key)
                text = format_value(value, digits, percent=key == "checker_accuracy")
                cells.append(f"**{text}**" if value is not None and text == best[key] else text)
            label = f"| {row['method_label']} | {bit_width(row['bits'], row.get('dtype'))} | "
            lines.append(label + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_block(summary: dict, title: str | None = None, note: str | None = None, json_path: str | None = None) -> str:
    """The generated block: title, run facts, the table, and what its cells mean."""
    env, s = summary["environment"], summary["settings"]
    checker = summary["fp"]["metrics"]["checker"]
    overrides = ", ".join(f"`{o}`" for o in s["overrides"]) or "none (the configs' own settings)"
    facts = [
        f"- device: {env['device']}; torch {env['torch']}; Python {env['python']}; git {env['git'] or 'n/a'}; "
        f"{env['date']}",
        f"- config: `{s['config']}`" + (f", checkpoint `{s['ckpt_path']}`" if s["ckpt_path"] else " (its own weights)")
        + f"; {s['sampler']} sampler, {s['num_sampling_steps']} steps, CFG {s['cfg_scale']}, {s['dtype']}, "
        f"seed {s['seed']}",
        f"- {len(s['evaluation_prompts'])} held-out evaluation prompt(s), {len(s['calibration_prompts'])} calibration "
        f"prompt(s); quant-config overrides: {overrides}",
        f"- caption checker: {checker['checked']} of {len(s['evaluation_prompts'])} prompts checkable"
        + ("" if checker["checked"] else " (checker missing, or no prompt is a shapes caption): accuracy n/a"),
    ]
    if json_path:
        facts.append(f"- every number, per video too: `{json_path}`")
    parts = [START, f"### {title or 'Results: ' + s['config']}", ""]
    if note:
        parts += [note, ""]
    parts += facts + ["", format_table(summary).rstrip("\n"), "", END]
    return "\n".join(parts) + "\n"


def write_block(block: str, path) -> Path:
    """Put `block` into the document at `path` (see the module docstring); atomic."""
    path = Path(path)
    if not path.exists():
        text = block
    else:
        old = path.read_text(encoding="utf-8")
        start, end = old.find(START), old.find(END)
        if start < 0 or end < start:
            raise FileExistsError(f"{path} exists and has no {START} ... {END} block to replace; add those two lines "
                                  "where the table belongs, or choose another --out")
        text = old[:start] + block.rstrip("\n") + old[end + len(END):]
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_summary_json(summary: dict, path) -> Path:
    """Write the summary JSON; an existing file is replaced only if it is an earlier summary of this benchmark."""
    path = Path(path)
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            previous = None
        if previous != summary["format"]:
            raise FileExistsError(f"{path} exists and is not a quality-benchmark summary; choose another --json")
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path
