//! Everything placed in guest memory before the first vCPU runs.

pub mod mptable;
