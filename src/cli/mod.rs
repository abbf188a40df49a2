//! The subcommands of the `waterbear` binary, one module each: parsing their flags and
//! turning results into output and exit codes. The work is in the library.

pub(crate) mod bench;
pub(crate) mod ctl;
pub(crate) mod host;
pub(crate) mod vm;
