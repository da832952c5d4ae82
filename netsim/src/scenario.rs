//! Scenario files (TOML).
