//! The container's rootfs mounts, as containerd hands them to Create: an overlay whose upper
//! directory holds all of the container's own writes, over the image's layers.

use std::path::PathBuf;

use containerd_shim::protos::types::mount::Mount;

/// The container's overlay upper directory, where all of its own writes are.
pub fn upperdir(rootfs: &[Mount]) -> Option<PathBuf> {
    overlay_options(rootfs).find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
}

/// The image's layers under the container's overlay, topmost first: a diff may carry set-id
/// bits and xattrs only where these already have them.
pub fn lowerdirs(rootfs: &[Mount]) -> Vec<PathBuf> {
    overlay_options(rootfs)
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|dirs| dirs.split(':'))
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn overlay_options(rootfs: &[Mount]) -> impl Iterator<Item = &str> {
    rootfs
        .iter()
        .filter(|m| m.type_ == "overlay")
        .flat_map(|m| m.options.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(type_: &str, options: &[&str]) -> Mount {
        Mount {
            type_: type_.to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_overlay_names_its_upper_directory_and_layers_topmost_first() {
        let rootfs = [
            mount("bind", &["upperdir=/not/an/overlay"]),
            mount(
                "overlay",
                &[
                    "workdir=/w",
                    "upperdir=/u",
                    "lowerdir=/l/3:/l/2::/l/1",
                    "index=off",
                ],
            ),
        ];
        assert_eq!(upperdir(&rootfs), Some(PathBuf::from("/u")));
        assert_eq!(
            lowerdirs(&rootfs),
            ["/l/3", "/l/2", "/l/1"].map(PathBuf::from)
        );
    }

    #[test]
    fn a_rootfs_without_an_overlay_has_neither() {
        let rootfs = [mount("bind", &["rbind", "rw"])];
        assert_eq!(upperdir(&rootfs), None);
        assert!(lowerdirs(&rootfs).is_empty());
    }
}
