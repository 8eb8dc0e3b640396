//! Shared helpers for the end-to-end suites.
//!
//! * [`bundle`]: OCI runtime bundles with a busybox-static rootfs.
//! * [`cluster`]: the real two-node Kubernetes cluster of scripts/local-up-cluster.sh, one namespace per test.
//! * [`cli`]: `kubectl migrate` runs and their summary line.
//! * [`counter`]: the test app's containers and its HTTP side.
//! * [`drain`]: `kubectl drain` and cordons undone at the end, the pods a controller runs on a
//!   node, Jobs completing, departure records.
//! * [`harness`]: skip checks, bounded waits, cleanup guards and locating workspace binaries.
//! * [`oci`]: OCI image-layout tarballs built locally (pause, busybox, counter) for `ctr import`.
//! * [`containerd`]: a private containerd with the CRI plugin, cleaned up on drop.
//! * [`cri`]: a CRI client that plays kubelet.
//! * [`loopfs`]: small loop-mounted ext4 filesystems to fill, fail read-only or unmount.
//! * [`netns`]: network namespaces joined to the host by veth pairs, for the SMB suite.
//! * [`smb`]: a private smbd and per-node FUSE (smbnetfs) mounts of its share, for the nodes.
//! * [`migrate`]: containerd's Tasks API (checkpoint), the counter's HTTP side and the `podmigrate` CLI.

pub mod bundle;
pub mod cli;
pub mod cluster;
pub mod containerd;
pub mod counter;
pub mod cri;
pub mod drain;
pub mod harness;
pub mod loopfs;
pub mod migrate;
pub mod netns;
pub mod oci;
pub mod smb;
