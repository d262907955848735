# probe.py with the escalation acting only at checks from step LATE on: LATE=10 probe_late.py PLAN OUT [SETTINGS]
import os, sys, runtime.guards.saferedir as sr
LATE = int(os.environ.get("LATE", "10"))
orig = sr.SafeRedir._check
def _check(self, ctx, i, t, x, rep):
    keep = self.escalate_threshold
    if i < LATE:
        self.escalate_threshold = 2.0
    try:
        orig(self, ctx, i, t, x, rep)
    finally:
        self.escalate_threshold = keep
sr.SafeRedir._check = _check

exec(open("bench/results/recheck_dev/probe.py").read())
