"""``p2ptrain study``: the collaborative-edge-training study on these members, by time and by energy.

Runs the same job under data, sequence, tensor and pipeline parallelism and the planner's
own choice (for time, and for energy within ``--max-slowdown``), each on freshly started
members (see :mod:`p2ptrain.bench._study`), and prints a table, one JSON object with
``--json``, and a PNG with the rate and the joules per sample of every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError

from ._plot import PLOT_HINT, _Canvas

__all__ = ["add_arguments", "main", "write_study_png"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testbed", metavar="PROFILE",
                        help="run each device inside an emulated testbed device, e.g. edge4 (root); default: "
                             "uncapped members on 127.0.0.1")
    parser.add_argument("--peers", type=int, default=None, metavar="N",
                        help="devices (default: the testbed profile's device count, else 3)")
    parser.add_argument("--model", default="tinygpt", help="zoo model, module:function or hf:<dir> (default tinygpt)")
    parser.add_argument("--model-arg", metavar="K=V", action="append", default=[],
                        help="keyword argument for the model (repeatable; V read as int, else float, else string)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first 3 are warm-up (default 12)")
    parser.add_argument("--global-batch", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--max-slowdown", type=float, default=1.25, metavar="X",
                        help="the energy plan may be at most X times slower than the fastest plan (default 1.25)")
    parser.add_argument("--only", metavar="ROW", action="append", default=[],
                        help="run only these rows (repeatable): data, sequence, tensor, pipeline, planner-time, planner-energy")
    parser.add_argument("--png", metavar="PATH", help="where the picture goes (default runs/study-<time>.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")


def _rows(only: list[str]) -> Any:
    from p2ptrain.bench import ROWS

    names = {r.strategy if r.strategy != "planner" else f"planner-{r.objective}": r for r in ROWS}
    unknown = [o for o in only if o not in names]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r} is not a row; rows: {', '.join(names)}")
    return [names[o] for o in only] if only else ROWS


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(study: dict[str, Any]) -> str:
    """The study as a text table: one line per row, predictions beside measurements."""
    head = ("STRATEGY", "OBJECTIVE", "SAMPLES/S", "PRED", "mJ/SAMPLE", "PRED", "ENERGY", "PEAK MiB", "WIRE KiB/STEP", "FITS", "PLAN")
    lines = [head]
    for r in study["rows"]:
        j, pj = r.get("j_per_sample"), r.get("predicted_j_per_sample")
        lines.append((
            r["strategy"], r["objective"], _fmt(r.get("samples_per_s"), ".1f"), _fmt(r.get("predicted_samples_per_s"), ".1f"),
            _fmt(None if j is None else j * 1e3, ".2f"), _fmt(None if pj is None else pj * 1e3, ".2f"),
            r.get("energy_source") or "-", _fmt(None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20, ".0f"),
            _fmt(None if r.get("wire_bytes_per_step") is None else r["wire_bytes_per_step"] / 1024, ".0f"),
            ("-" if r.get("error") else "yes") if r.get("fits") else "NO",  # "-": it failed for another cause
            r.get("plan") or r.get("error") or "all members",
        ))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head) - 1)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]) for row in lines]
    evt, pred = study.get("energy_vs_time"), study.get("energy_prediction")
    if evt:
        text.append(f"energy plan vs time plan: {evt['j_ratio']:.2f} x the joules per sample at {evt['step_ratio']:.2f} x the step time")
    if pred:
        text.append(f"energy plan: predicted {pred['predicted_j_per_sample'] * 1e3:.2f} mJ/sample, metered "
                    f"{pred['metered_j_per_sample'] * 1e3:.2f} (metered / predicted {pred['ratio']:.2f})")
    text.append(f"where: {study['where']}; joules {', '.join(sorted({r.get('energy_source') or '-' for r in study['rows']}))}")
    return "\n".join(text)


def write_study_png(path: str | Path, study: dict[str, Any]) -> str:
    """Bars of samples/s (left) and J/sample by device (right) per row; returns what drew it."""
    rows = [r for r in study["rows"]]
    labels = [f"{r['strategy']}\n({r['objective']})" if r["strategy"] == "planner" else r["strategy"] for r in rows]
    sps = [r.get("samples_per_s") or 0.0 for r in rows]
    devices = [d["name"] for d in study["devices"]]
    per = [[(r.get("j_per_sample_by_device") or {}).get(d, 0.0) * 1e3 if d in (r.get("members_used") or []) else 0.0
            for d in devices] for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        c = _Canvas(640, 240)
        top_s, top_j = max(sps + [1e-9]), max([sum(p) for p in per] + [1e-9])
        for i, (s, p) in enumerate(zip(sps, per)):
            x = 20 + i * 48
            c.rect(x, 220 - 200 * s / top_s, x + 36, 220, (31, 119, 180))
            y = 220.0
            for k, j in enumerate(p):
                h = 200 * j / top_j
                c.rect(340 + i * 48, y - h, 340 + i * 48 + 36, y, [(255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)][k % 4])
                y -= h
        Path(path).write_bytes(c.png())
        return f"basic picture, no labels ({PLOT_HINT} for the labelled one)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(labels, sps, color="tab:blue")
    a.set_ylabel("samples/s (measured)")
    a.set_title("time: samples per second")
    bottom = [0.0] * len(rows)
    for k, d in enumerate(devices):
        vals = [p[k] for p in per]
        b.bar(labels, vals, bottom=bottom, label=d)
        bottom = [x + v for x, v in zip(bottom, vals)]
    preds = [(r.get("predicted_j_per_sample") or 0) * 1e3 for r in rows]
    b.scatter([i for i, p in enumerate(preds) if p], [p for p in preds if p], marker="_", s=400, color="black", label="predicted", zorder=3)
    b.set_ylabel("mJ per sample, devices used (" + "/".join(sorted({r.get("energy_source") or "-" for r in rows})) + ")")
    b.set_title("energy: joules per sample by device")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"p2ptrain study: {study['model']}, batch {study['global_batch']}, {study['where']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # at PATH as given (matplotlib adds .png to a bare name)
    plt.close(fig)
    return "matplotlib"


def main(args: argparse.Namespace) -> int:
    from p2ptrain.bench import run_study
    from p2ptrain.train import parse_model_args

    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be at least 1, got {args.global_batch}")
    if not args.max_slowdown >= 1.0 or args.max_slowdown == float("inf"):  # nan passed and killed every member
        raise ConfigError(f"--max-slowdown must be a number of at least 1.0, got {args.max_slowdown}")
    if args.peers is not None and not 1 <= args.peers <= 16:  # 0 ran 3; 100 started 100 torch processes
        raise ConfigError(f"--peers must be 1..16 on one machine, got {args.peers}")
    rows = _rows(args.only)
    kwargs = parse_model_args(args.model_arg)
    if ":" in args.model and not args.model.startswith("hf:"):
        from p2ptrain.cli._demo import check_entry_module

        check_entry_module(args.model, "the study")  # the console script did not look in the current folder
    png = Path(args.png or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}.png")
    try:  # before the study runs: minutes of measuring must not end in a traceback
        png.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--png {png}: cannot make its folder: {exc.strerror or exc}") from None
    if png.is_dir():
        raise ConfigError(f"--png {png} is a folder; name the picture's file")
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    study = run_study(testbed=args.testbed, peers=args.peers, model=args.model, model_kwargs=kwargs,
                      steps=args.steps, global_batch=args.global_batch, max_slowdown=args.max_slowdown, rows=rows,
                      progress=say)
    drawn = write_study_png(png, study)
    study["png"] = str(png)
    if args.json:
        print(json.dumps(study))
    else:
        print(format_table(study))
        print(f"picture: {png} ({drawn})")
    return 1 if study["rows"] and all(r.get("error") for r in study["rows"]) else 0
