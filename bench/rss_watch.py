"""Sample the memory of other processes, split into anonymous and file-backed pages.

A process's peak RSS (VmHWM) counts the pages of files it has mapped, which the kernel can drop and
read again, beside its own (anonymous) memory. To tell them apart in a benchmark's child process,
run this beside it: every `--interval` seconds it writes, for each process whose command line matches
`--match` (pgrep -f), one line `seconds pid RssAnon RssFile VmRSS VmHWM` (MiB), until the file
`--until` exists; then it prints each process's largest RssAnon with the RssFile of that moment.

    .venv/bin/python bench/rss_watch.py --match '^/work/main/.venv/bin/python -c' --until /tmp/done --out rss.txt &
    .venv/bin/python bench/offload.py --layers 4 --samples 16 --seq-len 1024 --batch-size 2 --modes disk --no-save
    touch /tmp/done
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections import defaultdict

FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def status_bytes(pid: str, fields: tuple[str, ...] = FIELDS) -> dict[str, int]:
    """Those of `fields` that /proc/<pid>/status reports ("self": this process), in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in fields:
                values[key] = int(line.split()[1]) * 1024
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--match", required=True, help="pattern for pgrep -f")
    parser.add_argument("--until", required=True, help="stop once this file exists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.25)
    args = parser.parse_args()
    start, rows = time.time(), defaultdict(list)
    with open(args.out, "w") as out:
        while not os.path.exists(args.until):
            found = subprocess.run(["pgrep", "-f", args.match], capture_output=True, text=True).stdout.split()
            for pid in found:
                try:
                    values = status_bytes(pid)
                except OSError:  # gone between pgrep and the read
                    continue
                row = [round(time.time() - start, 1), pid, *(values[k] >> 20 if k in values else None for k in FIELDS)]
                rows[pid].append(row)
                out.write(" ".join(map(str, row)) + "\n")
                out.flush()
            time.sleep(args.interval)
    for pid, samples in rows.items():
        top = max(samples, key=lambda r: r[2])
        print(f"pid {pid}: {len(samples)} samples from {samples[0][0]} s to {samples[-1][0]} s; largest RssAnon "
              f"{top[2]} MiB at {top[0]} s (RssFile {top[3]} MiB, VmRSS {top[4]} MiB then); VmHWM {samples[-1][5]} MiB")


if __name__ == "__main__":
    main()
