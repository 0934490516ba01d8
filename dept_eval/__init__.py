"""Evaluate any saved adapter (text or vision-language) on any task: the `dept-eval` command."""
