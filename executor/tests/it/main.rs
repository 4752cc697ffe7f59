//! Integration tests of spotrun-executor (driven through the runner harness against the emulator).
