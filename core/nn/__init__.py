"""Building blocks with no I/O: the shared backbone, heads, TaskModel."""
