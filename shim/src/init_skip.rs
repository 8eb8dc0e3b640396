//! An init container that already ran, skipped: the pod replaces a departed pod whose init
//! containers had all finished, and whose checkpoint (its emptyDir volumes included) holds what
//! they did. Run again, one could undo that: an init container that fills a volume would leave
//! it filled before the restore, which then leaves a volume it finds filled alone.
//!
//! kubelet still creates and starts the container (its status says it completed); only its
//! process is replaced, in the bundle's OCI spec, by a program that exits 0 at once: a
//! 129-byte static executable (the `exit` system call, nothing else) that the shim writes into
//! its work directory and binds, read-only, into the container. The image needs nothing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where the program appears inside the container.
pub const IN_CONTAINER: &str = "/.podmigrate-init-done";
/// Its name in the work directory.
const IN_WORK_DIR: &str = "init-done";

#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("skipping init containers needs an x86-64 node, not {0}")]
    Arch(&'static str),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is no OCI spec with a process: {why}")]
    Spec { path: PathBuf, why: String },
}

/// An ELF64 x86-64 executable: one program header loading the file at 0x400000, entry at
/// byte 120: `xor edi, edi; mov eax, 60; syscall` (exit(0)).
fn exit_zero_program() -> Result<Vec<u8>, SkipError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(SkipError::Arch(std::env::consts::ARCH));
    }
    const BASE: u64 = 0x40_0000;
    const CODE: [u8; 9] = [0x31, 0xff, 0xb8, 0x3c, 0x00, 0x00, 0x00, 0x0f, 0x05];
    let size = 64 + 56 + CODE.len() as u64;
    let mut elf = Vec::with_capacity(size as usize);
    // ELF header: magic, 64-bit, little-endian, version 1, System V.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(BASE + 120).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                    // Program header: PT_LOAD, readable and executable, the whole file.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&CODE);
    Ok(elf)
}

/// The program in `work_dir`, written if missing (by a temporary name and a rename, so a
/// concurrent Create never runs half a file).
fn program(work_dir: &Path) -> Result<PathBuf, SkipError> {
    let path = work_dir.join(IN_WORK_DIR);
    let bytes = exit_zero_program()?;
    if fs::read(&path).is_ok_and(|on_disk| on_disk == bytes) {
        return Ok(path);
    }
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| SkipError::Io { op, path, source }
    };
    let temp = work_dir.join(format!(".{IN_WORK_DIR}.{}", std::process::id()));
    let mut file = fs::File::create(&temp).map_err(io("creating", &temp))?;
    file.write_all(&bytes).map_err(io("writing", &temp))?;
    file.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(io("making executable", &temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io("renaming into", &path))?;
    Ok(path)
}

/// Rewrites the OCI spec in `bundle` so that the container's process exits 0 at once.
pub fn skip(bundle: &Path, work_dir: &Path) -> Result<(), SkipError> {
    let program = program(work_dir)?;
    let path = bundle.join("config.json");
    let raw = fs::read(&path).map_err(|source| SkipError::Io {
        op: "reading",
        path: path.clone(),
        source,
    })?;
    let mut spec: Value = serde_json::from_slice(&raw).map_err(|e| SkipError::Spec {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let process = spec
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| SkipError::Spec {
            path: path.clone(),
            why: "no process".into(),
        })?;
    process.insert("args".into(), json!([IN_CONTAINER]));
    process.remove("commandLine");
    let mounts = spec
        .as_object_mut()
        .map(|s| s.entry("mounts").or_insert_with(|| json!([])))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| SkipError::Spec {
            path: path.clone(),
            why: "mounts is not a list".into(),
        })?;
    mounts.push(json!({
        "destination": IN_CONTAINER,
        "type": "bind",
        "source": program,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }));
    let text = serde_json::to_vec(&spec).map_err(|e| SkipError::Spec {
        path: path.clone(),
        why: e.to_string(),
    })?;
    fs::write(&path, text).map_err(|source| SkipError::Io {
        op: "writing",
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_program_exits_zero_and_the_spec_runs_it() {
        let work = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        fs::write(
            bundle.path().join("config.json"),
            r#"{"process":{"args":["/bin/setup","--fill"],"cwd":"/"},"mounts":[{"destination":"/proc","type":"proc"}]}"#,
        )
        .unwrap();
        skip(bundle.path(), work.path()).unwrap();
        skip(bundle.path(), work.path()).unwrap_or_else(|e| panic!("twice: {e}"));
        let program = work.path().join(IN_WORK_DIR);
        assert_eq!(fs::metadata(&program).unwrap().len(), 129);
        let status = std::process::Command::new(&program).status().unwrap();
        assert_eq!(status.code(), Some(0));

        let spec: Value =
            serde_json::from_slice(&fs::read(bundle.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(spec["process"]["args"], json!([IN_CONTAINER]));
        assert_eq!(spec["process"]["cwd"], "/");
        let mounts = spec["mounts"].as_array().unwrap();
        assert_eq!(mounts[0]["destination"], "/proc");
        assert_eq!(mounts.last().unwrap()["destination"], IN_CONTAINER);
        assert_eq!(
            mounts.last().unwrap()["source"],
            program.display().to_string()
        );
    }
}
