"""(placeholder: CPU-capable distributed launch; filled by the evaluation-tools issue)."""
