#!/usr/bin/env python3
"""Compile-time and binary-size cost of `#[cached]`, against the `cached` crate and plain fns.

Generates standalone crates (each its own `[workspace]`, outside the source tree) with N
`async fn f{i}(id: u64) -> Result<Out, Error>` in several variants, builds each one with its
dependencies already built, and reports build wall time, build CPU time and binary size, and
the marginal cost per annotated function.

    benches/compile-time.sh [--quick] [--n 10,100,300] [--reps 3]
                            [--variants plain,ours,ours-lock,cached,cached-redis]
                            [--shapes shared,distinct] [--profiles release,debug]
                            [--main table|seq] [--dir DIR] [--json FILE]
                            [--llvm-lines [--llvm-lines-n N] [--llvm-lines-top K]]

Variants (the same fns; only the attribute differs):

  plain       no attribute
  ours        #[cache_runtime::cached(key = "f{i}:{id}", ttl = 60)]
  ours-lock   #[cache_runtime::cached(key = "f{i}:{id}", ttl = 60, lock)]
  cached      #[cached::macros::cached(ttl_secs = 60)]: the `cached` crate 4.1's attribute of
              the same name, in-process (an `Err` is not cached). The acceptance figures for
              "the `cached` crate's attribute" (0.054 s and 3.5 KB per fn; 0.16 s and 7.7 KB with
              distinct types) match this one, not the Redis one.
  cached-redis
              #[cached::macros::concurrent_cached(redis = true, ttl_secs = 60, map_error = ..)]:
              its Redis-backed async attribute, as benches/compare.rs uses it.

Shapes: `shared` (every fn returns `Result<Out, Error>`), `distinct` (fn i returns
`Result<Out{i}, Error>`, one struct per fn). Every struct derives Debug, Clone, Serialize and
Deserialize in every variant, so the derive cost is the same everywhere. Each fn's body differs
(a constant), so that no two are identical and merged.

`main` calls every fn once, in a current-thread Tokio runtime, so that nothing is discarded.
By default (`--main seq`) one async block awaits them one after another, which is what the
acceptance test did (its per-fn sizes, 30 KB against 3.5 KB, are what this shape measures):
every fn's future is inlined into that one poll function. `--main table` calls them through a
static table of fn pointers returning boxed futures, so that each fn's code stays in functions
of its own: less inlining, smaller binaries, and no N-sized function for the optimizer.

Method: one target directory per dependency set (shared by its crates, so dependencies build
once per variant and profile); a warm-up crate builds the dependencies first. Each measurement
touches src/main.rs and runs `cargo build [--release]` with CARGO_INCREMENTAL=0, so it is a
full rebuild of the generated crate and nothing else (a measurement that compiled anything
else is discarded and repeated). Rounds are interleaved (every crate once per round, order
rotated) and each figure is the median over rounds. Marginal cost per function is
(value(N_max) - value(N_min)) / (N_max - N_min), reported gross and net of `plain`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
ALL_VARIANTS = ["plain", "ours", "ours-lock", "cached", "cached-redis"]
ALL_SHAPES = ["shared", "distinct"]
ALL_PROFILES = ["release", "debug"]
CACHED_VARIANTS = ["cached", "cached-redis"]

# What each variant puts on fn i (`{i}`), and the dependencies it adds.
ATTRIBUTES = {
    "plain": "",
    "ours": '#[cache_runtime::cached(key = "f{i}:{{id}}", ttl = 60)]',
    "ours-lock": '#[cache_runtime::cached(key = "f{i}:{{id}}", ttl = 60, lock)]',
    "cached": "#[cached::macros::cached(ttl_secs = 60)]",
    "cached-redis": (
        "#[cached::macros::concurrent_cached(redis = true, ttl_secs = 60, "
        'map_error = |e| Error(format!("{{e:?}}")))]'
    ),
}
DESCRIPTIONS = {
    "plain": "no attribute",
    "ours": '`#[cache_runtime::cached(key = "f{i}:{id}", ttl = 60)]`',
    "ours-lock": '`#[cache_runtime::cached(key = "f{i}:{id}", ttl = 60, lock)]`',
    "cached": "`cached` 4.1 `#[cached(ttl_secs = 60)]` (in-process)",
    "cached-redis": "`cached` 4.1 `#[concurrent_cached(redis = true, ttl_secs = 60, map_error = ..)]`",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- lock file versions ------------------------------------------------------------------


def locked_version(lock: str, name: str) -> str:
    m = re.search(rf'\[\[package\]\]\nname = "{re.escape(name)}"\nversion = "([^"]+)"', lock)
    if not m:
        sys.exit(f"{name} is not in {ROOT / 'Cargo.lock'}")
    return m.group(1)


def dependencies(variant: str, versions: dict[str, str]) -> str:
    deps = [
        f'serde = {{ version = "={versions["serde"]}", features = ["derive"] }}',
        # The features the workspace uses.
        f'tokio = {{ version = "={versions["tokio"]}", features = ["rt", "sync", "time", "macros"] }}',
    ]
    if variant.startswith("ours"):
        deps.append(f'cache-runtime = {{ path = "{ROOT / "cache-runtime"}" }}')
    elif variant == "cached":
        deps.append(
            f'cached = {{ version = "={versions["cached"]}", default-features = false, '
            'features = ["proc_macro", "async", "time_stores"] }'
        )
    elif variant == "cached-redis":
        # As benches/Cargo.toml has it.
        deps.append(
            f'cached = {{ version = "={versions["cached"]}", default-features = false, '
            'features = ["proc_macro", "redis_tokio"] }'
        )
    return "\n".join(deps)


# ---- generation --------------------------------------------------------------------------


def package_name(variant: str, shape: str, n: int, main: str) -> str:
    suffix = "" if main == "seq" else f"_{main}"
    return f"ct_{variant.replace('-', '_')}_{shape}_{n}{suffix}"


def main_rs(variant: str, shape: str, n: int, main: str) -> str:
    out = []
    out.append(f"//! Generated by benches/compile-time.py: variant {variant}, shape {shape}, {n} fns, "
               f"main {main}.\n")
    out.append("#![allow(dead_code, clippy::all)]\n")
    out.append("use serde::{Deserialize, Serialize};\n\n")
    out.append("#[derive(Debug, Clone)]\npub struct Error(pub String);\n\n")
    out.append(
        "impl std::fmt::Display for Error {\n"
        "    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {\n"
        "        f.write_str(&self.0)\n    }\n}\n\n"
        "impl std::error::Error for Error {}\n\n"
    )
    struct = (
        "#[derive(Debug, Clone, Serialize, Deserialize)]\n"
        "pub struct {name} {{\n    pub id: u64,\n    pub name: String,\n    pub score: f64,\n}}\n\n"
    )
    if shape == "shared":
        out.append(struct.format(name="Out"))
    attr = ATTRIBUTES[variant]
    for i in range(n):
        ty = "Out" if shape == "shared" else f"Out{i}"
        if shape == "distinct":
            out.append(struct.format(name=ty))
        if attr:
            out.append(attr.format(i=i) + "\n")
        # The body differs per fn (a constant), so that no two fns are identical and merged.
        out.append(
            f"pub async fn f{i}(id: u64) -> Result<{ty}, Error> {{\n"
            f'    Ok({ty} {{ id: id.wrapping_mul({i + 3}), name: String::from("f{i}"), score: {i}.5 }})\n'
            "}\n\n"
        )
    runtime = (
        "    let rt = tokio::runtime::Builder::new_current_thread()\n"
        "        .enable_all()\n        .build()\n        .expect(\"runtime\");\n"
    )
    if main == "table":
        # Each fn is called through a fn pointer to a boxed future, so its code stays in its
        # own functions (no N-sized function for the optimizer).
        out.append("type Call = fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool>>>;\n\n")
        out.append(f"static CALLS: [Call; {n}] = [\n")
        for i in range(n):
            out.append(f"    |id| Box::pin(async move {{ f{i}(id).await.is_ok() }}),\n")
        out.append("];\n\nfn main() {\n" + runtime)
        out.append(
            "    let ok = rt.block_on(async {\n        let mut ok = 0u64;\n"
            "        for (i, call) in std::hint::black_box(&CALLS).iter().enumerate() {\n"
            "            ok += call(i as u64).await as u64;\n        }\n        ok\n    });\n"
            '    println!("{ok}");\n}\n'
        )
    else:
        # One async block awaiting every fn in turn: every future is inlined into one poll fn.
        out.append("fn main() {\n" + runtime + "    rt.block_on(async {\n        let mut ok = 0u64;\n")
        for i in range(n):
            out.append(f"        ok += std::hint::black_box(f{i}(std::hint::black_box({i})).await).is_ok() as u64;\n")
        out.append('        println!("{ok}");\n    });\n}\n')
    return "".join(out)


def write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def generate(scratch: Path, variant: str, shape: str, n: int, main: str, versions: dict[str, str],
             name: str | None = None) -> Path:
    name = name or package_name(variant, shape, n, main)
    crate = scratch / "crates" / name
    write_if_changed(
        crate / "Cargo.toml",
        f"""# Generated by benches/compile-time.py.
