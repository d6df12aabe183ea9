"""Side by side: several training runs (validation MSE per epoch, seconds per epoch) and their
evaluations by eval/main.py (MSE on the database, exact-search recalls, encode time), with the faiss
baselines of one of those evaluations; a markdown table and a plot of validation MSE per epoch.

    python eval/compare.py --name devsift --baselines-from runs/devsift8_qinco1 \\
        --run "QINCo v1 (L=2)=runs/devsift8_qinco1" --run "QINCo2-S=runs/devsift8_qinco2s" \\
        --out docs/devsift8.json --plot docs/devsift8_val.png

Each run's evaluation is read from WORKDIR/eval_NAME.json (eval/main.py's default --out with --name NAME).
Epoch 0 of the plot is the validation MSE before the first optimizer step (summary.json's val_mse_init).
"""

from __future__ import annotations

import argparse
import os
import sys

from qinco_jax.files import read_bounded_json

COLUMNS = ("method", "epochs", "train_s_per_epoch", "mse", "r1", "r10", "r100", "encode_us")
HEADER = ("method", "epochs", "training s/epoch", "MSE (base)", "R@1", "R@10", "R@100", "encode µs/vector")


def run_record(label: str, workdir: str, name: str) -> dict:
    """A run's curve (epochs, validation MSEs with val_mse_init as epoch 0), timing and evaluation row."""
    from train.report import read_metrics

    rows = read_metrics(workdir, log=lambda *a: None)
    trained = [r for r in rows if not r.get("initial")]  # epoch 0 of today's runs is the initial model
    if not trained:
        raise ValueError(f"{workdir}: no trained epoch in metrics.jsonl")
    summary = read_bounded_json(os.path.join(workdir, "summary.json"), "run summary")
    table = read_bounded_json(os.path.join(workdir, f"eval_{name}.json"), "evaluation")["table"]
    ev = dict(table[0])
    ev.update(method=label, epochs=len(trained), train_s_per_epoch=sum(r["seconds"] for r in trained) / len(trained))
    if len(trained) < len(rows):
        curve = {"epoch": [r["epoch"] for r in rows], "val_mse": [r["val_mse"] for r in rows]}
    else:  # a run written before epoch 0 was the initial model: its epochs counted from 0
        curve = {"epoch": [0] + [r["epoch"] + 1 for r in rows],
                 "val_mse": [summary["val_mse_init"]] + [r["val_mse"] for r in rows]}
    return {"label": label, "workdir": workdir, "curve": curve, "row": ev}


def baseline_rows(workdir: str, name: str) -> list[dict]:
    """The faiss baseline rows of WORKDIR/eval_NAME.json (its first row is the codec itself)."""
    return [dict(r) for r in read_bounded_json(os.path.join(workdir, f"eval_{name}.json"), "evaluation")["table"][1:]]


def markdown(rows: list[dict]) -> str:
    from eval.report import format_value

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("" if v is None else format_value(c, v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    """Two panels: every epoch on a log scale, and epochs 1.. on a linear scale (where the curves part)."""
    from eval.report import figure

    fig = figure((11, 4.5))
    for j, first in enumerate((0, 1)):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, rec in enumerate(records):
            pts = [(e, v) for e, v in zip(rec["curve"]["epoch"], rec["curve"]["val_mse"]) if e >= first]
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=rec["label"])
        ax.set_yscale("log" if first == 0 else "linear")
        ax.set_xlabel("epoch (0: before training)")
        ax.set_ylabel("validation MSE")
        ax.set_title(title if first == 0 else "from epoch 1")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=WORKDIR", help="a training run (repeat)")
    ap.add_argument("--name", required=True, help="the --name given to eval/main.py")
    ap.add_argument("--baselines-from", metavar="WORKDIR", help="add the faiss baseline rows of this run's evaluation")
    ap.add_argument("--out", help="JSON of the table and curves")
    ap.add_argument("--plot", help="PNG of validation MSE per epoch")
    args = ap.parse_args(argv)
    try:
        records = []
        for spec in args.run:
            label, sep, workdir = spec.rpartition("=")
            if not sep or not label or not workdir:
                raise ValueError(f"--run {spec!r} is not LABEL=WORKDIR")
            records.append(run_record(label, workdir, args.name))
        base = baseline_rows(args.baselines_from, args.name) if args.baselines_from else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [r["row"] for r in records] + base
    print(markdown(rows))
    if args.out:
        from eval.report import write_json

        write_json(args.out, {"name": args.name, "table": rows, "runs": records})
    if args.plot:
        try:
            plot(records, args.plot, f"{args.name}: validation MSE per epoch")
        except RuntimeError as e:
            print(f"no plot: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
