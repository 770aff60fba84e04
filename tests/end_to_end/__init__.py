"""Examples and the CLI in subprocesses, DDP and FSDP runs on several processes, and the shape of the package."""
