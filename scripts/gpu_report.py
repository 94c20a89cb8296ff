"""The report of scripts/gpu_check.sh: reads what its steps left in OUT, writes OUT/SUMMARY.md, prints it.

    python scripts/gpu_report.py OUT

OUT holds steps.tsv (step, status, seconds, log, note; one row per step), environment.json, and what the
steps wrote: test_cuda.xml (pytest's JUnit XML), bench_ops_cuda.json, bench_moe.json. Missing files are
reported as missing. Exit status 1 when a step failed or the CUDA tests did not all run (a skipped CUDA test
on a GPU machine is a check that did not happen), else 0.
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(out: Path) -> list[dict]:
    with open(out / "steps.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    """tests / failures / errors / skipped summed over the test suites of a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table that also reads as plain text."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def moe_rows(bench: dict) -> list[list[str]]:
    """One row per config and mode: moe_ext's time, the fastest peer's, and both against the floor."""
    rows = []
    for run in bench.get("runs", []):
        for mode in ("forward", "forward+backward"):
            results = {impl: r[mode] for impl, r in run["results"].items() if mode in r}
            if "moe_ext" not in results:
                continue
            ext = results["moe_ext"]
            others = {n: r for n, r in results.items() if not n.startswith(("moe_ext", "floor"))}
            best = min(others, key=lambda n: others[n]["median_s"]) if others else None
            floor = min((r["median_s"] for n, r in results.items() if n.startswith("floor")), default=None)
            rows.append(
                [
                    f"{run['name']} [{run['dtype']}]",
                    mode,
                    f"{ext['median_s'] * 1e3:.3f}",
                    f"{floor * 1e3:.3f}" if floor else "-",
                    f"{ext['median_s'] / floor:.2f}x" if floor else "-",
                    f"{best} {others[best]['median_s'] * 1e3:.3f}" if best else "-",
                    f"{others[best]['median_s'] / ext['median_s']:.2f}x" if best else "-",
                ]
            )
    return rows


def ops_rows(bench: dict) -> list[list[str]]:
    rows = []
    for name, r in bench.get("results", {}).items():
        share = f"{100 * r['of_copy']:.0f}%" if "of_copy" in r else ""
        rows.append([name, f"{r['median_ms']:.3f}", share])
    return rows


def report(out: Path) -> tuple[list[str], bool]:
    """(the lines of SUMMARY.md, whether every check passed)."""
    steps = read_steps(out)
    env = read_json(out / "environment.json") or {}
    ok = bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps)
    lines = ["# moe_ext GPU check", ""]
    for gpu in env.get("gpus", []):
        lines.append(f"GPU: {gpu}")
    lines += [f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), arch {env.get('arch', '?')}", ""]
    lines += table(
        ["step", "status", "s", "log / note"],
        [[s["step"], s["status"], s["seconds"], s["note"] or s["log"]] for s in steps],
    )
    ran = {s["step"]: s["status"] for s in steps}
    if "test_cuda" in ran:
        counts = junit_counts(out / "test_cuda.xml")
        if counts is None:
            lines += ["", "tests/test_cuda.py: no JUnit XML (test_cuda.xml missing or unreadable)"]
            ok = ok and ran["test_cuda"] == "skipped"
        else:
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            lines += [
                "",
                f"tests/test_cuda.py: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped of {counts['tests']}",
            ]
            if counts["skipped"] or counts["failures"] or counts["errors"] or not counts["tests"]:
                ok = False
    ops = read_json(out / "bench_ops_cuda.json")
    if ops:
        lines += ["", f"bench_ops_cuda ({ops.get('device', '?')}): median ms, bandwidth as a share of a copy's", ""]
        lines += table(["op", "ms", "of copy"], ops_rows(ops))
    moe = read_json(out / "bench_moe.json")
    if moe:
        lines += ["", "bench_moe --device cuda: moe_ext against the floor and the fastest peer (ms)", ""]
        lines += table(["config", "mode", "moe_ext", "floor", "/floor", "fastest peer", "peer/moe_ext"], moe_rows(moe))
    for name, label in (("bench_ops_cuda", "bench_ops_cuda.json"), ("bench_moe", "bench_moe.json")):
        if ran.get(name) == "ok" and not read_json(out / label):
            lines.append(f"{label}: missing although the step passed")
            ok = False
    lines += ["", f"result: {'PASS' if ok else 'FAIL'}"]
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python scripts/gpu_report.py OUT", file=sys.stderr)
        return 2
    out = Path(args[0])
    if not (out / "steps.tsv").is_file():
        print(f"gpu_report: {out / 'steps.tsv'} does not exist: run scripts/gpu_check.sh first", file=sys.stderr)
        return 2
    lines, ok = report(out)
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
