//! A real SMB share for the nodes: a private `smbd` listening on the host side of the nodes'
//! veth links, mounted on every node through FUSE (`smbnetfs`, libsmbclient) whose SMB client
//! runs in that node's network namespace, so every byte a node writes to the share crosses its
//! own link to the server, as on a cluster.
//!
//! * **Server.** `smbd` with its own `smb.conf`, state, lock, cache, pid and private directories
//!   under the given root, `bind interfaces only` on the given addresses (port 445 on those
//!   addresses only; nothing else on the machine is touched), a private tdbsam password database
//!   holding one SMB account (`root`, a random password) and one share, `[podmigrate]`, backed by
//!   `<root>/data`. It runs as its own process group, which drop terminates.
//! * **Mounts.** `smbnetfs -f` in the node's network namespace only (setns(CLONE_NEWNET) before
//!   exec, as `nsenter --net` does): the FUSE mount stays in the host's mount namespace, where the
//!   node's containerd, shims and agent see it. (`ip netns exec` would unshare the mount
//!   namespace too and hide the mount from everyone else.) The share appears at
//!   `<mountpoint>/<server address>/podmigrate`. FUSE entry and attribute caching is off
//!   (`entry_timeout=0,attr_timeout=0`): a reader must never act on a name or size it cached
//!   before the writer's rename. `big_writes,max_write=131072`: FUSE 2 otherwise hands writes
//!   over 4 KiB at a time, each an SMB round trip (8x slower, docs/operations.md). Drop
//!   unmounts it (`fusermount3 -u`, else `umount -l`) and reaps
//!   the daemon.
//!
//! Why smbnetfs and not `rclone mount`: see docs/operations.md ("The share over SMB").

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{find_in_path, run_bounded};

/// The share's name on the server.
pub const SHARE_NAME: &str = "podmigrate";
/// The SMB account (a samba account mapped to the Unix root, in our private passdb only).
const SMB_USER: &str = "root";

