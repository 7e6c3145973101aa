#!/usr/bin/env python3
"""The table `benches/versus-istiod.sh` ends with: for each fleet size, each
server's figures side by side and the ratio of each istiod run to
meshpilot's, read from the `meshpilot load --markdown` output the script
keeps in its work folder (load-<server>-<proxies>.out).

    benches/versus_table.py WORKDIR
"""
import pathlib
import re
import sys


KINDS = ("initial sync", "one endpoint change", "endpoint churn", "one weight change")


def rows(path: pathlib.Path) -> dict:
    """measurement kind -> (figures by column, note), and the run's peak RSS."""
    out, precise = {}, {}
    for line in path.read_text().splitlines():
        peak = re.search(r"peak RSS over the run \(VmHWM\): (\d+) MiB", line)
        if peak:
            out["peak"] = float(peak.group(1))
        if not line.startswith("|"):
            # The text line's bytes have a decimal (the markdown row's are rounded).
            sent = re.search(r"([\d.]+) MiB sent", line)
            kind = next((k for k in KINDS if k in line), None)
            if sent and kind:
                precise[kind] = float(sent.group(1))
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 11:
            continue
        _, _, what, sync, rss, cpu, p50, p90, p99, mx, mib = cells
        kind = next((k for k in KINDS if what.startswith(k)), None)
        if kind is None:
            continue
        missing = re.search(r"; (\d+) \(proxy, change\) pairs not delivered", what)
        superseded = re.search(r"(\d+) reached only as a later version", what)
        number = lambda s: float(s.split()[0]) if s and s.split()[0] not in ("nan", "NaN") else None
        out[kind] = {
            "sync": number(sync), "rss": number(rss), "cpu": number(cpu), "p50": number(p50),
            "p99": number(p99), "max": number(mx), "mib": number(mib),
            "missing": int(missing.group(1)) if missing else 0,
            "superseded": int(superseded.group(1)) if superseded else 0,
        }
    for kind, mib in precise.items():
        if kind in out:
            out[kind]["mib"] = mib
    return out


# (row label, measurement kind, figure, unit)
FIGURES = [
    ("sync", "initial sync", "sync", "s"),
    ("CPU during sync", "initial sync", "cpu", "s"),
    ("sent during sync", "initial sync", "mib", "MiB"),
    ("RSS after sync", "initial sync", "rss", "MiB"),
    ("peak RSS over the run (VmHWM)", "peak", None, "MiB"),
    ("one endpoint change p50", "one endpoint change", "p50", "ms"),
    ("one endpoint change p99", "one endpoint change", "p99", "ms"),
    ("churn p50", "endpoint churn", "p50", "ms"),
    ("churn p99", "endpoint churn", "p99", "ms"),
    ("churn: (proxy, change) pairs not delivered", "endpoint churn", "missing", ""),
    ("churn: pairs reached only as a later version (timed to it)", "endpoint churn", "superseded", ""),
    ("churn: CPU", "endpoint churn", "cpu", "s"),
    ("churn: RSS at the end", "endpoint churn", "rss", "MiB"),
    ("one weight change p50", "one weight change", "p50", "ms"),
    ("one weight change p99", "one weight change", "p99", "ms"),
    ("one weight change: sent", "one weight change", "mib", "MiB"),
]


def figure(run: dict, kind: str, key):
    if kind == "peak":
        return run.get("peak")
    return run.get(kind, {}).get(key)


def show(value, unit: str) -> str:
    if value is None:
        return "–"
    text = f"{value:,.1f}" if unit == "s" or (unit == "MiB" and value < 10) else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def main() -> None:
    work = pathlib.Path(sys.argv[1])
    runs = {}
    for path in sorted(work.glob("load-*.out")):
        match = re.fullmatch(r"load-(.+)-(\d+)\.out", path.name)
        if match:
            runs.setdefault(int(match.group(2)), {})[match.group(1)] = rows(path)
    for proxies, servers in sorted(runs.items()):
        mine = servers.get("meshpilot")
        others = sorted(s for s in servers if s != "meshpilot")
        # istiod-<PILOT_MAX_REQUESTS_PER_SECOND>: 25 is istiod's default, 10000 the script's "lifted".
        admission = {"25": "stock", "10000": "lifted"}
        names = {s: "istiod " + admission.get(s.removeprefix("istiod-"), s.removeprefix("istiod-") + " streams/s") for s in others}
        header = ["%s proxies" % f"{proxies:,}", "meshpilot"] + [names[s] for s in others] + [f"{names[s]} / meshpilot" for s in others]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for label, kind, key, unit in FIGURES:
            base = figure(mine, kind, key) if mine else None
            values = [figure(servers[s], kind, key) for s in others]
            ratios = [f"{v / base:.1f}×" if v is not None and base else "–" for v in values]
            print("| " + " | ".join([label, show(base, unit)] + [show(v, unit) for v in values] + ratios) + " |")
        print()


if __name__ == "__main__":
    main()