[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# Standalone: not a member of the cache-runtime workspace.
[workspace]

[dependencies]
{dependencies(variant, versions)}
""",
    )
    write_if_changed(crate / "src" / "main.rs", main_rs(variant, shape, n, main))
    if not (crate / "Cargo.lock").exists():
        # The workspace's versions; cargo drops what this crate does not use.
        shutil.copy(ROOT / "Cargo.lock", crate / "Cargo.lock")
    return crate


# ---- building ----------------------------------------------------------------------------


def target_dir(scratch: Path, variant: str) -> Path:
    # One per dependency set: `ours-lock` has `ours`'s.
    return scratch / f"target-{'ours' if variant == 'ours-lock' else variant}"


def cargo_env(scratch: Path, variant: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CARGO_TARGET_DIR"] = str(target_dir(scratch, variant))
    env["CARGO_INCREMENTAL"] = "0"
    env.pop("CARGO_BUILD_TARGET_DIR", None)
    return env


def cargo_build(crate: Path, scratch: Path, variant: str, profile: str) -> tuple[float, float, str]:
    """Runs `cargo build`; returns (wall s, CPU s of cargo and everything it ran, stderr)."""
    cmd = ["cargo", "build", "--color", "never"] + (["--release"] if profile == "release" else [])
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=crate, env=cargo_env(scratch, variant),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode != 0:
        sys.exit(f"cargo build failed in {crate}:\n{proc.stderr[-6000:]}")
    return wall, cpu, proc.stderr


def compiled_crates(stderr: str) -> list[str]:
    return re.findall(r"^\s*Compiling (\S+)", stderr, re.MULTILINE)


def touch(crate: Path) -> None:
    main = crate / "src" / "main.rs"
    now = time.time()
    os.utime(main, (now, now))


def binary(scratch: Path, variant: str, profile: str, name: str) -> Path:
    return target_dir(scratch, variant) / profile / name


def sizes(path: Path) -> dict[str, int | None]:
    result: dict[str, int | None] = {"file": path.stat().st_size, "stripped": None, "text": None}
    stripped = path.with_name(path.name + ".stripped")
    if shutil.which("strip"):
        try:
            subprocess.run(["strip", "-o", str(stripped), str(path)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result["stripped"] = stripped.stat().st_size
        except subprocess.CalledProcessError:
            pass
        finally:
            stripped.unlink(missing_ok=True)
    if shutil.which("size"):
        out = subprocess.run(["size", "-A", str(path)], capture_output=True, text=True).stdout
        m = re.search(r"^\.text\s+(\d+)", out, re.MULTILINE)
        if m:
            result["text"] = int(m.group(1))
    return result


# ---- reporting ---------------------------------------------------------------------------


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def fmt_kib(v: float | None) -> str:
    return "-" if v is None else f"{v / 1024:.1f} KiB"


def fmt_ms_per_fn(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def fmt_kib_per_fn(v: float | None) -> str:
    return "-" if v is None else f"{v / 1024:.2f} KiB"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


METRICS = [
    # key, label, formatter of a per-crate value, formatter of a per-fn value
    ("release_wall", "release wall", fmt_s, fmt_ms_per_fn),
    ("release_cpu", "release CPU", fmt_s, fmt_ms_per_fn),
    ("debug_wall", "debug wall", fmt_s, fmt_ms_per_fn),
    ("debug_cpu", "debug CPU", fmt_s, fmt_ms_per_fn),
    ("release_file", "release binary", fmt_kib, fmt_kib_per_fn),
    ("release_stripped", "release stripped", fmt_kib, fmt_kib_per_fn),
    ("release_text", "release .text", fmt_kib, fmt_kib_per_fn),
]


def crate_values(rec: dict) -> dict[str, float | None]:
    vals: dict[str, float | None] = {}
    for profile in ALL_PROFILES:
        p = rec["profiles"].get(profile)
        vals[f"{profile}_wall"] = p["wall_median"] if p else None
        vals[f"{profile}_cpu"] = p["cpu_median"] if p else None
    rel = rec["profiles"].get("release")
    for k in ("file", "stripped", "text"):
        vals[f"release_{k}"] = rel["size"][k] if rel else None
    return vals


def marginals(records: list[dict], variants: list[str], shapes: list[str], ns: list[int]) -> dict:
    """Per shape and variant: gross and net (minus plain) cost per fn, N_min to N_max."""
    lo, hi = min(ns), max(ns)
    by = {(r["variant"], r["shape"], r["n"]): crate_values(r) for r in records}
    out: dict = {}
    for shape in shapes:
        out[shape] = {}
        for variant in variants:
            a, b = by.get((variant, shape, lo)), by.get((variant, shape, hi))
            if a is None or b is None or hi == lo:
                continue
            gross = {k: (None if a[k] is None or b[k] is None else (b[k] - a[k]) / (hi - lo))
                     for k, *_ in METRICS}
            out[shape][variant] = {"gross": gross}
        plain = out[shape].get("plain")
        for variant, m in out[shape].items():
            if plain is None:
                m["net"] = None
                continue
            m["net"] = {k: (None if m["gross"][k] is None or plain["gross"][k] is None
                            else m["gross"][k] - plain["gross"][k]) for k, *_ in METRICS}
        # Ratios: each of our variants against each `cached` variant, on net figures.
        ratios = {}
        for ours in [v for v in variants if v.startswith("ours")]:
            for peer in [v for v in variants if v in CACHED_VARIANTS]:
                if ours not in out[shape] or peer not in out[shape] or out[shape][ours]["net"] is None:
                    continue
                r = {}
                for k, *_ in METRICS:
                    x, y = out[shape][ours]["net"][k], out[shape][peer]["net"][k]
                    r[k] = None if x is None or y is None or y <= 0 else x / y
                ratios[f"{ours} / {peer}"] = r
        out[shape]["_ratios"] = ratios
    return out


def report(meta: dict, records: list[dict], marg: dict, variants: list[str], shapes: list[str],
           ns: list[int]) -> str:
    lines = []
    lines.append(f"Machine: {meta['machine']}; {meta['rustc']}; commit {meta['commit']}.")
    lines.append(f"Command: `{meta['command']}`; {meta['reps']} round(s), medians; main `{meta['main']}`; "
                 "dependencies warm, CARGO_INCREMENTAL=0, one crate rebuilt per measurement. "
                 "CPU: user + system time of cargo and the compiler processes.")
    lines.append("")
    lines.append("Variants: " + "; ".join(f"`{v}`: {DESCRIPTIONS[v]}" for v in variants) + ".")
    lines.append("")
    cols = [m for m in METRICS if any(crate_values(r)[m[0]] is not None for r in records)]
    lines.append("| variant | shape | N | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|---|---|" + "---|" * len(cols))
    for r in records:
        vals = crate_values(r)
        lines.append(f"| {r['variant']} | {r['shape']} | {r['n']} | "
                     + " | ".join(c[2](vals[c[0]]) for c in cols) + " |")
    lo, hi = min(ns), max(ns)
    if lo == hi:
        return "\n".join(lines)
    lines.append("")
    lines.append(f"Marginal cost per annotated function, N = {lo} to {hi}: "
                 "net of `plain`'s (gross in parentheses; `plain`'s row is its own gross cost).")
    lines.append("")
    lines.append("| shape | variant | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for shape in shapes:
        for variant in variants:
            m = marg.get(shape, {}).get(variant)
            if m is None:
                continue
            cells = []
            for k, _, _, f in cols:
                if variant == "plain" or m["net"] is None:
                    cells.append(f(m["gross"][k]))
                else:
                    cells.append(f"{f(m['net'][k])} ({f(m['gross'][k])})")
            lines.append(f"| {shape} | {variant} | " + " | ".join(cells) + " |")
    ratio_rows = [(shape, name, r) for shape in shapes
                  for name, r in marg.get(shape, {}).get("_ratios", {}).items()]
    if ratio_rows:
        lines.append("")
        lines.append("Ratios of the net marginal costs (target: ≤ 2x the `cached` crate's in release, "
                     "time and size, and no worse in debug):")
        lines.append("")
        lines.append("| shape | ratio | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for shape, name, r in ratio_rows:
            lines.append(f"| {shape} | {name} | " + " | ".join(fmt_ratio(r[c[0]]) for c in cols) + " |")
    return "\n".join(lines)


# ---- cargo llvm-lines --------------------------------------------------------------------


def llvm_lines(scratch: Path, variant: str, shape: str, n: int, main: str, versions: dict[str, str],
               top: int) -> str | None:
    probe = subprocess.run(["cargo", "llvm-lines", "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        log("cargo llvm-lines is not installed (cargo install cargo-llvm-lines); skipping --llvm-lines")
        return None
    crate = generate(scratch, variant, shape, n, main, versions)
    log(f"cargo llvm-lines --release: {variant}, {shape}, N={n}")
    env = cargo_env(scratch, variant)
    proc = subprocess.run(["cargo", "llvm-lines", "--release", "--color", "never"],
                          cwd=crate, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"cargo llvm-lines failed:\n{proc.stderr[-4000:]}")
        return None
    out = proc.stdout.splitlines()
    # Header (column titles, a rule, the total line), then the top rows.
    head = [i for i, l in enumerate(out) if l.strip().endswith("(TOTAL)")]
    start = head[0] + 1 if head else 0
    return "\n".join(out[:start] + out[start:start + top])


# ---- main --------------------------------------------------------------------------------


def csv(kind, allowed=None):
    def parse(s: str):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if kind is int:
            return [int(x) for x in items]
        if allowed:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return items
    return parse


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="benches/compile-time.sh",
        description="Compile time and binary size of #[cached] against the cached crate and plain fns.")
    ap.add_argument("--n", type=csv(int), default=[10, 100, 300], help="fn counts (default 10,100,300)")
    ap.add_argument("--reps", type=int, default=3, help="rounds; medians (default 3)")
    ap.add_argument("--variants", type=csv(str, ALL_VARIANTS), default=list(ALL_VARIANTS),
                    help=f"default {','.join(ALL_VARIANTS)}")
    ap.add_argument("--shapes", type=csv(str, ALL_SHAPES), default=list(ALL_SHAPES),
                    help="shared: one return type for all fns; distinct: one per fn (default both)")
    ap.add_argument("--profiles", type=csv(str, ALL_PROFILES), default=list(ALL_PROFILES),
                    help="default release,debug")
    ap.add_argument("--main", choices=["seq", "table"], default="seq",
                    help="seq (default): one async block in main awaits every fn in turn; table: main "
                         "calls each fn through a table of fn pointers to boxed futures")
    ap.add_argument("--quick", action="store_true", help="N = 10,50 and 1 round")
    ap.add_argument("--dir", type=Path, default=None,
                    help='scratch directory (default "${CARGO_TARGET_DIR:-target}/compile-time")')
    ap.add_argument("--json", type=Path, default=None, help="write every figure to FILE")
    ap.add_argument("--llvm-lines", action="store_true",
                    help="also run `cargo llvm-lines --release` on the ours crate (if installed)")
    ap.add_argument("--llvm-lines-variant", choices=ALL_VARIANTS, default="ours",
                    help="the variant --llvm-lines looks at (default ours)")
    ap.add_argument("--llvm-lines-n", type=int, default=None, help="its N (default: the largest --n)")
    ap.add_argument("--llvm-lines-top", type=int, default=15, help="rows to print (default 15)")
    ap.add_argument("--llvm-lines-only", action="store_true", help="skip the measurements")
    args = ap.parse_args()
    if args.quick:
        args.n, args.reps = [10, 50], 1
    if not args.n or min(args.n) < 1 or args.reps < 1:
        ap.error("--n values and --reps must be >= 1")
    ns = sorted(set(args.n))
    variants = [v for v in ALL_VARIANTS if v in args.variants]
    shapes = [s for s in ALL_SHAPES if s in args.shapes]
    profiles = [p for p in ALL_PROFILES if p in args.profiles]

    if args.dir is not None:
        scratch = args.dir
    else:
        base = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
        scratch = (base if base.is_absolute() else ROOT / base) / "compile-time"
    scratch = scratch.resolve()
    # Never inside the source tree, except under a target directory.
    src = ROOT.resolve()
    allowed = [src / "target"]
    if os.environ.get("CARGO_TARGET_DIR"):
        allowed.append(Path(os.environ["CARGO_TARGET_DIR"]).resolve())
    if (scratch == src or src in scratch.parents) and not any(
            a == scratch or a in scratch.parents for a in allowed):
        sys.exit(f"refusing to generate crates inside the source tree ({scratch}); use --dir")
    scratch.mkdir(parents=True, exist_ok=True)

    lock = (ROOT / "Cargo.lock").read_text()
    versions = {k: locked_version(lock, k) for k in ("serde", "tokio", "cached")}
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    meta = {
        "machine": machine(),
        "rustc": rustc,
        "commit": git_commit(),
        "command": "benches/compile-time.sh " + " ".join(sys.argv[1:]),
        "reps": args.reps,
        "main": args.main,
        "versions": versions,
        "scratch": str(scratch),
    }
    log(f"scratch directory {scratch}")

    records: list[dict] = []
    if not args.llvm_lines_only:
        crates = {(v, s, n): generate(scratch, v, s, n, args.main, versions)
                  for v in variants for s in shapes for n in ns}
        for key, crate in crates.items():
            records.append({"variant": key[0], "shape": key[1], "n": key[2], "crate": str(crate),
                            "profiles": {}})
        rec_of = {(r["variant"], r["shape"], r["n"]): r for r in records}
        for profile in profiles:
            # Warm-up: build the dependencies once per variant and profile, and resolve each
            # crate's lock file, so that a measurement compiles the generated crate only.
            for v in variants:
                warm = generate(scratch, v, "shared", 1, args.main, versions,
                                name=f"ct_{v.replace('-', '_')}_warm")
                log(f"warm-up: {v} ({profile}): building dependencies")
                wall, _, _ = cargo_build(warm, scratch, v, profile)
                log(f"warm-up: {v} ({profile}) took {wall:.1f} s")
            for (v, _, _), crate in crates.items():
                subprocess.run(["cargo", "fetch", "--quiet"], cwd=crate, env=cargo_env(scratch, v),
                               check=True)
            order = list(crates)
            samples: dict = {k: {"wall": [], "cpu": []} for k in order}
            for rnd in range(args.reps):
                rot = rnd % len(order)
                for key in order[rot:] + order[:rot]:
                    v, s, n = key
                    crate = crates[key]
                    name = package_name(v, s, n, args.main)
                    for attempt in range(3):
                        touch(crate)
                        wall, cpu, stderr = cargo_build(crate, scratch, v, profile)
                        others = [c for c in compiled_crates(stderr) if c != name]
                        if not others:
                            break
                        log(f"  {name}: the build also compiled {others}; repeating")
                    else:
                        sys.exit(f"{name}: dependencies keep rebuilding; is another build sharing "
                                 f"{target_dir(scratch, v)}?")
                    samples[key]["wall"].append(wall)
                    samples[key]["cpu"].append(cpu)
                    log(f"{profile} round {rnd + 1}/{args.reps}: {v:10} {s:8} N={n:<4} "
                        f"wall {wall:7.2f} s  cpu {cpu:7.2f} s")
            for key in order:
                v, s, n = key
                rec_of[key]["profiles"][profile] = {
                    "wall_s": samples[key]["wall"],
                    "cpu_s": samples[key]["cpu"],
                    "wall_median": statistics.median(samples[key]["wall"]),
                    "cpu_median": statistics.median(samples[key]["cpu"]),
                    "size": sizes(binary(scratch, v, profile, package_name(v, s, n, args.main))),
                }

    marg = marginals(records, variants, shapes, ns) if records else {}
    if records:
        print(report(meta, records, marg, variants, shapes, ns))

    ll = {}
    if args.llvm_lines or args.llvm_lines_only:
        n = args.llvm_lines_n or max(ns)
        for s in shapes:
            v = args.llvm_lines_variant
            text = llvm_lines(scratch, v, s, n, args.main, versions, args.llvm_lines_top)
            if text is not None:
                ll[f"{v}/{s}/{n}"] = text
                print(f"\n`cargo llvm-lines --release`, {v}, shape {s}, N = {n} (top {args.llvm_lines_top}):\n")
                print("```text\n" + text + "\n```")

    if args.json:
        args.json.write_text(json.dumps(
            {"meta": meta, "crates": records, "marginal_per_fn": marg, "llvm_lines": ll}, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
