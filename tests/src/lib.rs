//! Shared helpers for the end-to-end suites.
//!
//! * [`bundle`]: OCI runtime bundles with a busybox-static rootfs.
//! * [`harness`]: skip checks, bounded waits, cleanup guards and locating workspace binaries.

pub mod bundle;
pub mod harness;
