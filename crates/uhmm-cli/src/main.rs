//! The uhmm command.
fn main() {}