/// Why the SMB share cannot be set up here, if it cannot.
pub fn skip_reason() -> Option<String> {
    for tool in ["smbd", "smbpasswd", "smbnetfs", "fusermount3"] {
        if find_in_path(tool).is_none() {
            return Some(format!("`{tool}` not found (scripts/setup.sh installs it)"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    None
}

/// A private `smbd`; stopped on drop.
pub struct SmbServer {
    /// What the share holds, as the server sees it (the host's view of the share).
    pub data: PathBuf,
    pub addrs: Vec<Ipv4Addr>,
    pub log: PathBuf,
    password: String,
    child: Option<Child>,
}

impl SmbServer {
    /// Starts `smbd` on `addrs` (port 445 of each), its files under `root`, and waits until it
    /// accepts connections on every address.
    pub fn start(root: &Path, addrs: &[Ipv4Addr]) -> Result<SmbServer> {
        ensure!(
            !addrs.is_empty(),
            "smbd needs at least one address to listen on"
        );
        let dirs = [
            "data", "lock", "state", "cache", "pid", "private", "ncalrpc", "log",
        ];
        for d in dirs {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        let data = root.join("data");
        let log = root.join("log").join("smbd.log");
        let conf = root.join("smb.conf");
        let interfaces: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        let r = root.display();
        let text = format!(
            "[global]
  server role = standalone server
  interfaces = {interfaces}
  bind interfaces only = yes
  smb ports = 445
  disable netbios = yes
  server min protocol = SMB2_10
  lock directory = {r}/lock
  state directory = {r}/state
  cache directory = {r}/cache
  pid directory = {r}/pid
  private dir = {r}/private
  ncalrpc dir = {r}/ncalrpc
  passdb backend = tdbsam:{r}/private/passdb.tdb
  log file = {log}
  log level = 1
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  # A client's fsync is the server's fsync (the default, stated because the commit relies on it).
  strict sync = yes
[{SHARE_NAME}]
  path = {data}
  read only = no
  valid users = {SMB_USER}
",
            interfaces = interfaces.join(" "),
            log = log.display(),
            data = data.display(),
        );
        fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;

        let password = random_hex(12)?;
        let mut smbpasswd = Command::new("smbpasswd")
            .arg("-c")
            .arg(&conf)
            .args(["-s", "-a", SMB_USER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning smbpasswd")?;
        smbpasswd
            .stdin
            .take()
            .context("smbpasswd's stdin")?
            .write_all(format!("{password}\n{password}\n").as_bytes())?;
        let out = smbpasswd.wait_with_output()?;
        ensure!(
            out.status.success(),
            "smbpasswd -a {SMB_USER} in {}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );

        let stdout = fs::File::create(root.join("log").join("smbd.out"))?;
        let child = Command::new("smbd")
            .arg("-s")
            .arg(&conf)
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout)
            // Without --no-process-group smbd calls setsid(): it leads its own session and
            // process group (it forks a child per client), which drop ends as a whole.
            .spawn()
            .context("spawning smbd")?;
        let mut server = SmbServer {
            data,
            addrs: addrs.to_vec(),
            log,
            password,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for addr in addrs {
            let sock = SocketAddr::from((*addr, 445));
            while TcpStream::connect_timeout(&sock, Duration::from_millis(500)).is_err() {
                if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                    bail!(
                        "smbd exited ({status}) before listening on {sock}; its log:\n{}",
                        server.log_tail(20)
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "smbd does not listen on {sock} after 20s; its log:\n{}",
                        server.log_tail(20)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(server)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops smbd and its per-client children (SIGTERM to its group, SIGKILL after 5 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = child.id() as i32;
        // SAFETY: kill(2) on the process group our own unreaped child leads.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever of the group is left.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = child.wait();
    }
}

impl Drop for SmbServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One node's FUSE mount of the share; unmounted on drop.
pub struct SmbMount {
    /// Where the FUSE file system is mounted.
    pub mountpoint: PathBuf,
    /// The share itself: `<mountpoint>/<server address>/podmigrate`.
    pub share_root: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    mounted: bool,
}

impl SmbMount {
    /// Mounts the share at `<dir>/share` with smbnetfs running in network namespace `netns`
    /// (a name under /run/netns), talking to the server at `server_addr`; waits until the share
    /// answers and a file written through the mount shows up on the server.
    pub fn start(
        dir: &Path,
        netns: &str,
        server: &SmbServer,
        server_addr: Ipv4Addr,
    ) -> Result<SmbMount> {
        ensure!(
            server.addrs.contains(&server_addr),
            "smbd does not listen on {server_addr}"
        );
        // smbnetfs reads ~/.smb/{smbnetfs.conf,smb.conf}: a private HOME per mount. It refuses
        // credentials in a file others can read.
        let home = dir.join("smbnetfs");
        let smb_dir = home.join(".smb");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&smb_dir)
            .with_context(|| format!("creating {}", smb_dir.display()))?;
        let private = |name: &str, text: String| -> Result<()> {
            let path = smb_dir.join(name);
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))
        };
        private(
            "smb.conf",
            "[global]\n  client min protocol = SMB2_10\n  client max protocol = SMB3\n".into(),
        )?;
        let config = smb_dir.join("smbnetfs.conf");
        private(
            "smbnetfs.conf",
            format!(
                "smb_query_browsers \"false\"\nauth \"{server_addr}\" \"{SMB_USER}\" \"{}\"\nhost \"{server_addr}\" visible=true\n",
                server.password
            ),
        )?;
        let mountpoint = dir.join("share");
        fs::create_dir_all(&mountpoint)?;
        let log = dir.join("smbnetfs.log");
        let stderr = fs::File::create(dir.join("smbnetfs.out"))?;

        let ns_path = Path::new("/run/netns").join(netns);
        let ns = fs::File::open(&ns_path)
            .with_context(|| format!("opening network namespace {}", ns_path.display()))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
        let mut cmd = Command::new("smbnetfs");
        cmd.arg(&mountpoint)
            .arg("-f")
            .arg("-o")
            .arg(format!(
                "config={},log_file={},entry_timeout=0,attr_timeout=0,negative_timeout=0,big_writes,max_write=131072",
                config.display(),
                log.display()
            ))
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        // SAFETY: setns(2) is async-signal-safe; `ns` stays open until spawn returns. Only the
        // network namespace: the mount must land in the host's mount namespace.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning smbnetfs")?;
        drop(ns);
        let mut mount = SmbMount {
            share_root: mountpoint.join(server_addr.to_string()).join(SHARE_NAME),
            mountpoint,
            log,
            child: Some(child),
            mounted: false,
        };
        mount.wait_ready(server, Duration::from_secs(30))?;
        Ok(mount)
    }

    fn wait_ready(&mut self, server: &SmbServer, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not mounted yet");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!(
                    "smbnetfs for {} exited ({status}): {}",
                    self.mountpoint.display(),
                    fs::read_to_string(self.mountpoint.with_file_name("smbnetfs.out"))
                        .unwrap_or_default()
                        .trim()
                );
            }
            if !self.mounted {
                self.mounted = is_mountpoint(&self.mountpoint)?;
            }
            if self.mounted {
                match fs::metadata(&self.share_root) {
                    Ok(m) if m.is_dir() => break,
                    Ok(_) => last = "the share root is not a directory".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the SMB share is not usable at {} after {timeout:?}: {last}",
                    self.share_root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The mount must reach this server: a probe file written through it appears in the
        // server's directory.
        let name = format!(".probe-{}", std::process::id());
        let probe = self.share_root.join(&name);
        fs::write(&probe, b"probe").with_context(|| format!("writing {}", probe.display()))?;
        let on_server = server.data.join(&name);
        let seen = fs::read(&on_server).ok();
        fs::remove_file(&probe).with_context(|| format!("removing {}", probe.display()))?;
        ensure!(
            seen.as_deref() == Some(b"probe".as_slice()),
            "{} was written through {} but the server's {} shows {seen:?}",
            probe.display(),
            self.mountpoint.display(),
            on_server.display()
        );
        Ok(())
    }

    /// Unmounts (idempotent) and reaps smbnetfs.
    pub fn unmount(&mut self) {
        if self.mounted || is_mountpoint(&self.mountpoint).unwrap_or(false) {
            let ok = run_bounded(
                Command::new("fusermount3").arg("-u").arg(&self.mountpoint),
                Duration::from_secs(15),
            )
            .map(|o| o.status.success())
            .unwrap_or(false);
            if !ok {
                let _ = run_bounded(
                    Command::new("umount").arg("-l").arg(&self.mountpoint),
                    Duration::from_secs(15),
                );
            }
            self.mounted = false;
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: kill(2) on the process group of our own unreaped child (smbnetfs forks
            // one worker per server connection).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for SmbMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mountpoint(path: &Path) -> Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    Ok(info
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str())))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::io::Read::read_exact(
        &mut fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut buf,
    )?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A server and one mount per node: what the SMB share suite uses.
/// Mounts drop before the server.
pub struct SmbShare {
    pub mounts: Vec<SmbMount>,
    pub server: SmbServer,
}

impl SmbShare {
    /// `smbd` under `<root>/smbd` on every node's host-side address, and for each node
    /// `(name, netns, host address)` a mount under `<root>/<name>` that talks to its own host
    /// address from inside its namespace.
    pub fn start(root: &Path, nodes: &[(&str, &str, Ipv4Addr)]) -> Result<SmbShare> {
        let addrs: Vec<Ipv4Addr> = nodes.iter().map(|n| n.2).collect();
        let server = SmbServer::start(&root.join("smbd"), &addrs)?;
        let mut share = SmbShare {
            mounts: Vec::new(),
            server,
        };
        for (name, netns, addr) in nodes {
            let mount = SmbMount::start(&root.join(name), netns, &share.server, *addr)
                .with_context(|| format!("mounting the SMB share on {name}"))?;
            share.mounts.push(mount);
        }
        Ok(share)
    }
}
