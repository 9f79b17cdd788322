"""The whole TRAINING step's ratio to SGD(foreach) (`bench_optimizer.whole_steps`) for two source
trees, alternated in one run: for issue 18's "within 5%" check of a commit against another.

    python benchmarks/compare_trees.py TREE_A TREE_B [--pairs 4] [--rounds 8]

A tree is a checkout of the package (e.g. `git worktree add /tmp/base e788cf1`, with its compiled
`labpal_fast/_C*.so` copied in or built). Each round is one process that imports that tree's
labpal_fast and times this checkout's `bench_optimizer.interleaved(whole_steps())`; the trees
alternate A B, B A, ... Printed per step: the median of the per-round ratios to SGD(foreach) with
their min-max, the ratio of best times, and tree A over tree B. The second SGD row (set_to_none
False) runs the same torch code in both trees: how far its A/B is from 1 is the noise.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r'''
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import bench_optimizer as b
print(json.dumps(b.interleaved(b.whole_steps(), rounds=int(sys.argv[3]))))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    trees = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    times = {name: {} for name in trees}
    for i in range(args.pairs):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            tree = trees[name]
            run = subprocess.run([sys.executable, "-c", CHILD, tree, HERE, str(args.rounds)],
                                 env=dict(os.environ, PYTHONPATH=tree), cwd=tree,
                                 capture_output=True, text=True)
            if run.returncode:
                sys.exit(run.stderr)
            for step, t in json.loads(run.stdout.strip().splitlines()[-1]).items():
                times[name].setdefault(step, []).extend(t)
            with open("/proc/loadavg") as f:
                print(f"round {i} {name}: load {f.read().split()[0]}", flush=True)
    base = "SGD(foreach)"
    print(f"A = {trees['A']}, B = {trees['B']}")
    for step in times["A"]:
        cells = []
        for name in ("A", "B"):
            r = [x / y for x, y in zip(times[name][step], times[name][base])]
            cells.append((statistics.median(r), min(r), max(r),
                          min(times[name][step]) / min(times[name][base])))
        (ma, lo_a, hi_a, ba), (mb, lo_b, hi_b, bb) = cells
        print(f"{step:50s} A {ma:.3f} ({lo_a:.2f}-{hi_a:.2f}) best {ba:.3f} | B {mb:.3f} "
              f"({lo_b:.2f}-{hi_b:.2f}) best {bb:.3f} | A/B median {ma / mb:.3f} best {ba / bb:.3f}")


if __name__ == "__main__":
    main()
