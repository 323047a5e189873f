"""`shardtrain verify RUN_DIR`: check every checkpoint of a run offline, as a resume would (issue 21).

For each ``checkpoints/step_N/``: the COMPLETE marker, trainer_state.json, every file of MANIFEST.json
present with its recorded size, and (unless ``--sizes-only``) its bytes hashed again and compared with the
digest recorded while it was written (runtime/ckpt_files.py, runtime/ckpt_hash.py). One line per
checkpoint, then which one a resume would take.

Exit codes: 0 every complete checkpoint verifies; 3 (exitcodes.EXIT_DAMAGED) a checkpoint marked
COMPLETE is damaged, or there is no complete checkpoint at all; 1 RUN_DIR is not a run directory.
An unfinished save (no COMPLETE: a crash while writing) is listed but is not damage: resume skips it.
No torch, no process group: it runs on a login node next to the file system.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.exitcodes import EXIT_DAMAGED, EXIT_ERROR, EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser("verify", help="check every checkpoint of a run dir (sizes and content digests) offline",
                       description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds checkpoints/)")
    p.add_argument("--sizes-only", action="store_true",
                   help="check markers and sizes only, without reading the files (fast; misses same-size damage)")
    p.set_defaults(func=cmd_verify)


def _human(n: int) -> str:
    from shardtrain.units import fmt_bytes
    return fmt_bytes(n)


def check(run_dir: Path, digests: bool = True) -> list[tuple[int, str, str]]:
    """[(step, status, detail)] for every step_N of the run, oldest first; status OK | DAMAGED | INCOMPLETE."""
    from shardtrain.runtime import ckpt_files as files
    rows = []
    for n, d in sorted(files.candidates(run_dir)):
        why = files.verify(d, digests=digests)
        if why is not None:
            rows.append((n, "INCOMPLETE" if not (d / rf.COMPLETE).is_file() else "DAMAGED", why))
            continue
        m, _ = files.read_manifest(d)
        if m is None:
            rows.append((n, "OK", "written before manifests: only the COMPLETE marker could be checked"))
            continue
        sizes = m[rf.MANIFEST_FILES]
        what = ("sizes and digests" if digests and m.get(rf.MANIFEST_DIGESTS) else
                "sizes only (no digests in its manifest)" if digests else "sizes only")
        rows.append((n, "OK", f"{len(sizes)} files, {_human(sum(sizes.values()))}, {what}"))
    return rows


def cmd_verify(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / rf.CHECKPOINTS).is_dir():
        why = "does not exist" if not run_dir.exists() else f"has no {rf.CHECKPOINTS}/ folder"
        print(f"shardtrain: error: verify: {run_dir} {why}; give the run directory of a launch "
              f"(the folder holding {rf.RUN_YAML} and {rf.CHECKPOINTS}/)", file=sys.stderr)
        return EXIT_ERROR
    rows = check(run_dir, digests=not args.sizes_only)
    for n, status, detail in rows:
        print(f"{status:<10} {rf.step_dir_name(n)}: {detail}")
    ok = [n for n, status, _ in rows if status == "OK"]
    damaged = [n for n, status, _ in rows if status == "DAMAGED"]
    resume = f"a resume would use {rf.step_dir_name(max(ok))}" if ok else "no checkpoint to resume from"
    print(f"shardtrain verify: {len(ok)} OK, {len(damaged)} damaged, "
          f"{len(rows) - len(ok) - len(damaged)} incomplete; {resume}")
    return EXIT_DAMAGED if damaged or not ok else EXIT_OK
