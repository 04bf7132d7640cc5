"""Run (or resume) a `lesiongen loop` where the package is not installed, then bring its numbers out.

The device machine runs this checkout through PYTHONPATH, so `lesiongen.cli` (built from cli/ at install
time) does not exist there; this calls the library functions the `loop` command calls. Rerunning the same
command resumes the run folder (finished stages are kept), so a run longer than one call can continue in
the next one while the machine keeps /tmp.

    python bench/device_loop.py --config derm-dev-small --out /tmp/run --set classifier.epochs=10 \\
        --copy-to $OUT/loop
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BROUGHT_BACK = ("report.md", "metrics.json", "state.json", "config.yaml")  # small, and enough for the note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML path or a shipped name (derm-dev-small, demo)")
    parser.add_argument("--out", type=Path, required=True, help="run folder; resumed when it exists")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--copy-to", type=Path, default=None, help=f"folder for {', '.join(BROUGHT_BACK)}")
    args = parser.parse_args()

    from lesiongen.config import config_path
    from lesiongen.loop.config import absolute_paths, load_loop_config, parse_set_options
    from lesiongen.loop.run import create_run, run_loop
    from lesiongen.report import write_report

    if (args.out / "state.json").is_file():
        print(f"resuming {args.out} (its saved config; --set is ignored)")
    else:
        path = config_path(args.config)
        create_run(absolute_paths(load_loop_config(path, parse_set_options(args.sets)), Path.cwd()), args.out)
    outcome = run_loop(args.out)
    paths = write_report(outcome.run_dir)
    print(f"report: {paths.markdown}")
    if args.copy_to is not None:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name in BROUGHT_BACK:
            if (args.out / name).is_file():
                shutil.copy2(args.out / name, args.copy_to / name)


if __name__ == "__main__":
    main()
