//! `netsim` command line.
fn main() {}
