#!/usr/bin/env bash
# Run the test suite N times in a row (default 20) and report the runs that
# failed, with the tests that failed in each.  It exits 1 if any run failed.
#
#   tests/soak.sh            20 runs of `python -m pytest -q`
#   tests/soak.sh 5          5 runs
#   tests/soak.sh 5 -n auto  5 runs, pytest's arguments after N
#
# Each run's output is kept in $SOAK_DIR (default: a new temporary directory).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs="${1:-20}"
shift || true
case "$runs" in
    '' | *[!0-9]*) echo "usage: tests/soak.sh [N] [pytest arguments...]" >&2; exit 2 ;;
esac

dir="${SOAK_DIR:-$(mktemp -d -t llmproxy-soak-XXXXXX)}"
mkdir -p "$dir"
failed=()
started=$SECONDS

for ((i = 1; i <= runs; i++)); do
    out="$dir/run-$i.txt"
    run_started=$SECONDS
    if python -m pytest -q -p no:cacheprovider "$@" >"$out" 2>&1; then
        verdict="passed"
    else
        verdict="FAILED"
        failed+=("$i")
    fi
    printf 'run %d/%d: %s in %ds: %s\n' "$i" "$runs" "$verdict" "$((SECONDS - run_started))" \
        "$(tail -n 1 "$out")"
    if [ "$verdict" = FAILED ]; then
        grep -E '^(FAILED|ERROR) ' "$out" | sed 's/^/    /'
    fi
done

printf '\n%d runs in %ds, %d failed%s; output in %s\n' "$runs" "$((SECONDS - started))" \
    "${#failed[@]}" "${failed[*]:+ (runs ${failed[*]})}" "$dir"
[ "${#failed[@]}" -eq 0 ]
