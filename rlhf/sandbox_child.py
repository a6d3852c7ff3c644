"""The child process of `tuneyard.rlhf.sandbox.run_tool`: read {"function": "module:qualname", "arguments": {...}}
from stdin, call it, and write one JSON line to stdout: {"ok": true, "result": ...} or {"ok": false, "type": ...,
"error": ...}. What the tool prints goes to stderr, so it cannot forge the result line."""

from __future__ import annotations

import importlib
import json
import sys


def main() -> None:
    """Run one tool call."""
    request = json.loads(sys.stdin.read())
    result_stream, sys.stdout = sys.stdout, sys.stderr
    try:
        module, _, name = request["function"].partition(":")
        function = importlib.import_module(module)
        for part in name.split("."):
            function = getattr(function, part)
        answer = {"ok": True, "result": function(**request["arguments"])}
        line = json.dumps(answer, default=str)
    except BaseException as exc:  # every failure of the tool is the model's error turn, MemoryError included
        line = json.dumps({"ok": False, "type": type(exc).__name__, "error": " ".join(str(exc).split())[:500]})
    result_stream.write(line + "\n")
    result_stream.flush()


if __name__ == "__main__":
    main()
