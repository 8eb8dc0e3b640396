//! The page stream's Noise handshake and its frames.
//!
//! Handshake, each message framed like the transport frames below:
//! 1. initiator -> responder: `NNpsk0` message 1 (`psk, e`), its empty payload encrypted under
//!    a key mixed from the secret: a responder without the same secret fails here.
//! 2. responder -> initiator: message 2 (`e, ee`).
//! 3. initiator -> responder: the first transport frame, [`CONFIRM`]. A replay of someone
//!    else's message 1 cannot produce it (that needs the initiator's ephemeral key), so the
//!    responder counts a peer as authenticated only once it arrives.
//!
//! Transport: every frame is a big-endian `u16` length, then a Noise message (ciphertext and
//! 16-byte tag). Each direction numbers its frames from zero, the nonce being the frame's
//! number, so the two directions run on two threads with no shared state but the keys.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use snow::params::NoiseParams;
use snow::{Builder, HandshakeState, StatelessTransportState};

use super::Secret;

/// The Noise protocol: no static keys, the secret as the pre-shared key, AES-GCM (ring's, with
/// AES-NI/VAES where the CPU has them) and SHA-256.
pub(super) const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bound into the handshake hash: both sides must mean this protocol and version.
pub(super) const PROLOGUE: &[u8] = b"podmigrate pagestream v1";
/// The initiator's key confirmation, the first transport frame.
const CONFIRM: &[u8] = b"podmigrate pagestream ready";

/// The largest Noise message, so the largest frame body.
pub(super) const MAX_MESSAGE: usize = 65535;
/// The AEAD tag in every message.
const TAG_LEN: usize = 16;
/// The largest plaintext in one frame.
pub(super) const MAX_CHUNK: usize = MAX_MESSAGE - TAG_LEN;
/// The length prefix of a frame.
pub(super) const HEADER_LEN: usize = 2;

/// The keys after a handshake, and the number of the next frame in each direction.
pub(super) struct Session {
    pub(super) transport: StatelessTransportState,
    pub(super) send_nonce: u64,
    pub(super) receive_nonce: u64,
}

/// Encrypts one direction's frames.
pub(super) struct Sealer<'a> {
    transport: &'a StatelessTransportState,
    nonce: u64,
}

impl<'a> Sealer<'a> {
    pub(super) fn new(transport: &'a StatelessTransportState, nonce: u64) -> Self {
        Sealer { transport, nonce }
    }

    /// Writes the frame carrying `plain` (at most [`MAX_CHUNK`] bytes; empty for the end of
    /// stream) into `frame` (at least `HEADER_LEN + MAX_MESSAGE` bytes) and returns its length.
    pub(super) fn seal(&mut self, plain: &[u8], frame: &mut [u8]) -> Result<usize, snow::Error> {
        let n = self
            .transport
            .write_message(self.nonce, plain, &mut frame[HEADER_LEN..])?;
        self.nonce += 1;
        let len = u16::try_from(n).map_err(|_| snow::Error::Input)?;
        frame[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Ok(HEADER_LEN + n)
    }
}

/// Decrypts the other direction's frames, in order.
pub(super) struct Opener<'a> {
    transport: &'a StatelessTransportState,
    nonce: u64,
}

impl<'a> Opener<'a> {
    pub(super) fn new(transport: &'a StatelessTransportState, nonce: u64) -> Self {
        Opener { transport, nonce }
    }

    /// Decrypts the next frame's body into `plain` (at least [`MAX_MESSAGE`] bytes) and returns
    /// the plaintext's length. Fails for a frame altered, forged, replayed or out of order.
    pub(super) fn open(&mut self, message: &[u8], plain: &mut [u8]) -> Result<usize, snow::Error> {
        let n = self.transport.read_message(self.nonce, message, plain)?;
        self.nonce += 1;
        Ok(n)
    }
}

/// Reads one frame body into `buf` (at least [`MAX_MESSAGE`] bytes) and returns its length;
/// `None` when the stream ends cleanly before a frame begins.
pub(super) fn read_frame(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = usize::from(u16::from_be_bytes(header));
    reader.read_exact(&mut buf[..len])?;
    Ok(Some(len))
}

