"""Train several tiny text-to-video recipes side by side on one GPU and rank them by checker accuracy.

    python bench/tiny_sweep.py --minutes 7 --outdir /tmp/sweep \\
        --variant "lr1e-3:--lr 1e-3 --loss_weighting min_snr" --variant "lr5e-4:--lr 5e-4"

Each variant is a `t2v.scripts.train_tiny` process (same seed, `--compile True`, its own output folder
OUTDIR/NAME) started at the same time, so the variants share the GPU and the comparison is fair within one
run (not against a run of a variant alone). At the end it prints a markdown table (held-out and training
caption accuracy for the EMA and the raw weights, steps, loss) and writes it to OUTDIR/sweep.md. With
`--pack DIR` it also copies the best variant's model (split in 15 MiB parts, to pass size-limited transfers)
and a tar of every variant's logs and PNGs to DIR.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise SystemExit(f"--variant {text!r}: expected NAME:FLAGS with NAME made of letters, digits, - _ .")
    return name, shlex.split(flags)


def accuracy(log: dict, key: str, split: str) -> float:
    return log.get(key, {}).get(split, {}).get("accuracy", {}).get("all", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="NAME:train_tiny flags (repeatable)")
    parser.add_argument("--minutes", type=float, required=True, help="training minutes per variant")
    parser.add_argument("--outdir", required=True, help="one sub-folder per variant")
    parser.add_argument("--pack", default="", help="copy the best model (split) and a tar of the logs here")
    parser.add_argument("--resume", action="store_true", help="continue each variant's training state")
    args = parser.parse_args()

    outdir = Path(args.outdir)
    variants = [parse_variant(v) for v in args.variant]
    procs = {}
    for name, flags in variants:
        folder = outdir / name
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "t2v.scripts.train_tiny", "--outdir", str(folder), "--compile", "True",
                   "--max_minutes", str(args.minutes), "--resume" if args.resume else "--overwrite", *flags]
        print("starting", name, " ".join(command), flush=True)
        procs[name] = subprocess.Popen(command, stdout=open(folder / "stdout.txt", "a"), stderr=subprocess.STDOUT)
    start = time.time()
    for name, proc in procs.items():
        code = proc.wait()
        print(f"{name}: exit {code} after {time.time() - start:.0f}s", flush=True)

    rows, best = [], None
    for name, flags in variants:
        log_path = outdir / name / "train_log.json"
        if not log_path.exists():
            rows.append(f"| {name} | `{' '.join(flags)}` | failed (see {outdir / name}/stdout.txt) | | | | | |")
            continue
        log = json.loads(log_path.read_text())
        last = log["intervals"][-1] if log["intervals"] else {}
        scores = [accuracy(log, key, split) for key in ("eval", "eval_raw_weights") for split in ("heldout", "train")]
        rows.append(f"| {name} | `{' '.join(flags)}` | {log['step']} | {last.get('loss', float('nan')):.4f} | "
                    + " | ".join(f"{s:.0%}" for s in scores) + " |")
        if best is None or scores[0] > best[1]:
            best = (name, scores[0])
    table = "\n".join([
        "| variant | flags | steps | last loss | held-out (EMA) | train (EMA) | held-out (raw) | train (raw) |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    (outdir / "sweep.md").write_text(table + "\n")
    if args.pack and best is not None:
        pack = Path(args.pack)
        pack.mkdir(parents=True, exist_ok=True)
        print(f"best: {best[0]} (held-out accuracy {best[1]:.0%})")
        data = (outdir / best[0] / "model.safetensors").read_bytes()
        part = 15 * 2**20
        for i in range(0, len(data), part):
            (pack / f"{best[0]}.model.safetensors.part{i // part}").write_bytes(data[i:i + part])
        with tarfile.open(pack / "sweep_logs.tar.gz", "w:gz") as tar:
            tar.add(outdir / "sweep.md", arcname="sweep.md")
            for name, _ in variants:
                for file in ("train_log.json", "loss_curve.png", "eval_samples.png", "stdout.txt"):
                    if (outdir / name / file).exists():
                        tar.add(outdir / name / file, arcname=f"{name}/{file}")


if __name__ == "__main__":
    main()
