//! The four programs' command lines, as data: the binaries parse them, and the
//! tests generate the man pages and shell completions in `contrib/` from them.
//!
//! Doc comments here are the programs' `--help` text (clap reads them), so not
//! every field and type carries one: those that would only repeat the help are left
//! without.
#![allow(missing_docs)]

pub mod egress_window;
pub mod knock;
pub mod knockgate;
pub mod knockgated;
