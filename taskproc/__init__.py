"""taskproc: durable multi-step AI workflows."""
