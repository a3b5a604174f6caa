"""The one-command pipeline: stages with records of their inputs and outputs, skipped only when still true."""
