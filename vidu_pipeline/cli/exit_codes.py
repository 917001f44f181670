"""The command's exit codes, in a module of their own so every command module can return
them without importing the parser."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CAPPED = 0, 1, 2, 3  # a signal: 128 + its number (130, 143)
