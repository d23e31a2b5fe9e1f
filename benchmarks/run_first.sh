#!/usr/bin/env bash
# Run a benchmark ahead of everything else on a shared machine: in a session (and so a
# scheduler autogroup) of its own at nice -20. Linux gives each autogroup a fair share of the
# CPU whatever the nice values inside the others, so plain `nice` cannot do this; root (or
# CAP_SYS_NICE) can lower an autogroup's nice. Elsewhere the command runs as it is, with a note.
#   bash benchmarks/run_first.sh python benchmarks/prepare_speed.py --long-tail ...
exec setsid bash -c '
  if ! { echo -20 > /proc/self/autogroup; } 2>/dev/null; then
    echo "run_first: cannot raise the priority (not root, or no autogroups): running as is" >&2
  fi
  exec nice -n -20 "$@"  # without the right to, nice warns and runs it as is
' run_first "$@"
