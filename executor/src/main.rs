//! spotrun executor
fn main() {}
