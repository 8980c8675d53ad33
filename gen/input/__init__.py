"""Input, the first stage: caption files (JSON lines, plain or compressed, or parquet, or a
stream) -> a Caption per good record, a Reject with file, line and reason per bad one."""
