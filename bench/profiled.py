"""Run a command-line entry point under cProfile; SIGUSR1 writes the statistics so far.

Usage: python bench/profiled.py OUTFILE -m MODULE [ARGS...]

`python -m cProfile` cannot be used for ksproxy: twistd ends by re-raising SIGTERM/SIGINT on itself, so
cProfile never gets to write its file.  run.py --profile sends SIGUSR1 after the load instead.
"""

import cProfile
import runpy
import signal
import sys


def main():
    out, flag, module = sys.argv[1], sys.argv[2], sys.argv[3]
    if flag != "-m":
        sys.exit(__doc__)
    sys.argv = [module] + sys.argv[4:]
    prof = cProfile.Profile()

    def dump(signum, frame):
        prof.disable()
        prof.dump_stats(out)
        prof.enable()

    signal.signal(signal.SIGUSR1, dump)
    prof.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
