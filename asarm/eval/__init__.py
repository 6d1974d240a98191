"""Model-independent evaluation building blocks: sandboxed code execution and pass@k, HumanEval
infilling, ROCStories infilling with ROUGE, left-to-right task data and metrics, and statistics."""
