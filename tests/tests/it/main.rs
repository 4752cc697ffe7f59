//! Integration tests of the test kit.
