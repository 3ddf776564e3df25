//! What the block crate's integration tests share: running QEMU's tools, the oracles.

#![allow(unused_imports)] // each test file uses a different part

pub use testkit::tools::ok;
pub use testkit::tools::path_str as s;
pub use testkit::tools::run;
