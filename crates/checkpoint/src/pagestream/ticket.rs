//! The per-migration secret and the ticket that carries it, with the source's address, to the
//! target.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64ct::{Base64, Encoding};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use super::PageStreamError;

/// The ticket's file name in a checkpoint directory.
pub const TICKET_FILE: &str = "pagestream.json";
/// Bytes in a [`Secret`].
pub const SECRET_LEN: usize = 32;
/// A ticket is about 150 bytes; a file much larger is not one, and is not read whole.
const MAX_TICKET_BYTES: u64 = 4096;

/// A migration's page stream secret: 32 random bytes, the Noise pre-shared key. Wiped from
/// memory on drop; `Debug` shows `Secret(..)`; serialized as base64.
#[derive(Clone)]
pub struct Secret(Zeroizing<[u8; SECRET_LEN]>);

impl Secret {
    /// A fresh secret from the system's random source.
    pub fn generate() -> Result<Secret, PageStreamError> {
        let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| PageStreamError::Random)?;
        Ok(Secret(bytes))
    }

    /// A secret from its bytes (the caller's copy is theirs to wipe).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    pub(super) fn bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(Base64::encode_string(&self.0[..]));
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        let text = Zeroizing::new(String::deserialize(deserializer)?);
        let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
        match Base64::decode(text.trim(), &mut bytes[..]) {
            Ok(decoded) if decoded.len() == SECRET_LEN => Ok(Secret(bytes)),
            // The message must not quote the text: it is the secret, or close to it.
            _ => Err(serde::de::Error::custom(
                "the secret is not the base64 of 32 bytes",
            )),
        }
    }
}

/// What the clone needs to fetch its pages: written by the source into its checkpoint
/// directory (it travels inside the archive, sealed when the node has an archive key), read by
/// the target after unpacking.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticket {
    /// The source's [`super::Server`].
    pub address: SocketAddr,
    /// The secret the server was bound with.
    pub secret: Secret,
    /// About how many bytes of pages the source will serve, for progress reports.
    pub total_bytes: u64,
}

impl Ticket {
    /// Writes `dir/`[`TICKET_FILE`], mode 0600, replacing any ticket there.
    pub fn write_to(&self, dir: &Path) -> Result<(), PageStreamError> {
        let path = dir.join(TICKET_FILE);
        let err = |op| {
            let path = path.clone();
            move |source| PageStreamError::Ticket { op, path, source }
        };
        let json =
            Zeroizing::new(serde_json::to_vec_pretty(self).map_err(|e| err("encoding")(e.into()))?);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(err("opening"))?;
        // An older file keeps its mode through open: narrow it before writing the secret.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err("setting the mode of"))?;
        file.write_all(&json)
            .and_then(|()| file.write_all(b"\n"))
            .map_err(err("writing"))
    }

    /// Reads `dir/`[`TICKET_FILE`]; `None` when there is none (a checkpoint without post-copy).
    pub fn read_from(dir: &Path) -> Result<Option<Ticket>, PageStreamError> {
        let path = dir.join(TICKET_FILE);
        let err = |op| {
            let path = path.clone();
            move |source| PageStreamError::Ticket { op, path, source }
        };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err("opening")(e)),
        };
        let mut content = Zeroizing::new(Vec::with_capacity(256));
        file.take(MAX_TICKET_BYTES + 1)
            .read_to_end(&mut content)
            .map_err(err("reading"))?;
        if content.len() as u64 > MAX_TICKET_BYTES {
            return Err(err("reading")(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_TICKET_BYTES} bytes: not a ticket"),
            )));
        }
        serde_json::from_slice(&content)
            .map(Some)
            .map_err(|e| err("parsing")(e.into()))
    }
}
