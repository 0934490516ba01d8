"""DePT: Decomposed Prompt Tuning (ICLR 2024)."""
