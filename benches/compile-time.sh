#!/bin/sh
# Compile time and binary size of #[cached] against the `cached` crate and plain fns.
# The benchmark is benches/compile-time.py (python3); see it, or BENCHMARKS.md, for the method.
exec python3 "$(dirname "$0")/compile-time.py" "$@"
