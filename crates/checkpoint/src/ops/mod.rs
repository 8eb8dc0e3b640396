//! The node's halves of podmigrate's two operations, one file each, free of any container
//! runtime's types: the shim adapts them to containerd.

pub mod checkpoint;
pub mod postcopy;
pub mod restore;

/// `pod <namespace>/<pod> container <name>`: how messages and logs name a container.
pub fn describe(namespace: &str, pod: &str, container: &str) -> String {
    format!("pod {namespace}/{pod} container {container}")
}