/// A socket whose every read and write must finish by a deadline (the handshake's).
pub(super) struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Deadlined<'a> {
    pub(super) fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        Deadlined { stream, deadline }
    }

    /// Sets the socket's timeouts to what is left before the deadline.
    fn arm(&self, read: bool) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        if read {
            self.stream.set_read_timeout(Some(left))
        } else {
            self.stream.set_write_timeout(Some(left))
        }
    }

    fn timed_out(e: io::Error) -> io::Error {
        // A socket timeout is EAGAIN on Linux.
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "the handshake took too long")
            }
            _ => e,
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.stream.read(buf).map_err(Self::timed_out)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.stream.write(buf).map_err(Self::timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn builder(secret: &Secret) -> Result<Builder<'_>, String> {
    let params: NoiseParams = PATTERN
        .parse()
        .map_err(|e| format!("unsupported protocol {PATTERN}: {e}"))?;
    Builder::new(params)
        .psk(0, secret.bytes())
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(|e| format!("setting up {PATTERN}: {e}"))
}

/// Sends one handshake message carrying `payload`.
fn send_handshake(
    io: &mut (impl Read + Write),
    state: &mut HandshakeState,
    payload: &[u8],
    what: &str,
) -> Result<(), String> {
    let mut frame = vec![0u8; HEADER_LEN + MAX_MESSAGE];
    let n = state
        .write_message(payload, &mut frame[HEADER_LEN..])
        .map_err(|e| format!("making {what}: {e}"))?;
    let len = u16::try_from(n).map_err(|_| format!("{what} is too long"))?;
    frame[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    io.write_all(&frame[..HEADER_LEN + n])
        .map_err(|e| format!("sending {what}: {e}"))
}

/// Receives one frame body; `closed` explains a connection closed before it.
fn receive(io: &mut impl Read, buf: &mut [u8], what: &str, closed: &str) -> Result<usize, String> {
    match read_frame(io, buf) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(format!("closed before {what}: {closed}")),
        Err(e) => Err(format!("receiving {what}: {e}")),
    }
}

/// The server's side of the handshake.
pub(super) fn respond(io: &mut Deadlined<'_>, secret: &Secret) -> Result<Session, String> {
    let mut state = builder(secret)?
        .build_responder()
        .map_err(|e| format!("setting up {PATTERN}: {e}"))?;
    let mut message = vec![0u8; MAX_MESSAGE];
    let mut payload = vec![0u8; MAX_MESSAGE];
    let n = receive(
        io,
        &mut message,
        "the first handshake message",
        "nothing was sent",
    )?;
    state
        .read_message(&message[..n], &mut payload)
        .map_err(|_| {
            "the first handshake message failed authentication: the peer does not hold this \
             migration's secret, or is not a page stream"
                .to_string()
        })?;
    send_handshake(io, &mut state, &[], "the second handshake message")?;
    let transport = state
        .into_stateless_transport_mode()
        .map_err(|e| format!("finishing the handshake: {e}"))?;
    let n = receive(
        io,
        &mut message,
        "the key confirmation",
        "the peer could not derive the keys (a replayed handshake?)",
    )?;
    let m = Opener::new(&transport, 0)
        .open(&message[..n], &mut payload)
        .map_err(|_| "the key confirmation failed authentication".to_string())?;
    if &payload[..m] != CONFIRM {
        return Err("the key confirmation is not the expected one".to_string());
    }
    Ok(Session {
        transport,
        send_nonce: 0,
        receive_nonce: 1,
    })
}

/// The client's side of the handshake.
pub(super) fn initiate(io: &mut Deadlined<'_>, secret: &Secret) -> Result<Session, String> {
    let mut state = builder(secret)?
        .build_initiator()
        .map_err(|e| format!("setting up {PATTERN}: {e}"))?;
    send_handshake(io, &mut state, &[], "the first handshake message")?;
    let mut message = vec![0u8; MAX_MESSAGE];
    let mut payload = vec![0u8; MAX_MESSAGE];
    let n = receive(
        io,
        &mut message,
        "the second handshake message",
        "the source refused the first one: it does not hold the same secret, refuses this \
         node's address, or is not a page stream server",
    )?;
    state
        .read_message(&message[..n], &mut payload)
        .map_err(|_| "the second handshake message failed authentication".to_string())?;
    let transport = state
        .into_stateless_transport_mode()
        .map_err(|e| format!("finishing the handshake: {e}"))?;
    let mut frame = vec![0u8; HEADER_LEN + MAX_MESSAGE];
    let len = Sealer::new(&transport, 0)
        .seal(CONFIRM, &mut frame)
        .map_err(|e| format!("making the key confirmation: {e}"))?;
    io.write_all(&frame[..len])
        .map_err(|e| format!("sending the key confirmation: {e}"))?;
    Ok(Session {
        transport,
        send_nonce: 1,
        receive_nonce: 0,
    })
}
