"""Command-line tools that work on finished (or running) run directories."""
