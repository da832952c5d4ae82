//! Shared test helpers.
#![allow(dead_code)]

pub(crate) use netsim::require_root;
