"""Worker processes: `process` runs inside the child; `handle` is the daemon's side of it."""
