"""Which probe setting shows the representation-dynamics effect most clearly on the digits?

For the models of a finished reproducibility run (the main job's ``--out`` folder), compute the
probe curve of ``diffcore.experiments.representation`` for every combination of layer, pooling and
label budget, and rank the settings by the contrast between the most generalizing and the most
memorizing model: ``rise(generalizing) - rise(memorizing)`` where ``rise`` is the peak probe
accuracy minus the accuracy at the smallest sigma (a unimodal curve rises, a decreasing one does not).

    python scripts/representation_probe_sweep.py RUN_FOLDER [--width 32] [--out sweep.csv]

The chosen setting is the quick preset's (docs/studies.md gives the table this script printed). Run
it on models of another width or seed than the ones the study reports on: a setting chosen to
maximize a contrast on the models it is then measured on proves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

from diffcore.analysis.representation import curve_shape, feature_layers
from diffcore.experiments import _stack
from diffcore.experiments.base import atomic_write_csv
from diffcore.experiments.representation import RepresentationConfig, _labels, probe_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished reproducibility run folder")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--budgets", default="50,100,300,1000", help="labelled digits for the probe")
    parser.add_argument("--poolings", default="mean,flatten")
    parser.add_argument("--layers", default="", help="comma-separated layer names (default: every block)")
    parser.add_argument("--out", type=Path, default=Path("representation-sweep.csv"))
    parser.add_argument("--tolerance", type=float, default=0.01, help="rise/fall of a unimodal mean curve")
    args = parser.parse_args()

    results = json.loads((args.run / "results.json").read_text())
    rows = sorted((m for m in results["models"] if m["width"] == args.width), key=lambda m: m["gl"])
    memorizing, generalizing = rows[0], rows[-1]
    load = lambda m: _stack.load_model(args.run / "units" / "models" / f"w{m['width']}-n{m['n']}-s{m['seed']}")  # noqa: E731
    models = {m["n"]: load(m) for m in (memorizing, generalizing)}
    pool = _stack.load_dataset(results["config"]["dataset"], results["config"]["data_root"])
    labels = _labels(results["config"]["dataset"], results["config"]["data_root"], pool.shape[0])
    layers = (
        args.layers.split(",")
        if args.layers
        else [name for name in feature_layers(models[memorizing["n"]]) if "aux" not in name]
    )
    table = []
    for layer, pooling, budget in itertools.product(
        layers, args.poolings.split(","), [int(b) for b in args.budgets.split(",")]
    ):
        config = dataclasses.replace(RepresentationConfig(), layer=layer, pooling=pooling, probe_train=budget)
        shapes = {}
        for n, model in models.items():
            curve = probe_curve(model, pool, labels, config)
            mean = [
                sum(r["probe_accuracy"] for r in curve if r["sigma"] == s) / config.probe_splits
                for s in config.sigmas()
            ]
            shapes[n] = curve_shape(config.sigmas(), mean, args.tolerance)
        gen, mem = shapes[generalizing["n"]], shapes[memorizing["n"]]
        row = {
            "layer": layer,
            "pooling": pooling,
            "probe_train": budget,
            "contrast": gen["rise"] - mem["rise"],
            "gen_n": generalizing["n"],
            "gen_shape": gen["shape"],
            "gen_rise": gen["rise"],
            "gen_peak": gen["peak"],
            "gen_peak_sigma": gen["peak_sigma"],
            "mem_n": memorizing["n"],
            "mem_shape": mem["shape"],
            "mem_rise": mem["rise"],
            "mem_peak": mem["peak"],
        }
        table.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    table.sort(key=lambda r: -r["contrast"])
    atomic_write_csv(args.out, table)
    print(f"best: {table[0]}")


if __name__ == "__main__":
    main()
