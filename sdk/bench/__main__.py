"""Worker entry: python -m edgeact.bench --worker SPEC_JSON (started by `edgeact bench`)."""
import json
import sys

from .subjects import serve_one

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    serve_one(json.loads(sys.argv[2]))
else:
    sys.exit("usage: python -m edgeact.bench --worker SPEC_JSON (use `edgeact bench` instead)")
