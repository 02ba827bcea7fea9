"""gpu_check.sh: one summary.json line for a part (the last JSON-object line its log got after OFFSET).

Usage: summary_line.py PART RC SECONDS LIMIT LOG NOTE OFFSET
"""

import json
import sys

part, rc, secs, limit, log, note, offset = sys.argv[1:8]
result = tail = None
try:
    f = open(log, errors="replace")
    f.seek(int(offset))  # only this run's lines (two runs may share a log)
    tail = None
    for line in f:
        line = line.strip()
        if line and not line.startswith("[gpu_check]"):
            tail = line[-300:]
        if line.startswith("{") and line.endswith("}"):
            try:
                result = json.loads(line)
            except ValueError:
                pass
except OSError:
    pass
rc = int(rc)
print(json.dumps({"part": part, "rc": rc, "ok": rc == 0, "timed_out": rc in (124, 137), "s": float(secs),
                  "limit_s": int(limit), "note": note, "result": result,
                  "last_line": tail if result is None else None}))
