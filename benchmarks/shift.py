"""A shift of traffic, end to end: does the loop notice it and recover? (`broadfast demo --shift-to`)

For each seed, a whole demo on the embedded stack in a fresh ``BROADFAST_HOME`` (so a new first
student, as a new user gets): Home Depot dev traffic for ``--shift-after`` seconds, then CrowdFlower
train traffic until ``--duration``, the oracle teacher (a simulated annotator answering from both
files' human judgements). From each run's summary: the drift alert's delay after the switch and the
columns it named, and the Spearman / NDCG@10 on the new data set's held-out queries (never trained
on) of the versions serving at the switch, first after it and last — all measured on the same pairs
(``broadfast/demo/shift.py``). The baseline is the version serving at the switch, in the same run.

    python benchmarks/shift.py --seeds 0 [--duration 780] [--shift-after 180]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import invocation, markdown_table, write_result

REPO = Path(__file__).resolve().parents[1]


def run_demo(seed: int, args: argparse.Namespace, home: Path) -> dict:
    summary = home / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADFAST_")} | {"BROADFAST_HOME": str(home), "BROADFAST_DATA": str(args.data)}
    cmd = [str(Path(sys.executable).parent / "broadfast"), "demo", "--duration", str(args.duration), "--shift-to", str(args.shift_to),
           "--shift-after", str(args.shift_after), "--seed", str(seed), "--no-live", "--summary", str(summary)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.duration + 1800, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (seed {seed}, exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(summary.read_text())
    out["wall_s"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds (one whole demo each).")
    parser.add_argument("--duration", type=float, default=780.0, help="Seconds of traffic per run.")
    parser.add_argument("--shift-after", type=float, default=180.0, help="Seconds of Home Depot traffic before the switch.")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "homedepot" / "dev.parquet")
    parser.add_argument("--shift-to", type=Path, default=REPO.parent / "shared" / "data" / "crowdflower" / "train.parquet")
    parser.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "broadfast-shift-runs",
                        help="Each run's summary and component logs are copied here (seed-N/), to read a run that went wrong.")
    args = parser.parse_args()
    rows, gains, delays = [], [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory(prefix="broadfast-shift-") as tmp:
            s = run_demo(seed, args, Path(tmp))
            kept = args.keep / f"seed-{seed}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(Path(tmp) / "demo" / "logs", kept / "logs")
            shutil.copy(Path(tmp) / "summary.json", kept / "summary.json")
        shift, q = s["shift"], s["shift"]["quality_on_new_traffic"]
        alert = shift.get("drift_alert") or {}

        def fig(role: str) -> str:
            v = (q or {}).get(role)
            return "—" if not v else f"{v['version']} " + " / ".join("—" if v[k] is None else f"{v[k]:.3f}" for k in ("spearman", "ndcg@10"))

        gain = shift.get("spearman_gain")
        gains += [gain] if gain is not None else []
        delays += [alert["delay_s"]] if alert else []
        rows.append([seed, f"{alert['delay_s']:.0f} s" if alert else "no alert", ", ".join(alert.get("drifted_columns") or []) or "—", fig("at_shift"), fig("first_after_shift"),
                     fig("last"), "—" if gain is None else f"{gain:+.3f}", f"{args.duration - args.shift_after:.0f} s", s["models_published"],
                     f"{s['freshness_s']['p50']:.0f} s" if s["freshness_s"]["p50"] is not None else "—", s["failed_requests"]])  # fmt: skip
    headers = ["seed", "drift alert after the switch", "columns it named", "at the switch (Spearman / NDCG@10)", "first version after", "last version",
               "Spearman gain (last − at the switch)", "traffic after the switch", "versions published", "freshness p50", "failed requests"]  # fmt: skip
    spread = f"{np.mean(gains):+.3f} ± {np.std(gains):.3f} over {len(gains)} run(s)" if gains else "—"
    body = (
        f"Home Depot dev traffic (`{args.data.name}`) for {args.shift_after:.0f} s, then CrowdFlower (`{args.shift_to.name}`) until {args.duration:.0f} s, "
        f"5 requests/s of at most 10 ads, default settings (monitor round every 60 s, drift alert after 2 drifted rounds in a row), oracle teacher. "
        f"Quality on the new traffic: the held-out queries of `{args.shift_to.name}` (never trained on), the same pairs for every version.\n\n"
        f"{markdown_table(headers, rows)}\n\nSpearman gain on the new traffic: {spread}. Drift alert delay: "
        + (f"{np.mean(delays):.0f} s mean over {len(delays)} run(s)." if delays else "no alert.") + "\n"
    )
    notes = ("The shift is a simulation (a change of data set); the oracle is a simulated annotator (human judgements), not a model. "
             "One 2-core machine runs everything: broker, Redis, the scoring API, the stream worker, the labeler, the trainer, the monitor and the replay.")  # fmt: skip
    write_result("shift", "A shift of traffic: detection and recovery (broadfast demo --shift-to)", invocation(), body, notes)


if __name__ == "__main__":
    main()
