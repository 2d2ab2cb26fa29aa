# shellcheck shell=bash
# Helpers the benchmark scripts share (sourced, never run).

# timed CMD... — runs it; prints its wall seconds and the CPU seconds it and its children used.
timed() {
  python3 -c 'import resource, subprocess, sys, time
t = time.monotonic(); subprocess.run(sys.argv[1:], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{time.monotonic() - t:.2f} {r.ru_utime + r.ru_stime:.2f}")' "$@"
}
