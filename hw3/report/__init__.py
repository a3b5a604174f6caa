"""The report: results.json into report.md and report.pdf."""
