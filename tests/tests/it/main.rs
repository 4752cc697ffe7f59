//! Integration tests of the test kit.

mod harness;
mod helm;
