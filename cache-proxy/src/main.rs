//! spotrun cache proxy
fn main() {}
