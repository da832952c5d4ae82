//! wgice `signaling`: see docs/architecture.md. Filled in by its own issue.
