//! Logger set-up.
